"""Atomic checkpoint files: a kill during a save leaves the previous checkpoint loadable.

    trainer = L.Trainer(plugins=[AtomicCheckpointIO()], ...)       # or in a recipe YAML:
    #   trainer.plugins: [{class_path: gpt.checkpoint_io.AtomicCheckpointIO}]

Lightning's TorchCheckpointIO writes the final path in place, so a SIGKILL (preemption, OOM
killer) in the middle of writing `last.ckpt` leaves a truncated file where the only resume
point was. Here the bytes go to `<path>.tmp`, are fsynced, then `os.replace`d over the old
file: a reader sees either the old checkpoint or the new one, never half of one. Strategies
that save directories (DeepSpeed) use their own path and are not affected by this plugin.
"""
from __future__ import annotations

import os
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
