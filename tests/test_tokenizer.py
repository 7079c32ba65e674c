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


@pytest.mark.skipif(not os.environ.get("GPT2_TOKENIZER_DIR"), reason="set GPT2_TOKENIZER_DIR to the real GPT-2 files")
def test_real_gpt2_files():
    tok = Tokenizer.from_file(os.environ["GPT2_TOKENIZER_DIR"])
    assert tok.encode("Hello world") == [15496, 995]
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
