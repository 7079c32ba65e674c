"""Pretraining benchmark: tiny-cpu through the real recipe, per precision and parallel strategy.

    python -m benchmarks.pretrain_bench              # ~15 min on 2 cores; writes "pretrain" in BENCHMARKS.md
    python -m benchmarks.pretrain_bench --steps 20 --no-full   # a quick check of the script
    python -m benchmarks.pretrain_bench --vs-loop             # the default recipe vs a minimal loop (~10 min);
                                                              # writes "pretrain_vs_loop" in BENCHMARKS.md

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

`--vs-loop`: the default recipe (tiny-cpu.yaml as shipped: `precision: auto`, its callbacks and
logging; only validation and periodic checkpoints off, as the loop has neither) against a
minimal fp32 PyTorch loop of the same model on the same data, written below without any
framework as nanoGPT's train.py runs on a CPU: forward, cross-entropy, backward, grad-norm clip
1.0, torch's default AdamW (decay on matmul weights only), the same warmup+cosine lr per step,
the same batches (gpt.data's windows in the recipe's sample order) and the same initial weights
(torch seed 1337, then GPT(config), as seed_everything does). Both train max_steps steps; then the
held-out loss per token of both is gpt.lm_eval.evaluate on the same val windows, in fp32. Times
cover the training steps only (from the first step to the last, start-up excluded): wall and the
process's CPU time (all threads), the steadier number on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
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
            cfg = row_config(run_dir, tok, shards, "auto", 1, "auto", None)
            wall = _run([sys.executable, "-m", "recipes.pretrain", "fit", "--config", str(cfg)])
            rows = read_csv_metrics(run_dir)
            val = [r for r in rows if "val/loss" in r]
            first, last = val[0], val[-1]
            s = summarize(rows, 1)
            demo = yaml.safe_load(CONFIG.read_text())
            n = demo["trainer"]["max_steps"]
            tokens = n * demo["data"]["micro_batch_size"] * demo["data"]["block_size"]
            body += (f"\n### The demo budget (tiny-cpu.yaml unchanged: {n} steps, {tokens / 1e6:.2f}M tokens, `precision: auto`, 1 process)\n\n"
                     + markdown_table(["", "value"], [
                         ["val loss (held-out Shakespeare), first → last validation",
                          f"{first['val/loss']:.3f} (step {first['step']:.0f}) → {last['val/loss']:.3f} (step {last['step']:.0f})"],
                         ["val bits per byte", f"{first['val/bpb']:.3f} → {last['val/bpb']:.3f}"],
                         ["train loss at the last step", f"{s['loss']:.3f}"],
                         ["median tokens/s, MFU", f"{s['tps']:,.0f}, {100 * s['mfu']:.1f}%"],
                         ["wall time (start-up, validations, checkpoints included)", f"{wall / 60:.1f} min"]]))
    write_section("pretrain", body)
    return body


# ---- the default recipe vs a minimal loop ------------------------------------------------------
class StepTimer(L.Callback):
    """Wall and process CPU seconds of a run's training steps (first step to last), written as JSON."""

    def __init__(self, path: str):
        self.path, self.t0, self.c0, self.step0 = path, 0.0, 0.0, 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.t0, self.c0, self.step0 = time.perf_counter(), time.process_time(), trainer.global_step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        Path(self.path).write_text(json.dumps({"wall": time.perf_counter() - self.t0,
                                               "cpu": time.process_time() - self.c0,
                                               "steps": trainer.global_step - self.step0,
                                               "precision": str(trainer.precision)}))


def recipe_side(work: Path, tok: Path, shards: Path, steps: int, threads: int = 2) -> dict[str, Any]:
    """tiny-cpu.yaml as shipped for `steps` steps (no validation, no periodic checkpoints), timed."""
    run_dir = work / "recipe"
    cfg: dict[str, Any] = yaml.safe_load(CONFIG.read_text())
    cfg.update(run_dir=str(run_dir), wandb=False, val_every=0, checkpoint_every=0)
    cfg["trainer"].update(max_steps=steps, enable_progress_bar=False)
    timer = work / "recipe_timer.json"
    cfg["trainer"]["callbacks"] = list(cfg["trainer"]["callbacks"]) + [
        {"class_path": "benchmarks.pretrain_bench.StepTimer", "init_args": {"path": str(timer)}}]
    cfg["data"].update(data_dir=str(shards), tokenizer=str(tok))
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.bench.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    _run([sys.executable, "-m", "recipes.pretrain", "fit", "--config", str(path)], threads=threads)
    from gpt.checkpoint import load_model
    model, _ = load_model(run_dir / "checkpoints" / "last.ckpt")
    return {**json.loads(timer.read_text()), "model": model}


def minimal_loop(shards: Path, steps: int, threads: int = 2) -> dict[str, Any]:
    """tiny-cpu's training as a plain PyTorch loop, fp32, no framework (what nanoGPT's train.py does on CPU)."""
    from torch.utils.data import DataLoader

    from gpt.config import GPTConfig
    from gpt.data import PretrainWindows, StepBatchSampler
    from gpt.model import GPT
    from gpt.optim import LRSchedule, param_groups
    from gpt.shards import TokenShards

    cfg = yaml.safe_load(CONFIG.read_text())
    m, d, t = cfg["model"], cfg["data"], cfg["trainer"]
    torch.set_num_threads(threads)
    torch.manual_seed(cfg["seed_everything"])
    model = GPT(GPTConfig.from_preset(m["preset"], **m["model_config"]))
    model.train()
    opt = torch.optim.AdamW(param_groups(model, m["weight_decay"]), lr=m["lr"], betas=tuple(m["betas"]))
    schedule = LRSchedule(m["schedule"], m["warmup_steps"], steps, m["min_lr_ratio"])
    windows = PretrainWindows(TokenShards(str(shards), "train"), d["block_size"], d["seed"])
    batches = DataLoader(windows, batch_sampler=StepBatchSampler(d["micro_batch_size"], 1, 0, 1, total_steps=steps))
    losses = []
    t0, c0 = time.perf_counter(), time.process_time()
    for step, batch in enumerate(batches):
        for group in opt.param_groups:
            group["lr"] = m["lr"] * schedule(step)
        x, y = batch["input_ids"], batch["labels"]
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t["gradient_clip_val"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0, "steps": len(losses),
            "precision": "32-true", "model": model.eval(), "losses": losses}


def held_out_loss(model: torch.nn.Module, shards: Path) -> float:
    """gpt.lm_eval on the first val_windows windows of the val split, fp32: the same for both sides."""
    from gpt.lm_eval import evaluate, open_split

    cfg = yaml.safe_load(CONFIG.read_text())
    with torch.no_grad():
        return evaluate(model.float(), open_split(shards, "val"), block_size=cfg["data"]["block_size"],
                        windows=cfg["data"]["val_windows"])["loss"]


def run_vs_loop(steps: Optional[int], threads: int = 2) -> str:
    demo = yaml.safe_load(CONFIG.read_text())
    steps = steps or demo["trainer"]["max_steps"]
    tokens = steps * demo["data"]["micro_batch_size"] * demo["data"]["block_size"]
    with tempfile.TemporaryDirectory(prefix="pretrain_vs_loop_") as tmp:
        work = Path(tmp)
        tok, shards = prepare_data(work)
        load_before = os.getloadavg()
        sides = {"the default recipe (tiny-cpu.yaml)": recipe_side(work, tok, shards, steps, threads),
                 "minimal fp32 PyTorch loop": minimal_loop(shards, steps, threads)}
        load_after = os.getloadavg()
        for side in sides.values():
            side["val"] = held_out_loss(side.pop("model"), shards)
    loop = sides["minimal fp32 PyTorch loop"]
    rows = []
    for label, s in sides.items():
        if s["steps"] != steps:
            raise SystemExit(f"{label}: trained {s['steps']} steps, expected {steps}")
        rows.append([label, s["precision"], f"{tokens / s['wall']:,.0f}", f"{loop['wall'] / s['wall']:.2f}×",
                     f"{1e3 * s['cpu'] / steps:,.0f}", f"{loop['cpu'] / s['cpu']:.2f}×", f"{s['val']:.4f}"])
        print(label, rows[-1], flush=True)
    body = ("## Pretraining: the default recipe vs a minimal PyTorch loop\n\n" + environment()
            + f"\n`python -m benchmarks.pretrain_bench --vs-loop --threads {threads}` · {threads} torch thread(s) per side · tiny-cpu (4 layers × 192 wide, vocab 4096, "
            + f"batch 8 × 256 tokens), {steps} steps = {tokens / 1e6:.2f}M tokens on each side, same batches, same "
            + "initial weights, same lr schedule, clip 1.0. The recipe is tiny-cpu.yaml as shipped (`precision: auto`, "
            + "its callbacks and logging) without validation and periodic checkpoints; the loop is forward, "
            + "cross-entropy, backward, clip, torch's default AdamW, in fp32, with no framework (nanoGPT's train.py "
            + "on a CPU). Tokens/s over the training steps (start-up excluded); CPU ms per step = the process's CPU "
            + "time (all its threads) / steps, steadier than wall time on a shared machine. Held-out loss: "
            + "gpt.lm_eval.evaluate in fp32 on the same val windows. "
            + f"Load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after.\n\n"
            + markdown_table(["run", "precision", "tokens/s", "vs loop (wall)", "CPU ms/step", "vs loop (CPU)",
                              "held-out loss"], rows))
    if not all(math.isfinite(s["val"]) for s in sides.values()):
        raise SystemExit("a held-out loss is not finite")
    write_section("pretrain_vs_loop", body)
    return body


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per timed row (default 60)")
    p.add_argument("--no-full", dest="full", action="store_false", help="skip the demo-budget run (tiny-cpu.yaml as it is)")
    p.add_argument("--vs-loop", action="store_true",
                   help="only the default recipe vs a minimal fp32 loop, at --steps (default: tiny-cpu's max_steps)")
    p.add_argument("--threads", type=int, default=2,
                   help="--vs-loop: torch threads of each side (1 keeps CPU time steady when other jobs share the cores)")
    args = p.parse_args()
    if args.vs_loop:
        print(run_vs_loop(args.steps, args.threads))
    else:
        print(run(args.steps or 60, args.full))


if __name__ == "__main__":
    main()
