"""Probe: a reward model's held-out pair accuracy per demo-task family and per kind of rejected reply.

    python scripts/pair_accuracy_by_family.py --checkpoint runs/demo/reward/checkpoints/last.ckpt \
        --pairs runs/demo/pairs_src/val.jsonl

Reads data_prep.make_demo_pairs' JSONL (prompt / chosen / rejected message lists plus `family` and
`rejected_source`), scores chosen and rejected with the reward model (gpt.reward, the chat
template), and prints the share ranked right per family and per rejected source (sampled from
the policy, or a synthetic hard negative) and per system prompt (or none). Used for docs/LOG.md
2026-11-29 (night, and the fourth session).
"""
from __future__ import annotations

import argparse
import collections
import json

from gpt.reward import load_reward_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--pairs", default="runs/demo/pairs_src/val.jsonl")
    a = ap.parse_args()
    with open(a.pairs, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    model, tok = load_reward_model(a.checkpoint)
    model.eval()
    prompts = [r["prompt"] for r in rows]
    chosen = model.score_texts(tok, prompts, [r["chosen"][-1]["content"] for r in rows], batch_size=64)
    rejected = model.score_texts(tok, prompts, [r["rejected"][-1]["content"] for r in rows], batch_size=64)
    right = collections.defaultdict(list)
    for r, c, x in zip(rows, chosen, rejected):
        first = r["prompt"][0]
        system = f"system {first['content'][:40]}" if first["role"] == "system" else "system (none)"
        for key in ("all", f"family {r.get('family', '?')}", f"rejected {r.get('rejected_source', '?')}", system):
            right[key].append(c > x)
    for key, hits in sorted(right.items()):
        print(f"{key:28s} {sum(hits) / len(hits):.3f}  (n={len(hits)})")


if __name__ == "__main__":
    main()
