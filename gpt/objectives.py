"""Loss functions, separate from the Lightning plumbing so every stage reuses them.

    from gpt.objectives import causal_lm_loss
    loss_sum, n = causal_lm_loss(model(x), y)      # y[t] is the token after x[t]; -100 = not a target
    loss = loss_sum / n                            # or divide by the global batch's target count

Losses come back as a *sum* plus the number of target tokens, not a mean: under gradient
accumulation and data parallelism the right denominator is the number of targets in the
whole global batch, which only the caller knows (see gpt/lm.py). SFT masks prompt tokens
with `ignore_index`, so its micro-batches carry different target counts.
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
