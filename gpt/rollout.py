"""RL rollouts: responses sampled with the KV-cache generator, laid out for training, scored.

    from gpt.rollout import sample_rollout, response_logprobs
    ro = sample_rollout(model, prompts, stop_ids=template.stop_ids, end_id=template.end_id,
                        pad_id=template.pad_id, group_size=8, max_new_tokens=32, temperature=1.0, seed=s)
    logp, entropy = response_logprobs(model, ro, with_entropy=True)   # (N, R) each, recomputed
    ro.response_mask, ro.lengths, ro.ended, ro.truncated, ro.texts(tokenizer)
    ro = replace_responses(ro, {7: reference_ids}, end_id=..., pad_id=...)   # off-policy guidance

Sampling is gpt.generate.generate (KV cache, left padding, stop at the chat template's stop ids),
never transformers' generate. Each prompt is sampled `group_size` times, the copies adjacent
(GRPO's groups). Large batches are generated in chunks of `batch_size` sequences, each chunk with
its own seed derived from `seed`, so the result is a function of (weights, prompts, seed).

Layout. Row i is its prompt left-padded to the longest prompt P, then its response right-padded
to the longest response R:  [pad .. pad | prompt | response | pad ..]. The response keeps the stop
token that ended it (a chat model must learn to emit <|end|>); one that ran to max_new_tokens has
none and counts as truncated. The training forward sees exactly what the sampler saw: positions
restart at 0 on each row's first real token and no query attends to a pad key
(gpt.generate.padded_causal_mask), so the recomputed log-probs equal the sampler's (a test checks
this at temperature 1). Per-token arrays are (N, R), column j aligned with response token j and
read from sequence position P - 1 + j (the logits that predicted it).

Log-probs are taken from logits / temperature, the distribution the responses were drawn from
(top-k/top-p truncation aside), as TRL does; at temperature 1 they are the model's own.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from gpt.data import _mix64
from gpt.generate import generate, padded_causal_mask
from gpt.model import GPT
from gpt.objectives import IGNORE_INDEX, token_logprobs


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (base seed, step, rank, ...): streams that never collide by accident."""
    x = 0x2545F4914F6CDD1D
    for p in parts:
        x = _mix64((x ^ (int(p) & ((1 << 64) - 1))) * 0x9E3779B97F4A7C15 & ((1 << 64) - 1))
    return x >> 1


@dataclass
class Rollout:
    """A batch of prompts + sampled responses (see the module docstring for the layout)."""
    input_ids: torch.Tensor      # (N, P + R) long; pad_id on padding
    valid: torch.Tensor          # (N, P + R) bool: a real token
    prompt_len: int              # P
    responses: torch.Tensor      # (N, R) long: response tokens (stop token included), pad_id after
    response_mask: torch.Tensor  # (N, R) bool
    lengths: torch.Tensor        # (N,) long: response tokens, the stop token counted
    ended: torch.Tensor          # (N,) bool: ended with end-of-turn
    truncated: torch.Tensor      # (N,) bool: ran to max_new_tokens without a stop token
    sampler_logprobs: torch.Tensor  # (N, R) float: log-probs the sampler drew with (0 on padding)
    replies: list[list[int]]     # response tokens without the stop token (what the reply text is)

    @property
    def size(self) -> int:
        return self.input_ids.size(0)

    @property
    def position_ids(self) -> torch.Tensor:
        return (self.valid.long().cumsum(-1) - 1).clamp(min=0)

    def texts(self, tokenizer: Any) -> list[str]:
        return [tokenizer.decode(ids) for ids in self.replies]

    def select(self, idx: torch.Tensor | Sequence[int]) -> "Rollout":
        """Rows `idx`, with padding that no selected row needs trimmed off both ends."""
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.input_ids.device)
        prompt_lens = self.valid[idx, :self.prompt_len].sum(-1)
        P = int(prompt_lens.max()) if idx.numel() else 0
        R = int(self.lengths[idx].max()) if idx.numel() else 0
        cut = slice(self.prompt_len - P, self.prompt_len + R)
        return Rollout(input_ids=self.input_ids[idx, cut], valid=self.valid[idx, cut], prompt_len=P,
                       responses=self.responses[idx, :R], response_mask=self.response_mask[idx, :R],
                       lengths=self.lengths[idx], ended=self.ended[idx], truncated=self.truncated[idx],
                       sampler_logprobs=self.sampler_logprobs[idx, :R],
                       replies=[self.replies[i] for i in idx.tolist()])

    def to(self, device: torch.device | str) -> "Rollout":
        return Rollout(**{f.name: (getattr(self, f.name).to(device) if isinstance(getattr(self, f.name), torch.Tensor)
                                   else getattr(self, f.name)) for f in fields(self)})


def build_rollout(prompts: Sequence[Sequence[int]], replies: Sequence[Sequence[int]], stops: Sequence[Optional[int]],
                  logprobs: Sequence[Sequence[float]], *, end_id: int, pad_id: int,
                  device: torch.device | str = "cpu") -> Rollout:
    """Lay out prompts and sampled responses (gpt.generate.Generation fields) as one Rollout."""
    responses = [list(r) + ([s] if s is not None else []) for r, s in zip(replies, stops)]
    N = len(prompts)
    P = max(len(p) for p in prompts)
    R = max(1, max(len(r) for r in responses))  # at least one column, so shapes stay 2-D
    input_ids = torch.full((N, P + R), pad_id, dtype=torch.long)
    valid = torch.zeros(N, P + R, dtype=torch.bool)
    lp = torch.zeros(N, R)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        input_ids[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        input_ids[i, P:P + len(r)] = torch.tensor(r, dtype=torch.long)
        valid[i, P - len(p):P + len(r)] = True
        lp[i, :len(r)] = torch.tensor(list(logprobs[i][:len(r)]), dtype=torch.float)
    lengths = torch.tensor([len(r) for r in responses], dtype=torch.long)
    return Rollout(input_ids=input_ids, valid=valid, prompt_len=P, responses=input_ids[:, P:].clone(),
                   response_mask=valid[:, P:].clone(), lengths=lengths,
                   ended=torch.tensor([s == end_id for s in stops], dtype=torch.bool),
                   truncated=torch.tensor([s is None for s in stops], dtype=torch.bool),
                   sampler_logprobs=lp, replies=[list(r) for r in replies]).to(device)


def replace_responses(ro: Rollout, new: dict[int, Sequence[int]], *, end_id: int, pad_id: int) -> Rollout:
    """The rollout with row i's response replaced by `new[i]` (reply tokens; the end-of-turn token is
    appended), laid out afresh. The sampler never drew a replaced reply: its sampler_logprobs are 0
    (the ratio's log-probs are recomputed from the policy anyway)."""
    P = ro.prompt_len
    prompts = [ro.input_ids[i, :P][ro.valid[i, :P]].tolist() for i in range(ro.size)]
    replies, stops, logprobs = [], [], []
    for i in range(ro.size):
        if i in new:
            replies.append(list(new[i]))
            stops.append(end_id)
            logprobs.append([0.0] * (len(new[i]) + 1))
            continue
        n = int(ro.lengths[i])
        replies.append(list(ro.replies[i]))
        stops.append(None if bool(ro.truncated[i]) else int(ro.responses[i, n - 1]))
        logprobs.append(ro.sampler_logprobs[i, :n].tolist())
    return build_rollout(prompts, replies, stops, logprobs, end_id=end_id, pad_id=pad_id, device=ro.input_ids.device)


@torch.no_grad()
def sample_rollout(model: torch.nn.Module, prompts: Sequence[Sequence[int]], *, stop_ids: Sequence[int], end_id: int,
                   pad_id: int, group_size: int = 1, max_new_tokens: int = 64, temperature: float = 1.0,
                   top_k: Optional[int] = None, top_p: Optional[float] = None, seed: int = 0,
                   batch_size: Optional[int] = None) -> Rollout:
    """Sample `group_size` responses per prompt (adjacent) with gpt.generate; see the module docstring."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if temperature <= 0:
        raise ValueError(f"RL samples its responses: temperature must be > 0, got {temperature}")
    expanded = [list(p) for p in prompts for _ in range(group_size)]
    chunk = batch_size or len(expanded)
    replies: list[list[int]] = []
    stops: list[Optional[int]] = []
    logprobs: list[list[float]] = []
    was_training = model.training
    model.eval()  # no dropout while sampling
    try:
        for c, start in enumerate(range(0, len(expanded), chunk)):
            g = generate(model, expanded[start:start + chunk], max_new_tokens, temperature=temperature, top_k=top_k,
                         top_p=top_p, seed=derive_seed(seed, c), stop_ids=list(stop_ids), return_details=True)
            replies += g.tokens
            stops += g.stops
            logprobs += g.logprobs
    finally:
        model.train(was_training)
    device = next(model.parameters()).device
    return build_rollout(expanded, replies, stops, logprobs, end_id=end_id, pad_id=pad_id, device=device)


def forward_rollout(model: torch.nn.Module, ro: Rollout) -> torch.Tensor:
    """The model's output at every position but the last, under the sampler's positions and mask.

    (N, P + R - 1, ...): position t holds what the model says after token t.
    """
    ids, valid = ro.input_ids[:, :-1], ro.valid[:, :-1]
    return model(ids, position_ids=ro.position_ids[:, :-1], attn_mask=padded_causal_mask(valid, ids.size(1)))


def response_logits(model: GPT, ro: Rollout) -> torch.Tensor:
    """Logits (N, R, V) that predicted each response token. The head runs on the response
    positions only (a demo prompt is several times longer than its reply); through the lm_head
    module, so that ZeRO-3 gathers its weight as in a full forward."""
    ids, valid = ro.input_ids[:, :-1], ro.valid[:, :-1]
    h = model(ids, position_ids=ro.position_ids[:, :-1], attn_mask=padded_causal_mask(valid, ids.size(1)), hidden=True)
    return model.lm_head(h[:, ro.prompt_len - 1:])[..., :model.config.vocab_size]


def response_logprobs(model: GPT, ro: Rollout, temperature: float = 1.0,
                      with_entropy: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-token log-probs (N, R) of the response tokens, recomputed by a forward pass of `model`
    (fp32, 0 on padding), and optionally the entropy of each position's distribution."""
    logits = response_logits(model, ro)
    if temperature != 1.0:
        logits = logits / temperature
    labels = ro.responses.masked_fill(~ro.response_mask, IGNORE_INDEX)
    logp = token_logprobs(logits, labels)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            full = F.log_softmax(logits.float(), dim=-1)
            entropy = -(full.exp() * full).sum(-1) * ro.response_mask
    return logp, entropy


def response_values(critic: torch.nn.Module, ro: Rollout) -> torch.Tensor:
    """A per-position scalar model's (N, T) output at the response tokens: (N, R), column j = its
    value of the state before response token j; 0 on padding."""
    out = forward_rollout(critic, ro)[:, ro.prompt_len - 1:]
    return out * ro.response_mask


def last_token_index(ro: Rollout) -> torch.Tensor:
    """(N,) sequence position of each response's last token (its stop token when it stopped)."""
    return ro.prompt_len + ro.lengths - 1
