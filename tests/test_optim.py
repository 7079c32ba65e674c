"""gpt/optim.py and gpt/objectives.py: parameter groups, lr schedules, summed loss with ignore_index.

    pytest tests/test_optim.py
"""
import math

import pytest
import torch
import torch.nn.functional as F

from gpt.config import GPTConfig
from gpt.model import GPT
from gpt.objectives import causal_lm_loss, token_logprobs
from gpt.optim import LRSchedule, build_optimizer, param_groups


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_no_weight_decay_on_norms_biases_embeddings(preset):
    model = GPT(GPTConfig.from_preset(preset))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    undecayed = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "wte.weight" in undecayed and not any("norm" in n or n.endswith("bias") for n in decayed)
    assert any(n.endswith("qkv.weight") for n in decayed) and any(n.endswith("proj.weight") for n in decayed)
    if preset == "tiny":  # tied head = the embedding: counted once, undecayed
        assert "lm_head.weight" not in decayed | undecayed and "wpe.weight" in undecayed
    else:
        assert "lm_head.weight" in decayed
    assert len(decayed) + len(undecayed) == len(list(model.parameters()))
    opt = build_optimizer(model, lr=1e-3)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]



def test_adamw_is_fused_on_cpu_unless_asked_not_and_steps_like_the_loop():
    """Fused on CPU (one kernel per parameter, not ~11 ops); fused=False (a GradScaler) gives the for-loop."""
    torch.manual_seed(0)
    models = [GPT(GPTConfig.from_preset("tiny", n_layer=1, n_embd=32, n_head=2, vocab_size=64, block_size=16))
              for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [build_optimizer(models[0], lr=1e-2), build_optimizer(models[1], lr=1e-2, fused=False)]
    assert opts[0].defaults["fused"] is True and not opts[1].defaults["fused"]
    x = torch.randint(0, 64, (2, 16))
    for _ in range(3):
        for m, o in zip(models, opts):
            F.cross_entropy(m(x).flatten(0, 1), x.flatten()).backward()
            o.step()
            o.zero_grad()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # the same AdamW (steps of ~1e-2), another kernel

def test_cosine_schedule():
    s = LRSchedule("cosine", warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert s(0) == pytest.approx(0.1) and s(9) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert s(110) == pytest.approx(0.1) and s(500) == pytest.approx(0.1)
    values = [s(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_wsd_schedule():
    s = LRSchedule("wsd", warmup_steps=5, total_steps=100, min_lr_ratio=0.0, decay_fraction=0.2)
    assert s(4) == pytest.approx(1.0) and s(50) == 1.0 and s(79) == 1.0
    assert s(90) == pytest.approx(0.5) and s(100) == pytest.approx(0.0)


def test_lambdalr_steps_per_optimizer_step_and_state_is_plain():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, LRSchedule("cosine", 2, 10))
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:3] == [0.5, 1.0, 1.0] and lrs[3] < 1.0
    state = sched.state_dict()
    assert isinstance(state["lr_lambdas"][0], dict)  # the schedule's fields, not a pickled function


def test_causal_lm_loss_is_a_sum_with_ignore_index():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, :2] = -100
    s, n = causal_lm_loss(logits, labels)
    assert int(n) == 8
    ref = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    assert torch.allclose(s / n, ref, atol=1e-6)
    lp = token_logprobs(logits, labels)
    assert lp[0, :2].abs().sum() == 0 and torch.allclose(-lp.sum(), s, atol=1e-5)
    assert math.isfinite(float(s))
