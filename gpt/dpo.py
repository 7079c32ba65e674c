"""DPOModule: direct preference optimization against a frozen reference whose log-probs are cached once.

    python -m recipes.dpo --config recipes/configs/dpo-tiny-cpu.yaml --init_from runs/demo/sft/checkpoints/last.ckpt
    module = DPOModule(model_config={...}, beta=0.1, loss_type="sigmoid")     # or loss_type="ipo"

The policy is gpt.model.GPT (self.model, started from --init_from); batches are gpt.pair_data's
(B pairs as 2B rows, chosen first). Per pair, with summed reply log-probs (gpt.objectives):
    h = (log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r))
and gpt.objectives.dpo_loss: `sigmoid` -log sigmoid(beta h) (optionally label-smoothed) or
`ipo` (h - 1/(2 beta))^2 on reply-length-averaged log-probs (as TRL does). The per-pair losses
are summed and divided by the pairs of the global batch (gpt.pair_module).

The reference. The reference model is the policy's own starting weights (the --init_from
checkpoint), so it is never a second model in memory: at the start of a fresh run, before the
first step (`on_train_start`, after any checkpoint restore), the policy computes log ref(y) of
every train pair the run will read and of every validation pair — under no_grad, in eval mode,
with LoRA adapters switched off — and keeps them in a table indexed by `pair_index`
(`reference`, two fp32 numbers per pair). Each rank computes a 1/W share of the pairs, in the
same number of forward calls on every rank (a ZeRO-3 forward needs every rank), and one
all-reduce gives every rank the whole table. Training then reads the table: one forward per
step (the policy's), not two. The table is saved in every checkpoint
(checkpoint["dpo_reference"], keyed to the data), so a resume never recomputes it and never
computes it from trained weights; a resumed checkpoint without it is refused in one line.
Under ZeRO-3 the reference therefore lives where the policy lives (sharded), and only before
the first step.

Logged per optimizer step under TRL's names: train/loss, rewards/chosen, rewards/rejected
(beta times the log-ratio to the reference, means over the global batch), rewards/margins,
rewards/accuracies (share of pairs with chosen reward > rejected), logps/chosen and
logps/rejected (the policy's summed reply log-probs: when both fall, DPO is pushing the
rejected reply down faster than the chosen one up, the known failure). The same at each
validation under val/ (val/loss, val/rewards/chosen, ...). Held-out exact-match through
generation comes from a callback (gpt.chat_eval.ChatEval, as in recipes/configs/dpo-tiny-cpu.yaml).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Optional

import torch
from lightning.pytorch.utilities import rank_zero_info

from gpt.lora import LoRAMixin
from gpt.objectives import IGNORE_INDEX, dpo_loss, selected_sequence_logprobs
from gpt.pair_data import PairRows
from gpt.pair_module import PairModule

LOSS_TYPES = ("sigmoid", "ipo")


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """peft LoRA layers compute their base layer only (the reference of a LoRA policy); no-op without peft layers."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # no peft, so no adapters
        yield
        return
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)


class DPOModule(LoRAMixin, PairModule):
    """DPO / IPO on preference pairs; see the module docstring.

    Args:
        preset, model_config, tokenizer, lr, weight_decay, betas, eps, schedule, warmup_steps,
            min_lr_ratio, decay_fraction, compile: as gpt.lm.CausalLMModule (model_config must
            describe the --init_from checkpoint's shape).
        beta: the strength of the pull toward the reference (DPO's beta; IPO's target is 1/(2 beta)).
        loss_type: sigmoid (DPO) or ipo.
        label_smoothing: sigmoid only: the assumed share of flipped labels (conservative DPO); 0 = plain DPO.
        rpo_alpha: weight of the chosen reply's mean token NLL added to each pair's loss (RPO, Pang et
            al. 2024; TRL's rpo_alpha): keeps log p(chosen) from falling with log p(rejected); 0 = off.
        reference_batch_size: pairs per forward while caching the reference log-probs
            (default: data.micro_batch_size).
        lora_r, lora_alpha, lora_dropout, lora_targets: LoRA as in gpt.sft.SFTModule (0 = full
            fine-tuning); the reference is then the base weights (the adapters start at zero).
    """

    STATS = ("loss", "chosen", "rejected", "accuracy", "logps_chosen", "logps_rejected", "nll")

    def __init__(self, preset: str = "tiny", model_config: Optional[dict[str, Any]] = None,
                 tokenizer: Optional[str] = None, lr: float = 1e-5, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, schedule: str = "cosine",
                 warmup_steps: int = 10, min_lr_ratio: float = 0.1, decay_fraction: float = 0.2,
                 compile: bool = False, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 rpo_alpha: float = 0.0, reference_batch_size: Optional[int] = None, lora_r: int = 0,
                 lora_alpha: float = 16.0, lora_dropout: float = 0.0, lora_targets: Optional[list[str]] = None):
        super().__init__(preset=preset, model_config=model_config, tokenizer=tokenizer, lr=lr,
                         weight_decay=weight_decay, betas=betas, eps=eps, schedule=schedule,
                         warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio, decay_fraction=decay_fraction,
                         compile=compile)
        if not beta > 0:
            raise ValueError(f"model.beta must be > 0, got {beta}")
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"model.loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
        if not 0.0 <= label_smoothing < 0.5 or (label_smoothing and loss_type != "sigmoid"):
            raise ValueError(f"model.label_smoothing must be in [0, 0.5) and only with loss_type sigmoid, "
                             f"got {label_smoothing} with {loss_type}")
        if not rpo_alpha >= 0:
            raise ValueError(f"model.rpo_alpha must be >= 0, got {rpo_alpha}")
        self.init_lora(lora_r, lora_alpha, lora_dropout, lora_targets)
        if reference_batch_size is not None and reference_batch_size < 1:
            raise ValueError(f"model.reference_batch_size must be >= 1, got {reference_batch_size}")
        self.reference: dict[str, torch.Tensor] = {}  # split -> (pairs, 2) fp32: log ref(chosen), log ref(rejected)
        self.reference_data: Optional[str] = None  # the data the table belongs to

    # ---- log-probs ----------------------------------------------------------------------
    def reply_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(2B,) summed (sigmoid) or mean (ipo) reply log-probs of the batch's rows under self.model."""
        # The LM head runs at the reply positions only (a demo reply is ~7% of a pair's tokens).
        labels = batch["labels"]
        seq, col = (labels != IGNORE_INDEX).nonzero(as_tuple=True)  # row-major, as selected_sequence_logprobs reads
        rows = batch["row_index"][seq] if "row_index" in batch else seq
        logp = selected_sequence_logprobs(self.batch_logits(batch, select=(rows, col)), labels)
        if self.hparams.loss_type == "ipo":
            logp = logp / (batch["labels"] != IGNORE_INDEX).sum(-1).clamp(min=1)
        return logp

    def pair_stats(self, batch: dict[str, torch.Tensor], split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        policy = self.reply_logps(batch)
        ref = self.reference[split].to(policy.device)[batch["pair_index"]]
        pc, pr = policy.chunk(2)
        hp = self.hparams
        losses, rc, rr = dpo_loss(pc, pr, ref[:, 0], ref[:, 1], hp.beta, hp.loss_type, hp.label_smoothing)
        # The chosen reply's mean token NLL (ipo's log-probs are already per-token means).
        tokens = (batch["labels"].chunk(2)[0] != IGNORE_INDEX).sum(-1).clamp(min=1)
        nll = -(pc if hp.loss_type == "ipo" else pc / tokens)
        if hp.rpo_alpha:
            losses = losses + hp.rpo_alpha * nll
        stats = torch.stack([losses.detach().sum(), rc.sum(), rr.sum(), (rc > rr).float().sum(),
                             pc.detach().sum(), pr.detach().sum(), nll.detach().sum()])
        return losses, stats

    def metrics(self, sums: list[float], pairs: float, prefix: str) -> dict[str, float]:
        loss, chosen, rejected, acc, lc, lr, nll = (s / pairs for s in sums)
        p = "" if prefix == "train" else f"{prefix}/"
        return {f"{prefix}/loss": loss, f"{p}rewards/chosen": chosen, f"{p}rewards/rejected": rejected,
                f"{p}rewards/margins": chosen - rejected, f"{p}rewards/accuracies": acc,
                f"{p}logps/chosen": lc, f"{p}logps/rejected": lr, f"{prefix}/nll_loss": nll}

    # ---- the reference table ------------------------------------------------------------
    def on_train_start(self) -> None:
        self.ensure_reference()

    def on_validation_start(self) -> None:
        self.ensure_reference()

    def _data_key(self) -> str:
        dm = self.trainer.datamodule
        from gpt.sft_data import data_sha256

        return data_sha256(dm.manifest)

    def ensure_reference(self) -> None:
        """Compute the reference table if this run has none (a fresh run, before any step)."""
        dm = self.trainer.datamodule
        if dm.train is None:
            dm.setup("fit")
        key = self._data_key()
        if self.reference and self.reference_data == key:
            return
        if self.trainer.global_step > 0:
            raise ValueError("this checkpoint holds no reference log-probs for this data (checkpoint['dpo_reference']): "
                             "the reference is the policy's starting weights, which a resumed run no longer has; "
                             "start a new DPO run with --init_from")
        total, n = self.trainer.max_steps * dm.global_batch_size, len(dm.train)
        # Only the pairs this run reads (all of them from the first full epoch on).
        needed = list(range(n)) if total >= n else sorted({dm.train.pair_of(i) for i in range(total)})
        self.reference = {"train": self._reference_logps(PairRows(dm.train.pairs, seed=None), needed),
                          "val": self._reference_logps(dm.val, list(range(len(dm.val))))}
        self.reference_data = key

    @torch.no_grad()
    def _reference_logps(self, rows: PairRows, needed: list[int]) -> torch.Tensor:
        """(len(rows), 2) log ref(chosen), log ref(rejected); NaN for pairs not in `needed`."""
        dm, strategy = self.trainer.datamodule, self.trainer.strategy
        rank, world = self.trainer.global_rank, self.trainer.world_size
        bs = self.hparams.reference_batch_size or dm.micro_batch_size
        mine = needed[rank::world]
        calls = math.ceil(math.ceil(len(needed) / world) / bs)  # the same on every rank
        table = torch.zeros(len(rows), 2, dtype=torch.float64, device=self.device)
        seen = torch.zeros(len(rows), dtype=torch.float64, device=self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            with adapters_disabled(self.model), self.trainer.precision_plugin.forward_context():
                for c in range(calls):
                    ids = mine[c * bs:(c + 1) * bs]
                    batch = dm.collate([rows[i] for i in (ids or needed[:1])])  # a rank out of pairs still calls
                    batch = {k: v.to(self.device) for k, v in batch.items()}
                    logp = self.reply_logps(batch).double()
                    if ids:
                        idx = torch.tensor(ids, device=self.device)
                        table[idx] = torch.stack(logp.chunk(2), dim=1)
                        seen[idx] = 1.0
        finally:
            self.model.train(was_training)
        table, seen = strategy.reduce(table, reduce_op="sum"), strategy.reduce(seen, reduce_op="sum")
        table[seen == 0] = float("nan")
        rank_zero_info(f"DPO reference: log-probs of {len(needed):,} pairs cached ({calls} forward calls per rank)")
        return table.float().cpu()

    # ---- checkpoints --------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.reference:
            checkpoint["dpo_reference"] = {"data": self.reference_data, **self.reference}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        ref = checkpoint.get("dpo_reference")
        if isinstance(ref, dict):
            self.reference_data = ref.get("data")
            self.reference = {k: v for k, v in ref.items() if isinstance(v, torch.Tensor)}
