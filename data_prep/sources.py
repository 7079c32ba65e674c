"""Reading raw text sources as a stream of documents, shared by train_tokenizer and make_shards.

A source is a local file, a glob, or a Hugging Face Hub dataset name:

    data/shakespeare.jsonl.gz      # jsonl / json / ndjson (+ .gz): read line by line here,
    "crawl/part-*.jsonl.gz"        # so a bad line is reported as FILE:LINE
    data/*.parquet                 # parquet: datasets.load_dataset("parquet", streaming=True)
    books/*.txt                    # text: one document per paragraph (blank-line separated)
    HuggingFaceFW/fineweb-edu      # anything else: datasets.load_dataset(name, hub_config, streaming=True)

`reader="datasets"` sends local files through `datasets.load_dataset(..., streaming=True)` too
(the Hub code path, testable offline on local files of the same schema). `RowStream` yields
whole records instead of one text field, for the chat data prep (data_prep/make_sft.py).

Everything streams: memory is one document plus small counters, whatever the input size.
Content problems are skipped and counted (`Counter` of reason -> count): "empty",
"invalid_utf8" (also lone surrogates from JSON escapes: not encodable text), "too_long".
Structural problems (malformed JSON, JSON nested too deeply or with a number Python will not
parse, a missing, null or non-string text field) raise `DataPrepError` naming the file and line,
unless `max_bad_lines` allows that many to be skipped (counted as "bad_line"). A file that
cannot be read at all (truncated or corrupt gzip, UTF-16, no permission) is one `DataPrepError`
naming it.
"""
from __future__ import annotations

import codecs
import glob
import gzip
import io
import json
import logging
import os
import re
import sys
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, Literal, Optional

Reader = Literal["auto", "datasets"]
JSON_EXT = (".jsonl", ".json", ".ndjson")
TEXT_EXT = (".txt", ".text", ".md")
PARQUET_EXT = (".parquet",)
GLOB_CHARS = set("*?[")
# A JSON escape of a UTF-16 surrogate: only such lines can decode to text that is not encodable.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_MISSING = object()


class DataPrepError(Exception):
    """A user-facing data problem; the CLI prints its one-line message and exits 1."""


def check_sizes(**sizes: tuple[Optional[int], int]) -> None:
    """Refuse a size-like flag below its minimum: `name=(value, minimum)`; None is "not given".

    A zero or negative size would loop forever or mean nothing (`--piece_chars 0` never
    advances), so every one is checked before any work starts.
    """
    for name, (value, minimum) in sizes.items():
        if value is not None and value < minimum:
            need = "a positive integer" if minimum == 1 else f">= {minimum} (0 = no limit)"
            raise DataPrepError(f"--{name} must be {need}, got {value}")


@dataclass(frozen=True)
class Source:
    spec: str  # what the user wrote
    kind: str  # "json" | "text" | "parquet" | "hub"
    files: tuple[str, ...] = ()
    revision: Optional[str] = None  # Hub sources: the commit to read (pinned by make_shards)


def _strip_gz(name: str) -> str:
    return name[:-3] if name.endswith(".gz") else name


def _kind(path: str) -> Optional[str]:
    base = _strip_gz(path.lower())
    for kind, exts in (("json", JSON_EXT), ("text", TEXT_EXT), ("parquet", PARQUET_EXT)):
        if base.endswith(exts):
            return kind
    return None


def resolve_sources(specs: str | list[str]) -> list[Source]:
    """Expand globs and classify each source; raise DataPrepError for nothing to read."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    if not specs:
        raise DataPrepError("no --source given")
    out = []
    for spec in specs:
        if os.path.isdir(spec):
            raise DataPrepError(f"source {spec!r}: is a directory; give its files or a quoted glob "
                                f"such as '{os.path.join(spec, '*.jsonl.gz')}'")
        local = os.path.exists(spec) or bool(GLOB_CHARS & set(spec)) or _kind(spec) is not None
        if not local:  # a Hub dataset name such as "HuggingFaceFW/fineweb-edu"
            out.append(Source(spec, "hub"))
            continue
        files = sorted(glob.glob(spec)) if GLOB_CHARS & set(spec) else [spec]
        files = [f for f in files if os.path.isfile(f)]
        if not files:
            what = "glob matched no files" if GLOB_CHARS & set(spec) else "file not found"
            raise DataPrepError(f"source {spec!r}: {what}")
        kinds = {_kind(f) for f in files}
        if None in kinds or len(kinds) > 1:
            bad = next(f for f in files if _kind(f) is None) if None in kinds else files[0]
            raise DataPrepError(f"source {spec!r}: cannot read {bad!r} (expected one of "
                                f"{', '.join(JSON_EXT + TEXT_EXT + PARQUET_EXT)}, optionally .gz; "
                                "all files of a glob of one kind)")
        out.append(Source(spec, kinds.pop(), tuple(files)))
    return out


def describe(sources: list[Source]) -> list[dict]:
    """What the manifest records about the sources."""
    return [{"spec": s.spec, "kind": s.kind, "files": len(s.files)} if s.files else
            {"spec": s.spec, "kind": s.kind} for s in sources]


def _open_binary(path: str) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _wide_encoding(head: bytes) -> Optional[str]:
    """"UTF-16"/"UTF-32" when the first bytes of a file say so, else None.

    UTF-16 text is valid UTF-8 byte for byte when it is ASCII (NULs are legal), so it would
    otherwise fail as "malformed JSON" on line 2, or be tokenized as text full of NULs.
    """
    if head.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        return "UTF-32 (byte-order mark)"
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "UTF-16 (byte-order mark)"
    if len(head) >= 4 and head.count(0) * 4 >= len(head):  # ASCII in UTF-16: every other byte NUL
        return "UTF-16 or UTF-32 (NUL bytes between the characters)"
    return None


class DocumentStream:
    """Iterate the documents of some sources as (text, where) pairs, counting skips.

    `index` counts every record read (kept or skipped), so tasks of an array can agree on
    who counts which skip without talking to each other.
    """

    def __init__(self, sources: list[Source], text_field: str = "text", reader: Reader = "auto",
                 max_doc_chars: int = 0, max_bad_lines: int = 0, hub_split: str = "train",
                 txt_sample_by: Literal["line", "paragraph", "document"] = "paragraph",
                 hub_config: Optional[str] = None):
        self.sources, self.text_field, self.reader = sources, text_field, reader
        self.max_doc_chars, self.max_bad_lines = max_doc_chars, max_bad_lines
        self.hub_split, self.txt_sample_by, self.hub_config = hub_split, txt_sample_by, hub_config
        self.skipped: Counter[str] = Counter()
        self.index = 0
        self.bad_seen = 0
        self._line = 0  # the line of a local file being read, for errors that cut a file short
        self.skip_hook = None  # called with (index, reason); default counts every skip

    def _skip(self, reason: str) -> None:
        if self.skip_hook is None or self.skip_hook(self.index):
            self.skipped[reason] += 1

    def _bad(self, where: str, why: str) -> None:
        self.bad_seen += 1
        if self.bad_seen > self.max_bad_lines:
            raise DataPrepError(f"{where}: {why}")
        self._skip("bad_line")

    def _check_text(self, value: object, where: str, fields) -> Optional[str]:
        if not isinstance(value, str):
            if value is _MISSING:
                why = f"missing field {self.text_field!r} (fields: {', '.join(map(str, fields))})"
            elif value is None:
                why = f"field {self.text_field!r} is null"
            else:
                why = f"field {self.text_field!r} is {type(value).__name__}, not a string"
            self._bad(where, why)
            return None
        if not value.strip():
            self._skip("empty")
            return None
        if self.max_doc_chars and len(value) > self.max_doc_chars:
            self._skip("too_long")
            return None
        return value

    def __iter__(self) -> Iterator[tuple[str, str]]:
        for src in self.sources:
            self.source = src
            if src.kind == "hub" or self.reader == "datasets" or src.kind == "parquet":
                rows = self._datasets_rows(src)
            elif src.kind == "json":
                rows = (r for f in src.files for r in self._local(f, self._json_lines))
            else:
                rows = (r for f in src.files for r in self._local(f, self._text_docs))
            for text, where in rows:
                if text is not None:
                    yield text, where
                self.index += 1

    # ---- local files: one error line naming the file when it cannot be read ------------
    def _local(self, path: str, rows) -> Iterator[tuple[Optional[str], str]]:
        self._line = 0  # the last line read, for an error in the middle of a file
        try:
            with _open_binary(path) as f:
                wide = _wide_encoding(f.peek(4096)[:4096])
                if wide:
                    raise DataPrepError(f"{path}: looks like {wide}, not UTF-8; convert it first "
                                        f"(e.g. iconv -f UTF-16 -t UTF-8)")
                yield from rows(path, f)
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:  # BadGzipFile is an OSError: first
            after = f" after line {self._line}" if self._line else ""
            raise DataPrepError(f"{path}: truncated or corrupt gzip file{after} ({e})") from None
        except OSError as e:
            raise DataPrepError(f"{path}: cannot read it ({e.strerror or e})") from None

    # ---- local jsonl, line by line: a bad line is named as FILE:LINE -------------------
    def _json_lines(self, path: str, f) -> Iterator[tuple[Optional[str], str]]:
        for lineno, raw in enumerate(f, 1):
            self._line = lineno
            where = f"{path}:{lineno}"
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]  # json.loads refuses a UTF-8 byte-order mark
            if not raw.strip():
                continue  # blank lines are not records
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                self._skip("invalid_utf8")
                yield None, where
                continue
            maybe_surrogate = b"\\u" in raw and _SURROGATE_ESCAPE.search(raw) is not None
            del raw  # a huge document must not be held three times over while it is processed
            obj, why = _parse_json(line)
            del line
            if why is None and not isinstance(obj, dict):
                why = f"expected a JSON object, got {type(obj).__name__}"
            if why is not None:
                self._bad(where, why)
                yield None, where
                continue
            yield self._record(obj, where, maybe_surrogate), where

    def _record(self, obj: dict, where: str, maybe_surrogate: bool) -> Optional[str]:
        """What one JSON object or dataset row yields: its text field, checked."""
        text = self._check_text(obj.get(self.text_field, _MISSING), where, obj.keys())
        if text is not None and maybe_surrogate and not _encodable(text):
            self._skip("invalid_utf8")  # a lone surrogate: not text any tokenizer can take
            text = None
        return text

    # ---- local text: paragraphs (or lines, or whole files) ------------------------------
    def _text_docs(self, path: str, f) -> Iterator[tuple[Optional[str], str]]:
        if self.txt_sample_by == "document":
            yield self._decoded(f.read().removeprefix(codecs.BOM_UTF8), path), path
            return
        para, start = [], 1
        for lineno, raw in enumerate(f, 1):
            self._line = lineno
            if lineno == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            if self.txt_sample_by == "line":
                yield self._decoded(raw.rstrip(b"\r\n"), f"{path}:{lineno}"), f"{path}:{lineno}"
            elif raw.strip():
                para.append(raw)
            elif para:
                yield self._decoded(b"".join(para), f"{path}:{start}"), f"{path}:{start}"
                para, start = [], lineno + 1
            else:
                start = lineno + 1
        if para:
            yield self._decoded(b"".join(para), f"{path}:{start}"), f"{path}:{start}"

    def _decoded(self, raw: bytes, where: str) -> Optional[str]:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            self._skip("invalid_utf8")
            return None
        return self._check_text(text, where, [])

    # ---- Hub names, parquet, and anything with reader="datasets" -----------------------
    def _datasets_rows(self, src: Source) -> Iterator[tuple[Optional[str], str]]:
        import datasets  # imported late: slow to import, and the local jsonl path needs none of it

        log = logging.getLogger("datasets")
        level = log.level
        log.setLevel(logging.CRITICAL)  # its "Failed to load JSON ..." line would double our one-line error
        try:
            if src.kind == "hub":
                pin = {"revision": src.revision} if src.revision else {}
                ds = datasets.load_dataset(src.spec, self.hub_config, split=self.hub_split, streaming=True, **pin)
            else:
                builder = {"json": "json", "text": "text", "parquet": "parquet"}[src.kind]
                kw = {"sample_by": self.txt_sample_by} if builder == "text" else {}
                ds = datasets.load_dataset(builder, data_files=list(src.files), split="train",
                                           streaming=True, **kw)
            for i, row in enumerate(ds):
                where = f"{src.spec} row {i}"
                yield self._record(row, where, False), where
        except DataPrepError:
            raise
        except Exception as e:  # datasets' errors are long and nested: keep the first line
            msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            raise DataPrepError(f"source {src.spec!r}: datasets could not read it "
                                f"({type(e).__name__}: {msg})") from None
        finally:
            log.setLevel(level)


class RowStream(DocumentStream):
    """The records of JSON, JSON-lines, parquet or Hub sources as whole dicts: (row, where) pairs, for
    data prep that reads several fields (data_prep/make_sft.py). The caller judges each row and
    reports what it refuses: `bad_row` (an error past `max_bad_rows`, else counted by reason) or
    `skip` (always counted). `source` is the Source being read."""

    def __init__(self, sources: list[Source], reader: Reader = "auto", max_bad_rows: int = 0,
                 hub_split: str = "train", hub_config: Optional[str] = None):
        text = [s.spec for s in sources if s.kind == "text"]
        if text:
            raise DataPrepError(f"source {text[0]!r}: a text file holds no records; give JSON lines, JSON or parquet")
        super().__init__(sources, "", reader, 0, max_bad_rows, hub_split, hub_config=hub_config)

    def _record(self, obj: dict, where: str, maybe_surrogate: bool) -> dict:
        return obj  # lone surrogates are the caller's to find: it knows which fields are text

    def skip(self, reason: str) -> None:
        self._skip(reason)

    def bad_row(self, where: str, why: str, reason: str) -> None:
        self.bad_seen += 1
        if self.bad_seen > self.max_bad_lines:
            raise DataPrepError(f"{where}: {why}")
        self._skip(reason)


def _parse_json(line: str) -> tuple[object, Optional[str]]:
    """(object, None), or (None, why the line is not usable JSON) — never a traceback."""
    try:
        return json.loads(line), None
    except json.JSONDecodeError as e:
        return None, f"malformed JSON ({e.msg.removesuffix(' at')} at column {e.colno})"  # "...starting at"
    except RecursionError:
        return None, "JSON nested too deeply for Python's parser"
    except ValueError as e:  # an integer of more than sys.get_int_max_str_digits() digits
        if "digits" in str(e):
            return None, f"a number of more than {sys.get_int_max_str_digits()} digits (Python's limit)"
        return None, f"malformed JSON ({str(e).splitlines()[0][:200]})"


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def split_long(text: str, max_chars: int) -> list[str]:
    """Cut a long document into pieces of at most max_chars, at line breaks when possible.

    Byte-level BPE is lossless per piece, so the concatenated tokens still decode to the
    exact text; only merges across a cut differ from tokenizing the whole string, which
    would take memory proportional to the document.
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")  # 0 would never advance
    if len(text) <= max_chars:
        return [text]
    pieces, start = [], 0
    while len(text) - start > max_chars:
        end = start + max_chars
        cut = text.rfind("\n", start + max_chars // 2, end)
        if cut < 0:
            cut = text.rfind(" ", start + max_chars // 2, end)
        cut = end if cut < 0 else cut + 1
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces
