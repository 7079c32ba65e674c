"""Shared benchmark plumbing: machine/version header and per-section updates of BENCHMARKS.md.

Each benchmark owns one section of BENCHMARKS.md, delimited by HTML comments, and rewrites
only that section, so benchmarks can be re-run one at a time:

    from benchmarks.common import environment, write_section
    write_section("model", "## Model\n\n" + environment() + table)
"""
from __future__ import annotations

import datetime
import os
import platform
import re
import time
from importlib import metadata
from pathlib import Path
from typing import Callable, Sequence

BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
PACKAGES = ("torch", "lightning", "deepspeed", "tokenizers", "datasets", "transformers", "numpy")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def environment() -> str:
    """One markdown line: date, machine and package versions."""
    versions = []
    for pkg in PACKAGES:
        try:
            versions.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            pass
    date = datetime.date.today().isoformat()
    return (f"_{date} · {cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()} · "
            + ", ".join(versions) + "_\n")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_section(name: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace (or append) the section `name` of BENCHMARKS.md, atomically."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n\nWritten by the scripts in `benchmarks/`; re-run one to refresh its section.\n"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def best_of(fn: Callable[[], object], repeats: int = 3) -> float:
    """Shortest wall time of `repeats` calls of fn, in seconds."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


# ---- ours vs TRL: shared by sft_bench, pref_bench and rl_bench -------------------------------------
ROOT = Path(__file__).resolve().parents[1]


def bench_env(threads: int = 2, **extra: str) -> dict[str, str]:
    """The environment of a benchmark subprocess: `threads` torch threads, offline, quiet, no Slurm."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONWARNINGS": "ignore",
           "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT),
           "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", **extra}
    return {k: v for k, v in env.items() if not k.startswith("SLURM_")}


def export_for_hf(checkpoint: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """What `gpt export --format hf` writes for `checkpoint`: the weights, tokenizer and chat template."""
    from gpt.checkpoint import load_model
    from gpt.hf import export_hf

    model, tok = load_model(checkpoint)
    return export_hf(model, out_dir, tokenizer=tok)


def exact_match_of(checkpoint: str | os.PathLike, val_file: str | os.PathLike, n: int) -> dict:
    """Held-out exact match of a checkpoint (ours, or an HF directory TRL saved, read back with gpt.hf)
    on the first n rows of val_file, through OUR evaluator (gpt.evaluate: greedy, KV cache, stop at <|end|>)."""
    import torch

    from gpt.chat_eval import load_eval_rows
    from gpt.checkpoint import load_model, load_tokenizer
    from gpt.evaluate import exact_match

    model, tok = load_model(checkpoint)
    if tok is None:  # TRL's save: tokenizer.json beside the weights
        tok = load_tokenizer(Path(checkpoint) / "tokenizer.json")
    rows = load_eval_rows(str(val_file), n)
    with torch.no_grad():
        return exact_match(model, tok, rows, max_new_tokens=24, batch_size=100)


def step_timing(ends: Sequence[float], cpu: Sequence[float], warmup: int) -> dict[str, float]:
    """Wall and process CPU seconds per step over steps warmup+1 .. last (ends/cpu: at each step's end)."""
    steps = len(ends) - 1 - warmup
    if steps < 1:
        raise ValueError(f"{len(ends)} steps ran: need more than warmup={warmup} + 1 to time any")
    return {"steps_timed": steps, "sec_per_step": (ends[-1] - ends[warmup]) / steps,
            "cpu_sec_per_step": (cpu[-1] - cpu[warmup]) / steps}


def trl_step_clock(ends: list[float], cpu: list[float]):
    """A transformers TrainerCallback appending wall and process CPU time at the end of every optimizer step."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())
            cpu.append(time.process_time())

    return Clock()


def load_level() -> str:
    """`uptime`'s 1/5/15-minute load averages: how busy the shared machine was."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f}"
