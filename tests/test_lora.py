"""gpt.lora: peft adapters on our GPT, merged exactly; LoRA checkpoints load as plain models everywhere."""
import subprocess
import sys

import pytest
import torch

from gpt.checkpoint import CheckpointError, load_model
from gpt.config import GPTConfig
from gpt.lora import MISSING_PEFT, TARGETS, LoRASettings, add_lora, has_lora, merge_lora, trainable_parameters
from gpt.model import GPT
from tests.chat_fixtures import ROOT, shakespeare_tokenizer


def tiny(flavour: str, vocab: int = 256) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.from_preset("tiny", flavour=flavour, n_layer=2, n_head=2, n_embd=32, block_size=32,
                                     vocab_size=vocab))


def perturb_adapters(model: GPT, seed: int = 1) -> None:
    """B starts at zero (no change); give A and B values so the adapters do change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_adapters_start_as_the_base_model_and_only_they_train(flavour):
    model = tiny(flavour)
    x = torch.randint(0, 256, (2, 16))
    base = model(x).detach()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, LoRASettings(r=4, alpha=8))
    assert torch.equal(model(x), base)  # B = 0
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".lora_A.default." in n or ".lora_B.default." in n for n in names)
    assert {n.split(".lora_")[0].split("blocks.")[1].split(".", 1)[1] for n in names} == set(TARGETS)
    cfg = model.config
    per_block = sum(4 * (i + o) for i, o in [(cfg.n_embd, model.blocks[0].attn.qkv.out_features),
                                              (cfg.n_embd, cfg.n_embd),
                                              (cfg.n_embd, model.blocks[0].mlp.fc.out_features),
                                              (model.blocks[0].mlp.proj.in_features, cfg.n_embd)])
    trainable, total = trainable_parameters(model)
    assert trainable == cfg.n_layer * per_block and total == trainable + tiny(flavour).num_params()
    # An optimizer step on a loss moves the adapters and nothing else.
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(x).square().mean().backward()
    opt.step()
    after = model.state_dict()
    for k, v in before.items():
        key = k if k in after else k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(after[key], v), k


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_merged_model_computes_what_the_adapted_model_computes(flavour):
    model = tiny(flavour)
    settings = LoRASettings(r=4, alpha=8, targets=["attn.qkv", "mlp.proj"])
    add_lora(model, settings)
    perturb_adapters(model)
    x = torch.randint(0, 256, (2, 24))
    adapted = model(x).detach()
    merged = merge_lora(model, settings)
    assert not has_lora(merged) and set(merged.state_dict()) == set(tiny(flavour).state_dict())
    assert (merged(x) - adapted).abs().max().item() < 1e-5
    assert (merged(x) - tiny(flavour)(x)).abs().max().item() > 1e-2  # the adapters did change the model


def lora_checkpoint(path, flavour="llama", tok=None):
    """A Lightning-style checkpoint of an adapted model, as SFTModule writes it."""
    model = tiny(flavour, vocab=tok.vocab_size if tok else 256)
    settings = LoRASettings(r=4, alpha=8)
    add_lora(model, settings)
    perturb_adapters(model)
    torch.save({"state_dict": {"model." + k: v for k, v in model.state_dict().items()},
                "gpt": {"model_config": model.config.to_dict(), "tokenizer": tok.to_str() if tok else None,
                        "lora": settings.to_dict()}}, path)
    return model


def test_load_model_merges_a_lora_checkpoint(tmp_path):
    adapted = lora_checkpoint(tmp_path / "lora.ckpt")
    loaded, _ = load_model(tmp_path / "lora.ckpt")
    assert not has_lora(loaded)
    x = torch.randint(0, 256, (2, 16))
    assert (loaded(x) - adapted.eval()(x)).abs().max().item() < 1e-5


def test_lora_weights_without_settings_are_refused(tmp_path):
    model = tiny("gpt2")
    add_lora(model, LoRASettings(r=2))
    torch.save({"state_dict": {"model." + k: v for k, v in model.state_dict().items()},
                "gpt": {"model_config": model.config.to_dict()}}, tmp_path / "x.ckpt")
    with pytest.raises(CheckpointError, match=r"x\.ckpt: holds LoRA adapter weights but no "
                                              r"checkpoint\['gpt'\]\['lora'\] settings$"):
        load_model(tmp_path / "x.ckpt")


@pytest.mark.parametrize("kwargs, message", [
    ({"r": 0}, "lora r must be an integer >= 1, got 0"),
    ({"alpha": 0}, "lora alpha must be > 0, got 0"),
    ({"dropout": 1.0}, r"lora dropout must be in \[0, 1\), got 1.0"),
    ({"targets": ["lm_head"]}, "lora targets must be one or more of attn.qkv, attn.proj, mlp.fc, mlp.proj, "
                               r"got \['lm_head'\]"),
])
def test_bad_settings_are_one_line(kwargs, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        LoRASettings(**kwargs)


def test_without_peft_one_line_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    with pytest.raises(ImportError, match=r"^LoRA needs the peft package: pip install 'gpt-pipeline\[lora\]'"):
        add_lora(tiny("gpt2"), LoRASettings())
    assert "pip install" in MISSING_PEFT


@pytest.mark.slow
def test_export_and_chat_of_a_lora_checkpoint(tmp_path):
    """`gpt export` writes merged weights (native and HF); `gpt chat` answers from a LoRA checkpoint."""
    tok = shakespeare_tokenizer()
    adapted = lora_checkpoint(tmp_path / "lora.ckpt", tok=tok).eval()
    x = torch.randint(0, tok.vocab_size, (1, 20))
    want = adapted(x)
    for fmt in ("native", "hf"):
        p = subprocess.run([sys.executable, "-m", "gpt", "export", "--checkpoint", str(tmp_path / "lora.ckpt"),
                            "--out", str(tmp_path / fmt), "--format", fmt], capture_output=True, text=True, cwd=ROOT,
                           timeout=120)
        assert p.returncode == 0, p.stderr
        exported, _ = load_model(tmp_path / fmt)
        assert (exported(x) - want).abs().max().item() < 1e-5, fmt
    p = subprocess.run([sys.executable, "-m", "gpt", "chat", "--checkpoint", str(tmp_path / "lora.ckpt"),
                        "--temperature", "0", "--max_new_tokens", "4"], input="hello\n", capture_output=True,
                       text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("> hello\n")
