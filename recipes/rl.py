"""RL recipe: gpt.rl.RLModule (GRPO or PPO) on gpt.prompt_data.PromptDataModule, with the shared run shape.

    python -m recipes.rl --config recipes/configs/rl-tiny-cpu.yaml                  # GRPO, verifiable reward
    python -m recipes.rl --config recipes/configs/rl-ppo-tiny-cpu.yaml              # PPO against the reward model
    python -m recipes.rl --config recipes/configs/rl-tiny-cpu.yaml --ckpt_path last # resume it
    python -m recipes.rl --config C --init_from runs/demo/sft/checkpoints/last.ckpt # policy + reference from SFT
    srun python -m recipes.rl --config CFG --trainer.num_nodes N --trainer.devices G --ckpt_path last

One training step is one rollout (sample, score, learn); trainer.max_steps counts optimizer steps,
model.ppo_epochs x model.num_minibatches per rollout. Run directory, checks, resume, W&B and progress
lines: recipes/cli.py.
"""
from __future__ import annotations

import warnings
from typing import Optional

from gpt.prompt_data import PromptDataModule
from gpt.rl import RLModule
from recipes.cli import GPTCLI, run

# Lightning's advice for GANs: our checkpoints are taken between rollouts, where there is no
# "pre-optimization state" to keep.
warnings.filterwarnings("ignore", message=".*ModelCheckpoint with manual optimization.*")


def main(args: Optional[list[str]] = None) -> GPTCLI:
    return run(RLModule, PromptDataModule, stage="rl", args=args)


if __name__ == "__main__":
    main()
