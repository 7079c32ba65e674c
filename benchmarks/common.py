"""Shared benchmark plumbing: machine/version header and per-section updates of BENCHMARKS.md.

Each benchmark owns one section of BENCHMARKS.md, delimited by HTML comments, and rewrites
only that section, so benchmarks can be re-run one at a time:

    from benchmarks.common import environment, write_section
    write_section("model", "## Model\n\n" + environment() + table)
"""
from __future__ import annotations

import datetime
import os
import platform
import re
import time
from importlib import metadata
from pathlib import Path
from typing import Callable, Sequence

BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
PACKAGES = ("torch", "lightning", "deepspeed", "tokenizers", "datasets", "transformers", "numpy")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def environment() -> str:
    """One markdown line: date, machine and package versions."""
    versions = []
    for pkg in PACKAGES:
        try:
            versions.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            pass
    date = datetime.date.today().isoformat()
    return (f"_{date} · {cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()} · "
            + ", ".join(versions) + "_\n")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_section(name: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace (or append) the section `name` of BENCHMARKS.md, atomically."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n\nWritten by the scripts in `benchmarks/`; re-run one to refresh its section.\n"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def best_of(fn: Callable[[], object], repeats: int = 3) -> float:
    """Shortest wall time of `repeats` calls of fn, in seconds."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best
