"""The models an RL step uses besides the trained policy, and DeepSpeed's micro-step bookkeeping.

    frozen = freeze(load_model(path)[0], trainer, device, dtype, zero3=True)   # reference / reward model
    fp = same_weights(model, recorded_fp, "model.reward_model PATH")            # a resume keeps its frozen models
    check_frozen_sources(reference, reward_model, critic)  # before the run starts: one line if a path is wrong
    policy_copy = gathered_copy(engine_module, config, device, previous_copy)  # what ZeRO-3 samples from

Frozen models (the reference policy, the reward model) are in eval mode with requires_grad off, in
the training precision; under ZeRO-3 each is partitioned by its own DeepSpeed inference engine with
the policy's ZeRO settings, so it never holds a full copy. Rollouts under ZeRO-3 are sampled from a
full copy of the policy refreshed once per rollout, one parameter gathered at a time, so generation
never gathers layers token by token. A run records each frozen model's weight fingerprint in its
checkpoints, and a resume whose reference or reward model has other weights (the file retrained in
place, another path) is refused: the objective would change under the run. Used by gpt/rl.py.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch

from gpt.checkpoint import CheckpointError, announced_heads, refuse_reward_model
from gpt.config import GPTConfig
from gpt.model import GPT


def freeze(model: torch.nn.Module, trainer: L.Trainer, device: torch.device, default_dtype: torch.dtype,
           zero3: bool) -> torch.nn.Module:
    """`model` frozen, in the trainer's precision (else default_dtype), on device; ZeRO-3-partitioned if zero3."""
    model.eval().requires_grad_(False)
    precision = str(trainer.precision)
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16 if precision.startswith("16") \
        else default_dtype
    model = model.to(device=device, dtype=dtype)
    if zero3:
        import deepspeed

        # A DeepSpeed engine without an optimizer partitions the frozen weights as the policy's are
        # (the same ZeRO-3 settings, parameter offload included); each forward gathers a layer at a time.
        zero = {k: v for k, v in trainer.strategy.config["zero_optimization"].items() if k != "offload_optimizer"}
        cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero,
               "bf16": {"enabled": dtype == torch.bfloat16}, "fp16": {"enabled": dtype == torch.float16}}
        engine, *_ = deepspeed.initialize(model=model, config=cfg)
        model = engine.module
    return model


def check_frozen_sources(reference: Optional[str], reward_model: Optional[str], critic: Optional[str]) -> None:
    """One CheckpointError line naming the flag, before a run starts, unless model.reference (if set)
    is a language model and model.reward_model / model.critic (if set) are reward models. A reward
    model is read whole only when its metadata does not say so, for load_reward_model's own line
    (no such file, unreadable, a language model)."""
    if reference:
        if not Path(reference).exists():
            raise CheckpointError(f"model.reference {reference}: no such file or directory")
        refuse_reward_model(reference, f"model.reference {reference}", "the reference is a language model")
    for flag, path in (("model.reward_model", reward_model), ("model.critic", critic)):
        if path and "reward_head" not in announced_heads(path):
            from gpt.reward import load_reward_model

            try:
                load_reward_model(path)
            except CheckpointError as e:
                raise CheckpointError(f"{flag} {e}") from None


def fingerprint(model: torch.nn.Module, samples: int = 4096) -> str:
    """A hash of the weights: each tensor's name, shape, dtype and up to `samples` evenly spaced
    values, so that it costs little at any size yet changes when a model is trained further."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        flat = t.detach().reshape(-1)
        picked = flat[::max(1, flat.numel() // samples)][:samples].to("cpu", torch.float32)
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(picked.numpy().tobytes())
    return h.hexdigest()[:16]


def same_weights(model: torch.nn.Module, recorded: Optional[str], what: str) -> str:
    """`model`'s fingerprint; CheckpointError if the run's checkpoint recorded another one."""
    got = fingerprint(model)
    if recorded is not None and got != recorded:
        raise CheckpointError(f"{what}: not the weights this run trained against (fingerprint {got}, the checkpoint "
                              f"recorded {recorded}); a resume keeps its frozen models: to use these, start a new run "
                              "with --init_from the checkpoint")
    return got


def gathered_copy(model: torch.nn.Module, config: GPTConfig, device: torch.device, copy: Optional[GPT]) -> GPT:
    """A full GPT holding the ZeRO-3-partitioned `model`'s weights (built on first use, then refreshed)."""
    import deepspeed

    if copy is None:
        with torch.device("meta"):
            copy = GPT(config)
        copy = copy.to_empty(device=device).eval().requires_grad_(False)
        if config.flavour == "llama":  # non-persistent buffers built on meta: rebuild them
            from gpt.model import rope_cache

            copy.rope_cos, copy.rope_sin = (t.to(device) for t in rope_cache(config, config.block_size))
        if config.tie_embeddings:  # to_empty made two tensors of the tied one
            copy.lm_head.weight = copy.wte.weight
    for name, p in model.named_parameters():  # a tied weight once, by its first name
        with deepspeed.zero.GatheredParameters([p]):
            copy.get_parameter(name).data.copy_(p.data)
    return copy


def begin_micro_step(engine: Any) -> None:
    """Open a DeepSpeed micro-step, as engine.forward does before each forward.

    DeepSpeed counts micro-steps at engine.forward, expecting one backward per forward; Lightning
    runs a manual-optimization training_step inside one engine forward, so each further backward
    in it must open its own micro-step, or ZeRO-3 overwrites the accumulated gradient partitions
    with the last micro-batch's (tested: ZeRO-3 with micro-batches equals DDP).
    """
    from deepspeed.runtime.base_optimizer import ZeROOptimizer

    if isinstance(engine.optimizer, ZeROOptimizer):
        engine.optimizer.clear_backward_seen_flag()
