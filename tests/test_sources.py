"""data_prep/sources.py: every unreadable input is one DataPrepError naming the file (and line),
or a counted skip — truncated/corrupt gzip, deep JSON, huge integers, UTF-16, null fields,
lone surrogates, directories, unreadable files — and size flags are checked."""
import errno
import gzip
import json
from pathlib import Path

import pytest

from data_prep import sources
from data_prep.sources import DataPrepError, DocumentStream, check_sizes, resolve_sources, split_long


def _texts(path: Path, **kw) -> tuple[list[str], DocumentStream]:
    stream = DocumentStream(resolve_sources(str(path)), **kw)
    return [t for t, _ in stream], stream


def _lines(path: Path, lines: list[str]) -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)
    return path


def test_truncated_and_corrupt_gzip_name_the_file(tmp_path):
    good = _lines(tmp_path / "good.jsonl.gz", [json.dumps({"text": f"document {i} " * 50}) for i in range(200)])
    data = good.read_bytes()
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataPrepError, match=rf"^{cut}: truncated or corrupt gzip file after line \d+ "
                                            r"\(Compressed file ended before the end-of-stream marker was reached\)$"):
        _texts(cut)
    notgz = tmp_path / "plain.jsonl.gz"
    notgz.write_text('{"text": "not compressed"}\n')
    with pytest.raises(DataPrepError, match=rf"^{notgz}: truncated or corrupt gzip file \(Not a gzipped file"):
        _texts(notgz)
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0xFF  # a damaged block in the middle
    bad = tmp_path / "flipped.jsonl.gz"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(DataPrepError, match=rf"^{bad}: truncated or corrupt gzip file after line \d+ \("):
        _texts(bad)


def test_deep_json_and_huge_integers_are_bad_lines(tmp_path):
    src = _lines(tmp_path / "x.jsonl", ['{"text": ' + "[" * 5000 + "]" * 5000 + "}",
                                        '{"text": "ok", "id": ' + "7" * 5000 + "}",
                                        '{"text": "kept"}'])
    with pytest.raises(DataPrepError, match=rf"^{src}:1: JSON nested too deeply for Python's parser$"):
        _texts(src)
    with pytest.raises(DataPrepError, match=rf"^{src}:2: a number of more than 4300 digits \(Python's limit\)$"):
        _texts(src, max_bad_lines=1)
    texts, stream = _texts(src, max_bad_lines=2)
    assert texts == ["kept"] and stream.skipped == {"bad_line": 2} and stream.index == 3


def test_null_text_and_missing_field_say_which(tmp_path):
    src = _lines(tmp_path / "x.jsonl", ['{"text": null, "id": 1}'])
    with pytest.raises(DataPrepError, match=rf"^{src}:1: field 'text' is null$"):
        _texts(src)
    _lines(src, ['{"body": "x", "id": 1}'])
    with pytest.raises(DataPrepError, match=rf"^{src}:1: missing field 'text' \(fields: body, id\)$"):
        _texts(src)


@pytest.mark.parametrize("encoding,what", [("utf-16", r"UTF-16 \(byte-order mark\)"),
                                           ("utf-16-le", r"UTF-16 or UTF-32 \(NUL bytes between the characters\)"),
                                           ("utf-32", r"UTF-32 \(byte-order mark\)")])
@pytest.mark.parametrize("name", ["x.jsonl", "x.txt", "x.jsonl.gz"])
def test_utf16_input_is_named(tmp_path, encoding, what, name):
    raw = '{"text": "hello"}\n{"text": "world"}\n'.encode(encoding)
    path = tmp_path / name
    path.write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    with pytest.raises(DataPrepError, match=rf"^{path}: looks like {what}, not UTF-8; convert it first"):
        _texts(path)


def test_utf8_byte_order_mark_is_not_text(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "first"}\n{"text": "second"}\n')
    assert _texts(path)[0] == ["first", "second"]
    txt = tmp_path / "bom.txt"
    txt.write_bytes(b"\xef\xbb\xbfpara one\n\npara two\n")
    assert _texts(txt)[0] == ["para one\n", "para two\n"]


def test_lone_surrogates_are_skipped_pairs_kept(tmp_path):
    src = tmp_path / "s.jsonl"
    src.write_bytes(b'{"text": "lone \\ud800 high"}\n{"text": "lone \\udfff low"}\n'
                    b'{"text": "pair \\ud83d\\ude00 ok"}\n{"text": "escaped \\\\ud800 is text"}\n')
    texts, stream = _texts(src)
    assert texts == ["pair \U0001F600 ok", "escaped \\ud800 is text"]
    assert stream.skipped == {"invalid_utf8": 2}


def test_directory_source_says_so(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(DataPrepError, match=rf"^source '{tmp_path}/data': is a directory; give its files or a "
                                            rf"quoted glob such as '{tmp_path}/data/\*\.jsonl\.gz'$"):
        resolve_sources(str(tmp_path / "data"))


def test_unreadable_file_is_one_error(tmp_path, monkeypatch):
    """Tests run as root, where chmod 000 does not stop a read: the open is made to fail as it
    would for another user."""
    src = _lines(tmp_path / "x.jsonl", ['{"text": "a"}'])

    def denied(path, *args, **kw):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(sources, "open", denied, raising=False)
    with pytest.raises(DataPrepError, match=rf"^{src}: cannot read it \(Permission denied\)$"):
        _texts(src)


def test_sizes_are_checked():
    check_sizes(piece_chars=(1, 1), max_doc_chars=(0, 0), num_tasks=(None, 1))
    with pytest.raises(DataPrepError, match=r"^--piece_chars must be a positive integer, got 0$"):
        check_sizes(piece_chars=(0, 1))
    with pytest.raises(DataPrepError, match=r"^--max_doc_chars must be >= 0 \(0 = no limit\), got -1$"):
        check_sizes(max_doc_chars=(-1, 0))
    with pytest.raises(ValueError, match="max_chars must be >= 1"):
        split_long("some text", 0)  # would never advance
