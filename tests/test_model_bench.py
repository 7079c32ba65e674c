"""benchmarks/model_bench.py at a tiny size: finite positive numbers, exact token counts, a table written."""
import math

import pytest

pytest.importorskip("transformers")

from benchmarks import model_bench as mb  # noqa: E402
from benchmarks.common import write_section  # noqa: E402

TINY = dict(n_layer=2, n_head=2, n_embd=32)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_train_throughput_is_finite_and_positive(precision):
    cfg = mb.gpt_config(vocab_size=256, block_size=16, shape=TINY)
    timings = mb.train_throughput(cfg, batch=2, precision=precision, warmup=1, steps=1)
    assert set(timings) == {"ours", "hf"}
    for t in timings.values():
        assert t.tokens == 2 * 16
        assert math.isfinite(t.best_tps) and t.best_tps > 0
        assert math.isfinite(t.median_tps) and t.median_tps > 0


def test_decode_generates_exactly_the_requested_tokens_on_both_sides():
    cfg = mb.gpt_config(vocab_size=256, block_size=32, shape=TINY)
    results = mb.decode_throughput(cfg, batch=2, prompt_len=5, new_tokens=7, repeats=1)
    assert set(results) == {"ours", "hf"}
    for r in results.values():
        assert r.tokens.shape == (2, 7)
        assert r.timing.tokens == 14
        assert math.isfinite(r.timing.best_tps) and r.timing.best_tps > 0
        assert r.prefill_s > 0
    # Same weights, greedy: both sides pick the same tokens.
    assert (results["ours"].tokens == results["hf"].tokens).all()


def test_render_and_write_section(tmp_path):
    cfg = mb.gpt_config(vocab_size=256, block_size=16, shape=TINY)
    train = {(256, "fp32"): mb.train_throughput(cfg, batch=1, precision="fp32", warmup=0, steps=1)}
    decode = {1: mb.decode_throughput(mb.gpt_config(256, 32, TINY), batch=1, prompt_len=4,
                                      new_tokens=3, repeats=1)}
    peaks = {"fp32": 1e11, "bf16": 2e11}
    body = mb.render(train, decode, peaks, block=16, batch=1, quick=True)
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n<!-- BEGIN other -->\nkeep me\n<!-- END other -->\n")
    write_section("model", body, path=path)
    write_section("model", body, path=path)  # rewriting replaces, never duplicates
    text = path.read_text()
    assert "keep me" in text
    assert text.count("<!-- BEGIN model -->") == 1
    assert "| vocab | precision | model | tokens/s |" in text
    assert "| batch | model | new tokens/s |" in text
