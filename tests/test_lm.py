"""gpt/lm.py: loss normalization over the global batch, checkpoint contents, FLOPs per batch.

    pytest tests/test_lm.py               # fast ones
    pytest tests/test_lm.py -m slow       # DDP (gloo, 2 processes) vs gradient accumulation
"""
from types import SimpleNamespace

import pytest
import torch
from lightning.fabric.utilities.throughput import measure_flops

from gpt.config import GPTConfig
from gpt.flops import flops_per_token
from gpt.lm import CausalLMModule
from gpt.model import GPT
from gpt.objectives import causal_lm_loss
from tests.pretrain_fixtures import losses_by_step, run_recipe, write_config, write_random_shards


def _module(A: int, W: int = 1) -> CausalLMModule:
    torch.manual_seed(0)
    m = CausalLMModule(preset="tiny", model_config={"block_size": 16, "vocab_size": 64})
    m.configure_model()
    m.trainer = SimpleNamespace(accumulate_grad_batches=A, world_size=W)
    return m


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_accumulated_loss_is_normalized_by_the_global_target_count():
    torch.manual_seed(1)
    x = torch.randint(0, 64, (4, 16))
    y = torch.randint(0, 64, (4, 16))
    y[:2, :12] = -100  # first micro-batch: 8 targets, second: 64 (SFT-like)
    ref = _module(1)
    s, n = causal_lm_loss(ref.model(x), y)
    (s / n).backward()

    acc = _module(2)
    n_global = (y != -100).sum()
    for i in (0, 2):
        batch = {"input_ids": x[i:i + 2], "labels": y[i:i + 2], "num_targets_global": n_global.expand(2)}
        (acc.training_step(batch, i) / 2).backward()  # Lightning divides by accumulate_grad_batches
    assert torch.allclose(_grads(acc.model), _grads(ref.model), atol=1e-6)
    assert torch.allclose(acc._step_loss, s.detach() / n, atol=1e-6)  # logged loss = global-batch mean

    naive = _module(2)  # per-micro-batch means weigh the 8-target batch like the 64-target one
    for i in (0, 2):
        s_i, n_i = causal_lm_loss(naive.model(x[i:i + 2]), y[i:i + 2])
        (s_i / n_i / 2).backward()
    assert not torch.allclose(_grads(naive.model), _grads(ref.model), atol=1e-4)


def test_without_a_global_count_equal_micro_batches_are_exact():
    torch.manual_seed(2)
    x, y = torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))
    ref = _module(1)
    s, n = causal_lm_loss(ref.model(x), y)
    (s / n).backward()
    acc = _module(2)
    for i in (0, 2):
        (acc.training_step({"input_ids": x[i:i + 2], "labels": y[i:i + 2]}, i) / 2).backward()
    assert torch.allclose(_grads(acc.model), _grads(ref.model), atol=1e-6)


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_flops_per_batch_matches_measured_flops(preset):
    cfg = GPTConfig.from_preset(preset, block_size=64)
    with torch.device("meta"):
        model = GPT(cfg)
        x = torch.randint(0, cfg.vocab_size, (2, 64))
        measured = measure_flops(model, lambda: model(x), lambda out: out.sum())
    assert measured == pytest.approx(flops_per_token(cfg, 64) * 2 * 64, rel=1e-3)


def test_mfu_counts_each_device_once():
    """Lightning's Throughput sums flops_per_batch over ranks itself: a per-device value gives
    per-device FLOP/s equal to one micro-batch's FLOPs per second (a global value gave 2x MFU)."""
    from lightning.fabric.utilities.throughput import Throughput
    m = CausalLMModule(preset="tiny")
    m.trainer = SimpleNamespace(world_size=2, datamodule=SimpleNamespace(block_size=64, micro_batch_size=4))
    m.setup("fit")
    t = Throughput(available_flops=1e12, world_size=2, window_size=3)
    for i in range(3):  # one micro-batch per second on each rank
        t.update(time=float(i), batches=i + 1, samples=4 * (i + 1), flops=m.flops_per_batch)
    per_device = flops_per_token(m.config, 64) * 4 * 64
    assert t.compute()["device/flops_per_sec"] == pytest.approx(per_device)
    assert t.compute()["device/mfu"] == pytest.approx(per_device / 1e12)


def test_hparams_are_plain_and_record_reproducibility():
    m = CausalLMModule(preset="tiny", model_config={"n_layer": 1})
    assert m.config.n_layer == 1
    assert set(m.hparams) == {"preset", "model_config", "tokenizer", "lr", "weight_decay", "betas", "eps", "schedule",
                              "warmup_steps", "min_lr_ratio", "decay_fraction", "compile"}  # LightningCLI re-parses them
    assert m.model is None  # built in configure_model (sharded strategies build it in their context)


@pytest.mark.slow
def test_checkpoint_holds_model_config_tokenizer_and_loads_weights_only(tmp_path):
    from data_prep.train_tokenizer import train_tokenizer
    from tests.pretrain_fixtures import ROOT, write_text_shards
    tok = train_tokenizer(str(ROOT / "data" / "shakespeare.jsonl.gz"), str(tmp_path / "tok.json"), vocab_size=300,
                          max_chars=60_000)
    write_text_shards(tmp_path / "shards", tmp_path / "tok.json", max_chars=60_000)
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "run", tmp_path / "shards", tmp_path / "tok.json",
                       max_steps=2, checkpoint_every=2, vocab_size=tok.vocab_size)
    run_recipe(cfg)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["gpt"]["tokenizer"] == tok.to_str()
    model_cfg = GPTConfig.from_dict(ckpt["gpt"]["model_config"])
    assert (model_cfg.n_layer, model_cfg.vocab_size) == (2, tok.vocab_size)
    assert all(k.startswith("model.") for k in ckpt["state_dict"])
    model = GPT(model_cfg)
    model.load_state_dict({k[len("model."):]: v for k, v in ckpt["state_dict"].items()})
    identity = ckpt["run"]["identity"]  # what a resume must match (gpt.run)
    assert identity["tokenizer_sha256"] == tok.content_hash and len(identity["shards_sha256"]) == 64
    assert identity["model.n_layer"] == 2 and identity["global_batch_size"] == 4
    assert ckpt["tokens_seen"] == 2 * 4 * 32


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process_with_accumulation(tmp_path):
    """Same global batch: 1 process x accumulate 2 == 2 processes (DDP, gloo) x accumulate 1."""
    write_random_shards(tmp_path / "shards", train_tokens=12_000, val_tokens=1_000)
    runs = {}
    for name, A, W in (("acc", 2, 1), ("ddp", 1, 2)):
        cfg = write_config(tmp_path / f"{name}.yaml", tmp_path / name, tmp_path / "shards", max_steps=5,
                           accumulate=A, devices=W, checkpoint_every=5)
        run_recipe(cfg)
        ckpt = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
        runs[name] = (losses_by_step(tmp_path / name), ckpt["state_dict"])
    (la, sa), (ld, sd) = runs["acc"], runs["ddp"]
    assert sorted(la) == sorted(ld) == list(range(5))
    for s in la:
        assert abs(la[s] - ld[s]) <= 1e-6, (s, la[s], ld[s])
    for k in sa:
        assert torch.allclose(sa[k], sd[k], atol=1e-6, rtol=0), k
