"""Probe: a chat model's exact match per demo-task family, greedy and sampled (pass@k), on any split.

    python scripts/exact_match_by_family.py --checkpoint runs/demo/sft/checkpoints/last.ckpt --split val
    python scripts/exact_match_by_family.py --checkpoint CKPT --split train --seed 7 --samples 8
    python scripts/exact_match_by_family.py --checkpoint CKPT --rows runs/demo/task/post.jsonl
    python scripts/exact_match_by_family.py --checkpoint CKPT --by_system     # per system prompt, and without it

Rows come from gpt.demo_task.make_rows(n, split, seed) (or the first n rows of a JSONL file);
replies from gpt.evaluate (the chat template, the KV-cache generator): greedy exact match per
family, then, with --samples k > 0, the mean accuracy of k replies sampled at temperature 1 and
pass@k (the share of rows with at least one right reply: what RL could sharpen toward). Used for
docs/LOG.md 2026-11-29 (evening, second session). With --by_system: exact match per system prompt
(or none), and the same rows asked again without their system turn (docs/LOG.md, fourth session).
"""
from __future__ import annotations

import argparse
import collections
import json

from gpt.checkpoint import load_model
from gpt.demo_task import check, make_rows, prompt_messages
from gpt.evaluate import exact_match, format_result, generate_replies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--split", default="val", choices=["train", "val", "post"])
    ap.add_argument("--seed", type=int, default=0, help="seed of the generated rows (0: the demo's files)")
    ap.add_argument("--rows", help="a JSONL file of task rows instead of generated ones")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--samples", type=int, default=0, help="k replies at temperature 1 per row (0: greedy only)")
    ap.add_argument("--by_system", action="store_true", help="per system prompt, and again without the system turn")
    a = ap.parse_args()
    if a.rows:
        with open(a.rows, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()][:a.n]
    else:
        rows = make_rows(a.n, a.split, a.seed)
    model, tok = load_model(a.checkpoint)
    result = exact_match(model, tok, rows, max_new_tokens=16)
    print(format_result(result))
    if a.by_system:
        by_system(model, tok, rows, [check(r, t) for r, t in zip(rows, result["replies"])])
    if a.samples <= 0:
        return
    right = [[] for _ in rows]
    for s in range(a.samples):
        replies = generate_replies(model, tok, [prompt_messages(r) for r in rows], max_new_tokens=16,
                                   temperature=1.0, seed=1000 * s)
        for hits, row, reply in zip(right, rows, replies):
            hits.append(check(row, reply.text))
    by_family = collections.defaultdict(list)
    for row, hits in zip(rows, right):
        by_family[row["family"]].append((sum(hits) / len(hits), any(hits)))
    every = [v for vs in by_family.values() for v in vs]
    print(f"T=1: mean accuracy {sum(m for m, _ in every) / len(every):.3f}, pass@{a.samples} "
          f"{sum(p for _, p in every) / len(every):.3f}")
    for f, vs in sorted(by_family.items()):
        print(f"  {f:<12} accuracy {sum(m for m, _ in vs) / len(vs):.3f}  pass@{a.samples} {sum(p for _, p in vs) / len(vs):.3f}")


def by_system(model, tok, rows: list[dict], hits: list[bool]) -> None:
    """Exact match per system prompt; the rows that have one, asked again without it."""
    groups = collections.defaultdict(list)
    for i, row in enumerate(rows):
        first = row["messages"][0]
        groups[first["content"] if first["role"] == "system" else "(no system turn)"].append(i)
    for name, idx in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        print(f"  {sum(hits[i] for i in idx) / len(idx):6.1%}  (n={len(idx)})  {name}")
    with_system = [i for i, row in enumerate(rows) if row["messages"][0]["role"] == "system"]
    if with_system:
        bare = [{**rows[i], "messages": rows[i]["messages"][1:]} for i in with_system]
        again = exact_match(model, tok, bare, max_new_tokens=16)["exact_match"]
        print(f"rows with a system turn: {sum(hits[i] for i in with_system) / len(with_system):.1%} as asked, "
              f"{again:.1%} without it (n={len(with_system)})")


if __name__ == "__main__":
    main()
