"""data_prep.make_demo_pairs: hard negatives are wrong and of the named kind, pairing follows the rules (sampled
right vs sampled wrong, synthetic negatives, the reference answer when nothing was right) with every kind
counted, training prompts avoid the held-out file, and the output goes through the real pairs data prep."""
import json
import random

import pytest

from data_prep.make_demo_pairs import disjoint, hard_negatives, held_out, main, make_demo_pairs, pair_rows
from data_prep.make_demo_task import make_demo_task
from data_prep.make_sft import make_sft
from gpt.checkpoint import save_model
from gpt.demo_task import check, make_rows, prompt_messages
from gpt.shards import ExampleShards
from tests.chat_fixtures import shakespeare_tokenizer
from tests.sft_fixtures import tiny_gpt


def _row(family, seed=0):
    return next(r for r in make_rows(40, "train", seed) if r["family"] == family)


def test_hard_negatives_are_wrong_and_of_their_kind():
    for r in make_rows(300, "train", seed=5):
        neg = hard_negatives(r)
        assert neg["no_answer"] and neg["wrong_value"], r
        assert not any(check(r, t) for v in neg.values() for t in v), r
    cnt = _row("count")
    n = int(cnt["answer"])
    assert set(hard_negatives(cnt)["off_by_one"]) == {str(n - 1), str(n + 1)}  # count >= 1
    cmp = _row("compare")
    lo, hi = cmp["key"].split("|")[1:]
    assert hard_negatives(cmp)["wrong_value"] == [hi if cmp["answer"] == lo else lo]  # the other number
    fl = _row("first_last")
    words = fl["key"].split("|", 1)[1].split()
    assert set(hard_negatives(fl)["wrong_value"]) == set(words) - {fl["answer"]}  # the question's other words
    assert "off_by_one" not in hard_negatives(_row("recall"))  # one word, nothing beside it


def test_pairing_rules_and_counts():
    rows = [_row(f) for f in ("lookup", "copy", "count", "compare")]
    right = [r["answer"] for r in rows]
    replies = [[right[0] + ".", "7777", "7777 "],   # right and wrong sampled (a duplicate wrong reply)
               [right[1], right[1].upper()],         # only right (one reply, as the checker normalizes): synthetic
               ["1000", "2000"],                     # never right: the reference answer is chosen
               ["", " <|user|> 4"]]                  # empty, or holding a control token: reference vs synthetic
    pairs, c = pair_rows(rows, replies, random.Random(0), pairs_per_prompt=2)
    by_key = {}
    for p in pairs:
        by_key.setdefault(p["key"], []).append(p)
    lookup, copy, count, compare = (by_key[r["key"]] for r in rows)
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in lookup] == [(right[0] + ".", "7777")]
    assert len(copy) == 1 and copy[0]["rejected_source"] in ("off_by_one", "wrong_value", "no_answer")
    assert copy[0]["chosen"][0]["content"] == right[1] and copy[0]["chosen_source"] == "sampled"
    assert sorted(p["rejected"][0]["content"] for p in count) == ["1000", "2000"]
    assert all(p["chosen"][0]["content"] == right[2] and p["chosen_source"] == "reference" for p in count)
    assert len(compare) == 1 and compare[0]["chosen_source"] == "reference" and compare[0]["rejected_source"] != "sampled"
    for p in pairs:
        r = rows[[x["key"] for x in rows].index(p["key"])]
        assert p["prompt"] == prompt_messages(r) and check(r, p["chosen"][0]["content"])
        assert not check(r, p["rejected"][0]["content"])
    assert c["pairs"] == 5 and c["samples"] == 9 and c["samples_correct"] == 3
    assert c["chosen_sampled"] == 2 and c["chosen_reference"] == 3
    assert c["rejected_sampled"] == 3 and sum(c[f"rejected_{k}"] for k in ("off_by_one", "wrong_value", "no_answer")) == 2
    assert c["prompts_all_correct"] == 1 and c["prompts_none_correct"] == 2 and c["samples_with_special_tokens"] == 1


def test_disjoint_drops_rows_of_the_held_out_file(tmp_path):
    val = make_rows(30, "val", seed=0)
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in val))
    keys, prompts = held_out(str(tmp_path / "val.jsonl"))
    train = make_rows(30, "train", seed=4)
    kept, dropped = disjoint(train + val[:3], keys, prompts)
    assert kept == train and dropped == 3
    with pytest.raises(ValueError, match="no such file"):
        held_out(str(tmp_path / "missing.jsonl"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A tiny untrained model (its replies are nonsense) and the demo task's held-out file."""
    tmp = tmp_path_factory.mktemp("demo_pairs")
    tok = shakespeare_tokenizer()
    ckpt = save_model(tiny_gpt(tok.vocab_size, block_size=160), tmp / "model", tokenizer=tok)
    make_demo_task(str(tmp / "task"), train=0, val=200, seed=0)
    return tmp, ckpt, tok


def test_end_to_end_through_pairs_data_prep(demo, capsys):
    tmp, ckpt, tok = demo
    s = make_demo_pairs(str(ckpt), str(tmp / "out"), val_file=str(tmp / "task" / "val.jsonl"), train_prompts=24,
                        val_prompts=6, samples=2, max_new_tokens=6, seed=3)
    printed = capsys.readouterr().out
    assert "train.jsonl: " in printed and "val.jsonl: " in printed
    assert json.loads((tmp / "out" / "summary.json").read_text()) == s
    rows = [json.loads(line) for line in (tmp / "out" / "train.jsonl").read_text().splitlines()]
    c = s["splits"]["train"]
    assert len(rows) == c["pairs"] == 24 and c["samples"] == 48 and c["dropped_overlapping_val_file"] == 0
    assert c["chosen_sampled"] + c["chosen_reference"] == 24
    keys, prompts = held_out(str(tmp / "task" / "val.jsonl"))
    assert not any(r["key"] in keys for r in rows)
    # The prompts are the task's "post" split: phrasings neither the SFT data nor the evaluation uses.
    assert s["train_split"] == "post"
    assert [r["prompt"] for r in rows] == [prompt_messages(x) for x in make_rows(24, "post", 3)]
    m = make_sft(str(tmp / "out" / "train.jsonl"), str(tok.save(tmp / "tok.json")), str(tmp / "pairs"), kind="pairs",
                 val_source=str(tmp / "out" / "val.jsonl"), block_size=160, progress=False)
    assert set(m["formats"].values()) == {"explicit"} and m["skipped"] == {}  # every reply renders
    assert len(ExampleShards(tmp / "pairs", "train", "pairs")) + m["duplicates"] == 24
    assert len(ExampleShards(tmp / "pairs", "val", "pairs")) > 0
    again = make_demo_pairs(str(ckpt), str(tmp / "again"), val_file=str(tmp / "task" / "val.jsonl"), train_prompts=24,
                            val_prompts=6, samples=2, max_new_tokens=6, seed=3)
    assert again["splits"] == s["splits"]
    assert (tmp / "again" / "train.jsonl").read_bytes() == (tmp / "out" / "train.jsonl").read_bytes()
    assert not (tmp / "out" / "dev.jsonl").exists()


def test_dev_pairs_come_from_the_dev_split_and_change_no_other_file(demo):
    tmp, ckpt, _ = demo
    kw = dict(val_file=str(tmp / "task" / "val.jsonl"), train_prompts=12, val_prompts=6, samples=2, max_new_tokens=6,
              seed=3)
    without = make_demo_pairs(str(ckpt), str(tmp / "a"), **kw)
    with_dev = make_demo_pairs(str(ckpt), str(tmp / "b"), dev_prompts=5, **kw)
    for name in ("train.jsonl", "val.jsonl"):
        assert (tmp / "a" / name).read_bytes() == (tmp / "b" / name).read_bytes(), name
    assert {k: v for k, v in with_dev["splits"].items() if k != "dev"} == without["splits"]
    rows = [json.loads(line) for line in (tmp / "b" / "dev.jsonl").read_text().splitlines()]
    dev = make_rows(5, "dev", 3)
    assert len(rows) == with_dev["splits"]["dev"]["pairs"] == 5
    assert [r["prompt"] for r in rows] == [prompt_messages(x) for x in dev]
    assert all(r["key"] == x["key"] for r, x in zip(rows, dev))


def test_cli_errors_are_one_line(demo, tmp_path, capsys):
    _, ckpt, _ = demo
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(ckpt), "--out", str(tmp_path), "--samples", "0"])
    assert e.value.code == 1 and capsys.readouterr().err == "error: --samples must be >= 1, got 0\n"
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no such file or directory" in err and err.count("\n") == 1
    from tests.rl_fixtures import write_reward_model  # a reward model is not the policy to sample

    rm = write_reward_model(tmp_path / "rm.ckpt")
    with pytest.raises(SystemExit):
        main(["--checkpoint", rm, "--out", str(tmp_path / "out")])
    assert capsys.readouterr().err == f"error: --checkpoint {rm}: holds a reward model (recipes/reward.py), not a " \
                                      "language model; the pairs are the SFT model's own samples\n"
    assert not (tmp_path / "out").exists()
