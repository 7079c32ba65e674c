"""data_prep/fingerprint.py and its use by make_shards: a changed input is noticed — by a re-run
(the task is redone, one line says what changed) and by merge — while an untouched one is not
read twice, and a touched one with the same bytes is not redone."""
import json
import os
from pathlib import Path

import pytest

from data_prep import fingerprint as fp
from data_prep.fingerprint import changes, file_fingerprint, fingerprint
from data_prep.make_shards import make_shards, merge
from data_prep.sources import DataPrepError, resolve_sources
from gpt.shards import TokenShards, read_manifest
from tests.test_make_shards import _expected, _jsonl, _stream, corpus, tok_path  # noqa: F401 (fixtures)
from gpt.tokenizer import Tokenizer

KW = dict(val_fraction=0.1, max_tokens_per_shard=3000, progress=False)


def test_small_file_hash_decides_large_file_stat_decides(tmp_path, monkeypatch):
    small = tmp_path / "a.jsonl"
    small.write_text('{"text": "one"}\n')
    before = file_fingerprint(str(small))
    assert set(before) == {"path", "bytes", "mtime_ns", "sha256"} and before["path"] == str(small.resolve())
    os.utime(small, ns=(before["mtime_ns"] + 10**9, before["mtime_ns"] + 10**9))  # touched, same bytes
    assert changes([{"spec": "s", "files": [before]}], [{"spec": "s", "files": [file_fingerprint(str(small))]}]) == []
    small.write_text('{"text": "two"}\n')  # same size, other bytes
    assert changes([{"spec": "s", "files": [before]}], [{"spec": "s", "files": [file_fingerprint(str(small))]}]) == \
        [f"{small.resolve()}: content changed (same size)"]

    monkeypatch.setattr(fp, "FULL_HASH_BYTES", 8)  # now a "large" file: never hashed
    big = file_fingerprint(str(small))
    assert "sha256" not in big
    os.utime(small, ns=(big["mtime_ns"] + 10**9, big["mtime_ns"] + 10**9))
    assert changes([{"spec": "s", "files": [big]}], [{"spec": "s", "files": [file_fingerprint(str(small))]}]) == \
        [f"{small.resolve()}: modified (same size, other mtime)"]


def test_reuse_stats_instead_of_reading(tmp_path, monkeypatch):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n')
    srcs = resolve_sources(str(tmp_path / "*.jsonl"))
    first = fingerprint(srcs)
    monkeypatch.setattr(fp, "open", lambda *a, **k: pytest.fail("read again"), raising=False)
    assert fingerprint(srcs, reuse=first) == first
    (tmp_path / "b.jsonl").write_text('{"text": "two"}\n')
    monkeypatch.undo()
    grown = fingerprint(resolve_sources(str(tmp_path / "*.jsonl")), reuse=first)
    assert changes(first, grown) == [f"{tmp_path}/*.jsonl: 1 more file(s) ({(tmp_path / 'b.jsonl').resolve()})"]
    assert changes(grown, first) == [f"{tmp_path}/*.jsonl: 1 file(s) gone ({(tmp_path / 'b.jsonl').resolve()})"]


def test_hub_fingerprint_is_name_config_split_revision(monkeypatch):
    from huggingface_hub import HfApi, constants

    (src,) = resolve_sources("org/corpus")
    assert fp.pin_hub_revisions([src], "v1")[0].revision == "v1"  # offline: what the user gave
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "dataset_info", lambda self, name, revision=None, timeout=None:
                        type("Info", (), {"sha": f"{name}@{revision or 'main'}-sha"})())
    (pinned,) = fp.pin_hub_revisions([src])
    assert pinned.revision == "org/corpus@main-sha"
    a = fingerprint([pinned], hub_config="sample", hub_split="train")
    assert a == [{"spec": "org/corpus", "hub": "org/corpus", "config": "sample", "split": "train",
                  "revision": "org/corpus@main-sha"}]
    b = fingerprint(fp.pin_hub_revisions([src], "v2"), hub_config="sample", hub_split="train")
    assert changes(a, b) == ["org/corpus: revision org/corpus@main-sha -> org/corpus@v2-sha"]


def test_grown_input_is_redone(tmp_path, corpus, tok_path, capsys):
    src = _jsonl(tmp_path / "in.jsonl", corpus[:5])
    size5 = src.stat().st_size
    first = make_shards(str(src), str(tok_path), str(tmp_path / "o"), **KW)
    assert first["splits"]["train"]["documents"] + first["splits"]["val"]["documents"] == 5
    assert first["inputs"] == [{"spec": str(src), "files": [file_fingerprint(str(src))]}]
    _jsonl(src, corpus[:40])
    capsys.readouterr()
    again = make_shards(str(src), str(tok_path), str(tmp_path / "o"), **KW)
    err = capsys.readouterr().err
    assert (f"task 0/1: input changed since the last run ({src.resolve()}: {size5} -> {src.stat().st_size} bytes); "
            "redoing the task\n") in err and "already done" not in err
    assert again["splits"]["train"]["documents"] + again["splits"]["val"]["documents"] == 40
    want = _expected(Tokenizer.from_file(tok_path), corpus[:40], 0.1)
    assert _stream(tmp_path / "o", "train") == want["train"] and _stream(tmp_path / "o", "val") == want["val"]
    listed = {r["file"] for s in ("train", "val") for r in again["splits"][s]["shards"]}
    assert {p.name for p in (tmp_path / "o").glob("*.bin")} == listed  # the old shards are gone
    TokenShards(tmp_path / "o", verify_sha256=True)


def test_fixed_encoding_same_size_is_redone_touch_is_not(tmp_path, tok_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"text": "first document"}\n{"text": "caf\xe9!"}\n')  # latin-1: skipped as invalid
    m = make_shards(str(src), str(tok_path), str(tmp_path / "o"), **KW)
    assert m["skipped"] == {"invalid_utf8": 1}
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # only touched
    capsys.readouterr()
    make_shards(str(src), str(tok_path), str(tmp_path / "o"), **KW)
    assert "task 0/1: already done" in capsys.readouterr().err
    src.write_bytes(b'{"text": "first document"}\n{"text": "caf\xc3\xa9"}\n')  # fixed, same size
    assert src.stat().st_size == st.st_size
    fixed = make_shards(str(src), str(tok_path), str(tmp_path / "o"), **KW)
    assert f"({src.resolve()}: content changed (same size)); redoing the task" in capsys.readouterr().err
    assert fixed["skipped"] == {} and fixed["splits"]["train"]["documents"] + fixed["splits"]["val"]["documents"] == 2


def test_marker_of_an_older_version_is_redone(tmp_path, corpus, tok_path, capsys):
    src = _jsonl(tmp_path / "in.jsonl", corpus[:10])
    make_shards(str(src), str(tok_path), str(tmp_path / "o"), **KW)
    marker = tmp_path / "o" / "tasks" / "task_00000.json"
    part = json.loads(marker.read_text())
    del part["inputs"]
    marker.write_text(json.dumps(part))
    capsys.readouterr()
    make_shards(str(src), str(tok_path), str(tmp_path / "o"), **KW)
    assert f"task 0/1: {marker} does not record its input (made by an older version); redoing the task" \
        in capsys.readouterr().err
    marker.write_text("")  # e.g. left 0 bytes by a full disk
    make_shards(str(src), str(tok_path), str(tmp_path / "o"), **KW)
    assert f"task 0/1: {marker}: unreadable task marker (" in capsys.readouterr().err
    assert "inputs" in json.loads(marker.read_text())


def test_merge_refuses_tasks_of_an_older_input(tmp_path, corpus, tok_path, capsys):
    src = _jsonl(tmp_path / "in.jsonl", corpus[:30])
    out = str(tmp_path / "arr")
    for task in (0, 1):
        make_shards(str(src), str(tok_path), out, num_tasks=2, task_id=task, **KW)
    merge(out)
    _jsonl(src, corpus[:60])
    with pytest.raises(DataPrepError, match=rf"^{out}: 2 of 2 tasks were made from another input than the current "
                                            rf"one \({src.resolve()}: \d+ -> \d+ bytes; task ids 0, 1\): re-run the job"):
        merge(out)
    make_shards(str(src), str(tok_path), out, num_tasks=2, task_id=0, **KW)
    assert not (tmp_path / "arr" / "manifest.json").exists()  # a task being redone drops the old manifest
    with pytest.raises(DataPrepError, match=r"1 of 2 tasks were made from another input .*; task ids 1\)"):
        merge(out)
    make_shards(str(src), str(tok_path), out, num_tasks=2, task_id=1, **KW)
    merged = merge(out)
    single = make_shards(str(src), str(tok_path), str(tmp_path / "one"), **KW)
    assert merged["inputs"] == single["inputs"] == read_manifest(out)["inputs"]
    for split in ("train", "val"):
        assert merged["splits"][split]["documents"] == single["splits"][split]["documents"]


def test_input_changing_while_read_fails_and_cleans_up(tmp_path, corpus, tok_path, monkeypatch):
    src = _jsonl(tmp_path / "in.jsonl", corpus[:20])
    from data_prep import make_shards as ms

    real = ms._write_documents

    def write_then_append(*args, **kw):
        result = real(*args, **kw)
        with open(src, "a") as f:
            f.write(json.dumps({"text": "late arrival"}) + "\n")
        return result

    monkeypatch.setattr(ms, "_write_documents", write_then_append)
    with pytest.raises(DataPrepError, match=rf"^input changed while it was read \({src.resolve()}: \d+ -> \d+ bytes\); "
                                            "run again once it is complete$"):
        make_shards(str(src), str(tok_path), str(tmp_path / "o"), **KW)
    assert not (tmp_path / "o").exists()  # made by this run, and nothing of it is left


@pytest.mark.slow
def test_hub_revision_is_pinned_read_and_noticed(tmp_path, corpus, tok_path, monkeypatch, capsys):
    """The commit the Hub names at the start is the one datasets reads and the marker records; a
    new commit on the Hub redoes the task. Offline, datasets answers from a local file."""
    from types import SimpleNamespace

    import datasets
    from huggingface_hub import HfApi, constants

    src = _jsonl(tmp_path / "hub.jsonl", corpus[:20])
    real, revisions, head = datasets.load_dataset, [], {"sha": "aaa111"}

    def fake(path, name=None, **kw):
        revisions.append(kw.get("revision"))
        return real("json", data_files=str(src), split=kw["split"], streaming=True)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "dataset_info", lambda self, name, revision=None, timeout=None:
                        SimpleNamespace(sha=head["sha"]))
    out = str(tmp_path / "o")
    m = make_shards("org/web", str(tok_path), out, hub_config="cfg", **KW)
    assert revisions == ["aaa111"] and m["inputs"][0]["revision"] == "aaa111"
    make_shards("org/web", str(tok_path), out, hub_config="cfg", **KW)
    assert revisions == ["aaa111"] and "already done" in capsys.readouterr().err
    head["sha"] = "bbb222"
    make_shards("org/web", str(tok_path), out, hub_config="cfg", **KW)
    assert revisions == ["aaa111", "bbb222"]
    assert "input changed since the last run (org/web: revision aaa111 -> bbb222)" in capsys.readouterr().err
