"""data_prep.train_tokenizer: deterministic byte-level BPE with the reserved specials."""
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.sources import DataPrepError
from data_prep.train_tokenizer import main, train_tokenizer
from gpt.tokenizer import SPECIAL_TOKENS, Tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def src(tmp_path_factory, shakespeare_path) -> Path:
    text = json.loads(gzip.open(shakespeare_path, "rt").readline())["text"][:150_000]
    path = tmp_path_factory.mktemp("src") / "small.jsonl.gz"
    with gzip.open(path, "wt") as f:
        for i in range(0, len(text), 1500):
            f.write(json.dumps({"text": text[i:i + 1500]}) + "\n")
    return path


def test_vocab_specials_and_round_trip(tmp_path, src):
    tok = train_tokenizer(str(src), str(tmp_path / "tok.json"), vocab_size=700)
    assert tok.vocab_size == 700
    assert [tok.special_ids[t] for t in SPECIAL_TOKENS] == list(range(6)) and tok.eot_id == 0 and tok.pad_id == 1
    loaded = Tokenizer.from_file(tmp_path / "tok.json")
    assert loaded.content_hash == tok.content_hash
    text = "To be, or not to be: that is the question. ünïcödé ✓"
    assert loaded.decode(loaded.encode(text)) == text
    assert len(loaded.encode("the king")) < len("the king".encode())  # merges were learned


def test_deterministic_across_processes_and_parallelism(tmp_path, src):
    """Same input -> byte-identical tokenizer.json, whatever the thread settings."""
    outs = []
    for i, par in enumerate(("true", "false")):
        out = tmp_path / f"tok{i}.json"
        env = {**os.environ, "TOKENIZERS_PARALLELISM": par, "PYTHONPATH": str(ROOT)}
        subprocess.run([sys.executable, "-m", "data_prep.train_tokenizer", "--source", str(src), "--vocab_size", "600",
                        "--out", str(out)], cwd=ROOT, env=env, check=True, capture_output=True)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    assert Tokenizer.from_file(tmp_path / "tok0.json").content_hash == \
        train_tokenizer(str(src), str(tmp_path / "again.json"), vocab_size=600).content_hash


def test_max_chars_limits_training_text(tmp_path, src):
    small = train_tokenizer(str(src), str(tmp_path / "a.json"), vocab_size=2000, max_chars=3000)
    full = train_tokenizer(str(src), str(tmp_path / "b.json"), vocab_size=2000)
    assert small.vocab_size < full.vocab_size == 2000  # 3000 chars cannot support 2000 merges


def test_errors(tmp_path, src, capsys):
    with pytest.raises(DataPrepError, match=r"^--vocab_size must be at least 262"):
        train_tokenizer(str(src), str(tmp_path / "t.json"), vocab_size=100)
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n')
    with pytest.raises(SystemExit) as e:
        main(["--source", str(empty), "--out", str(tmp_path / "t.json")])
    assert e.value.code == 1
    assert capsys.readouterr().err == (f"error: no text to train on in {empty} (1 records read, "
                                       "skipped {'empty': 1})\n")


def test_lone_surrogate_is_skipped_not_a_traceback(tmp_path, capsys):
    src = tmp_path / "s.jsonl"
    src.write_bytes(b'{"text": "lone \\ud800 surrogate"}\n' + b'{"text": "plain text to learn from"}\n' * 3)
    main(["--source", str(src), "--out", str(tmp_path / "t.json"), "--vocab-size", "300"])
    assert capsys.readouterr().err.endswith("4 records read, skipped {'invalid_utf8': 1}\n")


def test_sizes_refused_in_one_line(tmp_path, src):
    """`--piece_chars 0` used to loop forever: a subprocess with a timeout, so a hang fails."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for flag, value, want in (("--piece_chars", "0", "--piece_chars must be a positive integer, got 0"),
                              ("--max-chars", "-1", "--max_chars must be >= 0 (0 = no limit), got -1"),
                              ("--max_bad_lines", "-2", "--max_bad_lines must be >= 0 (0 = no limit), got -2")):
        run = subprocess.run([sys.executable, "-m", "data_prep.train_tokenizer", "--source", str(src), "--out",
                              str(tmp_path / "t.json"), flag, value], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=120)
        assert (run.returncode, run.stderr) == (1, f"error: {want}\n")
    assert not (tmp_path / "t.json").exists()


def test_unwritable_out_is_one_line(tmp_path, src, capsys, monkeypatch):
    """A full disk when the tokenizer is written: the file asked for is named, no .tmp stays."""
    import errno

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(SystemExit) as e:
        main(["--source", str(src), "--out", str(tmp_path / "t.json"), "--vocab_size", "300"])
    assert e.value.code == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 't.json'}: No space left on device\n"
    assert list(tmp_path.iterdir()) == []
