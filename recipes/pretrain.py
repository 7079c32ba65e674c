"""Pretraining recipe: gpt.lm.CausalLMModule on gpt.data.PretrainDataModule, with the shared run shape.

    python -m recipes.pretrain --config recipes/configs/tiny-cpu.yaml                  # the CPU demo
    python -m recipes.pretrain --config recipes/configs/tiny-cpu.yaml --ckpt_path last # resume it
    python -m recipes.pretrain --config recipes/configs/tiny-cpu.yaml --print_config   # every setting
    python -m recipes.pretrain --help                                                  # every key, documented
    srun python -m recipes.pretrain --config CFG --trainer.num_nodes N --trainer.devices G --ckpt_path last

Run directory, checks, resume, W&B and progress lines: recipes/cli.py.
"""
from __future__ import annotations

from typing import Optional

from gpt.data import PretrainDataModule
from gpt.lm import CausalLMModule
from recipes.cli import GPTCLI, run


def main(args: Optional[list[str]] = None) -> GPTCLI:
    return run(CausalLMModule, PretrainDataModule, stage="pretrain", args=args)


if __name__ == "__main__":
    main()
