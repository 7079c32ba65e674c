"""`precision: auto`: the training precision chosen from the machine the run starts on.

    from gpt.precision import resolve_precision
    precision, reason = resolve_precision("auto", accelerator="cpu")
    # ("bf16-mixed", "auto: CPU has avx512_bf16") here; ("32-true", "auto: CPU has no native bf16 ...") elsewhere

The recipes (recipes/cli.py) resolve `trainer.precision: auto` before the Trainer is built and
print `precision: bf16-mixed (auto: CPU has avx512_bf16)`; the run's config.yaml, hparams and W&B
config then hold the resolved value, never "auto". Any other value passes through unchanged.

Why from the machine and not from a fixed config: bf16 autocast is 1.4x faster than fp32 through
the recipe on a CPU with native bf16 dot products (avx512_bf16 or AMX), but emulated bf16 on a CPU
without them was ~5x slower per GEMM (/work/shared/reference/cpu-facts.md). On CUDA, bf16 where the
GPU has it (Ampere and newer), else fp16 mixed precision with loss scaling.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

AUTO = "auto"
# x86 flags (Linux /proc/cpuinfo) of CPUs whose bf16 matmuls run natively: AVX512-BF16 dot
# products (Cooper Lake, Zen 4 and newer) and AMX tiles (Sapphire Rapids and newer).
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: Optional[Path] = None) -> set[str]:
    """The CPU feature flags Linux lists (empty when there is no /proc/cpuinfo: macOS, Windows)."""
    try:
        text = (cpuinfo or CPUINFO).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":  # every core lists the same flags: the first line is enough
            return set(value.split())
    return set()


def _device_kind(accelerator: Any) -> str:
    """cuda, cpu or another Lightning accelerator name; "auto" as Lightning would pick it."""
    if accelerator is None or isinstance(accelerator, str):
        name = (accelerator or AUTO).strip().lower()
    else:  # an Accelerator instance: CUDAAccelerator, CPUAccelerator, ...
        name = type(accelerator).__name__.lower()
    if name in ("gpu", "cuda") or name.startswith("cuda"):
        return "cuda"
    if name == AUTO:
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    if name.startswith("cpu"):
        return "cpu"
    return name.removesuffix("accelerator")


def resolve_precision(value: Any, accelerator: Any = AUTO) -> tuple[Any, str]:
    """(precision for the Trainer, why): `value` unchanged unless it is "auto".

    "auto": on CUDA bf16-mixed if the GPU supports bf16, else 16-mixed; on a CPU bf16-mixed if
    it has native bf16 (CPU_BF16_FLAGS), else 32-true; any other accelerator 32-true.
    """
    if str(value).strip().lower() != AUTO:
        return value, "set in the config"
    kind = _device_kind(accelerator)
    if kind == "cuda":
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "the GPU"
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return "bf16-mixed", f"auto: {name} supports bf16"
        return "16-mixed", f"auto: {name} has no bf16, fp16 with loss scaling"
    if kind == "cpu":
        found = [f for f in CPU_BF16_FLAGS if f in cpu_flags()]
        if found:
            return "bf16-mixed", f"auto: CPU has {found[0]}"
        return "32-true", f"auto: CPU has no native bf16 ({' or '.join(CPU_BF16_FLAGS)}); bf16 would be emulated, slower"
    return "32-true", f"auto: no bf16 detection for accelerator {kind}"
