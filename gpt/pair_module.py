"""PairModule: what the preference stages (reward model, DPO) share on gpt.pair_data batches.

    class RewardModule(PairModule):
        STATS = ("loss", "accuracy", ...)                  # names of the per-pair sums pair_stats returns
        def pair_stats(self, batch, split): return losses, stats  # (B,) losses, (len(STATS),) per-pair sums
        def metrics(self, sums, pairs, prefix): ...        # sums over the global batch -> logged values

A gpt.lm.CausalLMModule (the model, optimizer, schedule, checkpoint metadata, --init_from of the
recipes) whose batches are B preference pairs as 2B rows. Loss normalization as in gpt/lm.py:
each micro-batch returns sum(pair losses) * A * W / (pairs in the global batch), so the
gradient is the mean over the global batch's pairs whatever the micro-batch split and world
size. The per-pair sums of a step (or of a validation) are summed over micro-batches and ranks
in one reduce, then turned into metrics: exact means over the global batch (or the whole
validation set), not means of per-rank means.
"""
from __future__ import annotations

import torch

from gpt.lm import CausalLMModule, total_grad_norm


class PairModule(CausalLMModule):
    STATS: tuple[str, ...] = ("loss",)

    def _zeros(self) -> torch.Tensor:
        return torch.zeros(len(self.STATS) + 1, dtype=torch.float64, device=self.device)  # + the pair count

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.flops_per_batch is not None:
            self.flops_per_batch *= 2  # a micro-batch of m pairs is 2m rows
        self._train_sums = self._zeros()
        self._val_sums = self._zeros()
        self._micro_batches = 0  # since the last optimizer step

    # ---- subclasses ---------------------------------------------------------------------
    def pair_stats(self, batch: dict[str, torch.Tensor], split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-pair losses (B,) with grad, per-pair sums (len(STATS),) detached) of a train or val batch."""
        raise TypeError(f"{type(self).__name__} must define pair_stats")

    def metrics(self, sums: list[float], pairs: float, prefix: str) -> dict[str, float]:
        raise TypeError(f"{type(self).__name__} must define metrics")

    # ---- training -----------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        losses, stats = self.pair_stats(batch, "train")
        A, W = self.trainer.accumulate_grad_batches, self.trainer.world_size
        pairs = batch.get("num_pairs_global")
        pairs = losses.numel() * A * W if pairs is None else int(pairs.reshape(-1)[0])
        self._micro_batches += 1
        self._train_sums = self._train_sums.to(losses.device) + torch.cat(
            [stats.double(), torch.tensor([losses.numel()], dtype=torch.float64, device=losses.device)])
        # NonFiniteGuard reads _step_loss: this rank's share of the global mean loss.
        self._step_loss = self._step_loss.to(losses.device) + losses.detach().sum() / pairs
        if "num_targets_global" in batch and batch_idx % A == 0:  # reply tokens of the global batch, once a step
            self.tokens_seen += int(batch["num_targets_global"])
        return losses.sum() * (A * W) / pairs

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Once per optimizer step: the global batch's metrics (one reduce over ranks)."""
        if self._micro_batches < self.trainer.accumulate_grad_batches:
            return  # DeepSpeed accumulates itself: Lightning calls this hook after every micro-batch
        self._micro_batches = 0
        sums = self.trainer.strategy.reduce(self._train_sums, reduce_op="sum").tolist()
        pairs = max(sums[-1], 1.0)
        for k, v in self.metrics(sums[:-1], pairs, "train").items():
            self.log(k, v, on_step=True, prog_bar=k.endswith("loss"), rank_zero_only=True)
        self.log("train/tokens", float(self.tokens_seen), on_step=True, rank_zero_only=True)
        norm = total_grad_norm(self)
        if norm is not None:  # pre-clip norm; DeepSpeed's comes from on_train_batch_end (gpt/lm.py)
            self.log("train/grad_norm", norm, on_step=True, rank_zero_only=True)
        self._train_sums = self._zeros()
        self._step_loss = torch.zeros((), device=self.device)

    # ---- validation ---------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_sums = self._zeros()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        losses, stats = self.pair_stats(batch, "val")
        self._val_sums += torch.cat([stats.double(), torch.tensor([losses.numel()], dtype=torch.float64,
                                                                   device=self._val_sums.device)])

    def on_validation_epoch_end(self) -> None:
        sums = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum").tolist()
        if sums[-1] == 0:
            return
        for k, v in self.metrics(sums[:-1], sums[-1], "val").items():
            self.log(k, v, prog_bar=k in ("val/loss", "val/accuracy"), rank_zero_only=True)
