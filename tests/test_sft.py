"""gpt.sft.SFTModule: packed rows train exactly like one conversation at a time; LoRA wiring.

    pytest tests/test_sft.py
"""
import pytest
import torch

from gpt.chat import ChatTemplate
from gpt.lora import TARGETS, has_lora
from gpt.objectives import causal_lm_loss
from gpt.sft import SFTModule
from gpt.sft_data import SFTCollator, row_arrays
from tests.chat_fixtures import shakespeare_tokenizer
from tests.sft_fixtures import conversations

MODEL = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 256}


@pytest.fixture(scope="module")
def tok():
    return shakespeare_tokenizer()


def module(tok, flavour: str = "gpt2", **kwargs) -> SFTModule:
    torch.manual_seed(0)
    m = SFTModule(preset="tiny" if flavour == "gpt2" else "tiny-llama",
                  model_config={**MODEL, "vocab_size": tok.vocab_size}, **kwargs)
    m.configure_model()
    return m


def loss_and_grads(m: SFTModule, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    m.zero_grad(set_to_none=True)
    loss_sum, n = causal_lm_loss(m.batch_logits(batch), batch["labels"])
    (loss_sum / n).backward()
    return (loss_sum / n).detach(), {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_a_packed_row_trains_like_its_conversations_one_at_a_time(tok, flavour):
    """Restarting positions and the block-causal mask reach the model: without them the packed loss differs."""
    chat = ChatTemplate(tok)
    parts = [tuple(map(__import__("numpy").asarray, chat.render(c))) for c in conversations(4, seed=3)]
    pad = tok.pad_id
    packed = SFTCollator(pad, attn_mask=True)([row_arrays(parts)])
    alone = SFTCollator(pad, attn_mask=False)([row_arrays([p]) for p in parts])
    assert packed["input_ids"].shape[0] == 1 and alone["input_ids"].shape[0] == len(parts)
    m = module(tok, flavour)
    l_packed, g_packed = loss_and_grads(m, packed)
    l_alone, g_alone = loss_and_grads(m, alone)
    assert abs(l_packed.item() - l_alone.item()) < 1e-5
    assert g_packed.keys() == g_alone.keys()
    for k in g_packed:
        assert torch.allclose(g_packed[k], g_alone[k], atol=1e-6, rtol=1e-4), k
    # The same row as one plain causal sequence (what a module that drops the two keys computes) differs.
    plain = {k: v for k, v in packed.items() if k not in ("position_ids", "attn_mask")}
    l_plain, g_plain = loss_and_grads(m, plain)
    assert abs(l_plain.item() - l_alone.item()) > 1e-4  # 10x the tolerance above, on a random-init model
    assert any(not torch.allclose(g_plain[k], g_alone[k], atol=1e-6, rtol=1e-4) for k in g_alone)


def test_lora_module_adapts_and_records_its_settings(tok):
    m = module(tok, "llama", lora_r=4, lora_alpha=8.0, lora_targets=["attn.qkv", "mlp.fc"])
    assert has_lora(m.model)
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n and (".attn.qkv." in n or ".mlp.fc." in n) for n in trainable)
    assert m.hparams.lora_r == 4 and m.hparams.lora_targets == ["attn.qkv", "mlp.fc"]
    ckpt = {}
    m.on_save_checkpoint(ckpt)
    assert ckpt["gpt"]["lora"] == {"r": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["attn.qkv", "mlp.fc"]}
    full = module(tok)
    assert not has_lora(full.model) and all(p.requires_grad for p in full.parameters())
    ckpt = {}
    full.on_save_checkpoint(ckpt)
    assert "lora" not in ckpt["gpt"]


@pytest.mark.parametrize("kwargs, message", [
    ({"lora_r": -1}, r"model.lora_r must be >= 0 \(0 = full fine-tuning\), got -1"),
    ({"lora_r": 2, "lora_targets": ["wte"]}, "lora targets must be one or more of " + ", ".join(TARGETS)),
])
def test_bad_lora_settings_are_one_line(tok, kwargs, message):
    with pytest.raises(ValueError, match=message):
        SFTModule(model_config={**MODEL, "vocab_size": tok.vocab_size}, **kwargs)


def test_optimizer_of_a_lora_module_has_no_empty_group(tok):
    """LoRA trains matrices only: an empty no-decay group would be dropped by DeepSpeed and break the scheduler."""
    from gpt.optim import build_optimizer
    m = module(tok, lora_r=2)
    opt = build_optimizer(m.model, lr=1e-3, weight_decay=0.1)
    assert [len(g["params"]) for g in opt.param_groups] == [2 * 4 * MODEL["n_layer"]]


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_head_on_supervised_positions_only_gives_the_full_loss_and_gradients(tok, flavour):
    """SFTModule.batch_loss (logits at the targets only) == CausalLMModule's (logits everywhere)."""
    from gpt.lm import CausalLMModule
    chat = ChatTemplate(tok)
    parts = [tuple(map(__import__("numpy").asarray, chat.render(c))) for c in conversations(6, seed=5)]
    batch = SFTCollator(tok.pad_id, attn_mask=True)([row_arrays(parts[:3]), row_arrays(parts[3:])])
    m = module(tok, flavour)
    results = []
    for loss_fn in (m.batch_loss, lambda b: CausalLMModule.batch_loss(m, b)):
        m.zero_grad(set_to_none=True)
        loss_sum, n = loss_fn(batch)
        (loss_sum / n).backward()
        results.append((loss_sum.detach(), int(n), {k: p.grad.clone() for k, p in m.named_parameters()}))
    (a, na, ga), (b, nb, gb) = results
    assert na == nb == int((batch["labels"] != -100).sum()) and torch.allclose(a, b, rtol=1e-6)
    for k in ga:
        assert torch.allclose(ga[k], gb[k], atol=1e-7, rtol=1e-5), k
