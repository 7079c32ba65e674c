"""gpt.demo_task and data_prep.make_demo_task: correct answers, determinism, a truly held-out split, the checker."""
import hashlib
import itertools
import json
import random
import re

import pytest

from data_prep.make_demo_task import main, make_demo_task
from gpt.chat import validate_messages
from gpt.demo_task import (FAMILIES, SPLITS, SYSTEM_PROMPTS, VALUE_SPLIT, WORDS, _word_distance, _words_of, check,
                           key_split, make_row, make_rows, near_duplicate, normalize, prompt_messages, reward)


def words_in(text: str) -> list[str]:
    return [w for w in re.findall(r"\b[a-z]+\b", text) if w in WORDS]


def numbers_in(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", text)]


def expected_answer(row: dict) -> str:
    """The answer recomputed from the question text alone, family by family."""
    users = [m["content"] for m in row["messages"] if m["role"] == "user"]
    q, f = users[0], row["family"]
    if f == "copy":
        return " ".join(words_in(q))
    if f == "count":
        return str(len(words_in(q)))
    if f == "first_last":
        ws = words_in(q)
        return ws[0] if "first" in q else ws[-1]
    if f == "compare":
        a, b = numbers_in(q)
        return str(max(a, b) if "larger" in q else min(a, b))
    if f == "lookup":
        table = dict(re.findall(r"([a-z]+): (\d)", q))
        (key,) = [w for w in re.findall(r"\b([a-z]+)\b(?!:)", q) if w in WORDS]  # the word not followed by ":"
        return table[key]
    if f in ("recall", "followup"):
        (word,) = words_in(q)
        return word
    raise AssertionError(f)


def test_templates_never_contain_task_words_and_counts():
    for fam in FAMILIES.values():
        assert len(fam.templates["train"]) >= 8 and len(fam.templates["val"]) >= 3, fam.name
        assert len(fam.templates["post"]) >= 3 and len(fam.templates["dev"]) >= 3, fam.name
        for a, b in itertools.combinations(SPLITS, 2):
            assert not set(fam.templates[a]) & set(fam.templates[b]), (fam.name, a, b)
        for t in sum((fam.templates[s] for s in SPLITS), ()):
            assert not words_in(re.sub(r"\{\w+\}", "", t)), t  # so words_in() reads only values
            assert t.count("|") == fam.turns - 1, t
    for a, b in itertools.combinations(SPLITS, 2):
        assert not set(SYSTEM_PROMPTS[a]) & set(SYSTEM_PROMPTS[b])


def test_training_has_many_system_prompts_none_near_another_splits():
    """With four, a word of a held-out system prompt became a family's cue; many (of every kind) teach
    the model that a system turn does not choose the task. None is within a few word edits of the
    system prompts the other splits ask under."""
    assert len(SYSTEM_PROMPTS["train"]) >= 30
    others = [_words_of(t) for s in SPLITS if s != "train" for t in SYSTEM_PROMPTS[s]]
    assert not [t for t in SYSTEM_PROMPTS["train"] if near_duplicate(t, others)]
    # A system turn never holds a value (a task word or a digit) that a reply could copy.
    assert not [t for s in SPLITS for t in SYSTEM_PROMPTS[s] if words_in(t.lower()) or re.search(r"\d", t)]


@pytest.mark.parametrize("split", ["train", "val", "post", "dev"])
def test_rows_are_valid_conversations_with_the_right_answer(split):
    rows = make_rows(600, split, seed=1)
    assert {r["family"] for r in rows} == set(FAMILIES)
    for r in rows:
        validate_messages(r["messages"], require_final_assistant=True)
        assert r["messages"][-1] == {"role": "assistant", "content": r["answer"]}
        assert prompt_messages(r) == r["messages"][:-1] and prompt_messages(r)[-1]["role"] == "user"
        assert r["answer"] == expected_answer(r), r
        assert r["split"] == split and key_split(r["key"]) == VALUE_SPLIT[split]
        turns = [m for m in r["messages"] if m["role"] != "system"]
        assert len(turns) == 2 * FAMILIES[r["family"]].turns


def test_deterministic_and_prefix_stable():
    a = make_rows(200, "train", seed=7)
    assert a == make_rows(200, "train", seed=7)
    assert make_rows(50, "train", seed=7) == a[:50]
    assert make_rows(200, "train", seed=8) != a
    assert make_row("compare", "val", random.Random(3)) == make_row("compare", "val", random.Random(3))


def test_held_out_split_is_unseen_in_phrasings_and_values():
    train, val = make_rows(5000, "train", seed=0), make_rows(1000, "val", seed=0)
    assert not {r["template"] for r in train} & {r["template"] for r in val}
    assert not {r["key"] for r in train} & {r["key"] for r in val}
    # Every phrasing of each split is used, and the user turns never repeat across splits.
    for split, rows in (("train", train), ("val", val)):
        used = {r["template"] for r in rows}
        assert len(used) == sum(len(f.templates[split]) for f in FAMILIES.values())
        systems = {r["messages"][0]["content"] for r in rows if r["messages"][0]["role"] == "system"}
        assert systems == set(SYSTEM_PROMPTS[split])
    user = lambda rows: {m["content"] for r in rows for m in r["messages"] if m["role"] == "user"}
    assert not user(train) & user(val)
    # Values: a held-out word list or number pair is not used by any training family either.
    first_user = lambda r: next(m["content"] for m in r["messages"] if m["role"] == "user")
    pairs = lambda rows: {tuple(sorted(numbers_in(first_user(r)))) for r in rows if r["family"] == "compare"}
    lists = lambda rows: {tuple(words_in(first_user(r))) for r in rows if r["family"] in ("first_last", "count")}
    single = lambda rows: {(r["family"], r["answer"]) for r in rows if r["family"] in ("copy", "recall", "followup")}
    assert not pairs(train) & pairs(val) and len(pairs(val)) >= 5
    assert not lists(train) & lists(val) and not single(train) & single(val)
    # A single-word family's held-out words are answers of other families in training.
    assert {w for _, w in single(val)} <= {r["answer"] for r in train}
    share = sum(key_split("words|" + " ".join(w)) == "val" for w in itertools.permutations(WORDS, 2)) / (26 * 25)
    assert 0.15 < share < 0.25


def test_post_split_asks_training_values_in_unseen_phrasings():
    """RL and preference prompts: new phrasings and system prompts, training values only."""
    train, val, post = (make_rows(n, s, seed=0) for n, s in ((5000, "train"), (1000, "val"), (3000, "post")))
    templates = lambda rows: {r["template"] for r in rows}
    assert not templates(post) & (templates(train) | templates(val))
    assert len(templates(post)) == sum(len(f.templates["post"]) for f in FAMILIES.values())
    user = lambda rows: {m["content"] for r in rows for m in r["messages"] if m["role"] == "user"}
    assert not user(post) & (user(train) | user(val))
    assert not {r["key"] for r in post} & {r["key"] for r in val}
    assert {r["key"] for r in post} & {r["key"] for r in train}  # the same value space as training
    systems = {r["messages"][0]["content"] for r in post if r["messages"][0]["role"] == "system"}
    assert systems == set(SYSTEM_PROMPTS["post"])
    # Adding the split changed no train or val row: the files of earlier runs stay valid. (Pinned again
    # 2026-11-30 when training got its many system prompts: train rows with a system turn changed, val did not.)
    rows = make_rows(700, "train", seed=0) + make_rows(300, "val", seed=0)
    digest = hashlib.sha256(json.dumps(rows).encode()).hexdigest()
    assert digest == "67c72d4ca34d65356d000f9930950f1871f660fb164d44bcb21d5b3b6a594e9e"


def test_dev_split_asks_held_out_values_in_phrasings_of_its_own():
    """For tuning: held-out values (never trained on) in phrasings and system prompts no other split uses;
    and adding it changed no row of the other splits (the digests of the files earlier runs used)."""
    rows = {s: make_rows(n, s, seed=0) for s, n in (("train", 5000), ("val", 1000), ("post", 3000), ("dev", 1000))}
    templates = lambda rows: {r["template"] for r in rows}
    others = set().union(*(templates(rows[s]) for s in ("train", "val", "post")))
    assert not templates(rows["dev"]) & others
    assert len(templates(rows["dev"])) == sum(len(f.templates["dev"]) for f in FAMILIES.values())
    user = lambda rows: {m["content"] for r in rows for m in r["messages"] if m["role"] == "user"}
    assert not user(rows["dev"]) & set().union(*(user(rows[s]) for s in ("train", "val", "post")))
    keys = lambda s: {r["key"] for r in rows[s]}
    assert not keys("dev") & (keys("train") | keys("post")) and keys("dev") & keys("val")
    systems = {r["messages"][0]["content"] for r in rows["dev"] if r["messages"][0]["role"] == "system"}
    assert systems == set(SYSTEM_PROMPTS["dev"])
    digest = lambda rows: hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]
    assert {s: digest(make_rows(500, s, seed=0)) for s in ("train", "val")} == \
        {"train": "4fbb49dccbf0bde2", "val": "9bd706798e67eaa6"}


def test_post_phrasings_are_many_and_no_turn_is_near_another_splits():
    """The post split's composed phrasings: 30+ per family, and none of their user turns within a few
    word edits of any turn of another split (any family), so post stays unseen by SFT and by both
    evaluations; the check is the same near_duplicate that builds the pool, tested on its own here."""
    assert near_duplicate('Please count the words of "{words}".', [_words_of('Please count the words in "{words}".')])
    assert not near_duplicate('Type "{words}".', [_words_of('Say again: "{words}"')])
    others = [_words_of(turn) for f in FAMILIES.values() for s in ("train", "val", "dev")
              for t in f.templates[s] for turn in t.split("|")]
    for fam in FAMILIES.values():
        assert len(fam.templates["post"]) >= 30, (fam.name, len(fam.templates["post"]))
        for t in fam.templates["post"]:
            for turn in t.split("|"):
                w = _words_of(turn)
                assert all(_word_distance(w, o) > max(1, min(len(w), len(o)) // 4) for o in others), turn
    assert _word_distance("a b c".split(), "a x c d".split()) == 2


def test_unknown_family_and_split():
    with pytest.raises(ValueError, match=r"^unknown demo task families \['nope'\]"):
        make_rows(3, "train", families=["nope"])
    with pytest.raises(ValueError, match=r"^split must be one of train, val, post, dev, got 'test'$"):
        make_row("copy", "test", random.Random(0))


@pytest.mark.parametrize("answer, reply, ok", [
    ("19", "19", True), ("19", " 19 \n", True), ("19", "19.", True), ("19", "19!", True), ("19", "'19'", True),
    ("19", '"19."', True), ("king ship", "King  Ship", True), ("king ship", "king ship?", True),
    ("19", "The answer is 19.", False), ("19", "191", False), ("19", "1 9", False), ("19", "", False),
    ("19", "19 or 20", False), ("king ship", "king, ship", False), ("king ship", "ship king", False),
    ("king", "king king", False), ("19", "19,", False),
])
def test_checker(answer, reply, ok):
    row = {"answer": answer}
    assert check(row, reply) is ok
    assert reward(row, reply) == (1.0 if ok else 0.0)


def test_normalize():
    assert normalize("  Ship\tRAIN\n king.. ") == "ship rain king"
    assert normalize("'bed'!") == "bed"


def test_make_demo_task_writes_jsonl(tmp_path, capsys):
    counts = make_demo_task(str(tmp_path / "t"), train=40, val=20, post=14, dev=7, seed=3)
    lines = (tmp_path / "t" / "train.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == make_rows(40, "train", 3)
    assert [json.loads(x) for x in (tmp_path / "t" / "val.jsonl").read_text().splitlines()] == make_rows(20, "val", 3)
    assert [json.loads(x) for x in (tmp_path / "t" / "post.jsonl").read_text().splitlines()] == make_rows(14, "post", 3)
    assert [json.loads(x) for x in (tmp_path / "t" / "dev.jsonl").read_text().splitlines()] == make_rows(7, "dev", 3)
    assert counts["train"]["copy"] == 6 and counts["val"]["copy"] == 3 and sum(counts["train"].values()) == 40
    out = capsys.readouterr().out
    assert "train.jsonl (40 rows)" in out and re.search(r"copy +train +6 +val +3 +post +2 +dev +1", out)
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["dev.jsonl", "post.jsonl", "train.jsonl", "val.jsonl"]
    first = (tmp_path / "t" / "train.jsonl").read_bytes()
    make_demo_task(str(tmp_path / "t"), train=40, val=20, post=14, dev=7, seed=3)
    assert (tmp_path / "t" / "train.jsonl").read_bytes() == first


def test_make_demo_task_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path), "--train", "-1"])
    assert e.value.code == 1
    assert capsys.readouterr().err == "error: --train must be >= 0, got -1\n"
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--post", "-2"])
    assert capsys.readouterr().err == "error: --post must be >= 0, got -2\n"
