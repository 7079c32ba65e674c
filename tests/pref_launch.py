"""Launch a tiny reward-model or DPO run with a given strategy (DDP, ZeRO-2/3 through gpt.zero) for the tests.

    python -m tests.pref_launch --stage dpo --strategy zero3 --devices 2 --data PAIRS --tokenizer TOK --out DIR \\
        --steps 6 [--ckpt_path DIR/checkpoints/last.ckpt] [--slow 0.5]

Lightning's launcher starts the other ranks itself (it re-runs this command). Writes DIR/csv
(CSVLogger) and DIR/checkpoints (every --every steps and last).
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

ROOT = Path(__file__).resolve().parents[1]
MODEL = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 128}


class SaveLiveScores(Callback):
    """At the end of fit (rank 0): the reward model's scores of the first val batch, for a loader to match."""

    def __init__(self, path: str):
        self.path = path

    def on_train_end(self, trainer, pl_module) -> None:
        dm = trainer.datamodule
        batch = {k: v.to(pl_module.device) for k, v in dm.collate([dm.val[i] for i in range(4)]).items()}
        with torch.no_grad():
            scores = pl_module.reward_model().score(batch["input_ids"], batch["last_index"], batch["position_ids"],
                                                    batch.get("attn_mask"), batch["row_index"]).cpu()
        if trainer.is_global_zero:
            torch.save(scores, self.path)


class SlowDown(Callback):
    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_train_batch_end(self, *args) -> None:
        time.sleep(self.seconds)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--stage", choices=["dpo", "reward"], required=True)
    p.add_argument("--strategy", default="ddp")
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--data", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--micro_batch_size", type=int, default=2)
    p.add_argument("--accumulate", type=int, default=2)
    p.add_argument("--every", type=int, default=3)
    p.add_argument("--ckpt_path", default=None)
    p.add_argument("--slow", type=float, default=0.0)
    p.add_argument("--loss_type", default="sigmoid")
    a = p.parse_args()
    import gpt.zero  # noqa: F401  (registers the CPU-aware strategies)
    from gpt.dpo import DPOModule
    from gpt.pair_data import PairDataModule
    from gpt.reward import RewardModule
    from gpt.tokenizer import Tokenizer

    L.seed_everything(1234, verbose=False)
    vocab = Tokenizer.from_file(a.tokenizer).vocab_size
    common = dict(model_config={**MODEL, "vocab_size": vocab}, tokenizer=a.tokenizer, lr=1e-2, warmup_steps=2)
    module = (DPOModule(beta=0.5, loss_type=a.loss_type, **common) if a.stage == "dpo"
              else RewardModule(margin=0.5, **common))
    dm = PairDataModule(a.data, a.tokenizer, block_size=128, micro_batch_size=a.micro_batch_size, seed=7, val_pairs=8)
    strategy = a.strategy
    if strategy.startswith("zero"):
        from gpt.zero import ZeroStrategy

        import json

        config = json.loads((ROOT / "recipes" / "deepspeed" / f"{a.strategy}.json").read_text())
        # Partition every parameter, however small (the tiny model's all fall under the JSON's threshold).
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        strategy = ZeroStrategy(config=config)
    ckpt = ModelCheckpoint(dirpath=os.path.join(a.out, "checkpoints"), every_n_train_steps=a.every, save_last=True,
                           save_top_k=-1)
    trainer = L.Trainer(accelerator="cpu", devices=a.devices, strategy=strategy, precision="32-true",
                        max_steps=a.steps, accumulate_grad_batches=a.accumulate, gradient_clip_val=1.0,
                        val_check_interval=a.steps * a.accumulate, check_val_every_n_epoch=None,
                        num_sanity_val_steps=0, log_every_n_steps=1, use_distributed_sampler=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=a.out,
                        logger=CSVLogger(a.out, name="csv"),
                        callbacks=[ckpt] + ([SlowDown(a.slow)] if a.slow else [])
                        + ([SaveLiveScores(os.path.join(a.out, "scores.pt"))] if a.stage == "reward" else []))
    torch.set_num_threads(1)
    trainer.fit(module, dm, ckpt_path=a.ckpt_path)


if __name__ == "__main__":
    main()
