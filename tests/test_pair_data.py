"""gpt/pair_data.py: pair spans round trip, the 2B-row batch, reply labels, last-token indices under right
and left padding (the reward is read at the right token), sample order and global counts."""
import numpy as np
import pytest
import torch

from gpt.chat import ChatTemplate
from gpt.data import StepBatchSampler
from gpt.objectives import IGNORE_INDEX, token_logprobs
from gpt.pair_data import PairCollator, PairDataModule, PairRows
from gpt.shards import ExampleShards, ShardError
from tests.chat_fixtures import shakespeare_tokenizer
from tests.sft_fixtures import pairs, tiny_gpt, write_examples


@pytest.fixture(scope="module")
def tok():
    return shakespeare_tokenizer()


@pytest.fixture(scope="module")
def triples(tok):
    """(prompt ids, chosen reply ids, rejected reply ids) as the template renders them."""
    chat = ChatTemplate(tok)
    return [(chat.render_prompt(p), chat.render_reply(c), chat.render_reply(r)) for p, c, r in pairs(24, seed=2)]


@pytest.fixture
def pairs_dir(tmp_path, tok, triples):
    ex = [(p + c + r, [0] * len(p) + [1] * (len(c) + len(r)), (len(p), len(p) + len(c))) for p, c, r in triples]
    return write_examples(tmp_path / "pairs", "pairs", {"train": ex[:20], "val": ex[20:]}, tok, max_tokens_per_shard=400)


def test_spans_round_trip(pairs_dir, triples):
    ex = ExampleShards(pairs_dir, "train", "pairs", verify_sha256=True)
    assert len(ex) == 20 and len(ex.tokens.records) > 1
    ds = PairRows(ex, seed=None)
    for i, (p, c, r) in enumerate(triples[:20]):
        item = ds[i]
        assert item["chosen"].tolist() == p + c and item["rejected"].tolist() == p + r
        assert item["prompt_len"] == len(p) and item["pair_index"] == i
    with pytest.raises(ShardError, match="holds pairs data .* not sft data"):
        ExampleShards(pairs_dir, "train", "sft")


@pytest.mark.parametrize("side", ["right", "left"])
def test_batch_labels_and_last_index(pairs_dir, tok, triples, side):
    ds = PairRows(ExampleShards(pairs_dir, "train", "pairs"), seed=None)
    b = PairCollator(tok.pad_id, side)([ds[i] for i in range(4)])
    seqs = [p + c for p, c, _ in triples[:4]] + [p + r for p, _, r in triples[:4]]
    replies = [c for _, c, _ in triples[:4]] + [r for _, _, r in triples[:4]]
    T = max(map(len, seqs))
    assert b["input_ids"].shape == (8, T) and b["pair_index"].tolist() == [0, 1, 2, 3]
    assert b["response_tokens"].tolist() == [len(x) for x in replies]
    for row, (seq, reply) in enumerate(zip(seqs, replies)):
        a = T - len(seq) if side == "left" else 0
        assert b["input_ids"][row, a:a + len(seq)].tolist() == seq
        pad = b["input_ids"][row, :a].tolist() + b["input_ids"][row, a + len(seq):].tolist()
        assert set(pad) <= {tok.pad_id}
        assert b["last_index"][row] == a + len(seq) - 1 and b["input_ids"][row, b["last_index"][row]] == seq[-1]
        labels = b["labels"][row]
        assert labels[labels != IGNORE_INDEX].tolist() == reply
        assert b["position_ids"][row, a:a + len(seq)].tolist() == list(range(len(seq)))
    assert ("attn_mask" in b) == (side == "left")


def test_reward_and_logprobs_read_the_same_under_both_paddings(pairs_dir, tok):
    """Hidden state at last_index and summed reply log-probs do not depend on the padding side, and
    equal those of each sequence run alone."""
    model = tiny_gpt(tok.vocab_size, "llama").eval()
    ds = PairRows(ExampleShards(pairs_dir, "train", "pairs"), seed=None)
    items = [ds[i] for i in range(5)]
    results = {}
    for side in ("right", "left"):
        b = PairCollator(tok.pad_id, side)(items)
        with torch.no_grad():
            logits = model(b["input_ids"], position_ids=b["position_ids"], attn_mask=b.get("attn_mask"))
        results[side] = (logits[torch.arange(10), b["last_index"]], token_logprobs(logits, b["labels"]).sum(-1))
    seqs = [it["chosen"] for it in items] + [it["rejected"] for it in items]
    with torch.no_grad():
        alone = torch.stack([model(torch.from_numpy(s).unsqueeze(0))[0, -1] for s in seqs])
    for side in ("right", "left"):
        torch.testing.assert_close(results[side][0], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results["left"][1], results["right"][1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("side", ["right", "left"])
def test_shared_prompt_rows_give_the_separate_rows_numbers(pairs_dir, tok, side):
    """One row of prompt + chosen + rejected per pair: the same rewards' hidden states and reply
    log-probs as two rows per pair, in fewer tokens; the rejected reply never sees the chosen one."""
    model = tiny_gpt(tok.vocab_size, "llama").eval()
    ds = PairRows(ExampleShards(pairs_dir, "train", "pairs"), seed=None)
    items = [ds[i] for i in range(6)]
    out = {}
    for share in (False, True):
        b = PairCollator(tok.pad_id, side, share_prompt=share)(items)
        with torch.no_grad():
            h = model(b["input_ids"], position_ids=b["position_ids"], attn_mask=b.get("attn_mask"), hidden=True)
            logits = model(b["input_ids"], position_ids=b["position_ids"], attn_mask=b.get("attn_mask"))
        out[share] = (b, h[b["row_index"], b["last_index"]], token_logprobs(logits[b["row_index"]], b["labels"]).sum(-1))
    sep, shared = out[False][0], out[True][0]
    assert shared["input_ids"].shape[0] == 6 and sep["input_ids"].shape[0] == 12
    assert shared["input_ids"].numel() < 0.75 * sep["input_ids"].numel()
    assert shared["row_index"].tolist() == list(range(6)) * 2 and sep["row_index"].tolist() == list(range(12))
    assert shared["response_tokens"].tolist() == sep["response_tokens"].tolist()
    assert (shared["labels"] != IGNORE_INDEX).sum() == (sep["labels"] != IGNORE_INDEX).sum()
    for s in range(12):  # the same reply tokens, and the same last token, in each layout
        r_sh, r_se = shared["row_index"][s], sep["row_index"][s]
        assert shared["labels"][s][shared["labels"][s] != IGNORE_INDEX].tolist() == \
            sep["labels"][s][sep["labels"][s] != IGNORE_INDEX].tolist()
        assert shared["input_ids"][r_sh, shared["last_index"][s]] == sep["input_ids"][r_se, sep["last_index"][s]]
    torch.testing.assert_close(out[True][1], out[False][1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[True][2], out[False][2], rtol=1e-5, atol=1e-5)
    # Changing a chosen reply's tokens leaves its pair's rejected numbers unchanged.
    swapped = [dict(it) for it in items]
    p = swapped[0]["prompt_len"]
    swapped[0]["chosen"] = np.concatenate([swapped[0]["chosen"][:p], (swapped[0]["chosen"][p:] + 7) % 200])
    b = PairCollator(tok.pad_id, side, share_prompt=True)(swapped)
    with torch.no_grad():
        logits = model(b["input_ids"], position_ids=b["position_ids"], attn_mask=b["attn_mask"])
    again = token_logprobs(logits[b["row_index"]], b["labels"]).sum(-1)
    torch.testing.assert_close(again[6:], out[True][2][6:], rtol=1e-5, atol=1e-5)
    assert not torch.isclose(again[0], out[True][2][0])


def test_shared_rows_fall_back_to_two_rows_past_max_len(pairs_dir, tok):
    ds = PairRows(ExampleShards(pairs_dir, "train", "pairs"), seed=None)
    items = [ds[i] for i in range(3)]
    longest_shared = max(len(it["chosen"]) + len(it["rejected"]) - it["prompt_len"] for it in items)
    assert PairCollator(tok.pad_id, share_prompt=True, max_len=longest_shared)(items)["input_ids"].shape[0] == 3
    b = PairCollator(tok.pad_id, share_prompt=True, max_len=longest_shared - 1)(items)
    assert b["input_ids"].shape[0] == 6 and b["row_index"].tolist() == list(range(6))


def test_sample_order_and_global_counts(pairs_dir, tok):
    ds = PairRows(ExampleShards(pairs_dir, "train", "pairs"), seed=9)
    ds.set_global_batch(4)
    collate = PairCollator(tok.pad_id)
    seen = {}
    for m, A, W in ((4, 1, 1), (2, 1, 2), (1, 2, 2)):
        per_step: dict[int, list] = {}
        for r in range(W):
            for k, idx in enumerate(StepBatchSampler(m, A, r, W, total_steps=6)):
                per_step.setdefault(k // A, []).append(collate([ds[i] for i in idx]))
        for s, bs in per_step.items():
            n = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in bs)
            assert {int(b["num_targets_global"]) for b in bs} == {n}
            assert {int(b["num_pairs_global"]) for b in bs} == {4}
        seen[(m, A, W)] = [sorted(p for b in per_step[s] for p in b["pair_index"].tolist()) for s in range(6)]
    assert seen[(4, 1, 1)] == seen[(2, 1, 2)] == seen[(1, 2, 2)]
    first_epoch = [p for s in seen[(4, 1, 1)][:5] for p in s]
    assert sorted(first_epoch) == list(range(20))  # every pair once per epoch


def test_datamodule_checks(pairs_dir, tok):
    dm = PairDataModule(str(pairs_dir), block_size=16)
    with pytest.raises(ValueError, match=r"prompt \+ reply sequences of up to \d+ tokens, more than data.block_size 16"):
        dm._open()
    dm = PairDataModule(str(pairs_dir), block_size=128, val_pairs=3, padding_side="left")
    dm._open()
    assert len(dm.train) == 20 and len(dm.val) == 3 and dm.collate.left
