"""data_prep.make_shards: exact shard contents, determinism, dedup, hold-out, arrays, bad input, kill -9."""
import errno
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_prep.make_shards import doc_route, main, make_shards, merge
from data_prep.sources import DataPrepError, resolve_sources, split_long
from data_prep.train_tokenizer import train_tokenizer
from gpt.shards import TokenShards, read_manifest
from gpt.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(shakespeare_path) -> list[str]:
    """~300 distinct short documents cut from Shakespeare."""
    texts = [json.loads(line)["text"] for line in gzip.open(shakespeare_path, "rt")][:3]
    return [t[i:i + 700] for t in texts for i in range(0, 70_000, 700)][:300]


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory, corpus) -> Path:
    src = tmp_path_factory.mktemp("tok") / "src.jsonl"
    _jsonl(src, corpus)
    out = src.parent / "tokenizer.json"
    train_tokenizer(str(src), str(out), vocab_size=400)
    return out


def _jsonl(path: Path, texts, field="text") -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": i, field: t}) + "\n")
    return path


def _expected(tok: Tokenizer, texts, val_fraction, num_tasks=1, task=0):
    """Token streams per split as the job must write them: input order, dedup, eot per doc."""
    streams, seen = {"train": [], "val": []}, set()
    for t in texts:
        key, owner, is_val = doc_route(t.encode(), num_tasks, val_fraction)
        if owner != task or key in seen or not t.strip():
            continue
        seen.add(key)
        streams["val" if is_val else "train"] += tok.encode(t) + [tok.eot_id]
    return streams


def _stream(out, split):
    ds = TokenShards(out, split)
    return list(ds.window(0, ds.num_tokens))


def test_shards_equal_tokenizer_output(tmp_path, corpus, tok_path):
    texts = corpus[:200] + corpus[:20]  # 20 exact duplicates
    src = _jsonl(tmp_path / "in.jsonl.gz", texts)
    m = make_shards(str(src), str(tok_path), str(tmp_path / "out"), val_fraction=0.2,
                    max_tokens_per_shard=5000, progress=False)
    tok = Tokenizer.from_file(tok_path)
    exp = _expected(tok, texts, 0.2)
    assert _stream(tmp_path / "out", "train") == exp["train"]
    assert _stream(tmp_path / "out", "val") == exp["val"]
    assert m["duplicates"] == 20 and m["skipped"] == {} and m["records_read"] == 220
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == 200
    assert 20 < m["splits"]["val"]["documents"] < 60  # ~20% held out
    assert m["splits"]["train"]["tokens"] == len(exp["train"])
    assert all(r["tokens"] == 5000 for r in m["splits"]["train"]["shards"][:-1])
    assert m["tokenizer"] == {"hash": tok.content_hash, "vocab_size": 400} and m["dtype"] == "uint16"
    assert m["sources"] == [{"spec": str(src), "kind": "json", "files": 1}]
    assert read_manifest(tmp_path / "out") == m
    with pytest.raises(DataPrepError, match=r"holds shards made with other settings \(max_tokens_per_shard, val_fraction\)"):
        make_shards(str(src), str(tok_path), str(tmp_path / "out"), val_fraction=0.3, progress=False)
    TokenShards(tmp_path / "out", tokenizer=tok, verify_sha256=True)  # hash matches what was written


@pytest.mark.slow
def test_same_shards_for_num_proc_and_datasets_reader(tmp_path, corpus, tok_path):
    src = _jsonl(tmp_path / "in.jsonl", corpus)
    runs = {}
    for name, kw in {"p1": {}, "p2": {"num_proc": 2, "batch_chars": 20_000},
                     "datasets": {"reader": "datasets"}}.items():
        m = make_shards(str(src), str(tok_path), str(tmp_path / name), val_fraction=0.1,
                        max_tokens_per_shard=20_000, progress=False, **kw)
        runs[name] = [(r["file"], r["sha256"]) for s in ("train", "val") for r in m["splits"][s]["shards"]]
    assert runs["p1"] == runs["p2"] == runs["datasets"]


def test_parquet_and_text_sources(tmp_path, corpus, tok_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": corpus[:50]}), tmp_path / "a.parquet")
    m = make_shards(str(tmp_path / "a.parquet"), str(tok_path), str(tmp_path / "pq"), text_field="content",
                    val_fraction=0.0, progress=False)
    tok = Tokenizer.from_file(tok_path)
    assert _stream(tmp_path / "pq", "train") == _expected(tok, corpus[:50], 0.0)["train"]
    (tmp_path / "b.txt").write_text("first para\nline two\n\n\nsecond para\n")
    m = make_shards(str(tmp_path / "b.txt"), str(tok_path), str(tmp_path / "txt"), val_fraction=0.0, progress=False)
    assert m["splits"]["train"]["documents"] == 2
    assert tok.decode(_stream(tmp_path / "txt", "train")) == "first para\nline two\n<|endoftext|>second para\n<|endoftext|>"


def test_cli_several_sources_and_globs(tmp_path, corpus, tok_path):
    for i in range(3):
        _jsonl(tmp_path / f"part-{i}.jsonl.gz", corpus[10 * i:10 * i + 10])
    (tmp_path / "extra.txt").write_text("one more document\n")
    main(["--source", str(tmp_path / "part-*.jsonl.gz"), "--source+", str(tmp_path / "extra.txt"),
          "--tokenizer", str(tok_path), "--out", str(tmp_path / "o"), "--val_fraction", "0", "--progress", "false"])
    m = read_manifest(tmp_path / "o")
    assert m["sources"] == [{"spec": str(tmp_path / "part-*.jsonl.gz"), "kind": "json", "files": 3},
                            {"spec": str(tmp_path / "extra.txt"), "kind": "text", "files": 1}]
    tok = Tokenizer.from_file(tok_path)
    want = _expected(tok, corpus[:30] + ["one more document\n"], 0.0)["train"]
    assert m["splits"]["train"]["documents"] == 31 and _stream(tmp_path / "o", "train") == want


def test_slurm_array_matches_single_task(tmp_path, corpus, tok_path, monkeypatch):
    texts = corpus[:120] + corpus[:10] + ["", "  "]
    src = _jsonl(tmp_path / "in.jsonl", texts)
    single = make_shards(str(src), str(tok_path), str(tmp_path / "one"), val_fraction=0.1, progress=False)
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")  # --array=1-3
    for slurm_id in (1, 3):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(slurm_id))
        part = make_shards(str(src), str(tok_path), str(tmp_path / "arr"), val_fraction=0.1, progress=False)
        assert part["task_id"] == slurm_id - 1 and not (tmp_path / "arr" / "manifest.json").exists()
    with pytest.raises(DataPrepError, match=r"1 of 3 tasks have not finished \(task ids 1\)$"):
        merge(str(tmp_path / "arr"))
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    make_shards(str(src), str(tok_path), str(tmp_path / "arr"), val_fraction=0.1, progress=False)
    main(["merge", "--out", str(tmp_path / "arr")])
    merged = read_manifest(tmp_path / "arr")
    for key in ("skipped", "duplicates", "tokenizer", "dtype", "eot_id"):
        assert merged[key] == single[key], key
    assert merged["skipped"] == {"empty": 2} and merged["duplicates"] == 10
    tok = Tokenizer.from_file(tok_path)
    for split in ("train", "val"):
        assert merged["splits"][split]["documents"] == single["splits"][split]["documents"]
        want = []
        for task in range(3):
            want += _expected(tok, texts, 0.1, 3, task)[split]
        assert _stream(tmp_path / "arr", split) == want  # task order, input order within a task


def test_rerun_skips_done_task_and_redoes_one_missing_a_shard(tmp_path, corpus, tok_path, capsys):
    src = _jsonl(tmp_path / "in.jsonl", corpus[:60])
    kw = dict(val_fraction=0.1, max_tokens_per_shard=4000, progress=False)
    first = make_shards(str(src), str(tok_path), str(tmp_path / "o"), **kw)
    capsys.readouterr()
    assert make_shards(str(src), str(tok_path), str(tmp_path / "o"), **kw) == first
    assert "task 0/1: already done" in capsys.readouterr().err
    (tmp_path / "o" / first["splits"]["train"]["shards"][1]["file"]).unlink()
    assert make_shards(str(src), str(tok_path), str(tmp_path / "o"), **kw) == first
    assert "already done" not in capsys.readouterr().err
    TokenShards(tmp_path / "o", verify_sha256=True)


def _cli_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err  # one line
    return err.strip()


def test_bad_input_errors(tmp_path, tok_path, capsys):
    common = ["--tokenizer", str(tok_path), "--progress", "false"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"text": "fine"\n')
    assert _cli_error(capsys, ["--source", str(bad), "--out", str(tmp_path / "o1")] + common) == \
        f"error: {bad}:3: malformed JSON (Expecting ',' delimiter at column 16)"
    bad.write_text('{"text": "ok"}\n{"body": "x", "id": 2}\n')
    assert _cli_error(capsys, ["--source", str(bad), "--out", str(tmp_path / "o2")] + common) == \
        f"error: {bad}:2: missing field 'text' (fields: body, id)"
    bad.write_text('{"text": ["a"]}\n')
    assert _cli_error(capsys, ["--source", str(bad), "--out", str(tmp_path / "o3")] + common) == \
        f"error: {bad}:1: field 'text' is list, not a string"
    bad.write_text("[1, 2]\n")
    assert _cli_error(capsys, ["--source", str(bad), "--out", str(tmp_path / "o4")] + common) == \
        f"error: {bad}:1: expected a JSON object, got list"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert _cli_error(capsys, ["--source", str(empty), "--out", str(tmp_path / "o5")] + common) == \
        f"error: no documents to write from {empty}: 0 records read, skipped none, 0 duplicates"
    assert _cli_error(capsys, ["--source", str(tmp_path / "nope*.jsonl"), "--out", str(tmp_path / "o6")] + common) == \
        f"error: source '{tmp_path}/nope*.jsonl': glob matched no files"
    assert _cli_error(capsys, ["--source", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o7")] + common) == \
        f"error: source '{tmp_path}/missing.jsonl': file not found"
    assert _cli_error(capsys, ["--source", str(empty), "--out", str(tmp_path / "o8"), "--tokenizer", str(tmp_path)]) == \
        f"error: cannot load tokenizer: {tmp_path}: no tokenizer.json and no vocab.json + merges.txt in this directory"
    bad.write_text('{"text": "a"\n')
    assert _cli_error(capsys, ["--source", str(bad), "--out", str(tmp_path / "o9"), "--reader", "datasets"] + common) \
        .startswith(f"error: source '{bad}': datasets could not read it (")


def test_skips_are_counted(tmp_path, tok_path):
    src = tmp_path / "mixed.jsonl"
    with open(src, "wb") as f:
        f.write(b'{"text": "good one"}\n')
        f.write(b'{"text": "caf\xe9 latin-1"}\n')            # invalid UTF-8
        f.write(b'{"text": "lone \\ud800 surrogate"}\n')      # not encodable
        f.write(b'{"text": "   \\n"}\n')                       # empty
        f.write(b'{"text": "' + b"x" * 5000 + b'"}\n')         # too long
        f.write(b'not json\n{"id": 7}\n')                      # bad lines, tolerated below
        f.write(b'{"text": "good one"}\n')                     # duplicate
    m = make_shards(str(src), str(tok_path), str(tmp_path / "o"), val_fraction=0.0, max_doc_chars=4000,
                    max_bad_lines=2, progress=False)
    assert m["skipped"] == {"bad_line": 2, "empty": 1, "invalid_utf8": 2, "too_long": 1}
    assert m["duplicates"] == 1 and m["splits"]["train"]["documents"] == 1 and m["records_read"] == 8


def test_long_document_in_pieces_round_trips(tmp_path, corpus, tok_path):
    doc = "\n".join(corpus[:40])  # ~28k chars, cut into pieces of <= 3000 at line breaks
    assert all(len(p) <= 3000 for p in split_long(doc, 3000)) and "".join(split_long(doc, 3000)) == doc
    src = _jsonl(tmp_path / "long.jsonl", [doc])
    make_shards(str(src), str(tok_path), str(tmp_path / "o"), val_fraction=0.0, piece_chars=3000, batch_chars=5000,
                progress=False)
    tok = Tokenizer.from_file(tok_path)
    ids = _stream(tmp_path / "o", "train")
    assert ids[-1] == tok.eot_id and ids.count(tok.eot_id) == 1 and tok.decode(ids[:-1]) == doc


@pytest.mark.slow
def test_hub_name_streams_through_datasets(tmp_path, corpus, tok_path, monkeypatch):
    """A Hub name goes to datasets.load_dataset(name, config, split=, streaming=True); offline we
    answer that call with a local file of the same schema, streamed by datasets itself."""
    import datasets

    src = _jsonl(tmp_path / "hub.jsonl", corpus[:30], field="content")
    real, calls = datasets.load_dataset, []

    def fake(path, name=None, **kw):
        calls.append((path, name, kw))
        return real("json", data_files=str(src), split=kw["split"], streaming=kw["streaming"])

    monkeypatch.setattr(datasets, "load_dataset", fake)
    m = make_shards("org/web-corpus", str(tok_path), str(tmp_path / "o"), text_field="content",
                    hub_config="sample-10BT", hub_split="train", val_fraction=0.0, progress=False)
    assert calls == [("org/web-corpus", "sample-10BT", {"split": "train", "streaming": True})]
    assert m["sources"] == [{"spec": "org/web-corpus", "kind": "hub"}]
    assert _stream(tmp_path / "o", "train") == _expected(Tokenizer.from_file(tok_path), corpus[:30], 0.0)["train"]
    monkeypatch.setattr(datasets, "load_dataset", real)
    with pytest.raises(DataPrepError, match=r"^source 'no-such-org/no-such-data': datasets could not read it \("):
        make_shards("no-such-org/no-such-data", str(tok_path), str(tmp_path / "o2"), progress=False)


def test_hub_names_and_task_args():
    (hub,) = resolve_sources("HuggingFaceFW/fineweb-edu")
    assert hub.kind == "hub" and hub.files == ()
    with pytest.raises(DataPrepError, match=r"^--num_tasks 4 needs --task_id"):
        make_shards("x.jsonl", "t.json", "o", num_tasks=4)
    with pytest.raises(DataPrepError, match=r"^--task_id 4 is outside 0\.\.3$"):
        make_shards("x.jsonl", "t.json", "o", num_tasks=4, task_id=4)


@pytest.mark.slow
def test_sigkill_then_rerun_finishes_identically(tmp_path, corpus, tok_path):
    texts = [f"{i} {t}" for i in range(8) for t in corpus]  # ~1.7 MB, distinct documents
    src = _jsonl(tmp_path / "big.jsonl", texts)
    args = [sys.executable, "-m", "data_prep.make_shards", "--source", str(src), "--tokenizer", str(tok_path),
            "--max_tokens_per_shard", "20000", "--val_fraction", "0.05", "--progress", "false", "--num_proc", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    victim = tmp_path / "killed"
    proc = subprocess.Popen(args + ["--out", str(victim)], cwd=ROOT, env=env, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 60
    while not list(victim.glob("train_*.bin")) and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the job and its workers, mid-way
    proc.wait()
    assert not (victim / "tasks" / "task_00000.json").exists() and not (victim / "manifest.json").exists()
    with pytest.raises(Exception, match="no manifest.json"):
        TokenShards(victim)
    subprocess.run(args + ["--out", str(victim)], cwd=ROOT, env=env, check=True, capture_output=True)
    want = make_shards(str(src), str(tok_path), str(tmp_path / "clean"), max_tokens_per_shard=20000,
                       val_fraction=0.05, progress=False)
    got = read_manifest(victim)
    assert got["splits"] == want["splits"] and not list(victim.glob("*.tmp"))
    listed = {r["file"] for s in ("train", "val") for r in got["splits"][s]["shards"]}
    assert {p.name for p in victim.glob("*.bin")} == listed  # the killed run's shards were redone, not kept
    rerun = subprocess.run(args + ["--out", str(victim)], cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    assert "already done" in rerun.stderr


# ---- failures: one line, non-zero exit, and nothing left behind -------------------------------
def _files(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*")) if d.exists() else []


@pytest.mark.parametrize("flag,value", [("piece_chars", "0"), ("piece-chars", "-5")])
def test_zero_piece_chars_is_refused_not_a_hang(tmp_path, tok_path, flag, value):
    """`--piece_chars 0` used to loop forever with memory growing: a subprocess, so a hang fails."""
    src = _jsonl(tmp_path / "in.jsonl", ["some text\n" * 50])
    run = subprocess.run([sys.executable, "-m", "data_prep.make_shards", "--source", str(src), "--tokenizer",
                          str(tok_path), "--out", str(tmp_path / "o"), f"--{flag}", value],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert (run.returncode, run.stderr) == (1, f"error: --piece_chars must be a positive integer, got {value}\n")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag,value,want", [
    ("max_tokens_per_shard", "0", "a positive integer, got 0"), ("num_proc", "0", "a positive integer, got 0"),
    ("batch_chars", "-1", "a positive integer, got -1"), ("num_tasks", "0", "a positive integer, got 0"),
    ("max_doc_chars", "-1", ">= 0 (0 = no limit), got -1"), ("max-bad-lines", "-1", ">= 0 (0 = no limit), got -1")])
def test_non_positive_sizes_are_refused(tmp_path, tok_path, capsys, flag, value, want):
    src = _jsonl(tmp_path / "in.jsonl", ["some text\n" * 50])
    assert _cli_error(capsys, ["--source", str(src), "--tokenizer", str(tok_path), "--out", str(tmp_path / "o"),
                               f"--{flag}", value]) == f"error: --{flag.replace('-', '_')} must be {want}"
    assert not (tmp_path / "o").exists()


def test_failed_task_leaves_no_tmp_shard_or_marker(tmp_path, corpus, tok_path, capsys):
    """A malformed last line, after shards were written: the task's files all go."""
    src = _jsonl(tmp_path / "in.jsonl", corpus[:100])
    with open(src, "a") as f:
        f.write('{"text": "cut off\n')
    out = tmp_path / "o"
    assert _cli_error(capsys, ["--source", str(src), "--tokenizer", str(tok_path), "--out", str(out),
                               "--batch_chars", "1000", "--max_tokens_per_shard", "2000", "--progress", "false"]) == \
        f"error: {src}:101: malformed JSON (Unterminated string starting at column 10)"
    assert _files(out) == []  # not even the directory this run made
    out.mkdir()
    (out / "keep.txt").write_text("the user's")
    _cli_error(capsys, ["--source", str(src), "--tokenizer", str(tok_path), "--out", str(out),
                        "--batch_chars", "1000", "--max_tokens_per_shard", "2000", "--progress", "false"])
    assert _files(out) == ["keep.txt"]


class _FillingFile:
    """A file whose disk fills up after `room` more bytes, as a real full disk does."""

    def __init__(self, f, room: list):
        self._f, self._room = f, room

    def write(self, data) -> int:
        if len(data) > self._room[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        self._room[0] -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@pytest.mark.parametrize("where,room,failing", [("shards", 9_000, "train_t00000_00001.bin"),
                                               ("marker", 0, "tasks/task_00000.json")])
def test_disk_full_is_one_line_and_frees_the_space(tmp_path, corpus, tok_path, capsys, monkeypatch, where, room,
                                                   failing):
    """Disk full mid-shard (after one complete shard) and at the task marker (after all shards):
    one line naming the file, and every byte of the task removed. Simulated by file objects that
    raise ENOSPC once `room` bytes were written (a real tiny tmpfs behaves the same)."""
    import builtins

    from gpt import shards

    left, real_open = [room], builtins.open

    def opener(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        if "w" in mode and (where == "shards" or str(path).endswith(".json.tmp")):
            return _FillingFile(f, left)
        return f

    monkeypatch.setattr(shards, "open", opener, raising=False)
    src = _jsonl(tmp_path / "in.jsonl", corpus[:200])
    out = tmp_path / "o"
    assert _cli_error(capsys, ["--source", str(src), "--tokenizer", str(tok_path), "--out", str(out), "--val_fraction",
                               "0", "--max_tokens_per_shard", "4000", "--batch_chars", "2000", "--progress", "false"]) == \
        f"error: {out / failing}: No space left on device"
    assert _files(out) == []


def test_unwritable_or_file_out(tmp_path, tok_path, capsys, monkeypatch):
    """--out naming a file; --out where mkdir is refused (permission, read-only file system).
    Tests run as root, which chmod does not stop: os.mkdir is made to fail as it would."""
    src = _jsonl(tmp_path / "in.jsonl", ["hello there"])
    common = ["--source", str(src), "--tokenizer", str(tok_path), "--progress", "false"]
    (tmp_path / "afile").write_text("x")
    assert _cli_error(capsys, common + ["--out", str(tmp_path / "afile")]) == \
        f"error: --out {tmp_path / 'afile'}: is a file, not a directory"
    real_mkdir, locked = os.mkdir, tmp_path / "locked"
    locked.mkdir()
    for err, text in ((errno.EACCES, "Permission denied"), (errno.EROFS, "Read-only file system")):
        def mkdir(path, *a, err=err, text=text, **k):  # nothing can be created inside `locked`
            if Path(path).parent == locked:
                raise OSError(err, text, str(path))
            return real_mkdir(path, *a, **k)

        monkeypatch.setattr(os, "mkdir", mkdir)
        assert _cli_error(capsys, common + ["--out", str(locked / "o")]) == f"error: {locked / 'o'}: {text}"
    monkeypatch.undo()
    assert _files(locked) == []


def test_unreadable_source_is_one_line(tmp_path, tok_path, capsys, monkeypatch):
    """Permission denied on a source (simulated: tests run as root)."""
    import builtins

    src = _jsonl(tmp_path / "in.jsonl", ["hello there"])
    real_open = builtins.open

    def opener(path, *a, **k):
        if str(path) == str(src.resolve()) or str(path) == str(src):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", opener)
    err = _cli_error(capsys, ["--source", str(src), "--tokenizer", str(tok_path), "--out", str(tmp_path / "o"),
                              "--progress", "false"])
    assert err == f"error: {src.resolve()}: Permission denied"


def test_num_proc_above_cpus_warns(tmp_path, tok_path, capsys, monkeypatch):
    from data_prep import make_shards as ms

    monkeypatch.setattr(ms, "usable_cpus", lambda: 2)
    with pytest.raises(SystemExit):
        main(["--source", str(tmp_path / "none.jsonl"), "--tokenizer", str(tok_path), "--out", str(tmp_path / "o"),
              "--num_proc", "64"])
    err = capsys.readouterr().err.splitlines()
    assert err[0] == ("warning: --num_proc 64 is more than the 2 CPUs this job may use: the extra workers only "
                      "add memory (a tokenizer each) and contention")
    assert err[1] == f"error: source '{tmp_path}/none.jsonl': file not found"


def test_sparse_gpt2_ids_above_65535(tmp_path, capsys):
    """A GPT-2 style pair whose <|endoftext|> is 70000: uint32 shards holding 70000."""
    from tests.test_tokenizer import _sparse_gpt2_pair

    pair = _sparse_gpt2_pair(tmp_path / "gpt2", eot=70000)
    src = _jsonl(tmp_path / "in.jsonl", ["Hello world", "world Hello"])
    m = make_shards(str(src), str(pair), str(tmp_path / "o"), val_fraction=0.0, progress=False)
    tok = Tokenizer.from_file(pair)
    assert m["dtype"] == "uint32" and m["tokenizer"]["vocab_size"] == 70006 and m["eot_id"] == 70000
    assert _stream(tmp_path / "o", "train") == tok.encode("Hello world") + [70000] + tok.encode("world Hello") + [70000]


@pytest.mark.slow
def test_datasets_reader_error_is_one_line_in_a_fresh_process(tmp_path, tok_path):
    """datasets logs its own "Failed to load JSON" line before raising; only ours may show."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"\n')
    run = subprocess.run([sys.executable, "-m", "data_prep.make_shards", "--source", str(bad), "--tokenizer",
                          str(tok_path), "--out", str(tmp_path / "o"), "--reader", "datasets", "--progress", "false"],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 1 and run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith(f"error: source '{bad}': datasets could not read it (") and not _files(tmp_path / "o")
