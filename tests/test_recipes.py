"""recipes/: every YAML parses through the recipe's LightningCLI, the Slurm start-up check, the demo learns.

    pytest tests/test_recipes.py              # parse + checks
    pytest tests/test_recipes.py -m slow      # tiny-cpu: a short run whose loss falls
"""
import os
import sys
from pathlib import Path

import pytest
import yaml

from recipes.cli import check_slurm_tasks
from recipes.pretrain import main
from tests.pretrain_fixtures import ROOT, losses_by_step, run_recipe

CONFIGS = sorted((ROOT / "recipes" / "configs").glob("*.yaml"))


def _is_pretrain(path: Path) -> bool:
    if path.name.startswith(("sft-", "reward-", "dpo-", "rl-")):  # a post-training stage's config (tests/test_sft_recipe.py ...)
        return False
    cfg = yaml.safe_load(path.read_text()) or {}
    return "data_dir" in (cfg.get("data") or {}) or "preset" in (cfg.get("model") or {})


@pytest.mark.parametrize("config", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_parses(config, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["recipes.pretrain"])
    if not _is_pretrain(config):
        pytest.skip(f"{config.name} belongs to another stage's recipe")
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(config), "--print_config"])
    assert e.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["use_distributed_sampler"] is False  # our sampler deals samples to ranks
    assert "tokenizer" not in printed["model"]  # linked from data.tokenizer (stored in checkpoints)
    assert printed["group"] == config.stem.replace("tiny-cpu", "demo")  # runs/<group>/pretrain
    # every interval in optimizer steps, and both set in the config
    assert printed["val_every"] > 0 and printed["checkpoint_every"] > 0 and printed["keep_checkpoints"] != 0


def test_tiny_cpu_is_a_config():
    assert (ROOT / "recipes" / "configs" / "tiny-cpu.yaml") in CONFIGS


def _slurm_env(monkeypatch, ntasks: int, per_node: int):
    for k in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("SLURM_NTASKS", str(ntasks))
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", str(per_node))
    monkeypatch.setenv("SLURM_JOB_NAME", "pretrain")


def test_slurm_task_count_must_match_devices_times_nodes(monkeypatch):
    _slurm_env(monkeypatch, ntasks=4, per_node=2)
    check_slurm_tasks(devices=2, num_nodes=2, accelerator="cpu")
    with pytest.raises(SystemExit) as e:
        check_slurm_tasks(devices=2, num_nodes=1, accelerator="cpu")
    msg = str(e.value.code)
    assert "4 tasks" in msg and "= 2" in msg and "\n" not in msg
    for k in ("SLURM_NTASKS", "SLURM_NTASKS_PER_NODE", "SLURM_JOB_NAME"):
        monkeypatch.delenv(k)
    check_slurm_tasks(devices=8, num_nodes=4)  # not under srun: nothing to check


def test_slurm_mismatch_fails_at_start_up_in_the_cli(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["recipes.pretrain"])
    _slurm_env(monkeypatch, ntasks=3, per_node=3)
    with pytest.raises(SystemExit, match="Slurm started 3 tasks"):
        main(["fit", "--config", str(ROOT / "recipes" / "configs" / "tiny-cpu.yaml")])


@pytest.mark.slow
def test_tiny_cpu_loss_falls(tmp_path):
    """The demo config itself (paths moved to tmp, fewer steps) learns Shakespeare."""
    from data_prep.make_shards import make_shards
    from data_prep.train_tokenizer import train_tokenizer
    src = str(ROOT / "data" / "shakespeare.jsonl.gz")
    train_tokenizer(src, str(tmp_path / "tokenizer.json"), vocab_size=4096)
    make_shards(src, str(tmp_path / "tokenizer.json"), str(tmp_path / "shards"), val_fraction=0.1)
    text = (ROOT / "recipes" / "configs" / "tiny-cpu.yaml").read_text().replace("runs/demo", str(tmp_path))
    cfg = yaml.safe_load(text)
    cfg.update(run_dir=str(tmp_path / "pretrain"), wandb=False, val_every=40, checkpoint_every=40)
    cfg["trainer"]["max_steps"] = 40
    cfg["trainer"]["log_every_n_steps"] = 1
    cfg["model"]["warmup_steps"] = 5
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    run_recipe(tmp_path / "cfg.yaml", timeout=900)
    losses = losses_by_step(tmp_path / "pretrain")
    first, last = losses[0], sum(losses[s] for s in range(35, 40)) / 5
    assert first > 7.5 and last < first - 2.0, (first, last)
