"""gpt/tokenizer.py: loading (tokenizer.json, dir, GPT-2 pair), specials, round trips, hash."""
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from gpt.tokenizer import SPECIAL_TOKENS, Tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _gpt2_pair(d: Path, names=("vocab.json", "merges.txt")) -> Path:
    """A tiny GPT-2 style pair: 256 byte symbols, a few merges, <|endoftext|> last."""
    vocab = {ch: i for i, ch in enumerate(_bytes_to_unicode().values())}
    merges = ["H e", "l l", "He ll", "Hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"]
    for m in merges:
        vocab["".join(m.split())] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    d.mkdir(parents=True, exist_ok=True)
    (d / names[0]).write_text(json.dumps(vocab))
    (d / names[1]).write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return d


def _sparse_gpt2_pair(d: Path, eot: int = 70000) -> Path:
    """The tiny pair with ids that have gaps: <|endoftext|> at `eot`, and "Ġworld" moved to the id
    the first added special would get if tokenizers numbered them by count (266)."""
    _gpt2_pair(d)
    vocab = json.loads((d / "vocab.json").read_text())
    vocab["<|endoftext|>"] = eot
    vocab["Ġworld"] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab))
    return d


def _trained(extra_special=SPECIAL_TOKENS) -> Tokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=list(extra_special),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["to be or not to be, that is the question"] * 20, trainer)
    return Tokenizer(tok)


def test_gpt2_pair_ids_and_specials(tmp_path):
    d = _gpt2_pair(tmp_path / "gpt2")
    for tok in (Tokenizer.from_file(d), Tokenizer.from_file(d / "vocab.json"),
                Tokenizer.from_gpt2_files(d / "vocab.json", d / "merges.txt"),
                Tokenizer.from_file(_gpt2_pair(tmp_path / "openai", ("encoder.json", "vocab.bpe")))):
        base = 256 + 9  # bytes + merges
        assert tok.encode("Hello world") == [259, 264]  # the merges made "Hello" 259, "Ġworld" 264
        assert tok.eot_id == base  # stays where the pair put it
        assert tok.special_ids == {"<|endoftext|>": base, "<|pad|>": base + 1, "<|system|>": base + 2,
                                   "<|user|>": base + 3, "<|assistant|>": base + 4, "<|end|>": base + 5}
        assert tok.vocab_size == base + 6
        assert tok.decode(tok.encode("Hello world")) == "Hello world"


def test_gpt2_pair_endoftext_is_special(tmp_path):
    """In a GPT-2 pair <|endoftext|> is an ordinary vocab entry: it must still be the special
    token allow_special maps to (GPT-2: 50256), and stay plain text otherwise."""
    tok = Tokenizer.from_file(_gpt2_pair(tmp_path / "gpt2"))
    eot = tok.eot_id
    assert tok.encode("Hello<|endoftext|> world", allow_special=True) == [259, eot, 264]
    assert eot not in tok.encode("Hello<|endoftext|> world")
    assert tok.decode(tok.encode("Hello<|endoftext|> world")) == "Hello<|endoftext|> world"
    assert tok.encode("<|user|>Hello<|end|>", allow_special=True) == [tok.special_ids["<|user|>"], 259,
                                                                      tok.special_ids["<|end|>"]]


def test_sparse_ids_vocab_size_is_highest_id_plus_one(tmp_path):
    tok = Tokenizer.from_file(_sparse_gpt2_pair(tmp_path / "sparse", eot=70000))
    assert tok.eot_id == 70000 and tok.vocab_size == 70006
    assert tok.special_ids == {"<|endoftext|>": 70000, "<|pad|>": 70001, "<|system|>": 70002,
                               "<|user|>": 70003, "<|assistant|>": 70004, "<|end|>": 70005}
    world = tok.token_to_id("Ġworld")
    assert tok.encode("Hello world") == [259, world] and tok.decode([259, world]) == "Hello world"
    assert tok.decode([tok.pad_id]) == "<|pad|>" and tok.pad_id != world  # no two tokens share an id


def test_sparse_tokenizer_json_without_specials_is_refused(tmp_path):
    """A tokenizer.json whose vocab has gaps and no specials: adding them would reuse a taken id."""
    d = _sparse_gpt2_pair(tmp_path / "sparse")
    vocab = json.loads((d / "vocab.json").read_text())
    del vocab["<|endoftext|>"]
    merges = [tuple(m.split()) for m in (d / "merges.txt").read_text().splitlines()[1:]]
    hf = HFTokenizer(models.BPE(vocab, merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=rf"^{tmp_path}/tokenizer.json: special token <\|pad\|> got id 266, which "
                                         r"the vocabulary already gives to 'Ġworld' \(ids with gaps"):
        Tokenizer.from_file(tmp_path / "tokenizer.json")


def test_failed_save_leaves_no_tmp_and_names_the_file(tmp_path, monkeypatch):
    import errno

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as e:
        _trained().save(tmp_path / "tokenizer.json")
    assert (e.value.errno, e.value.filename) == (errno.ENOSPC, str(tmp_path / "tokenizer.json"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not os.environ.get("GPT2_TOKENIZER_DIR"), reason="set GPT2_TOKENIZER_DIR to the real GPT-2 files")
def test_real_gpt2_files():
    tok = Tokenizer.from_file(os.environ["GPT2_TOKENIZER_DIR"])
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode("Hello<|endoftext|>", allow_special=True) == [15496, 50256]
    assert tok.eot_id == 50256 and tok.pad_id == 50257 and tok.vocab_size == 50262


def test_trained_specials_round_trip_and_batch():
    tok = _trained()
    assert [tok.special_ids[t] for t in SPECIAL_TOKENS] == list(range(6))
    assert tok.eot_id == 0 and tok.pad_id == 1 and tok.pad_id != tok.eot_id
    texts = ["to be or not", "héllo wörld ✓ 🙂", "", "  spaces\n\ttabs  "]
    batch = tok.encode_batch(texts)
    assert batch == [tok.encode(t) for t in texts]
    assert tok.decode_batch(batch) == texts  # byte-level: unseen characters still round-trip
    assert all(i >= 6 for ids in batch for i in ids)  # no special id from plain text


def test_special_strings_are_plain_text_unless_allowed():
    tok = _trained()
    text = "a<|endoftext|>b"
    plain = tok.encode(text)
    assert tok.eot_id not in plain and tok.decode(plain) == text
    assert tok.encode(text, allow_special=True) == tok.encode("a") + [tok.eot_id] + tok.encode("b")
    assert tok.decode([tok.special_ids["<|user|>"]]) == "<|user|>"


def test_save_load_hash_stable_across_processes(tmp_path):
    tok = _trained()
    path = tok.save(tmp_path / "sub" / "tokenizer.json")
    assert not list(path.parent.glob("*.tmp"))
    again = Tokenizer.from_file(tmp_path / "sub")  # a directory holding tokenizer.json
    assert again.content_hash == tok.content_hash == Tokenizer.from_str(tok.to_str()).content_hash
    assert len(tok.content_hash) == 64
    code = f"from gpt.tokenizer import Tokenizer; print(Tokenizer.from_file({str(path)!r}).content_hash)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == tok.content_hash
    assert _trained(SPECIAL_TOKENS[::-1]).content_hash != tok.content_hash
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.content_hash == tok.content_hash and clone.encode("to be") == tok.encode("to be")


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        Tokenizer.from_file(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json and no vocab.json"):
        Tokenizer.from_file(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text('{"hello": 1}')
    with pytest.raises(ValueError, match=f"^{bad}: not a tokenizers JSON file"):
        Tokenizer.from_file(bad)
