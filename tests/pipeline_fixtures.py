"""The real pipeline (recipes/configs/pipeline-tiny-cpu.yaml), shrunk to seconds per stage for tests.

    cfg = shrunk_pipeline(tmp_path / "pipe")          # a dict: write it as YAML for recipes.pipeline
    cfg = shrunk_pipeline(d, pretrain_steps=60, slurm=True)

Every recipe stage gets the same tiny model shape (each post-training stage starts `--init_from`
the one before it, so the shapes must agree) and a few steps; the demo task and its pairs are small; evaluations use a few rows; the
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
        recipe = stage.get("recipe")
        if recipe:  # one small shape for every stage (each starts from the one before); block_size stays 256
            stage["args"] += [*SHAPE, "--trainer.log_every_n_steps", 1, "--print_every", 1,
                              "--trainer.callbacks", KEEP_CALLBACKS]
        if recipe == "pretrain":
            stage["args"] += ["--data.micro_batch_size", 4, "--data.val_windows", 4,
                              "--trainer.max_steps", pretrain_steps, "--val_every", 6, "--checkpoint_every", 4]
            if slurm:  # the two nodes of the test cluster, one process each
                stage["sbatch"] = ["--nodes=2", "--ntasks-per-node=1"]
                stage["args"] += ["--trainer.strategy", "ddp"]
        elif recipe == "sft":
            stage["args"] += ["--trainer.max_steps", 6, "--val_every", 3, "--checkpoint_every", 3,
                              "--data.micro_batch_size", 4, "--data.val_examples", 8]
        elif recipe in ("reward", "dpo"):
            stage["args"] += ["--trainer.max_steps", 4, "--val_every", 2, "--checkpoint_every", 2,
                              "--data.micro_batch_size", 2, "--data.val_pairs", 8]
        elif recipe == "rl":
            stage["args"] += ["--trainer.max_steps", 3, "--val_every", 3, "--checkpoint_every", 3,
                              "--model.group_size", 2, "--model.max_new_tokens", 8, "--model.table_rows", 0,
                              "--data.micro_batch_size", 2, "--data.val_examples", 8]
            if slurm:  # RL across the two nodes too: rollouts per rank, one optimizer step over both
                stage["sbatch"] = ["--nodes=2", "--ntasks-per-node=1"]
                stage["args"] += ["--trainer.strategy", "ddp"]
        for cmd in stage.get("run", []):
            if "gpt.evaluate" in cmd:
                _set(cmd, "--n", 8)
                _set(cmd, "--max_new_tokens", 8)
            if "eval" in cmd and "gpt" in cmd:
                _set(cmd, "--windows", 4)
            if "sample" in cmd or "chat" in cmd:
                _set(cmd, "--max_new_tokens", 16 if "sample" in cmd else 8)
            if "data_prep.make_demo_task" in cmd:
                _set(cmd, "--train", 400)
                _set(cmd, "--val", 60)
                _set(cmd, "--post", 200)
                _set(cmd, "--dev", 60)
            if "data_prep.make_demo_pairs" in cmd:
                for option, value in (("--train_prompts", 24), ("--val_prompts", 8), ("--dev_prompts", 6), ("--samples", 2),
                                      ("--max_new_tokens", 8), ("--pairs_per_prompt", 1)):
                    _set(cmd, option, value)
    return cfg


def write_pipeline(cfg: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
