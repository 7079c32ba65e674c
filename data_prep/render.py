"""Conversations and preference pairs -> (ids, loss mask[, bounds]) that fit a block, via the one chat template.

    from data_prep.render import render_conversation, render_pair, Drop
    ex = render_conversation(chat, conv, max_tokens=257)    # Rendered(ids, mask, bounds=(), truncated)
    ex = render_pair(chat, pair, max_tokens=256)            # ids = prompt + chosen + rejected, bounds

Rendering is gpt.chat.ChatTemplate's: the mask is 1 on assistant content and its <|end|>; for a
prompt/completion row (Conversation.first_target > 0) only the completion's turns count. A pair
is its prompt (render_prompt, ending in "<|assistant|>") once, then the chosen reply, then the
rejected reply (render_reply: content + <|end|>), mask 1 on both replies, bounds = where the
two replies start.

Truncation (`truncation="turns"`, the default), for an example longer than max_tokens (SFT:
prompt and replies together; pairs: the prompt with the longer of its two replies):
  1. drop the oldest user/assistant exchanges, one at a time, keeping the system turn and the
     last user turn (and, for SFT, the last assistant turn): the fewest that make it fit;
  2. then cut the final reply (SFT) or both replies (pairs) from the right; a cut reply loses its
     <|end|>, so the model is never taught to stop where the text was cut;
  3. if the system turn and the last user turn alone leave no room for one reply token, or the
     two cut replies of a pair became identical, drop the example (counted by reason).
So every kept example has at least one supervised token, and a pair two different non-empty
replies. `truncation="drop"` drops every example that does not fit instead (reason "too_long").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from data_prep.chat_formats import Conversation, Pair
from gpt.chat import ChatTemplate

Truncation = Literal["turns", "drop"]


class Drop(Exception):
    """An example that cannot be fitted into the block: `reason` is the counter key."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Rendered:
    ids: list[int]
    mask: list[int]
    bounds: tuple[int, ...] = ()
    truncated: bool = False


def _block_starts(chat: ChatTemplate, ids: list[int]) -> list[int]:
    """Where each message's block (role token, content, <|end|>) starts; content never holds a role id."""
    roles = set(chat.role_ids.values())
    return [p for p, t in enumerate(ids) if p > 0 and t in roles]


def _head_len(messages: list[dict], starts: list[int]) -> tuple[int, int]:
    """(index of the first message that may be dropped, tokens of end-of-text + system block)."""
    sys = int(messages[0]["role"] == "system")
    return sys, starts[sys]


def render_conversation(chat: ChatTemplate, conv: Conversation, max_tokens: int,
                        truncation: Truncation = "turns") -> Rendered:
    msgs = conv.messages
    ids, mask = chat.render(msgs)
    starts = _block_starts(chat, ids)
    if conv.first_target:
        mask[:starts[conv.first_target]] = [0] * starts[conv.first_target]
    if len(ids) <= max_tokens:
        return Rendered(ids, mask)
    if truncation == "drop":
        raise Drop("too_long")
    sys, head = _head_len(msgs, starts)
    n = len(msgs)
    for j in range(sys + 2, n - 1, 2):  # keep messages j.. (j a user turn): drop the exchanges before it
        if head + len(ids) - starts[j] <= max_tokens:
            return Rendered(ids[:head] + ids[starts[j]:], mask[:head] + mask[starts[j]:], truncated=True)
    reply = starts[n - 1] + 1  # first content token of the final assistant turn
    keep = list(range(head)) + list(range(starts[n - 2], reply))
    room = max_tokens - len(keep)
    if room < 1:
        raise Drop("prompt_too_long")
    keep += range(reply, reply + room)  # < the whole reply + <|end|>: the cut reply has no <|end|>
    return Rendered([ids[p] for p in keep], [mask[p] for p in keep], truncated=True)


def render_pair(chat: ChatTemplate, pair: Pair, max_tokens: int, truncation: Truncation = "turns") -> Rendered:
    prompt = chat.render_prompt(pair.prompt)
    chosen, rejected = chat.render_reply(pair.chosen), chat.render_reply(pair.rejected)
    longest = max(len(chosen), len(rejected))
    truncated = len(prompt) + longest > max_tokens
    if truncated:
        if truncation == "drop":
            raise Drop("too_long")
        full = prompt
        starts = _block_starts(chat, full)
        sys, head = _head_len(pair.prompt, starts)
        for j in range(sys + 2, len(pair.prompt), 2):  # drop exchanges until the prompt leaves room
            prompt = full[:head] + full[starts[j]:]
            if len(prompt) + longest <= max_tokens:
                break
        room = max_tokens - len(prompt)
        if room < 1:
            raise Drop("prompt_too_long")
        chosen, rejected = chosen[:room], rejected[:room]
        if chosen == rejected:
            raise Drop("identical_after_truncation")
    ids = prompt + chosen + rejected
    mask = [0] * len(prompt) + [1] * (len(chosen) + len(rejected))
    return Rendered(ids, mask, (len(prompt), len(prompt) + len(chosen)), truncated)
