"""recipes/rl.py: the RL stage through the shared run shape (subprocesses, tiny fp32 models).

    .venv/bin/python -m pytest tests/test_rl_recipe.py -q            # configs parse, one-line refusals
    .venv/bin/python -m pytest tests/test_rl_recipe.py -q -m slow    # GRPO learns; kill -9 then exact resume

The policy is the random tiny "SFT" checkpoint of tests/rl_fixtures.py; the verifiable reward is
tests.rl_fixtures.vowel_share (dense, so a random model climbs it in a few rollouts). The held-out
reward before and after is measured outside the run, through gpt.evaluate's generation path.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.pretrain_fixtures import ROOT, metric_by_step, recipe_env
from tests.rl_fixtures import vowel_share, write_rl_config, write_rl_inputs

slow = pytest.mark.slow
SLOW_DOWN = [{"class_path": "tests.pretrain_fixtures.SlowDown", "init_args": {"seconds": 0.3}}]
KEYS = ("train/loss", "train/reward", "train/kl_token", "train/response_length", "train/entropy")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    return write_rl_inputs(tmp_path_factory.mktemp("rl_recipe_inputs"))


def _cmd(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "recipes.rl", "--config", str(config), *extra]


def _run(config: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(_cmd(config, *extra), cwd=ROOT, env=recipe_env(), capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"recipe failed (rc {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def _held_out_reward(checkpoint: str, val_path: str, max_new_tokens: int = 8) -> float:
    """Mean vowel_share of greedy replies to the held-out prompts (gpt.evaluate's generation path)."""
    import json

    from gpt.checkpoint import load_model
    from gpt.demo_task import prompt_messages
    from gpt.evaluate import generate_replies

    rows = [json.loads(line) for line in Path(val_path).read_text().splitlines()]
    model, tok = load_model(checkpoint)
    with torch.no_grad():
        replies = generate_replies(model, tok, [prompt_messages(r) for r in rows], max_new_tokens=max_new_tokens)
    return sum(vowel_share(r, rep.text) for r, rep in zip(rows, replies)) / len(rows)


# ---- fast: configs and refusals --------------------------------------------------------------
@pytest.mark.parametrize("name", ["rl-tiny-cpu", "rl-ppo-tiny-cpu", "rl-llama-1b"])
def test_shipped_configs_parse(name):
    p = _run(ROOT / "recipes" / "configs" / f"{name}.yaml", "--print_config")
    assert "algorithm:" in p.stdout and "reward_fn: gpt.demo_task:reward" in p.stdout


def test_steps_that_split_a_rollout_are_refused_in_one_line(tmp_path, inputs):
    # PPO: 2 epochs x 2 minibatches = 4 optimizer steps per rollout; 6 steps would end mid-rollout.
    cfg = write_rl_config(tmp_path / "c.yaml", tmp_path / "run", inputs, max_steps=6, checkpoint_every=4,
                          algorithm="ppo", reward_model=inputs["rm"], ppo_epochs=2, num_minibatches=2)
    p = _run(cfg, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1] == (
        "error: trainer.max_steps 6 is not a positive multiple of the optimizer steps per rollout, 4 "
        "(model.ppo_epochs x model.num_minibatches)")
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_intervals_that_split_a_rollout_are_refused_in_one_line(tmp_path, inputs):
    cfg = write_rl_config(tmp_path / "c.yaml", tmp_path / "run", inputs, max_steps=8, checkpoint_every=2,
                          algorithm="ppo", reward_model=inputs["rm"], ppo_epochs=2, num_minibatches=2)
    p = _run(cfg, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "error: --checkpoint_every 2 is not a multiple of the optimizer steps per rollout, 4" in p.stderr


@pytest.mark.parametrize("what", ["language model", "missing"])
def test_a_wrong_reward_model_is_refused_before_the_run_starts(tmp_path, inputs, what):
    # Before: the first rollout refused it, after the run directory and the W&B run existed.
    rm = inputs["sft"] if what == "language model" else str(tmp_path / "nowhere.ckpt")
    cfg = write_rl_config(tmp_path / "c.yaml", tmp_path / "run", inputs, max_steps=4, checkpoint_every=4,
                          algorithm="ppo", reward_model=rm)
    p = _run(cfg, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: model.reward_model {rm}"), last
    assert ("not a reward model" in last) if what == "language model" else ("nowhere.ckpt" in last), last
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").rglob("*.ckpt"))
    assert not (tmp_path / "run" / "run.json").exists()


def test_a_missing_reference_is_refused_before_the_run_starts(tmp_path, inputs):
    # Before: the first rollout's load_model named the file, after the run directory existed.
    missing = str(tmp_path / "nowhere.ckpt")
    cfg = write_rl_config(tmp_path / "c.yaml", tmp_path / "run", inputs, max_steps=2, reference=missing)
    p = _run(cfg, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1] == f"error: model.reference {missing}: no such file or directory"
    assert not (tmp_path / "run" / "run.json").exists()


def test_a_reward_model_as_the_reference_is_refused_before_the_run_starts(tmp_path, inputs):
    # Before: load_model read the reward model's GPT, whose LM head is stale, and the KL ran against it.
    cfg = write_rl_config(tmp_path / "c.yaml", tmp_path / "run", inputs, max_steps=2, reference=inputs["rm"])
    p = _run(cfg, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1] == (
        f"error: model.reference {inputs['rm']}: holds a reward model (recipes/reward.py), not a language model; "
        "the reference is a language model")
    assert not (tmp_path / "run" / "run.json").exists()


# ---- slow: training runs ----------------------------------------------------------------------
@slow
def test_grpo_raises_the_reward_and_the_held_out_reward(tmp_path, inputs):
    run = tmp_path / "run"
    cfg = write_rl_config(tmp_path / "c.yaml", run, inputs, max_steps=12, checkpoint_every=12, val_every=6,
                          lr=3e-2, kl_coef=0.0)
    _run(cfg)
    reward = metric_by_step(run, "train/reward")
    assert sorted(reward) == list(range(1, 13))
    first, last = sum(reward[s] for s in (1, 2, 3)) / 3, sum(reward[s] for s in (10, 11, 12)) / 3
    before = _held_out_reward(inputs["sft"], inputs["val"])
    after = _held_out_reward(str(run / "checkpoints" / "last.ckpt"), inputs["val"])
    val = metric_by_step(run, "val/reward")
    print(f"train reward: first 3 rollouts {first:.3f}, last 3 {last:.3f}; held-out greedy reward {before:.3f} -> "
          f"{after:.3f} (the run's own validation: {val})")
    assert last > first + 0.1
    assert after > before + 0.1
    assert sorted(val) == [6, 12] and val[12] == pytest.approx(after, abs=1e-6)  # the same greedy replies


@slow
def test_resume_after_sigkill_is_exact(tmp_path, inputs):
    steps = 8
    ref_cfg = write_rl_config(tmp_path / "ref.yaml", tmp_path / "ref", inputs, max_steps=steps, checkpoint_every=2)
    _run(ref_cfg)
    ref = {k: metric_by_step(tmp_path / "ref", k) for k in KEYS}
    assert sorted(ref["train/reward"]) == list(range(1, steps + 1))

    run = tmp_path / "killed"
    cfg = write_rl_config(tmp_path / "killed.yaml", run, inputs, max_steps=steps, checkpoint_every=2,
                          callbacks=SLOW_DOWN)
    proc = subprocess.Popen(_cmd(cfg), cwd=ROOT, env=recipe_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (run / "checkpoints" / "last.ckpt").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 0 < killed_at < steps, killed_at

    _run(cfg, "--ckpt_path", "last")
    for key in KEYS:
        resumed = metric_by_step(run, key)
        assert set(range(killed_at + 1, steps + 1)) <= set(resumed), key
        for s in range(killed_at + 1, steps + 1):
            assert resumed[s] == ref[key][s], (key, s, resumed[s], ref[key][s])
    a = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "ref" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
