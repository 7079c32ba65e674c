"""What publishing ZeRO checkpoints whole costs: save time in place vs atomic, and the checks before a load.

    python -m benchmarks.zero_checkpoint_bench            # ~5 min on 2 cores; writes "zero-checkpoint" in BENCHMARKS.md
    python -m benchmarks.zero_checkpoint_bench --steps 4  # a quick check of the script

Two runs of the real recipe (2 gloo ranks, ZeRO-2 and ZeRO-3, fp32) on random tokens with a GPT of
~9 M parameters (a ~140 MB checkpoint directory: fp32 weights + Adam), saving every 2 steps (periodic
+ last.ckpt, so every second save replaces a directory). Each save is timed on rank 0 around
`strategy.save_checkpoint` (all ranks, from the first barrier to the last): "in place" is Lightning's
DeepSpeedStrategy.save_checkpoint (what gpt.zero did before), "atomic" is ZeroStrategy's (staging
directory, stamps, fsync of every file, manifest, rename, deletion of the replaced copy). The
in-place writes are not fsynced, so part of the difference is durability the in-place path never
had. Then, on the run's last.ckpt: `gpt.zero_checkpoint.verify` (what resume, load_consolidated and
find_resume_checkpoint run first) and find_resume_checkpoint on the whole directory.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import yaml
from lightning.pytorch.strategies import DeepSpeedStrategy

from benchmarks.common import environment, markdown_table, write_section
from gpt.zero import ZeroStrategy
from tests.pretrain_fixtures import ROOT, recipe_cmd, recipe_env, write_config, write_random_shards

MODEL = {"n_layer": 4, "n_head": 6, "n_embd": 384, "block_size": 64}
VOCAB = 4096


class TimedZeroStrategy(ZeroStrategy):
    """ZeroStrategy whose saves are timed into a JSON-lines file; in_place=True saves the old way."""

    def __init__(self, *args: Any, timings: str = "", in_place: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.timings, self.in_place = timings, in_place

    def save_checkpoint(self, checkpoint: dict, filepath: Any, storage_options: Optional[Any] = None) -> None:
        self.barrier("bench.start")
        t0 = time.perf_counter()
        if self.in_place:
            DeepSpeedStrategy.save_checkpoint(self, checkpoint, filepath, storage_options)
        else:
            super().save_checkpoint(checkpoint, filepath, storage_options)
        self.barrier("bench.end")
        if self.is_global_zero:
            with open(self.timings, "a") as f:
                f.write(json.dumps({"path": str(filepath), "seconds": time.perf_counter() - t0}) + "\n")


def _run(tmp: Path, shards: Path, stage: str, in_place: bool, steps: int) -> tuple[list[float], Path]:
    name = f"{stage}-{'inplace' if in_place else 'atomic'}"
    run_dir, timings = tmp / name, tmp / f"{name}.jsonl"
    cfg_path = write_config(tmp / f"{name}.yaml", run_dir, shards, devices=2, max_steps=steps, every_n_train_steps=2,
                            model=MODEL, vocab_size=VOCAB)
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["trainer"]["strategy"] = {"class_path": "benchmarks.zero_checkpoint_bench.TimedZeroStrategy",
                                  "init_args": {"config": str(ROOT / "recipes" / "deepspeed" / f"{stage}.json"),
                                                "timings": str(timings), "in_place": in_place}}
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    p = subprocess.run(recipe_cmd(cfg_path), cwd=ROOT, env=recipe_env(), capture_output=True, text=True, timeout=1800)
    if p.returncode:
        sys.exit(f"{name} failed:\n{p.stderr[-3000:]}")
    return [json.loads(line)["seconds"] for line in timings.read_text().splitlines()], run_dir / "checkpoints"


def _timed(fn: Any, repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(steps: int = 12, write: bool = True) -> str:
    from gpt.resume import find_resume_checkpoint
    from gpt.zero_checkpoint import verify

    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        shards = write_random_shards(tmp / "shards", train_tokens=60_000, vocab_size=VOCAB)
        for stage in ("zero2", "zero3"):
            old, _ = _run(tmp, shards, stage, True, steps)
            new, ckpts = _run(tmp, shards, stage, False, steps)
            size = sum(f.stat().st_size for f in (ckpts / "last.ckpt").rglob("*") if f.is_file())
            rows.append([stage, f"{size / 1e6:.0f} MB", len(new), f"{statistics.median(old):.2f} s",
                         f"{statistics.median(new):.2f} s", f"{statistics.median(new) - statistics.median(old):+.2f} s",
                         f"{_timed(lambda: verify(ckpts / 'last.ckpt')) * 1e3:.0f} ms",
                         f"{_timed(lambda: find_resume_checkpoint(ckpts)) * 1e3:.0f} ms"])
    table = markdown_table(["stage", "checkpoint", "saves", "save in place (median)", "save atomic (median)",
                            "difference", "verify last.ckpt", "find_resume_checkpoint"], rows)
    body = ("## ZeRO checkpoints: atomic publish and checks\n\n" + environment() +
            f"\n`python -m benchmarks.zero_checkpoint_bench` (2 gloo ranks, fp32, GPT {MODEL['n_layer']} layers x "
            f"{MODEL['n_embd']} wide, vocab {VOCAB}, a save every 2 steps over {steps} steps; verify and "
            f"find_resume_checkpoint: best of 5):\n\n" + table)
    if write:
        write_section("zero-checkpoint", body)
    return body


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--no-write", action="store_true", help="print the table, leave BENCHMARKS.md alone")
    a = ap.parse_args()
    print(main(a.steps, write=not a.no_write))
