"""Checkpoint files for the tests: crafted pickles, fake ZeRO saves in DeepSpeed's layout, Lightning .ckpt files.

    from tests.checkpoint_fixtures import write_crafted, fake_zero_save, lightning_ckpt, rewrite_manifest
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from gpt import zero_checkpoint as zc


class _RunsCommand:
    """Unpickling this calls os.system(cmd): what a crafted checkpoint does to torch.load(weights_only=False)."""

    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (self.cmd,)


def write_crafted(path: Path, marker: Path, like: dict[str, Any] | None = None) -> Path:
    """A torch zip file whose unpickling creates `marker` (a shell `touch`), shaped like `like`:
    the crafted object sits under every top-level key, so any reader that unpickles it runs it."""
    keys = list(like) if like else ["module", "optimizer_state_dict"]
    torch.save({k: _RunsCommand(f"touch {marker}") for k in keys}, path)
    return path


def rewrite_manifest(d: Path) -> None:
    """Make the manifest agree with the files now in `d` (sizes): what someone handing over a
    tampered directory would do, so that only the content checks stand between it and a load."""
    m = json.loads((d / zc.MANIFEST).read_text())
    m["files"] = {rel: (d / rel).stat().st_size for rel in m["files"] if (d / rel).is_file()}
    (d / zc.MANIFEST).write_text(json.dumps(m))


class _Disk:
    """The part of DeepSpeed's TorchCheckpointEngine a save uses."""

    def save(self, state_dict: Any, path: str) -> None:
        torch.save(state_dict, path)


def fake_zero_save(parent: Path, name: str, step: int, world: int = 2, *, stop: str = "") -> Path:
    """gpt.zero.ZeroStrategy.save_checkpoint's protocol with DeepSpeed's writes replaced by torch.save
    in DeepSpeed's ZeRO-2 layout (rank 0: the model states with the client state; every rank: its
    optimizer shard holding a DeepSpeed LossScaler). `stop` ends it early, as a kill would:
    "begin" (staging created), "files" (shards written, no manifest), "manifest" (not published)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    target = parent / name
    sid = zc.new_save_id()
    staging = zc.staging_dir(target, sid)
    parent.mkdir(parents=True, exist_ok=True)
    zc.collect_garbage(parent)
    zc.begin(staging, name)
    if stop == "begin":
        return staging
    (staging / "checkpoint").mkdir()
    per_rank = []
    for r in range(world):
        rec = zc.RecordingEngine(_Disk(), staging, {"id": sid, "step": step, "rank": r})
        if r == 0:
            rec.save({"module": {"w": torch.full((4,), float(step))}, "global_step": step,
                      "gpt": {"model_config": {}, "tokenizer": None}},
                     str(staging / "checkpoint" / "mp_rank_00_model_states.pt"))
        rec.save({"optimizer_state_dict": {"loss_scaler": LossScaler(1.0), "fp32": torch.full((3,), float(r))}},
                 str(staging / "checkpoint" / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"))
        per_rank.append(rec.written)
    (staging / "latest").write_text("checkpoint")
    if stop == "files":
        return staging
    zc.finish(staging, name=name, save_id=sid, step=step, per_rank=per_rank)
    if stop == "manifest":
        return staging
    zc.publish(staging, target)
    return target


def lightning_ckpt(path: Path, step: int) -> Path:
    """A Lightning-style training checkpoint file, written as gpt.checkpoint_io.AtomicCheckpointIO does."""
    from gpt.checkpoint_io import AtomicCheckpointIO

    AtomicCheckpointIO().save_checkpoint({"state_dict": {"model.w": torch.full((2,), float(step))},
                                          "global_step": step, "epoch": 0}, path)
    return path
