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

Post-training data (manifest "kind": "sft" or "pairs"; absent = "pretrain") is the same token
shards, each with two side files: a per-token loss mask and per-example offsets (see
ExampleShardWriter / ExampleShards at the end of this file). TokenShards reads their tokens.

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
from itertools import chain
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


def atomic_write_bytes(path: str | os.PathLike, data: bytes, unique: bool = False) -> None:
    """Write via `path.tmp` + rename; on failure (e.g. a full disk) no `.tmp` is left behind.

    unique: a temporary name of this writer's own (`path.<pid>-<random>.tmp`), for a file that
    several processes may rewrite at once (the pipeline's summary, by parallel Slurm jobs): each
    renames a complete file and the last one wins, where a shared `path.tmp` let one writer rename
    (or truncate) the other's. Without it, a writer killed mid-write leaves `path.tmp`, which the
    next write replaces; a unique name left by a kill stays until removed."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{os.urandom(4).hex()}.tmp" if unique else path.name + ".tmp")
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


# ---- post-training data: the same shards plus a loss mask and per-example offsets ----------
#
#   DIR/train_t00000_00000.bin        tokens, as above; a "document" is one example
#   DIR/train_t00000_00000.mask.bin   header (magic b"GPTMASK\0", itemsize 1, count = tokens),
#                                     then one uint8 per token: 1 = a training target
#   DIR/train_t00000_00000.idx.bin    header (magic b"GPTINDX\0", itemsize 8, count = values),
#                                     then one int64 row per example of shard-local token offsets:
#                                     sft (start, end); pairs (start, prompt_end, chosen_end, end)
#
# An example never straddles two shards, each starts with the chat template's end-of-text
# token (so the split is still a token stream of documents), and the examples of a shard are
# contiguous (row k's end is row k+1's start). A pair is stored once: prompt, then the chosen
# reply, then the rejected reply (each reply = content + <|end|>, unless it was truncated);
# its mask is 1 on both replies. The manifest's shard records carry the side files' names,
# sizes and sha256 ("mask", "index") and the shard's "supervised_tokens".

KINDS = ("pretrain", "sft", "pairs")
MASK_MAGIC, INDEX_MAGIC = b"GPTMASK\0", b"GPTINDX\0"
INDEX_COLUMNS = {"sft": ("start", "end"), "pairs": ("start", "prompt_end", "chosen_end", "end")}
MADE_BY = {"pretrain": "data_prep.make_shards", "sft": "data_prep.make_sft",
           "pairs": "data_prep.make_sft --kind pairs"}


def manifest_kind(manifest: dict[str, Any]) -> str:
    """"pretrain", "sft" or "pairs": what a shard directory holds."""
    return manifest.get("kind", "pretrain")


def read_side_header(path: str | os.PathLike, magic: bytes, itemsize: int) -> dict[str, int]:
    """Header of a mask or index file: {"count": items, "examples": examples}."""
    with open(path, "rb") as f:
        raw = f.read(HEADER_SIZE)
    if len(raw) < HEADER_SIZE:
        raise ShardError(f"{path}: truncated file (shorter than its {HEADER_SIZE}-byte header)")
    got_magic, version, got_itemsize, count, examples = HEADER.unpack(raw)
    if got_magic != magic:
        raise ShardError(f"{path}: not a {magic.rstrip(bytes(1)).decode()} file (bad magic {got_magic!r})")
    if version != VERSION or got_itemsize != itemsize:
        raise ShardError(f"{path}: version {version} / itemsize {got_itemsize}, this code reads {VERSION} / {itemsize}")
    return {"count": count, "examples": examples}


class ExampleShardWriter(ShardWriter):
    """Whole examples (ids + loss mask [+ pair bounds]) into token shards with mask and index files.

    A shard is closed early rather than split an example, so examples longer than
    max_tokens_per_shard are refused. The side files are finished (header, fsync, rename)
    before their token shard, so a finished token shard always has both.
    """

    def __init__(self, out_dir: str | os.PathLike, prefix: str, kind: str, dtype: str = "uint16",
                 max_tokens_per_shard: int = 50_000_000):
        if kind not in INDEX_COLUMNS:
            raise ValueError(f"kind must be one of {sorted(INDEX_COLUMNS)}, got {kind!r}")
        super().__init__(out_dir, prefix, dtype, max_tokens_per_shard)
        self.kind, self.columns = kind, len(INDEX_COLUMNS[kind])
        self._side: dict[str, Any] = {}
        self._examples = self._supervised = 0

    def side_path(self, index: int, what: str) -> Path:
        return self.out_dir / f"{self.prefix}_{index:05d}.{what}.bin"

    def _open(self) -> None:
        super()._open()
        self._side = {}
        for what in ("mask", "idx"):
            f = open(self.side_path(len(self.records), what).with_suffix(".bin.tmp"), "wb")
            f.write(b"\0" * HEADER_SIZE)
            self._side[what] = f
        self._examples = self._supervised = 0

    def _finish_side(self, what: str, magic: bytes, itemsize: int, count: int) -> dict[str, Any]:
        f, final = self._side.pop(what), self.side_path(len(self.records), what)
        f.seek(0)
        f.write(HEADER.pack(magic, VERSION, itemsize, count, self._examples))
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(final.with_suffix(".bin.tmp"), final)
        return {"file": final.name, "bytes": final.stat().st_size, "sha256": sha256_file(final)}

    def _finish(self) -> None:
        mask = self._finish_side("mask", MASK_MAGIC, 1, self._tokens)
        index = self._finish_side("idx", INDEX_MAGIC, 8, self._examples * self.columns)
        supervised = self._supervised
        super()._finish()
        self.records[-1].update(supervised_tokens=supervised, mask=mask, index=index)

    def add(self, tokens: Sequence[int] | np.ndarray, end_of_document: bool = True) -> None:
        raise TypeError("ExampleShardWriter takes whole examples: use add_example(ids, mask, bounds)")

    def add_example(self, ids: Sequence[int] | np.ndarray, mask: Sequence[int] | np.ndarray,
                    bounds: Sequence[int] = ()) -> None:
        """One example: its ids (leading end-of-text included), a 0/1 mask as long, and for pairs
        (prompt_end, chosen_end), offsets into ids where the chosen and the rejected reply start."""
        ids, mask = np.asarray(ids), np.asarray(mask)
        n = ids.size
        if n < 1 or mask.shape != ids.shape or ids.ndim != 1:
            raise ValueError(f"an example needs >= 1 token and a mask as long (got {ids.shape} and {mask.shape})")
        if mask.size and (mask.min() < 0 or mask.max() > 1):
            raise ValueError("the loss mask holds 0s and 1s only")
        if len(bounds) != self.columns - 2 or list(bounds) != sorted(set(bounds)) or any(
                not 0 < b < n for b in bounds):
            raise ValueError(f"{self.kind} examples take {self.columns - 2} increasing bounds inside (0, {n}), "
                             f"got {list(bounds)}")
        if n > self.max_tokens:
            raise ValueError(f"example of {n} tokens is longer than max_tokens_per_shard {self.max_tokens}")
        if self._f is not None and self._tokens + n > self.max_tokens:
            self._finish()  # examples never straddle shards
        if self._f is None:
            self._open()
        start = self._tokens
        row = np.array([start, *(start + b for b in bounds), start + n], dtype=np.int64)
        self._side["mask"].write(mask.astype(np.uint8).tobytes())
        self._side["idx"].write(row.tobytes())
        self._examples += 1
        self._supervised += int(mask.sum())
        super().add(ids)  # may finish the shard when it is exactly full: the side files are written

    def abort(self) -> None:
        """Close without finishing: delete the open temporary files and every finished shard."""
        for f in self._side.values():
            f.close()
        index, side = len(self.records), [(r["mask"]["file"], r["index"]["file"]) for r in self.records]
        self._side = {}
        super().abort()
        for tmp in (self.side_path(index, "mask"), self.side_path(index, "idx")):
            tmp.with_suffix(".bin.tmp").unlink(missing_ok=True)
        for name in chain.from_iterable(side):
            (self.out_dir / name).unlink(missing_ok=True)


class ExampleShards:
    """One split of an SFT or pairs directory: example i's tokens, loss mask and bounds.

    Refuses (one line) a directory of another kind, missing or truncated side files, and
    offsets that do not tile their shard; sha256 on request. Tokens and masks are memory-mapped
    (lazily, dropped on pickling); the offsets are read into memory (16-32 bytes per example).

        ex = ExampleShards("runs/demo/sft", "train", kind="sft")
        ids, mask = ex.example(0)           # int64, uint8
        prompt_end, chosen_end = ex.bounds(0)   # pairs only: offsets inside ids
    """

    def __init__(self, data_dir: str | os.PathLike, split: str = "train", kind: str = "sft",
                 tokenizer: Any = None, verify_sha256: bool = False):
        if kind not in INDEX_COLUMNS:
            raise ValueError(f"kind must be one of {sorted(INDEX_COLUMNS)}, got {kind!r}")
        self.manifest = read_manifest(data_dir)
        got = manifest_kind(self.manifest)
        if got != kind:
            raise ShardError(f"{data_dir}: holds {got} data (written by {MADE_BY.get(got, 'unknown')}), "
                             f"not {kind} data: write it with {MADE_BY[kind]}")
        self.kind, self.columns = kind, len(INDEX_COLUMNS[kind])
        self.tokens = TokenShards(data_dir, split, tokenizer, verify_sha256)
        self.data_dir, self.split = self.tokens.data_dir, split
        rows, shard_of = [], []
        for j, r in enumerate(self.tokens.records):
            rows.append(self._read_index(r, verify_sha256))
            shard_of.append(np.full(len(rows[-1]), j, dtype=np.int64))
        self.rows = np.concatenate(rows) if rows else np.zeros((0, self.columns), dtype=np.int64)
        self.shard_of = np.concatenate(shard_of) if shard_of else np.zeros(0, dtype=np.int64)
        self.lengths = self.rows[:, -1] - self.rows[:, 0]
        self._masks: dict[int, np.memmap] = {}

    def _side(self, record: dict[str, Any], what: str, magic: bytes, itemsize: int, count: int,
              verify_sha256: bool) -> Path:
        entry = record.get(what)
        if not isinstance(entry, dict) or "file" not in entry:
            raise ShardError(f"{self.data_dir / MANIFEST}: shard {record['file']} lists no {what} file")
        path = self.data_dir / entry["file"]
        if not path.is_file():
            raise ShardError(f"{path}: {what} file listed in the manifest is missing")
        if path.stat().st_size != HEADER_SIZE + count * itemsize:
            raise ShardError(f"{path}: truncated or corrupt {what} file ({path.stat().st_size} bytes, "
                             f"expected {HEADER_SIZE + count * itemsize})")
        head = read_side_header(path, magic, itemsize)
        if head["count"] != count or head["examples"] != record["documents"]:
            raise ShardError(f"{path}: header disagrees with the manifest")
        if verify_sha256 and sha256_file(path) != entry["sha256"]:
            raise ShardError(f"{path}: sha256 differs from the manifest (corrupt {what} file)")
        return path

    def _read_index(self, record: dict[str, Any], verify_sha256: bool) -> np.ndarray:
        n, t = record["documents"], record["tokens"]
        self._side(record, "mask", MASK_MAGIC, 1, t, verify_sha256)
        path = self._side(record, "index", INDEX_MAGIC, 8, n * self.columns, verify_sha256)
        rows = np.fromfile(path, dtype="<i8", offset=HEADER_SIZE).reshape(n, self.columns)
        tiled = n > 0 and rows[0, 0] == 0 and rows[-1, -1] == t and bool(np.all(rows[1:, 0] == rows[:-1, -1]))
        if not tiled or np.any(np.diff(rows, axis=1) <= 0):
            raise ShardError(f"{path}: example offsets do not tile the shard's {t} tokens (corrupt index)")
        return rows

    def _mask_map(self, j: int) -> np.memmap:
        m = self._masks.get(j)
        if m is None:
            r = self.tokens.records[j]
            m = np.memmap(self.data_dir / r["mask"]["file"], dtype=np.uint8, mode="r", offset=HEADER_SIZE,
                          shape=(r["tokens"],))
            self._masks[j] = m
        return m

    def __len__(self) -> int:
        return len(self.rows)

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids as int64, loss mask as uint8) of example i."""
        j, (start, end) = int(self.shard_of[i]), (int(self.rows[i, 0]), int(self.rows[i, -1]))
        ids = np.asarray(self.tokens._map(j)[start:end], dtype=np.int64)
        return ids, np.array(self._mask_map(j)[start:end])

    def bounds(self, i: int) -> tuple[int, ...]:
        """The inner bounds of example i relative to its start (pairs: prompt_end, chosen_end)."""
        return tuple(int(b) for b in self.rows[i, 1:-1] - self.rows[i, 0])

    def supervised(self, skip_first: bool = False) -> np.ndarray:
        """Loss-mask 1s per example (int64), one pass over the masks; skip_first: not counting each
        example's first token (a training target only when something precedes it)."""
        out = []
        first = np.searchsorted(self.shard_of, np.arange(len(self.tokens.records) + 1))  # examples per shard
        for j, (a, b) in enumerate(zip(first[:-1], first[1:])):
            m, starts = self._mask_map(j), self.rows[a:b, 0]
            out.append(np.add.reduceat(m, starts, dtype=np.int64) - (m[starts] if skip_first else 0))
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_masks"] = {}
        return state

    def __repr__(self) -> str:
        return (f"ExampleShards({str(self.data_dir)!r}, split={self.split!r}, kind={self.kind!r}, "
                f"examples={len(self)}, tokens={self.tokens.num_tokens})")
