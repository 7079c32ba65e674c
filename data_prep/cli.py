"""The command line shared by the data-prep entry points (make_shards, its merge, train_tokenizer).

    run_cli(make_shards, "python -m data_prep.make_shards")   # in a module's main()

What it adds around `jsonargparse.CLI`: `--a-b` works as `--a_b` for every parameter (and
`--print-config`), usage lines name the runnable command rather than the file, and every
failure a user can cause — a data problem, a shard problem, an OSError such as a full disk, a
read-only or missing directory, no permission — is one `error: ...` line on stderr and exit 1,
never a traceback.
"""
from __future__ import annotations

import inspect
import os
import sys
from typing import Any, Callable, Optional

from data_prep.sources import DataPrepError
from gpt.shards import ShardError

# jsonargparse's own options, besides the function's parameters.
_OWN_OPTIONS = ("print_config",)


def underscore_options(argv: list[str], names: set[str]) -> list[str]:
    """`--max-bad-lines 2` / `--max-bad-lines=2` -> `--max_bad_lines ...` for the known names."""
    out = []
    for arg in argv:
        if arg.startswith("--") and "-" in arg[2:].split("=", 1)[0]:
            name, eq, value = arg[2:].partition("=")
            plus = "+" if name.endswith("+") else ""  # `--source+ X` appends to a list
            key = name.removesuffix("+").replace("-", "_")
            if key in names:
                arg = f"--{key}{plus}{eq}{value}"
        out.append(arg)
    return out


def error_line(e: BaseException) -> str:
    """One line for a user-facing failure; an OSError names its file and says what happened."""
    if isinstance(e, OSError):
        what = e.strerror or str(e) or type(e).__name__
        return f"{e.filename}: {what}" if e.filename is not None else what
    lines = str(e).strip().splitlines() or [type(e).__name__]
    return lines[0]


def run_cli(func: Callable[..., Any], prog: str, argv: Optional[list[str]] = None,
            epilog: Optional[str] = None) -> Any:
    """Parse argv into `func`'s parameters and call it; any data or OS error exits 1 in one line."""
    from jsonargparse import CLI

    argv = sys.argv[1:] if argv is None else list(argv)
    names = set(inspect.signature(func).parameters) | set(_OWN_OPTIONS)
    try:
        return CLI(func, args=underscore_options(argv, names), as_positional=False, prog=prog, epilog=epilog)
    except (DataPrepError, ShardError, OSError) as e:
        print(f"error: {error_line(e)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def warn(message: str) -> None:
    """One `warning: ...` line on stderr."""
    print(f"warning: {message}", file=sys.stderr)


def usable_cpus() -> int:
    """CPUs this process may run on (a Slurm task's allocation, not the whole node)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1
