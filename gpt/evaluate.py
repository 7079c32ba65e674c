"""Exact-match evaluation of a chat model on demo-task rows, through the real generation path.

    from gpt.evaluate import exact_match, generate_replies
    from gpt.demo_task import make_rows
    result = exact_match(model, tokenizer, make_rows(300, "val"), max_new_tokens=32)
    result["exact_match"], result["per_family"]["add"], result["ended"], result["truncated"]

    python -m gpt.evaluate --checkpoint runs/demo/sft/checkpoints/last.ckpt --n 300 [--json em.json]

Each row's prompt is `ChatTemplate.render_prompt` of its messages without the final answer;
replies come from `gpt.generate.generate` (KV cache, prompts batched with left padding, stop at
`<|end|>`); a reply is scored by `gpt.demo_task.check`. Prompts are batched in order of length
so a batch holds little padding; results come back in the rows' order. A reply that emits
`<|endoftext|>` before `<|end|>` is cut there and counted under "eot" (the template's other
stop token: same text as stopping there); one that reaches max_new_tokens is "truncated".
"""
from __future__ import annotations

import sys
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Literal, Optional, Sequence

import torch

from gpt.chat import ChatTemplate
from gpt.demo_task import check, prompt_messages
from gpt.generate import generate
from gpt.model import GPT

Stop = Literal["end", "eot", "limit"]


@dataclass
class Reply:
    text: str
    ids: list[int]  # the reply's tokens, without the stop token
    stop: Stop      # "end": ended its turn; "eot": emitted end-of-text; "limit": ran to max_new_tokens


def generate_replies(model: GPT, tokenizer: Any, conversations: Sequence[Sequence[dict]], *,
                     max_new_tokens: int = 32, batch_size: int = 64, temperature: float = 0.0,
                     top_k: Optional[int] = None, top_p: Optional[float] = None,
                     seed: Optional[int] = None) -> list[Reply]:
    """The model's next assistant turn for each conversation (each ends with a user turn)."""
    template = ChatTemplate(tokenizer)
    prompts = [template.render_prompt(c) for c in conversations]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    replies: list[Optional[Reply]] = [None] * len(prompts)
    was_training = model.training
    model.eval()  # no dropout while sampling
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            outs = generate(model, [prompts[i] for i in idx], max_new_tokens, temperature=temperature,
                            top_k=top_k, top_p=top_p, seed=None if seed is None else seed + start,
                            stop_ids=[template.end_id])
            for i, ids in zip(idx, outs):
                replies[i] = _reply(tokenizer, template, ids, max_new_tokens)
    finally:
        model.train(was_training)
    return replies  # type: ignore[return-value]


def _reply(tokenizer: Any, template: ChatTemplate, ids: list[int], max_new_tokens: int) -> Reply:
    if template.eot_id in ids:
        ids = ids[:ids.index(template.eot_id)]
        stop: Stop = "eot"
    else:
        stop = "limit" if len(ids) >= max_new_tokens else "end"
    return Reply(tokenizer.decode(ids), ids, stop)


def exact_match(model: GPT, tokenizer: Any, rows: Sequence[dict], *, max_new_tokens: int = 32,
                batch_size: int = 64, temperature: float = 0.0, seed: Optional[int] = None) -> dict[str, Any]:
    """Share of rows answered exactly (gpt.demo_task.check), overall and per family.

    Returns {"exact_match", "n", "ended", "eot", "truncated", "per_family": {family:
    {"exact_match", "n"}}, "replies": [text per row]}; "ended" is the share of replies that
    ended with <|end|>, "truncated" the share that ran to max_new_tokens.
    """
    if not rows:
        raise ValueError("exact_match: no rows to evaluate")
    replies = generate_replies(model, tokenizer, [prompt_messages(r) for r in rows], max_new_tokens=max_new_tokens,
                               batch_size=batch_size, temperature=temperature, seed=seed)
    hits = [check(r, rep.text) for r, rep in zip(rows, replies)]
    by_family: dict[str, list[bool]] = defaultdict(list)
    for r, hit in zip(rows, hits):
        by_family[r.get("family", "all")].append(hit)
    n = len(rows)
    stops = [rep.stop for rep in replies]
    return {"exact_match": sum(hits) / n, "n": n,
            "ended": stops.count("end") / n, "eot": stops.count("eot") / n, "truncated": stops.count("limit") / n,
            "per_family": {f: {"exact_match": sum(h) / len(h), "n": len(h)} for f, h in sorted(by_family.items())},
            "replies": [rep.text for rep in replies]}


def format_result(result: dict[str, Any]) -> str:
    """One line overall, one per family: what the demo prints."""
    lines = [f"exact-match {100 * result['exact_match']:.1f}% of {result['n']} "
             f"(ended its turn {100 * result['ended']:.0f}%, ran to the limit {100 * result['truncated']:.0f}%)"]
    lines += [f"  {f:<12} {100 * v['exact_match']:5.1f}%  (n={v['n']})" for f, v in result["per_family"].items()]
    return "\n".join(lines)


def main(checkpoint: str, n: int = 300, split: Literal["train", "val"] = "val", seed: int = 0,
         max_new_tokens: int = 32, batch_size: int = 64, device: str = "cpu",
         json: Optional[str] = None) -> dict[str, Any]:
    """Exact-match of a checkpoint on n demo-task rows of a split.

    Args:
        checkpoint: any checkpoint gpt.checkpoint.load_model reads (it must carry its tokenizer).
        n: rows to evaluate (families in turn).
        split: "val" = held-out phrasings and values.
        seed: the demo task's seed.
        max_new_tokens: reply length limit.
        batch_size: prompts per generate call.
        device: where the model runs.
        json: also write the result (with the checkpoint, split, n and seed) to this JSON file, atomically.
    """
    from gpt.checkpoint import CheckpointError, load_model, refuse_reward_model
    from gpt.demo_task import make_rows

    try:
        refuse_reward_model(checkpoint, checkpoint, "exact match is measured on a language model's replies")
        model, tokenizer = load_model(checkpoint, device=device)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if tokenizer is None:
        print(f"error: {checkpoint}: no tokenizer stored with this checkpoint", file=sys.stderr)
        sys.exit(1)
    with torch.no_grad():
        result = exact_match(model, tokenizer, make_rows(n, split, seed), max_new_tokens=max_new_tokens,
                             batch_size=batch_size)
    print(format_result(result))
    if json:
        from gpt.lm_eval import write_json

        write_json({"checkpoint": checkpoint, "split": split, "seed": seed, **result}, json)
    return result


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
