"""gpt/attention.py: the explicit weights reproduce SDPA; the pattern classifier on hand-made matrices;
the heat maps and the `gpt attention` command."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from gpt.attention import _layer_weights, attention_maps, best_pattern, capture, classify, delimiter_ids, heatmaps
from gpt.checkpoint import save_model
from gpt.config import GPTConfig
from gpt.model import GPT
from gpt.tokenizer import SPECIAL_TOKENS, Tokenizer

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "gpt2": dict(flavour="gpt2", vocab_size=300, block_size=64, n_layer=2, n_head=4, n_embd=64),
    "llama-gqa-qknorm": dict(flavour="llama", vocab_size=300, block_size=64, n_layer=2, n_head=4, n_kv_head=2,
                             n_embd=64, intermediate_size=128, qk_norm=True),
    "llama-mha": dict(flavour="llama", vocab_size=300, block_size=64, n_layer=2, n_head=4, n_embd=64),
}


def _model(name: str) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_dict(CONFIGS[name])).eval()
    with torch.no_grad():  # sharper than the N(0, 0.02) init, so the weights are far from uniform
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(8)
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_weights_times_values_equal_what_sdpa_computed(name):
    model = _model(name)
    ids = torch.randint(0, 300, (1, 40))
    with torch.no_grad():
        logits = model(ids)
        records = capture(model, ids)
        assert torch.equal(model(ids), logits)  # the hooks are gone and never changed the forward
    for r in records:
        attn, x = r["module"], r["x"]
        weights, v = _layer_weights(attn, x, r["rope"])
        assert torch.allclose(weights.sum(-1), torch.ones(1, 4, 40), atol=1e-6)
        assert torch.all(weights.triu(1) == 0)  # causal
        y = (weights @ v).transpose(1, 2).reshape(1, 40, -1)
        with torch.no_grad():
            assert (attn.proj(y) - r["output"]).abs().max() < 1e-5  # through the layer's own output projection
        # and before the projection, against SDPA on the same q, k, v
        B, T, _ = x.shape
        q, k, vv = attn.qkv(x).split([4 * 16, attn.n_kv_head * 16, attn.n_kv_head * 16], dim=-1)
        q, k, vv = (t.view(B, T, -1, 16).transpose(1, 2) for t in (q, k, vv))
        if attn.q_norm is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        if r["rope"] is not None:
            from gpt.model import apply_rope
            q, k = apply_rope(q, *r["rope"]), apply_rope(k, *r["rope"])
        sdpa = F.scaled_dot_product_attention(q, k, vv, is_causal=True, enable_gqa=attn.n_kv_head != 4)
        assert (weights @ v - sdpa).abs().max() < 1e-5
    maps = attention_maps(model, ids[0].tolist())
    assert maps.shape == (2, 4, 40, 40)
    assert not torch.allclose(maps[0, 0], maps[0, 1])  # heads differ: the maps are per head


def _rows(T: int, targets) -> torch.Tensor:
    """A (T, T) matrix whose row i spreads its mass evenly over targets(i) (itself when empty)."""
    w = torch.zeros(T, T)
    for i in range(T):
        js = [j for j in targets(i) if 0 <= j <= i] or [i]
        w[i, js] = 1.0 / len(js)
    return w


IDS = [5, 6, 0, 7, 5, 6, 0, 7, 5, 6, 0, 7]  # a repeated phrase; 0 plays the delimiter


@pytest.mark.parametrize("pattern, targets", [
    ("previous", lambda i: [i - 1]),
    ("self", lambda i: [i]),
    ("first", lambda i: [0]),
    ("broad", lambda i: range(i + 1)),
    ("same", lambda i: [j for j in range(i) if IDS[j] == IDS[i]]),
    ("induction", lambda i: [j for j in range(1, i) if IDS[j - 1] == IDS[i]]),
    ("delimiter", lambda i: [max([j for j in range(i + 1) if IDS[j] == 0], default=i)]),
])
def test_classifier_names_pure_patterns(pattern, targets):
    scores = classify(_rows(len(IDS), targets), IDS, delimiters={0})
    name, score = best_pattern(scores)
    assert name == pattern, scores
    assert score == pytest.approx(1.0)


def test_classifier_scores_are_attention_mass():
    T = 10
    half = 0.5 * _rows(T, lambda i: [i - 1]) + 0.5 * _rows(T, lambda i: [0])
    s = classify(half, list(range(T)))
    assert s["previous"] == pytest.approx((0.5 * 8 + 1.0) / 9)  # row 1: previous is position 0: all its mass
    assert s["first"] == pytest.approx((0.5 * 8 + 1.0) / 9)
    assert s["same"] != s["same"]  # NaN: no token repeats, the pattern does not apply


def _tokenizer() -> Tokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["to be or not to be, that is the question.\n"] * 20, trainer)
    return Tokenizer(tok)


def test_delimiters_are_whitespace_punctuation_and_specials():
    tok = _tokenizer()
    ids = tok.encode("to be,\n") + [tok.eot_id]
    texts = {i: tok.decode([i]) for i in delimiter_ids(tok, ids)}
    assert set(texts.values()) == {",", "\n", "<|endoftext|>"}, texts


def test_heatmap_has_a_panel_per_head_with_token_labels():
    maps = attention_maps(_model("gpt2"), list(range(12)))
    labels = [f"t{i}" for i in range(12)]
    fig = heatmaps(maps[1], labels, "layer 1", [f"head {h}" for h in range(4)])
    assert len(fig.axes) == 4
    ax = fig.axes[2]
    assert ax.get_title() == "head 2"
    assert [t.get_text() for t in ax.get_xticklabels()] == labels
    assert ax.get_images()[0].get_array().shape == (12, 12)
    one = heatmaps(maps[1, [3]], labels, "layer 1, head 3", ["head 3"])
    assert len(one.axes) == 1


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    model, tok = _model("llama-gqa-qknorm"), _tokenizer()
    return save_model(model, tmp_path_factory.mktemp("attn") / "export", tokenizer=tok)


def _gpt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpt", "attention", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=180)


def test_cli_writes_a_png_per_layer_and_the_pattern_table(export_dir, tmp_path, capsys):
    from PIL import Image

    r = _gpt("--checkpoint", str(export_dir), "--prompt", "to be or not to be, that is", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layer00.png", "layer01.png"]
    with Image.open(tmp_path / "layer00.png") as im:
        w, h = im.size
        assert w > 3 * h  # four heads side by side
    table = [line.split() for line in r.stdout.splitlines() if line.split() and line.split()[0].isdigit()]
    assert [(t[0], t[1]) for t in table] == [(str(L), str(H)) for L in range(2) for H in range(4)]
    assert all(t[2] in ("previous", "self", "first", "delimiter", "same", "induction", "broad") for t in table)
    from gpt.cli import main

    main(["attention", "--checkpoint", str(export_dir), "--prompt", "to be or not", "--layer", "1", "--head", "2",
          "--out", str(tmp_path / "one")])
    assert [p.name for p in (tmp_path / "one").iterdir()] == ["layer01_head02.png"]
    rows = [line.split()[:2] for line in capsys.readouterr().out.splitlines() if line.split()[0].isdigit()]
    assert rows == [["1", "2"]]


@pytest.mark.parametrize("args, message", [
    (["--layer", "2"], "gpt: error: --layer 2 is out of range: the model has 2 (layers 0..1)"),
    (["--head", "-1"], "gpt: error: --head -1 is out of range: the model has 4 (heads 0..3)"),
])
def test_cli_errors_are_one_line(export_dir, tmp_path, args, message, capsys):
    from gpt.cli import main

    with pytest.raises(SystemExit) as e:
        main(["attention", "--checkpoint", str(export_dir), "--prompt", "to be or not", "--out", str(tmp_path), *args])
    assert e.value.code == 2 and capsys.readouterr().err == message + "\n"


def test_cli_refuses_a_one_token_prompt(export_dir, tmp_path, capsys):
    from gpt.cli import main

    with pytest.raises(SystemExit) as e:
        main(["attention", "--checkpoint", str(export_dir), "--prompt", "to", "--out", str(tmp_path)])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("gpt: error: the prompt is 1 token(s)")


def test_cli_refuses_a_tokenizer_bigger_than_the_model(export_dir, tmp_path, capsys):
    from gpt.cli import main

    big = HFTokenizer(models.BPE())
    big.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    big.train_from_iterator(["to be or not to be, that is the question. " * 5 + str(i) for i in range(200)], trainer)
    Tokenizer(big).save(tmp_path / "big.json")
    with pytest.raises(SystemExit) as e:
        main(["attention", "--checkpoint", str(export_dir), "--prompt", "to be", "--out", str(tmp_path),
              "--tokenizer", str(tmp_path / "big.json")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "token ids but the model's vocabulary has 300" in err, err
