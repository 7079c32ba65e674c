"""Pretraining recipe: LightningCLI over gpt.lm.CausalLMModule and gpt.data.PretrainDataModule.

    python -m recipes.pretrain fit --config recipes/configs/tiny-cpu.yaml              # the CPU demo
    python -m recipes.pretrain fit --config recipes/configs/tiny-cpu.yaml --ckpt_path last   # resume
    python -m recipes.pretrain fit --config recipes/configs/tiny-cpu.yaml --print_config     # full config
    srun python -m recipes.pretrain fit --config CFG --trainer.num_nodes N --trainer.devices G \\
        --ckpt_path last                                                               # Slurm (requeue-safe)

Every argument is a typed field of the Trainer, the module or the data module, settable in the
YAML or as `--model.lr 1e-3`-style flags. `--ckpt_path last` resumes from ModelCheckpoint's
last.ckpt, and starts fresh (with a warning) when there is none yet, so a requeued job can
always pass it. W&B runs offline unless the user configured it (WANDB_API_KEY, `wandb login`,
or WANDB_MODE set explicitly).
"""
from __future__ import annotations

import netrc
import os
import sys
import warnings
from typing import Any, Optional

import torch
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.environments import SLURMEnvironment

from gpt.data import PretrainDataModule
from gpt.lm import CausalLMModule

# Our sampler resumes mid-epoch from trainer.global_step (gpt/data.py), which this warning
# (about loaders that cannot) does not know.
warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended.*")
# Lightning 2.6 on torch >= 2.13 warns about its own use of a deprecated torch pytree API.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def wandb_offline_unless_configured() -> None:
    """Offline W&B by default: online only when the user set a key, logged in, or chose WANDB_MODE."""
    if "WANDB_MODE" in os.environ or os.environ.get("WANDB_API_KEY"):
        return
    try:
        logged_in = netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        logged_in = False
    if not logged_in:
        os.environ["WANDB_MODE"] = "offline"


def _num_devices(devices: Any, accelerator: Any) -> Optional[int]:
    if isinstance(devices, int) and devices > 0:
        return devices
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit() and int(devices) > 0:
        return int(devices)
    if isinstance(devices, str) and "," in devices:
        return len([d for d in devices.split(",") if d.strip()])
    # "auto" / -1: every GPU if there are GPUs (and the accelerator allows them), else one CPU process.
    gpu = str(accelerator) in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return torch.cuda.device_count() if gpu else 1


def check_slurm_tasks(devices: Any, num_nodes: int, accelerator: Any = "auto") -> None:
    """Under srun, Slurm's task count must equal devices x num_nodes, or the ranks wait forever."""
    if not SLURMEnvironment.detect():
        return
    ntasks = int(os.environ.get("SLURM_NTASKS", "1"))
    want = _num_devices(devices, accelerator) * int(num_nodes or 1)
    if ntasks != want:
        raise SystemExit(f"Slurm started {ntasks} tasks but the Trainer expects devices x num_nodes = {want}; "
                         f"use --ntasks-per-node=<devices> with --nodes=<num_nodes> (a mismatch hangs at start-up)")


class PretrainCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.tokenizer", "model.tokenizer")  # stored in every checkpoint

    def before_instantiate_classes(self) -> None:
        cfg = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        t = cfg["trainer"]
        check_slurm_tasks(t["devices"], t["num_nodes"], t["accelerator"])


def main(args: Optional[list[str]] = None, run: bool = True) -> PretrainCLI:
    wandb_offline_unless_configured()
    return PretrainCLI(
        CausalLMModule, PretrainDataModule, args=args, run=run,
        # Our batch sampler deals samples to ranks itself (gpt/data.py): no DistributedSampler.
        trainer_defaults={"use_distributed_sampler": False},
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    from gpt.checkpoint import CheckpointError

    try:
        main()
    except CheckpointError as e:  # an unusable or unsafe checkpoint: one line, no traceback
        from lightning.pytorch.utilities.rank_zero import rank_zero_only

        raise SystemExit(f"error: {e}" if rank_zero_only.rank == 0 else 1)  # every rank has the same line
