"""benchmarks/pretrain_bench.py --vs-loop: the minimal loop trains what the recipe trains.

    pytest tests/test_pretrain_bench.py -q
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from benchmarks import pretrain_bench as pb
from recipes.pretrain import main
from tests.pretrain_fixtures import losses_by_step, write_random_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_random_shards(tmp_path_factory.mktemp("bench") / "shards", train_tokens=12_000, val_tokens=3_000)


def test_minimal_loop_sees_the_recipes_batches_and_initial_weights(tmp_path, shards, monkeypatch):
    """Step 0 and 1 losses of the loop equal tiny-cpu's in fp32 (same init, batches, lr); its held-out loss is finite."""
    monkeypatch.setattr(sys, "argv", ["recipes.pretrain"])
    main(["fit", "--config", str(pb.CONFIG), "--run_dir", str(tmp_path / "run"), "--data.data_dir", str(shards),
          "--data.tokenizer", "null", "--trainer.precision", "32-true", "--trainer.max_steps", "3",
          "--trainer.log_every_n_steps", "1", "--wandb", "false", "--val_every", "0", "--checkpoint_every", "0",
          "--trainer.enable_progress_bar", "false"])
    recipe = losses_by_step(tmp_path / "run")
    loop = pb.minimal_loop(shards, 3, threads=1)
    assert loop["steps"] == 3 and loop["precision"] == "32-true"
    assert loop["losses"][:2] == pytest.approx([recipe[0], recipe[1]], rel=1e-6, abs=1e-6)
    assert loop["losses"][2] == pytest.approx(recipe[2], abs=1e-4)  # fused vs for-loop AdamW: last bits
    assert 0 < pb.held_out_loss(loop["model"], shards) < 20
