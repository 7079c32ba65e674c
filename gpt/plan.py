"""`gpt plan`: memory per GPU and time to train a preset, before a GPU is rented.

    gpt plan --preset llama-7b --gpus 64 --gpu h100 --zero 3 --seq 4096 --tokens 1e12 --mfu 0.4
    gpt plan --preset llama-1b --gpus 8 --gpu a100-40g --stage rl --json     # SFT plans as pretrain

Prints parameters, FLOPs per token (gpt.flops), per-GPU memory under ZeRO 0-3 with and without
CPU offload (a row per stage; `*` marks the chosen one), the largest micro-batch that fits, the
time for the token budget at an assumed MFU, and the recipe settings it recommends.

Model states follow DeepSpeed's own estimators byte for byte (tests/test_plan.py compares them
with `estimate_zero{2,3}_model_states_mem_needs`), bf16 training with AdamW:
- ZeRO-2: 2 B/param of bf16 weights on every GPU + 18 B/param split over the G GPUs (bf16 + fp32
  gradients 2 + 4, fp32 master weights 4, Adam moments 8); offload keeps only the 2 B weights.
- ZeRO-3: 18 B/param split over G (bf16 weights 2, fp32 gradients 4, master 4, Adam 8) plus the
  largest layer gathered (bf16 weights + gradients, 4 B/param); offload keeps only that layer.
- ZeRO-1 (no DeepSpeed estimator): full bf16 weights and gradients (4 B) + 16 B/param split.
- ZeRO-0 = DDP with torch autocast: fp32 weights 4, fp32 gradients 4 + DDP's bucket copy 4,
  Adam 8 = 20 B/param; autocast's bf16 weight copies (2 B per matmul weight) count as activations.
Host RAM per node is DeepSpeed's estimate too (its 1.5x buffer factor included; ZeRO-3 assumes
`sharded_init`, DeepSpeed's zero_init). Activations are counted tensor by tensor from what
gpt/model.py saves for backward (activation_bytes); a test measures them on CPU. Usable GPU memory
is 90% of the card (CUDA context, NCCL and DeepSpeed bucket buffers, fragmentation).
"""
from __future__ import annotations

import json as _json
import math
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch

from gpt.config import GPTConfig
from gpt.flops import flops_per_token, matmul_params

GiB = 2**30
USABLE = 0.9  # of the card's memory; the rest is context, communication buffers, fragmentation
# Card memory as the driver reports it (nvidia-smi "MiB") and the row of Lightning's GPU peak
# table (lightning.fabric.utilities.throughput._CUDA_FLOPS, what get_available_flops reads for a
# live device) whose dense bf16/fp16 figure the time estimate uses. The H200 row there is the
# with-sparsity figure (2x dense); the H200 has the H100 SXM's compute, so it reads that row.
GPUS: dict[str, tuple[int, str]] = {
    "h100": (81559, "h100 sxm"),        # 80 GB HBM3
    "h100-pcie": (81559, "h100 pcie"),
    "h200": (143771, "h100 sxm"),       # 141 GB HBM3e
    "a100-80g": (81920, "a100"),
    "a100-40g": (40960, "a100"),
    "l40": (46068, "l40"),
    "a10g": (23028, "a10g"),
    "l4": (23034, "l4"),
    "v100-32g": (32768, "v100 sxm"),    # no bf16: the fp16 figure
    "rtx4090": (24564, "rtx 4090"),
}


def _peak(row: str) -> float:
    from lightning.fabric.utilities.throughput import _CUDA_FLOPS

    flops = _CUDA_FLOPS[row]
    return flops.get(torch.bfloat16) or flops[torch.float16]


# (stage, offload) rows of the table; offload = optimizer to CPU (stages 1-2), params + optimizer (3).
ROWS = [(0, False), (1, False), (1, True), (2, False), (2, True), (3, False), (3, True)]
# The DeepSpeed JSONs the repository ships: a recommendation only names one of these.
RECIPE_JSON = {(1, False): "recipes/deepspeed/zero1.json", (2, False): "recipes/deepspeed/zero2.json",
               (3, False): "recipes/deepspeed/zero3.json", (3, True): "recipes/deepspeed/zero3_offload.json"}


# ---- parameters ---------------------------------------------------------------------------
def param_counts(cfg: GPTConfig) -> tuple[int, int]:
    """(unique parameters, largest single module's own parameters), from gpt.model on the meta
    device: the real definition, no memory. The second is what DeepSpeed calls largest_layer_params."""
    from gpt.model import GPT

    with torch.device("meta"):
        model = GPT(cfg)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return model.num_params(), largest


# ---- model states -------------------------------------------------------------------------
@dataclass
class States:
    weights: float    # bytes per GPU
    grads: float
    optimizer: float  # fp32 master weights + Adam moments
    gathered: float   # ZeRO-3: the largest layer's bf16 weights + gradients, gathered in full
    gpu: int          # total per GPU, computed as DeepSpeed computes it
    host: int         # host RAM per node (DeepSpeed's estimate, incl. its buffer factor)


def model_states(params: int, largest: int, stage: int, gpus: int, gpus_per_node: int,
                 offload_optimizer: bool = False, offload_params: bool = False,
                 buffer_factor: float = 1.5) -> States:
    """Per-GPU bytes of one trainable model's weights, gradients and AdamW states under ZeRO `stage`."""
    P, G, g = params, gpus, gpus_per_node
    nodes = max(1, math.ceil(G / g))
    if stage == 0:
        return States(4 * P, 8 * P, 8 * P, 0, 20 * P, int(4 * P * g * buffer_factor))
    if stage in (1, 2):
        full_grads = 2 if stage == 1 else 0  # ZeRO-1 keeps the whole bf16 gradient until the step
        if offload_optimizer:
            host = int(P * max(4 * G, 16) * buffer_factor)
            return States(2 * P, full_grads * P, 0, 0, (2 + full_grads) * P, host)
        split = 16 if stage == 1 else 18  # bf16 grads (stage 2 only) 2 + fp32 grads 4 + master 4 + Adam 8
        grads = full_grads * P + (split - 12) * P / G
        return States(2 * P, grads, 12 * P / G, 0, (2 + full_grads) * P + int(split * P / G),
                      int(P * 4 * g * buffer_factor))
    if stage != 3:
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage}")
    layer = 4 * largest
    if offload_optimizer and offload_params:
        return States(0, 0, 0, layer, layer, int(P * 18 / nodes * buffer_factor))
    if offload_optimizer:
        return States(2 * P / G, 0, 0, layer, layer + int(2 * P / G), int(P * 16 / nodes * buffer_factor))
    return States(2 * P / G, 4 * P / G, 12 * P / G, layer, layer + int(18 * P / G),
                  int(largest * 4 * g * buffer_factor))


def frozen_states(params: int, largest: int, stage: int, gpus: int, offload: bool) -> float:
    """A frozen model (RL reference, reward): bf16 weights only, partitioned like the policy at ZeRO-3."""
    if stage < 3:
        return 2 * params
    return 2 * largest + (0 if offload else 2 * params / gpus)


# ---- activations --------------------------------------------------------------------------
Precision = Literal["bf16", "amp", "fp32"]


@dataclass
class Activations:
    saved: float  # bytes held for backward at the end of the forward
    peak: float   # saved + the largest transient (the loss's fp32 logits, a recomputed block)


def activation_bytes(cfg: GPTConfig, micro_batch: int, seq: int, precision: Precision = "bf16",
                     checkpointing: bool = False, device: Literal["cuda", "cpu"] = "cuda") -> Activations:
    """Bytes of activations of one forward/backward, tensor by tensor as gpt/model.py saves them.

    precision: "bf16" = the module cast to bf16 (DeepSpeed with bf16-mixed), "amp" = fp32 weights
    under torch.autocast (DDP with bf16-mixed), "fp32". device: whose kernels save what. On "cuda"
    RMSNorm is one fused kernel (saves its input and rstd); on "cpu" (the tests measure there) it is
    composite and also saves the normalized fp32 x, LayerNorm keeps bf16 statistics in bf16, and
    with QK-norm SDPA's output comes back head-major so the reshape before `proj` copies it.
    Dropout is taken as 0 (every preset's value).
    """
    d, h, V, L = cfg.n_embd, cfg.intermediate_size, cfg.vocab_size, cfg.n_layer
    nh, nkv, hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    r = 2 if precision == "bf16" else 4  # residual stream, norms' inputs
    m = 4 if precision == "fp32" else 2  # matmul inputs and outputs
    llama, cpu = cfg.flavour == "llama", device == "cpu"

    def norm(width: int, in_bytes: int, own_input: bool) -> float:
        """A norm over `width` features whose input has `in_bytes` per element; own_input=False when
        the input is a view of a tensor saved anyway (QK-norm normalizes views of the qkv output)."""
        if not llama:  # LayerNorm: input + mean and rstd (fp32; bf16 on CPU for bf16 input)
            return in_bytes * width + (4 if cpu and in_bytes == 2 else 8)
        if not cpu:  # fused: input + fp32 rstd
            return (in_bytes * width if own_input else 0) + 4
        # composite rms_norm: the input upcast to fp32 (a copy unless already fp32), rstd, normalized x
        return (4 * width if own_input or in_bytes != 4 else 0) + 4 + 4 * width

    attn = m * d + m * (nh + 2 * nkv) * hd + m * d + 4 * nh  # qkv input, q|k|v, SDPA out, logsumexp
    if llama:
        attn += m * (nh + nkv) * hd  # q and k after RoPE (SDPA's inputs)
    if cfg.qk_norm:
        attn += (nh + nkv) * norm(hd, m, own_input=False) + (m * d if cpu else 0)
    mlp = m * d + (m * 2 * h + 2 * m * h if llama else 2 * m * h)  # fc input; gate|up, silu, product / fc, gelu
    layer = 2 * norm(d, r, True) + attn + mlp  # per token
    tokens = micro_batch * seq
    emb = 8 * tokens + (8 * seq if not llama else 2 * hd * r * tokens)  # ids; positions | RoPE cos, sin
    head = (norm(d, r, True) + m * d + 4 * V) * tokens  # final norm, lm_head input, fp32 log-softmax
    # Under autocast every matmul weight is cast to bf16 once per forward and held until backward.
    copies_head = 2 * V * d if precision == "amp" else 0
    copies_layer = 2 * (matmul_params(cfg) - V * d) / L if precision == "amp" else 0
    loss_transient = 8 * V * tokens  # backward of the loss: two fp32 (tokens, vocab) gradients at once
    # A block's backward holds the gradient of its widest activation beside the residual's.
    block_transient = (m * (2 * h if llama else h) + r * d) * tokens
    fixed = emb + head + copies_head
    if checkpointing:  # each block keeps only its input; backward recomputes one block at a time
        saved = fixed + L * r * d * tokens
        # the recomputed block's tensors are freed as its backward uses them: no extra transient
        peak = saved + max(loss_transient, layer * tokens + copies_layer)
    else:
        saved = fixed + L * (layer * tokens + copies_layer)
        peak = saved + max(loss_transient, block_transient)
    return Activations(float(saved), float(peak))


# ---- the plan -----------------------------------------------------------------------------
def _fits(budget: float, fixed: float, act: Any, limit: int = 4096) -> int:
    """Largest micro-batch m (<= limit) with fixed + act(m) <= budget; 0 when even 1 does not fit."""
    if fixed + act(1) > budget:
        return 0
    lo, hi = 1, 2
    while hi <= limit and fixed + act(hi) <= budget:
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:  # act(m) grows with m: bisect between the last fit and the first miss
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fixed + act(mid) <= budget else (lo, mid)
    return lo


def _gpu(gpu: str, gpu_mem_gib: Optional[float], peak_tflops: Optional[float]) -> tuple[float, float]:
    if gpu in GPUS:
        mib, row = GPUS[gpu]
        mem, peak = mib * 2**20, _peak(row)
    elif gpu_mem_gib is None or peak_tflops is None:
        raise ValueError(f"unknown --gpu {gpu!r}; choose from {', '.join(GPUS)} "
                         "(or give --gpu_mem_gib and --peak_tflops)")
    else:
        mem, peak = 0.0, 0.0
    return (gpu_mem_gib * GiB if gpu_mem_gib else mem), (peak_tflops * 1e12 if peak_tflops else peak)


def make_plan(preset: str = "llama-7b", gpus: int = 8, gpu: str = "h100", zero: Optional[int] = None,
              offload: bool = False, seq: Optional[int] = None, micro_batch: Optional[int] = None,
              tokens: float = 1e12, mfu: float = 0.4, global_batch_tokens: int = 2**20,
              gpus_per_node: int = 8, stage: Literal["pretrain", "rl"] = "pretrain",
              reward_preset: Optional[str] = None, gpu_mem_gib: Optional[float] = None,
              peak_tflops: Optional[float] = None) -> dict[str, Any]:
    """Everything `gpt plan` prints, as plain data (what --json writes)."""
    if gpus < 1 or gpus_per_node < 1 or not 0 < mfu <= 1 or tokens <= 0:
        raise ValueError("--gpus and --gpus_per_node must be >= 1, --mfu in (0, 1], --tokens > 0")
    if zero is not None and zero not in (0, 1, 2, 3):
        raise ValueError(f"--zero must be 0, 1, 2 or 3, got {zero}")
    if offload and zero == 0:
        raise ValueError("--offload needs DeepSpeed (--zero 1, 2 or 3)")
    cfg = GPTConfig.from_preset(preset, **({"block_size": seq} if seq else {}))
    seq = cfg.block_size
    rcfg = GPTConfig.from_preset(reward_preset or preset, block_size=seq) if stage == "rl" else None
    mem, peak = _gpu(gpu, gpu_mem_gib, peak_tflops)
    budget = USABLE * mem
    P, largest = param_counts(cfg)
    RP, rlargest = param_counts(rcfg) if rcfg else (0, 0)
    g = min(gpus_per_node, gpus)
    nodes = math.ceil(gpus / g)
    fpt = flops_per_token(cfg, seq)
    if rcfg is not None:  # + value fwd/bwd, reference and reward forwards (1/3 of fwd+bwd); not generation
        fpt += flops_per_token(cfg, seq) / 3 + flops_per_token(rcfg, seq) * 4 / 3
    mb_show = micro_batch or 1

    def act(m: int, ckpt: bool, stage_: int) -> float:
        prec = "amp" if stage_ == 0 else "bf16"
        a = activation_bytes(cfg, m, seq, prec, ckpt).peak
        if rcfg is not None:  # RL: the value model trains beside the policy; rollouts need a KV cache
            value = activation_bytes(rcfg, m, seq, prec, ckpt).peak - 4 * rcfg.vocab_size * m * seq
            kv = 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * seq * m * 2
            a = max(a + value, kv)
        return a

    rows = []
    for st, off in ROWS:
        s = model_states(P, largest, st, gpus, g, offload_optimizer=off, offload_params=off and st == 3)
        parts = {k: getattr(s, k) for k in ("weights", "grads", "optimizer", "gathered", "host")}
        frozen = 0.0
        if rcfg is not None:  # value (trainable, reward-shaped); reference (policy-shaped), reward: frozen
            v = model_states(RP, rlargest, st, gpus, g, offload_optimizer=off, offload_params=off and st == 3)
            parts = {k: x + getattr(v, k) for k, x in parts.items()}
            frozen = frozen_states(P, largest, st, gpus, off) + frozen_states(RP, rlargest, st, gpus, off)
        states = s.gpu + (v.gpu + frozen if rcfg is not None else 0)
        row = {"zero": st, "offload": off, **{k: parts[k] for k in ("weights", "grads", "optimizer", "gathered")},
               "frozen": frozen, "states": states, "host_per_node": parts["host"],
               "activations": act(mb_show, False, st), "activations_ckpt": act(mb_show, True, st),
               "max_micro_batch": _fits(budget, states, lambda m, st=st: act(m, False, st)),
               "max_micro_batch_ckpt": _fits(budget, states, lambda m, st=st: act(m, True, st)),
               "recipe": "ddp" if st == 0 else RECIPE_JSON.get((st, off)),
               "chosen": zero is not None and (st, off) == (zero, offload)}
        rows.append(row)
    rec = _recommend(rows, zero, offload, micro_batch, global_batch_tokens, seq, gpus)
    time = None
    if rec.get("zero") is not None:
        slowdown = 4 / 3 if rec["activation_checkpointing"] else 1.0  # recompute = one more forward
        tok_s = gpus * peak * mfu / (fpt * slowdown)
        time = {"tokens_per_s": tok_s, "seconds": tokens / tok_s, "recompute_factor": slowdown}
    return {"preset": preset, "flavour": cfg.flavour, "params": P, "largest_layer_params": largest,
            "reward_params": RP, "stage": stage, "seq": seq, "flops_per_token": fpt, "gpu": gpu,
            "gpu_mem_bytes": mem, "usable_bytes": budget, "peak_flops": peak, "gpus": gpus,
            "gpus_per_node": g, "nodes": nodes, "micro_batch_shown": mb_show, "tokens": tokens, "mfu": mfu,
            "rows": rows, "recommended": rec, "time": time}


def _recommend(rows: list[dict], zero: Optional[int], offload: bool, micro_batch: Optional[int],
               global_tokens: int, seq: int, gpus: int) -> dict[str, Any]:
    """The fastest shipped strategy that fits: lowest ZeRO stage, no offload, no recompute if possible."""
    if zero is not None:
        candidates = [r for r in rows if r["chosen"]]
    else:
        candidates = [r for r in rows if r["recipe"]]  # only strategies the repository ships a JSON for
    for ckpt in (False, True):
        key = "max_micro_batch_ckpt" if ckpt else "max_micro_batch"
        for r in candidates:
            fit = r[key]
            if fit and (micro_batch is None or micro_batch <= fit):
                micro, accum, global_seqs = _batch(micro_batch or fit, global_tokens, seq, gpus, fixed=micro_batch)
                return {"zero": r["zero"], "offload": r["offload"], "recipe": r["recipe"],
                        "activation_checkpointing": ckpt, "micro_batch": micro, "accumulate_grad_batches": accum,
                        "global_batch_tokens": micro * accum * gpus * seq, "max_micro_batch": fit}
    return {"zero": None, "reason": "does not fit even with micro-batch 1, activation checkpointing and offload"
            if zero is None else f"ZeRO-{zero}{' + offload' if offload else ''} does not fit at micro-batch "
            f"{micro_batch or 1} even with activation checkpointing"}


def _batch(fit: int, global_tokens: int, seq: int, gpus: int, fixed: Optional[int]) -> tuple[int, int, int]:
    """(micro-batch, accumulation, sequences) nearest the target global batch of `global_tokens`."""
    want = max(gpus, round(global_tokens / seq))  # sequences per optimizer step, at least one per GPU
    if fixed is None:  # the largest micro-batch that fits and divides the global batch evenly
        fit = max([m for m in range(1, fit + 1) if want % (m * gpus) == 0] or [min(fit, max(1, want // gpus))])
    accum = max(1, math.ceil(want / (fit * gpus)))
    return fit, accum, fit * accum * gpus


# ---- printing -----------------------------------------------------------------------------
def _gib(x: float) -> str:
    return f"{x / GiB:.1f}"


def _duration(seconds: float) -> str:
    days = seconds / 86400
    return f"{days:.1f} days" if days >= 1 else f"{seconds / 3600:.1f} h"


def render(p: dict[str, Any]) -> str:
    """The human-readable plan: header, the ZeRO table, the recommendation and the time."""
    out = [f"{p['preset']} ({p['flavour']}): {p['params'] / 1e9:.3f} B parameters, largest layer "
           f"{p['largest_layer_params'] / 1e6:.1f} M; {p['flops_per_token']:.3g} FLOPs/token at seq {p['seq']}"]
    if p["stage"] == "rl":
        out.append(f"RL: policy + value model trainable (weights..gathered columns: both), reference + reward "
                   f"model frozen (bf16 weights only); reward/value models {p['reward_params'] / 1e9:.3f} B "
                   "parameters each; act = policy + value backward together, or the rollouts' KV cache if larger")
    out.append(f"{p['gpus']} x {p['gpu']} ({_gib(p['gpu_mem_bytes'])} GiB, {_gib(p['usable_bytes'])} usable; "
               f"{p['peak_flops'] / 1e12:.0f} TFLOP/s bf16 dense) = {p['nodes']} node(s) x {p['gpus_per_node']}; "
               f"bf16-mixed, AdamW")
    out.append(f"GiB per GPU; activations at micro-batch {p['micro_batch_shown']} x {p['seq']} tokens; "
               "ckpt = activation checkpointing; host = RAM per node (DeepSpeed's estimate)")
    rl = p["stage"] == "rl"
    head = ["", "ZeRO", "offload", "weights", "grads", "optim", "gathered", *(["frozen"] if rl else []), "states",
            "act", "act ckpt", "total", "total ckpt", "max mb", "max mb ckpt", "host"]
    table = [head]
    for r in p["rows"]:
        table.append(["*" if r["chosen"] else "", str(r["zero"]), "yes" if r["offload"] else "-",
                      _gib(r["weights"]), _gib(r["grads"]), _gib(r["optimizer"]), _gib(r["gathered"]),
                      *([_gib(r["frozen"])] if rl else []), _gib(r["states"]), _gib(r["activations"]), _gib(r["activations_ckpt"]),
                      _gib(r["states"] + r["activations"]), _gib(r["states"] + r["activations_ckpt"]),
                      str(r["max_micro_batch"]), str(r["max_micro_batch_ckpt"]), _gib(r["host_per_node"])])
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    out += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in table]
    out.append("ZeRO 0 = DDP + autocast; offload = optimizer to CPU (1, 2), params + optimizer (3)")
    rec = p["recommended"]
    if rec.get("zero") is None:
        out.append(f"no plan: {rec['reason']}")
        return "\n".join(out)
    strategy = "ddp" if rec["zero"] == 0 else f"gpt.zero.ZeroStrategy, config {rec['recipe']}"
    if rec["zero"] == 3:
        strategy += ", sharded_init: true"
    out.append(f"recommended: {strategy}; activation_checkpointing: {str(rec['activation_checkpointing']).lower()}; "
               f"micro_batch_size {rec['micro_batch']} (fits {rec['max_micro_batch']}), accumulate_grad_batches "
               f"{rec['accumulate_grad_batches']} -> global batch {rec['global_batch_tokens']:,} tokens")
    out.append(f"  trainer: {{devices: {p['gpus_per_node']}, num_nodes: {p['nodes']}, accumulate_grad_batches: "
               f"{rec['accumulate_grad_batches']}, precision: bf16-mixed}}; model.model_config: "
               f"{{activation_checkpointing: {str(rec['activation_checkpointing']).lower()}, block_size: {p['seq']}}}; "
               f"data: {{block_size: {p['seq']}, micro_batch_size: {rec['micro_batch']}}}")
    t = p["time"]
    extra = " incl. recompute x4/3" if t["recompute_factor"] > 1 else ""
    if p["stage"] == "rl":
        extra += " (policy + value fwd/bwd, reference + reward fwd; rollout generation not counted)"
    if rec["offload"]:
        extra += " (offload: the CPU optimizer step and PCIe traffic lower the MFU reached; assume less)"
    out.append(f"time for {p['tokens']:.3g} tokens at MFU {p['mfu']:.2f}{extra}: {t['tokens_per_s']:,.0f} tokens/s "
               f"-> {_duration(t['seconds'])}")
    return "\n".join(out)


def plan(preset: str = "llama-7b", gpus: int = 8, gpu: str = "h100", zero: Optional[int] = None,
         offload: bool = False, seq: Optional[int] = None, micro_batch: Optional[int] = None,
         tokens: float = 1e12, mfu: float = 0.4, global_batch_tokens: int = 2**20, gpus_per_node: int = 8,
         stage: Literal["pretrain", "rl"] = "pretrain", reward_preset: Optional[str] = None,
         gpu_mem_gib: Optional[float] = None, peak_tflops: Optional[float] = None, json: bool = False) -> None:
    """Plan memory per GPU and training time for a preset, and recommend recipe settings.

    Args:
        preset: a gpt.config preset (gpt2-124m ... llama-7b).
        gpus: data-parallel GPUs in all.
        gpu: h100, h100-pcie, h200, a100-80g, a100-40g, l40, a10g, l4, v100-32g, rtx4090.
        zero: the ZeRO stage to plan for (0 = DDP); default: the planner picks.
        offload: with --zero: offload the optimizer (1, 2) or params + optimizer (3) to CPU.
        seq: sequence length (default: the preset's block_size).
        micro_batch: sequences per GPU per step (default: the largest that fits).
        tokens: the token budget to time.
        mfu: assumed model FLOPs utilization of the dense bf16 peak.
        global_batch_tokens: target tokens per optimizer step (sets the accumulation).
        gpus_per_node: GPUs per node (DeepSpeed's host-memory estimate depends on it).
        stage: pretrain (also SFT) or rl (policy + value trainable, reference + reward frozen).
        reward_preset: the reward/value models' preset for --stage rl (default: the policy's).
        gpu_mem_gib: override the card's memory.
        peak_tflops: override the card's dense bf16 peak.
        json: print the plan as JSON instead of a table.
    """
    p = make_plan(preset, gpus, gpu, zero, offload, seq, micro_batch, tokens, mfu, global_batch_tokens,
                  gpus_per_node, stage, reward_preset, gpu_mem_gib, peak_tflops)
    print(_json.dumps(p, indent=2) if json else render(p))
