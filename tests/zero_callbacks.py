"""A callback the ZeRO tests put into recipe configs (importable by the recipe subprocess).

    callbacks: [{class_path: tests.zero_callbacks.SaveLiveLogits, init_args: {path: /tmp/x.pt}}]
"""
from __future__ import annotations

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
