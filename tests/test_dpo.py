"""gpt/dpo.py: the reference log-probs are computed once (each pair alone through the starting model gives the
same numbers), training runs one forward per micro-batch, the loss starts at log 2 (IPO: 1/(4 beta^2)), TRL's
metric names are logged, the table rides in checkpoints so a resume neither recomputes it nor starts without
it, and on demo-task pairs the margins rise."""
import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from gpt.dpo import DPOModule
from gpt.objectives import sequence_logprobs
from gpt.pair_data import PairCollator, PairDataModule, PairRows
from tests.chat_fixtures import shakespeare_tokenizer
from tests.pref_fixtures import csv_metrics, demo_pair_rows, make_trainer, tiny_config, write_pairs_dir

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected")


@pytest.fixture(scope="module")
def tok():
    return shakespeare_tokenizer()


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory, tok):
    return tok.save(tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory, tok_path):
    return write_pairs_dir(tmp_path_factory.mktemp("dpo"), tok_path, demo_pair_rows(48, "train", seed=1),
                           demo_pair_rows(12, "val", seed=2))


def _module(tok, tok_path, **kw) -> DPOModule:
    torch.manual_seed(0)
    kw = {"lr": 3e-3, "warmup_steps": 0, "beta": 0.5, **kw}
    m = DPOModule(model_config=tiny_config(tok.vocab_size), tokenizer=str(tok_path), **kw)
    m.configure_model()
    return m


def _dm(pairs_dir, tok_path, m=4, **kw) -> PairDataModule:
    return PairDataModule(str(pairs_dir), str(tok_path), block_size=128, micro_batch_size=m, seed=3, val_pairs=12, **kw)


class Counter:
    def __init__(self, module):
        self.n = 0
        module.model.register_forward_hook(lambda *a: setattr(self, "n", self.n + 1))


@pytest.fixture(scope="module")
def run(tmp_path_factory, pairs_dir, tok, tok_path):
    """6 steps of 4 pairs (accumulated 2 x 2), validation at 3 and 6, checkpoints at 3 and 6."""
    root = tmp_path_factory.mktemp("dpo_run")
    module = _module(tok, tok_path)
    start = {k: v.clone() for k, v in module.model.state_dict().items()}
    calls = Counter(module)
    ckpt = ModelCheckpoint(dirpath=str(root / "checkpoints"), every_n_train_steps=3, save_last=True, save_top_k=-1)
    make_trainer(root, max_steps=6, accumulate=2, val_every=3, callbacks=[ckpt]).fit(module, _dm(pairs_dir, tok_path, 2))
    return module, root, start, calls.n


def test_reference_table_is_each_pair_alone_through_the_start_weights(run, pairs_dir, tok, tok_path):
    module, _, start, _ = run
    ref = _module(tok, tok_path).model
    ref.load_state_dict(start)
    ref.eval()
    dm = _dm(pairs_dir, tok_path)
    dm._open()
    table = module.reference["train"]
    assert table.shape == (48, 2)
    read = ~table[:, 0].isnan()
    assert read.sum() == 24  # 6 steps x 4 pairs, all different pairs: only what the run reads is computed
    by_index = PairRows(dm.train.pairs, seed=None)
    for p in torch.nonzero(read).flatten().tolist()[:6]:
        batch = separate_rows(dm)([by_index[p]])  # chosen and rejected of pair p as two rows, no padding
        with torch.no_grad():
            logp = sequence_logprobs(ref(batch["input_ids"]), batch["labels"])
        torch.testing.assert_close(table[p], logp, rtol=0, atol=1e-4)
    assert module.reference["val"].shape == (12, 2) and not module.reference["val"].isnan().any()


def separate_rows(dm: PairDataModule) -> PairCollator:
    """The two-rows-per-pair layout of dm's batches: an independent computation of the same numbers."""
    assert dm.collate.share_prompt  # the default the recipes train with
    return PairCollator(dm.collate.pad_id)


def test_one_forward_per_micro_batch(run):
    _, _, _, calls = run
    # reference: 24 train pairs / 2 per call + 12 val pairs / 2; training: 6 steps x 2 micro-batches; 2 validations
    # of 12 val pairs in batches of 2
    assert calls == 12 + 6 + 12 + 2 * 6


def test_flops_count_the_padded_rows_of_the_step(run, pairs_dir, tok_path):
    """MFU's FLOPs: the last step's 2 micro-batches of 2 pairs (4 rows) at their padded length, not block_size."""
    from gpt.flops import flops_per_token

    module = run[0]
    dm = _dm(pairs_dir, tok_path, 2)
    dm._open()
    shapes = [dm.collate([dm.train[i] for i in ids])["input_ids"].shape for ids in ([20, 21], [22, 23])]
    want = sum(flops_per_token(module.config, T) * R * T for R, T in shapes) / 2
    assert module.flops_per_batch == pytest.approx(want, rel=1e-12)
    assert max(T for _, T in shapes) < 128 / 2  # the block_size count would be more than twice as large


def test_first_step_loss_is_log2_and_trl_metrics(run):
    _, root, _, _ = run
    loss = csv_metrics(root, "train/loss")
    assert sorted(loss) == list(range(6))
    assert loss[0] == pytest.approx(math.log(2), abs=1e-6)
    assert csv_metrics(root, "rewards/chosen")[0] == pytest.approx(0.0, abs=1e-5)
    for key in METRICS:
        assert sorted(csv_metrics(root, key)) == list(range(6)), key
        assert sorted(csv_metrics(root, "val/" + key)) == [3, 6], key  # at the optimizer step, as the checkpoint
    m = {k: csv_metrics(root, k)[4] for k in ("rewards/chosen", "rewards/rejected", "rewards/margins")}
    assert m["rewards/margins"] == pytest.approx(m["rewards/chosen"] - m["rewards/rejected"], abs=1e-6)
    assert csv_metrics(root, "logps/chosen")[0] < 0


def test_resume_restores_the_table_and_continues_exactly(run, tmp_path, pairs_dir, tok, tok_path):
    module, root, _, _ = run
    ckpt = root / "checkpoints" / "epoch=0-step=3.ckpt"
    assert "dpo_reference" in torch.load(ckpt, weights_only=True)
    resumed = _module(tok, tok_path)
    calls = Counter(resumed)
    make_trainer(tmp_path, max_steps=6, accumulate=2, val_every=3).fit(resumed, _dm(pairs_dir, tok_path, 2),
                                                                       ckpt_path=str(ckpt))
    assert calls.n == 3 * 2 + 6  # no reference pass: 3 steps x 2 micro-batches and one validation
    for p in ("train", "val"):
        assert torch.equal(resumed.reference[p].nan_to_num(7.0), module.reference[p].nan_to_num(7.0))
    full, again = csv_metrics(root, "train/loss"), csv_metrics(tmp_path, "train/loss")
    assert sorted(again) == [3, 4, 5]
    assert all(again[s] == pytest.approx(full[s], abs=1e-6) for s in again)


def test_resume_without_table_is_refused(run, tmp_path, pairs_dir, tok, tok_path):
    _, root, _, _ = run
    ckpt = torch.load(root / "checkpoints" / "epoch=0-step=3.ckpt", weights_only=True)
    del ckpt["dpo_reference"]
    torch.save(ckpt, tmp_path / "old.ckpt")
    with pytest.raises(ValueError, match="holds no reference log-probs .* start a new DPO run with --init_from"):
        make_trainer(tmp_path, max_steps=6, accumulate=2).fit(_module(tok, tok_path), _dm(pairs_dir, tok_path, 2),
                                                              ckpt_path=str(tmp_path / "old.ckpt"))


def test_ipo_starts_at_its_target(tmp_path, pairs_dir, tok, tok_path):
    module = _module(tok, tok_path, loss_type="ipo", beta=0.25)
    make_trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(module, _dm(pairs_dir, tok_path))
    assert csv_metrics(tmp_path, "train/loss")[0] == pytest.approx(1 / (4 * 0.25 ** 2), rel=1e-5)  # (0 - 2)^2


def test_rpo_alpha_adds_the_chosen_replies_mean_nll(tmp_path, pairs_dir, tok, tok_path):
    """At the first step policy = reference, so each pair's loss is log 2 + alpha x its chosen reply's
    mean token NLL under the starting weights, computed here by hand from the logits."""
    module = _module(tok, tok_path, rpo_alpha=0.5)
    dm = _dm(pairs_dir, tok_path, 2)
    dm._open()
    start = DPOModule(model_config=tiny_config(tok.vocab_size), tokenizer=str(tok_path))
    start.configure_model()
    start.model.load_state_dict(module.model.state_dict())
    make_trainer(tmp_path, max_steps=1, accumulate=2, limit_val_batches=0).fit(module, dm)
    # the first optimizer step's pairs: the first global batch of the sample order (2 x 2 pairs)
    batch = separate_rows(dm)([dm.train[i] for i in range(4)])  # the module read them as shared-prompt rows
    with torch.no_grad():
        logits = start.model(batch["input_ids"], position_ids=batch["position_ids"])
    chosen = batch["labels"].chunk(2)[0]
    logp = sequence_logprobs(logits.chunk(2)[0], chosen)
    nll = -(logp / (chosen != -100).sum(-1)).mean().item()
    assert csv_metrics(tmp_path, "train/nll_loss")[0] == pytest.approx(nll, rel=1e-5)
    assert csv_metrics(tmp_path, "train/loss")[0] == pytest.approx(math.log(2) + 0.5 * nll, rel=1e-5)


def test_lora_dpo_trains_only_adapters_and_exports_a_plain_model(tmp_path, pairs_dir, tok, tok_path):
    """LoRA as in SFT: the base weights stay bitwise, the reference is the base model (loss log 2 at
    the first step), and the checkpoint loads as a plain GPT that computes what the adapted model does."""
    from gpt.checkpoint import load_model
    from gpt.lora import has_lora

    module = _module(tok, tok_path, lora_r=4, lr=3e-2)
    base = {k: v.clone() for k, v in module.model.state_dict().items() if "lora_" not in k}
    trainer = make_trainer(tmp_path, max_steps=3, accumulate=2, limit_val_batches=0)
    trainer.fit(module, _dm(pairs_dir, tok_path, 2))
    assert has_lora(module.model)
    assert csv_metrics(tmp_path, "train/loss")[0] == pytest.approx(math.log(2), abs=1e-6)
    after = module.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())
    assert any(not torch.equal(after[k], torch.zeros_like(after[k])) for k in after if "lora_B" in k)
    trainer.save_checkpoint(tmp_path / "lora.ckpt")
    plain, _ = load_model(tmp_path / "lora.ckpt")
    assert not has_lora(plain)
    ids = torch.randint(3, tok.vocab_size, (2, 16))
    module.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(ids), module.model(ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw, message", [
    ({"beta": 0.0}, "model.beta must be > 0"),
    ({"loss_type": "hinge"}, "model.loss_type must be one of sigmoid, ipo, got 'hinge'"),
    ({"loss_type": "ipo", "label_smoothing": 0.1}, "only with loss_type sigmoid"),
    ({"rpo_alpha": -1.0}, "model.rpo_alpha must be >= 0"),
    ({"lora_r": -1}, "model.lora_r must be >= 0"),
])
def test_bad_settings(kw, message):
    with pytest.raises(ValueError, match=message):
        DPOModule(**kw)


@pytest.mark.slow
def test_margins_rise_on_demo_pairs(tmp_path, pairs_dir, tok, tok_path):
    module = _module(tok, tok_path, lr=3e-3, beta=0.1)
    make_trainer(tmp_path, max_steps=24, val_every=12).fit(module, _dm(pairs_dir, tok_path, 8))
    val = csv_metrics(tmp_path, "val/rewards/margins")
    train = csv_metrics(tmp_path, "rewards/margins")
    print(f"val margins {val}, train margins first/last {train[0]:.3f}/{train[23]:.3f}")
    assert 0 < val[12] < val[24]
    assert csv_metrics(tmp_path, "val/rewards/accuracies")[24] >= 0.75


# ---- 2 CPU processes: DDP and DeepSpeed ZeRO-2/3 (gpt.zero), kill -9 and resume ------------------------------
def _launch(tmp, pairs_dir, tok_path, strategy, *extra, stage="dpo", wait=True):
    import os
    import subprocess
    import sys

    from tests.pretrain_fixtures import ROOT, recipe_env

    env = {**recipe_env(), "TORCH_EXTENSIONS_DIR": os.environ.get(
        "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "gpt-pipeline" / "torch_extensions"))}
    cmd = [sys.executable, "-m", "tests.pref_launch", "--stage", stage, "--strategy", strategy, "--data", str(pairs_dir),
           "--tokenizer", str(tok_path), "--out", str(tmp), *extra]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    return tmp


@pytest.fixture(scope="module")
def strategies(tmp_path_factory, pairs_dir, tok_path):
    """6 steps of 8 pairs (2 ranks x 2 pairs x 2 accumulated) per strategy, trained on first use."""
    runs = {}

    def get(name):
        if name not in runs:
            runs[name] = _launch(tmp_path_factory.mktemp(name), pairs_dir, tok_path, name)
        return runs[name]
    return get


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_zero_losses_equal_ddp(strategies, stage):
    ddp, zero = strategies("ddp"), strategies(stage)
    for key in ("train/loss", "rewards/margins", "logps/chosen", "logps/rejected", "val/loss", "val/rewards/margins"):
        want, got = csv_metrics(ddp, key), csv_metrics(zero, key)
        assert sorted(got) == sorted(want) and want, key
        assert max(abs(got[s] - want[s]) for s in want) <= 1e-5, (key, want, got)
    assert csv_metrics(ddp, "train/loss")[0] == pytest.approx(math.log(2), abs=1e-6)
    assert (zero / "checkpoints" / "last.ckpt" / "latest").is_file()  # a DeepSpeed checkpoint directory


@pytest.mark.slow
def test_zero3_kill_9_then_resume_is_exact(strategies, tmp_path, pairs_dir, tok_path):
    """ZeRO-3, killed (SIGKILL, both ranks) after its step-3 checkpoint: the resumed run reads the reference
    table from the DeepSpeed checkpoint and repeats steps 3-5 of the uninterrupted run exactly."""
    import os
    import signal
    import time

    full = strategies("zero3")
    p = _launch(tmp_path, pairs_dir, tok_path, "zero3", "--slow", "1.0", wait=False)
    ckpt = tmp_path / "checkpoints" / "epoch=0-step=3.ckpt"
    deadline = time.time() + 600
    while not (ckpt / "latest").is_file() and p.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert (ckpt / "latest").is_file(), "no step-3 checkpoint before the run ended"
    time.sleep(2.0)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert not (tmp_path / "checkpoints" / "epoch=0-step=6.ckpt").exists()
    _launch(tmp_path, pairs_dir, tok_path, "zero3", "--ckpt_path", str(ckpt))
    resumed, want = csv_metrics(tmp_path, "train/loss"), csv_metrics(full, "train/loss")
    assert {3, 4, 5} <= set(resumed)  # the killed run never flushed its CSV; the resumed one starts at step 3
    assert all(resumed[s] == want[s] for s in (3, 4, 5)), (resumed, want)
    log = csv_metrics(tmp_path, "rewards/margins")
    assert all(log[s] == csv_metrics(full, "rewards/margins")[s] for s in (3, 4, 5))
