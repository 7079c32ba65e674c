"""End-to-end pretraining runs through recipes/pretrain.py (subprocesses, tiny fp32 models).

    pytest tests/test_pretrain.py -m slow

Exact resume after SIGKILL, resume from 2 processes onto 1, atomic checkpoint saves, the
metrics in W&B (offline file decoded) and CSV, the non-finite guard, the token budget.
The run shape itself (run directory, refused resumes, --init_from, W&B across restarts,
progress lines): tests/test_runs.py.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.pretrain_fixtures import (ROOT, losses_by_step, read_csv_metrics, read_wandb_history, recipe_cmd,
                                     recipe_env, run_recipe, write_config, write_random_shards, write_text_shards)

slow = pytest.mark.slow
SLOW_DOWN = [{"class_path": "tests.pretrain_fixtures.SlowDown", "init_args": {"seconds": 0.15}}]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_random_shards(tmp_path_factory.mktemp("shards"), train_tokens=20_000, val_tokens=1_000)


def _state(run_dir: Path, name: str = "last.ckpt") -> dict:
    return torch.load(run_dir / "checkpoints" / name, weights_only=True, map_location="cpu")


@slow
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_exact_resume_after_sigkill(tmp_path, shards, precision):
    steps = 16
    ref_cfg = write_config(tmp_path / "ref.yaml", tmp_path / "ref", shards, max_steps=steps, precision=precision)
    run_recipe(ref_cfg)
    ref = losses_by_step(tmp_path / "ref")
    assert sorted(ref) == list(range(steps))

    run = tmp_path / "killed"
    cfg = write_config(tmp_path / "killed.yaml", run, shards, max_steps=steps, callbacks=SLOW_DOWN,
                       precision=precision)
    proc = subprocess.Popen(recipe_cmd(cfg), cwd=ROOT, env=recipe_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (run / "checkpoints" / "last.ckpt").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _state(run)["global_step"]
    assert 0 < killed_at < steps, killed_at

    run_recipe(cfg, "--ckpt_path", "last")
    resumed = losses_by_step(run)
    assert set(range(killed_at, steps)) <= set(resumed)
    for s in range(killed_at, steps):
        assert abs(resumed[s] - ref[s]) <= 1e-6, (s, resumed[s], ref[s])
    a, b = _state(run)["state_dict"], _state(tmp_path / "ref")["state_dict"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)


@slow
def test_resume_two_processes_onto_one_keeps_the_sample_sequence(tmp_path, shards):
    two = write_config(tmp_path / "two.yaml", tmp_path / "two", shards, max_steps=8, devices=2, accumulate=1)
    run_recipe(two)
    ref = losses_by_step(tmp_path / "two")
    one = write_config(tmp_path / "one.yaml", tmp_path / "one", shards, max_steps=8, devices=1, accumulate=2)
    run_recipe(one, "--ckpt_path", str(tmp_path / "two" / "checkpoints" / "step=4.ckpt"))
    resumed = losses_by_step(tmp_path / "one")
    assert sorted(resumed) == [4, 5, 6, 7]
    for s in resumed:
        assert abs(resumed[s] - ref[s]) <= 1e-5, (s, resumed[s], ref[s])
    # A different global batch would change the sample sequence: refused in one line.
    bad = write_config(tmp_path / "bad.yaml", tmp_path / "bad", shards, max_steps=8, devices=1, accumulate=1)
    p = run_recipe(bad, "--ckpt_path", str(tmp_path / "two" / "checkpoints" / "step=4.ckpt"), check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "global_batch_size 8 in the checkpoint, 4 now" in p.stderr


def test_kill_during_checkpoint_save_leaves_the_previous_one(tmp_path):
    path = tmp_path / "last.ckpt"
    script = f"""
import os, sys, time, torch
from gpt.checkpoint_io import AtomicCheckpointIO
io = AtomicCheckpointIO()
io.save_checkpoint({{"step": 1, "w": torch.ones(3)}}, {str(path)!r})
os.fsync = lambda fd: time.sleep(600)   # hang inside the second save, after its bytes are written
print("saving", flush=True)
io.save_checkpoint({{"step": 2, "w": torch.zeros(10_000)}}, {str(path)!r})
"""
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=recipe_env(), stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "saving"
    tmp = path.with_name(path.name + ".tmp")
    deadline = time.time() + 60
    while not (tmp.exists() and tmp.stat().st_size > 40_000):
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["step"] == 1 and torch.equal(ckpt["w"], torch.ones(3))
    from gpt.checkpoint_io import AtomicCheckpointIO
    AtomicCheckpointIO().save_checkpoint({"step": 3}, path)  # the next save replaces the leftover temp
    assert torch.load(path, weights_only=True)["step"] == 3 and not tmp.exists()


@slow
def test_metrics_reach_wandb_and_csv(tmp_path):
    from data_prep.train_tokenizer import train_tokenizer
    tok = train_tokenizer(str(ROOT / "data" / "shakespeare.jsonl.gz"), str(tmp_path / "tok.json"), vocab_size=300,
                          max_chars=100_000)
    write_text_shards(tmp_path / "shards", tmp_path / "tok.json", max_chars=100_000)
    callbacks = [{"class_path": "gpt.callbacks.SampleGenerations",
                  "init_args": {"prompts": ["ROMEO:"], "max_new_tokens": 4}}]
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "run", tmp_path / "shards", tmp_path / "tok.json",
                       max_steps=6, val_every=3, wandb=True, vocab_size=tok.vocab_size, callbacks=callbacks)
    run_recipe(cfg)
    want = ["train/loss", "train/lr", "train/grad_norm", "train/tokens", "train/tokens_per_sec", "train/mfu",
            "val/loss", "val/bpb"]
    csv_keys = set().union(*read_csv_metrics(tmp_path / "run"))
    assert set(want) <= csv_keys, set(want) - csv_keys
    files = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    rows = read_wandb_history(files[0])
    keys = set().union(*rows)
    assert set(want) <= keys, set(want) - keys
    assert [r["samples/_type"] for r in rows if "samples/_type" in r] == ["table-file"] * 2  # generations, 2 vals
    last = {k: v for r in rows for k, v in r.items()}
    assert last["train/tokens"] == 6 * 4 * 32
    assert 0 < last["train/mfu"] < 1 and last["train/tokens_per_sec"] > 0
    assert not keys & {"epoch", "train/lengths", "train/batches", "train/time"}  # no clutter
    assert sorted(r["_step"] for r in rows if "val/loss" in r) == [3, 6]  # at the optimizer step
    assert 0 < last["val/bpb"] < 20 and last["val/loss"] > 0


@slow
def test_nan_loss_stops_naming_the_step(tmp_path, shards):
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "run", shards, max_steps=8,
                       callbacks=[{"class_path": "tests.pretrain_fixtures.InjectNaN", "init_args": {"step": 3}}])
    p = run_recipe(cfg, check=False)
    assert p.returncode != 0
    assert "non-finite loss or gradient at step 3" in p.stderr
    assert max(losses_by_step(tmp_path / "run"), default=-1) < 3  # nothing logged as trained after the NaN


@slow
def test_nan_gradient_skip_mode_counts_and_continues(tmp_path, shards):
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "run", shards, max_steps=6,
                       callbacks=[{"class_path": "tests.pretrain_fixtures.InjectNaN",
                                   "init_args": {"step": 2, "what": "grad"}}])
    data = yaml.safe_load(cfg.read_text())
    for c in data["trainer"]["callbacks"]:
        if c["class_path"] == "gpt.callbacks.NonFiniteGuard":
            c["init_args"] = {"action": "skip"}
    cfg.write_text(yaml.safe_dump(data))
    run_recipe(cfg)
    rows = read_csv_metrics(tmp_path / "run")
    skipped = [r["train/skipped_steps"] for r in rows if "train/skipped_steps" in r]
    assert skipped and set(skipped) == {1.0}  # one step skipped, counted
    losses = losses_by_step(tmp_path / "run")
    assert sorted(losses) == list(range(6)) and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert _state(tmp_path / "run")["state_dict"]["model.wte.weight"].isfinite().all()


@slow
def test_too_many_tokens_fails_before_training(tmp_path, shards):
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "run", shards, max_steps=1000)
    p = run_recipe(cfg, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    line = [ln for ln in p.stderr.splitlines() if "train tokens" in ln][-1]
    assert line.startswith("error: ") and "128,000" in line and "19,968" in line  # 1000 x 4 x 32 wanted; 624 x 32 held
    assert not (tmp_path / "run").exists()  # nothing written: no W&B run, no checkpoint
