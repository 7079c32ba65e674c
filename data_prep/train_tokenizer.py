"""Train a byte-level BPE tokenizer on the same sources the sharding job reads.

    python -m data_prep.train_tokenizer --source data/shakespeare.jsonl.gz --vocab_size 4096 \\
        --out runs/demo/tokenizer.json
    python -m data_prep.train_tokenizer --source "crawl/*.jsonl.gz" --vocab_size 32768 \\
        --max_chars 2_000_000_000 --out tok/tokenizer.json      # train on a prefix of a large corpus

Sources are read by data_prep.sources (the code make_shards uses), so the same files, globs,
Hub names, --text_field and skip rules apply. The vocabulary starts with the special tokens of
gpt.tokenizer.SPECIAL_TOKENS (ids 0..5, end-of-text is 0), then the 256 byte symbols, then
merges. Training is deterministic: the same input gives a byte-identical tokenizer.json (same
`content_hash`). The file is written atomically.
"""
from __future__ import annotations

import sys
from typing import Iterator, Literal, Optional, Union

from data_prep.cli import run_cli
from data_prep.sources import DataPrepError, DocumentStream, check_sizes, resolve_sources, split_long
from gpt.tokenizer import SPECIAL_TOKENS, Tokenizer

PROG = "python -m data_prep.train_tokenizer"


def _texts(stream: DocumentStream, max_chars: int, piece_chars: int) -> Iterator[str]:
    seen = 0
    for text, _where in stream:
        if max_chars and seen + len(text) > max_chars:
            text = text[: max_chars - seen]  # a prefix of the corpus, cut inside the last document
        seen += len(text)
        if text:
            yield from split_long(text, piece_chars)  # bounded memory for huge documents
        if max_chars and seen >= max_chars:
            return


def train_tokenizer(source: Union[str, list[str]], out: str, vocab_size: int = 4096, text_field: str = "text",
                    min_frequency: int = 2, max_chars: int = 0, max_doc_chars: int = 0,
                    piece_chars: int = 100_000, max_bad_lines: int = 0,
                    reader: Literal["auto", "datasets"] = "auto", hub_split: str = "train",
                    hub_config: Optional[str] = None,
                    txt_sample_by: Literal["line", "paragraph", "document"] = "paragraph",
                    progress: bool = False) -> Tokenizer:
    """Train byte-level BPE and save it as tokenizer.json.

    Args:
        source: local files, globs (quote them) or Hub dataset names; one or a list.
        out: where to write tokenizer.json (a directory gets tokenizer.json inside).
        vocab_size: final vocabulary size, special tokens included.
        text_field: the field holding the document text.
        min_frequency: a pair must occur this often to be merged.
        max_chars: train on at most this many characters of the sources; 0 = all.
        max_doc_chars: skip documents longer than this; 0 = no limit.
        piece_chars: longer documents are fed in pieces of this size.
        max_bad_lines: malformed/missing-field records to skip before failing.
        reader: "datasets" sends local files through datasets.load_dataset(streaming=True) too.
        hub_split: split to stream for Hub dataset names.
        hub_config: configuration (subset) of Hub dataset names.
        txt_sample_by: documents of .txt sources: lines, paragraphs or whole files.
        progress: show the tokenizers training progress bar.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    base = len(SPECIAL_TOKENS) + 256
    if vocab_size < base:
        raise DataPrepError(f"--vocab_size must be at least {base} (specials + 256 bytes), got {vocab_size}")
    check_sizes(min_frequency=(min_frequency, 0), max_chars=(max_chars, 0), max_doc_chars=(max_doc_chars, 0),
                piece_chars=(piece_chars, 1), max_bad_lines=(max_bad_lines, 0))
    stream = DocumentStream(resolve_sources(source), text_field, reader, max_doc_chars, max_bad_lines,
                            hub_split, txt_sample_by, hub_config)
    bpe = HFTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS), show_progress=progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = _texts(stream, max_chars, piece_chars)
    first = next(texts, None)
    if first is None:
        raise DataPrepError(f"no text to train on in {', '.join(s.spec for s in stream.sources)} "
                            f"({stream.index} records read, skipped {dict(stream.skipped) or 'none'})")
    bpe.train_from_iterator(_chain_first(first, texts), trainer)
    tok = Tokenizer(bpe)
    path = tok.save(out)
    print(f"wrote {path}: vocab {tok.vocab_size}, eot {tok.eot_id}, hash {tok.content_hash[:12]}, "
          f"{stream.index} records read, skipped {dict(stream.skipped) or 'none'}", file=sys.stderr)
    return tok


def _chain_first(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest


def main(argv: Optional[list[str]] = None) -> None:
    run_cli(train_tokenizer, PROG, argv)


if __name__ == "__main__":
    main()
