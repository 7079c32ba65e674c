"""gpt.zero_checkpoint without DeepSpeed processes: the publish protocol, a kill at each of its steps,
and everything `verify` refuses (the multi-process kills are in tests/test_zero.py).

    .venv/bin/python -m pytest tests/test_zero_checkpoint.py -q
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from gpt import zero_checkpoint as zc
from gpt.checkpoint import CheckpointError
from gpt.resume import find_resume_checkpoint
from tests.checkpoint_fixtures import fake_zero_save, rewrite_manifest, write_crafted

OPTIM1 = "checkpoint/zero_pp_rank_1_mp_rank_00_optim_states.pt"
OPTIM0 = "checkpoint/zero_pp_rank_0_mp_rank_00_optim_states.pt"
MODEL = "checkpoint/mp_rank_00_model_states.pt"


def _hidden(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith("."))


def test_publish_replaces_the_whole_directory(tmp_path):
    fake_zero_save(tmp_path, "last.ckpt", 5)
    last = fake_zero_save(tmp_path, "last.ckpt", 10)
    info = zc.verify(last)
    assert (info.step, info.world_size) == (10, 2)
    assert _hidden(tmp_path) == []  # the previous copy and the staging directory are gone
    m = json.loads((last / zc.MANIFEST).read_text())
    assert m["ranks"] == {"0": [MODEL, OPTIM0], "1": [OPTIM1]}
    assert set(m["files"]) == {MODEL, OPTIM0, OPTIM1, "latest"}


class _Killed(Exception):
    pass


@pytest.mark.parametrize("stop", ["begin", "files", "manifest"])
def test_kill_before_publishing_keeps_the_previous_checkpoint(tmp_path, stop):
    fake_zero_save(tmp_path, "last.ckpt", 5)
    staging = fake_zero_save(tmp_path, "last.ckpt", 10, stop=stop)
    assert staging.is_dir() and staging.name.startswith(".last.ckpt.")
    path, notes = find_resume_checkpoint(tmp_path)
    assert (path, notes) == (tmp_path / "last.ckpt", [])
    assert zc.verify(path).step == 5
    if stop != "manifest":
        with pytest.raises(CheckpointError, match="never finished|not a DeepSpeed checkpoint"):
            zc.verify(staging)
    # The next save removes what the killed one left.
    fake_zero_save(tmp_path, "epoch=0-step=10.ckpt", 10)
    assert _hidden(tmp_path) == []


def test_kill_between_the_two_renames_resumes_from_the_hidden_copy(tmp_path, monkeypatch):
    fake_zero_save(tmp_path, "last.ckpt", 5)
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # target moved aside; the new copy not yet renamed in
            raise _Killed
        real_rename(src, dst)
    monkeypatch.setattr(zc.os, "rename", rename)
    with pytest.raises(_Killed):
        fake_zero_save(tmp_path, "last.ckpt", 10)
    monkeypatch.setattr(zc.os, "rename", real_rename)
    assert not (tmp_path / "last.ckpt").exists()
    path, notes = find_resume_checkpoint(tmp_path)
    assert path.parent == tmp_path and path.name.startswith(".last.ckpt.") and zc.verify(path).step == 10
    assert notes == [f"resuming from last.ckpt (complete copy {path.name}: its publish was interrupted), step 10"]
    # A periodic save in between keeps that copy (its name is still missing); the next last.ckpt replaces it.
    fake_zero_save(tmp_path, "epoch=0-step=15.ckpt", 15)
    assert path.is_dir()
    fake_zero_save(tmp_path, "last.ckpt", 15)
    assert _hidden(tmp_path) == [] and zc.verify(tmp_path / "last.ckpt").step == 15


def test_kill_while_deleting_the_previous_copy(tmp_path, monkeypatch):
    fake_zero_save(tmp_path, "last.ckpt", 5)
    monkeypatch.setattr(zc, "_remove_tree", lambda p: (_ for _ in ()).throw(_Killed()))
    with pytest.raises(_Killed):
        fake_zero_save(tmp_path, "last.ckpt", 10)
    monkeypatch.undo()
    assert find_resume_checkpoint(tmp_path) == (tmp_path / "last.ckpt", [])
    assert zc.verify(tmp_path / "last.ckpt").step == 10
    assert len(_hidden(tmp_path)) == 1  # the old copy, marked .removing
    fake_zero_save(tmp_path, "epoch=0-step=10.ckpt", 10)
    assert _hidden(tmp_path) == []


def test_remove_hides_before_deleting(tmp_path, monkeypatch):
    ckpt = fake_zero_save(tmp_path, "epoch=0-step=5.ckpt", 5)
    monkeypatch.setattr(zc, "_remove_tree", lambda p: (_ for _ in ()).throw(_Killed()))
    with pytest.raises(_Killed):
        zc.remove(ckpt)
    assert not ckpt.exists()  # never a half-deleted directory under the checkpoint's name
    monkeypatch.undo()
    zc.collect_garbage(tmp_path)
    assert _hidden(tmp_path) == []


# ---- what verify refuses ------------------------------------------------------------------------
def _truncate(d: Path, rel: str) -> None:
    f = d / rel
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _from_other_save(d: Path, rel: str, other: Path) -> None:
    shutil.copyfile(other / rel, d / rel)


@pytest.mark.parametrize("damage,fix_manifest,expect", [
    (lambda d, o: _truncate(d, OPTIM1), False, "bytes, gpt_zero_manifest.json says"),
    (lambda d, o: _truncate(d, OPTIM1), True, "truncated or not a torch zip file"),
    (lambda d, o: (d / OPTIM1).write_bytes(b""), True, "empty file"),
    (lambda d, o: (d / OPTIM0).unlink(), False, "missing"),
    (lambda d, o: _from_other_save(d, OPTIM1, o), True, "from another save (step 5, rank 1"),
    (lambda d, o: shutil.copyfile(d / OPTIM0, d / OPTIM1), True, "from another save (step 10, rank 0"),
    (lambda d, o: shutil.copyfile(d / OPTIM0, d / "checkpoint/zero_pp_rank_2_mp_rank_00_optim_states.pt"), False,
     "not part of save"),
    (lambda d, o: (d / "latest").unlink(), False, "no readable 'latest'"),
    (lambda d, o: (d / zc.MANIFEST).write_text("{"), False, "not a valid gpt.zero-checkpoint manifest"),
], ids=["truncated", "truncated-manifest-fixed", "zero-bytes", "missing", "other-step", "other-rank", "stranger",
        "no-latest", "bad-manifest"])
def test_verify_refuses(tmp_path, damage, fix_manifest, expect):
    other = fake_zero_save(tmp_path, "epoch=0-step=5.ckpt", 5)
    d = fake_zero_save(tmp_path, "last.ckpt", 10)
    damage(d, other)
    if fix_manifest:
        rewrite_manifest(d)
    with pytest.raises(CheckpointError) as e:
        zc.verify(d)
    msg = str(e.value)
    assert expect in msg and "\n" not in msg and str(d) in msg, msg
    path, notes = find_resume_checkpoint(tmp_path)  # resume falls back to the intact periodic one
    assert path == other and notes[0].startswith("skipping last.ckpt: ") and "step 5" in notes[-1]


def test_manifest_must_list_every_rank(tmp_path):
    d = fake_zero_save(tmp_path, "last.ckpt", 10)
    m = json.loads((d / zc.MANIFEST).read_text())
    m["world_size"] = 3
    (d / zc.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="per-rank file lists incomplete for world size 3"):
        zc.verify(d)


def test_directory_written_before_manifests_still_loads(tmp_path):
    d = fake_zero_save(tmp_path, "last.ckpt", 10)
    (d / zc.MANIFEST).unlink()
    info = zc.verify(d)
    assert (info.step, info.save_id) == (10, None)


@pytest.mark.parametrize("rel", [MODEL, OPTIM0, OPTIM1])
@pytest.mark.parametrize("manifest", [True, False], ids=["with-manifest", "legacy"])
def test_crafted_pickle_in_any_shard_is_refused(tmp_path, rel, manifest):
    d = fake_zero_save(tmp_path, "last.ckpt", 10)
    marker = tmp_path / "pwned"
    write_crafted(d / rel, marker)
    if manifest:
        rewrite_manifest(d)
    else:
        (d / zc.MANIFEST).unlink()
    with pytest.raises(CheckpointError) as e:
        zc.verify(d)
    msg = str(e.value)
    assert str(d / rel) in msg and "posix.system" in msg and "\n" not in msg, msg
    assert find_resume_checkpoint(tmp_path)[0] is None
    assert not marker.exists()
