"""Training callbacks: checkpoints in optimizer steps, per-step metrics and progress lines, a
non-finite-loss guard, sample generations.

    RunCheckpoint, RunMonitor and a progress bar are added by the recipes (recipes/cli.py) to every
    run; the YAML's trainer.callbacks list the optional ones:
      - class_path: gpt.callbacks.NonFiniteGuard          # action: stop | skip
      - class_path: gpt.callbacks.SampleGenerations       # prompts -> W&B table at each validation

RunCheckpoint is Lightning's ModelCheckpoint (every N optimizer steps, keep the newest K, and
last.ckpt); RunMonitor logs train/lr, train/tokens_per_sec and train/mfu with Lightning's
Throughput and prints a plain progress line every N steps when there is no progress bar.
"""
from __future__ import annotations

import datetime
import os
import sys
import time
from typing import Any, Literal, Optional

import lightning as L
import torch
from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info

from gpt.flops import dtype_of_precision, peak_flops
from gpt.generate import generate
from gpt.lm import total_grad_norm
from gpt.tokenizer import Tokenizer


class RunCheckpoint(ModelCheckpoint):
    """Checkpoints every `every_n_steps` optimizer steps (step=N.ckpt), the newest `keep` of them, and last.ckpt.

    Beyond ModelCheckpoint:
    - when this step also validates, the checkpoint is written after the validation, so the
      metrics of every step a checkpoint covers are logged before that checkpoint exists;
    - the final step always gets last.ckpt (ModelCheckpoint may skip it when max_steps is not a
      multiple of the interval);
    - `save_last_now(trainer)` for a checkpoint at once (preemption, slurm/requeue.py);
    - a run directory copied elsewhere resumes with its periodic checkpoints still counted (their
      paths in the restored state are moved to the new folder), so `keep` still prunes them.
    `every_n_steps=0` writes only last.ckpt (at the end and when asked); `keep=-1` keeps all.
    """

    def __init__(self, dirpath: str, every_n_steps: int = 1000, keep: int = 3, val_every: int = 0):
        super().__init__(dirpath=dirpath, filename="{step}", every_n_train_steps=every_n_steps, save_last=True,
                         save_top_k=keep if every_n_steps > 0 else 0, monitor="step", mode="max",
                         enable_version_counter=False)
        self.every_n_steps, self.keep, self.val_every = every_n_steps, keep, val_every
        self._seen_step: Optional[int] = None
        self._saved_step: Optional[int] = None
        self._pending = False

    @property
    def last_path(self) -> str:
        return os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._saved_step = trainer.global_step
        for logger in trainer.loggers:  # whatever is buffered reaches disk before the checkpoint does
            logger.save()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._seen_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step in (self._seen_step, self._saved_step):
            return  # mid gradient accumulation (no optimizer step finished), or saved already (save_last_now)
        self._seen_step = trainer.global_step
        due = self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0
        if (due or self._final(trainer)) and self._validates_now(trainer):
            self._pending = True
            return
        self._save_due(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending:
            self._pending = False
            self._save_due(trainer)
        super().on_validation_end(trainer, pl_module)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._pending:  # the validation did not run after all (e.g. an empty val set)
            self._pending = False
            self._save_due(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending:
            self._pending = False
            self._save_due(trainer)

    def save_last_now(self, trainer: L.Trainer) -> str:
        """Write last.ckpt for the current step (call on every rank); its path."""
        trainer.save_checkpoint(self.last_path, weights_only=False)
        self.last_model_path = self.last_path
        return self.last_path

    def _save_due(self, trainer: L.Trainer) -> None:
        super().on_train_batch_end(trainer, trainer.lightning_module, None, None, 0)
        if self._final(trainer) and self._saved_step != trainer.global_step:
            self.save_last_now(trainer)

    def _validates_now(self, trainer: L.Trainer) -> bool:
        return bool(self.val_every) and trainer.global_step % self.val_every == 0 and trainer.enable_validation

    @staticmethod
    def _final(trainer: L.Trainer) -> bool:
        return 0 < trainer.max_steps <= trainer.global_step

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        old, new = state_dict.get("dirpath"), self.dirpath
        if old and new and old != new:
            def move(p: Any) -> Any:
                return new + p[len(old):] if isinstance(p, str) and p.startswith(old + os.sep) else p
            state_dict = {k: move(v) for k, v in state_dict.items()}
            state_dict["best_k_models"] = {move(k): v for k, v in state_dict.get("best_k_models", {}).items()}
            state_dict["dirpath"] = new
        super().load_state_dict(state_dict)


def _hms(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


class RunMonitor(Callback):
    """Per optimizer step: train/lr, train/tokens_per_sec (all ranks) and train/mfu; progress lines.

    Throughput is Lightning's `Throughput` over the last `window` optimizer steps, timed from the
    first micro-batch of a step to the end of its last (validation and checkpoints excluded). MFU
    is against gpt.flops.peak_flops of the device in the run's precision (Lightning's GPU table,
    measured on CPU). The module provides `flops_per_batch` (per device and micro-batch) and
    optionally `batch_tokens(batch)` (default: the size of batch["input_ids"]).

    With `lines=True` (no progress bar: stdout is a file, as in every Slurm job) rank 0 prints
        step 30/500 | loss 5.1234 | lr 2.95e-03 | 6,123 tokens/s | MFU 55.1% | elapsed 0:00:41 | ETA 0:10:12
    after every `print_every`-th optimizer step and the last one (the loss of that step), and a
    `val after step N: loss ... | bpb ...` line after each validation.
    """

    def __init__(self, print_every: int = 10, lines: bool = True, window: int = 10):
        self.print_every, self.lines, self.window = max(1, print_every), lines, max(2, window)
        self.throughput: Optional[Throughput] = None
        self._seen_step = -1
        self._step_start: Optional[float] = None
        self._train_time, self._steps, self._tokens = 0.0, 0, 0
        self._t0 = self._first_step = 0
        self.tokens_per_sec: Optional[float] = None
        self.mfu: Optional[float] = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            peak = peak_flops(trainer.strategy.root_device, dtype_of_precision(trainer.precision))
            self.throughput = Throughput(available_flops=peak, world_size=trainer.world_size,
                                         window_size=self.window)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0, self._first_step, self._seen_step = time.monotonic(), trainer.global_step, trainer.global_step
        if trainer.is_global_zero:
            params = sum(getattr(p, "ds_numel", p.numel()) for p in pl_module.parameters())
            peak = self.throughput.available_flops if self.throughput else None
            print(f"training steps {trainer.global_step}..{trainer.max_steps}: {params / 1e6:.2f} M parameters, "
                  f"{trainer.world_size} process(es), {trainer.precision}"
                  + (f", device peak {peak / 1e9:,.0f} GFLOP/s" if peak else ""), flush=True)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._step_start is None:
            self._step_start = time.perf_counter()
        self._tokens += self._batch_tokens(pl_module, batch)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        pl_module.log("train/lr", float(optimizer.param_groups[0]["lr"]), on_step=True, rank_zero_only=True)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == self._seen_step:
            return  # mid gradient accumulation
        self._seen_step = trainer.global_step
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        self._train_time += time.perf_counter() - (self._step_start or time.perf_counter())
        self._step_start = None
        self._steps += 1
        self._update_throughput(trainer, pl_module)
        if self.lines and trainer.is_global_zero and (
                trainer.global_step % self.print_every == 0 or trainer.global_step >= trainer.max_steps > 0):
            print(self.progress_line(trainer), flush=True)

    def _update_throughput(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.throughput is None:
            return
        flops = getattr(pl_module, "flops_per_batch", None)
        A = trainer.accumulate_grad_batches
        self.throughput.update(time=self._train_time, batches=self._steps, samples=self._steps,
                               lengths=max(self._tokens, self._steps),
                               flops=flops * A if flops else None)
        m = self.throughput.compute()
        if "device/items_per_sec" in m:
            self.tokens_per_sec = m["device/items_per_sec"] * trainer.world_size
            pl_module.log("train/tokens_per_sec", self.tokens_per_sec, on_step=True, rank_zero_only=True)
        if "device/mfu" in m:
            self.mfu = m["device/mfu"]
            pl_module.log("train/mfu", self.mfu, on_step=True, rank_zero_only=True)

    @staticmethod
    def _batch_tokens(pl_module: L.LightningModule, batch: Any) -> int:
        count = getattr(pl_module, "batch_tokens", None)
        if callable(count):
            return int(count(batch))
        ids = batch.get("input_ids") if isinstance(batch, dict) else None
        return int(ids.numel()) if ids is not None else 0

    def progress_line(self, trainer: L.Trainer) -> str:
        m = trainer.callback_metrics
        step, total = trainer.global_step, trainer.max_steps
        parts = [f"step {step}/{total}"]
        if "train/loss" in m:
            parts.append(f"loss {float(m['train/loss']):.4f}")
        if "train/lr" in m:
            parts.append(f"lr {float(m['train/lr']):.2e}")
        if self.tokens_per_sec is not None:
            parts.append(f"{self.tokens_per_sec:,.0f} tokens/s")
        if self.mfu is not None:
            parts.append(f"MFU {100 * self.mfu:.1f}%")
        elapsed = time.monotonic() - self._t0
        parts.append(f"elapsed {_hms(elapsed)}")
        done = step - self._first_step
        if done > 0 and total > step:
            parts.append(f"ETA {_hms(elapsed / done * (total - step))}")
        return " | ".join(parts)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or (trainer.state.fn == "fit" and not self.lines):
            return
        vals = {k[len("val/"):]: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if vals:
            where = f"val after step {trainer.global_step}" if trainer.state.fn == "fit" else "val"
            print(f"{where}: " + " | ".join(f"{k} {v:.4f}" for k, v in vals.items()), flush=True)


class RunProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar without the noise of an endless epoch: no "Epoch 0", no `v_num`."""

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        super().on_train_epoch_start(trainer)
        self.train_progress_bar.set_description("train")

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


class NonFiniteGuard(Callback):
    """Never train on silently after a NaN/inf loss or gradient.

    Checked once per optimizer step, after every micro-batch's backward and before the update.
    action="stop" raises with the step number; action="skip" drops the update (gradients
    cleared, so AdamW leaves the weights and its moments alone) and logs train/skipped_steps.
    Gradients are already all-reduced here, so every rank takes the same decision.
    """

    def __init__(self, action: Literal["stop", "skip"] = "stop"):
        if action not in ("stop", "skip"):
            raise ValueError(f"action must be 'stop' or 'skip', got {action!r}")
        self.action = action
        self.skipped = 0

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        loss = getattr(pl_module, "_step_loss", torch.zeros(()))
        norm = total_grad_norm(pl_module)
        finite = bool(torch.isfinite(loss)) and (norm is None or bool(torch.isfinite(norm)))
        if finite:
            return
        what = f"loss {float(loss):.4g}, grad norm {float(norm) if norm is not None else float('nan'):.4g}"
        if self.action == "stop":
            raise FloatingPointError(f"non-finite loss or gradient at step {trainer.global_step} ({what}); "
                                     f"stopping (NonFiniteGuard action=stop)")
        self.skipped += 1
        optimizer.zero_grad(set_to_none=True)
        rank_zero_info(f"NonFiniteGuard: skipped step {trainer.global_step} ({what}); {self.skipped} skipped so far")
        pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, rank_zero_only=True)

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))


class SampleGenerations(Callback):
    """Continuations of fixed prompts at every validation, logged as a W&B table and printed.

    Runs on every rank (a ZeRO-3 forward needs all ranks) with a fixed seed, logs from rank 0.
    temperature 0 is greedy. Generation is gpt.generate (KV cache), the one used by `gpt sample`.
    """

    def __init__(self, prompts: Optional[list[str]] = None, max_new_tokens: int = 48,
                 temperature: float = 0.0, top_k: Optional[int] = 50, seed: int = 0):
        self.prompts = prompts or ["ROMEO:", "First Citizen:\n", "To be, or not to be"]
        self.max_new_tokens, self.temperature, self.top_k, self.seed = max_new_tokens, temperature, top_k, seed

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        tok_json = getattr(pl_module, "tokenizer_json", None)
        if trainer.sanity_checking or tok_json is None:
            return
        tok = Tokenizer.from_str(tok_json)
        prompts = [tok.encode(p) for p in self.prompts]
        room = pl_module.model.config.block_size - max(len(p) for p in prompts)
        with trainer.precision_plugin.forward_context():
            outs = generate(pl_module.model, prompts, max_new_tokens=max(0, min(self.max_new_tokens, room)),
                            temperature=self.temperature, top_k=self.top_k, seed=self.seed, stop_ids=[tok.eot_id])
        rows = [[trainer.global_step, p, tok.decode(ids)] for p, ids in zip(self.prompts, outs)]
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.log_text(key="samples", columns=["step", "prompt", "completion"], data=rows,
                                    step=trainer.global_step)
            rank_zero_info("\n".join(f"[step {s}] {p!r} -> {c!r}" for s, p, c in rows))
