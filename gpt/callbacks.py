"""Training callbacks: MFU with the device's own peak, a non-finite-loss guard, sample generations.

    trainer.callbacks in a recipe YAML (see recipes/configs/tiny-cpu.yaml):
      - class_path: gpt.callbacks.GPTThroughputMonitor   # tokens/s, FLOP/s and MFU
      - class_path: gpt.callbacks.NonFiniteGuard          # action: stop | skip
      - class_path: gpt.callbacks.SampleGenerations       # prompts -> W&B table at each validation

Checkpointing and lr logging are Lightning's own ModelCheckpoint and LearningRateMonitor.
"""
from __future__ import annotations

from typing import Any, Literal, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ThroughputMonitor
from lightning.pytorch.callbacks.throughput_monitor import _plugin_to_compute_dtype
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info

from gpt.flops import peak_flops
from gpt.generate import generate
from gpt.lm import total_grad_norm
from gpt.tokenizer import Tokenizer


def _batch_size(batch: dict[str, torch.Tensor]) -> int:
    return batch["input_ids"].size(0)


def _num_tokens(batch: dict[str, torch.Tensor]) -> int:
    return batch["input_ids"].numel()


class GPTThroughputMonitor(ThroughputMonitor):
    """Lightning's ThroughputMonitor for token batches, with the peak taken from gpt.flops.

    Lightning knows the peak of some GPUs only (none on CPU, so no MFU there); gpt.flops has a
    data-sheet table and measures a matmul where it has no entry. Logs train/device/items_per_sec
    (tokens/s per device), train/device/flops_per_sec and train/device/mfu, averaged over
    `window_size` micro-batches. The module provides `flops_per_batch` (gpt.flops.flops_per_token).
    """

    def __init__(self, window_size: int = 20):
        super().__init__(batch_size_fn=_batch_size, length_fn=_num_tokens, window_size=window_size)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        dtype = _plugin_to_compute_dtype(trainer.precision_plugin)
        self.available_flops = peak_flops(trainer.strategy.root_device, dtype)
        for throughput in self._throughputs.values():
            throughput.available_flops = self.available_flops


class NonFiniteGuard(Callback):
    """Never train on silently after a NaN/inf loss or gradient.

    Checked once per optimizer step, after every micro-batch's backward and before the update.
    action="stop" raises with the step number; action="skip" drops the update (gradients
    cleared, so AdamW leaves the weights and its moments alone) and logs train/skipped_steps.
    Gradients are already all-reduced here, so every rank takes the same decision.
    """

    def __init__(self, action: Literal["stop", "skip"] = "stop"):
        if action not in ("stop", "skip"):
            raise ValueError(f"action must be 'stop' or 'skip', got {action!r}")
        self.action = action
        self.skipped = 0

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        loss = getattr(pl_module, "_step_loss", torch.zeros(()))
        norm = total_grad_norm(pl_module)
        finite = bool(torch.isfinite(loss)) and (norm is None or bool(torch.isfinite(norm)))
        if finite:
            return
        what = f"loss {float(loss):.4g}, grad norm {float(norm) if norm is not None else float('nan'):.4g}"
        if self.action == "stop":
            raise FloatingPointError(f"non-finite loss or gradient at step {trainer.global_step} ({what}); "
                                     f"stopping (NonFiniteGuard action=stop)")
        self.skipped += 1
        optimizer.zero_grad(set_to_none=True)
        rank_zero_info(f"NonFiniteGuard: skipped step {trainer.global_step} ({what}); {self.skipped} skipped so far")
        pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, rank_zero_only=True)

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))


class SampleGenerations(Callback):
    """Continuations of fixed prompts at every validation, logged as a W&B table and printed.

    Runs on every rank (a ZeRO-3 forward needs all ranks) with a fixed seed, logs from rank 0.
    temperature 0 is greedy. Generation is gpt.generate (KV cache), the one used by `gpt sample`.
    """

    def __init__(self, prompts: Optional[list[str]] = None, max_new_tokens: int = 48,
                 temperature: float = 0.0, top_k: Optional[int] = 50, seed: int = 0):
        self.prompts = prompts or ["ROMEO:", "First Citizen:\n", "To be, or not to be"]
        self.max_new_tokens, self.temperature, self.top_k, self.seed = max_new_tokens, temperature, top_k, seed

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        tok_json = getattr(pl_module, "tokenizer_json", None)
        if trainer.sanity_checking or tok_json is None:
            return
        tok = Tokenizer.from_str(tok_json)
        prompts = [tok.encode(p) for p in self.prompts]
        room = pl_module.model.config.block_size - max(len(p) for p in prompts)
        with trainer.precision_plugin.forward_context():
            outs = generate(pl_module.model, prompts, max_new_tokens=max(0, min(self.max_new_tokens, room)),
                            temperature=self.temperature, top_k=self.top_k, seed=self.seed, stop_ids=[tok.eot_id])
        rows = [[trainer.global_step, p, tok.decode(ids)] for p, ids in zip(self.prompts, outs)]
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.log_text(key="samples", columns=["step", "prompt", "completion"], data=rows,
                                    step=trainer.global_step)
            rank_zero_info("\n".join(f"[step {s}] {p!r} -> {c!r}" for s, p, c in rows))
