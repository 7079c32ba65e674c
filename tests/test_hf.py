"""gpt/hf.py: export to transformers and back, with logits compared (not just shapes)."""
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gpt.config import GPTConfig
from gpt.hf import export_hf, load_hf
from gpt.model import GPT, KVCache

transformers = pytest.importorskip("transformers")

ATOL = 1e-4
# Vocab sizes that are not multiples of 64, so the padded embedding rows are exercised.
CASES = {
    "gpt2": ("tiny", dict(vocab_size=1000)),
    "gpt2-nobias": ("tiny", dict(vocab_size=1000, bias=False)),
    "llama-gqa": ("tiny-llama", dict(vocab_size=1000)),  # n_kv_head=2 < n_head=4
    "llama-mqa-bias-tied": ("tiny-llama", dict(vocab_size=999, n_kv_head=1, bias=True, tie_embeddings=True,
                                               rope_theta=500000.0, norm_eps=1e-6)),
}
HF_CLASS = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}


def random_model(preset: str, seed: int = 0, **overrides) -> GPT:
    """Random weights with norms and biases away from 1 and 0, so a dropped one shows."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_preset(preset, **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.05)
        # Garbage in the padded rows: an export that leaks them changes HF's logits or shapes.
        model.wte.weight[model.config.vocab_size:] = 100.0
        model.lm_head.weight[model.config.vocab_size:] = 100.0
    return model.eval()


def hf_load(d: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def tokens(vocab_size: int, seed: int = 1) -> torch.Tensor:
    idx = torch.randint(0, vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed))
    idx[0, -1] = vocab_size - 1  # the last real row of the embedding
    return idx


@pytest.mark.parametrize("case", list(CASES))
def test_export_matches_transformers_logits(tmp_path, case):
    preset, overrides = CASES[case]
    ours = random_model(preset, **overrides)
    d = export_hf(ours, tmp_path / "hf")
    hf = hf_load(d)
    assert type(hf).__name__ == HF_CLASS[ours.config.flavour]
    assert hf.get_output_embeddings().weight.shape[0] == ours.config.vocab_size  # unpadded
    idx = tokens(ours.config.vocab_size)
    with torch.no_grad():
        expected, got = ours(idx), hf(idx).logits
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= ATOL


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_is_exact(tmp_path, case):
    preset, overrides = CASES[case]
    ours = random_model(preset, **overrides)
    back = load_hf(export_hf(ours, tmp_path / "hf"))
    assert back.config.flavour == ours.config.flavour
    assert back.config.tie_embeddings == ours.config.tie_embeddings
    assert back.wte.weight.shape == ours.wte.weight.shape  # padded again
    idx = tokens(ours.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(back(idx), ours(idx), atol=1e-6, rtol=0)


def test_bfloat16_export_keeps_dtype(tmp_path):
    ours = random_model("tiny-llama", vocab_size=1000).to(torch.bfloat16)
    d = export_hf(ours, tmp_path / "hf")
    assert json.loads((d / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in load_file(d / "model.safetensors").values())
    back = load_hf(d, dtype=torch.bfloat16)
    idx = tokens(1000)
    with torch.no_grad():
        torch.testing.assert_close(back(idx), ours(idx), atol=0, rtol=0)


def perturb_hf(model) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif "norm" in name or ".ln_" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))


def hf_gpt2(vocab_size: int = 1000):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                  bos_token_id=None, eos_token_id=None)
    model = transformers.GPT2LMHeadModel(cfg)
    perturb_hf(model)
    return model.eval()


def hf_llama(vocab_size: int = 1000):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
                                   attention_bias=True, mlp_bias=False, bos_token_id=None, eos_token_id=None)
    model = transformers.LlamaForCausalLM(cfg)
    perturb_hf(model)
    return model.eval()


@pytest.mark.parametrize("make", [hf_gpt2, hf_llama], ids=["gpt2", "llama"])
def test_load_transformers_saved_checkpoint(tmp_path, make):
    hf = make()
    hf.save_pretrained(tmp_path / "saved")
    ours = load_hf(tmp_path / "saved")
    idx = tokens(1000)
    with torch.no_grad():
        assert (ours(idx) - hf(idx).logits).abs().max().item() <= ATOL


def test_load_unprefixed_gpt2_weights(tmp_path):
    """OpenAI's GPT-2 safetensors name tensors without "transformer." and carry mask buffers."""
    hf = hf_gpt2()
    hf.save_pretrained(tmp_path / "saved")
    f = tmp_path / "saved" / "model.safetensors"
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(f).items()}
    tensors["h.0.attn.bias"] = torch.ones(1, 1, 64, 64)
    save_file(tensors, f, metadata={"format": "pt"})
    idx = tokens(1000)
    with torch.no_grad():
        assert (load_hf(tmp_path / "saved")(idx) - hf(idx).logits).abs().max().item() <= ATOL


def tiny_tokenizer():
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    from gpt.tokenizer import SPECIAL_TOKENS, Tokenizer

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["hello world, the quick brown fox"] * 20, trainer)
    return Tokenizer(tok)


def test_export_with_tokenizer(tmp_path):
    tok = tiny_tokenizer()
    d = export_hf(random_model("tiny", vocab_size=320), tmp_path / "hf", tokenizer=tok)
    cfg = json.loads((d / "config.json").read_text())
    end = tok.special_ids["<|end|>"]
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (tok.eot_id, [tok.eot_id, end], tok.pad_id)
    assert cfg["pad_token_id"] != tok.eot_id
    hf_tok = transformers.AutoTokenizer.from_pretrained(d)
    text = "hello brown world<|endoftext|>"
    assert hf_tok(text)["input_ids"] == tok.encode(text, allow_special=True)
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (tok.eot_id, end, tok.pad_id)


def one_line_error(exc_type, fn, *args, match: str):
    with pytest.raises(exc_type, match=match) as e:
        fn(*args)
    assert "\n" not in str(e.value)


def test_export_refusals(tmp_path):
    one_line_error(ValueError, export_hf, random_model("tiny-llama", qk_norm=True), tmp_path / "a", match="QK-norm")
    one_line_error(ValueError, export_hf, random_model("tiny", tie_embeddings=False), tmp_path / "b", match="untied")
    one_line_error(ValueError, export_hf, random_model("tiny", vocab_size=100), tmp_path / "c", tiny_tokenizer(),
                   match="tokenizer has")
    assert not any(tmp_path.iterdir())  # nothing written, not even a temp dir


def test_export_is_atomic_and_replaces_only_exports(tmp_path):
    model = random_model("tiny")
    d = export_hf(model, tmp_path / "hf")
    (tmp_path / "link").symlink_to(d)
    assert export_hf(model, tmp_path / "link") == d  # a previous export is replaced, through a symlink too
    (tmp_path / "link").unlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temp dirs left

    class BrokenTokenizer:
        vocab_size, eot_id, pad_id = 10, 0, 1

        def save(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        export_hf(model, tmp_path / "new", BrokenTokenizer())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]

    run = tmp_path / "run"
    run.mkdir()
    (run / "last.ckpt").write_text("precious")
    one_line_error(ValueError, export_hf, model, run, match="non-export files")
    assert (run / "last.ckpt").read_text() == "precious"


def test_load_errors(tmp_path):
    one_line_error(FileNotFoundError, load_hf, tmp_path / "nope", match="no such directory")
    d = tmp_path / "d"
    d.mkdir()
    one_line_error(ValueError, load_hf, d, match="no config.json")
    (d / "config.json").write_text("{not json")
    one_line_error(ValueError, load_hf, d, match="not valid JSON")
    (d / "config.json").write_text(json.dumps({"model_type": "bert"}))
    one_line_error(ValueError, load_hf, d, match="model_type 'bert'")
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 100, "n_positions": 16,
                                                "n_embd": 32, "n_layer": 1, "n_head": 2}))
    one_line_error(ValueError, load_hf, d, match="no model.safetensors")
    (d / "pytorch_model.bin").write_bytes(b"pickle")
    one_line_error(ValueError, load_hf, d, match="only safetensors")


def test_load_rejects_what_our_model_cannot_compute(tmp_path):
    d = export_hf(random_model("tiny-llama"), tmp_path / "hf")
    cfg = json.loads((d / "config.json").read_text())
    for change, match in [({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}}, "RoPE"),
                          ({"hidden_act": "gelu"}, "hidden_act"),
                          ({"hidden_size": 128}, "head_dim"),
                          ({"intermediate_size": 100}, "has shape"),
                          ({"num_hidden_layers": 3}, "missing weight")]:
        (d / "config.json").write_text(json.dumps({**cfg, **change}))
        one_line_error(ValueError, load_hf, d, match=match)
    (d / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 1}))
    one_line_error(ValueError, load_hf, d, match="unexpected weights")


def test_load_sharded_checkpoint(tmp_path):
    hf = hf_llama()
    hf.save_pretrained(tmp_path / "saved", max_shard_size="100KB")
    assert (tmp_path / "saved" / "model.safetensors.index.json").is_file()
    idx = tokens(1000)
    with torch.no_grad():
        assert (load_hf(tmp_path / "saved")(idx) - hf(idx).logits).abs().max().item() <= ATOL


def greedy_with_cache(model: GPT, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """Plain greedy decoding through our KV cache: prefill, then one token per step."""
    cache = KVCache(model.config, prompt.size(0), prompt.size(1) + n)
    out, logits = prompt, model(prompt, cache=cache, last_only=True)
    for _ in range(n):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out = torch.cat([out, nxt], dim=1)
        logits = model(nxt, cache=cache)
    return out


@pytest.mark.parametrize("case", ["gpt2", "llama-gqa"])
def test_greedy_generation_matches_transformers(tmp_path, case):
    preset, overrides = CASES[case]
    ours = random_model(preset, **overrides)
    hf = hf_load(export_hf(ours, tmp_path / "hf"))
    prompt = tokens(ours.config.vocab_size)[:, :8]
    with torch.no_grad():
        expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                               max_new_tokens=16, pad_token_id=0)
        assert torch.equal(greedy_with_cache(ours, prompt, 16), expected)


def _edit_weights(d: Path, **changes) -> None:
    f = d / "model.safetensors"
    tensors = load_file(f)
    tensors.update(changes)
    save_file(tensors, f, metadata={"format": "pt"})


@pytest.mark.parametrize("preset, name", [("tiny", "transformer.wte.weight"), ("tiny-llama", "model.embed_tokens.weight")])
@pytest.mark.parametrize("rows", [8, 5000])
def test_import_refuses_an_embedding_of_the_wrong_size(tmp_path, preset, name, rows):
    """transformers refuses it; before, rows were zero-filled (8) or cropped (5000) and `gpt export`
    wrote a "valid" model from it."""
    d = export_hf(random_model(preset), tmp_path / "hf")  # vocab 4096
    _edit_weights(d, **{name: torch.zeros(rows, 64)})
    with pytest.raises(ValueError) as e:
        load_hf(d)
    assert str(e.value) == f"{d}: {name} has shape ({rows}, 64), config.json implies (4096, 64)"


@pytest.mark.parametrize("preset, name, shape", [("tiny", "transformer.h.1.mlp.c_fc.weight", (64, 200)),
                                                 ("tiny-llama", "model.layers.0.self_attn.k_proj.weight", (64, 64)),
                                                 ("tiny-llama", "lm_head.weight", (4000, 64))])
def test_import_refuses_any_tensor_of_the_wrong_shape(tmp_path, preset, name, shape):
    d = export_hf(random_model(preset), tmp_path / "hf")
    _edit_weights(d, **{name: torch.zeros(shape)})
    one_line_error(ValueError, load_hf, d, match=re.escape(f"{name} has shape {shape}, config.json implies"))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool])
def test_import_refuses_non_float_weights(tmp_path, dtype):
    d = export_hf(random_model("tiny"), tmp_path / "hf")
    _edit_weights(d, **{"transformer.h.0.ln_1.weight": torch.ones(64, dtype=dtype)})
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(ValueError) as e:
        load_hf(d)
    assert str(e.value) == f"{d}: transformer.h.0.ln_1.weight has dtype {name}; weights must be floating point"
