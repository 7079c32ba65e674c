"""gpt/shards.py: writer/reader round trip, shard boundaries, integrity checks, pickling."""
import os
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from gpt.shards import (HEADER_SIZE, ShardError, ShardWriter, TokenShards, dtype_for_vocab,
                        read_header, read_manifest, sha256_file, split_summary, write_manifest)

TOK = SimpleNamespace(content_hash="a" * 64, vocab_size=300)


def _docs(n=7, seed=0, hi=300, eot=299):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(0, hi - 1, size=int(rng.integers(1, 40)))) + [eot] for _ in range(n)]


def _write(tmp_path: Path, docs, dtype="uint16", max_tokens=25, val_docs=()):
    manifest = {"format": "gpt-shards", "version": 1, "dtype": dtype,
                "tokenizer": {"hash": TOK.content_hash, "vocab_size": TOK.vocab_size},
                "eot_id": 299, "splits": {}, "sources": [], "skipped": {}, "duplicates": 0}
    for split, ds in (("train", docs), ("val", val_docs)):
        w = ShardWriter(tmp_path, f"{split}_t00000", dtype, max_tokens)
        for d in ds:
            w.add(d)
        manifest["splits"][split] = split_summary(w.close())
    write_manifest(tmp_path, manifest)
    return manifest


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_round_trip_across_shard_boundaries(tmp_path, dtype):
    docs = _docs()
    m = _write(tmp_path, docs, dtype=dtype, val_docs=[[5, 299]])
    flat = np.concatenate([np.array(d) for d in docs])
    shards = m["splits"]["train"]["shards"]
    assert [r["tokens"] for r in shards[:-1]] == [25] * (len(shards) - 1)  # bounded, exactly full
    assert m["splits"]["train"]["tokens"] == len(flat)
    assert m["splits"]["train"]["documents"] == len(docs)
    ds = TokenShards(tmp_path, "train", tokenizer=TOK, verify_sha256=True)
    assert ds.num_tokens == len(flat) and ds.num_documents == len(docs) and ds.eot_id == 299
    np.testing.assert_array_equal(ds.window(0, len(flat)), flat)
    for start in (0, 3, 24, 25, 26, 49):  # windows straddling one or more boundaries
        w = ds.window(start, 30)
        assert w.dtype == np.int64
        np.testing.assert_array_equal(w, flat[start:start + 30])
    np.testing.assert_array_equal(TokenShards(tmp_path, "val").window(0, 2), [5, 299])
    for r in shards:
        path = tmp_path / r["file"]
        itemsize = 2 if dtype == "uint16" else 4
        assert r["bytes"] == path.stat().st_size == HEADER_SIZE + itemsize * r["tokens"]
        assert r["sha256"] == sha256_file(path)
        assert read_header(path)["tokens"] == r["tokens"]
    assert not list(tmp_path.glob("*.tmp"))


def test_document_counted_in_shard_of_its_last_token(tmp_path):
    w = ShardWriter(tmp_path, "x", "uint16", 4)
    w.add([1, 2, 3, 9])     # fills shard 0 exactly
    w.add([4, 5, 6, 7, 9])  # 4 tokens in shard 1, its eot in shard 2
    recs = w.close()
    assert [(r["tokens"], r["documents"]) for r in recs] == [(4, 1), (4, 0), (1, 1)]
    w = ShardWriter(tmp_path, "y", "uint16", 4)
    w.add([1, 2, 3], end_of_document=False)  # a document written in parts
    w.add([4, 5, 9])
    assert [(r["tokens"], r["documents"]) for r in w.close()] == [(4, 0), (2, 1)]


def test_out_of_range_token_rejected(tmp_path):
    w = ShardWriter(tmp_path, "x", "uint16", 10)
    with pytest.raises(ValueError, match="out of range for uint16"):
        w.add([70000])


def test_truncated_shard_names_file(tmp_path):
    m = _write(tmp_path, _docs())
    victim = tmp_path / m["splits"]["train"]["shards"][1]["file"]
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size - 3)
    with pytest.raises(ShardError, match=rf"^{victim}: truncated or corrupt shard \(\d+ bytes, manifest says \d+\)$"):
        TokenShards(tmp_path)


def test_missing_and_corrupt_shard(tmp_path):
    m = _write(tmp_path, _docs())
    first = tmp_path / m["splits"]["train"]["shards"][0]["file"]
    data = bytearray(first.read_bytes())
    data[-1] ^= 0xFF  # same size, different content: only sha256 catches it
    first.write_bytes(bytes(data))
    TokenShards(tmp_path)
    with pytest.raises(ShardError, match="sha256 differs from the manifest"):
        TokenShards(tmp_path, verify_sha256=True)
    first.unlink()
    with pytest.raises(ShardError, match="shard listed in the manifest is missing"):
        TokenShards(tmp_path)


def test_tokenizer_mismatch_one_line(tmp_path):
    _write(tmp_path, _docs())
    other = SimpleNamespace(content_hash="b" * 64, vocab_size=300)
    with pytest.raises(ShardError) as e:
        TokenShards(tmp_path, tokenizer=other)
    assert str(e.value) == (f"tokenizer mismatch for {tmp_path}: shards were written with tokenizer "
                            "aaaaaaaaaaaa (vocab 300), given bbbbbbbbbbbb (vocab 300)")
    with pytest.raises(ShardError, match=r"\(vocab 300\), given aaaaaaaaaaaa \(vocab 301\)"):
        TokenShards(tmp_path, tokenizer=SimpleNamespace(content_hash="a" * 64, vocab_size=301))


def test_manifest_errors(tmp_path):
    with pytest.raises(ShardError, match=f"^no manifest.json in {tmp_path} "):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ShardError, match="not valid JSON"):
        read_manifest(tmp_path)
    _write(tmp_path, _docs())
    with pytest.raises(ShardError, match="no split 'test' \\(has train, val\\)"):
        TokenShards(tmp_path, "test")


def test_window_bounds_and_pickle(tmp_path):
    docs = _docs()
    _write(tmp_path, docs)
    ds = TokenShards(tmp_path)
    with pytest.raises(IndexError):
        ds.window(ds.num_tokens - 2, 3)
    ds.window(0, 10)  # opens a memmap
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._maps == {}
    np.testing.assert_array_equal(clone.window(20, 20), ds.window(20, 20))


def test_crashed_writer_leaves_no_complete_looking_file(tmp_path):
    w = ShardWriter(tmp_path, "x", "uint16", 100)
    w.add([1, 2, 3])  # shard open, never closed: as after kill -9
    assert not list(tmp_path.glob("*.bin"))
    (tmp_file,) = tmp_path.glob("*.bin.tmp")
    w._f.flush()  # what the OS holds after the kill
    with pytest.raises(ShardError, match="bad magic"):
        read_header(tmp_file)


def test_dtype_for_vocab():
    assert dtype_for_vocab(65536) == "uint16" and dtype_for_vocab(65537) == "uint32"


def test_write_error_names_the_shard_and_abort_removes_everything(tmp_path, monkeypatch):
    """A full disk mid-shard: the OSError names the shard (a bare write() error names nothing),
    and abort() deletes the open .tmp and the shards already finished."""
    import errno

    w = ShardWriter(tmp_path, "x", "uint16", 4)
    w.add([1, 2, 3, 9])  # shard 0 finished
    w.add([4, 5])        # shard 1 open

    class Full:
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            raise OSError(errno.ENOSPC, "No space left on device")  # flushing fails again

    real = w._f
    w._f = Full()
    with pytest.raises(OSError) as e:
        w.add([6, 7, 9])
    assert (e.value.errno, e.value.filename) == (errno.ENOSPC, str(tmp_path / "x_00001.bin"))
    real.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_00000.bin", "x_00001.bin.tmp"]
    w.abort()
    assert list(tmp_path.iterdir()) == [] and w.records == []
    with pytest.raises(RuntimeError, match="closed"):
        w.add([1])


def test_atomic_write_failure_leaves_old_file_and_no_tmp(tmp_path, monkeypatch):
    import errno

    from gpt.shards import atomic_write_bytes

    target = tmp_path / "manifest.json"
    target.write_text("old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as e:
        atomic_write_bytes(target, b"new")
    assert e.value.filename == str(target)
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"] and target.read_text() == "old"


def test_concurrent_unique_atomic_writes_each_rename_their_own_file(tmp_path, monkeypatch):
    # Two Slurm jobs of a pipeline rewrite DIR/summary.md at once: with one shared `summary.md.tmp`
    # the second writer's rename took the first one's file and the first rename failed (ENOENT).
    from gpt.shards import atomic_write_bytes

    target, real, calls = tmp_path / "summary.md", os.replace, []

    def interleaved(src, dst):
        if not calls:  # the first writer is about to rename: a second one writes the same file meanwhile
            calls.append(src)
            atomic_write_bytes(target, b"second", unique=True)
        real(src, dst)

    monkeypatch.setattr(os, "replace", interleaved)
    atomic_write_bytes(target, b"first", unique=True)
    assert target.read_bytes() == b"first" and [p.name for p in tmp_path.iterdir()] == ["summary.md"]
