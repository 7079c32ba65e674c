"""Data prep benchmark: sharding-job throughput vs raw `Tokenizer.encode_batch`, and peak memory.

    python -m benchmarks.data_prep_bench            # 50 MB and 200 MB inputs (a few minutes on 2 cores)
    python -m benchmarks.data_prep_bench --quick    # 5 MB and 20 MB, for a smoke check

Input: Shakespeare cut into ~4 KB documents, repeated with a distinct prefix per copy so that
dedup keeps them all, as uncompressed jsonl. Tokenizer: byte-level BPE, vocab 4096, trained
on Shakespeare with data_prep.train_tokenizer.

- raw: the same documents already in memory, `encode_batch` over ~1 MB batches, in-process
  (1) or over a pool of spawned processes started before the clock (2).
- job: `python -m data_prep.make_shards --num_proc N` in a subprocess, wall clock from launch to
  exit (interpreter start, reading, JSON parsing, hashing, dedup, writing, sha256 included).
- peak RSS: the sum over the job's process tree, sampled every 20 ms.
On the smaller input, job and raw run alternately twice (--repeats) and the best time of each is kept,
since the machine may be shared. The job's fixed cost (start-up, spawning workers) is measured on a
one-document input and printed below the table.
Tokens/s counts document tokens (end-of-text ids excluded). TOKENIZERS_PARALLELISM=false for
both, so N processes use N cores. Writes the table to the "data_prep" section of BENCHMARKS.md.
"""
from __future__ import annotations

import gzip
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from benchmarks.common import environment, markdown_table, write_section
from gpt.shards import read_manifest
from gpt.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "shakespeare.jsonl.gz"
DOC_CHARS = 4000
_TOK = None


def make_input(path: Path, megabytes: int) -> int:
    """Write ~megabytes of distinct ~4 KB documents; returns the number of documents."""
    works = [json.loads(line)["text"] for line in gzip.open(CORPUS, "rt")]
    chunks = [w[i:i + DOC_CHARS] for w in works for i in range(0, len(w), DOC_CHARS)]
    target, written, n = megabytes * 1_000_000, 0, 0
    with open(path, "w") as f:
        copy = 0
        while written < target:
            for c in chunks:
                line = json.dumps({"text": f"[{copy}] {c}"}) + "\n"
                f.write(line)
                written, n = written + len(line), n + 1
                if written >= target:
                    break
            copy += 1
    return n


def _init(tok_json: str) -> None:
    global _TOK
    _TOK = Tokenizer.from_str(tok_json)


def _encode(texts: list[str]) -> int:
    return sum(len(ids) for ids in _TOK.encode_batch(texts))


def _batches(texts: list[str], chars: int = 1_000_000) -> list[list[str]]:
    out, cur, n = [], [], 0
    for t in texts:
        cur.append(t)
        n += len(t)
        if n >= chars:
            out.append(cur)
            cur, n = [], 0
    return out + ([cur] if cur else [])


def raw_throughput(tok_path: Path, data: Path, num_proc: int) -> tuple[int, float]:
    """(tokens, seconds) of encode_batch over the documents, already in memory."""
    texts = [json.loads(line)["text"] for line in open(data)]
    batches = _batches(texts)
    tok_json = Tokenizer.from_file(tok_path).to_str()
    if num_proc == 1:
        _init(tok_json)
        t0 = time.perf_counter()
        tokens = sum(map(_encode, batches))
        return tokens, time.perf_counter() - t0
    with mp.get_context("spawn").Pool(num_proc, _init, (tok_json,)) as pool:
        pool.map(_encode, [["warm up"]] * num_proc)
        t0 = time.perf_counter()
        tokens = sum(pool.imap(_encode, batches))
        return tokens, time.perf_counter() - t0


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    try:
        family = [proc] + proc.children(recursive=True)
    except psutil.Error:  # the job has just exited
        return 0
    for p in family:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_job(tok_path: Path, data: Path, out: Path, num_proc: int) -> tuple[int, float, int]:
    """(document tokens, seconds, peak RSS of the process tree in bytes) of the sharding job."""
    cmd = [sys.executable, "-m", "data_prep.make_shards", "--source", str(data), "--tokenizer", str(tok_path),
           "--out", str(out), "--num_proc", str(num_proc), "--val_fraction", "0.01", "--progress", "false"]
    t0 = time.perf_counter()
    popen = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    proc, peak, done = psutil.Process(popen.pid), 0, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss(proc))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = popen.communicate()
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    if popen.returncode:
        raise RuntimeError(f"make_shards failed: {err.strip().splitlines()[-1]}")
    m = read_manifest(out)
    docs = sum(m["splits"][s]["documents"] for s in ("train", "val"))
    tokens = sum(m["splits"][s]["tokens"] for s in ("train", "val")) - docs
    return tokens, seconds, peak


def main(quick: bool = False, repeats: int = 2) -> str:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sizes = (5, 20) if quick else (50, 200)
    repeats = 1 if quick else repeats
    rows = []
    with tempfile.TemporaryDirectory(prefix="data_prep_bench_") as tmp:
        tmp = Path(tmp)
        tok_path = tmp / "tokenizer.json"
        subprocess.run([sys.executable, "-m", "data_prep.train_tokenizer", "--source", str(CORPUS),
                        "--vocab_size", "4096", "--out", str(tok_path)], cwd=ROOT, check=True, capture_output=True)
        for mb in sizes:
            data = tmp / f"in_{mb}mb.jsonl"
            ndocs = make_input(data, mb)
            for num_proc in (1, 2):
                job_s, raw_s, peak = float("inf"), float("inf"), 0
                for r in range(repeats if mb == sizes[0] else 1):  # alternate, keep the best of each
                    job_tokens, seconds, rss = run_job(tok_path, data, tmp / f"out_{mb}_{num_proc}_{r}", num_proc)
                    job_s, peak = min(job_s, seconds), max(peak, rss)
                    raw_tokens, seconds = raw_throughput(tok_path, data, num_proc)
                    raw_s = min(raw_s, seconds)
                assert raw_tokens == job_tokens or abs(raw_tokens - job_tokens) < 1e-3 * raw_tokens
                raw_rate, ratio = f"{raw_tokens / raw_s / 1e6:.2f}", f"{job_tokens / job_s / (raw_tokens / raw_s):.2f}×"
                rows.append([f"{mb} MB ({ndocs} docs)", num_proc, f"{job_tokens / 1e6:.1f}", raw_rate,
                             f"{job_tokens / job_s / 1e6:.2f}", ratio, f"{peak / 2**20:.0f}"])
                print(rows[-1], file=sys.stderr)
        # The job's fixed cost (interpreter, imports, spawning workers, manifest): one tiny document.
        tiny = tmp / "tiny.jsonl"
        tiny.write_text(json.dumps({"text": "To be, or not to be"}) + "\n")
        fixed = {n: min(run_job(tok_path, tiny, tmp / f"out_tiny_{n}_{r}", n)[1] for r in range(2)) for n in (1, 2)}
    table = markdown_table(["input", "processes", "tokens (M)", "raw encode_batch (M tok/s)",
                            "make_shards end-to-end (M tok/s)", "job / raw", "job peak RSS (MiB)"], rows)
    body = ("## Data prep\n\n" + environment() + "\n"
            + f"`python -m benchmarks.data_prep_bench{' --quick' if quick else ''}` — byte-level BPE vocab 4096, "
            "~4 KB jsonl documents; the job's time includes interpreter start-up and writing shards with sha256.\n\n"
            + table
            + f"\n\nFixed cost of the job (a one-document input, best of 2): {fixed[1]:.2f} s with 1 process, "
            + f"{fixed[2]:.2f} s with 2 (spawning the workers). It is part of every job row above; raw has none.\n")
    write_section("data_prep", body)
    return body


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="data prep throughput and memory benchmark")
    parser.add_argument("--quick", action="store_true", help="5 MB and 20 MB inputs instead of 50 and 200, one repeat")
    parser.add_argument("--repeats", type=int, default=2, help="alternating job/raw runs on the smaller input")
    args = parser.parse_args()
    print(main(args.quick, args.repeats))
