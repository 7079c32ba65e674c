"""gpt/generate.py: cached == uncached, left-padded batches == rows alone, sampling filters, stops."""
import pytest
import torch

from gpt.config import GPTConfig
from gpt.generate import (IncrementalDecoder, generate, generate_uncached, sample_next, top_k_filter,
                          top_p_filter)
from gpt.model import GPT


def _model(preset: str, **kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.from_preset(preset, **kw)).eval()


PROMPTS = [[5, 17, 300, 42, 7, 99, 1000], [3], [8, 8, 64, 2000]]


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_greedy_cached_equals_uncached_and_rows_alone(preset):
    model = _model(preset)
    batch = generate(model, PROMPTS, max_new_tokens=12, temperature=0)
    assert batch == generate_uncached(model, PROMPTS, max_new_tokens=12, temperature=0)
    for prompt, got in zip(PROMPTS, batch):
        assert len(got) == 12
        assert got == generate_uncached(model, [prompt], max_new_tokens=12, temperature=0)[0]
        assert got == generate(model, [prompt], max_new_tokens=12, temperature=0)[0]


def test_greedy_tokens_are_the_argmax_of_the_full_forward():
    model = _model("tiny-llama")
    prompt = PROMPTS[0]
    out = generate(model, [prompt], max_new_tokens=6, temperature=0)[0]
    seq = torch.tensor([prompt + out])
    logits = model(seq)[0, len(prompt) - 1:-1]
    assert logits.argmax(-1).tolist() == out


def test_seeded_sampling_is_reproducible_and_matches_uncached():
    model = _model("tiny")
    kw = dict(max_new_tokens=10, temperature=1.0, top_k=50, top_p=0.9)
    a = generate(model, PROMPTS, seed=123, **kw)
    assert a == generate(model, PROMPTS, seed=123, **kw)
    assert a == generate_uncached(model, PROMPTS, seed=123, **kw)
    assert a != generate(model, PROMPTS, seed=124, **kw)


def test_top_k_1_equals_greedy():
    model = _model("tiny-llama")
    greedy = generate(model, PROMPTS, max_new_tokens=8, temperature=0)
    assert generate(model, PROMPTS, max_new_tokens=8, temperature=1.5, top_k=1, seed=0) == greedy


def test_top_p_filter_on_known_logits():
    probs = torch.tensor([[0.1, 0.5, 0.05, 0.3, 0.05]])
    logits = probs.log()
    # 0.5 + 0.3 = 0.8 < 0.85 -> also 0.1 is needed; the two 0.05 go.
    kept = torch.isfinite(top_p_filter(logits, 0.85))
    assert kept.tolist() == [[True, True, False, True, False]]
    assert torch.isfinite(top_p_filter(logits, 0.75)).tolist() == [[False, True, False, True, False]]
    # The most likely token survives even a tiny top_p.
    assert torch.isfinite(top_p_filter(logits, 1e-6)).tolist() == [[False, True, False, False, False]]
    # Kept logits are unchanged.
    out = top_p_filter(logits, 0.85)
    torch.testing.assert_close(out[kept], logits[kept])


def test_top_k_filter_and_sampling_support():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert torch.isfinite(top_k_filter(logits, 2)).tolist() == [[False, True, False, True]]
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, 1.0, top_p=0.5, generator=g).item() for _ in range(50)}
    assert draws == {1}  # p(1) = 0.64 >= 0.5: the nucleus is one token


def test_stop_tokens_stop_the_right_rows():
    model = _model("tiny")
    free = generate(model, PROMPTS, max_new_tokens=10, temperature=0)
    stop_row0 = free[0][3]
    per_row = [[stop_row0], [], []]
    seen: list[tuple[int, int]] = []
    out = generate(model, PROMPTS, max_new_tokens=10, temperature=0, stop_ids=per_row,
                   on_token=lambda r, t: seen.append((r, t)))
    assert out[0] == free[0][:free[0].index(stop_row0)]
    assert out[1] == free[1] and out[2] == free[2]
    assert [t for r, t in seen if r == 0] == out[0]
    assert [t for r, t in seen if r == 1] == out[1]
    # One flat list applies to every row; generation returns as soon as all rows stopped.
    firsts = [row[0] for row in free]
    calls = []
    out = generate(model, PROMPTS, max_new_tokens=10, temperature=0, stop_ids=firsts,
                   on_token=lambda r, t: calls.append(r))
    assert out == [[], [], []] and calls == []


def test_padded_vocab_is_never_sampled():
    model = _model("tiny", vocab_size=1000)  # padded to 1024 rows
    with torch.no_grad():  # make the pad rows the most attractive rows of the tied head
        model.wte.weight[1000:] = 10.0
    prompts = [[5, 17, 300], [999, 3]]
    out = generate(model, prompts, max_new_tokens=20, temperature=2.0, seed=0)
    out += generate(model, prompts, max_new_tokens=5, temperature=0)
    assert all(0 <= t < 1000 for row in out for t in row)


def test_block_size_is_respected():
    model = _model("tiny", block_size=16)
    with pytest.raises(ValueError, match="block_size"):
        generate(model, [[1] * 10], max_new_tokens=7)
    assert len(generate(model, [[1] * 10], max_new_tokens=6, temperature=0)[0]) == 6


class _ByteTok:
    """Each id is one byte: the smallest tokenizer that splits multi-byte characters."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def test_incremental_decoder_prints_whole_characters():
    text = "héllo → 世界!"
    dec = IncrementalDecoder(_ByteTok())
    pieces = [dec.push(b) for b in text.encode("utf-8")] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_incremental_decoder_does_not_hold_invalid_bytes_forever():
    dec = IncrementalDecoder(_ByteTok())
    pieces = [dec.push(b) for b in [0xFF, 0xFE, 0xFD, 0xFC, ord("a")]]
    assert pieces[3] == "\ufffd" * 4 and pieces[4] == "a"


BAD_ARGS = [  # (keyword arguments, the argument the error must name)
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(temperature=-0.5), "temperature"),  # would invert the distribution
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_p=0.0), "top_p"),  # would mean greedy
    (dict(top_p=1.5), "top_p"),  # would mean off
    (dict(top_p=float("nan")), "top_p"),
    (dict(seed=-1), "seed"),
    (dict(seed=2**64), "seed"),  # torch: "Overflow when unpacking long long", after the prompt was printed
]


@pytest.mark.parametrize("kw, name", BAD_ARGS, ids=[f"{k}={v}" for kw, _ in BAD_ARGS for k, v in kw.items()])
@pytest.mark.parametrize("fn", [generate, generate_uncached])
def test_bad_sampling_arguments_are_refused_by_name(fn, kw, name):
    model = _model("tiny")
    args = {"max_new_tokens": 4, "temperature": 1.0, "seed": 0, **kw}
    with pytest.raises(ValueError, match=rf"^{name} must be") as e:
        fn(model, PROMPTS, **args)
    assert "\n" not in str(e.value)


def test_edge_values_that_are_valid():
    model = _model("tiny")
    assert generate(model, PROMPTS, max_new_tokens=0) == [[], [], []]
    assert generate(model, PROMPTS, max_new_tokens=3, temperature=0, top_p=1.0, top_k=0, seed=2**64 - 1) == \
        generate(model, PROMPTS, max_new_tokens=3, temperature=0)
