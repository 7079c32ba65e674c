"""Callbacks the ZeRO tests put into recipe configs (importable by the recipe subprocess).

    callbacks: [{class_path: tests.zero_callbacks.SaveLiveLogits, init_args: {path: /tmp/x.pt}}]
    callbacks: [{class_path: tests.zero_callbacks.KillDuringSave, init_args: {save: 4, rank: 1, moment: partial}}]
"""
from __future__ import annotations

import io
import os
import signal
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


def probe_tokens(vocab_size: int, length: int = 16) -> torch.Tensor:
    """A fixed input both the live model and the consolidated copy see."""
    return (torch.arange(2 * length).reshape(2, length) * 7 + 3) % vocab_size


class SaveLiveLogits(Callback):
    """At the end of fit, the live (possibly ZeRO-3-partitioned) model's logits on probe_tokens."""

    def __init__(self, path: str):
        self.path = path

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        model = pl_module.model
        model.eval()
        with torch.no_grad():  # every rank calls it: ZeRO-3 gathers the partitioned weights in forward
            logits = model(probe_tokens(pl_module.config.vocab_size).to(pl_module.device))
        if trainer.is_global_zero:
            torch.save(logits.float().cpu(), self.path)


# ---- kills at chosen moments inside a DeepSpeed save (tests/test_zero.py) ------------------------

def _kill_run() -> None:
    """SIGKILL every process of the run at once (the test starts it as its own process group), as
    Slurm's scancel, a preemption past its grace period or a node failure would."""
    os.killpg(os.getpgrp(), signal.SIGKILL)


class _KillingEngine:
    """Wraps DeepSpeed's checkpoint engine; dies at the chosen file or at commit."""

    def __init__(self, inner: Any, moment: str, file: int):
        self.inner, self.moment, self.file, self.count = inner, moment, file, 0

    def save(self, state_dict: Any, path: str) -> None:
        if self.count == self.file and self.moment == "partial":
            buf = io.BytesIO()
            torch.save(state_dict, buf)
            data = buf.getvalue()
            with open(path, "wb") as f:  # the first half of the bytes reach the disk, then the kill
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
            _kill_run()
        self.inner.save(state_dict, path)
        if self.count == self.file and self.moment == "after":
            _kill_run()
        self.count += 1

    def commit(self, info: Any) -> Any:
        if self.moment == "commit":
            _kill_run()
        return self.inner.commit(info)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class KillDuringSave(Callback):
    """Kill the whole run inside its `save`-th checkpoint save (1-based, counted per process).

    moment: "partial" - rank `rank` writes half of its `file`-th file (0-based, in DeepSpeed's order) and
    the run dies; "after" - the run dies right after rank `rank` wrote that file; "commit" - the run dies
    when DeepSpeed commits the save on rank `rank` (every file written, nothing published yet).
    """

    def __init__(self, save: int, rank: int = 0, moment: str = "after", file: int = 0):
        assert moment in ("partial", "after", "commit"), moment
        self.save, self.rank, self.moment, self.file = save, rank, moment, file
        self.saves = 0

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        # Lightning calls this on every rank while it builds the checkpoint dict, before the strategy writes.
        self.saves += 1
        if self.saves == self.save and trainer.global_rank == self.rank:
            engine = trainer.strategy.deepspeed_engine
            engine.checkpoint_engine = _KillingEngine(engine.checkpoint_engine, self.moment, self.file)
