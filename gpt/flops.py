"""Parameter counts, FLOPs per token and device peak FLOP/s, for MFU.

    from gpt.flops import flops_per_token, peak_flops
    mfu = tokens_per_s * flops_per_token(cfg) / peak_flops(torch.device("cpu"), torch.bfloat16)

FLOPs count multiply-adds as 2 and follow the PaLM appendix: 6 FLOPs per matmul weight per
token for forward+backward, plus attention scores and values, 12 * n_layer * n_embd * T
(T = the sequence length; no discount for the causal mask, as PaLM and nanochat do).
The peak comes from the device: a table of dense bf16/fp32 peaks for known GPUs, and on
CPU a matmul measured on this machine at start-up (never a hard-coded A100 number).
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


# Dense (no sparsity) tensor-core peaks from the vendors' data sheets, FLOP/s.
GPU_PEAKS = {  # name fragment: (bf16/fp16, fp32 non-tensor)
    "H200": (989e12, 67e12),
    "H100 PCIe": (756e12, 51e12),
    "H100": (989e12, 67e12),
    "A100": (312e12, 19.5e12),
    "A10G": (125e12, 31.2e12),
    "L4": (121e12, 30.3e12),
    "L40S": (362e12, 91.6e12),
    "V100": (125e12, 15.7e12),
    "RTX 4090": (165e12, 82.6e12),
    "RTX 3090": (71e12, 35.6e12),
}


def peak_flops(device: torch.device | str, dtype: torch.dtype = torch.float32) -> float:
    """Peak FLOP/s of one device for matmuls in `dtype`: table for GPUs, measured on CPU."""
    device = torch.device(device)
    half = dtype in (torch.bfloat16, torch.float16)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (p16, p32) in GPU_PEAKS.items():
            if key in name:
                return p16 if half else p32
        # Unknown GPU: measure rather than guess.
        return measure_matmul_peak(str(device), dtype)
    return measure_matmul_peak(str(device), dtype)


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
