"""Batched text generation with the KV cache: prefill once, then one token per step.

    from gpt.generate import generate
    out = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=50, temperature=0.8,
                   top_k=50, top_p=0.95, seed=0, stop_ids=[tok.eot_id],
                   on_token=lambda row, tid: ...)
    # out[i] = the new token ids of row i (a stop token ends the row and is not included)

Prompts of different lengths share one batch by left-padding: position ids restart at 0 on
each row's first real token, and the attention mask hides the pad keys. `generate_uncached`
is the recompute-everything reference loop the tests and benchmarks compare against.
Both check their sampling arguments first (`check_sampling`): a negative temperature would
invert the distribution and a top_p of 0 or 1.5 would quietly mean greedy or "off", so each is
refused with a ValueError naming the argument.
`IncrementalDecoder` turns a stream of token ids into printable text pieces (it holds back an
incomplete multi-byte UTF-8 character until the token that completes it arrives).
"""
from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Callable, Optional, Sequence, Union

import torch

from gpt.model import GPT, KVCache

StopIds = Union[None, Sequence[int], Sequence[Sequence[int]]]
OnToken = Optional[Callable[[int, int], None]]


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of tokens whose probability sums to >= top_p.

    The most likely token is always kept; the rest become -inf. logits: (..., V).
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # Probability mass strictly before each token: drop a token once that mass already covers top_p.
    before = probs.cumsum(dim=-1) - probs
    drop_sorted = before >= top_p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the top_k largest logits per row; the rest become -inf."""
    k = min(top_k, logits.size(-1))
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V). temperature 0 = greedy."""
    logits = logits.float()
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _is_int(x: object) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


def check_sampling(max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
                   top_p: Optional[float] = None, seed: Optional[int] = None) -> None:
    """ValueError, naming the argument, for a value that sampling would misread."""
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not (isinstance(temperature, Real) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 0):
        raise ValueError(f"top_k must be an integer >= 0 (0 or None = all tokens), got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, Real) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] (None = off), got {top_p!r}")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**64):
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")


def _stop_sets(stop_ids: StopIds, batch: int) -> list[set[int]]:
    """One set of stop ids per row: a flat list applies to every row, a nested list is per row."""
    if not stop_ids:
        return [set() for _ in range(batch)]
    if isinstance(stop_ids[0], int):
        return [set(stop_ids) for _ in range(batch)]  # type: ignore[arg-type]
    if len(stop_ids) != batch:
        raise ValueError(f"per-row stop_ids has {len(stop_ids)} rows for a batch of {batch}")
    return [set(s) for s in stop_ids]  # type: ignore[arg-type]


def _left_pad(prompts: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, valid) of shape (B, P): each prompt right-aligned, pad = token 0, valid = real token."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    P = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), P, dtype=torch.long, device=device)
    valid = torch.zeros(len(prompts), P, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p):] = torch.tensor(list(p), dtype=torch.long, device=device)
        valid[i, P - len(p):] = True
    return tokens, valid


def _mask(valid: torch.Tensor, T: int) -> torch.Tensor:
    """Bool (B, 1, T, S) for the last T queries over all S keys: causal AND key-valid.

    The diagonal is always allowed, so a pad query row is never fully masked: an all-False
    row makes SDPA return NaN, which would flow into the next layer's keys and values.
    """
    S = valid.size(1)
    causal = torch.ones(T, S, dtype=torch.bool, device=valid.device).tril(S - T)
    diag = torch.zeros(T, S, dtype=torch.bool, device=valid.device)
    diag[torch.arange(T), torch.arange(S - T, S)] = True
    return ((causal & valid[:, None, None, :]) | diag).contiguous()


def _check_length(model: GPT, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    longest = max(len(p) for p in prompts)
    block = model.config.block_size
    if longest + max_new_tokens > block:
        raise ValueError(f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} "
                         f"is past the model's block_size {block}")


def _generator(seed: Optional[int], device: torch.device) -> Optional[torch.Generator]:
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


class _Rows:
    """Bookkeeping of finished rows, outputs and streaming shared by both loops."""

    def __init__(self, batch: int, stop_ids: StopIds, on_token: OnToken):
        self.out: list[list[int]] = [[] for _ in range(batch)]
        self.done = [False] * batch
        self.stops = _stop_sets(stop_ids, batch)
        self.on_token = on_token

    def add(self, next_ids: torch.Tensor) -> bool:
        """Record one step's tokens; True when every row has stopped."""
        for row, tid in enumerate(next_ids.tolist()):
            if self.done[row]:
                continue
            if tid in self.stops[row]:
                self.done[row] = True
                continue
            self.out[row].append(tid)
            if self.on_token is not None:
                self.on_token(row, tid)
        return all(self.done)


@torch.inference_mode()
def generate(model: GPT, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, seed: Optional[int] = None,
             stop_ids: StopIds = None, on_token: OnToken = None) -> list[list[int]]:
    """New token ids per row, generated with a KV cache. See the module docstring."""
    check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    _check_length(model, prompts, max_new_tokens)
    param = next(model.parameters())
    device = param.device
    tokens, valid = _left_pad(prompts, device)
    B, P = tokens.shape
    cache = KVCache(model.config, B, P + max_new_tokens, device=device, dtype=param.dtype)
    gen = _generator(seed, device)
    rows = _Rows(B, stop_ids, on_token)
    positions = valid.long().cumsum(-1) - 1  # 0 at each row's first real token
    # Prompts of one length need no mask: the model's causal kernel is the fast path.
    padded = not bool(valid.all())
    logits = model(tokens, position_ids=positions.clamp(min=0), attn_mask=_mask(valid, P) if padded else None,
                   cache=cache, last_only=True)
    next_pos = positions[:, -1] + 1
    # Keys of a one-token step: the valid prompt keys and every generated key (the newest is
    # the query's own, so no row is all-masked). Built once, sliced per step.
    keys = torch.cat([valid, valid.new_ones(B, max_new_tokens)], dim=1)[:, None, None, :]
    for step in range(max_new_tokens):
        next_ids = sample_next(logits[:, -1], temperature, top_k, top_p, gen)
        if rows.add(next_ids) or step == max_new_tokens - 1:
            break
        # Finished rows keep decoding (a batch moves together) but their tokens are ignored.
        logits = model(next_ids[:, None], position_ids=next_pos[:, None],
                       attn_mask=keys[..., :P + step + 1] if padded else None, cache=cache)
        next_pos = next_pos + 1
    return rows.out


@torch.inference_mode()
def generate_uncached(model: GPT, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                      temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                      seed: Optional[int] = None, stop_ids: StopIds = None,
                      on_token: OnToken = None) -> list[list[int]]:
    """The reference loop: the whole (left-padded) sequence through the model at every step."""
    check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    _check_length(model, prompts, max_new_tokens)
    device = next(model.parameters()).device
    tokens, valid = _left_pad(prompts, device)
    gen = _generator(seed, device)
    rows = _Rows(len(prompts), stop_ids, on_token)
    for _ in range(max_new_tokens):
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
        logits = model(tokens, position_ids=positions, attn_mask=_mask(valid, valid.size(1)), last_only=True)
        next_ids = sample_next(logits[:, -1], temperature, top_k, top_p, gen)
        if rows.add(next_ids):
            break
        tokens = torch.cat([tokens, next_ids[:, None]], dim=1)
        valid = torch.cat([valid, valid.new_ones(len(prompts), 1)], dim=1)
    return rows.out


class IncrementalDecoder:
    """Text pieces from a stream of token ids, safe for multi-byte UTF-8 characters.

    A byte-level BPE token can end in the middle of a character; decoding it alone gives
    U+FFFD. We decode everything since the last flushed point and hold the text back while it
    ends in U+FFFD, so each character is printed once, whole.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []  # tokens not yet returned as text

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        # A UTF-8 character is at most 4 bytes: past 4 held tokens the U+FFFD is real (invalid
        # bytes the model chose), so print it rather than hold text back forever.
        if text.endswith("\ufffd") and len(self.ids) < 4:
            return ""
        # Restart the window once it is flushed: decoding stays O(tokens since the last flush).
        self.ids = []
        return text

    def flush(self) -> str:
        """Whatever is held back (an incomplete character at the very end)."""
        text = self.tokenizer.decode(self.ids) if self.ids else ""
        self.ids = []
        return text
