"""AdamW parameter groups and learning-rate schedules (per optimizer step).

    from gpt.optim import build_optimizer, LRSchedule, StepScheduler
    opt = build_optimizer(model, lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95))
    sched = StepScheduler(opt, LRSchedule("cosine", warmup_steps=100, total_steps=5000))

Weight decay applies to matmul weights only: norms, biases and embeddings (and a head tied
to the embedding) are left undecayed, as in GPT-2/nanoGPT/litgpt. Schedules:
- "cosine": linear warmup to lr, cosine down to min_lr_ratio * lr at total_steps;
- "wsd":    warmup-stable-decay: warmup, hold lr, linear decay to min_lr_ratio * lr over the
            last decay_fraction of the run (lets a run be extended or cooled down anywhere);
- "constant": warmup then flat.
LRSchedule is a small class (not a lambda) so LambdaLR's state_dict stays plain data.

Resume. A plain LambdaLR restores its base learning rates and the schedule object's fields from
the checkpoint, so a run resumed with another lr or max_steps would silently keep the old ones.
StepScheduler restores only the step count: the lr at step s is always `lr * schedule(s)` of the
*current* configuration (and the optimizer's param groups are set to it), so a changed lr or
total length takes effect at the resume step and the schedule follows from there.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn

Schedule = Literal["cosine", "wsd", "constant"]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed matmul weights and undecayed norms/biases/embeddings."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # named_parameters() yields a tied weight once
        if not p.requires_grad:
            continue
        # A ZeRO-3 parameter built inside deepspeed.zero.Init is a [0]-shaped shard; ds_shape is its shape.
        if len(getattr(p, "ds_shape", p.shape)) < 2 or id(p) in embedding_ids:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # No empty group (LoRA trains matrices only): DeepSpeed drops it, and the lr scheduler,
    # built for both groups, then fails on the first step.
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1,
                    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                    cpu_offload: bool = False, fused: bool = True) -> torch.optim.Optimizer:
    """AdamW over `param_groups`; DeepSpeed's C++ CPU AdamW when ZeRO offloads the optimizer.

    fused: torch's fused AdamW where the parameters' device has it (CPU, CUDA). Pass False under
    a GradScaler (16-mixed): Lightning refuses to clip gradients for a fused optimizer there.

    Under ZeRO-Offload the fp32 master weights and Adam states live in host RAM and the step runs
    on the CPU: DeepSpeedCPUAdam (SIMD, multi-threaded) is what DeepSpeed expects there, several
    times faster than torch's AdamW on large models. Same update rule (decoupled weight decay).
    """
    groups = param_groups(model, weight_decay)
    if cpu_offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # compiled on first use, cached in TORCH_EXTENSIONS_DIR

        return DeepSpeedCPUAdam(groups, lr=lr, betas=tuple(betas), eps=eps, adamw_mode=True)
    # torch's fused AdamW (one kernel per parameter) exists for CUDA and CPU. On CPU torch's default
    # is the for-loop AdamW: ~11 small ops per parameter, 15 ms a step on tiny-cpu's 2.6M parameters
    # against 7 ms fused, and 260 ms against 12 ms when another job shares the cores (OpenMP waits).
    fused = fused and all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused or None)


class LRSchedule:
    """Multiplier of the base lr at optimizer step `step` (0-based), for LambdaLR."""

    def __init__(self, kind: Schedule = "cosine", warmup_steps: int = 0, total_steps: int = 1,
                 min_lr_ratio: float = 0.1, decay_fraction: float = 0.2):
        if kind not in ("cosine", "wsd", "constant"):
            raise ValueError(f"unknown schedule {kind!r}; choose cosine, wsd or constant")
        if total_steps < 1:
            raise ValueError(f"the schedule needs total_steps >= 1 (set trainer.max_steps), got {total_steps}")
        self.kind, self.warmup_steps, self.total_steps = kind, warmup_steps, total_steps
        self.min_lr_ratio, self.decay_fraction = min_lr_ratio, decay_fraction

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps  # never 0: the first step already learns
        lo = self.min_lr_ratio
        if self.kind == "constant":
            return 1.0
        if self.kind == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            progress = min(1.0, (step - self.warmup_steps) / span)
            return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * progress))
        decay_steps = max(1, round(self.decay_fraction * self.total_steps))
        decay_start = self.total_steps - decay_steps
        if step < decay_start:
            return 1.0
        return 1.0 - (1 - lo) * min(1.0, (step - decay_start) / decay_steps)


class StepScheduler(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR whose only state is the step: on resume, lr and schedule come from this run's config."""

    def load_state_dict(self, state_dict: dict) -> None:
        self.last_epoch = int(state_dict["last_epoch"])
        self._step_count = int(state_dict.get("_step_count", self.last_epoch + 1))
        # Same expression as LambdaLR.get_lr, so an unchanged config resumes bit-exactly.
        lrs = [base * fn(self.last_epoch) for fn, base in zip(self.lr_lambdas, self.base_lrs)]
        for group, base, lr in zip(self.optimizer.param_groups, self.base_lrs, lrs):
            group["initial_lr"], group["lr"] = base, lr  # the optimizer's restored state carried the old ones
        self._last_lr = lrs
