"""Reward model recipe: gpt.reward.RewardModule on gpt.pair_data.PairDataModule, with the shared run shape.

    python -m recipes.reward --config recipes/configs/reward-tiny-cpu.yaml              # the demo's (from its SFT)
    python -m recipes.reward --config CFG --init_from runs/x/sft/checkpoints/last.ckpt   # from any checkpoint kind
    python -m recipes.reward --config CFG --ckpt_path last                               # resume
    gpt score --checkpoint runs/demo/reward/checkpoints/last.ckpt --prompt "..." --response "..."

Run directory, checks, resume, W&B and progress lines: recipes/cli.py. The model, loss and
metrics: gpt/reward.py.
"""
from __future__ import annotations

from typing import Optional

from gpt.pair_data import PairDataModule
from gpt.reward import RewardModule
from recipes.cli import GPTCLI, run


def main(args: Optional[list[str]] = None) -> GPTCLI:
    return run(RewardModule, PairDataModule, stage="reward", args=args)


if __name__ == "__main__":
    main()
