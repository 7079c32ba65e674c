"""Parameter counts, FLOPs per token and device peak FLOP/s, for MFU.

    from gpt.flops import flops_per_token, peak_flops
    mfu = tokens_per_s * flops_per_token(cfg) / peak_flops(torch.device("cpu"), torch.bfloat16)

FLOPs count multiply-adds as 2 and follow the PaLM appendix: 6 FLOPs per matmul weight per
token for forward+backward, plus attention scores and values, 12 * n_layer * n_embd * T
(T = the sequence length; no discount for the causal mask, as PaLM and nanochat do).
The peak comes from the device: Lightning's table of data-sheet peaks for known GPUs
(lightning.fabric.utilities.throughput.get_available_flops), and everywhere else (CPUs, GPUs it
does not know) a matmul measured on this machine at start-up, never a hard-coded A100 number.
"""
from __future__ import annotations

import functools
import time

import torch

from gpt.config import GPTConfig


def matmul_params(cfg: GPTConfig) -> int:
    """Weights that take part in a matmul per token: every Linear, the output head included."""
    d, h = cfg.n_embd, cfg.intermediate_size
    qkv = d * (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim
    mlp = d * h * (2 if cfg.flavour == "gpt2" else 3)
    per_layer = qkv + d * d + mlp
    return cfg.n_layer * per_layer + cfg.vocab_size * d


def flops_per_token(cfg: GPTConfig, seq_len: int | None = None) -> float:
    """Forward + backward FLOPs per trained token at sequence length seq_len (default block_size)."""
    T = seq_len or cfg.block_size
    return 6 * matmul_params(cfg) + 12 * cfg.n_layer * cfg.n_embd * T


def peak_flops(device: torch.device | str, dtype: torch.dtype = torch.float32) -> float:
    """Peak FLOP/s of one device for matmuls in `dtype`: Lightning's GPU table, else measured.

    Lightning's `get_available_flops` knows the data-sheet peaks of common GPUs; for a device it
    does not know (every CPU, newer or renamed GPUs) a matmul is timed on this machine instead of
    guessing a number.
    """
    device = torch.device(device)
    if device.type == "cuda":
        import warnings

        from lightning.fabric.utilities.throughput import get_available_flops

        with warnings.catch_warnings():  # "FLOPs not found for ...": we measure instead
            warnings.simplefilter("ignore")
            table = get_available_flops(device, dtype)
        if table:
            return float(table)
    return measure_matmul_peak(str(device), dtype)


def dtype_of_precision(precision: str) -> torch.dtype:
    """The matmul dtype of a Trainer precision string ("bf16-mixed", "16-true", "32-true", ...)."""
    p = str(precision)
    if p.startswith("bf16"):
        return torch.bfloat16
    if p.startswith("16"):
        return torch.float16
    if p.startswith("64"):
        return torch.float64
    return torch.float32


@functools.lru_cache(maxsize=None)
def measure_matmul_peak(device: str = "cpu", dtype: torch.dtype = torch.float32, n: int = 1024,
                        seconds: float = 0.5) -> float:
    """Best FLOP/s of a square n x n matmul over ~`seconds` of repeats (cached per process)."""
    # A private generator: measuring must not move the global RNG, or the model's initialization
    # would depend on whether a throughput monitor (which measures at start-up) is configured.
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    best = 0.0
    deadline = time.perf_counter() + seconds
    a @ b  # warm-up: first call pays for kernel selection
    while time.perf_counter() < deadline or best == 0.0:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best
