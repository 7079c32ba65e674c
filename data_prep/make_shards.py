"""Sharding job: raw text sources -> token shards + manifest.json (format: gpt/shards.py).

One machine (writes DIR/manifest.json when done):

    python -m data_prep.make_shards --source data/shakespeare.jsonl.gz \\
        --tokenizer runs/demo/tokenizer.json --out runs/demo/shards --num_proc 2 --val_fraction 0.1

Slurm array (each task writes its own shards and DIR/tasks/task_NNNNN.json; --num_tasks and
--task_id default to SLURM_ARRAY_TASK_COUNT and SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN),
then one merge writes DIR/manifest.json for all of them:

    sbatch --array=0-15 --wrap "python -m data_prep.make_shards --source 'crawl/*.jsonl.gz' \\
        --tokenizer tok.json --out DIR --num_proc 8"
    python -m data_prep.make_shards merge --out DIR

How it works. Every task streams all sources (reading is cheap next to tokenizing) and keeps
the documents whose text hash falls in its slice, so exact duplicates always meet in the same
task and are dropped there (counted), and the validation hold-out (hash < val_fraction) is a
pure function of the text. Documents are batched to `num_proc` worker processes with a bounded
number of batches in flight, and written in input order, so the output is identical for any
`num_proc`. Each document ends with the end-of-text id. Memory: one batch per worker, one
document, and the dedup set (~100 bytes per unique document of the task).

Resume: a task's `tasks/task_NNNNN.json` is written last, after its shards; a re-run skips
tasks that have one and redoes the others from scratch (shards are written as `.tmp` and
renamed, and the leftovers of an unfinished task are deleted first), so a job killed at any
point, even by SIGKILL, finishes on the next run.

Changed input: each task records its input's fingerprint (data_prep/fingerprint.py: paths,
sizes, mtimes, sha256 of small files; Hub name/config/split/revision) in its marker and the
manifest. A re-run redoes a finished task whose input changed, saying what changed in one line,
and merge refuses tasks made from another input than the current one. A task that fails (bad
input, full disk, no permission) removes its shards and temporary files before the one-line
error, and a task being redone removes DIR/manifest.json first: no file is left claiming a
dataset that is not there.

The task machinery (task_from_env, doc_route, finished_task, run_task, check_tasks) is shared
with data_prep.make_sft, which writes SFT and preference-pair shards the same way.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import sys
import time
from collections import Counter, deque
from itertools import chain
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import numpy as np

from data_prep.cli import run_cli, usable_cpus, warn
from data_prep.fingerprint import changes, fingerprint, pin_hub_revisions
from data_prep.sources import DataPrepError, DocumentStream, check_sizes, describe, resolve_sources, split_long
from gpt.shards import (FORMAT, MANIFEST, VERSION, ShardWriter, atomic_write_bytes, dtype_for_vocab,
                        split_summary, write_manifest)
from gpt.tokenizer import Tokenizer

TASKS_DIR = "tasks"
SPLITS = ("train", "val")
PROG = "python -m data_prep.make_shards"
_WORKER_TOK: Optional[Tokenizer] = None


def task_from_env(num_tasks: Optional[int], task_id: Optional[int]) -> tuple[int, int]:
    """(num_tasks, task_id) from the arguments, else from a Slurm array's environment."""
    env = os.environ
    if num_tasks is None:
        num_tasks = int(env.get("SLURM_ARRAY_TASK_COUNT", 1))
    if task_id is None:
        if "SLURM_ARRAY_TASK_ID" in env:
            task_id = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        elif num_tasks == 1:
            task_id = 0
        else:
            raise DataPrepError(f"--num_tasks {num_tasks} needs --task_id (or run inside a Slurm array)")
    if not 0 <= task_id < num_tasks:
        raise DataPrepError(f"--task_id {task_id} is outside 0..{num_tasks - 1}")
    return num_tasks, task_id


def doc_route(data: bytes, num_tasks: int, val_fraction: float) -> tuple[bytes, int, bool]:
    """(dedup key, owning task, is validation) — all pure functions of the text."""
    d = hashlib.blake2b(data, digest_size=16).digest()
    task = int.from_bytes(d[:8], "little") % num_tasks
    return d, task, int.from_bytes(d[8:], "little") < val_fraction * 2.0**64


def _init_worker(tok_json: str) -> None:
    global _WORKER_TOK
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # num_proc processes already fill the cores
    _WORKER_TOK = Tokenizer.from_str(tok_json)


def encode_docs(pieces: list[str], ends: list[bool], eot: int, dtype: str,
                tok: Optional[Tokenizer] = None) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize documents or pieces of them; returns (all tokens, tokens per piece).

    A piece that ends its document (`ends[i]`) is followed by the end-of-text id.
    """
    ids = (tok or _WORKER_TOK).encode_batch(pieces)
    flat, lengths = [], np.empty(len(pieces), dtype=np.int64)
    for i, (piece_ids, end) in enumerate(zip(ids, ends)):
        start = len(flat)
        flat.extend(piece_ids)
        if end:
            flat.append(eot)
        lengths[i] = len(flat) - start
    return np.array(flat, dtype=dtype), lengths


def _task_path(out: Path, task_id: int) -> Path:
    return out / TASKS_DIR / f"task_{task_id:05d}.json"


def _note(message: str) -> None:
    print(message, file=sys.stderr)


def _read_task(path: Path) -> dict:
    """A task marker, or DataPrepError naming it (e.g. a 0-byte file left by a full disk)."""
    try:
        part = json.loads(path.read_text())
        if not isinstance(part, dict) or not {"settings", "splits", "task_id"} <= part.keys():
            raise ValueError("not a task marker")
        return part
    except (OSError, ValueError) as e:
        raise DataPrepError(f"{path}: unreadable task marker ({str(e).splitlines()[0][:200]})") from None


def finished_task(out: Path, task_id: int, num_tasks: int, settings: dict,
                  sources: list, hub: dict) -> tuple[Optional[dict], list]:
    """(the partial manifest of a task done with these settings and this input, else None;
    the input's fingerprint). Says in one line why a task that had finished is redone.
    Shared by every data-prep job that writes tasks (make_shards, make_sft)."""
    path, label = _task_path(out, task_id), f"task {task_id}/{num_tasks}"
    if not path.is_file():
        return None, fingerprint(sources, **hub)
    try:
        part = _read_task(path)
    except DataPrepError as e:
        _note(f"{label}: {e}; redoing the task")
        return None, fingerprint(sources, **hub)
    if part["settings"] != settings:
        changed = sorted(k for k in settings if part["settings"].get(k) != settings[k])
        raise DataPrepError(f"{out} holds shards made with other settings ({', '.join(changed)}); "
                            "use a new --out or delete it")
    inputs = fingerprint(sources, **hub, reuse=part.get("inputs"))
    if "inputs" not in part:
        _note(f"{label}: {path} does not record its input (made by an older version); redoing the task")
        return None, inputs
    diff = changes(part["inputs"], inputs)
    if diff:
        _note(f"{label}: input changed since the last run ({_joined(diff)}); redoing the task")
        return None, inputs
    for rec in chain.from_iterable(part["splits"].values()):
        for entry in (rec, rec.get("mask"), rec.get("index")):  # post-training shards have two side files
            f = out / entry["file"] if entry else None
            if f and (not f.is_file() or f.stat().st_size != entry["bytes"]):
                _note(f"{label}: shard {f} is missing or has another size; redoing the task")
                return None, inputs
    _note(f"{label}: already done ({path}), skipping")
    return part, inputs


def _joined(diff: list[str], limit: int = 3) -> str:
    return "; ".join(diff[:limit]) + (f"; and {len(diff) - limit} more" if len(diff) > limit else "")


class _Progress:
    def __init__(self, enabled: bool, task_id: int):
        from tqdm import tqdm
        self.bar = tqdm(unit=" docs", disable=not enabled, desc=f"task {task_id}",
                        mininterval=0.5 if sys.stderr.isatty() else 30, dynamic_ncols=True)
        self.t0, self.tokens = time.perf_counter(), 0

    def update(self, docs: int, tokens: int) -> None:
        self.tokens += tokens
        rate = self.tokens / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"{self.tokens / 1e6:.1f}M tokens, {rate / 1e6:.2f}M tok/s", refresh=False)
        self.bar.update(docs)

    def close(self) -> None:
        self.bar.close()


def make_shards(source: Union[str, list[str]], tokenizer: str, out: str, text_field: str = "text",
                num_proc: int = 1, val_fraction: float = 0.005, max_tokens_per_shard: int = 100_000_000,
                num_tasks: Optional[int] = None, task_id: Optional[int] = None, max_doc_chars: int = 0,
                piece_chars: int = 100_000, max_bad_lines: int = 0,
                reader: Literal["auto", "datasets"] = "auto", hub_split: str = "train",
                hub_config: Optional[str] = None, hub_revision: Optional[str] = None,
                txt_sample_by: Literal["line", "paragraph", "document"] = "paragraph",
                batch_chars: int = 1_000_000, progress: bool = True) -> dict[str, Any]:
    """Tokenize sources into shards; returns the task's partial manifest (or the merged one).

    Args:
        source: local files, globs (quote them) or Hub dataset names; one or a list.
        tokenizer: tokenizer.json, a directory holding one, or GPT-2 vocab.json + merges.txt.
        out: dataset directory for the shards and manifest.json.
        text_field: the field holding the document text.
        num_proc: tokenizer worker processes (at most the CPUs available: more only add memory).
        val_fraction: share of documents held out for validation (by text hash).
        max_tokens_per_shard: shard size bound (100 M tokens = 200 MB in uint16).
        num_tasks: tasks of a job array (default: SLURM_ARRAY_TASK_COUNT or 1).
        task_id: this task (default: from SLURM_ARRAY_TASK_ID).
        max_doc_chars: skip (and count) documents longer than this; 0 = no limit.
        piece_chars: longer documents are tokenized in pieces of this size cut at line breaks
            (encoding takes ~170 bytes per character while it runs, so pieces bound memory).
        max_bad_lines: malformed/missing-field records to skip (counted) before failing.
        reader: "datasets" sends local files through datasets.load_dataset(streaming=True) too.
        hub_split: split to stream for Hub dataset names.
        hub_config: configuration (subset) of Hub dataset names, e.g. "sample-10BT".
        hub_revision: branch, tag or commit of Hub dataset names (default: the main branch, pinned
            to the commit it points to when the job starts, and recorded).
        txt_sample_by: documents of .txt sources: lines, blank-line separated paragraphs, or files.
        batch_chars: characters per batch sent to a worker.
        progress: show a tqdm progress bar.
    """
    check_sizes(num_proc=(num_proc, 1), max_tokens_per_shard=(max_tokens_per_shard, 1), num_tasks=(num_tasks, 1),
                piece_chars=(piece_chars, 1), batch_chars=(batch_chars, 1), max_doc_chars=(max_doc_chars, 0),
                max_bad_lines=(max_bad_lines, 0))
    num_tasks, task_id = task_from_env(num_tasks, task_id)
    if not 0.0 <= val_fraction < 1.0:
        raise DataPrepError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataPrepError(f"--out {out}: is a file, not a directory")
    if num_proc > usable_cpus():
        warn(f"--num_proc {num_proc} is more than the {usable_cpus()} CPUs this job may use: the extra "
             "workers only add memory (a tokenizer each) and contention")
    sources = pin_hub_revisions(resolve_sources(source), hub_revision)
    try:
        tok = Tokenizer.from_file(tokenizer)
    except (OSError, ValueError) as e:
        raise DataPrepError(f"cannot load tokenizer: {e}") from None
    dtype = dtype_for_vocab(tok.vocab_size)
    settings = {"sources": [s.spec for s in sources], "text_field": text_field,
                "tokenizer_hash": tok.content_hash, "val_fraction": val_fraction, "num_tasks": num_tasks,
                "max_tokens_per_shard": max_tokens_per_shard, "max_doc_chars": max_doc_chars,
                "piece_chars": piece_chars, "reader": reader, "hub_split": hub_split, "hub_config": hub_config,
                "txt_sample_by": txt_sample_by}
    hub = {"hub_config": hub_config, "hub_split": hub_split}
    part, inputs = finished_task(out_dir, task_id, num_tasks, settings, sources, hub)
    if part is None:
        part = _run_task(sources, inputs, tok, out_dir, settings, dtype, task_id, num_tasks, num_proc,
                         max_bad_lines, batch_chars, progress)
    if num_tasks == 1:
        return merge(str(out_dir))
    return part


def _run_task(sources, inputs: list, tok: Tokenizer, out: Path, settings: dict, dtype: str, task_id: int,
              num_tasks: int, num_proc: int, max_bad_lines: int, batch_chars: int,
              progress: bool) -> dict[str, Any]:
    written = {}

    def work() -> dict[str, Any]:
        stream = DocumentStream(sources, settings["text_field"], settings["reader"], settings["max_doc_chars"],
                                max_bad_lines, settings["hub_split"], settings["txt_sample_by"], settings["hub_config"])
        stream.skip_hook = lambda index: index % num_tasks == task_id  # each skip counted by one task
        writers = {s: ShardWriter(out, f"{s}_t{task_id:05d}", dtype, settings["max_tokens_per_shard"]) for s in SPLITS}
        try:
            documents, duplicates = _write_documents(stream, tok, writers, settings, dtype, task_id, num_tasks,
                                                     num_proc, batch_chars, progress)
            if num_tasks == 1 and not documents:  # fail before the done marker, so a fixed input re-runs
                raise _nothing_written(settings["sources"], stream.index, dict(stream.skipped), duplicates)
            splits = {s: w.close() for s, w in writers.items()}
            written.update(documents=documents)
        except BaseException:
            for w in writers.values():
                w.abort()
            raise
        return {"dtype": dtype, "tokenizer": {"hash": tok.content_hash, "vocab_size": tok.vocab_size},
                "eot_id": tok.eot_id, "special_ids": tok.special_ids, "sources": describe(sources),
                "splits": splits, "skipped": dict(sorted(stream.skipped.items())), "duplicates": duplicates,
                "records_read": stream.index}

    part = run_task(out, task_id, num_tasks, sources, inputs, settings, work)
    n = {s: sum(r["tokens"] for r in part["splits"][s]) for s in SPLITS}
    _note(f"task {task_id}/{num_tasks}: {n['train']} train + {n['val']} val tokens, {written['documents']} documents, "
          f"{part['duplicates']} duplicates, skipped {part['skipped'] or 'none'}")
    return part


def run_task(out: Path, task_id: int, num_tasks: int, sources: list, inputs: list, settings: dict,
             work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The task frame every data-prep job shares: clear what a killed run of this task left, run
    `work()` (it writes the task's `*_tNNNNN_*.bin` files and returns its marker's fields, "splits"
    among them), check that the input did not change meanwhile, then write the marker — last, so a
    task is done only once everything it wrote is there. On any failure the task's files go (and
    the directories this run made, if empty) before the error propagates."""
    created = [d for d in (out, out / TASKS_DIR) if not d.exists()]
    (out / TASKS_DIR).mkdir(parents=True, exist_ok=True)
    _task_path(out, task_id).unlink(missing_ok=True)  # a marker whose shards went missing: not done
    (out / MANIFEST).unlink(missing_ok=True)  # it lists this task's shards, which are about to go
    _remove_task_files(out, task_id)  # leftovers of a killed run of this task
    try:
        fields = work()
        diff = changes(inputs, fingerprint(sources, settings["hub_config"], settings["hub_split"], reuse=inputs))
        if diff:
            raise DataPrepError(f"input changed while it was read ({_joined(diff)}); run again once it is complete")
        part = {"format": FORMAT + "-task", "version": VERSION, "task_id": task_id, "num_tasks": num_tasks,
                "settings": settings, "inputs": inputs, **fields}
        atomic_write_bytes(_task_path(out, task_id), (json.dumps(part, indent=1) + "\n").encode())  # the done marker
    except BaseException:  # a failed task leaves no shard, .tmp or marker behind
        _remove_task_files(out, task_id)
        for d in reversed(created):  # directories this run made, if nothing else is in them
            try:
                d.rmdir()
            except OSError:
                pass
        raise
    return part


def _remove_task_files(out: Path, task_id: int) -> None:
    for stale in out.glob(f"*_t{task_id:05d}_*.bin*"):
        stale.unlink(missing_ok=True)
    _task_path(out, task_id).with_suffix(".json.tmp").unlink(missing_ok=True)


def _write_documents(stream: DocumentStream, tok: Tokenizer, writers: dict, settings: dict, dtype: str,
                     task_id: int, num_tasks: int, num_proc: int, batch_chars: int,
                     progress: bool) -> tuple[int, int]:
    """Route, dedup, tokenize (in `num_proc` workers) and write this task's documents in input
    order; returns (documents written, duplicates dropped)."""
    seen: set[bytes] = set()
    duplicates = 0
    bar = _Progress(progress, task_id)
    pool = (mp.get_context("spawn").Pool(num_proc, _init_worker, (tok.to_str(),)) if num_proc > 1 else None)
    inflight: deque = deque()

    def drain(limit: int) -> None:
        while len(inflight) > limit:
            splits, ends, result = inflight.popleft()
            tokens, lengths = result.get() if pool else result
            offset = 0
            for split, end, n in zip(splits, ends, lengths):
                writers[split].add(tokens[offset:offset + n], end_of_document=end)
                offset += int(n)
            bar.update(sum(ends), len(tokens))

    def submit(pieces: list[str], ends: list[bool], splits: list[str]) -> None:
        args = (pieces, ends, tok.eot_id, dtype)
        inflight.append((splits, ends, pool.apply_async(encode_docs, args) if pool else encode_docs(*args, tok=tok)))
        drain(2 * num_proc if pool else 0)

    try:
        pieces, ends, splits, chars = [], [], [], 0
        for text, _where in stream:  # the stream yields only encodable text (lone surrogates are skips)
            data = text.encode("utf-8")
            key, owner, is_val = doc_route(data, num_tasks, settings["val_fraction"])
            del data
            if owner != task_id:
                continue
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            doc_pieces = split_long(text, settings["piece_chars"])
            for i, piece in enumerate(doc_pieces):  # a huge document spreads over several batches
                pieces.append(piece)
                ends.append(i == len(doc_pieces) - 1)
                splits.append("val" if is_val else "train")
                chars += len(piece)
                if chars >= batch_chars:
                    submit(pieces, ends, splits)
                    pieces, ends, splits, chars = [], [], [], 0
        if splits:
            submit(pieces, ends, splits)
        drain(0)
    finally:
        if pool:
            pool.terminate()
        bar.close()
    return len(seen), duplicates


def _nothing_written(sources: list[str], records: int, skipped: dict, duplicates: int) -> DataPrepError:
    return DataPrepError(f"no documents to write from {', '.join(sources)}: {records} records read, "
                         f"skipped {skipped or 'none'}, {duplicates} duplicates")


def merge(out: str) -> dict[str, Any]:
    """Check DIR's tasks (all finished, same settings, same input) and write DIR/manifest.json.

    Args:
        out: the dataset directory the tasks wrote to.
    """
    out_dir = Path(out)
    parts, inputs = check_tasks(out_dir)
    first, num_tasks = parts[0], parts[0]["num_tasks"]
    if first["settings"].get("kind") is not None:
        raise DataPrepError(f"{out_dir}: its tasks were written by data_prep.make_sft: merge them with "
                            "python -m data_prep.make_sft merge")
    skipped: Counter[str] = Counter()
    for part in parts:
        skipped.update(part["skipped"])
    manifest = {"format": FORMAT, "version": VERSION, "dtype": first["dtype"], "tokenizer": first["tokenizer"],
                "eot_id": first["eot_id"], "special_ids": first["special_ids"],
                "splits": {s: split_summary(chain.from_iterable(p["splits"][s] for p in parts)) for s in SPLITS},
                "sources": first["sources"], "inputs": inputs, "text_field": first["settings"]["text_field"],
                "val_fraction": first["settings"]["val_fraction"], "num_tasks": num_tasks,
                "skipped": dict(sorted(skipped.items())), "duplicates": sum(p["duplicates"] for p in parts),
                "records_read": first["records_read"], "created_by": "data_prep.make_shards"}
    if not any(manifest["splits"][s]["documents"] for s in SPLITS):
        raise _nothing_written(first["settings"]["sources"], first["records_read"], manifest["skipped"],
                               manifest["duplicates"])
    write_manifest(out_dir, manifest)
    tr, va = manifest["splits"]["train"], manifest["splits"]["val"]
    print(f"wrote {out_dir / 'manifest.json'}: train {tr['tokens']} tokens / {tr['documents']} docs / "
          f"{len(tr['shards'])} shards, val {va['tokens']} tokens / {va['documents']} docs"
          + ("" if va["documents"] else " (empty: raise --val_fraction)"), file=sys.stderr)
    return manifest


def check_tasks(out_dir: Path) -> tuple[list[dict], list]:
    """(the task markers of DIR in task order, the input as it is now) once every task has finished
    with the same settings and from the current input; DataPrepError (one line) otherwise."""
    paths = sorted((out_dir / TASKS_DIR).glob("task_*.json"))
    if not paths:
        raise DataPrepError(f"{out_dir}: no finished tasks ({TASKS_DIR}/task_*.json) to merge")
    parts = [_read_task(p) for p in paths]
    first = parts[0]
    num_tasks = first["num_tasks"]
    for p, part in zip(paths, parts):
        if part["settings"] != first["settings"]:
            raise DataPrepError(f"{p}: made with other settings than {paths[0].name}; cannot merge")
    have = {part["task_id"] for part in parts}
    missing = [t for t in range(num_tasks) if t not in have]
    if missing:
        raise DataPrepError(f"{out_dir}: {len(missing)} of {num_tasks} tasks have not finished (task ids {_ids(missing)})")
    parts = sorted((p for p in parts if p["task_id"] < num_tasks), key=lambda p: p["task_id"])
    return parts, _current_inputs(out_dir, parts)


def _ids(ids: list[int]) -> str:
    return ", ".join(map(str, ids[:10])) + (", ..." if len(ids) > 10 else "")


def _current_inputs(out_dir: Path, parts: list[dict]) -> list:
    """The input as it is now; DataPrepError if a task was made from another one.

    Local sources are listed and measured again (stat, plus a hash only where a small file
    looks touched); a Hub source keeps the revision task 0 read, so tasks that read another
    revision are the ones refused.
    """
    first = parts[0]
    old = [t for t in parts if "inputs" not in t]
    if old:
        raise DataPrepError(f"{out_dir}: tasks {_ids([t['task_id'] for t in old])} do not record their input "
                            "(made by an older version): re-run them, then merge")
    settings = first["settings"]
    try:
        specs = settings["sources"] + settings.get("val_sources", [])  # make_sft's held-out sources too
        now = fingerprint(resolve_sources(specs), settings["hub_config"], settings["hub_split"], reuse=first["inputs"])
    except (DataPrepError, OSError) as e:
        raise DataPrepError(f"{out_dir}: cannot check the input the tasks read ({e}); "
                            "merging needs the sources as they were") from None
    now = [old_entry if "hub" in old_entry else entry for old_entry, entry in zip(first["inputs"], now)]
    stale = [(t["task_id"], diff) for t in parts if (diff := changes(t["inputs"], now))]
    if stale:
        raise DataPrepError(f"{out_dir}: {len(stale)} of {len(parts)} tasks were made from another input than "
                            f"the current one ({_joined(stale[0][1], 1)}; task ids {_ids([t for t, _ in stale])}): "
                            "re-run the job (those tasks are redone), then merge")
    return now


MERGE_HELP = (f"Subcommand merge: once every task of an array job has finished, `{PROG} merge --out DIR` "
              f"checks them (same settings, same input) and writes DIR/manifest.json; see `{PROG} merge --help`.")


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["merge"]:
        run_cli(merge, f"{PROG} merge", argv[1:])
    else:
        run_cli(make_shards, PROG, argv, epilog=MERGE_HELP)


if __name__ == "__main__":
    main()
