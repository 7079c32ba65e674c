"""SFT recipe: gpt.sft.SFTModule on gpt.sft_data.SFTDataModule, with the shared run shape.

    python -m recipes.sft --config recipes/configs/sft-tiny-cpu.yaml \\
        --init_from runs/demo/pretrain/checkpoints/last.ckpt          # a new run from pretrained weights
    python -m recipes.sft --config recipes/configs/sft-tiny-cpu.yaml --ckpt_path last      # resume it
    python -m recipes.sft --config recipes/configs/sft-tiny-cpu.yaml --model.lora_r 8 \\
        --group demo-lora --init_from runs/demo/pretrain/checkpoints/last.ckpt          # LoRA instead
    python -m recipes.sft --help                                                         # every key

Run directory, checks, resume, W&B and progress lines: recipes/cli.py.
"""
from __future__ import annotations

from typing import Optional

from gpt.sft import SFTModule
from gpt.sft_data import SFTDataModule
from recipes.cli import GPTCLI, run


def main(args: Optional[list[str]] = None) -> GPTCLI:
    return run(SFTModule, SFTDataModule, stage="sft", args=args)


if __name__ == "__main__":
    main()
