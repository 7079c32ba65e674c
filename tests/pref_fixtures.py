"""Fixtures for the preference-stage tests: demo-task pairs through the real pairs data prep, tiny modules, a Trainer.

    from tests.pref_fixtures import demo_pair_rows, write_pairs_dir, tiny_config, make_trainer, csv_metrics
    rows = demo_pair_rows(200, "train", seed=1)            # explicit-prompt pairs: answer vs hard negative
    pairs_dir = write_pairs_dir(tmp, tok_path, train=rows, val=demo_pair_rows(40, "val"))
"""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Any, Optional

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from data_prep.make_demo_pairs import pair_rows
from data_prep.make_sft import make_sft
from gpt.demo_task import make_rows

TINY = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 128}


def demo_pair_rows(n: int, split: str = "train", seed: int = 1, families: Optional[list[str]] = None) -> list[dict]:
    """Pairs of the demo task as make_demo_pairs writes them, for a model that never answers right:
    chosen = the reference answer, rejected = a sampled-looking wrong reply or a synthetic hard negative."""
    rows = make_rows(n, split, seed, families)  # type: ignore[arg-type]
    rng = random.Random(seed)
    wrong = [["I think it is " + r["answer"]] if i % 3 == 0 else [] for i, r in enumerate(rows)]
    pairs, _ = pair_rows(rows, wrong, rng)
    return pairs


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_pairs_dir(tmp: Path, tok_path: Path, train: list[dict], val: list[dict], block_size: int = 128) -> Path:
    """A pairs directory written by data_prep.make_sft --kind pairs (the real path)."""
    tmp.mkdir(parents=True, exist_ok=True)
    src, val_src = write_jsonl(tmp / "train.jsonl", train), write_jsonl(tmp / "val.jsonl", val)
    make_sft(str(src), str(tok_path), str(tmp / "pairs"), kind="pairs", val_source=str(val_src),
             block_size=block_size, progress=False)
    return tmp / "pairs"


def tiny_config(vocab_size: int, **over: Any) -> dict[str, Any]:
    return {**TINY, "vocab_size": vocab_size, **over}


def make_trainer(root: Path, max_steps: int, accumulate: int = 1, val_every: Optional[int] = None,
                 callbacks: Optional[list] = None, **kwargs: Any) -> L.Trainer:
    """A quiet single-process CPU Trainer writing CSV metrics (and checkpoints, when given a callback) under root."""
    return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, accumulate_grad_batches=accumulate,
                     val_check_interval=(val_every or max_steps) * accumulate, check_val_every_n_epoch=None,
                     num_sanity_val_steps=0, log_every_n_steps=1, use_distributed_sampler=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root),
                     logger=CSVLogger(str(root), name="csv"),
                     **{"enable_checkpointing": any(isinstance(c, ModelCheckpoint) for c in callbacks or []),
                        "callbacks": callbacks or [], **kwargs})


def csv_metrics(root: Path, key: str) -> dict[int, float]:
    """`key` by step from the CSVLogger files under root (every version, later ones overwrite)."""
    out: dict[int, float] = {}
    for v in sorted((root / "csv").glob("version_*"), key=lambda p: int(p.name.split("_")[1])):
        if not (v / "metrics.csv").is_file():  # a run that stopped before logging
            continue
        with open(v / "metrics.csv") as f:
            for row in csv.DictReader(f):
                if row.get(key) not in (None, ""):
                    out[int(row["step"])] = float(row[key])
    return out
