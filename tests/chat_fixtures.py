"""A small byte-level BPE tokenizer trained on the embedded Shakespeare, for the chat-stage tests.

    from tests.chat_fixtures import shakespeare_tokenizer
    tok = shakespeare_tokenizer()      # gpt.tokenizer.Tokenizer, vocab 1024, cached per process

Trained the way data_prep.train_tokenizer trains the demo's (same corpus, same specials), on a
prefix so it takes well under a second.
"""
from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=None)
def shakespeare_tokenizer(vocab_size: int = 1024, chars: int = 200_000):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from gpt.tokenizer import SPECIAL_TOKENS, Tokenizer

    with gzip.open(ROOT / "data" / "shakespeare.jsonl.gz", "rt", encoding="utf-8") as f:
        text = json.loads(f.readline())["text"][:chars]
    bpe = HFTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([text[i:i + 2000] for i in range(0, len(text), 2000)], trainer)
    return Tokenizer(bpe)
