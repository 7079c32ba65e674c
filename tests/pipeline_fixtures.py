"""The real pipeline (recipes/configs/pipeline-tiny-cpu.yaml), shrunk to seconds per stage for tests.

    cfg = shrunk_pipeline(tmp_path / "pipe")          # a dict: write it as YAML for recipes.pipeline
    cfg = shrunk_pipeline(d, pretrain_steps=60, slurm=True)

Every recipe stage gets the same tiny model shape (each post-training stage starts `--init_from`
the one before it, so the shapes must agree) and a few steps; evaluations use a few rows; the
commands themselves, their order and what each stage reads are the real pipeline's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "recipes" / "configs" / "pipeline-tiny-cpu.yaml"
SHAPE = ["--model.model_config.n_layer", 2, "--model.model_config.n_head", 2, "--model.model_config.n_embd", 64]
# no sample tables; braces doubled: pipeline strings are templates
KEEP_CALLBACKS = "[{{class_path: gpt.callbacks.NonFiniteGuard, init_args: {{action: stop}}}}]"


def _set(words: list, option: str, value: Any) -> None:
    """Replace the value after `option` in a command (or append both)."""
    if option in words:
        words[words.index(option) + 1] = value
    else:
        words += [option, value]


def shrunk_pipeline(out: Path, pretrain_steps: int = 12, slurm: bool = False) -> dict[str, Any]:
    cfg = yaml.safe_load(PIPELINE.read_text())
    cfg["dir"] = str(out)
    for stage in cfg["stages"]:
        if stage.get("recipe") == "pretrain":
            stage["args"] += [*SHAPE, "--model.model_config.block_size", 64, "--data.block_size", 64,
                              "--data.micro_batch_size", 4, "--data.val_windows", 4,
                              "--trainer.max_steps", pretrain_steps, "--trainer.log_every_n_steps", 1,
                              "--print_every", 1, "--val_every", 6, "--checkpoint_every", 4,
                              "--trainer.callbacks", KEEP_CALLBACKS]
            if slurm:  # the two nodes of the test cluster, one process each
                stage["sbatch"] = ["--nodes=2", "--ntasks-per-node=1"]
                stage["args"] += ["--trainer.strategy", "ddp"]
        for cmd in stage.get("run", []):
            if "gpt.evaluate" in cmd:
                _set(cmd, "--n", 8)
                _set(cmd, "--max_new_tokens", 8)
            if "eval" in cmd and "gpt" in cmd:
                _set(cmd, "--windows", 4)
            if "sample" in cmd:
                _set(cmd, "--max_new_tokens", 16)
    return cfg


def write_pipeline(cfg: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
