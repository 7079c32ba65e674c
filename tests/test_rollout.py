"""gpt/rollout.py: the layout of sampled responses, and log-probs recomputed by a forward pass equal the sampler's."""
import pytest
import torch

from gpt.config import GPTConfig
from gpt.generate import generate
from gpt.model import GPT
from gpt.rollout import derive_seed, replace_responses, response_logprobs, sample_rollout

END, EOT, PAD = 3, 4, 5
PROMPTS = [[7, 8, 9, 10, 11, 12], [13], [14, 15, 16]]


def _model(preset: str) -> GPT:
    torch.manual_seed(0)
    # A small vocabulary so that random weights hit the stop tokens now and then.
    return GPT(GPTConfig.from_preset(preset, vocab_size=24, n_embd=32, n_head=2, block_size=64)).eval()


def _rollout(model, **kw):
    args = dict(stop_ids=[END, EOT], end_id=END, pad_id=PAD, group_size=4, max_new_tokens=10, temperature=1.0, seed=11)
    return sample_rollout(model, PROMPTS, **{**args, **kw})


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_recomputed_logprobs_equal_the_samplers_at_temperature_1(preset):
    model = _model(preset)
    ro = _rollout(model)
    logp, entropy = response_logprobs(model, ro, with_entropy=True)
    # Left-padded prompts of three lengths, responses of several lengths: the forward pass with the
    # sampler's positions and mask scores each drawn token as the KV-cache sampler did.
    assert len(set(ro.lengths.tolist())) > 1 and ro.prompt_len == 6
    torch.testing.assert_close(logp, ro.sampler_logprobs, rtol=0, atol=1e-5)
    assert (logp[~ro.response_mask] == 0).all() and (entropy[~ro.response_mask] == 0).all()
    assert (entropy[ro.response_mask] > 0).all()


def test_recomputed_logprobs_at_other_temperatures_score_the_scaled_distribution():
    model = _model("tiny")
    ro = _rollout(model, temperature=0.7)
    logp, _ = response_logprobs(model, ro, temperature=0.7)
    torch.testing.assert_close(logp, ro.sampler_logprobs, rtol=0, atol=1e-5)
    # With top-k the sampler's distribution is truncated: its log-probs are higher than the model's.
    ro = _rollout(model, top_k=3)
    logp, _ = response_logprobs(model, ro)
    assert (ro.sampler_logprobs[ro.response_mask] >= logp[ro.response_mask] - 1e-6).all()


def test_layout_groups_and_stop_tokens():
    model = _model("tiny")
    ro = _rollout(model)
    assert ro.size == 12
    # The same tokens as a plain generate call on the expanded prompts with the chunk's seed.
    expanded = [p for p in PROMPTS for _ in range(4)]
    plain = generate(model, expanded, 10, temperature=1.0, seed=derive_seed(11, 0), stop_ids=[END, EOT])
    assert ro.replies == plain
    assert ro.truncated.any() and ro.ended.any()  # both kinds occur with this seed
    for i in range(ro.size):
        n, reply = int(ro.lengths[i]), plain[i]
        resp = ro.responses[i, :n].tolist()
        if ro.truncated[i]:
            assert resp == reply and n == 10
        else:  # the stop token is part of the response (trained on), not of the reply text
            assert resp[:-1] == reply and resp[-1] in (END, EOT)
            assert bool(ro.ended[i]) == (resp[-1] == END)
        assert ro.response_mask[i].sum() == n and (ro.responses[i, n:] == PAD).all()
        p = expanded[i]
        row = ro.input_ids[i][ro.valid[i]].tolist()
        assert row == p + resp
        assert ro.input_ids[i, ro.prompt_len - len(p):ro.prompt_len].tolist() == p


def test_select_trims_padding_and_keeps_logprobs():
    model = _model("tiny-llama")
    ro = _rollout(model)
    full, _ = response_logprobs(model, ro)
    idx = [4, 5, 1]  # the one-token prompt's rows and a 6-token one
    sub = ro.select(idx)
    assert sub.prompt_len == 6 and sub.responses.size(1) == int(ro.lengths[idx].max())
    part, _ = response_logprobs(model, sub)
    torch.testing.assert_close(part, full[idx, :sub.responses.size(1)], rtol=0, atol=1e-5)
    only_short = ro.select([4, 5])
    assert only_short.prompt_len == 1


def test_chunked_sampling_is_a_function_of_the_seed():
    model = _model("tiny")
    a = _rollout(model, batch_size=5)
    b = _rollout(model, batch_size=5)
    assert a.replies == b.replies
    assert _rollout(model, seed=12).replies != a.replies
    with pytest.raises(ValueError, match="temperature must be > 0"):
        _rollout(model, temperature=0.0)


def test_replace_responses_swaps_only_the_named_rows():
    model = _model("tiny")
    ro = _rollout(model)
    before, _ = response_logprobs(model, ro)
    new = replace_responses(ro, {3: [20, 21], 6: [22]}, end_id=END, pad_id=PAD)
    assert new.replies[3] == [20, 21] and new.replies[6] == [22]
    assert new.lengths[3] == 3 and new.responses[3, :3].tolist() == [20, 21, END] and bool(new.ended[3])
    assert not new.truncated[6] and new.sampler_logprobs[3].abs().sum() == 0
    expanded = [p for p in PROMPTS for _ in range(4)]
    for i in range(ro.size):  # each row is its prompt then its (new or kept) response, the layout unchanged
        n = int(new.lengths[i])
        assert new.input_ids[i][new.valid[i]].tolist() == expanded[i] + new.responses[i, :n].tolist()
        if i not in (3, 6):
            assert new.replies[i] == ro.replies[i] and bool(new.ended[i]) == bool(ro.ended[i])
            assert bool(new.truncated[i]) == bool(ro.truncated[i]) and int(new.lengths[i]) == int(ro.lengths[i])
    after, _ = response_logprobs(model, new)
    kept = [i for i in range(ro.size) if i not in (3, 6)]
    R = min(before.size(1), after.size(1))
    torch.testing.assert_close(after[kept, :R], before[kept, :R], rtol=0, atol=1e-5)
    torch.testing.assert_close(new.sampler_logprobs[kept, :R], ro.sampler_logprobs[kept, :R])
