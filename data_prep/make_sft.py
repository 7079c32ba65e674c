"""Chat data prep: SFT conversations or preference pairs -> token shards + loss masks + offsets (gpt/shards.py).

    python -m data_prep.make_sft --source runs/demo/task/train.jsonl --val_source runs/demo/task/val.jsonl \\
        --tokenizer runs/demo/tokenizer.json --out runs/demo/sft --block_size 256
    python -m data_prep.make_sft --kind pairs --source prefs.jsonl --tokenizer tok.json --out DIR --block_size 512
    python -m data_prep.make_sft --source HuggingFaceH4/ultrachat_200k --hub_split train_sft --tokenizer tok.json \\
        --out DIR --num_proc 8

Rows come in the formats users bring, TRL's column names unchanged (data_prep/chat_formats.py:
messages, prompt/completion, Alpaca, ShareGPT; pairs: explicit prompt, implicit prompt, Anthropic
HH, UltraFeedback-binarized), detected from each source's first row unless `--format` says.
They are read as make_shards reads text (data_prep/sources.py: local JSONL line by line, parquet
and Hub names through `datasets`), rendered with the one chat template (gpt/chat.py) and fitted
to the block by the truncation policy of data_prep/render.py: oldest exchanges first, then the
final reply, never an example without a supervised token; what is dropped or truncated is
counted in the manifest.

Sizes. An SFT example is at most block_size + 1 tokens (a training row's inputs are its first
block_size tokens); a pair's prompt + either reply is at most block_size tokens (a reward model
reads the whole sequence). Train with data.block_size >= the --block_size given here.

Validation: a share of the examples by hash (`--val_fraction`, default 0.01), or every example
of `--val_source` (e.g. the demo task's held-out file), not both.

Tasks, resume, dedup, Slurm arrays, input fingerprints and merge are make_shards' (one
implementation, data_prep/make_shards.py): each task keeps the examples whose hash (of the
converted conversation or pair) falls in its slice, drops exact duplicates within a split
(counted), renders them in `num_proc` workers and writes them in input order; a task's marker
is written last, so a job killed at any point finishes on the next run, byte-identical.
`python -m data_prep.make_sft merge --out DIR` writes the manifest after an array; on Slurm,
`DATA_PREP_JOB=data_prep.make_sft slurm/data_prep.sh --tasks 16 -- --source ... --out DIR` submits
both (the array and the merge after it).

Bad rows: one `error: FILE:LINE: field ...: why` line, or, with `--max_bad_rows N`, up to N
skipped and counted by reason (unknown_role, empty_assistant, no_final_assistant, wrong_type,
missing_field, prompt_mismatch, identical_responses, ... and make_shards' bad_line for malformed
JSON). Always skipped and counted: rows whose text holds a reserved token ("<|end|>" ...),
UltraFeedback ties, text that is not UTF-8.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import sys
from collections import Counter, deque
from dataclasses import asdict
from itertools import chain
from pathlib import Path
from typing import Any, Literal, Optional, Union

import numpy as np

from data_prep.chat_formats import PAIR_FORMATS, SFT_FORMATS, Pair, RowError, SkipRow, convert, detect_format
from data_prep.cli import run_cli, usable_cpus, warn
from data_prep.fingerprint import pin_hub_revisions
from data_prep.make_shards import (SPLITS, _Progress, check_tasks, doc_route, finished_task, run_task,
                                   task_from_env)
from data_prep.render import Drop, Rendered, Truncation, render_conversation, render_pair
from data_prep.sources import DataPrepError, RowStream, check_sizes, describe, resolve_sources
from gpt.chat import ChatTemplate, jinja_template
from gpt.shards import FORMAT, VERSION, ExampleShardWriter, dtype_for_vocab, split_summary, write_manifest
from gpt.tokenizer import Tokenizer

PROG = "python -m data_prep.make_sft"
Kind = Literal["sft", "pairs"]
_WORKER: dict[str, Any] = {}


def _init_worker(tok_json: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # num_proc processes already fill the cores
    _WORKER["chat"] = ChatTemplate(Tokenizer.from_str(tok_json))


def render_batch(items: list, max_tokens: int, truncation: Truncation, dtype: str,
                 chat: Optional[ChatTemplate] = None) -> list[Union[Rendered, str]]:
    """Render conversations or pairs; a Drop becomes its reason. Runs in a worker (or inline)."""
    chat = chat or _WORKER["chat"]
    out: list[Union[Rendered, str]] = []
    for item in items:
        try:
            r = (render_pair if isinstance(item, Pair) else render_conversation)(chat, item, max_tokens, truncation)
        except Drop as e:
            out.append(e.reason)
            continue
        out.append(Rendered(np.array(r.ids, dtype=dtype), np.array(r.mask, dtype=np.uint8), r.bounds, r.truncated))
    return out


def template_sha256() -> str:
    return hashlib.sha256(jinja_template().encode()).hexdigest()


def example_bytes(item: Any) -> bytes:
    """Canonical bytes of a converted example: what dedup, the task slice and the val split hash."""
    return json.dumps(asdict(item), sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


def make_sft(source: Union[str, list[str]], tokenizer: str, out: str, kind: Kind = "sft",
             format: Optional[str] = None, block_size: int = 2048, truncation: Truncation = "turns",
             val_source: Union[str, list[str], None] = None, val_fraction: Optional[float] = None,
             num_proc: int = 1, max_tokens_per_shard: int = 100_000_000, num_tasks: Optional[int] = None,
             task_id: Optional[int] = None, max_bad_rows: int = 0, reader: Literal["auto", "datasets"] = "auto",
             hub_split: str = "train", hub_config: Optional[str] = None, hub_revision: Optional[str] = None,
             batch_rows: int = 500, progress: bool = True) -> dict[str, Any]:
    """Render chat rows into an SFT or pairs directory; returns the task's partial manifest (or the merged one).

    Args:
        source: local files (jsonl/json/parquet, optionally .gz), globs (quote them) or Hub dataset names.
        tokenizer: tokenizer.json (with the chat special tokens), a directory holding one, or a GPT-2 pair.
        out: dataset directory for the shards and manifest.json.
        kind: "sft" (conversations) or "pairs" (preference pairs).
        format: the rows' format (sft: messages, prompt_completion, alpaca, sharegpt; pairs: explicit,
            implicit, hh, ultrafeedback); default: detected from each source's first row.
        block_size: the training block: SFT examples are fitted to block_size + 1 tokens, pairs to
            block_size per prompt + reply.
        truncation: "turns" (drop the oldest exchanges, then cut the final reply; see data_prep/render.py)
            or "drop" (drop every example that does not fit). Both are counted in the manifest.
        val_source: held-out files or Hub names: every example goes to the val split.
        val_fraction: share of the examples held out for validation by hash (default 0.01, or 0
            with --val_source; giving both is an error).
        num_proc: rendering worker processes.
        max_tokens_per_shard: shard size bound (examples never straddle shards).
        num_tasks: tasks of a job array (default: SLURM_ARRAY_TASK_COUNT or 1).
        task_id: this task (default: from SLURM_ARRAY_TASK_ID).
        max_bad_rows: malformed rows to skip (counted by reason) before failing.
        reader: "datasets" sends local files through datasets.load_dataset(streaming=True) too.
        hub_split: split to stream for Hub dataset names (also for --val_source Hub names).
        hub_config: configuration (subset) of Hub dataset names.
        hub_revision: branch, tag or commit of Hub dataset names (default: main, pinned and recorded).
        batch_rows: rows per batch sent to a worker.
        progress: show a tqdm progress bar.
    """
    formats = SFT_FORMATS if kind == "sft" else PAIR_FORMATS
    if kind not in ("sft", "pairs"):
        raise DataPrepError(f"--kind must be sft or pairs, got {kind!r}")
    if format is not None and format not in formats:
        raise DataPrepError(f"--format {format!r} is not a {kind} format ({', '.join(formats)})")
    check_sizes(block_size=(block_size, 1), num_proc=(num_proc, 1), max_tokens_per_shard=(max_tokens_per_shard, 1),
                num_tasks=(num_tasks, 1), max_bad_rows=(max_bad_rows, 0), batch_rows=(batch_rows, 1))
    max_tokens = block_size + 1 if kind == "sft" else block_size
    if max_tokens_per_shard < max_tokens:
        raise DataPrepError(f"--max_tokens_per_shard {max_tokens_per_shard} is less than one example "
                            f"({max_tokens} tokens at --block_size {block_size})")
    if val_source and val_fraction:
        raise DataPrepError("give --val_source or --val_fraction, not both")
    val_fraction = (0.0 if val_source else 0.01) if val_fraction is None else val_fraction
    if not 0.0 <= val_fraction < 1.0:
        raise DataPrepError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    num_tasks, task_id = task_from_env(num_tasks, task_id)
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataPrepError(f"--out {out}: is a file, not a directory")
    if num_proc > usable_cpus():
        warn(f"--num_proc {num_proc} is more than the {usable_cpus()} CPUs this job may use")
    train = pin_hub_revisions(resolve_sources(source), hub_revision)
    val = pin_hub_revisions(resolve_sources(val_source), hub_revision) if val_source else []
    try:
        tok = Tokenizer.from_file(tokenizer)
        ChatTemplate(tok)
    except (OSError, ValueError, KeyError) as e:
        raise DataPrepError(f"cannot load tokenizer {tokenizer}: {e}") from None
    settings = {"kind": kind, "format": format, "sources": [s.spec for s in train], "val_sources": [s.spec for s in val],
                "tokenizer_hash": tok.content_hash, "chat_template_sha256": template_sha256(),
                "block_size": block_size, "truncation": truncation, "val_fraction": val_fraction,
                "num_tasks": num_tasks, "max_tokens_per_shard": max_tokens_per_shard, "reader": reader,
                "hub_split": hub_split, "hub_config": hub_config}
    hub = {"hub_config": hub_config, "hub_split": hub_split}
    part, inputs = finished_task(out_dir, task_id, num_tasks, settings, train + val, hub)
    if part is None:
        def work() -> dict[str, Any]:
            return _write_task(train, val, tok, out_dir, settings, task_id, num_proc, max_bad_rows, batch_rows,
                               progress)
        part = run_task(out_dir, task_id, num_tasks, train + val, inputs, settings, work)
        _summary(part)
    return merge(str(out_dir)) if num_tasks == 1 else part


def _write_task(train, val, tok: Tokenizer, out: Path, settings: dict, task_id: int, num_proc: int,
                max_bad_rows: int, batch_rows: int, progress: bool) -> dict[str, Any]:
    """Convert, route, dedup, render and write this task's examples; the task marker's fields."""
    kind, num_tasks, val_fraction = settings["kind"], settings["num_tasks"], settings["val_fraction"]
    max_tokens = settings["block_size"] + (kind == "sft")
    dtype = dtype_for_vocab(tok.vocab_size)
    writers = {s: ExampleShardWriter(out, f"{s}_t{task_id:05d}", kind, dtype, settings["max_tokens_per_shard"])
               for s in SPLITS}
    seen: dict[str, set[bytes]] = {s: set() for s in SPLITS}
    counts: Counter[str] = Counter()
    dropped: Counter[str] = Counter()
    bar = _Progress(progress, task_id)
    pool = mp.get_context("spawn").Pool(num_proc, _init_worker, (tok.to_str(),)) if num_proc > 1 else None
    chat = None if pool else ChatTemplate(tok)
    inflight: deque = deque()

    def drain(limit: int) -> None:
        while len(inflight) > limit:
            splits, result = inflight.popleft()
            rendered = result.get() if pool else result
            for split, r in zip(splits, rendered):
                if isinstance(r, str):
                    dropped[r] += 1
                    continue
                writers[split].add_example(r.ids, r.mask, r.bounds)
                counts[f"truncated_{split}"] += r.truncated
            bar.update(len(splits), sum(len(r.ids) for r in rendered if not isinstance(r, str)))

    def submit(items: list, splits: list[str]) -> None:
        args = (items, max_tokens, settings["truncation"], dtype)
        inflight.append((splits, pool.apply_async(render_batch, args) if pool else render_batch(*args, chat=chat)))
        drain(2 * num_proc if pool else 0)

    streams = []
    try:
        items, splits = [], []
        for sources, fixed in ((train, None), (val, "val")):
            stream = RowStream(sources, settings["reader"], max_bad_rows, settings["hub_split"], settings["hub_config"])
            stream.skip_hook = lambda index: index % num_tasks == task_id  # each skip counted by one task
            stream.formats = {}  # source spec -> the format its first good row showed
            streams.append(stream)
            for item, where in _examples(stream, kind, settings["format"]):
                key, owner, is_val = doc_route(example_bytes(item), num_tasks, val_fraction)
                if owner != task_id:
                    continue
                split = fixed or ("val" if is_val else "train")
                if key in seen[split]:
                    counts["duplicates"] += 1
                    continue
                seen[split].add(key)
                items.append(item)
                splits.append(split)
                if len(items) >= batch_rows:
                    submit(items, splits)
                    items, splits = [], []
        if items:
            submit(items, splits)
        drain(0)
        records = {s: w.close() for s, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        if pool:
            pool.terminate()
        bar.close()
    skipped: Counter[str] = Counter()
    for stream in streams:
        skipped.update(stream.skipped)
    rows_read = sum(s.index for s in streams)
    if num_tasks == 1 and not any(r for r in records.values()):  # fail before the done marker
        raise DataPrepError(f"no examples to write from {', '.join(settings['sources'] + settings['val_sources'])}: "
                            f"{rows_read} rows read, skipped {dict(skipped) or 'none'}, dropped {dict(dropped) or 'none'}, "
                            f"{counts['duplicates']} duplicates")
    return {"kind": kind, "dtype": dtype, "tokenizer": {"hash": tok.content_hash, "vocab_size": tok.vocab_size},
            "eot_id": tok.eot_id, "special_ids": tok.special_ids,
            "sources": describe(train), "val_sources": describe(val), "splits": records,
            "formats": {spec: fmt for s in streams for spec, fmt in s.formats.items()},
            "skipped": dict(sorted(skipped.items())), "duplicates": counts["duplicates"],
            "dropped": dict(sorted(dropped.items())),
            "truncated": {s: counts[f"truncated_{s}"] for s in SPLITS}, "records_read": rows_read}


def _examples(stream: RowStream, kind: str, fmt: Optional[str]):
    """(Conversation or Pair, where) for each usable row; bad rows go to the stream's counters."""
    for row, where in stream:
        spec = stream.source.spec
        try:
            # the first good row of a source fixes its format (a later row of another shape is a bad row)
            row_fmt = fmt or stream.formats.get(spec) or (detect_format(row, kind) if isinstance(row, dict) else None)
            item = convert(row, kind, row_fmt)
        except SkipRow as e:
            stream.skip(e.reason)
            continue
        except RowError as e:
            stream.bad_row(where, str(e), e.reason)
            continue
        stream.formats.setdefault(spec, row_fmt)
        yield item, where


def _summary(part: dict[str, Any]) -> None:
    n = {s: sum(r["documents"] for r in part["splits"][s]) for s in SPLITS}
    print(f"task {part['task_id']}/{part['num_tasks']}: {n['train']} train + {n['val']} val examples, "
          f"truncated {part['truncated']}, dropped {part['dropped'] or 'none'}, {part['duplicates']} duplicates, "
          f"skipped {part['skipped'] or 'none'}", file=sys.stderr)


def merge(out: str) -> dict[str, Any]:
    """Check DIR's finished tasks (all there, same settings, same input) and write DIR/manifest.json.

    Args:
        out: the dataset directory the tasks wrote to.
    """
    out_dir = Path(out)
    parts, inputs = check_tasks(out_dir)
    first, settings = parts[0], parts[0]["settings"]
    if first.get("kind") not in ("sft", "pairs"):
        raise DataPrepError(f"{out_dir}: its tasks were written by data_prep.make_shards: merge them with it")

    def total(key: str) -> dict[str, int]:
        c: Counter[str] = Counter()
        for p in parts:
            c.update(p[key])
        return dict(sorted(c.items()))

    splits = {}
    for s in SPLITS:
        records = list(chain.from_iterable(p["splits"][s] for p in parts))
        splits[s] = {**split_summary(records), "supervised_tokens": sum(r["supervised_tokens"] for r in records)}
    manifest = {"format": FORMAT, "version": VERSION, "kind": first["kind"], "dtype": first["dtype"],
                "tokenizer": first["tokenizer"], "eot_id": first["eot_id"], "special_ids": first["special_ids"],
                "chat_template_sha256": settings["chat_template_sha256"], "block_size": settings["block_size"],
                "max_example_tokens": settings["block_size"] + (first["kind"] == "sft"),
                "truncation": settings["truncation"], "splits": splits, "truncated": total("truncated"),
                "dropped": total("dropped"), "skipped": total("skipped"),
                "duplicates": sum(p["duplicates"] for p in parts), "records_read": first["records_read"],
                "formats": first["formats"], "sources": first["sources"], "val_sources": first["val_sources"],
                "inputs": inputs, "val_fraction": settings["val_fraction"], "num_tasks": first["num_tasks"],
                "created_by": "data_prep.make_sft"}
    if not any(splits[s]["documents"] for s in SPLITS):
        raise DataPrepError(f"{out_dir}: no examples in any task (records read {first['records_read']}, "
                            f"skipped {manifest['skipped'] or 'none'}, dropped {manifest['dropped'] or 'none'})")
    write_manifest(out_dir, manifest)
    tr, va = splits["train"], splits["val"]
    print(f"wrote {out_dir / 'manifest.json'}: {manifest['kind']} train {tr['documents']} examples / {tr['tokens']} "
          f"tokens / {tr['supervised_tokens']} supervised, val {va['documents']} examples"
          + ("" if va["documents"] else " (empty: raise --val_fraction or give --val_source)"), file=sys.stderr)
    return manifest


MERGE_HELP = (f"Subcommand merge: once every task of an array job has finished, `{PROG} merge --out DIR` "
              f"checks them and writes DIR/manifest.json.")


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["merge"]:
        run_cli(merge, f"{PROG} merge", argv[1:])
    else:
        run_cli(make_sft, PROG, argv, epilog=MERGE_HELP)


if __name__ == "__main__":
    main()
