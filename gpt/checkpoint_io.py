"""Atomic checkpoint files: a kill during a save leaves the previous checkpoint loadable.

    trainer = L.Trainer(plugins=[AtomicCheckpointIO()], ...)       # or in a recipe YAML:
    #   trainer.plugins: [{class_path: gpt.checkpoint_io.AtomicCheckpointIO}]
    path, notes = find_resume_checkpoint("runs/x/checkpoints")     # what `--ckpt_path last` resumes

Lightning's TorchCheckpointIO writes the final path in place, so a SIGKILL (preemption, OOM
killer) in the middle of writing `last.ckpt` leaves a truncated file where the only resume
point was. Here the bytes go to `<path>.tmp`, are fsynced, then `os.replace`d over the old
file: a reader sees either the old checkpoint or the new one, never half of one. Strategies
that save directories (DeepSpeed) use their own path and are not affected by this plugin.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO with write-to-temp + fsync + rename for local paths."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Optional[Any] = None) -> None:
        if "://" in str(path) and not str(path).startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)  # remote: fsspec's own semantics
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        _fsync_dir(path.parent)  # make the rename itself durable

    def load_checkpoint(self, path: str | os.PathLike, map_location: Optional[Any] = None,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        # Our checkpoints hold plain data only, so the safe loader always suffices.
        return super().load_checkpoint(path, map_location=map_location or (lambda storage, loc: storage),
                                       weights_only=True)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def find_resume_checkpoint(checkpoint_dir: str | os.PathLike) -> tuple[Optional[Path], list[str]]:
    """The checkpoint `--ckpt_path last` resumes from, and one-line notes to print.

    last.ckpt when it exists, else the periodic checkpoint with the highest step (its name carries
    `step=N`), else (None, notes): a fresh start. (A minimal version: it does not yet verify that a
    checkpoint is complete before choosing it.)
    """
    d = Path(checkpoint_dir)
    last = d / "last.ckpt"
    if last.exists():
        return last, []
    steps = {}
    for p in d.glob("*.ckpt") if d.is_dir() else ():
        m = re.search(r"step=(\d+)", p.name)
        if m:
            steps[p] = int(m.group(1))
    if not steps:
        return None, [f"no checkpoint in {d}: starting from step 0"]
    newest = max(steps, key=steps.get)
    return newest, [f"{last} is missing: resuming from {newest.name}, the newest periodic checkpoint"]
