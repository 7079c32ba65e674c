"""A fake pipeline stage for tests/test_pipeline.py: a fast command that records that it ran.

    python tests/pipeline_fakes.py NAME --out FILE [--read FILE ...] [--value X] [--ledger FILE]
                                   [--fail] [--steps N --sleep S [--quiet]]

Appends NAME to the ledger, then writes FILE as JSON: its name, its value, and the contents of
the files it read (so an upstream change reaches it). With --steps it counts steps, one line
each, keeping its progress in FILE.state: stopped by SIGINT after "step K", a second run goes on
from step K + 1 — a stage that resumes inside itself, as the recipes do (--quiet: no line per
step, a stage that would not notice its reader is gone). --fail exits 3.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("name")
    p.add_argument("--out", required=True)
    p.add_argument("--read", action="append", default=[])
    p.add_argument("--value", type=float, default=0.0)
    p.add_argument("--ledger")
    p.add_argument("--fail", action="store_true")
    p.add_argument("--steps", type=int, default=0)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args()
    if a.ledger:
        with open(a.ledger, "a") as f:
            f.write(a.name + "\n")
    if a.fail:
        print(f"{a.name}: something went wrong", flush=True)
        return 3
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = Path(str(out) + ".state")
    start = int(state.read_text()) if state.is_file() else 0
    print(f"{a.name}: starting at step {start} (pid {os.getpid()})", flush=True)
    try:
        for step in range(start, a.steps):
            time.sleep(a.sleep)
            # temp + rename, as the recipes save: a SIGINT landing inside write_text (after the
            # truncate, before the digits) left an empty state file (a CI flake, 2026-11-30).
            tmp = state.with_name(state.name + ".tmp")
            tmp.write_text(str(step + 1))
            os.replace(tmp, state)
            if not a.quiet:
                print(f"{a.name}: step {step + 1}", flush=True)
    except KeyboardInterrupt:
        print(f"{a.name}: interrupted after step {state.read_text() if state.is_file() else 0}", flush=True)
        return 130
    inputs = {r: Path(r).read_text() for r in a.read}
    out.write_text(json.dumps({"name": a.name, "value": a.value, "inputs": inputs, "started_at_step": start}))
    print(f"{a.name}: wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
