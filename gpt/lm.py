"""CausalLMModule: next-token pretraining of gpt.model.GPT as a LightningModule.

    python -m recipes.pretrain fit --config recipes/configs/tiny-cpu.yaml     # the usual way in
    module = CausalLMModule(preset="tiny", model_config={"n_layer": 4}, lr=3e-3, warmup_steps=20)

The module owns the model (`self.model = GPT(config)`, so checkpoint keys start with `model.`),
the loss (gpt.objectives) and the optimizer (gpt.optim); parallelism, precision and gradient
clipping come from the Trainer. Checkpoints carry `checkpoint["gpt"] = {"model_config",
"tokenizer"}` for `gpt sample`, and plain-data hyperparameters (torch.load(weights_only=True)).

What the run shape (recipes/cli.py) asks of a stage's module, and this one provides:
`run_identity()` (what a resume must keep: model shape, optimizer settings restored from the
optimizer state), `init_from` (a checkpoint whose weights configure_model loads, set by
`--init_from` on a fresh run), `flops_per_batch` and `batch_tokens(batch)` for throughput.

Loss normalization. The gradient must be that of (sum of token losses over the global batch) /
(target tokens in the global batch), whatever the micro-batch split and world size. Lightning
divides the returned loss by accumulate_grad_batches and DDP averages gradients over ranks, so
each micro-batch returns loss_sum * A * W / n_global. n_global comes from the batch
("num_targets_global", for data with variable target counts such as SFT) or, when absent, is
this micro-batch's count * A * W (exact when every micro-batch has the same count, as here).
"""
from __future__ import annotations

import math
from typing import Any, Literal, Optional

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from gpt.config import PRESETS, GPTConfig
from gpt.flops import flops_per_token
from gpt.model import GPT
from gpt.objectives import causal_lm_loss
from gpt.optim import LRSchedule, Schedule, StepScheduler, build_optimizer
from gpt.run import load_initial_weights, model_identity
from gpt.tokenizer import Tokenizer

Preset = Literal[tuple(PRESETS)]  # type: ignore[valid-type]  # the CLI lists and checks the names


def total_grad_norm(module: torch.nn.Module) -> Optional[torch.Tensor]:
    """L2 norm of all gradients held in .grad (None when the strategy keeps them elsewhere)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads, foreach=True) if grads else None


class CausalLMModule(L.LightningModule):
    """GPT + causal-LM loss + AdamW with warmup/cosine or WSD.

    Args:
        preset: the gpt.config preset the model starts from (tiny, tiny-llama, gpt2-124m,
            gpt2-350m, gpt2-774m, gpt2-1.5b, llama-1b, llama-7b); model_config overrides its fields.
        model_config: GPTConfig fields over the preset: flavour (gpt2|llama), vocab_size,
            block_size, n_layer, n_head, n_kv_head, n_embd, intermediate_size, bias,
            tie_embeddings, norm_eps, rope_theta, qk_norm, dropout, init_std,
            activation_checkpointing, vocab_multiple. E.g. {n_layer: 4, n_embd: 192}.
        tokenizer: the tokenizer.json stored in every checkpoint (linked from data.tokenizer).
        lr: peak AdamW learning rate (may change on resume: the schedule follows).
        weight_decay: AdamW decoupled weight decay on matmul weights (none on norms, biases,
            embeddings); fixed for the life of a run (it lives in the optimizer state).
        betas: AdamW (beta1, beta2); fixed for the life of a run.
        eps: AdamW epsilon; fixed for the life of a run.
        schedule: cosine (warmup, cosine down to min_lr_ratio x lr at trainer.max_steps), wsd
            (warmup, flat, linear decay over the last decay_fraction) or constant (warmup, flat).
        warmup_steps: optimizer steps of linear warmup from lr / warmup_steps to lr.
        min_lr_ratio: the final lr as a fraction of lr (cosine and wsd).
        decay_fraction: wsd only: the fraction of trainer.max_steps spent decaying.
        compile: torch.compile the model (worth it on GPUs; ~35 s first compile on CPU).
    """

    init_from: Optional[str] = None  # set by the recipe (--init_from) on a fresh run; see configure_model
    init_from_reward_model_ok = False  # a reward model's GPT is no language model (gpt.checkpoint.load_model)

    def __init__(self, preset: Preset = "tiny", model_config: Optional[dict[str, Any]] = None,
                 tokenizer: Optional[str] = None, lr: float = 3e-4, weight_decay: float = 0.1,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, schedule: Schedule = "cosine",
                 warmup_steps: int = 100, min_lr_ratio: float = 0.1, decay_fraction: float = 0.2,
                 compile: bool = False):
        super().__init__()
        # Stored in checkpoints; the recipe logs the whole resolved config itself (logger=False).
        self.save_hyperparameters(logger=False)
        self.config = GPTConfig.from_preset(preset, **(model_config or {}))
        self.tokenizer_json = Tokenizer.from_file(tokenizer).to_str() if tokenizer else None
        self.model: Optional[GPT] = None
        self.tokens_seen = 0
        self.flops_per_batch: Optional[float] = None  # read by ThroughputMonitor
        self._step_loss = torch.zeros(())  # this rank's share of the global-batch mean loss
        self._step_targets = 0
        self._val = torch.zeros(3, dtype=torch.float64)  # loss sum (nats), targets, bytes

    # ---- model --------------------------------------------------------------------------
    def configure_model(self) -> None:
        # Built here, not in __init__: sharded strategies (ZeRO-3) build it inside their context.
        if self.model is None:
            self.model = GPT(self.config)
            if self.init_from:  # a new run from another run's weights: before any strategy wraps them
                load_initial_weights(self.model, self.init_from, reward_model_ok=self.init_from_reward_model_ok)
            if self.hparams.compile:
                self.model.compile()  # in place: state_dict keys keep the `model.` prefix

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        T = getattr(dm, "block_size", self.config.block_size)
        if T > self.config.block_size:
            raise ValueError(f"data.block_size {T} is longer than the model's block_size {self.config.block_size}")
        m = getattr(dm, "micro_batch_size", 1)
        # Per device and micro-batch: Lightning's Throughput multiplies by world size itself.
        self.flops_per_batch = flops_per_token(self.config, T) * m * T

    @staticmethod
    def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].numel()

    def run_identity(self) -> dict[str, Any]:
        """What a resumed run must share with its checkpoint (gpt.run): shapes and the optimizer
        settings a restored optimizer state would silently keep."""
        hp = self.hparams
        return {**model_identity(self.config.to_dict()), "model.weight_decay": hp.weight_decay,
                "model.betas": list(hp.betas), "model.eps": hp.eps}

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def batch_logits(self, batch: dict[str, torch.Tensor], select: Optional[Any] = None) -> torch.Tensor:
        # Packed SFT rows bring restarting positions and a block-causal mask; pretraining windows neither.
        return self.model(batch["input_ids"], position_ids=batch.get("position_ids"), attn_mask=batch.get("attn_mask"),
                          select=select)

    def batch_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss, target count) of a micro-batch; a stage with sparse targets may score only those."""
        return causal_lm_loss(self.batch_logits(batch), batch["labels"])

    # ---- training -----------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss_sum, n = self.batch_loss(batch)
        A, W = self.trainer.accumulate_grad_batches, self.trainer.world_size
        n_global = batch.get("num_targets_global")
        n_global = n * A * W if n_global is None else n_global.reshape(-1)[0]
        n_global = n_global.clamp(min=1)
        self._step_loss = self._step_loss.to(loss_sum.device) + loss_sum.detach() / n_global
        self._step_targets += n_global
        return loss_sum * (A * W) / n_global

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Once per optimizer step, after all micro-batches' backward: log the step's metrics."""
        strategy = self.trainer.strategy
        loss = strategy.reduce(self._step_loss, reduce_op="sum")
        # n_global was added once per micro-batch; every micro-batch carries the same global count.
        self.tokens_seen += int(self._step_targets) // self.trainer.accumulate_grad_batches
        self.log("train/loss", loss, on_step=True, prog_bar=True, rank_zero_only=True)
        self.log("train/tokens", float(self.tokens_seen), on_step=True, rank_zero_only=True)
        norm = total_grad_norm(self.model)
        if norm is not None:  # pre-clip norm; clipping (trainer.gradient_clip_val) runs after this hook
            self.log("train/grad_norm", norm, on_step=True, rank_zero_only=True)
        self._step_loss = torch.zeros((), device=loss.device)
        self._step_targets = 0

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # DeepSpeed keeps gradients in its own (partitioned) buffers, so on_before_optimizer_step
        # found none in .grad: log the pre-clip global norm DeepSpeed computed in this step.
        engine = getattr(self.trainer.strategy, "deepspeed_engine", None)
        if engine is None or (batch_idx + 1) % self.trainer.accumulate_grad_batches:
            return
        norm = engine.get_global_grad_norm()
        if norm is not None:
            self.log("train/grad_norm", float(norm), on_step=True, rank_zero_only=True)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        # Every parameter of the module: a stage may add heads beside self.model (gpt/reward.py).
        opt = build_optimizer(self, lr=hp.lr, weight_decay=hp.weight_decay, betas=hp.betas, eps=hp.eps,
                              cpu_offload=getattr(self.trainer.strategy, "offloads_optimizer", False),
                              fused=getattr(self.trainer.precision_plugin, "scaler", None) is None)
        schedule = LRSchedule(hp.schedule, hp.warmup_steps, max(1, self.trainer.max_steps), hp.min_lr_ratio,
                              hp.decay_fraction)
        # StepScheduler: on resume only the step comes from the checkpoint; lr and schedule from the config.
        return {"optimizer": opt, "lr_scheduler": {"scheduler": StepScheduler(opt, schedule), "interval": "step"}}

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: Any = None,
                                    gradient_clip_algorithm: Optional[str] = None) -> None:
        # Lightning's autocast plugin refuses to clip for a fused optimizer, fearing a GradScaler's
        # scaled gradients; under bf16 autocast there is no scaler (the gradients are the real ones),
        # so clip them here exactly as Lightning's fp32 path does. Otherwise Lightning's own clipping.
        plugin = self.trainer.precision_plugin
        if (gradient_clip_val and type(plugin) is MixedPrecision and plugin.scaler is None
                and gradient_clip_algorithm in (None, "norm")):
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ---- validation ---------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val = torch.zeros(3, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss_sum, n = self.batch_loss(batch)
        nbytes = batch["num_bytes"].sum() if "num_bytes" in batch else torch.zeros((), device=self.device)
        self._val += torch.stack([loss_sum.double(), n.double(), nbytes.double()])

    def on_validation_epoch_end(self) -> None:
        # Sums over every rank's windows, then one division: exact for uneven shards.
        loss_sum, n, nbytes = self.trainer.strategy.reduce(self._val, reduce_op="sum").tolist()
        if n == 0:
            return
        metrics = {"val/loss": loss_sum / n}
        if nbytes > 0:
            metrics["val/bpb"] = loss_sum / math.log(2) / nbytes
        log_at_step(self, metrics)

    # ---- checkpoints --------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # What `gpt sample` and the later stages load: plain data only.
        checkpoint["gpt"] = {"model_config": self.config.to_dict(), "tokenizer": self.tokenizer_json}
        checkpoint["tokens_seen"] = self.tokens_seen

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.tokens_seen = int(checkpoint.get("tokens_seen", 0))


def log_at_step(module: L.LightningModule, metrics: dict[str, float]) -> None:
    """Log validation metrics at the optimizer step (the model after global_step updates, as in
    the checkpoint of that step), not at Lightning's own count, and show them in the progress bar.
    Outside fit (trainer.validate) they are logged the usual way, so validate() returns them."""
    trainer = module.trainer
    fitting = trainer.state.fn == "fit"
    for k, v in metrics.items():
        module.log(k, v, prog_bar=True, logger=not fitting, rank_zero_only=True)
    if fitting and trainer.is_global_zero and not trainer.sanity_checking:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
