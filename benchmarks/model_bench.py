"""Our GPT against transformers' GPT2LMHeadModel on this machine: training and decode speed.

    python -m benchmarks.model_bench            # full run, rewrites the "model" section of BENCHMARKS.md
    python -m benchmarks.model_bench --quick    # fewer steps: checks the script, numbers are noisy
    python -m benchmarks.model_bench --compile  # adds torch.compile rows for our model

Training: identical shapes (6 layers, 6 heads, 384 wide, block 256, batch 8) at vocab 50304
and 4096, fp32 and bf16 autocast; one step = forward + the same cross-entropy + backward +
AdamW step. Both models are timed in the same process, steps alternating between them so
that load from other processes hits both sides alike; the best step time is the headline
(the median is shown beside it). MFU uses the matmul peak measured in the same run.

Decode: greedy, fp32, 128-token prompt, exactly 256 new tokens, our KV cache
(gpt.generate) against `GPT2LMHeadModel.generate` on the same weights exported with
gpt.hf.export_hf. Tokens/s counts new tokens over the whole call, prefill included;
prefill is also timed alone.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from benchmarks.common import environment, markdown_table, write_section
from gpt.config import GPTConfig
from gpt.flops import flops_per_token, measure_matmul_peak
from gpt.model import GPT

SHAPE = dict(n_layer=6, n_head=6, n_embd=384)
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Timing:
    """Seconds per repeat of one benchmarked call, and the tokens each call produced."""
    seconds: list[float]
    tokens: int

    @property
    def best_tps(self) -> float:
        return self.tokens / min(self.seconds)

    @property
    def median_tps(self) -> float:
        return self.tokens / statistics.median(self.seconds)


def gpt_config(vocab_size: int, block_size: int, shape: Optional[dict] = None) -> GPTConfig:
    return GPTConfig(flavour="gpt2", vocab_size=vocab_size, block_size=block_size, dropout=0.0,
                     **(shape or SHAPE))


def hf_twin(cfg: GPTConfig) -> "torch.nn.Module":
    """transformers' GPT-2 with our shapes, its default attention (sdpa where available), no dropout."""
    from transformers import GPT2Config, GPT2LMHeadModel

    hcfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                      n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.intermediate_size,
                      activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return GPT2LMHeadModel(hcfg)


def autocast(precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=PRECISIONS[precision])


def make_train_step(forward: Callable[[torch.Tensor], torch.Tensor], params: Iterator[torch.nn.Parameter],
                    x: torch.Tensor, y: torch.Tensor, precision: str) -> Callable[[], float]:
    """One optimizer step: forward, the same cross-entropy for both models, backward, AdamW."""
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1)

    def step() -> float:
        with autocast(precision):
            logits = forward(x)
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def alternate(fns: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Run each fn `warmup` times, then time `repeats` rounds, taking the fns in turn each round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - t0)
    return seconds


def train_throughput(cfg: GPTConfig, batch: int, precision: str, warmup: int, steps: int,
                     compile_ours: bool = False) -> dict[str, Timing]:
    """Training-step timings of our GPT and the HF twin (and optionally our GPT compiled)."""
    torch.manual_seed(0)
    data = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size + 1))
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    ours, hf = GPT(cfg), hf_twin(cfg)
    fns = {"ours": make_train_step(ours, ours.parameters(), x, y, precision),
           "hf": make_train_step(lambda t: hf(input_ids=t, use_cache=False).logits,
                                 hf.parameters(), x, y, precision)}
    if compile_ours:
        compiled = GPT(cfg)
        fns["ours+compile"] = make_train_step(torch.compile(compiled), compiled.parameters(), x, y, precision)
    seconds = alternate(fns, warmup, steps)
    return {name: Timing(s, batch * cfg.block_size) for name, s in seconds.items()}


def exported_twin(model: GPT) -> torch.nn.Module:
    """Our weights through gpt.hf.export_hf and GPT2LMHeadModel.from_pretrained, as a user would."""
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    from gpt.hf import export_hf

    hf_logging.disable_progress_bar()  # its "Loading weights" bar would garble the benchmark's output
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(model, Path(tmp) / "hf")
        return GPT2LMHeadModel.from_pretrained(Path(tmp) / "hf").eval()


def ours_generate(model: GPT, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """gpt.generate (what `gpt sample` runs): greedy, no stop token, so exactly new_tokens; (B, new_tokens)."""
    from gpt.generate import generate

    out = generate(model, prompt.tolist(), new_tokens, temperature=0.0)
    return torch.tensor(out)


@torch.no_grad()
def hf_generate(hf: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """transformers' greedy generate forced to exactly new_tokens (EOS suppressed by min_new_tokens)."""
    out = hf.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                      max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    return out[:, prompt.size(1):]


@dataclass
class DecodeResult:
    timing: Timing
    prefill_s: float
    tokens: torch.Tensor  # (B, new_tokens) from the last repeat


def decode_throughput(cfg: GPTConfig, batch: int, prompt_len: int, new_tokens: int,
                      repeats: int) -> dict[str, DecodeResult]:
    """Greedy fp32 decode of our GPT vs the HF copy of the same weights."""
    torch.manual_seed(0)
    ours = GPT(cfg).eval()
    hf = exported_twin(ours)
    prompt = torch.randint(0, cfg.vocab_size, (batch, prompt_len))
    outputs: dict[str, torch.Tensor] = {}
    gens = {"ours": lambda: outputs.__setitem__("ours", ours_generate(ours, prompt, new_tokens)),
            "hf": lambda: outputs.__setitem__("hf", hf_generate(hf, prompt, new_tokens))}
    seconds = alternate(gens, warmup=1, repeats=repeats)
    prefill = alternate(prefill_fns(ours, hf, prompt, new_tokens), warmup=1, repeats=max(repeats, 3))
    return {name: DecodeResult(Timing(seconds[name], outputs[name].numel()), min(prefill[name]), outputs[name])
            for name in gens}


def prefill_fns(ours: GPT, hf: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> dict[str, Callable]:
    """One forward over the prompt that fills a cache, for each side."""
    from gpt.model import KVCache

    def ours_prefill() -> None:
        with torch.no_grad():
            cache = KVCache(ours.config, prompt.size(0), prompt.size(1) + new_tokens)
            ours(prompt, cache=cache, last_only=True)

    def hf_prefill() -> None:
        with torch.no_grad():
            # Logits of the last position only, as generate asks for and as ours does.
            hf(input_ids=prompt, use_cache=True, logits_to_keep=1)

    return {"ours": ours_prefill, "hf": hf_prefill}


def matmul_peak(dtype: torch.dtype, seconds: float) -> float:
    """Best of square matmuls at n = 1024 and 2048, uncached (gpt.flops caches per process)."""
    return max(measure_matmul_peak.__wrapped__("cpu", dtype, n=n, seconds=seconds) for n in (1024, 2048))


def native_bf16() -> bool:
    """Whether the CPU multiplies bf16 in hardware; without it bf16 GEMMs are emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def train_rows(results: dict[tuple[int, str], dict[str, Timing]], peaks: dict[str, float],
               block: int, hf_attn: str) -> list[list[object]]:
    rows = []
    for (vocab, precision), timings in results.items():
        fpt = flops_per_token(gpt_config(vocab, block), block)
        hf_best = timings["hf"].best_tps
        for name, t in timings.items():
            ratio = "" if name == "hf" else f"{t.best_tps / hf_best:.2f}×"
            label = f"transformers GPT2LMHeadModel (attn={hf_attn})" if name == "hf" else name
            rows.append([vocab, precision, label, f"{t.best_tps:,.0f}", f"{t.median_tps:,.0f}", ratio,
                         f"{100 * t.best_tps * fpt / peaks[precision]:.1f}%"])
    return rows


def decode_rows(results: dict[int, dict[str, DecodeResult]]) -> list[list[object]]:
    rows = []
    for batch, res in results.items():
        hf_best = res["hf"].timing.best_tps
        agree = (res["ours"].tokens == res["hf"].tokens).float().mean().item()
        for name, r in res.items():
            ratio = "" if name == "hf" else f"{r.timing.best_tps / hf_best:.2f}×"
            label = "transformers generate" if name == "hf" else "ours (gpt.generate)"
            rows.append([batch, label, f"{r.timing.best_tps:,.1f}", f"{r.timing.median_tps:,.1f}", ratio,
                         f"{1000 * r.prefill_s:.1f}", f"{100 * agree:.0f}%"])
    return rows


def run(quick: bool, compile_ours: bool, batch: int = 8, block: int = 256,
        vocabs: tuple[int, ...] = (50304, 4096), out: Optional[Path] = None) -> str:
    """Run every benchmark and write the "model" section; returns the markdown body."""
    warmup, steps, decode_repeats = (1, 2, 1) if quick else (3, 8, 3)
    peak_s = 0.5 if quick else 2.0
    peaks = {p: matmul_peak(d, peak_s) for p, d in PRECISIONS.items()}
    train = {}
    for vocab in vocabs:
        for precision in PRECISIONS:
            train[(vocab, precision)] = train_throughput(gpt_config(vocab, block), batch, precision,
                                                         warmup + 2 * compile_ours, steps, compile_ours)
            print(f"train vocab={vocab} {precision}:",
                  {k: round(t.best_tps) for k, t in train[(vocab, precision)].items()}, flush=True)
    # The peak is measured again after the long runs; the higher one is the machine's.
    peaks = {p: max(peaks[p], matmul_peak(d, peak_s)) for p, d in PRECISIONS.items()}
    decode = {}
    for b in (1, 8):
        decode[b] = decode_throughput(gpt_config(50304, 384), b, 128, 256, decode_repeats)
        print(f"decode batch={b}:", {k: round(r.timing.best_tps, 1) for k, r in decode[b].items()}, flush=True)
    body = render(train, decode, peaks, block, batch, quick)
    write_section("model", body, **({"path": out} if out else {}))
    return body


def render(train: dict, decode: dict, peaks: dict[str, float], block: int, batch: int, quick: bool) -> str:
    hf_attn = hf_twin(gpt_config(64, 8, dict(n_layer=1, n_head=1, n_embd=8))).config._attn_implementation
    return (
        "## Model: ours vs transformers\n\n" + environment()
        + f"\n`python -m benchmarks.model_bench{' --quick' if quick else ''}{' --compile' if any('ours+compile' in t for t in train.values()) else ''}` · {torch.get_num_threads()} torch threads"
        + f" · matmul peak measured in this run: fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s"
        + f" (bf16 in hardware: {'yes' if native_bf16() else 'no, avx512_bf16/amx_bf16 absent: bf16 GEMMs are emulated'})\n\n"
        + f"### Training step (6 layers, 6 heads, 384 wide, block {block}, batch {batch})\n\n"
        + "Forward + cross-entropy + backward + AdamW; tokens/s from the best step (median beside it), "
        + "steps alternating between the models. HF: default config, its attention implementation shown, "
        + "gelu_new, no dropout, the same `F.cross_entropy` on `.logits`. MFU = tokens/s × FLOPs/token "
        + "(gpt.flops) / matmul peak of that precision.\n\n"
        + markdown_table(["vocab", "precision", "model", "tokens/s", "median tokens/s", "ours/HF", "MFU"],
                         train_rows(train, peaks, block, hf_attn))
        + "\n### Decode (greedy, fp32, 128-token prompt, 256 new tokens, block 384, vocab 50304)\n\n"
        + "New tokens per second over the whole generate call, prefill included (best repeat, median "
        + "beside it); prefill alone is one forward over the prompt. Same weights on both sides; "
        + "'agree' = share of generated tokens that are identical.\n\n"
        + markdown_table(["batch", "model", "new tokens/s", "median", "ours/HF", "prefill ms", "agree"],
                         decode_rows(decode))
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps: for checking the script")
    parser.add_argument("--compile", action="store_true", help="add torch.compile rows for our model")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(run(args.quick, args.compile))


if __name__ == "__main__":
    main()
