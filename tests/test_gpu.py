"""CUDA against the CPU: the model, KV-cache generation, bf16 training and RL log-probs on a GPU.

    python -m pytest -m gpu tests/test_gpu.py -q      # on a machine with a CUDA GPU
    bash scripts/gpu_check.sh                         # these tests, then every recipe on the GPU ($OUT/summary.md)
    GPU_TESTS_DEVICE=cpu python -m pytest -m gpu tests/test_gpu.py -q   # the same asserts with the CPU as "GPU"

Every test is marked `gpu` and skipped when torch sees no CUDA device, so `pytest -m "not slow and
not cluster"` on a CPU machine only reports them as skipped. GPU_TESTS_DEVICE=cpu runs them with the
CPU in the GPU's place (a dry run of the tests' own logic; the precision test is then skipped).
Each test checks values: CUDA fp32 logits against the CPU's for the same weights (both flavours),
greedy KV-cache tokens against the CPU's, a bf16-mixed Lightning run with clipping and the fused
AdamW whose loss falls, `precision: auto` on the GPU, and the RL sampler's log-probs against a
recomputing forward pass (tests/test_rollout.py's CPU test, on the GPU).
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from gpt.config import GPTConfig
from gpt.generate import generate
from gpt.model import GPT

DEVICE = os.environ.get("GPU_TESTS_DEVICE", "cuda")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(autouse=True)
def full_fp32_matmuls():
    """fp32 means fp32: no TF32 in matmuls or convolutions while a test runs (torch's defaults restored after)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _model(preset: str, seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    args = dict(vocab_size=512, n_embd=64, n_head=4, block_size=128, n_layer=2)
    return GPT(GPTConfig.from_preset(preset, **{**args, **kw})).eval()


def _copy_to(model: GPT, device: str) -> GPT:
    other = GPT(model.config).eval()
    other.load_state_dict(model.state_dict())
    return other.to(device)


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_fp32_logits_equal_the_cpu_logits(preset):
    cpu = _model(preset)
    dev = _copy_to(cpu, DEVICE)
    idx = torch.randint(0, cpu.config.vocab_size, (3, 96), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = cpu(idx)
        got = dev(idx.to(DEVICE)).cpu()
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert want.abs().max() > 0.05  # the check compares real logits, not near-zero ones
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_greedy_kv_cache_generation_gives_the_cpu_tokens(preset):
    # Larger weights than the default init: peaked logits, so a greedy step is rarely a near-tie.
    cpu = _model(preset, init_std=0.2)
    dev = _copy_to(cpu, DEVICE)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(5, 512, (n,), generator=g).tolist() for n in (1, 7, 19, 4)]  # left padding
    want = generate(cpu, prompts, max_new_tokens=32, temperature=0.0)
    got = generate(dev, prompts, max_new_tokens=32, temperature=0.0)
    assert [len(r) for r in want] == [32] * 4
    for p, w, o in zip(prompts, want, got):
        if w == o:
            continue
        # Tolerated only where the CPU itself nearly tied: the two devices' last bits pick differently.
        i = _first_difference(w, o)
        with torch.no_grad():
            top2 = cpu(torch.tensor([p + w[:i]]))[0, -1].topk(2).values
        margin = float(top2[0] - top2[1])
        assert margin < 1e-4, f"{DEVICE} greedy tokens differ at step {i} where the CPU's top-2 margin is {margin:.2e}"


def _text_data(tmp_path):
    from tests.chat_fixtures import shakespeare_tokenizer
    from tests.pretrain_fixtures import write_text_shards

    tok = shakespeare_tokenizer()
    (tmp_path / "tokenizer.json").write_text(tok.to_str())
    shards = write_text_shards(tmp_path / "shards", tmp_path / "tokenizer.json", max_chars=120_000)
    return tok, tmp_path / "tokenizer.json", shards


def test_bf16_mixed_training_with_clipping_and_fused_adamw(tmp_path):
    import lightning as L
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.plugins.precision import MixedPrecision

    from gpt.data import PretrainDataModule
    from gpt.lm import CausalLMModule, total_grad_norm

    tok, tok_path, shards = _text_data(tmp_path)
    clip = 0.5

    class Recorded(CausalLMModule):
        """Records each step's gradient norm before and after the module's own clipping."""

        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            before = float(total_grad_norm(self.model))
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            self.norms.append((before, float(total_grad_norm(self.model))))

    class Losses(Callback):
        def __init__(self):
            self.losses = []

        def on_train_batch_end(self, trainer, pl_module, *args):
            self.losses.append(float(trainer.callback_metrics["train/loss"]))

    L.seed_everything(0)
    module = Recorded(preset="tiny", model_config={"vocab_size": tok.vocab_size, "block_size": 64, "n_layer": 2,
                                                   "n_head": 4, "n_embd": 64},
                      tokenizer=str(tok_path), lr=3e-3, warmup_steps=3, weight_decay=0.1)
    module.norms = []
    data = PretrainDataModule(str(shards), str(tok_path), block_size=64, micro_batch_size=16, seed=0, val_windows=0)
    losses = Losses()
    trainer = L.Trainer(accelerator="gpu" if DEVICE == "cuda" else "cpu", devices=1, precision="bf16-mixed",
                        max_steps=40, gradient_clip_val=clip, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[losses])
    trainer.fit(module, data)

    assert type(trainer.precision_plugin) is MixedPrecision and trainer.precision_plugin.scaler is None
    opt = trainer.optimizers[0]
    assert opt.defaults.get("fused") is True, opt.defaults
    assert next(module.model.parameters()).device.type == DEVICE
    assert len(losses.losses) == 40 and all(math.isfinite(x) for x in losses.losses), losses.losses
    first, last = losses.losses[0], sum(losses.losses[-5:]) / 5
    assert first > 6.0 and last < first - 1.0, (first, last)  # ln(1024) = 6.93 at the start
    assert len(module.norms) == 40
    assert any(before > clip for before, _ in module.norms)  # clipping had work to do, and did it:
    assert all(after <= clip * 1.001 or before <= clip for before, after in module.norms), module.norms


def test_precision_auto_is_bf16_mixed_on_this_gpu():
    if DEVICE != "cuda":
        pytest.skip("needs the GPU itself")
    from gpt.precision import resolve_precision

    assert torch.cuda.is_bf16_supported()
    for accelerator in ("gpu", "cuda", "auto"):
        precision, why = resolve_precision("auto", accelerator)
        assert precision == "bf16-mixed", (accelerator, why)
        assert torch.cuda.get_device_name() in why


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_rollout_logprobs_equal_the_samplers_at_temperature_1(preset):
    from gpt.rollout import response_logprobs
    from tests.test_rollout import PROMPTS, _model as rollout_model, _rollout

    model = rollout_model(preset).to(DEVICE)
    ro = _rollout(model)
    assert ro.input_ids.device.type == DEVICE
    with torch.no_grad():
        logp, entropy = response_logprobs(model, ro, with_entropy=True)
    assert len(set(ro.lengths.tolist())) > 1 and ro.prompt_len == max(len(p) for p in PROMPTS)
    mask = ro.response_mask
    diff = float((logp - ro.sampler_logprobs)[mask].abs().max())
    assert diff < 1e-4, f"recomputed log-probs differ from the sampler's by {diff:.2e} on {DEVICE}"
    assert (logp[~mask] == 0).all() and (entropy[mask] > 0).all()
