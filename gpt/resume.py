"""Which checkpoint `--ckpt_path last` resumes from, checked cheaply before anything is loaded.

    from gpt.resume import find_resume_checkpoint
    path, notes = find_resume_checkpoint("runs/x/checkpoints")   # path None: start fresh
    for line in notes: print(line)

Lightning's own `ckpt_path="last"` takes `last.ckpt` whatever state it is in, and starts from step 0
(with a warning) when it is missing even if periodic checkpoints exist. Here `last.ckpt` (or
Lightning's `last-vN.ckpt`, the most recently modified first) is used when it is complete and
loadable; otherwise the valid periodic checkpoint of the highest step (`step=N` in its name; else
the most recently written), with a note naming why
`last` was skipped. "Valid" costs no tensor reads:
- a `.ckpt` file: its zip directory (written last, so truncation breaks it) and its pickle read with
  the memory-mapped weights-only loader (plain data only; tensors stay on disk);
- a ZeRO directory: gpt.zero_checkpoint.verify (manifest present, every file with its recorded size,
  every shard stamped with the same save, step and its own rank).
A ZeRO save killed between its two publishing renames leaves its name absent and the complete copy
hidden beside it (`.last.ckpt.<id>`); that copy is used under the missing name.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from gpt.checkpoint import CheckpointError
from gpt.safe_load import safe_load

# ModelCheckpoint.CHECKPOINT_NAME_LAST and its version suffix (last-v1.ckpt when last.ckpt existed).
_LAST = re.compile(r"^last(-v\d+)?\.ckpt$")
_STEP = re.compile(r"step=(\d+)")


def checkpoint_step(path: str | os.PathLike) -> int:
    """The global step of a resumable checkpoint (file or ZeRO directory), or CheckpointError saying why not."""
    p = Path(path)
    if p.is_dir():
        from gpt import zero_checkpoint as zc  # DeepSpeed's types are imported only for directories

        info = zc.verify(p)
        if info.step is None:
            raise CheckpointError(f"{p}: no global_step in the checkpoint")
        return info.step
    if not p.is_file():
        raise CheckpointError(f"{p}: no such file or directory")
    ckpt = safe_load(p)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or not isinstance(ckpt.get("global_step"), int):
        raise CheckpointError(f"{p}: not a Lightning training checkpoint (no state_dict / global_step)")
    return ckpt["global_step"]


def _candidates(d: Path) -> tuple[list[tuple[str, Path]], list[tuple[str, Path]]]:
    """(last-named, periodic) as (name, path), the most recently modified first."""
    from gpt.zero_checkpoint import hidden_complete

    found = [(e.name, Path(e.path)) for e in os.scandir(d) if e.name.endswith(".ckpt") and not e.name.startswith(".")]
    for name, paths in hidden_complete(d).items():  # a publish killed between its renames
        if name.endswith(".ckpt"):
            found += [(name, p) for p in paths]

    def mtime(item: tuple[str, Path]) -> float:
        try:
            return item[1].stat().st_mtime
        except OSError:
            return 0.0
    def order(item: tuple[str, Path]) -> tuple[int, float]:
        # The step in the name first (step=N.ckpt): a copied run directory's mtimes are all alike.
        m = _STEP.search(item[0])
        return (int(m.group(1)) if m else -1, mtime(item))
    found.sort(key=order, reverse=True)
    last = [c for c in found if _LAST.match(c[0])]
    return last, [c for c in found if not _LAST.match(c[0])]


def _shown(name: str, path: Path) -> str:
    return name if path.name == name else f"{name} (complete copy {path.name}: its publish was interrupted)"


def find_resume_checkpoint(checkpoint_dir: str | os.PathLike) -> tuple[Optional[Path], list[str]]:
    """The checkpoint `--ckpt_path last` should resume from, and one-line notes to print.

    last.ckpt (a file or a ZeRO directory) if it is complete and loadable; else the newest valid
    periodic checkpoint in checkpoint_dir (with a note naming why last was skipped and what is used);
    (None, [note]) when there is none (fresh start, said in one line).
    """
    d = Path(checkpoint_dir)
    if not d.is_dir():
        return None, [f"no checkpoint directory {d}: starting from step 0"]
    last, periodic = _candidates(d)
    if not last and not periodic:
        return None, [f"no checkpoint in {d}: starting from step 0"]
    notes: list[str] = []
    for name, path in last:
        try:
            step = checkpoint_step(path)
        except CheckpointError as e:
            notes.append(f"skipping {name}: {e}")
            continue
        if path.name != name:
            notes.append(f"resuming from {_shown(name, path)}, step {step}")
        return path, notes
    if not last:
        notes.append(f"no last.ckpt in {d}")
    for name, path in periodic:
        try:
            step = checkpoint_step(path)
        except CheckpointError as e:
            notes.append(f"skipping {name}: {e}")
            continue
        notes.append(f"resuming from {_shown(name, path)}, step {step}: the newest valid periodic checkpoint")
        return path, notes
    notes.append(f"no usable checkpoint in {d}: starting from step 0")
    return None, notes
