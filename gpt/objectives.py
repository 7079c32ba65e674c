"""Loss functions, separate from the Lightning plumbing so every stage reuses them.

    from gpt.objectives import causal_lm_loss
    loss_sum, n = causal_lm_loss(model(x), y)      # y[t] is the token after x[t]; -100 = not a target
    loss = loss_sum / n                            # or divide by the global batch's target count

Losses come back as a *sum* plus the number of target tokens, not a mean: under gradient
accumulation and data parallelism the right denominator is the number of targets in the
whole global batch, which only the caller knows (see gpt/lm.py). SFT masks prompt tokens
with `ignore_index`, so its micro-batches carry different target counts.

Preference losses (reward models, DPO) come back per pair, for the same reason: the caller
sums them and divides by the pairs of the global batch.

    from gpt.objectives import bradley_terry_loss, dpo_loss, sequence_logprobs
    losses = bradley_terry_loss(r_chosen, r_rejected, margin=0.5)          # (P,)
    logp = sequence_logprobs(model(ids), labels)                            # (2P,): reply log-probs
    losses, rw_chosen, rw_rejected = dpo_loss(*logp.chunk(2), *ref.chunk(2), beta=0.1)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor,
                   ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy (fp32) and the count of targets != ignore_index.

    logits: (B, T, V); labels: (B, T), already shifted (labels[:, t] is predicted at t).
    """
    loss_sum = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=ignore_index,
                               reduction="sum")
    return loss_sum, (labels != ignore_index).sum()


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Per-token log p(label) in fp32, 0 where label == ignore_index; shape (B, T). For DPO/RL."""
    mask = labels != ignore_index
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, labels.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
    return picked * mask


# ---- preference objectives: each returns one loss per pair; the caller sums and divides by the
# ---- pairs of the global batch (gpt/reward.py, gpt/dpo.py), as causal_lm_loss's caller does.
def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Summed log p(reply) per row, fp32, shape (B,): the reply tokens are the labels != ignore_index."""
    return token_logprobs(logits, labels, ignore_index).sum(-1)


def selected_sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor,
                               ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """sequence_logprobs from logits computed at the reply positions only: `logits` (N, V) is
    GPT(..., select=labels != ignore_index)'s output (row-major), so the LM head and the
    log-softmax skip the prompt and padding. Shape (B,), fp32."""
    mask = labels != ignore_index
    picked = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels[mask].unsqueeze(-1)).squeeze(-1)
    rows = mask.nonzero(as_tuple=True)[0]
    return torch.zeros(labels.size(0), dtype=picked.dtype, device=picked.device).index_add(0, rows, picked)


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor,
                       margin: torch.Tensor | float | None = None) -> torch.Tensor:
    """Reward-model loss per pair: -log sigmoid(r_chosen - r_rejected - margin), shape (P,).

    The Bradley-Terry model says P(chosen preferred) = sigmoid(r_chosen - r_rejected); a margin
    (Llama 2's, per pair or one number) asks the chosen reward to lead by at least that much.
    """
    diff = chosen.float() - rejected.float()
    if margin is not None:
        diff = diff - (margin.float() if isinstance(margin, torch.Tensor) else float(margin))
    return -F.logsigmoid(diff)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO-family loss per pair and the implicit rewards, from sequence log-probs (each (P,)).

    h = (log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r))
      sigmoid (DPO, Rafailov et al. 2023): -log sigmoid(beta h); with label_smoothing eps (the
              conservative DPO of noisy labels): -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
      ipo     (Azar et al. 2023): (h - 1 / (2 beta))^2; give it length-averaged log-probs, as TRL does
    Returns (losses, chosen rewards, rejected rewards), rewards = beta (log pi - log ref), detached:
    what TRL logs as rewards/chosen and rewards/rejected.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    chosen_ratio = policy_chosen.float() - ref_chosen.float()
    rejected_ratio = policy_rejected.float() - ref_rejected.float()
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type must be 'sigmoid' or 'ipo', got {loss_type!r}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
