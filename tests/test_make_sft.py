"""data_prep.make_sft: exact examples for every format, dedup, val split, bad rows, truncation counts,
Slurm arrays + merge, re-run, kill -9 then re-run byte-identical, Hub names through datasets."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_prep import make_sft as ms
from data_prep.make_sft import main, make_sft, merge
from data_prep.sources import DataPrepError
from gpt.chat import ChatTemplate
from gpt.demo_task import make_rows
from gpt.shards import ExampleShards, read_manifest
from gpt.sft_data import SFTDataModule
from tests.chat_fixtures import shakespeare_tokenizer
from tests.sft_fixtures import conversations

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    return shakespeare_tokenizer()


@pytest.fixture(scope="module")
def chat(tok):
    return ChatTemplate(tok)


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory, tok):
    return tok.save(tmp_path_factory.mktemp("tok") / "tokenizer.json")


def _jsonl(path: Path, rows) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def _examples(out, split="train", kind="sft"):
    ex = ExampleShards(out, split, kind, verify_sha256=True)
    return [(*(a.tolist() for a in ex.example(i)), ex.bounds(i)) for i in range(len(ex))]


def U(c):
    return {"role": "user", "content": c}


def A(c):
    return {"role": "assistant", "content": c}


def S(c):
    return {"role": "system", "content": c}


# ---- exact contents ------------------------------------------------------------------------------
def test_messages_rows_become_the_template_rendering(tmp_path, tok_path, chat):
    convs = conversations(60, seed=3)
    src = _jsonl(tmp_path / "in.jsonl", [{"messages": c, "id": i} for i, c in enumerate(convs)]
                 + [{"messages": c} for c in convs[:5]])  # 5 exact duplicates
    m = make_sft(str(src), str(tok_path), str(tmp_path / "o"), block_size=256, val_fraction=0.0, progress=False)
    want = [(*chat.render(c), ()) for c in convs]
    assert _examples(tmp_path / "o") == want  # input order
    assert m["kind"] == "sft" and m["duplicates"] == 5 and m["records_read"] == 65
    assert m["truncated"] == {"train": 0, "val": 0} and m["dropped"] == {} and m["skipped"] == {}
    assert m["splits"]["train"]["documents"] == 60 and m["splits"]["val"]["documents"] == 0
    assert m["splits"]["train"]["supervised_tokens"] == sum(sum(mask) for _, mask, _ in want)
    assert m["formats"] == {str(src): "messages"} and m["max_example_tokens"] == 257
    assert read_manifest(tmp_path / "o") == m


FORMAT_CASES = {
    "prompt_completion": ([{"prompt": "2+3?", "completion": "5"},
                           {"prompt": [S("s"), U("a"), A("b"), U("c")], "completion": [A("d")]}],
                          [([U("2+3?"), A("5")], 1), ([S("s"), U("a"), A("b"), U("c"), A("d")], 4)]),
    "alpaca": ([{"instruction": "Sort the words.", "input": "b a", "output": "a b"},
                {"instruction": "Say hi.", "input": "", "output": "hi"}],
               [([U("Sort the words.\n\nb a"), A("a b")], 0), ([U("Say hi."), A("hi")], 0)]),
    "sharegpt": ([{"conversations": [{"from": "system", "value": "sys"}, {"from": "human", "value": "q"},
                                     {"from": "gpt", "value": "r"}]}],
                 [([S("sys"), U("q"), A("r")], 0)]),
}


@pytest.mark.parametrize("fmt", sorted(FORMAT_CASES))
def test_sft_formats(tmp_path, tok_path, chat, fmt):
    rows, convs = FORMAT_CASES[fmt]
    src = _jsonl(tmp_path / "in.jsonl", rows)
    m = make_sft(str(src), str(tok_path), str(tmp_path / "o"), val_fraction=0.0, progress=False)
    want = []
    for msgs, first_target in convs:
        ids, mask = chat.render(msgs)
        cut = len(chat.render_prompt(msgs[:first_target])) if first_target else 0
        want.append((ids, [0] * cut + mask[cut:], ()))
    assert _examples(tmp_path / "o") == want and m["formats"] == {str(src): fmt}


HH = ("\n\nHuman: What is 2+3?\n\nAssistant: 5\n\nHuman: And 4+4?\n\nAssistant: 8",
      "\n\nHuman: What is 2+3?\n\nAssistant: 5\n\nHuman: And 4+4?\n\nAssistant: nine")
PAIR_CASES = {
    "explicit": ({"prompt": [S("s"), U("2+3?")], "chosen": [A("5")], "rejected": [A("6")]}, [S("s"), U("2+3?")], "5", "6"),
    "implicit": ({"chosen": [U("q"), A("good")], "rejected": [U("q"), A("bad")]}, [U("q")], "good", "bad"),
    "hh": ({"chosen": HH[0], "rejected": HH[1]}, [U("What is 2+3?"), A("5"), U("And 4+4?")], "8", "nine"),
    "ultrafeedback": ({"prompt": "q", "chosen": [U("q"), A("yes")], "rejected": [U("q"), A("no")],
                       "score_chosen": 8.5, "score_rejected": 3.0}, [U("q")], "yes", "no"),
}


@pytest.mark.parametrize("fmt", sorted(PAIR_CASES))
def test_pair_formats(tmp_path, tok_path, chat, fmt):
    row, prompt, chosen, rejected = PAIR_CASES[fmt]
    src = _jsonl(tmp_path / "in.jsonl", [row])
    m = make_sft(str(src), str(tok_path), str(tmp_path / "o"), kind="pairs", val_fraction=0.0, progress=False)
    p, c, r = chat.render_prompt(prompt), chat.render_reply(chosen), chat.render_reply(rejected)
    assert _examples(tmp_path / "o", kind="pairs") == [(p + c + r, [0] * len(p) + [1] * (len(c) + len(r)),
                                                        (len(p), len(p) + len(c)))]
    assert m["kind"] == "pairs" and m["formats"] == {str(src): fmt} and m["max_example_tokens"] == 2048


def test_datasets_reader_and_parquet_give_the_same_examples(tmp_path, tok_path):
    import datasets

    convs = conversations(20, seed=4)
    src = _jsonl(tmp_path / "in.jsonl", [{"messages": c} for c in convs])
    datasets.Dataset.from_list([{"messages": c} for c in convs]).to_parquet(str(tmp_path / "in.parquet"))
    make_sft(str(src), str(tok_path), str(tmp_path / "a"), val_fraction=0.2, progress=False)
    make_sft(str(src), str(tok_path), str(tmp_path / "b"), val_fraction=0.2, reader="datasets", progress=False)
    make_sft(str(tmp_path / "in.parquet"), str(tok_path), str(tmp_path / "c"), val_fraction=0.2, progress=False)
    for split in ("train", "val"):
        assert _examples(tmp_path / "a", split) == _examples(tmp_path / "b", split) == _examples(tmp_path / "c", split)
    assert len(_examples(tmp_path / "a", "val")) > 0


def test_val_source(tmp_path, tok_path, chat):
    train, val = make_rows(40, "train", seed=0), make_rows(10, "val", seed=0)
    tsrc, vsrc = _jsonl(tmp_path / "train.jsonl", train), _jsonl(tmp_path / "val.jsonl", val)
    m = make_sft(str(tsrc), str(tok_path), str(tmp_path / "o"), val_source=str(vsrc), block_size=128, progress=False)
    assert _examples(tmp_path / "o", "val") == [(*chat.render(r["messages"]), ()) for r in val]
    assert _examples(tmp_path / "o", "train") == [(*chat.render(r["messages"]), ()) for r in train]
    assert m["val_fraction"] == 0.0 and [s["spec"] for s in m["val_sources"]] == [str(vsrc)]
    dm = SFTDataModule(str(tmp_path / "o"), tokenizer=str(tok_path), block_size=128, micro_batch_size=4)
    dm._open()
    assert sum(len(dm.val.plan.row(r)) for r in range(len(dm.val))) == 10
    with pytest.raises(DataPrepError, match="^give --val_source or --val_fraction, not both$"):
        make_sft(str(tsrc), str(tok_path), str(tmp_path / "x"), val_source=str(vsrc), val_fraction=0.1)


# ---- bad input -------------------------------------------------------------------------------------
def _cli_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err  # one line
    return err.strip()


def test_bad_rows_are_one_line_errors(tmp_path, tok_path, capsys):
    common = ["--tokenizer", str(tok_path), "--progress", "false", "--val_fraction", "0"]
    bad = tmp_path / "bad.jsonl"
    msg, pair = {"messages": [U("q"), A("r")]}, {"prompt": "q", "chosen": "a", "rejected": "b"}
    cases = [  # (first row, bad row, kind, error after FILE:LINE)
        (msg, {"messages": [U("a"), {"role": "bot", "content": "b"}]}, "sft",
         "field 'messages': message 1: role 'bot' is not one of system, user, assistant"),
        (msg, {"messages": [U("a"), A(" ")]}, "sft", "field 'messages': message 1: empty assistant turn"),
        (msg, {"messages": [U("a")]}, "sft",
         "field 'messages': message 0: the conversation must end with an assistant turn, not 'user'"),
        (msg, {"messages": "hi"}, "sft", "field 'messages' is str, not a list of messages"),
        (msg, {"instruction": "x"}, "sft", "missing field 'messages' (fields: instruction)"),  # row 1 fixed the format
        ({"instruction": "y", "output": "z"}, {"instruction": "x", "output": 5}, "sft",
         "field 'output' is int, not a string"),
        (None, {"text": "plain"}, "sft", "cannot tell the sft format from the columns (text): expected messages, "
                                         "conversations, prompt + completion, or instruction (+ input) + output; "
                                         "or pass --format"),
        (pair, {"prompt": "q", "chosen": "same", "rejected": "same"}, "pairs",
         "fields 'chosen' and 'rejected': identical replies"),
        (pair, {"prompt": "q", "chosen": "", "rejected": "b"}, "pairs", "field 'chosen': message 1: empty assistant turn"),
        (None, {"chosen": [U("q"), A("a")], "rejected": [U("p"), A("b")]}, "pairs",
         "fields 'chosen' and 'rejected' differ before their final assistant turn (at message 0 of 'chosen'): "
         "no shared prompt"),
    ]
    for i, (first, row, kind, why) in enumerate(cases):
        _jsonl(bad, [first, row] if first else [row])
        out = tmp_path / f"o{i}"
        assert _cli_error(capsys, ["--source", str(bad), "--out", str(out), "--kind", kind] + common) == \
            f"error: {bad}:{2 if first else 1}: {why}"
        assert not out.exists()  # a failed task leaves nothing behind
    assert _cli_error(capsys, ["--source", str(bad), "--out", str(tmp_path / "f"), "--format", "chatml"] + common) == \
        "error: --format 'chatml' is not a sft format (messages, prompt_completion, alpaca, sharegpt)"
    assert _cli_error(capsys, ["--source", str(bad), "--out", str(tmp_path / "f"), "--block_size", "64",
                               "--max_tokens_per_shard", "10"] + common) == \
        "error: --max_tokens_per_shard 10 is less than one example (65 tokens at --block_size 64)"


def test_bad_rows_skipped_and_counted(tmp_path, tok_path):
    src = tmp_path / "mixed.jsonl"
    _jsonl(src, [{"messages": [U("q"), A("r")]},
                 {"messages": [U("a"), {"role": "bot", "content": "b"}]},  # unknown_role
                 {"messages": [U("a"), A("")]},  # empty_assistant
                 "not json",  # bad_line
                 {"messages": [U("say <|end|>"), A("no")]},  # reserved_token: always a counted skip
                 {"messages": [U("q"), A("r")]},  # duplicate
                 {"messages": [U("q2"), A("r2")]}])
    m = make_sft(str(src), str(tok_path), str(tmp_path / "o"), val_fraction=0.0, max_bad_rows=3, progress=False)
    assert m["skipped"] == {"bad_line": 1, "empty_assistant": 1, "reserved_token": 1, "unknown_role": 1}
    assert m["duplicates"] == 1 and m["splits"]["train"]["documents"] == 2 and m["records_read"] == 7
    with pytest.raises(DataPrepError, match=rf"^{src}:4: malformed JSON"):
        make_sft(str(src), str(tok_path), str(tmp_path / "o2"), val_fraction=0.0, max_bad_rows=2, progress=False)


# ---- truncation -------------------------------------------------------------------------------------
def test_truncation_counts_and_no_example_without_targets(tmp_path, tok_path, chat):
    convs = conversations(80, seed=5) + [[U(f"{i} " + "the king is dead " * 12), A("long live")] for i in range(3)]
    src = _jsonl(tmp_path / "in.jsonl", [{"messages": c} for c in convs])
    block = 40
    m = make_sft(str(src), str(tok_path), str(tmp_path / "o"), block_size=block, val_fraction=0.0, progress=False)
    long = [c for c in convs if len(chat.render(c)[0]) > block + 1]
    # the system turn + last exchange's prompt leaves no room for a reply token: dropped
    hopeless = [c for c in long if len(chat.render_prompt(c[:int(c[0]["role"] == "system")] + c[-2:-1])) >= block + 1]
    assert long and hopeless
    assert m["dropped"] == {"prompt_too_long": len(hopeless)}
    assert m["truncated"]["train"] == len(long) - len(hopeless)
    ex = ExampleShards(tmp_path / "o", "train", "sft")
    assert len(ex) == len(convs) - len(hopeless) and int(ex.lengths.max()) <= block + 1
    assert (ex.supervised(skip_first=True) >= 1).all()
    kept = [c for c in convs if c not in hopeless]
    short = [i for i, c in enumerate(kept) if c not in long]
    assert [_examples(tmp_path / "o")[i][0] for i in short] == [chat.render(kept[i])[0] for i in short]
    m2 = make_sft(str(src), str(tok_path), str(tmp_path / "d"), block_size=block, val_fraction=0.0,
                  truncation="drop", progress=False)
    assert m2["dropped"] == {"too_long": len(long)} and m2["truncated"] == {"train": 0, "val": 0}


# ---- tasks, re-runs, kill -9 ------------------------------------------------------------------------
def test_slurm_array_matches_single_task(tmp_path, tok_path, monkeypatch):
    convs = conversations(90, seed=6)
    src = _jsonl(tmp_path / "in.jsonl", [{"messages": c} for c in convs + convs[:7]])
    single = make_sft(str(src), str(tok_path), str(tmp_path / "one"), val_fraction=0.2, progress=False)
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    for t in range(3):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(t))
        part = make_sft(str(src), str(tok_path), str(tmp_path / "arr"), val_fraction=0.2, progress=False)
        assert part["task_id"] == t and not (tmp_path / "arr" / "manifest.json").exists()
    main(["merge", "--out", str(tmp_path / "arr")])
    merged = read_manifest(tmp_path / "arr")
    for key in ("duplicates", "skipped", "dropped", "truncated", "tokenizer", "kind", "records_read"):
        assert merged[key] == single[key], key
    for split in ("train", "val"):
        assert sorted(_examples(tmp_path / "arr", split)) == sorted(_examples(tmp_path / "one", split))
        assert merged["splits"][split]["supervised_tokens"] == single["splits"][split]["supervised_tokens"]


def test_rerun_skips_done_task(tmp_path, tok_path, capsys):
    src = _jsonl(tmp_path / "in.jsonl", [{"messages": c} for c in conversations(30, seed=7)])
    kw = dict(val_fraction=0.1, block_size=128, max_tokens_per_shard=500, progress=False)
    first = make_sft(str(src), str(tok_path), str(tmp_path / "o"), **kw)
    capsys.readouterr()
    assert make_sft(str(src), str(tok_path), str(tmp_path / "o"), **kw) == first
    assert "task 0/1: already done" in capsys.readouterr().err
    (tmp_path / "o" / first["splits"]["train"]["shards"][1]["mask"]["file"]).unlink()  # a side file went missing
    assert make_sft(str(src), str(tok_path), str(tmp_path / "o"), **kw) == first
    assert "already done" not in capsys.readouterr().err
    vsrc = _jsonl(tmp_path / "val.jsonl", [{"messages": [U("held"), A("out")]}])
    kw["val_fraction"] = None
    make_sft(str(src), str(tok_path), str(tmp_path / "v"), val_source=str(vsrc), **kw)
    _jsonl(vsrc, [{"messages": [U("held"), A("out, changed")]}])  # the held-out file changed: the task is redone
    capsys.readouterr()
    m = make_sft(str(src), str(tok_path), str(tmp_path / "v"), val_source=str(vsrc), **kw)
    assert "input changed since the last run" in capsys.readouterr().err
    assert m["splits"]["val"]["supervised_tokens"] == len(ChatTemplate(shakespeare_tokenizer()).render_reply("out, changed"))


@pytest.mark.slow
def test_sigkill_then_rerun_finishes_identically(tmp_path, tok_path):
    rows = make_rows(6000, "train", seed=1)
    src = _jsonl(tmp_path / "big.jsonl", rows)
    args = [sys.executable, "-m", "data_prep.make_sft", "--source", str(src), "--tokenizer", str(tok_path),
            "--block_size", "128", "--max_tokens_per_shard", "3000", "--val_fraction", "0.05", "--progress", "false",
            "--num_proc", "2", "--batch_rows", "100"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    victim = tmp_path / "killed"
    proc = subprocess.Popen(args + ["--out", str(victim)], cwd=ROOT, env=env, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    while not list(victim.glob("train_*.idx.bin")) and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the job and its workers, mid-way
    proc.wait()
    assert list(victim.glob("train_*.bin")), "the job was killed before it wrote a shard"
    assert not (victim / "tasks" / "task_00000.json").exists() and not (victim / "manifest.json").exists()
    subprocess.run(args + ["--out", str(victim)], cwd=ROOT, env=env, check=True, capture_output=True)
    want = make_sft(str(src), str(tok_path), str(tmp_path / "clean"), block_size=128, max_tokens_per_shard=3000,
                    val_fraction=0.05, progress=False)
    got = read_manifest(victim)
    assert got["splits"] == want["splits"] and not list(victim.glob("*.tmp"))  # sha256 of every file included
    listed = {f for s in ("train", "val") for r in got["splits"][s]["shards"]
              for f in (r["file"], r["mask"]["file"], r["index"]["file"])}
    assert {p.name for p in victim.glob("*.bin")} == listed
    rerun = subprocess.run(args + ["--out", str(victim)], cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    assert "already done" in rerun.stderr


@pytest.mark.slow
def test_hub_name_streams_through_datasets(tmp_path, tok_path, chat, monkeypatch):
    """A Hub name goes to datasets.load_dataset(name, config, split=, streaming=True); offline we answer
    that call with a local file of the Hub dataset's schema (UltraFeedback-binarized here)."""
    import datasets

    rows = [{"prompt": f"q{i}", "prompt_id": str(i), "chosen": [U(f"q{i}"), A("yes")],
             "rejected": [U(f"q{i}"), A("no")], "messages": [U(f"q{i}"), A("yes")],
             "score_chosen": 8.0, "score_rejected": 2.0 + (i % 2) * 6} for i in range(12)]  # odd rows tie: skipped
    src = _jsonl(tmp_path / "hub.jsonl", rows)
    real, calls = datasets.load_dataset, []

    def fake(path, name=None, **kw):
        calls.append((path, name, kw["split"]))
        return real("json", data_files=str(src), split="train", streaming=kw["streaming"])

    monkeypatch.setattr(datasets, "load_dataset", fake)
    m = make_sft("org/ultrafeedback", str(tok_path), str(tmp_path / "o"), kind="pairs", hub_split="train_prefs",
                 val_fraction=0.0, progress=False)
    assert calls == [("org/ultrafeedback", None, "train_prefs")] and m["skipped"] == {"tied_scores": 6}
    p = chat.render_prompt([U("q0")])
    assert _examples(tmp_path / "o", kind="pairs")[0][0] == p + chat.render_reply("yes") + chat.render_reply("no")
    assert m["formats"] == {"org/ultrafeedback": "ultrafeedback"}


@pytest.mark.parametrize("func", [ms.make_sft, ms.merge])
def test_every_flag_has_help_text(func):
    import inspect

    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_function_arguments(func)
    helps = {a.dest: a.help for a in parser._actions}
    for name in inspect.signature(func).parameters:
        assert helps.get(name) and len(helps[name]) > 10, f"--{name} has no help text"


def test_merge_refuses_the_other_job(tmp_path, tok_path, capsys):
    from data_prep import make_shards

    src = _jsonl(tmp_path / "in.jsonl", [{"messages": [U("q"), A("r")]}])
    make_sft(str(src), str(tok_path), str(tmp_path / "o"), val_fraction=0.0, progress=False)
    with pytest.raises(DataPrepError, match="written by data_prep.make_sft: merge them with python -m data_prep.make_sft merge"):
        make_shards.merge(str(tmp_path / "o"))
    capsys.readouterr()
    assert _cli_error(capsys, ["merge", "--out", str(tmp_path / "none")]) == \
        f"error: {tmp_path / 'none'}: no finished tasks (tasks/task_*.json) to merge"


def test_slurm_sbatch_runs_make_sft(tmp_path):
    """DATA_PREP_JOB picks the job of slurm/data_prep.sbatch; PYTHON is a stand-in printing its arguments."""
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\necho "$@"\n')
    fake.chmod(0o755)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}, "GPT_REPO": str(ROOT),
           "PYTHON": str(fake), "SLURM_CPUS_PER_TASK": "8", "SLURM_JOB_ID": "1", "DATA_PREP_JOB": "data_prep.make_sft"}
    sbatch = str(ROOT / "slurm" / "data_prep.sbatch")
    run = subprocess.run(["bash", sbatch, "shard", "--out", "d", "--kind", "pairs"], capture_output=True, text=True,
                         env=env, check=True)
    assert run.stdout.splitlines()[-1] == "-m data_prep.make_sft --out d --kind pairs --num_proc 8"
    run = subprocess.run(["bash", sbatch, "merge", "--out", "d"], capture_output=True, text=True, env=env, check=True)
    assert run.stdout.splitlines()[-1] == "-m data_prep.make_sft merge --out d"
    run = subprocess.run(["bash", sbatch, "merge", "--out", "d"], capture_output=True, text=True,
                         env={**env, "DATA_PREP_JOB": "os"})
    assert run.returncode == 2 and run.stderr.strip() == \
        "error: DATA_PREP_JOB must be data_prep.make_shards or data_prep.make_sft, got 'os'"
