"""Sample order of gpt/data.py: Feistel bijection, world-size invariance, exact resume, token budget.

    pytest tests/test_data.py
"""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from gpt.data import (PretrainDataModule, PretrainWindows, StepBatchSampler, feistel_permute,
                      permutation_key)
from gpt.shards import TokenShards
from tests.pretrain_fixtures import write_random_shards


@pytest.mark.parametrize("n", [1, 2, 3, 7, 100, 1000, 4097])
def test_feistel_is_a_bijection(n):
    key = permutation_key(42, 0)
    image = [feistel_permute(i, n, key) for i in range(n)]
    assert sorted(image) == list(range(n))


def test_feistel_depends_on_seed_and_epoch():
    n = 1000
    perms = [[feistel_permute(i, n, permutation_key(s, e)) for i in range(n)] for s, e in [(0, 0), (1, 0), (0, 1)]]
    assert perms[0] != perms[1] and perms[0] != perms[2]
    assert perms[0] != list(range(n))  # actually shuffles
    # Large N costs O(1) memory: a web-scale index works without an array.
    big = 10**12 + 39
    j = feistel_permute(123456789, big, permutation_key(0, 0))
    assert 0 <= j < big


def _batches(m, A, W, total, start=0):
    """Per step, the union of all ranks' micro-batches (in rank-major order per micro-step)."""
    samplers = [StepBatchSampler(m, A, r, W, total, start_step=lambda: start) for r in range(W)]
    per_rank = [list(s) for s in samplers]
    steps = []
    for s in range(total - start):
        idx = []
        for r in range(W):
            for k in range(A):
                idx += per_rank[r][s * A + k]
        steps.append(sorted(idx))
    return steps


def test_world_size_does_not_change_the_global_batches():
    one = _batches(m=4, A=2, W=1, total=5)
    two = _batches(m=4, A=1, W=2, total=5)
    four = _batches(m=2, A=1, W=4, total=5)
    assert one == two == four
    assert one[0] == list(range(8)) and one[4] == list(range(32, 40))


def test_resume_continues_with_the_next_batches():
    full = list(StepBatchSampler(4, 2, 0, 1, total_steps=6))
    resumed = list(StepBatchSampler(4, 2, 0, 1, total_steps=6, start_step=lambda: 3))
    assert resumed == full[3 * 2:]
    assert len(StepBatchSampler(4, 2, 0, 1, total_steps=6, start_step=lambda: 3)) == 12  # counted from step 0


def test_windows_are_the_pure_function_of_seed_and_index(tmp_path):
    write_random_shards(tmp_path, train_tokens=5_000, val_tokens=500)
    shards = TokenShards(tmp_path, "train")
    a, b = PretrainWindows(shards, 32, seed=3), PretrainWindows(TokenShards(tmp_path, "train"), 32, seed=3)
    assert a.num_windows == (5_000 - 1) // 32
    for i in (0, 5, 77):
        x, y = a[i], b[i]
        assert torch.equal(x["input_ids"], y["input_ids"])
        w = a.window_of(i)
        raw = torch.from_numpy(shards.window(w * 32, 33))
        assert torch.equal(x["input_ids"], raw[:-1]) and torch.equal(x["labels"], raw[1:])
    # One epoch visits every window once.
    assert sorted(a.window_of(i) for i in range(a.num_windows)) == list(range(a.num_windows))
    with pytest.raises(IndexError, match="allow_repeat"):
        a.window_of(a.num_windows)
    rep = PretrainWindows(shards, 32, seed=3, allow_repeat=True)
    second = [rep.window_of(a.num_windows + i) for i in range(a.num_windows)]
    assert sorted(second) == list(range(a.num_windows)) and second != [a.window_of(i) for i in range(a.num_windows)]


def _datamodule(tmp_path, max_steps, m=4, A=1, W=1, rank=0, **kw):
    dm = PretrainDataModule(str(tmp_path), block_size=32, micro_batch_size=m, seed=5, val_windows=10, **kw)
    dm.trainer = SimpleNamespace(max_steps=max_steps, accumulate_grad_batches=A, world_size=W, global_rank=rank,
                                 global_step=0, strategy=SimpleNamespace(root_device=torch.device("cpu")))
    return dm


def test_too_many_tokens_fails_before_training_naming_both_numbers(tmp_path):
    write_random_shards(tmp_path, train_tokens=5_000, val_tokens=500)
    # 156 windows of 32 tokens = 4,992 tokens; 40 steps x 4 x 32 = 5,120 > 4,992.
    with pytest.raises(ValueError) as e:
        _datamodule(tmp_path, max_steps=40).setup("fit")
    msg = str(e.value)
    assert "5,120" in msg and "4,992" in msg and "\n" not in msg
    _datamodule(tmp_path, max_steps=40, allow_repeat=True).setup("fit")
    _datamodule(tmp_path, max_steps=39).setup("fit")


def test_datamodule_train_batches_match_across_world_sizes_and_resume(tmp_path):
    write_random_shards(tmp_path, train_tokens=8_000, val_tokens=700)
    single = _datamodule(tmp_path, 5, m=4, A=2, W=1)
    single.setup("fit")
    seq = [b["input_ids"] for b in single.train_dataloader()]  # 10 micro-batches of 4
    ranks = []
    for r in range(2):
        dm = _datamodule(tmp_path, 5, m=4, A=1, W=2, rank=r)
        dm.setup("fit")
        ranks.append([b["input_ids"] for b in dm.train_dataloader()])
    for s in range(5):
        one = torch.cat(seq[2 * s:2 * s + 2])
        two = torch.cat([ranks[0][s], ranks[1][s]])
        assert torch.equal(one, two)
    resumed = _datamodule(tmp_path, 5, m=4, A=2, W=1)
    resumed.setup("fit")
    resumed.trainer.global_step = 3
    assert all(torch.equal(a["input_ids"], b) for a, b in zip(resumed.train_dataloader(), seq[6:], strict=True))
    # A changed global batch is refused on resume, in one line.
    resumed.load_state_dict({"global_batch_size": 16, "seed": 5, "block_size": 32})
    with pytest.raises(ValueError, match="global batch 16"):
        resumed.train_dataloader()


def test_validation_set_is_fixed_and_split_across_ranks(tmp_path):
    write_random_shards(tmp_path, train_tokens=5_000, val_tokens=700)
    dm = _datamodule(tmp_path, 5)
    dm.setup("fit")
    assert len(dm.val) == min(10, (700 - 1) // 32)
    whole = torch.cat([b["input_ids"] for b in dm.val_dataloader()])
    parts = []
    for r in range(2):
        d = _datamodule(tmp_path, 5, W=2, rank=r)
        d.setup("fit")
        parts.append(torch.cat([b["input_ids"] for b in d.val_dataloader()]))
    assert sorted(map(tuple, whole.tolist())) == sorted(map(tuple, torch.cat(parts).tolist()))


def test_val_bytes_count_the_text_of_the_targets(tmp_path):
    from gpt.data import bytes_per_token
    from gpt.tokenizer import Tokenizer
    from data_prep.train_tokenizer import train_tokenizer
    from tests.pretrain_fixtures import ROOT, write_text_shards
    tok = train_tokenizer(str(ROOT / "data" / "shakespeare.jsonl.gz"), str(tmp_path / "tok.json"), vocab_size=300,
                          max_chars=50_000)
    table = bytes_per_token(tok)
    ids = tok.encode("To be, or not to be: that is the question. Ça va? 日本")
    assert int(table[np.array(ids)].sum()) == len("To be, or not to be: that is the question. Ça va? 日本".encode())
    assert table[tok.eot_id] == 0
    write_text_shards(tmp_path / "shards", tmp_path / "tok.json", max_chars=60_000)
    dm = PretrainDataModule(str(tmp_path / "shards"), tokenizer=str(tmp_path / "tok.json"), block_size=32,
                            micro_batch_size=4, val_windows=4)
    dm.trainer = _datamodule(tmp_path / "shards", 1).trainer
    dm.setup("validate")
    item = dm.val[1]
    text = tok.decode(item["labels"].tolist())
    assert abs(int(item["num_bytes"]) - len(text.encode())) <= 3 * 2  # split multi-byte chars at the window edges
