"""Fixtures for the post-training data tests: conversations, pairs and small SFT/pairs directories.

    from tests.sft_fixtures import conversations, pairs, write_examples, tiny_gpt
    convs = conversations(12, seed=0)                     # gpt.chat messages, 1-3 exchanges, some with a system turn
    write_examples(tmp_path, "sft", {"train": [(ids, mask, ())...], "val": [...]}, tok)
"""
from __future__ import annotations

import hashlib
import random
from pathlib import Path

import torch

from gpt.chat import jinja_template
from gpt.config import GPTConfig
from gpt.model import GPT
from gpt.shards import FORMAT, VERSION, ExampleShardWriter, dtype_for_vocab, split_summary, write_manifest

WORDS = "the king is dead long live the queen and all her fools who sing of rain and wind".split()


def _text(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def conversations(n: int, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        msgs = [{"role": "system", "content": _text(rng, 2, 5)}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 3)):
            msgs += [{"role": "user", "content": _text(rng, 2, 12)}, {"role": "assistant", "content": _text(rng, 1, 10)}]
        out.append(msgs)
    return out


def pairs(n: int, seed: int = 0) -> list[tuple[list[dict], str, str]]:
    rng = random.Random(seed)
    out = []
    for conv in conversations(n, seed):
        chosen, rejected = _text(rng, 1, 10), _text(rng, 1, 10)
        while rejected == chosen:
            rejected = _text(rng, 1, 10)
        out.append((conv[:-1], chosen, rejected))
    return out


def write_examples(out: Path, kind: str, splits: dict[str, list[tuple]], tok, max_tokens_per_shard: int = 300) -> Path:
    """An SFT or pairs directory as data_prep writes it, from (ids, mask, bounds) per split."""
    records = {}
    for split, examples in splits.items():
        w = ExampleShardWriter(out, f"{split}_t00000", kind, dtype_for_vocab(tok.vocab_size), max_tokens_per_shard)
        for ids, mask, bounds in examples:
            w.add_example(ids, mask, bounds)
        records[split] = w.close()
    write_manifest(out, {"format": FORMAT, "version": VERSION, "kind": kind, "dtype": dtype_for_vocab(tok.vocab_size),
                         "tokenizer": {"hash": tok.content_hash, "vocab_size": tok.vocab_size},
                         "eot_id": tok.eot_id, "special_ids": tok.special_ids,
                         "chat_template_sha256": hashlib.sha256(jinja_template().encode()).hexdigest(),
                         "splits": {s: split_summary(r) for s, r in records.items()}})
    return out


def tiny_gpt(vocab_size: int, flavour: str = "gpt2", block_size: int = 128, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    preset = {"gpt2": "tiny", "llama": "tiny-llama"}[flavour]  # learned positions / RoPE + GQA
    return GPT(GPTConfig.from_preset(preset, vocab_size=vocab_size, block_size=block_size, n_embd=32))
