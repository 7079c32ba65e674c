"""gpt/checkpoint.py: every checkpoint kind loads to the same logits; bad paths give one-line errors."""
import json

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from gpt.checkpoint import CheckpointError, load_model, save_model
from gpt.config import GPTConfig
from gpt.model import GPT
from gpt.tokenizer import SPECIAL_TOKENS, Tokenizer

IDX = torch.tensor([[1, 5, 9, 200, 17, 3]])


def trained_tokenizer() -> Tokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["to be or not to be, that is the question"] * 20, trainer)
    return Tokenizer(tok)


def tiny(preset: str = "tiny") -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.from_preset(preset, vocab_size=300)).eval()


def lightning_ckpt(model: GPT, path, tokenizer=None, prefix="model."):
    """What gpt.lm.CausalLMModule + Lightning write: state_dict with the module prefix, checkpoint['gpt']."""
    ckpt = {"state_dict": {prefix + k: v for k, v in model.state_dict().items()},
            "epoch": 0, "global_step": 3,
            "gpt": {"model_config": model.config.to_dict(),
                    "tokenizer": tokenizer.to_str() if tokenizer is not None else None}}
    torch.save(ckpt, path)
    return path


def _same_logits(a: GPT, b: GPT) -> None:
    assert a.config == b.config
    torch.testing.assert_close(a(IDX), b(IDX), atol=0, rtol=0)


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_native_round_trip_with_tied_weights(tmp_path, preset):
    model, tok = tiny(preset), trained_tokenizer()
    out = save_model(model, tmp_path / "export", tokenizer=tok)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert "gpt_config" in json.loads((out / "config.json").read_text())
    loaded, ltok = load_model(out)
    _same_logits(model, loaded)
    assert (loaded.lm_head.weight is loaded.wte.weight) == model.config.tie_embeddings
    assert ltok.encode("to be or not") == tok.encode("to be or not")
    # Re-export over an old export replaces it; no temp dirs are left behind.
    save_model(loaded, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert load_model(out)[1] is None


def test_save_refuses_to_replace_a_foreign_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="refusing"):
        save_model(tiny(), tmp_path)


@pytest.mark.parametrize("prefix", ["model.", "_forward_module.model.", "module.model.", "model._orig_mod."])
def test_lightning_ckpt(tmp_path, prefix):
    model, tok = tiny("tiny-llama"), trained_tokenizer()
    loaded, ltok = load_model(lightning_ckpt(model, tmp_path / "last.ckpt", tok, prefix))
    _same_logits(model, loaded)
    assert ltok.decode(tok.encode("the question")) == "the question"


def test_checkpoint_written_by_the_training_module(tmp_path):
    from gpt.lm import CausalLMModule

    tok = trained_tokenizer()
    tok.save(tmp_path / "tokenizer.json")
    module = CausalLMModule(preset="tiny", model_config={"vocab_size": 300}, tokenizer=str(tmp_path / "tokenizer.json"))
    module.configure_model()
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)  # what Lightning calls before writing the file
    torch.save(ckpt, tmp_path / "last.ckpt")
    loaded, ltok = load_model(tmp_path / "last.ckpt")
    _same_logits(module.model.eval(), loaded)
    assert ltok.to_str() == tok.to_str()


def test_lightning_ckpt_tied_gpt2_without_tokenizer(tmp_path):
    model = tiny("tiny")
    loaded, tok = load_model(lightning_ckpt(model, tmp_path / "a.ckpt"))
    _same_logits(model, loaded)
    assert loaded.lm_head.weight is loaded.wte.weight and tok is None


def test_hf_directory(tmp_path):
    from gpt.hf import export_hf

    model, tok = tiny("tiny-llama"), trained_tokenizer()
    export_hf(model, tmp_path / "hf", tokenizer=tok)
    loaded, ltok = load_model(tmp_path / "hf")
    torch.testing.assert_close(loaded(IDX), model(IDX), atol=1e-5, rtol=1e-5)
    assert ltok is not None and ltok.eot_id == tok.eot_id


def test_deepspeed_directory_goes_through_zero_consolidation(tmp_path, monkeypatch):
    import gpt.zero

    model, tok = tiny("tiny"), trained_tokenizer()
    d = tmp_path / "last.ckpt"
    (d / "checkpoint").mkdir(parents=True)
    (d / "latest").write_text("checkpoint")
    seen = []

    def fake(path):
        seen.append(path)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        return state, {"model_config": model.config.to_dict(), "tokenizer": tok.to_str()}

    monkeypatch.setattr(gpt.zero, "load_consolidated", fake)
    loaded, ltok = load_model(d)
    assert seen == [d]
    _same_logits(model, loaded)
    assert ltok.eot_id == tok.eot_id


def _one_line_error(path, match):
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and match in msg, msg


def test_bad_paths_give_one_line_errors(tmp_path):
    _one_line_error(tmp_path / "nope.ckpt", "no such file")
    good = lightning_ckpt(tiny(), tmp_path / "good.ckpt")
    data = good.read_bytes()
    (tmp_path / "trunc.ckpt").write_bytes(data[: len(data) // 2])
    _one_line_error(tmp_path / "trunc.ckpt", "not a readable PyTorch checkpoint")
    (tmp_path / "random.bin").write_bytes(bytes(range(256)) * 10)
    _one_line_error(tmp_path / "random.bin", "not a readable PyTorch checkpoint")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    _one_line_error(tmp_path / "other.pt", "not a Lightning checkpoint")
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    _one_line_error(tmp_path / "foreign.ckpt", "checkpoint['gpt']")
    (tmp_path / "empty").mkdir()
    _one_line_error(tmp_path / "empty", "not a checkpoint directory")


def test_mismatched_or_corrupt_weights_give_one_line_errors(tmp_path):
    model = tiny()
    wrong = {"model." + k: v for k, v in tiny("tiny-llama").state_dict().items()}
    torch.save({"state_dict": wrong, "gpt": {"model_config": model.config.to_dict()}}, tmp_path / "w.ckpt")
    _one_line_error(tmp_path / "w.ckpt", "do not match")
    out = save_model(model, tmp_path / "export")
    w = out / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    _one_line_error(out, "safetensors")
    (out / "config.json").write_text("{not json")
    _one_line_error(out, "not valid JSON")


def _save_lightning_state(path, model: GPT, change) -> None:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    change(state)
    torch.save({"state_dict": {"model." + k: v for k, v in state.items()},
                "gpt": {"model_config": model.config.to_dict()}}, path)


WRONG_WEIGHTS = {
    # name: (change to the state dict, the whole message after "PATH: ")
    "shape": (lambda s: s.__setitem__("blocks.0.attn.qkv.weight", torch.zeros(96, 64)),
              "blocks.0.attn.qkv.weight has shape (96, 64), the model config implies (192, 64)"),
    "embedding rows": (lambda s: s.__setitem__("wte.weight", torch.zeros(8, 64)),
                       "wte.weight has shape (8, 64), the model config implies (320, 64)"),
    "int tensor": (lambda s: s.__setitem__("norm_f.weight", torch.ones(64, dtype=torch.int32)),
                   "norm_f.weight has dtype int32; weights must be floating point"),
    "missing": (lambda s: [s.pop(k) for k in [k for k in list(s) if k.startswith("blocks.1.")]],
                "weights do not match the model config: missing blocks.1.norm1.weight, blocks.1.norm1.bias, "
                "blocks.1.attn.qkv.weight (+9 more)"),
    "unexpected": (lambda s: s.__setitem__("blocks.2.norm1.weight", torch.ones(64)),
                   "weights do not match the model config: unexpected blocks.2.norm1.weight"),
}


@pytest.mark.parametrize("case", list(WRONG_WEIGHTS))
def test_lightning_weights_that_do_not_fit_are_one_line_naming_the_tensor(tmp_path, case):
    change, message = WRONG_WEIGHTS[case]
    path = tmp_path / "w.ckpt"
    _save_lightning_state(path, tiny(), change)
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    assert str(e.value) == f"{path}: {message}"


def test_native_weights_that_do_not_fit_are_one_line_naming_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    out = save_model(tiny(), tmp_path / "export")
    w = out / "model.safetensors"
    state = load_file(w)
    state["wte.weight"] = torch.zeros(5000, 64)
    save_file(state, w)
    with pytest.raises(CheckpointError) as e:
        load_model(out)
    assert str(e.value) == f"{w}: wte.weight has shape (5000, 64), the model config implies (320, 64)"


def test_unreadable_files_say_why_and_never_advise_weights_only_false(tmp_path):
    import argparse

    (tmp_path / "empty.ckpt").write_bytes(b"")
    _one_line_error(tmp_path / "empty.ckpt", "empty file (0 bytes)")
    torch.save({"a": torch.zeros(2)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    _one_line_error(tmp_path / "legacy.pt", "not the zip archive torch.save writes")
    model = tiny()
    torch.save({"state_dict": model.state_dict(), "hparams": argparse.Namespace(lr=1.0)}, tmp_path / "ns.ckpt")
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "ns.ckpt")
    assert str(e.value) == (f"{tmp_path / 'ns.ckpt'}: holds a pickled argparse.Namespace, which the weights-only "
                            "loader refuses (unpickling it could run code from the file)")


def test_one_line_rewrites_torchs_weights_only_advice():
    from gpt.checkpoint import one_line

    advice = ("Weights only load failed. In PyTorch 2.6, we changed the default value of the `weights_only` "
              "argument ... Re-running `torch.load` with `weights_only` set to `False` will likely succeed\n"
              "WeightsUnpickler error: \n\nUnsupported operand 149\n\nCheck the documentation")
    assert one_line(RuntimeError(advice)) == "holds pickled data the weights-only loader refuses (Unsupported operand 149)"
    assert one_line(RuntimeError("first\nsecond")) == "first"
    assert one_line(EOFError()) == "EOFError"


def test_a_tokenizer_larger_than_the_model_is_refused(tmp_path):
    model, tok = GPT(GPTConfig.from_preset("tiny", vocab_size=100)).eval(), trained_tokenizer()
    path = lightning_ckpt(model, tmp_path / "a.ckpt", tok)
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    assert str(e.value) == (f"{path}: the checkpoint's tokenizer has {tok.vocab_size} token ids but the model's "
                            "vocabulary has 100: they do not belong together")


def test_a_gpt2_vocabulary_with_appended_specials_fits_its_model(tmp_path):
    """gpt.tokenizer appends <|pad|> and the chat specials after GPT-2's 50257 ids: plain text never
    yields them, so a GPT-2-sized model (here: 256 bytes + <|endoftext|>) still takes the tokenizer."""
    from tokenizers import pre_tokenizers

    from gpt.checkpoint import check_vocab

    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(byte_symbols)} | {"<|endoftext|>": 256}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tok = Tokenizer.from_file(tmp_path / "vocab.json")
    assert tok.vocab_size == 262 and tok.eot_id == 256
    check_vocab(tok, GPTConfig.from_preset("tiny", vocab_size=257), "gpt2")
    with pytest.raises(CheckpointError, match="has 257 token ids but the model's vocabulary has 256"):
        check_vocab(tok, GPTConfig.from_preset("tiny", vocab_size=256), "gpt2")
