"""SFT benchmark: our recipe vs TRL's SFTTrainer on the demo task, same model, data and settings.

    python -m benchmarks.sft_bench --init runs/demo/pretrain/checkpoints/last.ckpt   # after `make demo`
    python -m benchmarks.sft_bench --init CKPT --steps 40 --no-write                   # a quick check

Both sides start from the same weights: the pretrained checkpoint, and its Hugging Face export
(`gpt export --format hf`, which carries our chat template with {% generation %} markers). Both
train on runs/demo/task/train.jsonl (TRL's `messages` format) with the settings of
recipes/configs/sft-tiny-cpu.yaml in fp32 (its `precision: auto` is bf16 on a CPU with native bf16):
the same steps, 8 packed rows of up to 257 tokens per step
(TRL: packing=True, best-fit decreasing, max_length 257; ours: data.packing, block_size 256),
loss on the assistant tokens only (TRL: assistant_only_loss from the template's generation
markers), AdamW (0.9, 0.95) without weight decay, lr 1e-3 with 20 warmup steps and a cosine to
0.1 x lr, gradient clipping 1.0, fp32, no activation checkpointing (TRL's configs default it on),
2 torch threads, one process each. Each side runs in
its own subprocess.

Timing is wall clock from the end of step `warmup` to the end of the last step (data loading,
forward, backward, optimizer and logging included; start-up, data preparation and TRL's
tokenization excluded), with the tokens of those steps: "total" = real (non-pad) tokens of the
packed rows, "supervised" = tokens with a label. The process's CPU time over the same steps is
reported too: on a shared machine it is the steadier measure of the work each side does. The
training loss (mean over supervised tokens) is compared over the same 10-step windows TRL logs. Quality is held-out exact-match on the first
300 rows of runs/demo/task/val.jsonl through OUR evaluator (gpt.evaluate: the template's
prompt, greedy, KV cache, stop at <|end|>) for both: TRL's trained model is saved and read back
with gpt.hf, so the metric is identical. Writes the "sft" section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import yaml
from lightning.pytorch.callbacks import Callback

from benchmarks.common import bench_env, environment, export_for_hf, markdown_table, write_section
from benchmarks.common import exact_match_of as common_exact_match

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "recipes" / "configs" / "sft-tiny-cpu.yaml"
IGNORE = -100
LOG_EVERY = 10  # TRL logs the mean training loss of every 10 steps; ours is averaged the same way


def _env(threads: int = 2) -> dict[str, str]:
    return bench_env(threads)


def throughput(ends: list[float], cpu: list[float], total: list[int], supervised: list[int],
               warmup: int) -> dict[str, float]:
    """Steps warmup+1 .. last: wall time from the end of step `warmup` to the end of the last one.

    `cpu` is the process's CPU time (all its threads) at the same moments: on a shared machine the
    wall clock also counts the time other jobs held the cores, the CPU time counts only the work.
    """
    seconds = ends[-1] - ends[warmup]
    cpu_seconds = cpu[-1] - cpu[warmup]
    steps = len(ends) - 1 - warmup
    return {"steps_timed": steps, "seconds": seconds, "sec_per_step": seconds / steps,
            "cpu_sec_per_step": cpu_seconds / steps, "tokens_per_cpu_sec": sum(total[warmup + 1:]) / cpu_seconds,
            "tokens_per_sec": sum(total[warmup + 1:]) / seconds,
            "supervised_per_sec": sum(supervised[warmup + 1:]) / seconds,
            "tokens_per_step": sum(total[warmup + 1:]) / steps, "supervised_per_step": sum(supervised[warmup + 1:]) / steps}


def loss_windows(losses: list[float], every: int = LOG_EVERY) -> list[list[float]]:
    """[[last step, mean loss]] over steps 1..every, every+1..2*every, ...: what TRL's logging_steps logs."""
    return [[i + every, sum(losses[i:i + every]) / every] for i in range(0, len(losses) - every + 1, every)]


# ---- our recipe ----------------------------------------------------------------------------------
class StepClock(Callback):
    """Wall time at the end of every optimizer step and each step's tokens; JSON at the end of fit."""

    def __init__(self, out: str):
        self.out = out
        self.ends: list[float] = []
        self.cpu: list[float] = []
        self.losses: list[float] = []
        self.total: list[int] = []
        self.supervised: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        seg = batch.get("segment_ids")
        self.total.append(int((seg >= 0).sum()) if seg is not None else batch["input_ids"].numel())
        self.supervised.append(int((batch["labels"] != IGNORE).sum()))
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs  # the step's mean over supervised tokens
        self.losses.append(float(loss))
        self.ends.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def on_train_end(self, trainer, pl_module) -> None:
        Path(self.out).write_text(json.dumps({"ends": self.ends, "cpu": self.cpu, "losses": loss_windows(self.losses), "total": self.total,
                                              "supervised": self.supervised}))


def run_ours(init: str, steps: int, work: Path) -> dict[str, Any]:
    cfg = yaml.safe_load(CONFIG.read_text())
    cfg["trainer"]["callbacks"] = [c for c in cfg["trainer"]["callbacks"] if "ChatEval" not in c["class_path"]]
    cfg["trainer"]["callbacks"].append({"class_path": "benchmarks.sft_bench.StepClock",
                                        "init_args": {"out": str(work / "ours_clock.json")}})
    for key in ("data_dir", "tokenizer"):
        cfg["data"][key] = str(ROOT / cfg["data"][key])
    cfg.update(run_dir=str(work / "ours"), wandb=False, init_from=init, val_every=0, checkpoint_every=0)
    cfg["trainer"]["max_steps"] = steps
    cfg["trainer"]["precision"] = "32-true"  # like for like: TRL runs fp32 (the demo config says auto)
    path = work / "ours.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    subprocess.run([sys.executable, "-m", "recipes.sft", "--config", str(path)], cwd=ROOT, env=_env(), check=True,
                   stdout=subprocess.DEVNULL)
    return {"clock": json.loads((work / "ours_clock.json").read_text()),
            "checkpoint": str(work / "ours" / "checkpoints" / "last.ckpt"), "config": cfg}


# ---- TRL -----------------------------------------------------------------------------------------
def trl_main(hf_dir: str, train: str, out: str, steps: int, clock: str) -> None:
    """TRL's SFTTrainer with the settings of sft-tiny-cpu.yaml (run in its own process)."""
    import datasets
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()

    cfg = yaml.safe_load(CONFIG.read_text())
    m, t, d = cfg["model"], cfg["trainer"], cfg["data"]
    torch.manual_seed(cfg["seed_everything"])
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="sdpa")
    data = datasets.load_dataset("json", data_files=train, split="train").select_columns(["messages"])
    args = SFTConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=d["micro_batch_size"],
                     gradient_accumulation_steps=t["accumulate_grad_batches"], learning_rate=m["lr"],
                     lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": m["min_lr_ratio"]},
                     warmup_steps=m["warmup_steps"], weight_decay=m["weight_decay"], adam_beta1=0.9, adam_beta2=0.95,
                     adam_epsilon=1e-8, max_grad_norm=t["gradient_clip_val"], max_length=d["block_size"] + 1,
                     packing=True, assistant_only_loss=True, use_cpu=True, report_to=[], save_strategy="no",
                     logging_steps=LOG_EVERY, seed=cfg["seed_everything"], data_seed=d["seed"], dataloader_num_workers=0,
                     bf16=False, fp16=False, disable_tqdm=True,
                     gradient_checkpointing=False)  # TRL's default is on; ours does not recompute activations
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    totals: list[int] = []
    supervised: list[int] = []
    collate = trainer.data_collator

    def counting(examples):  # every batch the trainer consumes, in order
        batch = collate(examples)
        labels = batch["labels"]
        mask = batch.get("attention_mask")
        totals.append(int(mask.sum()) if mask is not None else labels.numel())
        supervised.append(int((labels[..., 1:] != IGNORE).sum()))  # HF shifts labels inside the model
        return batch

    trainer.data_collator = counting
    ends: list[float] = []
    cpu: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())
            cpu.append(time.process_time())

    trainer.add_callback(Clock())
    trainer.train()
    trainer.save_model(out + "/model")
    losses = [[h["step"], h["loss"]] for h in trainer.state.log_history if "loss" in h and "step" in h]
    Path(clock).write_text(json.dumps({"ends": ends, "cpu": cpu, "losses": losses, "total": totals[:len(ends)],
                                       "supervised": supervised[:len(ends)]}))


def run_trl(hf_dir: Path, steps: int, work: Path) -> dict[str, Any]:
    train = str(ROOT / "runs" / "demo" / "task" / "train.jsonl")
    subprocess.run([sys.executable, "-m", "benchmarks.sft_bench", "--trl", str(hf_dir), "--train", train,
                    "--out", str(work / "trl"), "--steps", str(steps)], cwd=ROOT, env=_env(), check=True,
                   stdout=subprocess.DEVNULL)
    return {"clock": json.loads((work / "trl" / "clock.json").read_text()), "checkpoint": str(work / "trl" / "model")}


# ---- quality -------------------------------------------------------------------------------------
def exact_match_of(checkpoint: str, n: int) -> dict[str, Any]:
    return common_exact_match(checkpoint, ROOT / "runs" / "demo" / "task" / "val.jsonl", n)


def loss_at(losses: list[list[float]], step: int) -> str:
    return next((f"{loss:.3f}" for s, loss in losses if int(s) == step), "")


def report(results: dict[str, dict[str, Any]], base: dict[str, Any], a: argparse.Namespace) -> str:
    """The BENCHMARKS.md section: speed and quality, then the training loss every few windows."""
    rows = [[name, a.steps, f"{r['speed']['sec_per_step']:.3f}", f"{r['speed']['tokens_per_sec']:,.0f}",
             f"{r['speed']['supervised_per_sec']:,.0f}", f"{r['speed']['cpu_sec_per_step']:.3f}",
             f"{r['speed']['tokens_per_cpu_sec']:,.0f}", f"{r['speed']['tokens_per_step']:,.0f}",
             f"{100 * r['em']['exact_match']:.1f}%", f"{100 * r['em']['ended']:.0f}%"] for name, r in results.items()]
    rows.append(["base model (no SFT)", 0, "", "", "", "", "", "", f"{100 * base['exact_match']:.1f}%",
                 f"{100 * base['ended']:.0f}%"])
    ours, trl = results.values()
    ratio = ours["speed"]["tokens_per_sec"] / trl["speed"]["tokens_per_sec"]
    cratio = ours["speed"]["tokens_per_cpu_sec"] / trl["speed"]["tokens_per_cpu_sec"]
    marks = sorted({LOG_EVERY, *(LOG_EVERY * max(1, round(a.steps * f / LOG_EVERY)) for f in (0.1, 0.25, 0.5, 0.75, 1.0))})
    curve = [[name] + [loss_at(r["clock"]["losses"], m) for m in marks] for name, r in results.items()]
    return ("## SFT: recipes/sft.py vs TRL SFTTrainer\n\n" + environment() + "\n"
            f"`python -m benchmarks.sft_bench --init {a.init} --steps {a.steps}` (see its docstring for the settings). "
            f"Timed: steps {a.warmup + 1}-{a.steps}, wall clock and the process's CPU time (all its threads; on a "
            "shared machine the wall clock also counts other jobs). Exact-match: the first "
            f"{a.eval_rows} held-out rows through gpt.evaluate, greedy, 24 new tokens; \"ended\" = replies that "
            "ended their turn.\n\n"
            + markdown_table(["", "steps", "s/step", "tokens/s", "supervised tokens/s", "CPU s/step",
                              "tokens/CPU s", "tokens/step", "held-out exact-match", "ended"], rows)
            + f"\nOurs / TRL: {ratio:.2f}x tokens/s wall clock, {cratio:.2f}x tokens per CPU second.\n\n"
            f"Training loss (mean over supervised tokens, averaged over the {LOG_EVERY} steps ending at):\n\n"
            + markdown_table(["step"] + [str(m) for m in marks], curve))


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--init", default="runs/demo/pretrain/checkpoints/last.ckpt", help="the pretrained checkpoint")
    ap.add_argument("--steps", type=int, default=600, help="optimizer steps for both (the demo's SFT ran 600 until 2026-11-29, now 1200)")
    ap.add_argument("--warmup", type=int, default=10, help="steps left out of the timing")
    ap.add_argument("--eval_rows", type=int, default=300)
    ap.add_argument("--no-write", dest="write", action="store_false", help="print the table only")
    ap.add_argument("--trl", help=argparse.SUPPRESS)  # internal: run the TRL side in this process
    ap.add_argument("--train", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.trl:
        trl_main(a.trl, a.train, a.out, a.steps, str(Path(a.out) / "clock.json"))
        return
    for need in ("runs/demo/task/train.jsonl", "runs/demo/task/val.jsonl", "runs/demo/sft_data/manifest.json", a.init):
        if not (ROOT / need).exists():
            sys.exit(f"error: {need} not found: run `make demo` first (it writes the demo task and its SFT data)")
    with tempfile.TemporaryDirectory(prefix="sft_bench_") as tmp:
        work = Path(tmp)
        export_for_hf(ROOT / a.init, work / "hf")  # what `gpt export --format hf` writes
        results = {}
        for name, fn in (("gpt-pipeline (recipes/sft.py)", lambda: run_ours(str(ROOT / a.init), a.steps, work)),
                         ("TRL SFTTrainer", lambda: run_trl(work / "hf", a.steps, work))):
            t0 = time.perf_counter()
            r = fn()
            r["wall"] = time.perf_counter() - t0
            c = r["clock"]
            r["speed"] = throughput(c["ends"], c["cpu"], c["total"], c["supervised"], a.warmup)
            r["em"] = exact_match_of(r["checkpoint"], a.eval_rows)
            results[name] = r
            print(name, json.dumps(r["speed"]), f"exact-match {r['em']['exact_match']:.3f}", flush=True)
        base = exact_match_of(str(ROOT / a.init), a.eval_rows)
    ours, trl = results.values()
    body = report(results, base, a)
    print(body)
    if a.write:
        write_section("sft", body)


if __name__ == "__main__":
    main()
