"""Checkpoint at a step boundary and requeue, when Slurm signals that the job must end.

slurm/train.sbatch adds this callback to every recipe it launches:

    srun python -m recipes.<stage> fit --config C --ckpt_path last \\
        --trainer.callbacks+=slurm.requeue.RequeueOnSignal

Slurm sends SIGUSR1 to every task 90 s before the time limit (`#SBATCH --signal=USR1@90`), or
when asked (`scancel --signal=USR1 JOBID`). Each rank only notes it. After the next optimizer
step the ranks agree (any rank signalled = all stop at this same step), save `last.ckpt` through
the run's RunCheckpoint (gpt.callbacks), and stop training cleanly; rank 0 then writes the file named by
GPT_REQUEUE_FILE, and the batch script, seeing it once srun returns, runs `scontrol requeue`.
The requeued job starts the same script again, and `--ckpt_path last` resumes from that step
with the same data order, so the run finishes as if it had never stopped.

Why not Lightning's own SLURM auto-requeue: it saves `hpc_ckpt_N.ckpt` inside the signal
handler, wherever in the step the signal lands (under DDP, possibly while other ranks are in a
collective), and it reads those files back only when no ckpt_path is given. Installing this
handler first makes Lightning leave SIGUSR1 alone (it does not replace an existing handler).
"""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from gpt.callbacks import RunCheckpoint


class RequeueOnSignal(Callback):
    """On `signal_name`, save last.ckpt after the current optimizer step, stop, and ask for a requeue.

    Args:
        signal_name: the signal Slurm sends (sbatch --signal=USR1@SECONDS).
        requeue_file: written by rank 0 after the checkpoint; the batch script requeues the job
            when it exists. Default: the GPT_REQUEUE_FILE environment variable (set by train.sbatch).
    """

    def __init__(self, signal_name: str = "SIGUSR1", requeue_file: Optional[str] = None):
        self.signum = signal.Signals[signal_name]
        self.requeue_file = requeue_file if requeue_file is not None else os.environ.get("GPT_REQUEUE_FILE")
        self.received = False
        self._step_seen = -1
        # Installed now, before the Trainer exists: a signal that lands during start-up must not
        # kill the process (SIGUSR1's default action), and Lightning then keeps its handler off.
        # Never uninstalled: a signal arriving while the finished process exits must not kill it
        # either (the job would end FAILED after a complete run).
        if threading.current_thread() is threading.main_thread():
            signal.signal(self.signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.received = True  # only a flag: the work happens at the next step boundary

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        if self._last_checkpointer(trainer) is None:
            raise ValueError("RequeueOnSignal needs the run's RunCheckpoint (the recipes add it): "
                             "its last.ckpt is what `--ckpt_path last` resumes from")
        # One line per rank in the job log: from here on a signal is safe (tests wait for it).
        print(f"RequeueOnSignal: rank {trainer.global_rank} ready for {self.signum.name}", flush=True)

    @staticmethod
    def _last_checkpointer(trainer: "pl.Trainer") -> Optional[RunCheckpoint]:
        return next((cb for cb in trainer.checkpoint_callbacks if isinstance(cb, RunCheckpoint)), None)

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self._step_seen:
            return  # mid gradient accumulation: only stop where an optimizer step just finished
        self._step_seen = trainer.global_step
        # A collective every step (one bool): the ranks must stop at the same step to save together.
        if not trainer.strategy.reduce_boolean_decision(self.received, all=False):
            return
        if 0 <= trainer.max_steps <= trainer.global_step:
            return  # the run is complete anyway: nothing to resume
        self._checkpoint_and_stop(trainer)

    def _checkpoint_and_stop(self, trainer: "pl.Trainer") -> None:
        ckpt = self._last_checkpointer(trainer)
        # On every rank; RunCheckpoint notes the step, so that it does not save this step again.
        ckpt.save_last_now(trainer)
        rank_zero_info(f"RequeueOnSignal: {self.signum.name} received; saved {ckpt.last_model_path} at step "
                       f"{trainer.global_step}, stopping for requeue")
        trainer.should_stop = True
        # A stop request counts only once min_epochs/min_steps are met; this one cannot wait.
        trainer.fit_loop.min_epochs = 0
        trainer.fit_loop.epoch_loop.min_steps = 0
        if trainer.is_global_zero and self.requeue_file:
            Path(self.requeue_file).parent.mkdir(parents=True, exist_ok=True)
            Path(self.requeue_file).write_text(f"{ckpt.last_model_path}\n{trainer.global_step}\n")
