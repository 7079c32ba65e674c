"""gpt/sft_data.py + the SFT side of gpt/shards.py: shard round trip, packing plan, packed == one at a
time (loss, gradients, logits), sample order independent of world size, global target counts, resume."""
import json
import pickle

import lightning as L
import numpy as np
import pytest
import torch

from gpt.chat import ChatTemplate
from gpt.data import StepBatchSampler
from gpt.objectives import IGNORE_INDEX, causal_lm_loss
from gpt.shards import ExampleShards, ShardError, TokenShards, read_manifest
from gpt.sft_data import (PackingPlan, SFTCollator, SFTDataModule, SFTRows, best_fit, block_causal_mask,
                          row_arrays)
from tests.chat_fixtures import shakespeare_tokenizer
from tests.pretrain_fixtures import write_random_shards
from tests.sft_fixtures import conversations, tiny_gpt, write_examples


@pytest.fixture(scope="module")
def tok():
    return shakespeare_tokenizer()


@pytest.fixture(scope="module")
def rendered(tok):
    chat = ChatTemplate(tok)
    return [chat.render(c) + ((),) for c in conversations(40, seed=1)]


@pytest.fixture
def sft_dir(tmp_path, tok, rendered):
    return write_examples(tmp_path / "sft", "sft", {"train": rendered[:32], "val": rendered[32:]}, tok,
                          max_tokens_per_shard=200)


# ---- the shard format -----------------------------------------------------------------------------
def test_mask_and_offsets_round_trip(sft_dir, tok, rendered):
    ex = ExampleShards(sft_dir, "train", "sft", tokenizer=tok, verify_sha256=True)
    assert len(ex) == 32 and len(ex.tokens.records) > 1  # several shards, no example split between two
    for i, (ids, mask, _) in enumerate(rendered[:32]):
        got_ids, got_mask = ex.example(i)
        assert got_ids.tolist() == ids and got_mask.tolist() == mask
    assert ex.supervised().tolist() == [sum(m) for _, m, _ in rendered[:32]]
    m = read_manifest(sft_dir)
    assert m["kind"] == "sft" and m["splits"]["train"]["documents"] == 32
    assert sum(r["supervised_tokens"] for r in m["splits"]["train"]["shards"]) == sum(sum(m) for _, m, _ in rendered[:32])
    # the pretraining reader reads the same directory as a token stream of documents starting with end-of-text
    stream = TokenShards(sft_dir, "train").window(0, sum(len(r[0]) for r in rendered[:32]))
    assert stream.tolist() == [t for ids, _, _ in rendered[:32] for t in ids]
    assert pickle.loads(pickle.dumps(ex)).example(3)[0].tolist() == rendered[3][0]


def test_sft_reader_refuses_other_directories(tmp_path, sft_dir):
    pre = write_random_shards(tmp_path / "pre")
    with pytest.raises(ShardError, match=r"^.*pre: holds pretrain data \(written by data_prep.make_shards\), not sft "
                                         r"data: write it with data_prep.make_sft$"):
        ExampleShards(pre, "train", "sft")
    with pytest.raises(ShardError, match="holds sft data .* not pairs data"):
        ExampleShards(sft_dir, "train", "pairs")


def test_damaged_side_files_are_named(sft_dir):
    rec = read_manifest(sft_dir)["splits"]["train"]["shards"][0]
    mask = sft_dir / rec["mask"]["file"]
    mask.write_bytes(mask.read_bytes()[:-1])
    with pytest.raises(ShardError, match=r"mask.bin: truncated or corrupt mask file"):
        ExampleShards(sft_dir, "train", "sft")
    mask.unlink()
    with pytest.raises(ShardError, match=r"mask.bin: mask file listed in the manifest is missing"):
        ExampleShards(sft_dir, "train", "sft")


def test_corrupt_offsets_are_refused(sft_dir):
    rec = read_manifest(sft_dir)["splits"]["train"]["shards"][0]
    idx = sft_dir / rec["index"]["file"]
    raw = bytearray(idx.read_bytes())
    raw[32 + 8:32 + 16] = (10**6).to_bytes(8, "little")  # example 0 ends past the shard
    idx.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match="offsets do not tile the shard"):
        ExampleShards(sft_dir, "train", "sft")


# ---- packing --------------------------------------------------------------------------------------
def test_best_fit_plan():
    lengths = np.array([5, 9, 3, 7, 2, 8, 6, 1, 4, 10])
    rows = best_fit(lengths, 10, range(10))
    assert rows == [[0, 2, 4], [1, 7], [3], [5], [6, 8], [9]]  # 5 -> row0; 9 -> row1; 3 -> row0 (room 5) ...
    assert sorted(e for r in rows for e in r) == list(range(10))
    plan = PackingPlan(lengths, 10, pack=True, seed=3)
    assert sorted(plan.members.tolist()) == list(range(10)) and plan.row_tokens.max() <= 10
    assert PackingPlan(lengths, 10, pack=True, seed=3).members.tolist() == plan.members.tolist()  # deterministic
    assert PackingPlan(lengths, 10, pack=True, seed=4).members.tolist() != plan.members.tolist()
    assert len(PackingPlan(lengths, 10, pack=False, seed=3)) == 10
    with pytest.raises(ValueError, match="example 9 has 10 tokens, more than a row's 9"):
        PackingPlan(lengths, 9, pack=False, seed=None)


def test_row_labels_never_cross_conversations():
    a = (np.array([0, 3, 10, 5, 4, 11, 5]), np.array([0, 0, 0, 0, 0, 1, 1], dtype=np.uint8))
    b = (np.array([0, 3, 12, 5, 4, 13, 14, 5]), np.array([0, 0, 0, 0, 0, 1, 1, 1], dtype=np.uint8))
    row = row_arrays([a, b])
    assert row["input_ids"].tolist() == [0, 3, 10, 5, 4, 11, 5, 0, 3, 12, 5, 4, 13, 14]
    x = IGNORE_INDEX
    assert row["labels"].tolist() == [x, x, x, x, 11, 5, x, x, x, x, x, 13, 14, 5]
    assert row["position_ids"].tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 5, 6]
    # even a conversation whose first token were a target is not predicted from the previous one
    c = (np.array([7, 8]), np.array([1, 1], dtype=np.uint8))
    assert row_arrays([a, c])["labels"].tolist() == [x, x, x, x, 11, 5, x, 8]
    assert row["segment_ids"].tolist() == [0] * 7 + [1] * 7
    batch = SFTCollator(pad_id=1, attn_mask=True)([{**row, "num_targets_global": 9},
                                                   row_arrays([a])])
    assert batch["input_ids"][1].tolist() == [0, 3, 10, 5, 4, 11] + [1] * 8
    assert batch["labels"][1].tolist() == [x, x, x, x, 11, 5] + [x] * 8
    assert batch["segment_ids"][1].tolist() == [0] * 6 + [-1] * 8
    m = batch["attn_mask"]
    assert m.shape == (2, 1, 14, 14) and int(batch["num_targets_global"]) == 9
    assert m[0, 0, 8, 6].item() is False and m[0, 0, 8, 7].item() is True and m[0, 0, 8, 9].item() is False
    assert m[1, 0].diagonal().all()  # padding sees itself: no empty attention row


def _loss_and_grads(model, batch):
    model.zero_grad()
    kw = {k: batch[k] for k in ("position_ids", "attn_mask") if k in batch}
    loss, n = causal_lm_loss(model(batch["input_ids"], **kw), batch["labels"])
    loss.backward()
    return loss.detach(), int(n), {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_packed_equals_one_at_a_time(flavour, rendered, tok):
    """Same summed loss and gradients, packed into rows of 128 vs one conversation per forward."""
    model = tiny_gpt(tok.vocab_size, flavour)
    examples = [(np.array(ids), np.array(mask, dtype=np.uint8)) for ids, mask, _ in rendered[:12]]
    rows = best_fit([len(e[0]) for e in examples], 129, range(len(examples)))
    assert any(len(r) > 1 for r in rows)
    packed = SFTCollator(tok.pad_id, attn_mask=True)([row_arrays([examples[e] for e in r]) for r in rows])
    loss_p, n_p, grads_p = _loss_and_grads(model, packed)
    loss_1, n_1, grads_1 = 0.0, 0, {k: 0.0 for k in grads_p}
    for e in examples:
        loss, n, grads = _loss_and_grads(model, SFTCollator(tok.pad_id, attn_mask=False)([row_arrays([e])]))
        loss_1, n_1 = loss_1 + loss, n_1 + n
        grads_1 = {k: grads_1[k] + g for k, g in grads.items()}
    assert n_p == n_1 == sum(int(m[1:].sum()) for _, m in examples)
    torch.testing.assert_close(loss_p, loss_1, rtol=1e-5, atol=1e-5)
    for k in grads_p:
        torch.testing.assert_close(grads_p[k], grads_1[k], rtol=1e-5, atol=1e-5, msg=k)
    # a packed row's logits for its second conversation equal those of that conversation alone
    r = next(r for r in rows if len(r) > 1)
    row = SFTCollator(tok.pad_id, attn_mask=True)([row_arrays([examples[e] for e in r])])
    with torch.no_grad():
        logits = model(row["input_ids"], position_ids=row["position_ids"], attn_mask=row["attn_mask"])
        a, b = len(examples[r[0]][0]), len(examples[r[1]][0])
        alone = model(torch.from_numpy(examples[r[1]][0][:-1]).unsqueeze(0))
    torch.testing.assert_close(logits[0, a:a + b - 1], alone[0], rtol=1e-5, atol=1e-5)


def test_block_causal_mask_matches_collator():
    seg = torch.tensor([[0, 0, 1, 1, 1, -1]])
    m = block_causal_mask(seg)[0, 0]
    want = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0],
                         [0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(m, want)


# ---- sample order and global counts ----------------------------------------------------------------
def _rank_batches(ds, collate, m, A, W, steps):
    """{(step, rank, micro_step): batch} as StepBatchSampler deals them."""
    out = {}
    for r in range(W):
        sampler = StepBatchSampler(m, A, r, W, total_steps=steps)
        for k, idx in enumerate(sampler):
            out[(k // A, r, k % A)] = collate([ds[i] for i in idx])
    return out


@pytest.mark.parametrize("packing", [True, False])
def test_sample_order_and_global_targets_independent_of_world_size(sft_dir, tok, packing):
    ds = SFTRows(ExampleShards(sft_dir, "train", "sft"), block_size=128, pack=packing, seed=5)
    ds.set_global_batch(4)
    collate = SFTCollator(tok.pad_id, attn_mask=packing)
    by_world = {}
    for m, A, W in ((4, 1, 1), (2, 1, 2), (1, 2, 2), (1, 4, 1)):
        batches = _rank_batches(ds, collate, m, A, W, steps=5)
        steps = {}
        for (s, r, k), b in sorted(batches.items()):
            steps.setdefault(s, []).append(b)
        by_world[(m, A, W)] = steps
        for s, bs in steps.items():
            n = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in bs)
            assert {int(b["num_targets_global"]) for b in bs} == {n}  # every rank/micro-step knows the step's total
    def rows(steps, s):  # the step's rows without their padding (it depends on each micro-batch's longest row)
        return sorted(tuple(t for t in row.tolist() if t != tok.pad_id) for b in steps[s] for row in b["input_ids"])

    for key, steps in by_world.items():
        assert [rows(steps, s) for s in range(5)] == [rows(by_world[(4, 1, 1)], s) for s in range(5)], key


def test_epochs_reshuffle_and_allow_repeat(sft_dir):
    ds = SFTRows(ExampleShards(sft_dir, "train", "sft"), block_size=128, pack=True, seed=5)
    R = len(ds)
    first, second = [ds.row_of(i) for i in range(R)], [ds.row_of(R + i) for i in range(R)]
    assert sorted(first) == sorted(second) == list(range(R)) and first != second
    ds.allow_repeat = False
    with pytest.raises(IndexError, match="past the"):
        ds.row_of(R)


# ---- the DataModule under Lightning: resume continues the same sequence -----------------------------
class _TinySFT(L.LightningModule):
    def __init__(self, vocab_size):
        super().__init__()
        self.model = tiny_gpt(vocab_size, "llama")
        self.losses, self.rows = [], []

    def training_step(self, batch, batch_idx):
        kw = {k: batch[k] for k in ("position_ids", "attn_mask") if k in batch}
        loss_sum, _ = causal_lm_loss(self.model(batch["input_ids"], **kw), batch["labels"])
        A = self.trainer.accumulate_grad_batches
        self.losses.append(float(loss_sum.detach() / batch["num_targets_global"]))
        self.rows.append(batch["input_ids"][:, :4].tolist())
        return loss_sum * A / batch["num_targets_global"]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(dm_args, steps, ckpt_dir, ckpt_path=None, accumulate=1):
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, accumulate_grad_batches=accumulate,
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, num_sanity_val_steps=0, limit_val_batches=0,
                        default_root_dir=ckpt_dir, enable_checkpointing=False)
    torch.manual_seed(0)
    module = _TinySFT(dm_args.pop("vocab_size"))
    dm = SFTDataModule(**dm_args)
    trainer.fit(module, dm, ckpt_path=ckpt_path)
    return trainer, module


def test_datamodule_resume_and_global_batch_check(sft_dir, tok, tmp_path):
    args = dict(data_dir=str(sft_dir), block_size=128, micro_batch_size=2, seed=3)
    _, full = _fit({**args, "vocab_size": tok.vocab_size}, 6, tmp_path / "a")
    trainer, half = _fit({**args, "vocab_size": tok.vocab_size}, 3, tmp_path / "b")
    ckpt = tmp_path / "b" / "half.ckpt"
    trainer.save_checkpoint(ckpt)
    _, rest = _fit({**args, "vocab_size": tok.vocab_size}, 6, tmp_path / "b", ckpt_path=str(ckpt))
    assert half.rows + rest.rows == full.rows
    assert half.losses + rest.losses == pytest.approx(full.losses, abs=1e-5)
    with pytest.raises(ValueError, match="trained with global batch 2, this run has 4"):
        _fit({**args, "vocab_size": tok.vocab_size}, 6, tmp_path / "b", ckpt_path=str(ckpt), accumulate=2)
    with pytest.raises(ValueError, match=r"data settings differ from this run's \(seed 3 -> 4\)"):
        _fit({**args, "seed": 4, "vocab_size": tok.vocab_size}, 6, tmp_path / "b", ckpt_path=str(ckpt))


def test_datamodule_refuses_short_block_and_pretraining_dirs(sft_dir, tmp_path, tok):
    dm = SFTDataModule(str(sft_dir), block_size=8)
    with pytest.raises(ValueError, match=r"holds examples of up to \d+ tokens; data.block_size 8 fits 9"):
        dm._open()
    pre = write_random_shards(tmp_path / "pre")
    with pytest.raises(ShardError, match="holds pretrain data"):
        SFTDataModule(str(pre))._open()
    manifest = json.loads((sft_dir / "manifest.json").read_text())
    manifest["chat_template_sha256"] = "0" * 64
    (sft_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="another chat template"):
        SFTDataModule(str(sft_dir), block_size=128)._open()


def test_run_identity_and_check_run(sft_dir, tok, rendered, tmp_path):
    from types import SimpleNamespace

    ident = SFTDataModule(str(sft_dir), block_size=128, seed=3).run_identity()
    assert ident["data.seed"] == 3 and ident["data.packing"] is True and ident["data.block_size"] == 128
    assert SFTDataModule(str(sft_dir), block_size=128, seed=3).run_identity() == ident
    other = write_examples(tmp_path / "other", "sft", {"train": rendered[:31], "val": []}, tok)
    assert SFTDataModule(str(other), block_size=128, seed=3).run_identity()["shards_sha256"] != ident["shards_sha256"]
    dm = SFTDataModule(str(sft_dir), block_size=128, micro_batch_size=4, allow_repeat=False)
    with pytest.raises(ValueError, match=r"^the run reads 4,000 samples \(max_steps 1000 x global batch 4\) but the "
                                         r"train split has \d+; lower max_steps or set data.allow_repeat=true$"):
        dm.check_run(SimpleNamespace(max_steps=1000, accumulate_grad_batches=1, world_size=1))
