"""SFT packing benchmark: packed vs padded training throughput on the demo task, tiny-cpu model shape.

    python -m benchmarks.sft_packing_bench              # a few minutes on 2 cores; writes "sft_packing" in BENCHMARKS.md
    python -m benchmarks.sft_packing_bench --steps 5 --no-write   # a quick check of the script

Data: the demo task (data_prep.make_demo_task, 4000 train conversations, seed 0) rendered by
data_prep.make_sft with block_size 256 and the demo tokenizer (runs/demo/tokenizer.json, trained
from the embedded Shakespeare as scripts/demo.sh does when it is absent). Model: the shape of
recipes/configs/tiny-cpu.yaml (GPT-2 flavour, 4 layers, 4 heads, 192 wide, vocab 4096, block 256),
fp32, AdamW, torch on 2 threads, from the same initial weights in every row.

Each row runs `steps` optimizer steps (after 3 untimed ones) of forward, backward and AdamW on
batches from gpt.sft_data (SFTRows + SFTCollator: the datasets and collator SFTDataModule serves,
in its sample order), batch building included in the time:
  packed      8 rows of up to 257 tokens, several conversations each, block-causal attn_mask
  padded      8 conversations, right-padded to the longest of the micro-batch, plain causal kernel
  padded, xM  as many conversations per step as a packed step holds on average (same work per step)
Reported: conversations/s, supervised tokens/s (labels != -100: what SFT learns from), real
tokens/s (input tokens that are not padding), the share of computed positions that are padding,
and ms per step.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from benchmarks.common import environment, markdown_table, write_section

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "runs" / "demo" / "tokenizer.json"
CONFIG = ROOT / "recipes" / "configs" / "tiny-cpu.yaml"
BLOCK = 256


def prepare(work: Path, train_rows: int) -> Path:
    """The demo task rendered into an SFT directory; returns it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    py = [sys.executable, "-m"]
    if not TOKENIZER.is_file():
        subprocess.run(py + ["data_prep.train_tokenizer", "--source", "data/shakespeare.jsonl.gz", "--vocab_size",
                             "4096", "--out", str(TOKENIZER)], cwd=ROOT, env=env, check=True)
    subprocess.run(py + ["data_prep.make_demo_task", "--out", str(work / "task"), "--train", str(train_rows),
                         "--val", "0", "--seed", "0"], cwd=ROOT, env=env, check=True, capture_output=True)
    subprocess.run(py + ["data_prep.make_sft", "--source", str(work / "task" / "train.jsonl"), "--tokenizer",
                         str(TOKENIZER), "--out", str(work / "sft"), "--block_size", str(BLOCK), "--val_fraction", "0",
                         "--progress", "false"], cwd=ROOT, env=env, check=True, capture_output=True)
    return work / "sft"


def time_row(data: Path, packing: bool, micro_batch: int, steps: int, warmup: int = 3) -> dict[str, float]:
    from gpt.config import GPTConfig
    from gpt.model import GPT
    from gpt.objectives import causal_lm_loss
    from gpt.shards import ExampleShards
    from gpt.sft_data import SFTCollator, SFTRows, pad_id_of
    from gpt.tokenizer import Tokenizer

    cfg = yaml.safe_load(CONFIG.read_text())["model"]
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset(cfg["preset"], **cfg["model_config"]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    examples = ExampleShards(data, "train", "sft", tokenizer=Tokenizer.from_file(TOKENIZER))
    rows = SFTRows(examples, BLOCK, pack=packing, seed=0)
    rows.set_global_batch(micro_batch)
    collate = SFTCollator(pad_id_of(examples.manifest), attn_mask=packing)
    counts = np.zeros(4)  # conversations, supervised tokens, real tokens, positions
    t0 = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            t0 = time.perf_counter()
        idx = range(step * micro_batch, (step + 1) * micro_batch)
        batch = collate([rows[i] for i in idx])
        kw = {k: batch[k] for k in ("position_ids", "attn_mask") if k in batch}
        loss_sum, n = causal_lm_loss(model(batch["input_ids"], **kw), batch["labels"])
        (loss_sum / batch["num_targets_global"]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= warmup:
            convs = sum(len(rows.plan.row(rows.row_of(i))) for i in idx)
            counts += [convs, int(n), int((batch["segment_ids"] >= 0).sum()), batch["input_ids"].numel()]
    dt = time.perf_counter() - t0
    # the global counts the batches carry are what the loss saw
    assert counts[1] == sum(rows.targets_of_sample(i) for i in range(warmup * micro_batch, (warmup + steps) * micro_batch))
    return {"conv/s": counts[0] / dt, "sup/s": counts[1] / dt, "tok/s": counts[2] / dt,
            "pad": 1 - counts[2] / counts[3], "ms/step": 1000 * dt / steps, "convs/step": counts[0] / steps,
            "fill": rows.plan.fill}


def run(steps: int, train_rows: int) -> str:
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare(Path(tmp), train_rows)
        packed = time_row(data, True, 8, steps)
        per_step = max(8, round(packed["convs/step"]))
        rows = [("packed, 8 rows", packed), ("padded, 8 conversations", time_row(data, False, 8, steps)),
                (f"padded, {per_step} conversations", time_row(data, False, per_step, steps))]
    table = markdown_table(
        ["batch per step", "conversations/s", "supervised tok/s", "real tok/s", "padding share", "ms/step"],
        [(name, f"{r['conv/s']:.0f}", f"{r['sup/s']:.0f}", f"{r['tok/s']:.0f}", f"{100 * r['pad']:.1f}%",
          f"{r['ms/step']:.0f}") for name, r in rows])
    base = rows[1][1]
    return ("## SFT packing\n\n" + environment() +
            f"\nDemo task ({train_rows} train conversations, mean {packed['convs/step'] / 8:.1f} per packed row, rows "
            f"{100 * packed['fill']:.1f}% full), tiny-cpu shape, fp32, 2 threads, {steps} timed steps per row; "
            "`python -m benchmarks.sft_packing_bench`.\n\n" + table +
            f"\nPacked vs padded at the same 8 rows: {packed['sup/s'] / base['sup/s']:.2f}x supervised tokens/s; "
            f"vs padded at the same conversations per step: {packed['sup/s'] / rows[2][1]['sup/s']:.2f}x.\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40, help="timed optimizer steps per row")
    p.add_argument("--train", type=int, default=4000, help="demo task conversations")
    p.add_argument("--no-write", dest="write", action="store_false", help="print, do not update BENCHMARKS.md")
    args = p.parse_args()
    body = run(args.steps, args.train)
    print(body)
    if args.write:
        write_section("sft_packing", body)


if __name__ == "__main__":
    main()
