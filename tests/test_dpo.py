"""gpt/dpo.py: the reference log-probs are computed once (each pair alone through the starting model gives the
same numbers), training runs one forward per micro-batch, the loss starts at log 2 (IPO: 1/(4 beta^2)), TRL's
metric names are logged, the table rides in checkpoints so a resume neither recomputes it nor starts without
it, and on demo-task pairs the margins rise."""
import math

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from gpt.dpo import DPOModule
from gpt.objectives import sequence_logprobs
from gpt.pair_data import PairDataModule, PairRows
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
        batch = dm.collate([by_index[p]])  # chosen and rejected of pair p, no padding
        with torch.no_grad():
            logp = sequence_logprobs(ref(batch["input_ids"]), batch["labels"])
        torch.testing.assert_close(table[p], logp, rtol=0, atol=1e-4)
    assert module.reference["val"].shape == (12, 2) and not module.reference["val"].isnan().any()


def test_one_forward_per_micro_batch(run):
    _, _, _, calls = run
    # reference: 24 train pairs / 2 per call + 12 val pairs / 2; training: 6 steps x 2 micro-batches; 2 validations
    # of 12 val pairs in batches of 2
    assert calls == 12 + 6 + 12 + 2 * 6


def test_first_step_loss_is_log2_and_trl_metrics(run):
    _, root, _, _ = run
    loss = csv_metrics(root, "train/loss")
    assert sorted(loss) == list(range(6))
    assert loss[0] == pytest.approx(math.log(2), abs=1e-6)
    assert csv_metrics(root, "rewards/chosen")[0] == pytest.approx(0.0, abs=1e-5)
    for key in METRICS:
        assert sorted(csv_metrics(root, key)) == list(range(6)), key
        assert sorted(csv_metrics(root, "val/" + key)) == [2, 5], key
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


@pytest.mark.parametrize("kw, message", [
    ({"beta": 0.0}, "model.beta must be > 0"),
    ({"loss_type": "hinge"}, "model.loss_type must be one of sigmoid, ipo, got 'hinge'"),
    ({"loss_type": "ipo", "label_smoothing": 0.1}, "only with loss_type sigmoid"),
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
    assert 0 < val[11] < val[23]
    assert csv_metrics(tmp_path, "val/rewards/accuracies")[23] >= 0.75
