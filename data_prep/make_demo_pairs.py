"""On-policy preference pairs for the demo task: sample the SFT model, label with the checker, pair.

    python -m data_prep.make_demo_pairs --checkpoint runs/demo/sft/checkpoints/last.ckpt \\
        --out runs/demo/pairs_src --val_file runs/demo/task/val.jsonl --train_prompts 600 --val_prompts 100
    python -m data_prep.make_sft --kind pairs --source runs/demo/pairs_src/train.jsonl \\
        --val_source runs/demo/pairs_src/val.jsonl --tokenizer runs/demo/tokenizer.json --out runs/demo/pairs

For each prompt (a demo-task row without its answer, gpt.demo_task) the SFT model answers
`samples` times at `temperature` through the real generator (gpt.evaluate.generate_replies:
the chat template, batched KV-cache decoding, stop at <|end|>), each reply is labelled by the
task's checker (gpt.demo_task.check), and up to `pairs_per_prompt` pairs are formed:
  chosen   = a sampled correct reply; when the model gave none, the reference answer;
  rejected = a sampled wrong reply; when the model gave none, a synthetic hard negative:
             off_by_one (a number +-1, a list one word short, the neighbouring word), wrong_value
             (the right format with another value: the other number, the words in another order,
             another word) or no_answer (a reply without the value).
Every kind is counted in DIR/summary.json and printed. A reply holding a control token as text
(the model emitted <|user|>, say) cannot be a chat turn: it is counted and left out.

Prompts. Training pairs come from the task's "post" split with `seed` (`--train_split post`:
training values in phrasings that neither the SFT data nor the evaluation uses, so the pairs
teach on questions whose answers SFT never showed; `--train_split train` asks in the SFT data's
own phrasings, which the SFT model has memorized), checked against the held-out evaluation file `--val_file`: a train prompt whose value key or prompt text occurs there
is dropped and counted (by the task's construction none should). Validation pairs come from the
val split (held-out phrasings and values): they measure a reward model or DPO on what neither
trained on, and are never trained on. With --dev_prompts, DIR/dev.jsonl holds pairs from the dev
split (held-out values, phrasings of its own): the pairs a reward model or DPO validates on while it
trains, so that the val pairs are read once, at the end (`gpt score --pairs`).

Output (each file written to a temporary name and renamed): DIR/train.jsonl and DIR/val.jsonl
in TRL's explicit-prompt conversational format, which data_prep.make_sft --kind pairs reads:
    {"prompt": [{"role": "user", "content": "What is 12 + 7?"}], "chosen": [{"role": "assistant",
     "content": "19"}], "rejected": [{"role": "assistant", "content": "18"}], "family": "add",
     "chosen_source": "sampled", "rejected_source": "off_by_one", "key": "add|12|7"}
"""
from __future__ import annotations

import json
import random
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

from data_prep.make_demo_task import write_jsonl
from gpt.demo_task import WORDS, check, make_rows, normalize, prompt_messages
from gpt.tokenizer import SPECIAL_TOKENS

NO_ANSWERS = ("I don't know.", "I am not sure.", "I cannot answer that.", "Let me think about it.")
SYNTHETIC = ("off_by_one", "wrong_value", "no_answer")


# ---- synthetic hard negatives -----------------------------------------------------------
def _int(text: str) -> Optional[int]:
    return int(text) if text.lstrip("-").isdigit() else None


def hard_negatives(row: dict) -> dict[str, list[str]]:
    """Wrong replies of each synthetic kind for a demo-task row (every one fails `check`)."""
    answer, key = row["answer"], row["key"]
    n = _int(answer)
    out: dict[str, list[str]] = {"off_by_one": [], "wrong_value": [], "no_answer": list(NO_ANSWERS)}
    if n is not None:
        out["off_by_one"] = [str(v) for v in (n - 1, n + 1) if v >= 0]
        parts = key.split("|")
        if parts[0] == "pair":  # compare / followup: the other number of the question
            out["wrong_value"] = [p for p in parts[1:] if p != answer]
        elif parts[0] == "table":  # lookup: another value of the table
            out["wrong_value"] = sorted({v.split(": ")[1] for v in parts[1].split(", ")} - {answer})
        elif parts[0] == "add":  # an addend, or the difference
            a, b = int(parts[1]), int(parts[2])
            out["wrong_value"] = [str(v) for v in (a, b, abs(a - b), n + 10) if abs(v - n) > 1]
        out["wrong_value"] = out["wrong_value"] or [str(n + 2 + d) for d in range(3)]
    else:
        words = answer.split()
        question = key.split("|", 1)[1].split() if key.startswith(("words|", "recall|")) else words
        if len(words) > 1:
            out["off_by_one"] = [" ".join(words[:-1]), " ".join(words[1:])]
            orders = {" ".join(question), " ".join(reversed(question)), " ".join(sorted(question)),
                      " ".join(words[1:] + words[:1])}
            out["wrong_value"] = sorted(orders - {answer})
        else:
            near = [question[i + d] for i, w in enumerate(question) if w == answer for d in (-1, 1)
                    if 0 <= i + d < len(question)]
            out["off_by_one"] = near
            others = [w for w in (question if len(question) > 1 else WORDS) if w != answer]
            out["wrong_value"] = others
    return {k: [t for t in v if not check(row, t)] for k, v in out.items() if v}


def synthetic_negative(row: dict, rng: random.Random) -> tuple[str, str]:
    """(reply, kind): a hard negative of a kind drawn at random among those the row allows."""
    options = hard_negatives(row)
    kind = rng.choice([k for k in SYNTHETIC if options.get(k)])
    return rng.choice(options[kind]), kind


# ---- pairing ----------------------------------------------------------------------------
def pair_rows(rows: Sequence[dict], replies: Sequence[Sequence[str]], rng: random.Random,
              pairs_per_prompt: int = 1) -> tuple[list[dict], Counter]:
    """Preference rows from each prompt's sampled replies (see the module docstring), and the counts."""
    out = []
    counts = Counter({k: 0 for k in ("samples", "samples_correct", "prompts_all_correct", "prompts_none_correct",
                                     "samples_with_special_tokens", "chosen_sampled", "chosen_reference",
                                     "rejected_sampled",
                                     *(f"rejected_{k}" for k in SYNTHETIC))})
    for row, texts in zip(rows, replies):
        right, wrong = {}, {}
        for t in texts:  # distinct replies (after the checker's normalization), first spelling kept
            if any(s in t for s in SPECIAL_TOKENS):  # a control token the template refuses as text: never a turn
                counts["samples_with_special_tokens"] += 1
                continue
            (right if check(row, t) else wrong).setdefault(normalize(t), t)
        counts["samples"] += len(texts)
        counts["samples_correct"] += sum(check(row, t) for t in texts)
        counts["prompts_all_correct"] += not wrong and bool(right)
        counts["prompts_none_correct"] += not right
        chosen_pool = list(right.values()) or [row["answer"]]
        wrong_pool = [t for t in wrong.values() if t.strip()]  # an empty reply is no trainable turn
        rng.shuffle(chosen_pool)
        rng.shuffle(wrong_pool)
        for j in range(pairs_per_prompt):
            if j and j >= max(len(chosen_pool), len(wrong_pool)):
                break  # no new pair left for this prompt
            chosen = chosen_pool[j % len(chosen_pool)]
            chosen_source = "sampled" if right else "reference"
            if wrong_pool:
                rejected, rejected_source = wrong_pool[j % len(wrong_pool)], "sampled"
            else:
                rejected, rejected_source = synthetic_negative(row, rng)
            counts[f"chosen_{chosen_source}"] += 1
            counts[f"rejected_{rejected_source}"] += 1
            out.append({"prompt": prompt_messages(row), "chosen": [{"role": "assistant", "content": chosen}],
                        "rejected": [{"role": "assistant", "content": rejected}], "family": row["family"],
                        "chosen_source": chosen_source, "rejected_source": rejected_source, "key": row["key"]})
    counts["pairs"] = len(out)
    return out, counts


def held_out(val_file: str) -> tuple[set[str], set[str]]:
    """Value keys and prompt texts of the evaluation rows (a make_demo_task JSONL file)."""
    keys, prompts = set(), set()
    p = Path(val_file)
    if not p.is_file():
        raise ValueError(f"--val_file {p}: no such file (the held-out rows data_prep.make_demo_task writes)")
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompts.add(json.dumps(prompt_messages(row), sort_keys=True))
                if "key" in row:
                    keys.add(row["key"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{p}:{lineno}: not a demo-task row ({e})") from None
    return keys, prompts


def disjoint(rows: list[dict], keys: set[str], prompts: set[str]) -> tuple[list[dict], int]:
    kept = [r for r in rows if r["key"] not in keys and json.dumps(prompt_messages(r), sort_keys=True) not in prompts]
    return kept, len(rows) - len(kept)


# ---- the job ----------------------------------------------------------------------------
def make_demo_pairs(checkpoint: str, out: str, val_file: Optional[str] = None, train_prompts: int = 600,
                    val_prompts: int = 100, samples: int = 4, temperature: float = 1.0, top_k: Optional[int] = None,
                    max_new_tokens: int = 24, pairs_per_prompt: int = 1, seed: int = 1, batch_size: int = 128,
                    train_split: Literal["post", "train"] = "post", dev_prompts: int = 0,
                    device: str = "cpu") -> dict[str, Any]:
    """Sample, label and pair; write DIR/train.jsonl, DIR/val.jsonl, DIR/dev.jsonl (with --dev_prompts) and DIR/summary.json.

    Args:
        checkpoint: the SFT model (any checkpoint kind gpt.checkpoint.load_model reads, with its tokenizer).
        out: output directory (created).
        val_file: the held-out evaluation rows (data_prep.make_demo_task's val.jsonl): training
            prompts must not share a value key or a prompt with them.
        train_prompts: prompts of the task's `train_split` to sample for training pairs.
        val_prompts: prompts of the task's val split (held-out phrasings) for validation pairs.
        samples: replies sampled per prompt.
        temperature: sampling temperature (1.0: the model's own distribution, on-policy).
        top_k: sample among the k most likely tokens (None: all).
        max_new_tokens: reply length limit.
        pairs_per_prompt: most pairs made from one prompt (each with a different reply).
        seed: seed of the prompts (the task's rows), the sampling and the pairing.
        batch_size: prompts per generate call.
        train_split: the demo task's split of the training prompts: "post" (phrasings of their own)
            or "train" (the SFT data's phrasings).
        dev_prompts: prompts of the task's dev split (held-out values, phrasings of its own) for
            DIR/dev.jsonl: pairs to validate on while training, so that val.jsonl is read once.
        device: where the model runs.
    """
    import torch

    from gpt.checkpoint import load_model, refuse_reward_model
    from gpt.evaluate import generate_replies

    for name, v, low in (("--train_prompts", train_prompts, 1), ("--val_prompts", val_prompts, 0), ("--dev_prompts", dev_prompts, 0),
                         ("--samples", samples, 1), ("--pairs_per_prompt", pairs_per_prompt, 1),
                         ("--max_new_tokens", max_new_tokens, 1), ("--batch_size", batch_size, 1)):
        if v < low:
            raise ValueError(f"{name} must be >= {low}, got {v}")
    keys, prompts = held_out(val_file) if val_file else (set(), set())
    refuse_reward_model(checkpoint, f"--checkpoint {checkpoint}", "the pairs are the SFT model's own samples")
    model, tok = load_model(checkpoint, device=device)
    if tok is None:
        raise ValueError(f"{checkpoint}: holds no tokenizer (the chat template needs one)")
    rng = random.Random(seed)
    summary: dict[str, Any] = {"checkpoint": str(checkpoint), "train_split": train_split,
                               "samples_per_prompt": samples, "temperature": temperature,
                               "top_k": top_k, "seed": seed, "val_file": val_file, "splits": {}}
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train_prompts), ("val", val_prompts), ("dev", dev_prompts)):
        if split == "dev" and not n:
            continue
        rows = make_rows(n, train_split if split == "train" else split, seed)
        dropped = 0
        if split == "train":
            rows, dropped = disjoint(rows, keys, prompts)
        convs = [prompt_messages(r) for r in rows for _ in range(samples)]
        with torch.no_grad():
            replies = generate_replies(model, tok, convs, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                       temperature=temperature, top_k=top_k, seed=seed * 1000 + ("train", "val", "dev").index(split))
        texts = [[replies[i * samples + j].text for j in range(samples)] for i in range(len(rows))]
        pairs, counts = pair_rows(rows, texts, rng, pairs_per_prompt)
        counts["prompts"], counts["dropped_overlapping_val_file"] = len(rows), dropped
        counts["samples_truncated"] = sum(r.stop == "limit" for r in replies)
        write_jsonl(pairs, d / f"{split}.jsonl")
        summary["splits"][split] = dict(sorted(counts.items()))
    tmp = d / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    tmp.replace(d / "summary.json")
    print(format_summary(summary, d))
    return summary


def format_summary(summary: dict[str, Any], d: Path) -> str:
    lines = []
    for split, c in summary["splits"].items():
        acc = 100 * c.get("samples_correct", 0) / max(1, c.get("samples", 0))
        synthetic = ", ".join(f"{k} {c.get('rejected_' + k, 0)}" for k in SYNTHETIC)
        lines.append(f"{d}/{split}.jsonl: {c['pairs']} pairs from {c['prompts']} prompts ({c.get('samples', 0)} samples, "
                     f"{acc:.1f}% correct); chosen sampled {c.get('chosen_sampled', 0)}, reference "
                     f"{c.get('chosen_reference', 0)}; rejected sampled {c.get('rejected_sampled', 0)}, synthetic: "
                     f"{synthetic}; dropped (in --val_file) {c.get('dropped_overlapping_val_file', 0)}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    from jsonargparse import CLI

    from gpt.checkpoint import CheckpointError

    try:
        CLI(make_demo_pairs, args=sys.argv[1:] if argv is None else argv, as_positional=False)
    except (ValueError, CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
