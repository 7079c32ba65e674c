"""Pretraining benchmark: tiny-cpu through the real recipe, per precision and parallel strategy.

    python -m benchmarks.pretrain_bench              # ~15 min on 2 cores; writes "pretrain" in BENCHMARKS.md
    python -m benchmarks.pretrain_bench --steps 20 --no-full   # a quick check of the script

Every row is `python -m recipes.pretrain fit --config recipes/configs/tiny-cpu.yaml` in a
subprocess, on Shakespeare tokenized by data_prep (vocab 4096, 10% of documents held out),
with only these overrides: max_steps, no validation or checkpoints (timed rows), CSV logging
into a temporary directory, and the row's precision / devices / strategy. The global batch is
the same on every row (2 processes take half the micro-batch each), so every fp32 row trains on
the same samples: their losses agree to ~1e-6 over the first 15 steps. They part after that: at
lr 3e-3 the loss spikes near step 16, and the spike amplifies fp32 rounding differences (the
number of torch threads alone does it: 1 process with 1 vs 2 threads differ by 0.02-0.06 from step
17, docs/LOG.md 2026-11-28). So the table shows the loss at step 10 (a check that the rows train
the same model) and at the last step. Two processes get one torch thread each, one process gets
two, so every row uses the machine's 2 cores.

Tokens/s and MFU are what the recipe itself logs (train/tokens_per_sec and train/mfu from
gpt.callbacks.RunMonitor, i.e. Lightning's Throughput over a window of log_every_n_steps optimizer
steps, MFU against the matmul peak that gpt.flops measures at start-up for the row's precision),
as the median over the run after its first 15 steps. The "demo budget" table runs tiny-cpu.yaml unchanged (its max_steps, validation
and checkpoints) and reports the held-out loss and bits-per-byte at the end, and the wall time.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import yaml

from benchmarks.common import environment, markdown_table, write_section
from tests.pretrain_fixtures import read_csv_metrics

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "recipes" / "configs" / "tiny-cpu.yaml"
CORPUS = ROOT / "data" / "shakespeare.jsonl.gz"
ZERO = {s: str(ROOT / "recipes" / "deepspeed" / f"{s}.json") for s in ("zero2", "zero3")}

# (label, precision, devices, strategy)
ROWS = [
    ("1 process, fp32", "32-true", 1, "auto"),
    ("1 process, bf16 autocast", "bf16-mixed", 1, "auto"),
    ("DDP 2 processes, fp32", "32-true", 2, "ddp"),
    ("ZeRO-2 2 processes, fp32", "32-true", 2, "zero2"),
    ("ZeRO-3 2 processes, fp32", "32-true", 2, "zero3"),
]


def _env(threads: int) -> dict[str, str]:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONWARNINGS": "ignore",
           "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "gpt-pipeline" / "torch_extensions"))
    return {k: v for k, v in env.items() if not k.startswith("SLURM_")}


def _run(cmd: list[str], threads: int = 2, timeout: int = 1800) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env=_env(threads), capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise SystemExit(f"benchmark step failed: {' '.join(cmd)}\n{p.stderr[-3000:]}")
    return time.perf_counter() - t0


def prepare_data(work: Path) -> tuple[Path, Path]:
    """Tokenizer and shards of the embedded corpus, exactly as the demo makes them."""
    tok, shards = work / "tokenizer.json", work / "shards"
    py = sys.executable
    _run([py, "-m", "data_prep.train_tokenizer", "--source", str(CORPUS), "--vocab_size", "4096", "--out", str(tok)])
    _run([py, "-m", "data_prep.make_shards", "--source", str(CORPUS), "--tokenizer", str(tok), "--out", str(shards),
          "--num_proc", "2", "--val_fraction", "0.1"])
    return tok, shards


def row_config(run_dir: Path, tok: Path, shards: Path, precision: str, devices: int, strategy: str,
               steps: Optional[int]) -> Path:
    """tiny-cpu.yaml with the row's overrides; steps=None keeps the demo's budget, validation and checkpoints."""
    cfg: dict[str, Any] = yaml.safe_load(CONFIG.read_text())
    cfg["run_dir"] = str(run_dir)
    t = cfg["trainer"]
    t.update(precision=precision, devices=devices, enable_progress_bar=False)
    t["strategy"] = strategy if strategy in ("auto", "ddp") else {
        "class_path": "gpt.zero.ZeroStrategy", "init_args": {"config": ZERO[strategy]}}
    cfg["data"].update(data_dir=str(shards), tokenizer=str(tok))
    # The same global batch on every row (strong scaling): same samples per step, comparable losses.
    micro = cfg["data"]["micro_batch_size"]
    if micro % devices:
        raise SystemExit(f"micro_batch_size {micro} does not split over {devices} processes")
    cfg["data"]["micro_batch_size"] = micro // devices
    if steps is not None:  # steps=None: the demo as it is, its outputs in run_dir
        cfg.update(wandb=False, val_every=0, checkpoint_every=0)
        t.update(max_steps=steps, log_every_n_steps=1)
        t["callbacks"] = [cb for cb in t["callbacks"] if not cb["class_path"].endswith("SampleGenerations")]
    path = run_dir / "config.bench.yaml"
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def summarize(rows: list[dict[str, float]], devices: int, skip: int = 15) -> dict[str, float]:
    """Median global tokens/s and MFU after the first `skip` steps."""
    key = "train/tokens_per_sec"  # all ranks
    tps = [r[key] for r in rows if key in r and r.get("step", 0) >= skip]
    mfu = [r["train/mfu"] for r in rows if "train/mfu" in r and r.get("step", 0) >= skip]
    losses = {int(r["step"]): r["train/loss"] for r in rows if "train/loss" in r}
    if not tps:
        raise SystemExit(f"no {key} rows after step {skip}: run more --steps")
    return {"tps": statistics.median(tps), "mfu": statistics.median(mfu) if mfu else float("nan"),
            "loss": losses[max(losses)], "loss10": losses.get(10, float("nan"))}


def run(steps: int, full: bool) -> str:
    with tempfile.TemporaryDirectory(prefix="pretrain_bench_") as tmp:
        work = Path(tmp)
        tok, shards = prepare_data(work)
        table = []
        base = None
        for label, precision, devices, strategy in ROWS:
            run_dir = work / label.replace(" ", "_").replace(",", "")
            cfg = row_config(run_dir, tok, shards, precision, devices, strategy, steps)
            wall = _run([sys.executable, "-m", "recipes.pretrain", "fit", "--config", str(cfg)], threads=2 // devices)
            s = summarize(read_csv_metrics(run_dir), devices)
            base = base or s["tps"]
            table.append([label, f"{s['tps']:,.0f}", f"{s['tps'] / base:.2f}×", f"{100 * s['mfu']:.1f}%",
                          f"{s['loss10']:.6f}", f"{s['loss']:.5f}", f"{wall:.0f}"])
            print(label, table[-1], flush=True)
        body = ("## Pretraining: tiny-cpu\n\n" + environment()
                + f"\n`python -m benchmarks.pretrain_bench` · `recipes/configs/tiny-cpu.yaml` (4 layers × 192 wide, "
                + f"vocab 4096, block 256, global batch 8 × 256 tokens on every row: 2 processes take 4 each) through the recipe, {steps} steps per row, "
                + "no validation or checkpoints. Tokens/s (all ranks) and MFU as the recipe logs them "
                + "(ThroughputMonitor; MFU against the matmul peak measured at start-up for the row's precision), "
                + "median after step 15. Wall includes start-up (and DeepSpeed's op compile when not cached). "
                + "fp32 losses agree to ~1e-6 at step 10; later they part by up to ~0.1, because a loss spike near "
                + "step 16 amplifies fp32 rounding differences (thread count alone does it; see the module docstring).\n\n"
                + markdown_table(["run", "tokens/s", "vs 1 process fp32", "MFU", "loss at step 10",
                                  f"loss at step {steps}", "wall s"],
                                 table))
        if full:
            run_dir = work / "full"
            cfg = row_config(run_dir, tok, shards, "32-true", 1, "auto", None)
            wall = _run([sys.executable, "-m", "recipes.pretrain", "fit", "--config", str(cfg)])
            rows = read_csv_metrics(run_dir)
            val = [r for r in rows if "val/loss" in r]
            first, last = val[0], val[-1]
            s = summarize(rows, 1)
            demo = yaml.safe_load(CONFIG.read_text())
            n = demo["trainer"]["max_steps"]
            tokens = n * demo["data"]["micro_batch_size"] * demo["data"]["block_size"]
            body += (f"\n### The demo budget (tiny-cpu.yaml unchanged: {n} steps, {tokens / 1e6:.2f}M tokens, fp32, 1 process)\n\n"
                     + markdown_table(["", "value"], [
                         ["val loss (held-out Shakespeare), first → last validation",
                          f"{first['val/loss']:.3f} (step {first['step']:.0f}) → {last['val/loss']:.3f} (step {last['step']:.0f})"],
                         ["val bits per byte", f"{first['val/bpb']:.3f} → {last['val/bpb']:.3f}"],
                         ["train loss at the last step", f"{s['loss']:.3f}"],
                         ["median tokens/s, MFU", f"{s['tps']:,.0f}, {100 * s['mfu']:.1f}%"],
                         ["wall time (start-up, validations, checkpoints included)", f"{wall / 60:.1f} min"]]))
    write_section("pretrain", body)
    return body


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per timed row")
    p.add_argument("--no-full", dest="full", action="store_false", help="skip the demo-budget run (tiny-cpu.yaml as it is)")
    args = p.parse_args()
    print(run(args.steps, args.full))


if __name__ == "__main__":
    main()
