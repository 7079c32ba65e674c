"""Tokenizer: a thin wrapper over `tokenizers.Tokenizer` with the pipeline's special tokens.

    from gpt.tokenizer import Tokenizer
    tok = Tokenizer.from_file("runs/demo/tokenizer.json")   # or a dir, or GPT-2 vocab.json + merges.txt
    ids = tok.encode("Hello world")                          # list[int]; no eot appended
    tok.decode(ids), tok.eot_id, tok.pad_id, tok.special_ids, tok.vocab_size, tok.content_hash

Byte-level BPE, so every string round-trips. Special tokens (SPECIAL_TOKENS) are reserved
now for the later stages: end-of-text, a pad that is never eos, and the chat roles plus
end-of-turn used by the chat template. Text given to `encode` is treated as plain text by
default: a document that happens to contain "<|endoftext|>" is not cut in two; pass
`allow_special=True` to map such strings to their special ids.

A GPT-2 `vocab.json` + `merges.txt` pair (or the same files under the names `encoder.json`
+ `vocab.bpe`) loads with GPT-2's ids ("Hello world" -> [15496, 995]); the special tokens
it lacks are added after its highest id, so `<|endoftext|>` stays 50256, and it is a special
token like the others (`allow_special=True` maps the string to 50256). `vocab_size` is the
highest id + 1, so a sparse vocabulary (ids with gaps) gets a dtype and an embedding that hold
every id.

`content_hash` is the sha256 of a canonical JSON serialization: equal for equal tokenizers in
any process, and what shard manifests record to refuse a mismatched tokenizer.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

EOT = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# File names of a GPT-2 style pair: Hugging Face's, then OpenAI's original release.
GPT2_PAIRS = (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe"))


class Tokenizer:
    """Byte-level BPE tokenizer carrying SPECIAL_TOKENS."""

    def __init__(self, tokenizer: HFTokenizer):
        self._tok = tokenizer
        added = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
        missing = [t for t in SPECIAL_TOKENS if t not in added]
        if missing:  # e.g. a GPT-2 pair: a token the vocab has keeps its id, and becomes special
            tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        self._special = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
        for t, i in self._special.items():  # tokenizers numbers new tokens by count: a sparse vocab collides
            other = tokenizer.model.id_to_token(i)
            if other not in (None, t):
                raise ValueError(f"special token {t} got id {i}, which the vocabulary already gives to {other!r} "
                                 "(ids with gaps: add the special tokens to the vocabulary itself)")
        self._vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1
        self._hash: Optional[str] = None

    # ---- loading and saving -------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
        """A tokenizer.json, a directory holding one, or a GPT-2 vocab.json/merges.txt pair.

        For a pair, pass the directory or the vocab file (merges.txt must sit beside it).
        """
        p = Path(path)
        if p.is_dir():
            if (p / "tokenizer.json").is_file():
                return cls._load_json(p / "tokenizer.json")
            for vocab, merges in GPT2_PAIRS:
                if (p / vocab).is_file() and (p / merges).is_file():
                    return cls.from_gpt2_files(p / vocab, p / merges)
            raise FileNotFoundError(f"{p}: no tokenizer.json and no vocab.json + merges.txt in this directory")
        if not p.is_file():
            raise FileNotFoundError(f"{p}: tokenizer file not found")
        for vocab, merges in GPT2_PAIRS:
            if p.name == vocab and (p.parent / merges).is_file():
                return cls.from_gpt2_files(p, p.parent / merges)
        return cls._load_json(p)

    @classmethod
    def _load_json(cls, path: Path) -> "Tokenizer":
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception with a long serde message
            raise ValueError(f"{path}: not a tokenizers JSON file ({str(e).splitlines()[0][:200]})") from None
        try:
            return cls(hf)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    @classmethod
    def from_gpt2_files(cls, vocab: str | os.PathLike, merges: str | os.PathLike) -> "Tokenizer":
        """GPT-2 style byte-level BPE from its vocab (token -> id JSON) and merges files.

        The special tokens the vocab lacks get the ids after its highest one (tokenizers alone
        would number them by count, onto ids a sparse vocab already uses).
        """
        ids, pairs = models.BPE.read_file(str(vocab), str(merges))
        top = max(ids.values(), default=-1)
        for t in SPECIAL_TOKENS:
            if t not in ids:
                top += 1
                ids[t] = top
        tok = HFTokenizer(models.BPE(ids, pairs))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        return cls(tok)

    @classmethod
    def from_str(cls, json_str: str) -> "Tokenizer":
        return cls(HFTokenizer.from_str(json_str))

    def to_str(self) -> str:
        return self._tok.to_str()

    def save(self, path: str | os.PathLike) -> Path:
        """Write tokenizer.json atomically (a directory gets `tokenizer.json` inside)."""
        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(self.to_str())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
        except BaseException as e:  # e.g. a full disk: no half-written .tmp left behind
            tmp.unlink(missing_ok=True)
            if isinstance(e, OSError) and e.filename in (None, str(tmp)):  # name the file asked for
                raise type(e)(e.errno, e.strerror or str(e), str(p)) from None
            raise
        return p

    # ---- encoding ---------------------------------------------------------------------
    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        self._tok.encode_special_tokens = not allow_special
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], allow_special: bool = False) -> list[list[int]]:
        self._tok.encode_special_tokens = not allow_special
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def decode_batch(self, batch: Iterable[Iterable[int]]) -> list[str]:
        return self._tok.decode_batch([list(ids) for ids in batch], skip_special_tokens=False)

    def token_to_id(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)

    # ---- properties -------------------------------------------------------------------
    @property
    def eot_id(self) -> int:
        return self._special[EOT]

    @property
    def pad_id(self) -> int:
        return self._special[PAD]

    @property
    def special_ids(self) -> dict[str, int]:
        return dict(self._special)

    @property
    def vocab_size(self) -> int:
        """The highest id + 1, specials included (= the number of ids unless the vocab has gaps)."""
        return self._vocab_size

    @property
    def content_hash(self) -> str:
        if self._hash is None:
            canonical = json.dumps(json.loads(self.to_str()), sort_keys=True, separators=(",", ":"),
                                   ensure_ascii=False)
            self._hash = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
        return self._hash

    @property
    def backend(self) -> HFTokenizer:
        """The wrapped `tokenizers.Tokenizer`, for what this class does not expose."""
        return self._tok

    def __getstate__(self) -> dict[str, Any]:
        return {"json": self.to_str()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(HFTokenizer.from_str(state["json"]))

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eot_id={self.eot_id}, hash={self.content_hash[:12]})"
