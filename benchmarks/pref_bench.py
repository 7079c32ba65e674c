"""Preference benchmark: our reward model and DPO vs TRL's RewardTrainer and DPOTrainer, same model and pairs.

    python -m benchmarks.pref_bench                                    # after `make demo` (reads runs/demo)
    python -m benchmarks.pref_bench --sft CKPT --tokenizer TOK --pairs DIR --pairs_src DIR --task_val VAL
    python -m benchmarks.pref_bench --rm_steps 12 --dpo_steps 12 --warmup 2 --eval_rows 20 --no-write  # a quick check
    python -m benchmarks.pref_bench --only dpo                         # one half

Both sides start from the same weights: the SFT checkpoint, and its Hugging Face export
(`gpt export --format hf`, a GPT2LMHeadModel directory with our chat template). Both train on
the same demo pairs: ours from the pairs shards (`data_prep.make_sft --kind pairs`), TRL
from the JSONL they were made from (TRL's explicit-prompt format: `prompt`, `chosen`,
`rejected` message lists); the chat template renders them to the same tokens on both sides.
Settings are those of recipes/configs/reward-tiny-cpu.yaml and dpo-tiny-cpu.yaml: the same
steps, 16 pairs per optimizer step (8 per micro-batch x 2 accumulated), AdamW (0.9, 0.95)
without weight decay, a cosine to 0.1 x lr after 10 warmup steps, clipping 1.0, fp32, no
activation checkpointing (TRL's configs default to gradient_checkpointing=True; it is turned off
here, as ours is off), 2 torch threads, one process per side, each in its own subprocess.

Reward model. Ours: recipes/reward.py (gpt.reward.RewardModule: the backbone + a scalar head
N(0, 0.02) read at the reply's last token, Bradley-Terry loss), the config's lr. TRL: RewardTrainer on
AutoModelForSequenceClassification(num_labels=1) of the export, which transformers builds as
GPT2ForSequenceClassification: the same GPT-2 body + `score` = Linear(n_embd, 1, bias=False),
N(0, initializer_range = 0.02), read at the last non-pad token, which for a rendered
conversation is the reply's closing <|end|>: the same head at the same token. Quality: held-out
pair accuracy on all the val pairs, each side's trained model scoring chosen and rejected
(ours through gpt.reward.RewardModel.score_texts, TRL's by its model on the template's tokens).

DPO. Ours: recipes/dpo.py (gpt.dpo.DPOModule: the reference's log-probs computed once before
the first step, one forward per step), the config's beta and lr, sigmoid loss. TRL: DPOTrainer with
precompute_ref_log_probs True (also once, before training) and False (a frozen copy of the
model does a second forward every step). Quality: held-out exact-match of the trained model on
the first 300 rows of the task's val.jsonl through OUR evaluator (gpt.evaluate: greedy, KV
cache, stop at <|end|>); TRL's saved model is read back with gpt.hf, so the metric is identical.

Timing: wall clock from the end of step `warmup` to the end of the last step (data loading,
forward, backward, optimizer, logging), and the process's CPU time over the same steps (the
steadier measure on a shared machine). The one-off reference pass of DPO is reported apart,
and in "pairs/s incl. reference", the pairs of all steps over the time from the start of the
reference pass to the end of the last step. Writes the "pref" section of BENCHMARKS.md.
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

from benchmarks.common import (ROOT, bench_env, environment, exact_match_of, export_for_hf, load_level,
                               markdown_table, step_timing, trl_step_clock, write_section)

CONFIGS = {"rm": ROOT / "recipes" / "configs" / "reward-tiny-cpu.yaml",
           "dpo": ROOT / "recipes" / "configs" / "dpo-tiny-cpu.yaml"}
LOG_EVERY = 10  # TRL's logging_steps


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def pairs_per_step(cfg: dict[str, Any]) -> int:
    return cfg["data"]["micro_batch_size"] * cfg["trainer"]["accumulate_grad_batches"]


# ---- our recipes ---------------------------------------------------------------------------------
class PairClock(Callback):
    """Wall time at the start of training (before DPO's reference pass) and at the first batch; wall and
    CPU time at the end of every optimizer step; JSON at the end of fit."""

    def __init__(self, out: str):
        self.out = out
        self.ends: list[float] = []
        self.cpu: list[float] = []
        self.start: Optional[float] = None
        self.first_batch: Optional[float] = None

    def on_train_start(self, trainer, pl_module) -> None:  # callbacks run before the module's hook
        self.start = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.first_batch is None:
            self.first_batch = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == len(self.ends):
            return  # a micro-batch that only accumulated gradients: no optimizer step ended here
        self.ends.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def on_train_end(self, trainer, pl_module) -> None:
        Path(self.out).write_text(json.dumps({"ends": self.ends, "cpu": self.cpu,
                                              "reference_s": self.first_batch - self.start,
                                              "start": self.start}))


def run_ours(kind: str, a: argparse.Namespace, steps: int, work: Path) -> dict[str, Any]:
    cfg = yaml.safe_load(CONFIGS[kind].read_text())
    # the held-out exact-match callback runs generation at train start: measured after training instead
    cfg["trainer"]["callbacks"] = [c for c in cfg["trainer"]["callbacks"] if "ExactMatchEval" not in c["class_path"]]
    clock = work / f"ours_{kind}_clock.json"
    cfg["trainer"]["callbacks"].append({"class_path": "benchmarks.pref_bench.PairClock",
                                        "init_args": {"out": str(clock)}})
    cfg["data"].update(data_dir=str(Path(a.pairs).resolve()), tokenizer=str(Path(a.tokenizer).resolve()))
    cfg.update(run_dir=str(work / f"ours_{kind}"), wandb=False, init_from=str(Path(a.sft).resolve()),
               val_every=0, checkpoint_every=0)
    cfg["trainer"]["max_steps"] = steps
    path = work / f"ours_{kind}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    recipe = {"rm": "recipes.reward", "dpo": "recipes.dpo"}[kind]
    subprocess.run([sys.executable, "-m", recipe, "--config", str(path)], cwd=ROOT, env=bench_env(),
                   check=True, stdout=subprocess.DEVNULL)
    return {"clock": json.loads(clock.read_text()), "checkpoint": str(work / f"ours_{kind}" / "checkpoints" / "last.ckpt"),
            "pairs_per_step": pairs_per_step(cfg)}


def our_rm_accuracy(checkpoint: str, val_pairs: list[dict[str, Any]]) -> float:
    """Share of held-out pairs whose chosen reply our trained reward model scores above the rejected one."""
    from gpt.reward import load_reward_model

    rm, tok = load_reward_model(checkpoint)
    prompts = [p["prompt"] for p in val_pairs]
    chosen = rm.score_texts(tok, prompts, [p["chosen"][-1]["content"] for p in val_pairs])
    rejected = rm.score_texts(tok, prompts, [p["rejected"][-1]["content"] for p in val_pairs])
    return sum(c > r for c, r in zip(chosen, rejected)) / len(val_pairs)


# ---- TRL (each run in its own process) ------------------------------------------------------------
def trl_args(kind: str, out: str, steps: int):
    """RewardConfig / DPOConfig with the settings of our yaml (see the module docstring)."""
    from trl import DPOConfig, RewardConfig

    cfg = yaml.safe_load(CONFIGS[kind].read_text())
    m, t, d = cfg["model"], cfg["trainer"], cfg["data"]
    common = dict(output_dir=out, max_steps=steps, per_device_train_batch_size=d["micro_batch_size"],
                  gradient_accumulation_steps=t["accumulate_grad_batches"], learning_rate=m["lr"],
                  lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": m["min_lr_ratio"]},
                  warmup_steps=m["warmup_steps"], weight_decay=m["weight_decay"], adam_beta1=0.9, adam_beta2=0.95,
                  adam_epsilon=1e-8, max_grad_norm=t["gradient_clip_val"], max_length=d["block_size"],
                  gradient_checkpointing=False, use_cpu=True, report_to=[], save_strategy="no",
                  logging_steps=LOG_EVERY, seed=cfg["seed_everything"], data_seed=d["seed"],
                  dataloader_num_workers=0, bf16=False, fp16=False, disable_tqdm=True)
    if kind == "rm":
        return RewardConfig(**common, center_rewards_coefficient=None), cfg
    return DPOConfig(**common, beta=m["beta"], loss_type=[m["loss_type"]]), cfg


def trl_rm_accuracy(model, tok, val_pairs: list[dict[str, Any]]) -> float:
    """TRL's trained sequence classifier scoring each val pair's chosen and rejected conversation."""
    import torch

    model.eval()
    right = 0
    with torch.no_grad():
        for p in val_pairs:
            rows = [tok.apply_chat_template(p["prompt"] + p[k], tokenize=True, return_dict=True)["input_ids"]
                    for k in ("chosen", "rejected")]
            T = max(map(len, rows))
            ids = torch.full((2, T), tok.pad_token_id)
            mask = torch.zeros((2, T), dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
            scores = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
            right += int(scores[0] > scores[1])
    return right / len(val_pairs)


def trl_main(kind: str, hf_dir: str, src: str, out: str, steps: int, precompute: bool) -> None:
    import datasets
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl import DPOTrainer, RewardTrainer

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    args, cfg = trl_args(kind, out, steps)
    torch.manual_seed(cfg["seed_everything"])
    tok = AutoTokenizer.from_pretrained(hf_dir)
    train = datasets.load_dataset("json", data_files=str(Path(src) / "train.jsonl"), split="train")
    train = train.select_columns(["prompt", "chosen", "rejected"])
    reference_s = 0.0
    if kind == "rm":
        model = AutoModelForSequenceClassification.from_pretrained(hf_dir, num_labels=1, dtype=torch.float32,
                                                                   attn_implementation="sdpa")
        trainer = RewardTrainer(model=model, args=args, train_dataset=train, processing_class=tok)
    else:
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="sdpa")
        args.precompute_ref_log_probs = precompute

        class TimedDPO(DPOTrainer):  # the one-off reference pass, timed where TRL runs it (in __init__)
            def _precompute_ref_logps(self, *a, **k):
                nonlocal reference_s
                t0 = time.perf_counter()
                try:
                    return super()._precompute_ref_logps(*a, **k)
                finally:
                    reference_s += time.perf_counter() - t0

        trainer = TimedDPO(model=model, args=args, train_dataset=train, processing_class=tok)
    ends: list[float] = []
    cpu: list[float] = []
    trainer.add_callback(trl_step_clock(ends, cpu))
    start = time.perf_counter()
    trainer.train()
    result = {"ends": ends, "cpu": cpu, "reference_s": reference_s, "start": start - reference_s}
    if kind == "rm":
        result["accuracy"] = trl_rm_accuracy(trainer.model, tok, read_jsonl(Path(src) / "val.jsonl"))
    else:
        trainer.save_model(out + "/model")
    Path(out, "clock.json").write_text(json.dumps(result))


def run_trl(kind: str, a: argparse.Namespace, hf_dir: Path, steps: int, work: Path, precompute: bool) -> dict[str, Any]:
    out = work / f"trl_{kind}_{int(precompute)}"
    # a fresh datasets cache: TRL caches the reference log-probs there, and a cache hit would skip the pass
    env = bench_env(HF_DATASETS_CACHE=str(out / "datasets_cache"), TQDM_DISABLE="1")
    subprocess.run([sys.executable, "-m", "benchmarks.pref_bench", "--trl", kind, "--hf", str(hf_dir),
                    "--pairs_src", str(Path(a.pairs_src).resolve()), "--out", str(out), "--steps", str(steps),
                    "--precompute", str(int(precompute))], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    cfg = yaml.safe_load(CONFIGS[kind].read_text())
    return {"clock": json.loads((out / "clock.json").read_text()), "checkpoint": str(out / "model"),
            "pairs_per_step": pairs_per_step(cfg)}


# ---- the two comparisons ---------------------------------------------------------------------------
def speed(r: dict[str, Any], warmup: int) -> dict[str, float]:
    c = r["clock"]
    s = step_timing(c["ends"], c["cpu"], warmup)
    n = r["pairs_per_step"]
    s.update(pairs_per_sec=n / s["sec_per_step"], pairs_per_cpu_sec=n / s["cpu_sec_per_step"],
             reference_s=c["reference_s"], pairs_per_sec_total=n * len(c["ends"]) / (c["ends"][-1] - c["start"]))
    return s


def bench_rm(a: argparse.Namespace, hf_dir: Path, work: Path) -> dict[str, dict[str, Any]]:
    val_pairs = read_jsonl(Path(a.pairs_src) / "val.jsonl")
    results = {}
    for name, fn in (("gpt-pipeline (recipes/reward.py)", lambda: run_ours("rm", a, a.rm_steps, work)),
                     ("TRL RewardTrainer", lambda: run_trl("rm", a, hf_dir, a.rm_steps, work, False))):
        r = fn()
        r["speed"] = speed(r, a.warmup)
        r["accuracy"] = r["clock"]["accuracy"] if "accuracy" in r["clock"] else our_rm_accuracy(r["checkpoint"], val_pairs)
        results[name] = r
        print(name, json.dumps(r["speed"]), f"val pair accuracy {r['accuracy']:.3f}", flush=True)
    return results


def bench_dpo(a: argparse.Namespace, hf_dir: Path, work: Path) -> dict[str, dict[str, Any]]:
    results = {}
    for name, fn in (("gpt-pipeline (recipes/dpo.py)", lambda: run_ours("dpo", a, a.dpo_steps, work)),
                     ("TRL DPOTrainer, precompute_ref_log_probs=True",
                      lambda: run_trl("dpo", a, hf_dir, a.dpo_steps, work, True)),
                     ("TRL DPOTrainer, precompute_ref_log_probs=False",
                      lambda: run_trl("dpo", a, hf_dir, a.dpo_steps, work, False))):
        r = fn()
        r["speed"] = speed(r, a.warmup)
        r["em"] = exact_match_of(r["checkpoint"], a.task_val, a.eval_rows)
        results[name] = r
        print(name, json.dumps(r["speed"]), f"exact-match {r['em']['exact_match']:.3f}", flush=True)
    return results


def speed_cells(s: dict[str, float]) -> list[str]:
    return [f"{s['sec_per_step']:.3f}", f"{s['pairs_per_sec']:.1f}", f"{s['cpu_sec_per_step']:.3f}",
            f"{s['pairs_per_cpu_sec']:.1f}"]


def ratios(ours: dict[str, float], other: dict[str, float]) -> str:
    return (f"{ours['pairs_per_sec'] / other['pairs_per_sec']:.2f}x pairs/s wall clock, "
            f"{ours['pairs_per_cpu_sec'] / other['pairs_per_cpu_sec']:.2f}x pairs per CPU second")


def _setting(kind: str, key: str) -> str:
    """A model setting of the stage's config (both sides train with it), for the table's caption."""
    return f"{yaml.safe_load(CONFIGS[kind].read_text())['model'][key]:g}"


def n_pairs(pairs_src: str, split: str = "train") -> str:
    """How many pairs the split's source file holds ("its" when it cannot be read)."""
    try:
        with open(Path(pairs_src) / f"{split}.jsonl", encoding="utf-8") as f:
            return f"{sum(1 for line in f if line.strip()):,}"
    except OSError:
        return "its"


def report(rm: Optional[dict], dpo: Optional[dict], sft_em: Optional[dict], a: argparse.Namespace, load: str) -> str:
    text = ("## Preference: recipes/reward.py and recipes/dpo.py vs TRL RewardTrainer and DPOTrainer\n\n"
            + environment() + "\n"
            f"`python -m benchmarks.pref_bench --sft {a.sft} --tokenizer {a.tokenizer} --pairs {a.pairs} --pairs_src "
            f"{a.pairs_src} --task_val {a.task_val} --rm_steps {a.rm_steps} --dpo_steps {a.dpo_steps}` on the demo's SFT "
            f"model and {n_pairs(a.pairs_src)} training pairs (see its docstring for the settings), 16 pairs per step. Timed: steps "
            f"{a.warmup + 1}-last, wall clock and the process's CPU time (all its threads; the wall clock also counts "
            f"other jobs on the shared machine: {load} at the start).\n\n")
    head = ["", "steps", "s/step", "pairs/s", "CPU s/step", "pairs/CPU s"]
    if rm:
        rows = [[name, a.rm_steps, *speed_cells(r["speed"]), f"{100 * r['accuracy']:.1f}%"] for name, r in rm.items()]
        ours, trl = (r["speed"] for r in rm.values())
        text += (f"Reward model (lr {_setting('rm', 'lr')}); accuracy = held-out pairs ({n_pairs(a.pairs_src, 'val')} val pairs) whose chosen reply the trained "
                 "model scores above the rejected one:\n\n" + markdown_table(head + ["held-out pair accuracy"], rows)
                 + f"\nOurs / TRL: {ratios(ours, trl)}.\n\n")
    if dpo:
        rows = [[name, a.dpo_steps, *speed_cells(r["speed"]), f"{r['speed']['reference_s']:.1f}",
                 f"{r['speed']['pairs_per_sec_total']:.1f}", f"{100 * r['em']['exact_match']:.1f}%"]
                for name, r in dpo.items()]
        if sft_em:
            rows.append(["SFT model (before DPO)", 0, "", "", "", "", "", "", f"{100 * sft_em['exact_match']:.1f}%"])
        ours, pre, nopre = (r["speed"] for r in dpo.values())
        text += (f"DPO (beta {_setting('dpo', 'beta')}, sigmoid, lr {_setting('dpo', 'lr')}); exact-match = the first {a.eval_rows} held-out task rows through "
                 "gpt.evaluate (greedy, 24 new tokens) for every model; \"reference s\" = the one-off pass over the "
                 "pairs before the first step (ours also scores the val pairs in it):\n\n"
                 + markdown_table(head + ["reference s", "pairs/s incl. reference", "held-out exact-match"], rows)
                 + f"\nOurs / TRL (precompute on): {ratios(ours, pre)}.  \n"
                 f"Ours / TRL (precompute off): {ratios(ours, nopre)}.\n")
    return text


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sft", default="runs/demo/sft/checkpoints/last.ckpt", help="the SFT checkpoint both start from")
    ap.add_argument("--tokenizer", default="runs/demo/tokenizer.json")
    ap.add_argument("--pairs", default="runs/demo/pairs", help="our pairs shards (make_sft --kind pairs)")
    ap.add_argument("--pairs_src", default="runs/demo/pairs_src", help="train.jsonl/val.jsonl the shards were made from")
    ap.add_argument("--task_val", default="runs/demo/task/val.jsonl", help="held-out task rows for exact-match")
    ap.add_argument("--rm_steps", type=int, help="reward model steps (default: reward-tiny-cpu.yaml's max_steps)")
    ap.add_argument("--dpo_steps", type=int, help="DPO steps (default: dpo-tiny-cpu.yaml's max_steps)")
    ap.add_argument("--warmup", type=int, default=10, help="steps left out of the timing")
    ap.add_argument("--eval_rows", type=int, default=300)
    ap.add_argument("--only", choices=("rm", "dpo"), help="run one half")
    ap.add_argument("--no-write", dest="write", action="store_false", help="print the tables only")
    ap.add_argument("--trl", choices=("rm", "dpo"), help=argparse.SUPPRESS)  # internal: one TRL run in this process
    ap.add_argument("--hf", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--precompute", type=int, default=1, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    for kind, attr in (("rm", "rm_steps"), ("dpo", "dpo_steps")):
        if getattr(a, attr) is None:  # the recipe's own step count, so the comparison follows the config
            setattr(a, attr, int(yaml.safe_load(CONFIGS[kind].read_text())["trainer"]["max_steps"]))
    if a.trl:
        trl_main(a.trl, a.hf, a.pairs_src, a.out, a.steps, bool(a.precompute))
        return
    needs = [a.sft, a.tokenizer, Path(a.pairs) / "manifest.json", Path(a.pairs_src) / "train.jsonl",
             Path(a.pairs_src) / "val.jsonl", a.task_val]
    for need in needs:
        if not Path(need).exists():
            sys.exit(f"error: {need} not found: run `make demo` first (it writes the SFT model, the task and the pairs), "
                     "or pass --sft/--tokenizer/--pairs/--pairs_src/--task_val")
    if min(a.rm_steps, a.dpo_steps) <= a.warmup + 1:
        sys.exit(f"error: --rm_steps and --dpo_steps must exceed --warmup + 1 = {a.warmup + 1} to time any step")
    load = load_level()
    with tempfile.TemporaryDirectory(prefix="pref_bench_") as tmp:
        work = Path(tmp)
        hf_dir = export_for_hf(a.sft, work / "hf")  # what `gpt export --format hf` writes
        rm = bench_rm(a, hf_dir, work) if a.only in (None, "rm") else None
        dpo = bench_dpo(a, hf_dir, work) if a.only in (None, "dpo") else None
        sft_em = exact_match_of(a.sft, a.task_val, a.eval_rows) if dpo else None
    body = report(rm, dpo, sft_em, a, load)
    print(body)
    if a.write:
        write_section("pref", body)


if __name__ == "__main__":
    main()
