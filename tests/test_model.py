"""gpt/model.py and gpt/config.py: shapes, presets, KV cache equivalence, init, checkpointing."""
import math

import pytest
import torch
import torch.nn.functional as F

from gpt.config import PRESETS, GPTConfig
from gpt.flops import flops_per_token, matmul_params
from gpt.model import GPT, KVCache


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_forward_shape_and_unpadded_vocab(preset):
    cfg = GPTConfig.from_preset(preset, vocab_size=1000)
    assert cfg.padded_vocab_size == 1024
    model = GPT(cfg)
    assert model.wte.weight.shape[0] == 1024
    logits = model(torch.randint(0, 1000, (2, 7)))
    assert logits.shape == (2, 7, 1000)


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_kv_cache_matches_full_forward(preset):
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset(preset)
    model = GPT(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 20))
    full = model(idx)
    cache = KVCache(cfg, batch_size=2, max_len=32)
    pieces = [model(idx[:, :11], cache=cache), model(idx[:, 11:15], cache=cache)]
    pieces += [model(idx[:, t:t + 1], cache=cache) for t in range(15, 20)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(1, 1), (1, 3), (3, 1), (8, 8), (2, 40)])
def test_inference_head_equals_training_head(shape):
    # Without autograd the head takes W @ x.T (one row padded to two); with it, F.linear.
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", vocab_size=1000))
    idx = torch.randint(0, 1000, shape)
    with torch.no_grad():
        fast = model(idx)
    slow = model(idx).detach()
    assert fast.shape == slow.shape == (*shape, 1000)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the last position alone (decode's prefill) is a one-row product
        torch.testing.assert_close(model(idx, last_only=True), slow[:, -1:], atol=1e-5, rtol=1e-5)


def test_gqa_and_qk_norm_forward_backward():
    cfg = GPTConfig.from_preset("tiny-llama", qk_norm=True, activation_checkpointing=True)
    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    loss = F.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
    loss.backward()
    assert math.isfinite(loss.item())
    assert all(p.grad is not None for n, p in model.named_parameters() if not n.startswith("wpe"))


def test_activation_checkpointing_gives_same_grads():
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset("tiny-llama")
    a = GPT(cfg)
    b = GPT(GPTConfig.from_preset("tiny-llama", activation_checkpointing=True))
    b.load_state_dict(a.state_dict())
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    for m in (a, b):
        F.cross_entropy(m(idx).flatten(0, 1), idx.flatten()).backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=n)


def test_tied_and_untied_embeddings():
    m = GPT(GPTConfig.from_preset("tiny"))
    assert m.lm_head.weight is m.wte.weight
    m = GPT(GPTConfig.from_preset("tiny-llama"))
    assert m.lm_head.weight is not m.wte.weight


def test_scaled_residual_init():
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset("tiny", n_layer=8, n_embd=256, n_head=4)
    m = GPT(cfg)
    assert abs(m.blocks[0].mlp.proj.weight.std().item() - 0.02 / math.sqrt(16)) < 1e-3
    assert abs(m.blocks[0].mlp.fc.weight.std().item() - 0.02) < 1e-3


def test_gpt2_124m_parameter_count_and_flops():
    cfg = GPTConfig.from_preset("gpt2-124m")
    with torch.device("meta"):
        n = GPT(cfg).num_params()
    # GPT-2 small: 124.4M with the 50257 vocab; ours pads the embedding to 50304 rows.
    assert n == 124_439_808 + (50304 - 50257) * 768
    assert flops_per_token(cfg) == 6 * matmul_params(cfg) + 12 * 12 * 768 * 1024


def test_all_presets_build_on_meta_device():
    for name in PRESETS:
        with torch.device("meta"):
            GPT(GPTConfig.from_preset(name))


def test_position_past_block_size_is_refused():
    cfg = GPTConfig.from_preset("tiny", block_size=8)
    with pytest.raises(ValueError, match="block_size"):
        GPT(cfg)(torch.zeros(1, 9, dtype=torch.long))


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="unknown model config field"):
        GPTConfig.from_dict({"n_layers": 2})
