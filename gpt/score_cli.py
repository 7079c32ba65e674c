"""`gpt score`: a reward model's score of (prompt, response) pairs, from the command line or a JSONL file.

    gpt score --checkpoint runs/demo/reward/checkpoints/last.ckpt --prompt "What is 2 + 3?" --response "5"
    gpt score --checkpoint RM --input replies.jsonl --output scored.jsonl
    gpt score --checkpoint RM --pairs runs/demo/pairs_src/val.jsonl --json acc.json   # pair accuracy

Input rows (JSONL, one object per line) take one of TRL's shapes:
    {"prompt": "What is 2 + 3?", "response": "5"}                 (or "completion" for "response")
    {"prompt": [{"role": "user", "content": "..."}], "response": "5"}
    {"messages": [..., {"role": "assistant", "content": "5"}]}      (the last turn is the response)
and come back with a "score" field added (all other fields kept), in input order, to --output
(written to a temporary name and renamed) or stdout. A bad row is one `gpt: error: FILE:LINE: ...`
line and nothing is written. The rendering is the chat template's, as the reward model was trained
(gpt.reward.RewardModel.score_texts); the model is any checkpoint gpt.reward.load_reward_model reads.

--pairs FILE reads preference rows, {"prompt": text or messages, "chosen": ..., "rejected": ...}
(each reply a string or a message list ending in the assistant's turn: data_prep.make_demo_pairs'
files, TRL's explicit-prompt form), and prints the share ranked right (chosen scored above
rejected) and the mean margin; --json writes them too. This is how a pipeline reads a reward
model's held-out pair accuracy once, after training validated on another split.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional


def _row_pair(row: Any, where: str) -> tuple[list[dict], str]:
    from gpt.chat import ChatFormatError, validate_messages

    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    try:
        if "messages" in row:
            msgs = row["messages"]
            validate_messages(msgs, require_final_assistant=True)
            return list(msgs[:-1]), msgs[-1]["content"]
        key = "response" if "response" in row else "completion"
        if "prompt" not in row or key not in row:
            raise ValueError(f"{where}: expected 'prompt' and 'response' (or 'completion'), or 'messages'; got "
                             f"{', '.join(sorted(map(str, row))) or 'no fields'}")
        prompt, response = row["prompt"], row[key]
        if not isinstance(prompt, (str, list)):
            raise ValueError(f"{where}: field 'prompt' is {type(prompt).__name__}, not text or a list of messages")
        msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        validate_messages(msgs)
        if not isinstance(response, str):
            raise ValueError(f"{where}: field {key!r} is {type(response).__name__}, not a string")
        if msgs[-1]["role"] != "user":
            raise ValueError(f"{where}: the prompt must end with a user turn, not {msgs[-1]['role']!r}")
        return list(msgs), response
    except ChatFormatError as e:
        raise ValueError(f"{where}: {e}") from None


def _json_lines(path: str, flag: str) -> Iterator[tuple[str, Any]]:
    """(FILE:LINE, parsed row) per non-empty line; one-line errors for a missing file or bad JSON."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{flag} {p}: no such file")
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield f"{p}:{lineno}", json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{p}:{lineno}: not JSON ({e.msg})") from None


def read_rows(path: str) -> list[dict]:
    rows = []
    for where, row in _json_lines(path, "--input"):
        _row_pair(row, where)
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def _reply(row: dict, key: str, where: str) -> str:
    reply = row.get(key)
    if isinstance(reply, list) and reply and isinstance(reply[-1], dict) and reply[-1].get("role") == "assistant":
        reply = reply[-1].get("content")
    if not isinstance(reply, str):
        raise ValueError(f"{where}: field {key!r} must be a string or a message list ending in the assistant's turn")
    return reply


def read_pairs(path: str) -> list[tuple[list[dict], str, str]]:
    """(prompt messages, chosen reply, rejected reply) per line of a preference JSONL file."""
    pairs = []
    for where, row in _json_lines(path, "--pairs"):
        if not isinstance(row, dict) or "prompt" not in row:
            raise ValueError(f"{where}: expected an object with 'prompt', 'chosen' and 'rejected'")
        chosen, rejected = _reply(row, "chosen", where), _reply(row, "rejected", where)
        msgs, _ = _row_pair({"prompt": row["prompt"], "response": chosen}, where)
        pairs.append((msgs, chosen, rejected))
    if not pairs:
        raise ValueError(f"{path}: no rows")
    return pairs


def _pair_accuracy(model: Any, tok: Any, pairs: list[tuple[list[dict], str, str]], batch_size: int) -> dict[str, Any]:
    prompts = [m for m, _, _ in pairs]
    chosen = model.score_texts(tok, prompts, [c for _, c, _ in pairs], batch_size=batch_size)
    rejected = model.score_texts(tok, prompts, [r for _, _, r in pairs], batch_size=batch_size)
    margins = [c - r for c, r in zip(chosen, rejected)]
    return {"pair_accuracy": sum(m > 0 for m in margins) / len(margins), "pairs": len(margins),
            "margin_mean": sum(margins) / len(margins)}


def score_pairs(checkpoint: str, pairs: str, json_path: Optional[str], batch_size: int, device: str) -> dict[str, Any]:
    """`gpt score --pairs`: the reward model's pair accuracy and mean margin on a preference file."""
    from gpt.reward import load_reward_model

    rows = read_pairs(pairs)  # a bad file fails before the model is loaded
    model, tok = load_reward_model(checkpoint, device=device)
    if tok is None:
        raise ValueError(f"{checkpoint}: holds no tokenizer (the chat template needs one)")
    result = {"checkpoint": str(checkpoint), "pairs_file": str(pairs), **_pair_accuracy(model, tok, rows, batch_size)}
    print(f"gpt score: pair accuracy {100 * result['pair_accuracy']:.1f}% of {result['pairs']} pairs "
          f"(chosen scored above rejected), mean margin {result['margin_mean']:.4g}")
    if json_path:
        from gpt.lm_eval import write_json  # as gpt eval's and gpt.evaluate's --json: atomic, parents made

        write_json(result, json_path)
    return result


def _write(rows: list[dict], output: Optional[str]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if output in (None, "-"):
        sys.stdout.write(text)
        return
    out = Path(output)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent if str(out.parent) else ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def score(checkpoint: str, prompt: Optional[str] = None, response: Optional[str] = None,
          input: Optional[str] = None, output: Optional[str] = None, system: Optional[str] = None,
          pairs: Optional[str] = None, json: Optional[str] = None, batch_size: int = 32,
          device: Optional[str] = None) -> None:
    """Score (prompt, response) pairs with a reward model: one pair from the options, or a JSONL file.

    Args:
        checkpoint: a reward model checkpoint (recipes/reward.py's .ckpt or DeepSpeed directory).
        prompt: the user turn to score a response to (with --response); prints the score.
        response: the assistant reply to score (with --prompt).
        input: a JSONL file, one row per line: {"prompt": text or messages, "response": text} ("completion"
            for "response"), or {"messages": [..., the assistant turn to score]}.
        output: where the input rows go with a "score" field added (JSONL, written atomically); default stdout.
        system: a system turn put before --prompt.
        pairs: a preference JSONL file (prompt, chosen, rejected): prints the pair accuracy and mean margin.
        json: with --pairs, also write them to this JSON file (atomically).
        batch_size: rows per forward pass.
        device: cpu, cuda, cuda:1, mps; default cuda when available.
    """
    from gpt.cli import _device, _utf8
    from gpt.reward import load_reward_model

    if pairs is not None:
        if input is not None or prompt is not None or response is not None:
            raise ValueError("give --pairs FILE alone (not with --input, --prompt or --response)")
        if batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
        score_pairs(checkpoint, pairs, json, batch_size, _device(device))
        return
    if json is not None:
        raise ValueError("--json goes with --pairs")
    if (input is None) == (prompt is None and response is None):
        raise ValueError("give --prompt and --response, or --input FILE (not both)")
    if input is None and (prompt is None or response is None):
        raise ValueError(f"--{'response' if response is None else 'prompt'} is missing (give both --prompt and --response)")
    if batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
    if input is not None:
        rows = read_rows(input)  # a bad file fails before the model is loaded
        pairs = [_row_pair(r, "") for r in rows]
    else:
        msgs = ([{"role": "system", "content": _utf8("system", system)}] if system else []) + [
            {"role": "user", "content": _utf8("prompt", prompt)}]
        rows, pairs = [], [_row_pair({"prompt": msgs, "response": _utf8("response", response)}, "--prompt/--response")]
    device = _device(device)
    model, tok = load_reward_model(checkpoint, device=device)
    if tok is None:
        raise ValueError(f"{checkpoint}: holds no tokenizer (the chat template needs one)")
    scores = model.score_texts(tok, [p for p, _ in pairs], [r for _, r in pairs], batch_size=batch_size)
    if input is None:
        print(f"{scores[0]:.6g}")
        return
    _write([{**r, "score": s} for r, s in zip(rows, scores)], output)
    mean = sum(scores) / len(scores)
    print(f"gpt score: {len(scores)} rows, mean score {mean:.4g}" + (f" -> {output}" if output not in (None, "-") else ""),
          file=sys.stderr)
