"""RL benchmark: our GRPO (recipes/rl.py) vs TRL's GRPOTrainer, same model, prompts, reward and settings.

    python -m benchmarks.rl_bench                                     # after `make demo` (reads runs/demo)
    python -m benchmarks.rl_bench --sft CKPT --tokenizer TOK --task DIR
    python -m benchmarks.rl_bench --steps 4 --warmup 1 --eval_rows 20 --no-write     # a quick check

Both sides start from the same weights: the SFT checkpoint, and its Hugging Face export
(`gpt export --format hf`, a GPT2LMHeadModel directory with our chat template, whose
generation_config stops at <|end|>). Both read the prompts of the task's post.jsonl (ours:
gpt.prompt_data from the `messages` rows; TRL: the same rows as a `prompt` column of message
lists, the final assistant turn dropped) and reward a reply with the same function,
gpt.demo_task.reward (1.0 for an exact match, else 0.0; TRL calls it through a wrapper with
its reward_funcs signature). Settings of recipes/configs/rl-tiny-cpu.yaml, its guidance off (TRL has none): 64 prompts x
group of 8 = 512 responses per step, at most 16 new tokens, temperature 1 (no top-k/top-p),
one optimizer step per rollout (TRL: per_device_train_batch_size 512, num_generations 8,
gradient_accumulation_steps 1, num_iterations 1), advantages normalized by the group's std
(TRL: scale_rewards "group"), the clipped surrogate (epsilon 0.2) with token-level
normalization over the batch (TRL: loss_type "dapo"), kl_coef 0.04 = TRL's beta (k3 to the
frozen SFT reference), AdamW (0.9, 0.95) at the config's lr, constant, no weight decay, clipping 1.0,
fp32, no activation checkpointing (TRL's default gradient_checkpointing=True is turned off, as
ours is off), 2 torch threads, one process per side, each in its own subprocess. Sampling
differs by design: ours through gpt.generate's KV-cache sampler, TRL through
transformers.generate (no vLLM on a CPU).

Timing: wall clock per step (sample, score, reference and policy forwards, backward, optimizer)
from the end of step `warmup` to the end of the last, the process's CPU time over the same
steps, and generated tokens/s (response tokens incl. the end-of-turn token, over the same wall
time). Quality: held-out exact-match after training on the first 300 rows of the task's
val.jsonl through OUR evaluator (gpt.evaluate: greedy, KV cache, stop at <|end|>); TRL's saved
model is read back with gpt.hf, so the metric is identical. TRL 1.16 ships no PPOTrainer (only
GRPO and RLOO among the online trainers), so PPO has no TRL counterpart here.
Writes the "rl" section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import yaml
from lightning.pytorch.callbacks import Callback

from benchmarks.common import (ROOT, bench_env, environment, exact_match_of, export_for_hf, load_level,
                               markdown_table, step_timing, trl_step_clock, write_section)

CONFIG = ROOT / "recipes" / "configs" / "rl-tiny-cpu.yaml"


def responses_per_step(cfg: dict[str, Any]) -> int:
    return cfg["data"]["micro_batch_size"] * cfg["model"]["group_size"]


# ---- our recipe ----------------------------------------------------------------------------------
class RolloutClock(Callback):
    """Wall/CPU time at the end of every step (one rollout + its optimizer step), its generated tokens and
    mean reward; JSON at the end of fit."""

    def __init__(self, out: str, responses: int):
        self.out = out
        self.responses = responses
        self.ends: list[float] = []
        self.cpu: list[float] = []
        self.tokens: list[float] = []
        self.rewards: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ends.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def collect(self, trainer) -> None:
        """The finished step's logged means: Lightning moves a step's logs into callback_metrics only after
        its on_train_batch_end, so they are read at the next step's start and at the end of training."""
        if len(self.tokens) < len(self.ends):
            m = trainer.callback_metrics
            self.tokens.append(float(m["train/response_length"]) * self.responses)
            self.rewards.append(float(m["train/reward"]))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.collect(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self.collect(trainer)
        Path(self.out).write_text(json.dumps({"ends": self.ends, "cpu": self.cpu, "tokens": self.tokens,
                                              "rewards": self.rewards}))


def run_ours(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    cfg = yaml.safe_load(CONFIG.read_text())
    clock = work / "ours_clock.json"
    cfg["trainer"]["callbacks"].append({"class_path": "benchmarks.rl_bench.RolloutClock",
                                        "init_args": {"out": str(clock), "responses": responses_per_step(cfg)}})
    task = Path(a.task).resolve()
    cfg["data"].update(data=str(task / "post.jsonl"), val_data=str(task / "val.jsonl"),
                       tokenizer=str(Path(a.tokenizer).resolve()))
    cfg.update(run_dir=str(work / "ours"), wandb=False, init_from=str(Path(a.sft).resolve()),
               val_every=0, checkpoint_every=0)
    cfg["trainer"]["max_steps"] = a.steps  # ppo_epochs = num_minibatches = 1: one optimizer step per rollout
    cfg["model"]["guide"] = False  # TRL's GRPOTrainer has no off-policy guidance: plain GRPO on both sides
    path = work / "ours.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    subprocess.run([sys.executable, "-m", "recipes.rl", "--config", str(path)], cwd=ROOT, env=bench_env(),
                   check=True, stdout=subprocess.DEVNULL)
    return {"clock": json.loads(clock.read_text()), "checkpoint": str(work / "ours" / "checkpoints" / "last.ckpt")}


# ---- TRL -----------------------------------------------------------------------------------------
def grpo_args(out: str, steps: int):
    """GRPOConfig with the settings of rl-tiny-cpu.yaml (see the module docstring), and that yaml."""
    from trl import GRPOConfig

    cfg = yaml.safe_load(CONFIG.read_text())
    m, d = cfg["model"], cfg["data"]
    args = GRPOConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=responses_per_step(cfg),
                      num_generations=m["group_size"], gradient_accumulation_steps=1, num_iterations=m["ppo_epochs"],
                      max_completion_length=m["max_new_tokens"], temperature=m["temperature"], top_p=1.0, top_k=0,
                      beta=m["kl_coef"], epsilon=m["clip_eps"], loss_type="dapo", scale_rewards="group",
                      learning_rate=m["lr"], lr_scheduler_type="constant", warmup_steps=0,
                      weight_decay=m["weight_decay"], adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8,
                      max_grad_norm=m["gradient_clip_val"], gradient_checkpointing=False,
                      model_init_kwargs={"dtype": "float32", "attn_implementation": "sdpa"},
                      use_cpu=True, report_to=[], save_strategy="no", logging_steps=10, seed=cfg["seed_everything"],
                      data_seed=d["seed"], dataloader_num_workers=0, bf16=False, fp16=False, disable_tqdm=True)
    return args, cfg


def trl_reward(columns: list[str], tokens: list[int], rewards: list[float]) -> Callable[..., list[float]]:
    """gpt.demo_task.reward(row, reply) under TRL's reward_funcs signature (the dataset's columns arrive as
    lists in kwargs); appends each call's generated tokens and mean reward (one call per generation = per step)."""
    from gpt.demo_task import reward

    def demo_reward(prompts, completions, completion_ids, **kw) -> list[float]:
        out = [reward({c: kw[c][i] for c in columns}, completion[-1]["content"]) for i, completion in enumerate(completions)]
        tokens.append(sum(len(ids) for ids in completion_ids))
        rewards.append(sum(out) / len(out))
        return out

    return demo_reward


def trl_main(hf_dir: str, task: str, out: str, steps: int) -> None:
    """TRL's GRPOTrainer with the settings of rl-tiny-cpu.yaml (run in its own process)."""
    import datasets
    import transformers
    from trl import GRPOTrainer

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    args, _ = grpo_args(out, steps)
    rows = datasets.load_dataset("json", data_files=str(Path(task) / "post.jsonl"), split="train")
    columns = [c for c in rows.column_names if c != "messages"]
    # TRL's conversational prompt format: the conversation without its final (reference) assistant turn
    prompts = rows.map(lambda r: {"prompt": r["messages"][:-1]}).select_columns(["prompt", *columns])
    tokens: list[int] = []
    rewards: list[float] = []
    trainer = GRPOTrainer(model=hf_dir, reward_funcs=trl_reward(columns, tokens, rewards), args=args,
                          train_dataset=prompts)
    ends: list[float] = []
    cpu: list[float] = []
    trainer.add_callback(trl_step_clock(ends, cpu))
    trainer.train()
    trainer.save_model(out + "/model")
    Path(out, "clock.json").write_text(json.dumps({"ends": ends, "cpu": cpu, "tokens": tokens[:len(ends)],
                                                   "rewards": rewards[:len(ends)]}))


def run_trl(a: argparse.Namespace, hf_dir: Path, work: Path) -> dict[str, Any]:
    out = work / "trl"
    subprocess.run([sys.executable, "-m", "benchmarks.rl_bench", "--trl", str(hf_dir), "--task",
                    str(Path(a.task).resolve()), "--out", str(out), "--steps", str(a.steps)], cwd=ROOT,
                   env=bench_env(HF_DATASETS_CACHE=str(out / "datasets_cache"), TQDM_DISABLE="1"), check=True, stdout=subprocess.DEVNULL)
    return {"clock": json.loads((out / "clock.json").read_text()), "checkpoint": str(out / "model")}


# ---- report --------------------------------------------------------------------------------------
def speed(clock: dict[str, Any], warmup: int) -> dict[str, float]:
    s = step_timing(clock["ends"], clock["cpu"], warmup)
    timed = clock["tokens"][warmup + 1:]
    wall = s["sec_per_step"] * s["steps_timed"]
    s.update(tokens_per_step=sum(timed) / len(timed), tokens_per_sec=sum(timed) / wall,
             tokens_per_cpu_sec=sum(timed) / (s["cpu_sec_per_step"] * s["steps_timed"]),
             reward_first=clock["rewards"][0], reward_last=sum(clock["rewards"][-5:]) / len(clock["rewards"][-5:]))
    return s


def report(results: dict[str, dict[str, Any]], sft_em: dict[str, Any], a: argparse.Namespace, load: str) -> str:
    rows = [[name, a.steps, f"{r['speed']['sec_per_step']:.2f}", f"{r['speed']['cpu_sec_per_step']:.2f}",
             f"{r['speed']['tokens_per_sec']:.0f}", f"{r['speed']['tokens_per_step']:.0f}",
             f"{r['speed']['reward_first']:.2f} -> {r['speed']['reward_last']:.2f}",
             f"{100 * r['em']['exact_match']:.1f}%"] for name, r in results.items()]
    rows.append(["SFT model (before RL)", 0, "", "", "", "", "", f"{100 * sft_em['exact_match']:.1f}%"])
    ours, trl = (r["speed"] for r in results.values())
    cfg = yaml.safe_load(CONFIG.read_text())
    m, prompts = cfg["model"], cfg["data"]["micro_batch_size"]
    return ("## RL (GRPO): recipes/rl.py vs TRL GRPOTrainer\n\n" + environment() + "\n"
            f"`python -m benchmarks.rl_bench --sft {a.sft} --tokenizer {a.tokenizer} --task {a.task} --steps {a.steps}` "
            "on the demo's SFT model and task prompts (see its "
            f"docstring for the settings): {prompts} prompts x {m['group_size']} responses of at most "
            f"{m['max_new_tokens']} tokens per step, reward = "
            f"gpt.demo_task.reward (exact match), kl {m['kl_coef']:g}, lr {m['lr']:g}. Timed: steps {a.warmup + 1}-{a.steps}, wall clock "
            "and the process's CPU time (all its threads; the wall clock also counts other jobs on the shared "
            f"machine: {load} at the start). Tokens = generated response tokens incl. end-of-turn. Reward: step 1's "
            "mean -> the mean of the last 5 steps. Exact-match: the first "
            f"{a.eval_rows} held-out task rows through gpt.evaluate (greedy, 24 new tokens). TRL 1.16 ships no "
            "PPOTrainer, so PPO is not compared.\n\n"
            + markdown_table(["", "steps", "s/step", "CPU s/step", "generated tokens/s", "tokens/step",
                              "train reward", "held-out exact-match"], rows)
            + f"\nOurs / TRL: {trl['sec_per_step'] / ours['sec_per_step']:.2f}x faster per step wall clock, "
            f"{trl['cpu_sec_per_step'] / ours['cpu_sec_per_step']:.2f}x in CPU time per step.\n")


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sft", default="runs/demo/sft/checkpoints/last.ckpt", help="the SFT checkpoint both start from")
    ap.add_argument("--tokenizer", default="runs/demo/tokenizer.json")
    ap.add_argument("--task", default="runs/demo/task", help="the demo task: post.jsonl (RL prompts), val.jsonl (held out)")
    ap.add_argument("--steps", type=int, default=30, help="rollouts = optimizer steps for both")
    ap.add_argument("--warmup", type=int, default=3, help="steps left out of the timing")
    ap.add_argument("--eval_rows", type=int, default=300)
    ap.add_argument("--no-write", dest="write", action="store_false", help="print the table only")
    ap.add_argument("--trl", help=argparse.SUPPRESS)  # internal: run the TRL side in this process
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.trl:
        trl_main(a.trl, a.task, a.out, a.steps)
        return
    for need in (a.sft, a.tokenizer, Path(a.task) / "post.jsonl", Path(a.task) / "val.jsonl"):
        if not Path(need).exists():
            sys.exit(f"error: {need} not found: run `make demo` first (it writes the SFT model and the task), "
                     "or pass --sft/--tokenizer/--task")
    if a.steps <= a.warmup + 1:
        sys.exit(f"error: --steps must exceed --warmup + 1 = {a.warmup + 1} to time any step")
    load = load_level()
    val = Path(a.task) / "val.jsonl"
    with tempfile.TemporaryDirectory(prefix="rl_bench_") as tmp:
        work = Path(tmp)
        hf_dir = export_for_hf(a.sft, work / "hf")  # what `gpt export --format hf` writes
        results = {}
        for name, fn in (("gpt-pipeline (recipes/rl.py, GRPO)", lambda: run_ours(a, work)),
                         ("TRL GRPOTrainer", lambda: run_trl(a, hf_dir, work))):
            r = fn()
            r["speed"] = speed(r["clock"], a.warmup)
            r["em"] = exact_match_of(r["checkpoint"], val, a.eval_rows)
            results[name] = r
            print(name, json.dumps(r["speed"]), f"exact-match {r['em']['exact_match']:.3f}", flush=True)
        sft_em = exact_match_of(a.sft, val, a.eval_rows)
    body = report(results, sft_em, a, load)
    print(body)
    if a.write:
        write_section("rl", body)


if __name__ == "__main__":
    main()
