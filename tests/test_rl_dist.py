"""gpt/rl.py on 2 CPU processes: DDP, DeepSpeed ZeRO-2 and ZeRO-3 sample the same rollouts and
end at the same policy (tests/rl_launch.py runs each; subprocesses, gloo).

    .venv/bin/python -m pytest tests/test_rl_dist.py -q -m slow
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt.checkpoint import load_model
from tests.pretrain_fixtures import ROOT, metric_by_step, recipe_env
from tests.rl_fixtures import write_rl_inputs

pytestmark = pytest.mark.slow
STEPS = 3


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    inputs = tmp_path_factory.mktemp("rl_dist_inputs")
    write_rl_inputs(inputs)
    out = {}
    for strategy in ("ddp", "zero2", "zero3"):
        run = tmp_path_factory.mktemp(strategy)
        p = subprocess.run([sys.executable, "-m", "tests.rl_launch", "--inputs", str(inputs), "--out", str(run),
                            "--strategy", strategy, "--devices", "2", "--steps", str(STEPS)],
                           cwd=ROOT, env=recipe_env(), capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, f"{strategy} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
        out[strategy] = run
    out["inputs"] = inputs
    return out


def _rollouts(run: Path) -> list[list[torch.Tensor]]:
    return [torch.load(run / f"rollouts_rank{r}.pt", weights_only=True) for r in (0, 1)]


@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_zero_samples_the_rollouts_of_ddp_and_ends_at_its_policy(runs, strategy):
    ddp, zero = _rollouts(runs["ddp"]), _rollouts(runs[strategy])
    for rank in (0, 1):
        assert len(ddp[rank]) == len(zero[rank]) == STEPS
        for step, (a, b) in enumerate(zip(ddp[rank], zero[rank])):
            assert torch.equal(a, b), (rank, step)  # same prompts on each rank, same sampled tokens
    assert not torch.equal(ddp[0][0], ddp[1][0])  # the ranks drew different prompts
    a, b = (torch.load(runs[s] / "final.pt", weights_only=True) for s in ("ddp", strategy))
    torch.testing.assert_close(b["logits"], a["logits"], rtol=0, atol=1e-4)
    for key in ("train/loss", "train/reward", "train/kl_token"):
        x, y = metric_by_step(runs["ddp"], key), metric_by_step(runs[strategy], key)
        assert sorted(x) == sorted(y) == list(range(1, STEPS + 1))
        assert all(y[s] == pytest.approx(x[s], abs=1e-4) for s in x), (key, x, y)


@pytest.mark.parametrize("strategy", ["ddp", "zero2", "zero3"])
def test_frozen_reference_is_unchanged_under_each_strategy(runs, strategy):
    sft, _ = load_model(runs["inputs"] / "sft")
    frozen = torch.load(runs[strategy] / "final.pt", weights_only=True)["frozen"]["reference"]
    want = sft.state_dict()
    assert frozen.keys() == want.keys()
    assert all(torch.equal(frozen[k], want[k]) for k in want)
