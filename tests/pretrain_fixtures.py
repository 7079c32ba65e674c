"""Fixtures for the pretraining tests: small shard directories and recipe configs.

    from tests.pretrain_fixtures import write_random_shards, write_text_shards, write_config, run_recipe, read_csv_metrics
"""
from __future__ import annotations

import csv
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np
import yaml

from gpt.shards import FORMAT, VERSION, ShardWriter, split_summary, write_manifest

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32}


def _manifest(out: Path, splits: dict[str, list[dict]], vocab_size: int, tok_hash: str) -> None:
    write_manifest(out, {"format": FORMAT, "version": VERSION, "dtype": "uint16",
                         "tokenizer": {"hash": tok_hash, "vocab_size": vocab_size}, "eot_id": 0,
                         "splits": {s: split_summary(r) for s, r in splits.items()}})


def write_random_shards(out: Path, train_tokens: int = 20_000, val_tokens: int = 2_000, vocab_size: int = 256,
                        max_tokens_per_shard: int = 7_000, seed: int = 0) -> Path:
    """Random-token train/val splits in several shards (documents of ~500 tokens ending in 0)."""
    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in (("train", train_tokens), ("val", val_tokens)):
        w = ShardWriter(out, f"{split}_t00000", "uint16", max_tokens_per_shard)
        done = 0
        while done < n:
            doc = rng.integers(1, vocab_size, size=min(500, n - done))
            doc[-1] = 0
            w.add(doc)
            done += doc.size
        splits[split] = w.close()
    _manifest(out, splits, vocab_size, "random")
    return out


def write_text_shards(out: Path, tokenizer_path: Path, max_chars: int = 400_000, val_every: int = 10) -> Path:
    """Shakespeare encoded with a real tokenizer; every val_every-th paragraph goes to val."""
    from gpt.tokenizer import Tokenizer
    tok = Tokenizer.from_file(tokenizer_path)
    text = ""
    with gzip.open(ROOT / "data" / "shakespeare.jsonl.gz", "rt") as f:
        for line in f:
            text += json.loads(line)["text"]
            if len(text) >= max_chars:
                break
    paragraphs = [p for p in text[:max_chars].split("\n\n") if p.strip()]
    writers = {s: ShardWriter(out, f"{s}_t00000", "uint16", 100_000) for s in ("train", "val")}
    for i, p in enumerate(paragraphs):
        writers["val" if i % val_every == 0 else "train"].add(tok.encode(p + "\n\n") + [tok.eot_id])
    _manifest(out, {s: w.close() for s, w in writers.items()}, tok.vocab_size, tok.content_hash)
    return out


def write_config(path: Path, run_dir: Path, data_dir: Path, tokenizer: Optional[Path] = None, *,
                 max_steps: int = 12, micro_batch_size: int = 4, accumulate: int = 1, devices: int = 1,
                 checkpoint_every: int = 4, keep_checkpoints: int = -1, val_every: Optional[int] = None,
                 model: Optional[dict] = None, vocab_size: int = 256, wandb: bool = False,
                 callbacks: Optional[list[dict]] = None, model_args: Optional[dict] = None,
                 data_args: Optional[dict] = None, precision: str = "32-true",
                 every_n_train_steps: Optional[int] = None) -> Path:
    """A tiny fp32 recipe config whose run directory is run_dir (checkpoints/, csv/, wandb/).

    Validation runs once, at the last step, unless val_every says otherwise; every periodic
    checkpoint is kept. `every_n_train_steps` is the older name of checkpoint_every.
    """
    cfg = {
        "run_dir": str(run_dir), "group": "test", "wandb": wandb,
        "checkpoint_every": every_n_train_steps if every_n_train_steps is not None else checkpoint_every,
        "keep_checkpoints": keep_checkpoints, "val_every": val_every if val_every is not None else max_steps,
        "seed_everything": 1234,
        "trainer": {
            "accelerator": "cpu", "devices": devices, "num_nodes": 1, "precision": precision,
            "strategy": "ddp" if devices > 1 else "auto",
            "max_steps": max_steps, "accumulate_grad_batches": accumulate, "gradient_clip_val": 1.0,
            "log_every_n_steps": 1, "enable_progress_bar": False,
            "plugins": [{"class_path": "gpt.checkpoint_io.AtomicCheckpointIO"}],
            "callbacks": [{"class_path": "gpt.callbacks.NonFiniteGuard"}, *(callbacks or [])],
        },
        "model": {"preset": "tiny", "model_config": {**TINY_MODEL, "vocab_size": vocab_size, **(model or {})},
                  "lr": 1e-2, "warmup_steps": 2, **(model_args or {})},
        "data": {"data_dir": str(data_dir), "tokenizer": str(tokenizer) if tokenizer else None,
                 "block_size": 32, "micro_batch_size": micro_batch_size, "seed": 7, "val_windows": 8,
                 **(data_args or {})},
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def recipe_cmd(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "recipes.pretrain", "--config", str(config), *extra]


def recipe_env() -> dict[str, str]:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for k in [k for k in env if k.startswith("SLURM_")]:
        env.pop(k)  # a test run inside a Slurm job must not look like srun
    return env


def run_recipe(config: Path, *extra: str, timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(recipe_cmd(config, *extra), cwd=ROOT, env=recipe_env(), capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"recipe failed (rc {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def read_csv_metrics(run_dir: Path) -> list[dict[str, float]]:
    """All CSVLogger rows of every version (a resume starts a new version), in version order."""
    rows = []
    versions = sorted((run_dir / "csv").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    for v in versions:
        with open(v / "metrics.csv") as f:
            for row in csv.DictReader(f):
                rows.append({k: float(x) for k, x in row.items() if x not in ("", None)})
    return rows


def metric_by_step(run_dir: Path, key: str) -> dict[int, float]:
    """`key` per step; a resumed run's rows overwrite those of the run it resumed."""
    return {int(r["step"]): r[key] for r in read_csv_metrics(run_dir) if key in r}


def losses_by_step(run_dir: Path) -> dict[int, float]:
    return metric_by_step(run_dir, "train/loss")


# ---- callbacks the tests put into recipe configs (importable by the recipe subprocess) ----------
import time as _time

import torch as _torch
from lightning.pytorch.callbacks import Callback as _Callback


class SlowDown(_Callback):
    """Sleep after every optimizer step, so that a test can kill the run in the middle."""

    def __init__(self, seconds: float = 0.2):
        self.seconds = seconds

    def on_train_batch_end(self, *args: Any) -> None:
        _time.sleep(self.seconds)


class SlowValidation(_Callback):
    """Sleep at the start of every validation, so that a test can kill the run while it validates."""

    def __init__(self, seconds: float = 2.0):
        self.seconds = seconds

    def on_validation_start(self, *args: Any) -> None:
        _time.sleep(self.seconds)


class InjectNaN(_Callback):
    """At optimizer step `step`: what="weight" poisons a weight (the loss turns NaN from then on),
    what="grad" poisons one gradient element once (a transient blow-up)."""

    def __init__(self, step: int, what: str = "weight"):
        self.step, self.what = step, what

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.what == "weight" and trainer.global_step == self.step:
            with _torch.no_grad():
                pl_module.model.wte.weight[:] = float("nan")

    def on_after_backward(self, trainer, pl_module) -> None:
        if self.what == "grad" and trainer.global_step == self.step:
            next(pl_module.model.parameters()).grad.view(-1)[0] = float("nan")


def _wandb_records(run_file: Path) -> list[Any]:
    """The records of an offline `.wandb` file (wandb's internal LevelDB-style log; wandb is pinned).

    Framing: a 7-byte file header (":W&B", magic u16, version u8), then 32 KiB blocks of records,
    each with a 7-byte header (crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last).
    """
    import struct

    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", run_file
    pos, block, payloads, parts = 7, 32768, [], b""
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:  # block trailer too small for a header: padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += room
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            payloads.append(parts)
    records = []
    for raw in payloads:
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(raw)
        records.append(rec)
    return records


def read_wandb_history(run_file: Path) -> list[dict[str, Any]]:
    """History rows of an offline `.wandb` file, each a dict (with W&B's `_step`)."""
    return [{(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
            for rec in _wandb_records(run_file) if rec.WhichOneof("record_type") == "history"]


def read_wandb_run(run_file: Path) -> dict[str, Any]:
    """{"id", "group", "job_type", "config" (key -> value), "history" (rows)} of an offline `.wandb` file."""
    out: dict[str, Any] = {"config": {}, "history": []}
    for rec in _wandb_records(run_file):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out.update(id=rec.run.run_id, group=rec.run.run_group, job_type=rec.run.job_type)
            updates = rec.run.config.update
        elif kind == "config":
            updates = rec.config.update
        elif kind == "history":
            out["history"].append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                                   for i in rec.history.item})
            continue
        else:
            continue
        for item in updates:
            value = json.loads(item.value_json)
            out["config"][item.key] = value.get("value", value) if isinstance(value, dict) else value
    return out
