"""The one token-shard format: writer (used by data_prep) and memory-mapped reader (training).

A dataset directory holds shard files plus one `manifest.json`:

    DIR/manifest.json
    DIR/train_t00000_00000.bin  DIR/train_t00000_00001.bin ...  DIR/val_t00000_00000.bin ...

Shard file = 32-byte little-endian header, then a flat token array:

    magic b"GPTSHRD\\0" | version u32 | itemsize u32 (2 or 4) | num_tokens u64 | num_docs u64
    tokens: num_tokens x uint16 (vocab <= 65536) or uint32

Every document ends with the end-of-text token, so concatenating the shards of a split in
manifest order gives the token stream. A document may straddle two shards; it is counted in
the shard holding its last token.

    from gpt.shards import TokenShards
    ds = TokenShards("runs/demo/shards", split="train", tokenizer=tok)
    x = ds.window(0, 1025)            # int64 numpy array, may span shard boundaries

Writes go to `name.tmp` and are renamed when complete, so a crashed job never leaves a file
that looks like a finished shard; a write that fails (disk full, no permission) raises an
OSError naming the shard, and `ShardWriter.abort()` removes what the writer wrote. Only numpy
and the standard library are imported here.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

MAGIC = b"GPTSHRD\0"
VERSION = 1
HEADER = struct.Struct("<8sIIQQ")  # magic, version, itemsize, num_tokens, num_docs
HEADER_SIZE = HEADER.size  # 32: keeps the token array aligned for uint32 memmaps
MANIFEST = "manifest.json"
FORMAT = "gpt-shards"
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


class ShardError(ValueError):
    """A shard directory that cannot be read as written; the message is one line."""


def dtype_for_vocab(vocab_size: int) -> str:
    """The narrowest token dtype that holds every id of a vocabulary."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write via `path.tmp` + rename; on failure (e.g. a full disk) no `.tmp` is left behind."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename in (None, str(tmp)):  # name the file asked for
            raise type(e)(e.errno, e.strerror or str(e), str(path)) from None
        raise


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_header(path: str | os.PathLike) -> dict[str, int]:
    with open(path, "rb") as f:
        raw = f.read(HEADER_SIZE)
    if len(raw) < HEADER_SIZE:
        raise ShardError(f"{path}: truncated shard (shorter than its {HEADER_SIZE}-byte header)")
    magic, version, itemsize, num_tokens, num_docs = HEADER.unpack(raw)
    if magic != MAGIC:
        raise ShardError(f"{path}: not a token shard (bad magic {magic!r})")
    if version != VERSION:
        raise ShardError(f"{path}: shard format version {version}, this code reads {VERSION}")
    if itemsize not in (2, 4):
        raise ShardError(f"{path}: bad itemsize {itemsize} in header")
    return {"version": version, "itemsize": itemsize, "tokens": num_tokens, "documents": num_docs}


class ShardWriter:
    """Append documents (token lists) and get bounded-size shard files.

    Tokens stream straight to `<file>.tmp`; at a shard boundary the header is filled in,
    the file fsynced and renamed. Memory use is one document, not one shard.
    """

    def __init__(self, out_dir: str | os.PathLike, prefix: str, dtype: str = "uint16",
                 max_tokens_per_shard: int = 50_000_000):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if max_tokens_per_shard < 1:
            raise ValueError("max_tokens_per_shard must be >= 1")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix, self.dtype = prefix, np.dtype(DTYPES[dtype])
        self.max_tokens = max_tokens_per_shard
        self.records: list[dict[str, Any]] = []
        self._f = None
        self._tokens = self._docs = 0
        self._closed = False

    def _path(self, index: int) -> Path:
        return self.out_dir / f"{self.prefix}_{index:05d}.bin"

    def _open(self) -> None:
        tmp = self._path(len(self.records)).with_suffix(".bin.tmp")
        self._f = open(tmp, "wb")
        self._f.write(b"\0" * HEADER_SIZE)  # placeholder: a crash leaves no valid magic
        self._tokens = self._docs = 0

    def _finish(self) -> None:
        f, final = self._f, self._path(len(self.records))
        f.seek(0)
        f.write(HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, self._tokens, self._docs))
        f.flush()
        os.fsync(f.fileno())
        f.close()
        self._f = None
        os.replace(final.with_suffix(".bin.tmp"), final)
        self.records.append({"file": final.name, "tokens": self._tokens, "documents": self._docs,
                             "bytes": final.stat().st_size, "sha256": sha256_file(final)})

    def _named(self, e: OSError) -> OSError:
        """The error with the shard's name: a bare `write()` failure says only "No space left"."""
        if e.filename is not None:
            return e
        return type(e)(e.errno, e.strerror or str(e), str(self._path(len(self.records))))

    def add(self, tokens: Sequence[int] | np.ndarray, end_of_document: bool = True) -> None:
        """Append one document (its end-of-text token included by the caller).

        A huge document may come in parts: `end_of_document=False` for all but the last.
        """
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        arr = np.asarray(tokens)
        if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(self.dtype).max):
            raise ValueError(f"token id out of range for {self.dtype.name}")
        arr = arr.astype(self.dtype, copy=False)
        try:
            while arr.size:
                if self._f is None:
                    self._open()
                take = min(arr.size, self.max_tokens - self._tokens)
                self._f.write(arr[:take].tobytes())
                self._tokens += take
                arr = arr[take:]
                if arr.size == 0 and end_of_document:
                    self._docs += 1
                if self._tokens == self.max_tokens:
                    self._finish()
        except OSError as e:
            raise self._named(e) from None

    def close(self) -> list[dict[str, Any]]:
        """Finish the last shard; returns the shard records in order."""
        if not self._closed and self._f is not None:
            try:
                self._finish()
            except OSError as e:
                raise self._named(e) from None
        self._closed = True
        return self.records

    def abort(self) -> None:
        """Close without finishing: delete the open `.tmp` and every shard this writer finished."""
        f, self._f, self._closed = self._f, None, True
        if f is not None:
            try:
                f.close()  # flushing may fail again on a full disk; the file goes anyway
            except OSError:
                pass
        self._path(len(self.records)).with_suffix(".bin.tmp").unlink(missing_ok=True)
        for r in self.records:
            (self.out_dir / r["file"]).unlink(missing_ok=True)
        self.records = []


def write_manifest(data_dir: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    path = Path(data_dir) / MANIFEST
    atomic_write_bytes(path, (json.dumps(manifest, indent=1) + "\n").encode())
    return path


def read_manifest(data_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise ShardError(f"no {MANIFEST} in {data_dir} (write one with data_prep.make_shards or its merge step)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ShardError(f"{path}: not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise ShardError(f"{path}: manifest version {manifest.get('version')}, this code reads {VERSION}")
    if manifest.get("dtype") not in DTYPES:
        raise ShardError(f"{path}: bad dtype {manifest.get('dtype')!r}")
    return manifest


def split_summary(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The manifest entry for one split from its shard records."""
    records = list(records)
    return {"tokens": sum(r["tokens"] for r in records),
            "documents": sum(r["documents"] for r in records), "shards": records}


def check_tokenizer(manifest: dict[str, Any], tokenizer: Any, where: str = "") -> None:
    """Refuse a tokenizer other than the one the shards were written with (one line)."""
    want = manifest.get("tokenizer", {})
    got_hash, got_vocab = tokenizer.content_hash, tokenizer.vocab_size
    if want.get("hash") != got_hash or want.get("vocab_size") != got_vocab:
        raise ShardError(
            f"tokenizer mismatch{' for ' + where if where else ''}: shards were written with tokenizer "
            f"{str(want.get('hash'))[:12]} (vocab {want.get('vocab_size')}), "
            f"given {got_hash[:12]} (vocab {got_vocab})")


class TokenShards:
    """Read one split of a shard directory as one long token stream, via numpy.memmap.

    Sizes and headers are checked at open (a truncated shard raises ShardError naming the
    file); sha256 on request. Memmaps open lazily and are dropped on pickling, so the
    object is cheap to send to DataLoader workers.
    """

    def __init__(self, data_dir: str | os.PathLike, split: str = "train", tokenizer: Any = None,
                 verify_sha256: bool = False):
        self.data_dir, self.split = Path(data_dir), split
        self.manifest = read_manifest(data_dir)
        if tokenizer is not None:
            check_tokenizer(self.manifest, tokenizer, str(data_dir))
        splits = self.manifest.get("splits", {})
        if split not in splits:
            raise ShardError(f"{self.data_dir / MANIFEST}: no split {split!r} (has {', '.join(splits) or 'none'})")
        self.records = [r for r in splits[split]["shards"] if r["tokens"] > 0]
        self.dtype = np.dtype(DTYPES[self.manifest["dtype"]])
        for r in self.records:
            self._check(r, verify_sha256)
        sizes = np.array([r["tokens"] for r in self.records], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])  # start of each shard in the stream
        self.num_tokens = int(self.offsets[-1])
        self.num_documents = sum(r["documents"] for r in self.records)
        self._maps: dict[int, np.memmap] = {}

    @property
    def eot_id(self) -> int:
        return int(self.manifest["eot_id"])

    def _check(self, record: dict[str, Any], verify_sha256: bool) -> None:
        path = self.data_dir / record["file"]
        if not path.is_file():
            raise ShardError(f"{path}: shard listed in the manifest is missing")
        expected = HEADER_SIZE + record["tokens"] * self.dtype.itemsize
        actual = path.stat().st_size
        if actual != expected:
            raise ShardError(f"{path}: truncated or corrupt shard ({actual} bytes, manifest says {expected})")
        head = read_header(path)
        if head["itemsize"] != self.dtype.itemsize or head["tokens"] != record["tokens"]:
            raise ShardError(f"{path}: header disagrees with the manifest")
        if verify_sha256 and sha256_file(path) != record["sha256"]:
            raise ShardError(f"{path}: sha256 differs from the manifest (corrupt shard)")

    def _map(self, i: int) -> np.memmap:
        m = self._maps.get(i)
        if m is None:
            m = np.memmap(self.data_dir / self.records[i]["file"], dtype=self.dtype, mode="r",
                          offset=HEADER_SIZE, shape=(self.records[i]["tokens"],))
            self._maps[i] = m
        return m

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) of the split's stream, as int64."""
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise IndexError(f"window [{start}, {start + length}) outside 0..{self.num_tokens}")
        out = np.empty(length, dtype=np.int64)
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        done = 0
        while done < length:
            lo = start + done - int(self.offsets[i])
            take = min(length - done, self.records[i]["tokens"] - lo)
            out[done:done + take] = self._map(i)[lo:lo + take]
            done += take
            i += 1
        return out

    def __len__(self) -> int:
        return self.num_tokens

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = {}  # memmaps reopen lazily in the receiving process
        return state

    def __repr__(self) -> str:
        return (f"TokenShards({str(self.data_dir)!r}, split={self.split!r}, tokens={self.num_tokens}, "
                f"shards={len(self.records)}, dtype={self.dtype.name})")
