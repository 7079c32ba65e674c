"""gpt.resume.find_resume_checkpoint: which checkpoint `--ckpt_path last` resumes from, and the notes it prints.

    .venv/bin/python -m pytest tests/test_resume.py -q

ZeRO directories and kills inside their saves: tests/test_zero_checkpoint.py (fast) and tests/test_zero.py (slow).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from gpt.resume import checkpoint_step, find_resume_checkpoint
from tests.checkpoint_fixtures import fake_zero_save, lightning_ckpt, write_crafted


def _age(path: Path, seconds_ago: float) -> None:
    t = os.stat(path).st_mtime - seconds_ago
    os.utime(path, (t, t))


@pytest.fixture
def run(tmp_path) -> Path:
    """Periodic checkpoints at steps 5 and 10 and last.ckpt at 10, written in that order."""
    d = tmp_path / "checkpoints"
    d.mkdir()
    for i, (name, step) in enumerate([("epoch=0-step=5.ckpt", 5), ("epoch=0-step=10.ckpt", 10), ("last.ckpt", 10)]):
        _age(lightning_ckpt(d / name, step), 30 - 10 * i)
    return d


def test_last_when_it_is_valid(run):
    assert find_resume_checkpoint(run) == (run / "last.ckpt", [])
    assert checkpoint_step(run / "last.ckpt") == 10


def test_missing_last_falls_back_to_the_newest_periodic(run):
    (run / "last.ckpt").unlink()
    path, notes = find_resume_checkpoint(run)
    assert path == run / "epoch=0-step=10.ckpt"
    assert notes == [f"no last.ckpt in {run}",
                     "resuming from epoch=0-step=10.ckpt, step 10: the newest valid periodic checkpoint"]


@pytest.mark.parametrize("damage,reason", [
    (lambda f: f.write_bytes(f.read_bytes()[:100]), "truncated or not a torch zip file"),
    (lambda f: f.write_bytes(b""), "empty file"),
    (lambda f: f.write_bytes(os.urandom(4096)), "truncated or not a torch zip file"),
])
def test_unusable_last_is_skipped_with_its_reason(run, damage, reason):
    damage(run / "last.ckpt")
    # "newest" is the step in the name, not the modification time (a copied run dir's mtimes are all alike)
    _age(run / "epoch=0-step=10.ckpt", 100)
    path, notes = find_resume_checkpoint(run)
    assert path == run / "epoch=0-step=10.ckpt"
    assert notes[0].startswith(f"skipping last.ckpt: {run / 'last.ckpt'}: ") and reason in notes[0]
    assert notes[1] == "resuming from epoch=0-step=10.ckpt, step 10: the newest valid periodic checkpoint"


def test_crafted_checkpoint_is_skipped_and_never_runs(run, tmp_path):
    marker = tmp_path / "pwned"
    write_crafted(run / "last.ckpt", marker, like={"state_dict": 0, "global_step": 0})
    path, notes = find_resume_checkpoint(run)
    assert path == run / "epoch=0-step=10.ckpt"
    assert "refusing to load" in notes[0] and "posix.system" in notes[0]
    assert not marker.exists()


def test_nothing_usable_starts_fresh_in_one_line(tmp_path):
    assert find_resume_checkpoint(tmp_path / "none") == (None, [f"no checkpoint directory {tmp_path / 'none'}: starting from step 0"])
    (tmp_path / "empty").mkdir()
    assert find_resume_checkpoint(tmp_path / "empty") == (None, [f"no checkpoint in {tmp_path / 'empty'}: starting from step 0"])
    d = tmp_path / "broken"
    d.mkdir()
    (d / "last.ckpt").write_bytes(b"")
    path, notes = find_resume_checkpoint(d)
    assert path is None and notes[-1] == f"no usable checkpoint in {d}: starting from step 0"


def test_not_a_training_checkpoint(tmp_path):
    import torch

    torch.save({"w": torch.zeros(2)}, tmp_path / "last.ckpt")
    path, notes = find_resume_checkpoint(tmp_path)
    assert path is None and "not a Lightning training checkpoint" in notes[0]


def test_the_most_recent_last_version_wins(run):
    """Lightning writes last-v1.ckpt when a fresh run finds an old last.ckpt; its own "last" is the
    most recently modified, and so is ours."""
    lightning_ckpt(run / "last-v1.ckpt", 3)
    assert find_resume_checkpoint(run) == (run / "last-v1.ckpt", [])


def test_zero_directories_and_files_mix(tmp_path):
    """A run whose strategy changed: a valid ZeRO last.ckpt wins; a broken one falls back to a file."""
    lightning_ckpt(tmp_path / "epoch=0-step=5.ckpt", 5)
    _age(tmp_path / "epoch=0-step=5.ckpt", 60)
    last = fake_zero_save(tmp_path, "last.ckpt", 10)
    assert find_resume_checkpoint(tmp_path) == (last, [])
    assert checkpoint_step(last) == 10
    (last / "latest").unlink()
    path, notes = find_resume_checkpoint(tmp_path)
    assert path == tmp_path / "epoch=0-step=5.ckpt" and "no readable 'latest'" in notes[0]
