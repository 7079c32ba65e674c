"""ZeRO checkpoint directories published whole: a kill during a save never leaves a half-written one.

    # gpt.zero.ZeroStrategy.save_checkpoint runs this protocol; readers call:
    info = verify("runs/x/checkpoints/last.ckpt")   # ZeroCheckpoint(step, save_id, ...) or CheckpointError

DeepSpeed writes a checkpoint as a directory of per-rank files, in place: a kill while it writes
`last.ckpt/` leaves 0-byte or partial shards, or shards of two different steps. Here every save goes
into a fresh hidden directory beside the target and replaces the target only when complete:

1. rank 0 removes what earlier interrupted saves left (`collect_garbage`) and creates
   `.<name>.<id>/` holding a STAGING marker; every rank learns the 12-hex save id.
2. DeepSpeed's save_checkpoint writes into it. Its checkpoint engine (DeepSpeed's plug-in interface
   for file writes) is wrapped by `RecordingEngine`: each state dict it saves gets a stamp
   `{id, step, rank, file}`, each file is fsynced by the rank that wrote it, and its name recorded.
3. After DeepSpeed's closing barrier, rank 0 gathers the per-rank lists, fsyncs the files DeepSpeed
   wrote outside the engine (`latest`, its zero_to_fp32 scripts), and writes MANIFEST (id, step,
   world size, every file with its size, which rank wrote which) atomically; its presence is the
   completeness marker.
4. `publish`: rename(staging, target) when there is no target; else rename(target, aside), then
   rename(staging, target), then delete the aside. Renames within a directory: no links, so a run
   directory copied with any tool still resumes.

A kill before step 4 leaves the target as it was (the previous checkpoint); between the two renames
the target is absent but the new, complete copy is hidden beside it, which `hidden_complete` finds
for gpt.resume. `verify` checks that the manifest's files are all there with their sizes, that no
other shard is, that every rank listed files, and that every shard's stamp names this save, this
step, its rank and its own file name (so a shard copied in from another save or rank is refused).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from gpt.checkpoint import CheckpointError
from gpt.safe_load import check_globals, check_zip, deepspeed_safe_globals, safe_load

MANIFEST = "gpt_zero_manifest.json"
STAGING = "gpt_zero_staging"
STAMP = "gpt_zero_save"  # key added to every state dict DeepSpeed's engine saves
FORMAT, VERSION = "gpt.zero-checkpoint", 1
# .<name>.<id> (a save being written, or a complete one not yet or no longer published) and
# .<name>.<id>.removing (on its way out).
_HIDDEN = re.compile(r"^\.(?P<name>.+)\.(?P<id>[0-9a-f]{12})(?P<removing>\.removing)?$")


@dataclass
class ZeroCheckpoint:
    path: Path
    step: Optional[int]
    save_id: Optional[str]  # None: a directory written before manifests (legacy, not verifiable)
    world_size: Optional[int]


def new_save_id() -> str:
    return uuid.uuid4().hex[:12]


def staging_dir(target: Path, save_id: str) -> Path:
    return target.parent / f".{target.name}.{save_id}"


# ---- durability -----------------------------------------------------------------------------
def fsync_path(path: Path) -> None:
    """fsync a file or directory (a directory's fsync makes the renames inside it durable)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# ---- writing ----------------------------------------------------------------------------------
class RecordingEngine:
    """Wraps the DeepSpeed checkpoint engine of one save: stamps, fsyncs and records each file.

    DeepSpeed routes every file of a checkpoint except `latest` and its recovery scripts through
    `engine.checkpoint_engine.save(state_dict, path)` (its CheckpointEngine interface); everything
    else is passed through to the engine it wraps.
    """

    def __init__(self, inner: Any, root: Path, stamp: dict[str, Any]):
        self.inner, self.root, self.stamp = inner, os.path.abspath(root), stamp
        self.written: dict[str, int] = {}  # relative name -> size

    def save(self, state_dict: Any, path: str) -> None:
        rel = Path(os.path.relpath(os.path.abspath(path), self.root)).as_posix()
        if isinstance(state_dict, dict):
            state_dict = {**state_dict, STAMP: {**self.stamp, "file": rel}}
        self.inner.save(state_dict, path)
        fsync_path(Path(path))
        self.written[rel] = os.path.getsize(path)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def begin(staging: Path, name: str) -> None:
    """Rank 0, step 1: the empty staging directory with its marker."""
    staging.mkdir(parents=True)
    (staging / STAGING).write_text(json.dumps({"name": name}) + "\n", encoding="utf-8")


def finish(staging: Path, *, name: str, save_id: str, step: int, per_rank: list[dict[str, int]]) -> dict[str, Any]:
    """Rank 0, step 3, after every rank's files are written: fsync the rest, write the manifest."""
    engine_files = {rel: size for files in per_rank for rel, size in files.items()}
    files: dict[str, int] = {}
    for f in sorted(staging.rglob("*")):
        if f.is_dir():
            continue
        rel = f.relative_to(staging).as_posix()
        if rel in (STAGING, MANIFEST):
            continue
        if rel not in engine_files:
            fsync_path(f)  # `latest` and DeepSpeed's scripts, written by rank 0 outside the engine
        files[rel] = engine_files.get(rel, f.stat().st_size)
    missing = sorted(set(engine_files) - set(files))
    if missing:
        raise CheckpointError(f"{staging}: files the ranks wrote are not visible to rank 0: {', '.join(missing[:3])} "
                              "(a checkpoint directory must be on a filesystem every rank shares)")
    for d in sorted({staging} | {staging / Path(rel).parent for rel in files}):
        fsync_path(d)
    manifest = {"format": FORMAT, "version": VERSION, "name": name, "id": save_id, "step": int(step),
                "world_size": len(per_rank), "time": time.time(), "files": files,
                "ranks": {str(r): sorted(fs) for r, fs in enumerate(per_rank)}}
    _write_json_atomic(staging / MANIFEST, manifest)
    (staging / STAGING).unlink()
    fsync_path(staging)
    return manifest


def publish(staging: Path, target: Path) -> None:
    """Rank 0, step 4: the complete staging directory becomes `target`; the previous one goes."""
    aside = None
    if os.path.lexists(target):
        aside = target.parent / f".{target.name}.{new_save_id()}.removing"
        os.rename(target, aside)
    os.rename(staging, target)
    fsync_path(target.parent)
    if aside is not None:
        if aside.is_dir() and not aside.is_symlink():
            _remove_tree(aside)
        else:
            aside.unlink()  # a file or link that stood under the name (e.g. a non-ZeRO checkpoint)
    for name, path, _ in _hidden(target.parent):
        if name == target.name:
            _remove_tree(path)  # complete copies an earlier interrupted publish left behind


def remove(target: Path) -> None:
    """Delete a published checkpoint (Lightning's top-k pruning) without leaving a partial one
    under its name: hide it first, then delete."""
    aside = target.parent / f".{target.name}.{new_save_id()}.removing"
    os.rename(target, aside)
    _remove_tree(aside)


def _hidden(parent: Path) -> list[tuple[str, Path, str]]:
    """(visible name, path, state) of our hidden directories; state: removing | staging | complete | empty."""
    out = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return out
    for e in entries:
        m = _HIDDEN.match(e.name)
        if not m or not e.is_dir(follow_symlinks=False):
            continue
        p = Path(e.path)
        if m["removing"]:
            state = "removing"
        elif (p / MANIFEST).is_file():
            state = "complete"
        elif (p / STAGING).is_file():
            state = "staging"
        elif not any(p.iterdir()):
            state = "empty"
        else:
            continue  # not ours
        out.append((m["name"], p, state))
    return out


def collect_garbage(parent: Path) -> None:
    """Rank 0, step 1: delete interrupted saves and superseded copies; keep a complete copy whose
    visible name is gone (the only trace of a publish killed between its two renames)."""
    for name, path, state in _hidden(parent):
        if state != "complete" or os.path.lexists(parent / name):
            _remove_tree(path)


def hidden_complete(parent: Path) -> dict[str, list[Path]]:
    """Complete hidden copies whose visible name does not exist, by that name (for gpt.resume)."""
    out: dict[str, list[Path]] = {}
    for name, path, state in _hidden(parent):
        if state == "complete" and not os.path.lexists(parent / name):
            out.setdefault(name, []).append(path)
    return out


# ---- reading ----------------------------------------------------------------------------------
def read_tag(path: Path) -> str:
    latest = path / "latest"
    try:
        tag = latest.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: not a DeepSpeed checkpoint directory (no readable 'latest' file)") from None
    if not tag or "/" in tag or tag.startswith(".") or not (path / tag).is_dir():
        raise CheckpointError(f"{path}: 'latest' names {tag!r}, which is not a folder of this checkpoint")
    return tag


def read_manifest(path: Path) -> Optional[dict[str, Any]]:
    f = path / MANIFEST
    if not f.is_file():
        return None
    try:
        m = json.loads(f.read_text(encoding="utf-8"))
        ok = (m.get("format") == FORMAT and isinstance(m.get("files"), dict) and isinstance(m.get("ranks"), dict)
              and isinstance(m.get("step"), int) and isinstance(m.get("id"), str) and isinstance(m.get("world_size"), int))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        ok = False
    if not ok:
        raise CheckpointError(f"{f}: not a valid {FORMAT} manifest")
    if m.get("version") != VERSION:
        raise CheckpointError(f"{f}: manifest version {m.get('version')}, this code reads version {VERSION}")
    return m


def verify(path: str | os.PathLike) -> ZeroCheckpoint:
    """Check a ZeRO checkpoint directory before anything is loaded from it; CheckpointError (one
    line naming the file) when incomplete, mixed, or holding a pickle that is not plain data.

    Cost: a stat per file plus each shard's pickle read through the memory-mapped weights-only
    loader (tensors are not read), so milliseconds per GB of checkpoint.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    if (path / STAGING).is_file() and not (path / MANIFEST).is_file():
        raise CheckpointError(f"{path}: a save that never finished (no {MANIFEST})")
    tag = read_tag(path)
    m = read_manifest(path)
    if m is None:
        return _verify_legacy(path, tag)
    files: dict[str, int] = m["files"]
    for rel, size in sorted(files.items()):
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (listed in {MANIFEST})")
        if f.stat().st_size != size:
            raise CheckpointError(f"{f}: {f.stat().st_size} bytes, {MANIFEST} says {size}: changed or truncated")
    strangers = sorted(p.relative_to(path).as_posix() for p in path.rglob("*.pt") if p.relative_to(path).as_posix() not in files)
    if strangers:
        raise CheckpointError(f"{path / strangers[0]}: not part of save {m['id']} (not in {MANIFEST})")
    if sorted(m["ranks"]) != sorted(str(r) for r in range(m["world_size"])) or not all(m["ranks"].values()):
        raise CheckpointError(f"{path / MANIFEST}: per-rank file lists incomplete for world size {m['world_size']}")
    for rank, names in sorted(m["ranks"].items()):
        for rel in names:
            _check_stamp(path / rel, {"id": m["id"], "step": m["step"], "rank": int(rank), "file": rel})
    return ZeroCheckpoint(path, m["step"], m["id"], m["world_size"])


def _check_stamp(f: Path, want: dict[str, Any]) -> None:
    sd = safe_load(f, deepspeed=True)
    got = sd.get(STAMP) if isinstance(sd, dict) else None
    if got != want:
        seen = f"step {got.get('step')}, rank {got.get('rank')}, save {got.get('id')}" if isinstance(got, dict) else "no stamp"
        raise CheckpointError(f"{f}: from another save ({seen}), not save {want['id']} of step {want['step']} "
                              f"rank {want['rank']}: refusing a mixed checkpoint")


def _verify_legacy(path: Path, tag: str) -> ZeroCheckpoint:
    """A directory without manifest (written before gpt.zero published saves): its shards must be
    intact zip files of plain data; which step each belongs to cannot be checked."""
    shards = sorted((path / tag).glob("*.pt"))
    # DeepSpeed's file names (no public API lists them): *model_states.pt, *optim_states.pt.
    model = [p for p in shards if p.name.endswith("model_states.pt")]
    if not model or not any(p.name.endswith("optim_states.pt") for p in shards):
        raise CheckpointError(f"{path}: {tag}/ lacks its model_states or optim_states shards: not a complete "
                              "DeepSpeed checkpoint")
    for f in shards:
        check_zip(f)
        check_globals(f, deepspeed_safe_globals())
    meta = safe_load(model[0], deepspeed=True)
    step = meta.get("global_step") if isinstance(meta, dict) else None
    return ZeroCheckpoint(path, step if isinstance(step, int) else None, None, None)
