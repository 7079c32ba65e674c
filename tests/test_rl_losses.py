"""gpt/rl_losses.py against numbers worked out by hand (plain arithmetic here, not the library's code)."""
import math

import pytest
import torch

from gpt.rl_losses import (AdaptiveKLController, explained_variance, gae, group_advantages, grpo_loss, kl_estimate,
                           masked_whiten, ppo_policy_loss, value_loss)


def test_gae_against_a_hand_computation():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 0.0, 7.0]])
    values = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # row 1's last position is padding: its 7 and 9 never count
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # Row 0: deltas .7, 0 + .9*.3 - .2 = .07, 0 + .9*.2 - .1 = .08; A = delta + .72 * A_next.
    a02 = 0.7
    a01 = 0.07 + 0.72 * a02
    a00 = 0.08 + 0.72 * a01
    # Row 1 ends after two tokens: delta1 = 0 - .5, delta0 = .5 + .9*.5 - .4.
    a11 = -0.5
    a10 = 0.55 + 0.72 * a11
    want_adv = torch.tensor([[a00, a01, a02], [a10, a11, 0.0]])
    torch.testing.assert_close(adv, want_adv)
    torch.testing.assert_close(ret, torch.tensor([[a00 + 0.1, a01 + 0.2, a02 + 0.3], [a10 + 0.4, a11 + 0.5, 0.0]]))


def test_gae_lambda_one_gamma_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[1.0, -2.0, 3.0, 0.5]])
    values = torch.tensor([[0.3, -0.1, 0.2, 0.7]])
    adv, ret = gae(rewards, values, torch.ones(1, 4), gamma=1.0, lam=1.0)
    to_go = [1 - 2 + 3 + 0.5, -2 + 3 + 0.5, 3 + 0.5, 0.5]
    torch.testing.assert_close(ret, torch.tensor([to_go]))
    torch.testing.assert_close(adv, torch.tensor([[g - v for g, v in zip(to_go, [0.3, -0.1, 0.2, 0.7])]]))


def _logps(ratios, old):
    return torch.tensor([[math.log(r) + o for r, o in zip(ratios, old)]])


def test_ppo_clipped_objective_by_hand():
    old = [-1.0, -2.0, -0.5, -1.5, -0.7, -3.0]
    ratios = [1.5, 0.5, 1.5, 0.5, 1.1, 40.0]
    adv = torch.tensor([[1.0, 2.0, -1.0, -1.0, 3.0, 5.0]])
    weights = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 0.0]])  # the last token is padding
    loss, stats = ppo_policy_loss(_logps(ratios, old), torch.tensor([old]), adv, weights, clip_eps=0.2)
    # per token max(-A r, -A clip(r, .8, 1.2)):
    # r 1.5, A 1 -> max(-1.5, -1.2) = -1.2 (clipped); r .5, A 2 -> max(-1, -1.6) = -1 (not);
    # r 1.5, A -1 -> max(1.5, 1.2) = 1.5 (not); r .5, A -1 -> max(.5, .8) = .8 (clipped); r 1.1, A 3 -> -3.3.
    assert loss.item() == pytest.approx(-1.2 - 1.0 + 1.5 + 0.8 - 3.3, abs=1e-5)
    assert stats["clipped"].item() == 2
    approx_kl = sum((r - 1) - math.log(r) for r in ratios[:5])
    assert stats["approx_kl"].item() == pytest.approx(approx_kl, abs=1e-5)


def test_ppo_gradient_is_zero_where_clipped():
    old = torch.tensor([[-1.0, -1.0]])
    logp = _logps([1.5, 1.1], [-1.0, -1.0]).requires_grad_()
    loss, _ = ppo_policy_loss(logp, old, torch.tensor([[1.0, 1.0]]), torch.ones(1, 2), clip_eps=0.2)
    loss.backward()
    # d(-A r)/d logp = -A r: 0 for the clipped token, -1.1 for the other.
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -1.1]]))


def test_value_loss_by_hand():
    values = torch.tensor([[1.0, 0.0, 2.0]])
    old = torch.tensor([[0.5, 0.0, 1.0]])
    returns = torch.tensor([[0.0, 1.0, 3.0]])
    loss, stats = value_loss(values, old, returns, torch.ones(1, 3), clip=0.2)
    # token 0: V 1 -> clipped .7; errors 1 and .49 -> 1. token 1: both 1. token 2: V 2 -> clipped 1.2;
    # errors 1 and 3.24 -> 3.24 (clipped is larger).
    assert loss.item() == pytest.approx(0.5 * (1 + 1 + 3.24), abs=1e-5)
    assert stats["clipped"].item() == 1


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(rewards, group_size=4)
    std = math.sqrt(4 * 0.25 / 3)  # sample std of (1, 0, 0, 1)
    a = 0.5 / (std + 1e-4)
    torch.testing.assert_close(adv, torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(group_advantages(rewards, 4, scale=False), torch.tensor([.5, -.5, -.5, .5, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(rewards, 3)


def test_grpo_objective_by_hand():
    # Two responses of one group (rewards 1 and 0), lengths 2 and 1.
    adv = group_advantages(torch.tensor([1.0, 0.0]), group_size=2)
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    old = [[-1.0, -2.0], [-0.5, 0.0]]
    ratios = [[1.1, 1.3], [1.3, 1.0]]
    ref = torch.tensor([[-1.2, -1.8], [-0.1, 5.0]])
    logp = torch.tensor([[math.log(r) + o for r, o in zip(rr, oo)] for rr, oo in zip(ratios, old)])
    weights = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    beta = 0.1
    loss, stats = grpo_loss(logp, torch.tensor(old), ref, adv, weights, clip_eps=0.2, beta=beta)
    # Policy terms: row 0 (A = +a): r 1.1 -> -1.1a; r 1.3 -> max(-1.3a, -1.2a) = -1.2a (clipped);
    # row 1 (A = -a): r 1.3 -> max(1.3a, 1.2a) = 1.3a (a worse ratio is never clipped away).
    pg = -a * 1.1 - a * 1.2 + 1.3 * a
    # k3 = exp(ref - logp) - (ref - logp) - 1 on the three real tokens.
    lp = logp.tolist()
    kl = sum(math.exp(r - l) - (r - l) - 1 for r, l in [(-1.2, lp[0][0]), (-1.8, lp[0][1]), (-0.1, lp[1][0])])
    assert loss.item() == pytest.approx(pg + beta * kl, abs=1e-5)
    assert stats["kl"].item() == pytest.approx(kl, abs=1e-5)
    assert stats["clipped"].item() == 1


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    torch.testing.assert_close(kl_estimate(logp, ref, "k1"), torch.tensor([0.5, -1.0]))
    torch.testing.assert_close(kl_estimate(logp, ref, "k2"), torch.tensor([0.125, 0.5]))
    torch.testing.assert_close(kl_estimate(logp, ref, "k3"),
                               torch.tensor([math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1]))
    assert (kl_estimate(torch.randn(100), torch.randn(100), "k3") >= 0).all()
    with pytest.raises(ValueError, match="k4"):
        kl_estimate(logp, ref, "k4")


def test_whiten_and_explained_variance():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = masked_whiten(x, mask)
    std = math.sqrt(2 / 3)
    torch.testing.assert_close(w, torch.tensor([[-1 / std, 0.0, 1 / std, 0.0]]), atol=1e-4, rtol=0)
    returns = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.full((1, 4), 2.0), returns, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_adaptive_kl_controller():
    c = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    assert c.update(12.0, n=100) == pytest.approx(0.1 * (1 + 0.2 * 0.1))  # error capped at +0.2
    assert c.update(3.0, n=100) == pytest.approx(0.1 * 1.02 * (1 - 0.2 * 0.1))  # -0.5 capped at -0.2
