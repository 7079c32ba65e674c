"""Input fingerprints: what a data-prep task read, so that a re-run notices a changed input.

    from data_prep.fingerprint import fingerprint, changes
    inputs = fingerprint(sources)          # recorded in tasks/task_NNNNN.json and manifest.json
    changes(inputs, fingerprint(sources))  # [] when nothing changed, else one phrase per change

A local file is fingerprinted by its resolved path, size and mtime, plus the sha256 of its
bytes when it is small (<= FULL_HASH_BYTES, 16 MiB: a few milliseconds, and the read leaves the
file in the page cache for the real pass). A large file is never read a second time just to
fingerprint it: any write changes its mtime, so size + mtime notice every edit short of a
deliberate `touch -r` afterwards (a hash of its first and last blocks would not add to that: an
edit in the middle keeping size and mtime escapes it too). Decision rule: same size and mtime
-> unchanged; otherwise a small file is unchanged if its hash is (a `touch` or a copy is not a
change), a large file has changed. `reuse=` lets a later check stat the files instead of
hashing them again while they look untouched.

A Hub dataset is fingerprinted by name, config, split and revision: `pin_hub_revisions` asks
the Hub which commit `--hub_revision` (default: the main branch) is now and the job reads
exactly that commit, so a dataset updated on the Hub between two runs, or between two tasks of
an array, is noticed. Offline (HF_HUB_OFFLINE=1) the revision stays what the user gave; an
unpinned Hub dataset's changes then go unnoticed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Optional

from data_prep.sources import Source

FULL_HASH_BYTES = 16 << 20


def file_fingerprint(path: str, reuse: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """{"path", "bytes", "mtime_ns"} plus "sha256" for a small file.

    `reuse`: an earlier fingerprint of the same path; while size and mtime are unchanged its
    hash is taken instead of reading the file again.
    """
    real = os.path.realpath(path)
    st = os.stat(real)
    out: dict[str, Any] = {"path": real, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    if st.st_size > FULL_HASH_BYTES:
        return out
    if reuse and "sha256" in reuse and (reuse["path"], reuse["bytes"], reuse["mtime_ns"]) == \
            (real, st.st_size, st.st_mtime_ns):
        return {**out, "sha256": reuse["sha256"]}
    h = hashlib.sha256()
    with open(real, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    out["sha256"] = h.hexdigest()
    return out


def pin_hub_revisions(sources: list[Source], hub_revision: Optional[str] = None) -> list[Source]:
    """Hub sources with `revision` set to the commit the Hub resolves now (or `hub_revision`)."""
    return [dataclasses.replace(s, revision=_resolve(s.spec, hub_revision)) if s.kind == "hub" else s
            for s in sources]


def _resolve(name: str, revision: Optional[str]) -> Optional[str]:
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        return revision
    try:
        return HfApi().dataset_info(name, revision=revision, timeout=30).sha or revision
    except Exception:  # unreachable Hub, private or unknown name: datasets reports it when it reads
        return revision


def fingerprint(sources: list[Source], hub_config: Optional[str] = None, hub_split: str = "train",
                reuse: Optional[list[dict[str, Any]]] = None) -> list[dict[str, Any]]:
    """One entry per source: its files' fingerprints, or the Hub coordinates it is read at.

    `reuse`: an earlier fingerprint of the same sources (see file_fingerprint).
    """
    known = {f["path"]: f for entry in reuse or [] for f in entry.get("files", [])}
    out = []
    for s in sources:
        if s.kind == "hub":
            out.append({"spec": s.spec, "hub": s.spec, "config": hub_config, "split": hub_split,
                        "revision": s.revision})
        else:
            files = [file_fingerprint(f, known.get(os.path.realpath(f))) for f in s.files]
            out.append({"spec": s.spec, "files": files})
    return out


def _same_file(old: dict[str, Any], new: dict[str, Any]) -> bool:
    if old["bytes"] != new["bytes"]:
        return False
    if old["mtime_ns"] == new["mtime_ns"]:
        return True
    return "sha256" in old and old.get("sha256") == new.get("sha256")


def _file_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    if old["bytes"] != new["bytes"]:
        return f"{new['path']}: {old['bytes']} -> {new['bytes']} bytes"
    if "sha256" in new:
        return f"{new['path']}: content changed (same size)"
    return f"{new['path']}: modified (same size, other mtime)"


def changes(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[str]:
    """What differs between two fingerprints of the same sources, one phrase each."""
    if [o.get("spec") for o in old] != [n.get("spec") for n in new]:
        return ["other sources"]
    out = []
    for o, n in zip(old, new):
        if "hub" in n:
            keys = [k for k in ("hub", "config", "split", "revision") if o.get(k) != n.get(k)]
            out += [f"{n['spec']}: {k} {o.get(k)} -> {n.get(k)}" for k in keys]
            continue
        before = {f["path"]: f for f in o.get("files", [])}
        after = {f["path"]: f for f in n.get("files", [])}
        added, removed = sorted(after.keys() - before.keys()), sorted(before.keys() - after.keys())
        if added:
            out.append(f"{n['spec']}: {len(added)} more file(s) ({', '.join(added[:3])}{', ...' if len(added) > 3 else ''})")
        if removed:
            out.append(f"{n['spec']}: {len(removed)} file(s) gone ({', '.join(removed[:3])}{', ...' if len(removed) > 3 else ''})")
        out += [_file_change(before[p], after[p]) for p in after if p in before and not _same_file(before[p], after[p])]
    return out
