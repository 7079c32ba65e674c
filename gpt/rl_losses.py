"""RL objectives for gpt/rl.py: PPO's clipped policy and value losses, GRPO, GAE, KL estimators.

    from gpt.rl_losses import gae, group_advantages, ppo_policy_loss, value_loss, grpo_loss, kl_estimate
    adv, ret = gae(token_rewards, values, mask, gamma=1.0, lam=0.95)      # PPO
    adv = group_advantages(rewards, group_size=8)                         # GRPO: one per response
    loss_sum, stats = grpo_loss(logp, old_logp, ref_logp, adv, weights, clip_eps=0.2, beta=0.04)
    loss = loss_sum / tokens_in_the_global_minibatch

Shapes: per-token tensors are (N, R), N responses by R response positions; `mask`/`weights` is
1 on a response's tokens and 0 on padding (or, for per-sequence normalisation, 1/length on its
tokens). Losses come back as *sums* over the weighted tokens, with their statistics as sums too:
the caller divides by the count of the whole global minibatch, so micro-batching and data
parallelism leave the gradient unchanged (the same rule as gpt/objectives.py).

KL estimators (Schulman, "Approximating KL Divergence", 2020), for tokens sampled from the
policy pi, with log r = log pi_ref - log pi:  k1 = -log r (unbiased, can be negative, PPO's
per-token penalty), k2 = (log r)^2 / 2, k3 = (r - 1) - log r (unbiased, never negative, GRPO's
loss term).
"""
from __future__ import annotations

import math
from typing import Literal

import torch

KLEstimator = Literal["k1", "k2", "k3"]


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return masked_sum(x, mask) / mask.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Population variance of x over the masked entries."""
    mean = masked_mean(x, mask)
    return masked_mean((x - mean) ** 2, mask)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries (mean kept when shift_mean is False); 0 off the mask."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def global_whiten(x: torch.Tensor, mask: torch.Tensor, reduce) -> torch.Tensor:
    """masked_whiten over every rank's x: `reduce` sums a tensor across ranks (strategy.reduce)."""
    sums = torch.stack([mask.sum(), (x * mask).sum(), (x * x * mask).sum()]).double()
    n, s, sq = reduce(sums, reduce_op="sum").tolist()
    mean = s / max(n, 1.0)
    var = max(sq / max(n, 1.0) - mean * mean, 0.0)
    return (x - mean) / math.sqrt(var + 1e-8) * mask


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: KLEstimator = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from log-probs of tokens sampled from pi."""
    log_r = ref_logp - logp
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r ** 2
    if kind == "k3":
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator {kind!r}; choose k1, k2 or k3")


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over each row's response tokens.

    rewards, values, mask: (N, R); each row's mask is a prefix (the response, then padding).
    delta_t = r_t + gamma * V_{t+1} - V_t, with V = 0 after the last token (the episode ends);
    A_t = delta_t + gamma * lam * A_{t+1}; returns R_t = A_t + V_t. Both are 0 on padding.
    """
    m = mask.to(values.dtype)
    N, R = rewards.shape
    adv = torch.zeros_like(values)
    next_value = values.new_zeros(N)
    next_adv = values.new_zeros(N)
    for t in reversed(range(R)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * m[:, t]
        adv[:, t] = next_adv
        next_value = values[:, t] * m[:, t]
    return adv, (adv + values) * m


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantage per response: its reward minus its group's mean, over the group's std.

    rewards: (N,) with each group's G = group_size responses adjacent. std is the sample std
    (Bessel-corrected, as TRL's GRPOTrainer); a group whose rewards are all equal gets 0.
    scale=False keeps only the mean subtraction (Dr. GRPO).
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    g = rewards.view(-1, group_size)
    centred = g - g.mean(dim=1, keepdim=True)
    if scale and group_size > 1:
        centred = centred / (g.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, weights: torch.Tensor,
                    clip_eps: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate: sum over tokens of max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)).

    advantages: (N, R) per token, or (N, 1) per response. Stats (sums over the weighted tokens):
    "clipped" (tokens where the clipped term is the larger loss), "approx_kl" (k3 of the old
    policy against the new: ((ratio - 1) - log ratio)).
    """
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    loss = torch.maximum(unclipped, clipped)
    with torch.no_grad():
        stats = {"clipped": masked_sum((clipped > unclipped).to(loss.dtype), weights),
                 "approx_kl": masked_sum(torch.expm1(log_ratio) - log_ratio, weights)}
    return masked_sum(loss, weights), stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, weights: torch.Tensor,
               clip: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped value loss: sum of 0.5 * max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2).

    Stats: "clipped" (tokens where the clipped error is the larger one).
    """
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)
    err, err_clipped = (values - returns) ** 2, (v_clipped - returns) ** 2
    loss = 0.5 * torch.maximum(err, err_clipped)
    with torch.no_grad():
        stats = {"clipped": masked_sum((err_clipped > err).to(loss.dtype), weights)}
    return masked_sum(loss, weights), stats


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
              weights: torch.Tensor, clip_eps: float = 0.2, beta: float = 0.04,
              kl: KLEstimator = "k3") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO: the clipped surrogate with each response's advantage on all its tokens, plus beta
    times the per-token KL estimate to the reference as a loss term (not inside the reward).

    advantages: (N,). Stats: the policy loss's, plus "kl" (sum of the per-token estimate).
    """
    pg, stats = ppo_policy_loss(logp, old_logp, advantages[:, None], weights, clip_eps)
    kl_sum = masked_sum(kl_estimate(logp, ref_logp, kl), weights)
    stats["kl"] = kl_sum.detach()
    return pg + beta * kl_sum, stats


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(R - V) / Var(R) over the masked tokens: 1 = perfect values, 0 = no better than a constant."""
    var = masked_var(returns, mask)
    return 1.0 - masked_var(returns - values, mask) / var.clamp(min=1e-8)


class AdaptiveKLController:
    """The KL coefficient of Ziegler et al. (2019): beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon.

    Raises beta while the policy's KL to the reference is above `target`, lowers it below; `n` is
    the number of responses behind the measured KL. Plain data state, saved in checkpoints.
    """

    def __init__(self, value: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL needs target > 0 and horizon > 0, got {target}, {horizon}")
        self.value, self.target, self.horizon = float(value), float(target), int(horizon)

    def update(self, kl: float, n: int) -> float:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n / self.horizon
        return self.value
