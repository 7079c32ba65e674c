"""DPO recipe: gpt.dpo.DPOModule on gpt.pair_data.PairDataModule, with the shared run shape.

    python -m recipes.dpo --config recipes/configs/dpo-tiny-cpu.yaml                # the demo's (from its SFT)
    python -m recipes.dpo --config CFG --init_from runs/x/sft/checkpoints/last.ckpt  # from any checkpoint kind
    python -m recipes.dpo --config CFG --model.loss_type ipo --model.beta 0.5        # IPO
    python -m recipes.dpo --config CFG --ckpt_path last                              # resume (reference kept)

Run directory, checks, resume, W&B and progress lines: recipes/cli.py. The loss, the cached
reference log-probs and the metrics: gpt/dpo.py.
"""
from __future__ import annotations

from typing import Optional

from gpt.dpo import DPOModule
from gpt.pair_data import PairDataModule
from recipes.cli import GPTCLI, run


def main(args: Optional[list[str]] = None) -> GPTCLI:
    return run(DPOModule, PairDataModule, stage="dpo", args=args)


if __name__ == "__main__":
    main()
