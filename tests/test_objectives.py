"""gpt/objectives.py preference losses against values computed by hand with plain `math` on tiny batches:
Bradley-Terry (with and without a margin), DPO (sigmoid, label smoothing), IPO, and summed reply log-probs."""
import math

import pytest
import torch

from gpt.objectives import IGNORE_INDEX, bradley_terry_loss, dpo_loss, sequence_logprobs


def _log_sigmoid(x: float) -> float:
    return -math.log(1 + math.exp(-x))


def test_bradley_terry_by_hand():
    chosen, rejected = [1.5, -0.25, 0.0], [0.5, 0.75, 0.0]
    got = bradley_terry_loss(torch.tensor(chosen), torch.tensor(rejected))
    # -log sigmoid(1.0) = log(1 + e^-1) = 0.31326..., -log sigmoid(-1) = 1.31326..., -log sigmoid(0) = log 2
    want = [math.log(1 + math.exp(-1.0)), math.log(1 + math.exp(1.0)), math.log(2)]
    assert got.tolist() == pytest.approx(want, abs=1e-6)
    assert want[0] == pytest.approx(0.3132617, abs=1e-6)


def test_bradley_terry_margin_by_hand():
    chosen, rejected, margin = torch.tensor([2.0, 1.0]), torch.tensor([1.0, 1.0]), torch.tensor([1.0, -2.0])
    got = bradley_terry_loss(chosen, rejected, margin)
    want = [-_log_sigmoid(2.0 - 1.0 - 1.0), -_log_sigmoid(1.0 - 1.0 + 2.0)]  # log 2, log(1 + e^-2)
    assert got.tolist() == pytest.approx(want, abs=1e-6)
    # one number for every pair
    assert bradley_terry_loss(chosen, rejected, 0.5).tolist() == pytest.approx(
        [-_log_sigmoid(0.5), -_log_sigmoid(-0.5)], abs=1e-6)


def test_dpo_sigmoid_by_hand():
    pc, pr, rc, rr = [-3.0, -10.0], [-5.0, -9.0], [-4.0, -10.0], [-4.0, -10.0]
    beta = 0.5
    losses, rw_c, rw_r = dpo_loss(*(torch.tensor(v) for v in (pc, pr, rc, rr)), beta=beta)
    # pair 0: h = (-3 + 4) - (-5 + 4) = 2 -> -log sigmoid(1); pair 1: h = 0 - 1 = -1 -> -log sigmoid(-0.5)
    assert losses.tolist() == pytest.approx([math.log(1 + math.exp(-1.0)), math.log(1 + math.exp(0.5))], abs=1e-6)
    assert rw_c.tolist() == pytest.approx([0.5, 0.0]) and rw_r.tolist() == pytest.approx([-0.5, 0.5])
    assert not rw_c.requires_grad


def test_dpo_label_smoothing_by_hand():
    one = torch.tensor([0.0])
    losses, _, _ = dpo_loss(one + 1.0, one, one, one, beta=2.0, label_smoothing=0.25)  # h = 1, beta h = 2
    want = -0.75 * _log_sigmoid(2.0) - 0.25 * _log_sigmoid(-2.0)
    assert losses.item() == pytest.approx(want, abs=1e-6)


def test_ipo_by_hand():
    pc, pr, rc, rr = [-1.0, -2.0], [-2.0, -1.0], [-1.5, -1.5], [-1.5, -1.5]
    beta = 0.25  # target 1 / (2 beta) = 2
    losses, rw_c, _ = dpo_loss(*(torch.tensor(v) for v in (pc, pr, rc, rr)), beta=beta, loss_type="ipo")
    # h = 0.5 - (-0.5) = 1 -> (1 - 2)^2 = 1; h = -0.5 - 0.5 = -1 -> (-1 - 2)^2 = 9
    assert losses.tolist() == pytest.approx([1.0, 9.0])
    assert rw_c.tolist() == pytest.approx([0.125, -0.125])


def test_dpo_rejects_bad_settings():
    t = torch.zeros(1)
    with pytest.raises(ValueError, match="loss_type must be 'sigmoid' or 'ipo', got 'hinge'"):
        dpo_loss(t, t, t, t, beta=0.1, loss_type="hinge")
    with pytest.raises(ValueError, match="beta must be > 0"):
        dpo_loss(t, t, t, t, beta=0.0)


def test_sequence_logprobs_by_hand():
    # vocab 2, logits [0, log 3] -> p = [1/4, 3/4]; row 0 scores token 1 twice, row 1 token 0 once
    logits = torch.tensor([[0.0, math.log(3.0)]]).expand(2, 3, 2).clone()
    labels = torch.tensor([[IGNORE_INDEX, 1, 1], [0, IGNORE_INDEX, IGNORE_INDEX]])
    got = sequence_logprobs(logits, labels)
    assert got.tolist() == pytest.approx([2 * math.log(0.75), math.log(0.25)], abs=1e-6)


def test_selected_sequence_logprobs_equal_the_full_ones():
    """The reply-positions-only path (GPT(..., select=mask)) gives sequence_logprobs' numbers."""
    from gpt.config import GPTConfig
    from gpt.model import GPT
    from gpt.objectives import IGNORE_INDEX, selected_sequence_logprobs, sequence_logprobs

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50)).eval()
    ids = torch.randint(0, 50, (3, 12))
    labels = torch.full((3, 12), IGNORE_INDEX)
    labels[0, 4:7], labels[1, 9:11], labels[2, 2:3] = ids[0, 5:8], ids[1, 10:12], ids[2, 3:4]
    with torch.no_grad():
        full = sequence_logprobs(model(ids), labels)
        sel = selected_sequence_logprobs(model(ids, select=labels != IGNORE_INDEX), labels)
    torch.testing.assert_close(sel, full, atol=1e-5, rtol=1e-5)
    assert (full < 0).all()
