"""Write the verifiable demo task (gpt.demo_task) as JSONL files in TRL's conversational format.

    python -m data_prep.make_demo_task --out runs/demo/task --train 20000 --val 500 --post 5000 --dev 500 --seed 0

writes DIR/train.jsonl, DIR/val.jsonl, DIR/post.jsonl and DIR/dev.jsonl, one row per line:
    {"messages": [{"role": "user", "content": "What is the smaller number, 1 or 7?"}, {"role": "assistant", "content": "1"}],
     "family": "compare", "answer": "1", "split": "train", "template": "compare/7", "key": "pair|1|7"}
and prints the rows per family. "val" holds the held-out phrasings and values (the evaluation);
"post" the prompts of the preference pairs and RL: training values in phrasings no other file uses; "dev"
held-out values in phrasings of its own, for choosing settings without reading "val". Each file is
written to a temporary name and renamed, so an interrupted run never leaves a half file.
"""
from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Optional

from gpt.demo_task import FAMILIES, make_rows


def write_jsonl(rows: list[dict], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def make_demo_task(out: str, train: int = 20000, val: int = 500, post: int = 5000, dev: int = 500, seed: int = 0,
                   families: Optional[list[str]] = None) -> dict[str, Counter]:
    """Write DIR/train.jsonl, DIR/val.jsonl, DIR/post.jsonl and DIR/dev.jsonl; return the rows per family of each split.

    Args:
        out: output directory (created).
        train: rows in train.jsonl (training phrasings and values).
        val: rows in val.jsonl (held-out phrasings and values).
        post: rows in post.jsonl (training values, phrasings of their own: RL and preference prompts).
        dev: rows in dev.jsonl (held-out values, phrasings of their own: for tuning, so that val is read once).
        seed: the generator's seed; the same seed gives the same files.
        families: a subset of the families (default: all, in turn).
    """
    sizes = {"train": train, "val": val, "post": post, "dev": dev}
    for name, n in ((f"--{k}", v) for k, v in sizes.items()):
        if n < 0:
            raise ValueError(f"{name} must be >= 0, got {n}")
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, n in sizes.items():
        rows = make_rows(n, split, seed, families)  # type: ignore[arg-type]
        write_jsonl(rows, d / f"{split}.jsonl")
        counts[split] = Counter(r["family"] for r in rows)
    names = families or list(FAMILIES)
    print(f"wrote {d}/train.jsonl ({train} rows), {d}/val.jsonl ({val} rows), {d}/post.jsonl ({post} rows) and "
          f"{d}/dev.jsonl ({dev} rows), seed {seed}")
    for f in names:
        print(f"  {f:<12} train {counts['train'][f]:>6}  val {counts['val'][f]:>5}  post {counts['post'][f]:>5}  "
              f"dev {counts['dev'][f]:>5}")
    return counts


def main(argv: Optional[list[str]] = None) -> None:
    from jsonargparse import CLI

    try:
        CLI(make_demo_task, args=sys.argv[1:] if argv is None else argv, as_positional=False)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
