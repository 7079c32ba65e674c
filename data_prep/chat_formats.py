"""Rows of the formats users bring -> conversations and preference pairs for the chat template.

    from data_prep.chat_formats import detect_format, to_conversation, to_pair
    fmt = detect_format(row, "sft")          # "messages" | "prompt_completion" | "alpaca" | "sharegpt"
    conv = to_conversation(row, fmt)         # Conversation(messages, first_target)
    fmt = detect_format(row, "pairs")        # "explicit" | "implicit" | "hh" | "ultrafeedback"
    pair = to_pair(row, fmt)                 # Pair(prompt, chosen, rejected)

Column names are TRL's, unchanged:

SFT
  messages            {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
  prompt_completion   {"prompt": str | messages, "completion": str | messages}; a string prompt is
                      a user turn, a string completion an assistant turn. Only the completion is
                      trained on (TRL's completion-only loss): `first_target` marks where it starts.
  alpaca              {"instruction": str, "input": str (optional, may be ""), "output": str}; the
                      user turn is the instruction, then a blank line and the input when there is one.
  sharegpt            {"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}
                      ("user"/"assistant" are accepted as `from` too).
Preference pairs (the reply is always one final assistant turn after the prompt)
  explicit            {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages};
                      message-list replies are the assistant turn alone or the full conversation
                      (then it must start with the prompt).
  implicit            {"chosen": messages, "rejected": messages}: full conversations; the prompt is
                      their shared prefix and each must go on with exactly one assistant turn.
  hh                  Anthropic HH: {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}
  ultrafeedback       UltraFeedback-binarized: implicit message lists plus "score_chosen" and
                      "score_rejected" (numbers; chosen must score higher, a tie is skipped), and
                      an optional "prompt" string that must be the last user turn of the prompt.

Bad rows raise RowError(reason, message): the message is one line naming the field (the job
adds FILE:LINE); `reason` is the short key the job counts when `--max_bad_rows` lets it skip
the row. Rows that are well-formed but carry nothing to learn are SkipRow (always counted,
never an error): content holding a reserved token such as "<|end|>" (gpt.chat refuses it:
it would render as a control token), a tie in UltraFeedback scores, text that is not UTF-8.
Every conversation is checked by gpt.chat.validate_messages (roles, alternation, final
assistant turn); assistant turns must not be empty or blank.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

from gpt.chat import ChatFormatError, validate_messages

SFT_FORMATS = ("messages", "prompt_completion", "alpaca", "sharegpt")
PAIR_FORMATS = ("explicit", "implicit", "hh", "ultrafeedback")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
_HH_MARK = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


class RowError(ValueError):
    """A malformed row: `reason` is the counter key, the message one line naming the field."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class SkipRow(RowError):
    """A well-formed row with nothing usable in it: skipped and counted, never an error."""


@dataclass(frozen=True)
class Conversation:
    messages: list[dict]  # {"role", "content"} only
    first_target: int = 0  # messages before this index are context only (mask 0), even assistant turns


@dataclass(frozen=True)
class Pair:
    prompt: list[dict]  # ends with a user turn
    chosen: str
    rejected: str


# ---- format detection -------------------------------------------------------------------
def detect_format(row: dict, kind: str) -> str:
    """The format of a row from its columns (and, for pairs, the type of "chosen")."""
    cols = set(row)
    if kind == "sft":
        for fmt, need in (("messages", {"messages"}), ("sharegpt", {"conversations"}),
                          ("prompt_completion", {"prompt", "completion"}), ("alpaca", {"instruction", "output"})):
            if need <= cols:
                return fmt
        want = "messages, conversations, prompt + completion, or instruction (+ input) + output"
    elif kind == "pairs":
        if {"chosen", "rejected"} <= cols:
            if {"score_chosen", "score_rejected"} <= cols:
                return "ultrafeedback"
            if "prompt" in cols:
                return "explicit"
            return "hh" if isinstance(row["chosen"], str) else "implicit"
        want = "chosen + rejected (with prompt, or full conversations, or Anthropic HH transcripts)"
    else:
        raise ValueError(f"kind must be 'sft' or 'pairs', got {kind!r}")
    raise RowError("unknown_format", f"cannot tell the {kind} format from the columns "
                                     f"({', '.join(sorted(map(str, cols))) or 'none'}): expected {want}; or pass --format")


# ---- shared checks ----------------------------------------------------------------------
def _field(row: dict, name: str) -> Any:
    if name not in row or row[name] is None:
        raise RowError("missing_field", f"missing field {name!r} (fields: {', '.join(sorted(map(str, row)))})")
    return row[name]


def _string(row: dict, name: str) -> str:
    value = _field(row, name)
    if not isinstance(value, str):
        raise RowError("wrong_type", f"field {name!r} is {type(value).__name__}, not a string")
    return value


def _reason(e: ChatFormatError) -> str:
    """A counter key for gpt.chat's one-line error."""
    text = str(e)
    for key, reason in (("reserved token", "reserved_token"), ("is not one of", "unknown_role"),
                        ("must end with an assistant turn", "no_final_assistant"), ("expected a ", "wrong_type"),
                        ("must be a string", "wrong_type"), ("empty conversation", "empty_conversation")):
        if key in text:
            return reason
    return "bad_turn_order"


def _messages(value: Any, name: str) -> list[dict]:
    """A list of {"role", "content"} dicts (other keys dropped), types checked."""
    if not isinstance(value, (list, tuple)):
        raise RowError("wrong_type", f"field {name!r} is {type(value).__name__}, not a list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            got = ", ".join(map(str, m)) if isinstance(m, dict) else type(m).__name__
            raise RowError("wrong_type", f"field {name!r}: message {i}: expected 'role' and 'content', got {got}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _checked(messages: list[dict], name: str, final_assistant: bool = True) -> list[dict]:
    try:
        validate_messages(messages, require_final_assistant=final_assistant)
    except ChatFormatError as e:
        reason = _reason(e)
        cls = SkipRow if reason == "reserved_token" else RowError
        raise cls(reason, f"field {name!r}: {e}") from None
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip():
            raise RowError("empty_assistant", f"field {name!r}: message {i}: empty assistant turn")
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError:
            raise SkipRow("invalid_utf8", f"field {name!r}: message {i}: content is not valid UTF-8") from None
    return messages


def _turn(role: str, content: str) -> dict:
    return {"role": role, "content": content}


# ---- SFT --------------------------------------------------------------------------------
def to_conversation(row: dict, fmt: str) -> Conversation:
    """The conversation of an SFT row (RowError / SkipRow when it has none)."""
    if fmt == "messages":
        return Conversation(_checked(_messages(_field(row, "messages"), "messages"), "messages"))
    if fmt == "sharegpt":
        return Conversation(_checked(_sharegpt(_field(row, "conversations")), "conversations"))
    if fmt == "alpaca":
        instruction, inp = _string(row, "instruction"), row.get("input")
        if inp is not None and not isinstance(inp, str):
            raise RowError("wrong_type", f"field 'input' is {type(inp).__name__}, not a string")
        if not instruction.strip():
            raise RowError("empty_prompt", "field 'instruction': empty instruction")
        user = f"{instruction}\n\n{inp}" if inp and inp.strip() else instruction
        return Conversation(_checked([_turn("user", user), _turn("assistant", _string(row, "output"))], "output"))
    if fmt == "prompt_completion":
        prompt = _side(row, "prompt", "user")
        completion = _side(row, "completion", "assistant")
        return Conversation(_checked(prompt + completion, "completion"), first_target=len(prompt))
    raise ValueError(f"unknown SFT format {fmt!r} (one of {', '.join(SFT_FORMATS)})")


def _side(row: dict, name: str, role: str) -> list[dict]:
    """A string as one turn of `role`, or a message list."""
    value = _field(row, name)
    if isinstance(value, str):
        return [_turn(role, value)]
    if isinstance(value, (list, tuple)):
        return _messages(value, name)
    raise RowError("wrong_type", f"field {name!r} is {type(value).__name__}, not a string or a list of messages")


def _sharegpt(value: Any) -> list[dict]:
    if not isinstance(value, (list, tuple)):
        raise RowError("wrong_type", f"field 'conversations' is {type(value).__name__}, not a list of turns")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "from" not in m or "value" not in m:
            got = ", ".join(map(str, m)) if isinstance(m, dict) else type(m).__name__
            raise RowError("wrong_type", f"field 'conversations': message {i}: expected 'from' and 'value' "
                                         f"(ShareGPT), got {got}")
        role = SHAREGPT_ROLES.get(m["from"]) if isinstance(m["from"], str) else None
        if role is None:
            raise RowError("unknown_role", f"field 'conversations': message {i}: 'from' {m['from']!r} is not one "
                                           "of system, human, gpt")
        out.append(_turn(role, m["value"]))
    return out


# ---- preference pairs -------------------------------------------------------------------
def to_pair(row: dict, fmt: str) -> Pair:
    """The (prompt, chosen reply, rejected reply) of a preference row (RowError / SkipRow)."""
    if fmt == "hh":
        chosen, rejected = _hh(_string(row, "chosen"), "chosen"), _hh(_string(row, "rejected"), "rejected")
        return _from_conversations(chosen, rejected)
    if fmt in ("implicit", "ultrafeedback"):
        chosen = _messages(_field(row, "chosen"), "chosen")
        rejected = _messages(_field(row, "rejected"), "rejected")
        pair = _from_conversations(chosen, rejected)
        if fmt == "ultrafeedback":
            _check_scores(row)
            prompt = row.get("prompt")
            if prompt is not None and prompt != pair.prompt[-1]["content"]:
                raise RowError("prompt_mismatch", "field 'prompt' is not the last user turn of chosen and rejected")
        return pair
    if fmt == "explicit":
        prompt = _side(row, "prompt", "user")
        return _finish_pair(prompt, _reply(row, "chosen", prompt), _reply(row, "rejected", prompt))
    raise ValueError(f"unknown pairs format {fmt!r} (one of {', '.join(PAIR_FORMATS)})")


def _reply(row: dict, name: str, prompt: list[dict]) -> str:
    """The reply text of an explicit-prompt row's chosen/rejected: a string, one assistant message,
    or the full conversation (prompt + one assistant message)."""
    value = _field(row, name)
    if isinstance(value, str):
        return value
    msgs = _side(row, name, "assistant")
    if msgs and msgs[0]["role"] != "assistant":  # a full conversation: must start with the prompt
        if msgs[:len(prompt)] != prompt:
            raise RowError("prompt_mismatch", f"field {name!r}: does not start with the prompt")
        msgs = msgs[len(prompt):]
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        raise RowError("not_one_reply", f"field {name!r}: expected one assistant turn after the prompt, "
                                        f"got {len(msgs)} message(s)")
    return msgs[0]["content"]


def _from_conversations(chosen: list[dict], rejected: list[dict]) -> Pair:
    """Split two full conversations into their shared prompt and their final assistant replies."""
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    if k == len(chosen) == len(rejected):
        raise RowError("identical_responses", "fields 'chosen' and 'rejected': identical conversations")
    for name, conv in (("chosen", chosen), ("rejected", rejected)):
        if len(conv) != k + 1 or conv[k]["role"] != "assistant":
            raise RowError("prompt_mismatch", f"fields 'chosen' and 'rejected' differ before their final assistant "
                                              f"turn (at message {k} of {name!r}): no shared prompt")
    return _finish_pair(chosen[:k], chosen[k]["content"], rejected[k]["content"])


def _finish_pair(prompt: list[dict], chosen: Any, rejected: Any) -> Pair:
    if not prompt:
        raise RowError("empty_prompt", "fields 'chosen' and 'rejected': no prompt before the replies")
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(reply, str):
            raise RowError("wrong_type", f"field {name!r}: reply content is {type(reply).__name__}, not a string")
        _checked(prompt + [_turn("assistant", reply)], name)  # also refuses an empty reply
    if chosen == rejected:
        raise RowError("identical_responses", "fields 'chosen' and 'rejected': identical replies")
    return Pair(prompt, chosen, rejected)


def _hh(text: str, name: str) -> list[dict]:
    """'\\n\\nHuman: ...\\n\\nAssistant: ...' -> messages (contents stripped)."""
    if text.startswith(("Human:", "Assistant:")):
        text = "\n\n" + text
    parts = _HH_MARK.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise RowError("wrong_type", f"field {name!r}: not an Anthropic HH transcript (expected "
                                     "'\\n\\nHuman: ...\\n\\nAssistant: ...')")
    return [_turn(_HH_ROLES[role], content.strip()) for role, content in zip(parts[1::2], parts[2::2])]


def _check_scores(row: dict) -> None:
    scores = []
    for name in ("score_chosen", "score_rejected"):
        v = _field(row, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise RowError("wrong_type", f"field {name!r} is {type(v).__name__}, not a number")
        scores.append(v)
    if scores[0] < scores[1]:
        raise RowError("inverted_scores", f"fields 'score_chosen' {scores[0]} < 'score_rejected' {scores[1]}: "
                                          "chosen must be preferred")
    if scores[0] == scores[1]:
        raise SkipRow("tied_scores", f"fields 'score_chosen' and 'score_rejected' tie at {scores[0]}")


def convert(row: Any, kind: str, fmt: Optional[str]) -> Conversation | Pair:
    """Row -> Conversation (kind "sft") or Pair (kind "pairs"); `fmt` None = detect per row."""
    if not isinstance(row, dict):
        raise RowError("wrong_type", f"expected a JSON object, got {type(row).__name__}")
    fmt = fmt or detect_format(row, kind)
    return to_conversation(row, fmt) if kind == "sft" else to_pair(row, fmt)
