"""The run shape every training recipe shares: LightningCLI plumbing written once.

A stage's recipe is its module, its data module and a name (recipes/pretrain.py):

    from gpt.data import PretrainDataModule
    from gpt.lm import CausalLMModule
    from recipes.cli import run

    def main(args=None):
        return run(CausalLMModule, PretrainDataModule, stage="pretrain", args=args)

and every recipe then runs the same way (`fit` is the default subcommand):

    python -m recipes.pretrain --config recipes/configs/tiny-cpu.yaml              # a new run
    python -m recipes.pretrain --config recipes/configs/tiny-cpu.yaml --ckpt_path last   # resume it
    python -m recipes.pretrain --config C --print_config                           # the resolved config
    python -m recipes.pretrain --config C --group sft-v2 --init_from runs/demo/pretrain/checkpoints/last.ckpt
    python -m recipes.pretrain validate --config C --ckpt_path last                # validate, nothing logged

Besides seed_everything, trainer.*, model.*, data.* and ckpt_path, every recipe has the keys of
`run_settings` below (group, run_dir, name, project, wandb, init_from, checkpoint_every,
keep_checkpoints, val_every, print_every); `--help` documents each. Flags may be spelled
`--a_b` or `--a-b`. Before anything is written (no W&B run, no file), in this order: the Slurm
layout, the data (the data module's `check_run`), what `--ckpt_path` resumes and whether that
checkpoint belongs to this run (gpt.run identities), `--init_from`'s shapes; a problem is one
`error: ...` line and exit status 2. Then the run directory (gpt.run.RunDir) gets run.json and
config.yaml, the loggers (CSV, and W&B with one run id for the whole job, resumed on restarts,
holding the full config) are attached, and training starts.
"""
from __future__ import annotations

import inspect
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
import yaml
from lightning.fabric.connector import _PRECISION_INPUT
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from gpt.callbacks import RunCheckpoint, RunMonitor, RunProgressBar, stdout_is_terminal
from gpt.checkpoint import CheckpointError, refuse_reward_model
from gpt.precision import resolve_precision
from gpt.resume import find_resume_checkpoint
from gpt.run import (RunCSVLogger, RunDir, RunError, RunRecord, RunWandbLogger, atomic_write_text,
                     checkpoint_identity, checkpoint_meta, compare_identity, git_commit, model_identity,
                     new_wandb_id, peek_model_config, start_wandb, wandb_offline_unless_configured)
from gpt.shards import ShardError

SUBCOMMANDS = ("fit", "validate")
# Trainer arguments the run shape sets from its own keys; the parser does not offer them.
SET_BY_RUN = {"logger": "--wandb/--project/--group (the run makes its loggers)", "default_root_dir": "--run_dir",
              "val_check_interval": "--val_every (optimizer steps)", "check_val_every_n_epoch": "--val_every",
              "enable_checkpointing": "--checkpoint_every"}
TRAINER_DEFAULTS = {"use_distributed_sampler": False,  # our samplers deal samples to ranks themselves
                    "num_sanity_val_steps": 0, "enable_model_summary": False}
# trainer.precision: Lightning's values, or "auto" (gpt.precision: chosen from the machine at start-up).
Precision = Optional[Union[Literal["auto"], _PRECISION_INPUT]]
# Errors a user can fix, raised while the run is being set up: printed as one line.
USER_ERRORS = (RunError, CheckpointError, ShardError, FileNotFoundError, ValueError, MisconfigurationException)


def run_settings(group: str = "default", run_dir: Optional[str] = None, name: Optional[str] = None,
                 project: str = "gpt-pipeline", wandb: bool = True, init_from: Optional[str] = None,
                 checkpoint_every: int = 1000, keep_checkpoints: int = 3, val_every: int = 1000,
                 print_every: Optional[int] = None) -> None:
    """Where the run writes, what it tracks, and how often (every interval counts optimizer steps).

    Args:
        group: the experiment this run belongs to: its W&B group, and runs/<group>/<stage> unless
            run_dir says otherwise.
        run_dir: the one folder for everything this run writes (checkpoints/, csv/, wandb/,
            config.yaml, run.json); default runs/<group>/<stage>. It may be moved or copied and
            resumed there.
        name: the W&B run name; default <group>-<stage>.
        project: the W&B project.
        wandb: log to W&B beside the CSV (offline unless you are logged in or set WANDB_MODE).
        init_from: start a new run from the weights of this checkpoint (Lightning .ckpt, DeepSpeed
            directory, gpt export or Hugging Face directory; same model shape); ignored on resume.
        checkpoint_every: optimizer steps between periodic checkpoints (0: only last.ckpt, written
            at the end and on preemption).
        keep_checkpoints: periodic checkpoints kept, newest first (-1: all); last.ckpt is extra.
        val_every: optimizer steps between validations (0: no validation).
        print_every: optimizer steps between plain progress lines, printed when stdout is not a
            terminal (a Slurm log); default trainer.log_every_n_steps.
    """


def _fail(e: BaseException) -> None:
    """One line on stderr (from rank 0 only), exit status 2 on every rank.

    Under torch.distributed the process leaves at once (os._exit): a normal interpreter exit there
    can die in a C++ destructor of the process group's threads, printing "terminate called without
    an active exception" after the error line and exiting 134 (seen in CI, now and then)."""
    if rank_zero_only.rank == 0:
        lines = str(e).strip().splitlines() or [type(e).__name__]
        print(f"error: {lines[0]}", file=sys.stderr, flush=True)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)
    raise SystemExit(2)


def _clean_parser_message(message: str) -> str:
    text = " ".join(str(message).split())
    text = re.sub(r'Parser key "([^"]+)": ', r"--\1: ", text)
    text = text.replace("Expected a typing.Literal[", "expected one of [").replace("Got value:", "got")
    text = re.sub(r"Expected a <class '(\w+)'>", r"expected \1", text)
    for key, use in SET_BY_RUN.items():
        if f"trainer.{key}" in text:
            text += f" (trainer.{key} is set by the run: use {use})"
    return text


class RecipeParser(LightningArgumentParser):
    """A bad flag or key is one line naming it, not the whole usage."""

    def error(self, message: str, ex: Optional[Exception] = None) -> None:
        if not self.exit_on_error:
            return super().error(message, ex)  # jsonargparse probing a parse: let it raise
        if rank_zero_only.rank == 0:  # under srun every rank parses the same arguments: one line, not N
            sys.stderr.write(f"error: {_clean_parser_message(message)} (--help lists every option)\n")
        self.exit(2)


def _num_devices(devices: Any, accelerator: Any) -> int:
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
        raise SystemExit(f"error: Slurm started {ntasks} tasks but the Trainer expects devices x num_nodes = {want}; "
                         f"use --ntasks-per-node=<devices> with --nodes=<num_nodes> (a mismatch hangs at start-up)")


def _rank_zero() -> bool:
    # From the environment (RANK, LOCAL_RANK, SLURM_PROCID): the Trainer learns its rank only in fit.
    return rank_zero_only.rank == 0


def _takes(cls: Any, name: str) -> bool:
    return cls is not None and name in inspect.signature(cls).parameters


class GPTCLI(LightningCLI):
    """LightningCLI with the run shape: one run directory, checked resumes, one W&B run per job."""

    def __init__(self, module_cls: type, datamodule_cls: type, stage: str, args: list[str]):
        self.stage = stage
        self._ckpt_arg: Optional[str] = None
        super().__init__(module_cls, datamodule_cls, args=args, parser_class=RecipeParser, save_config_callback=None,
                         trainer_defaults=dict(TRAINER_DEFAULTS), auto_configure_optimizers=False,
                         parser_kwargs={"prog": f"python -m recipes.{stage}",
                                        "description": f"The {stage} recipe: {__doc__.splitlines()[0]}"})

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {k: v for k, v in LightningCLI.subcommands().items() if k in SUBCOMMANDS}

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(self.trainer_class, "trainer", fail_untyped=False, instantiate=False,
                                   sub_configs=True, skip=set(SET_BY_RUN) | {"precision"})
        parser.add_argument("--trainer.precision", type=Precision, default=None,
                            help="Lightning's precision (32-true, bf16-mixed, 16-mixed, ...; default 32-true) or auto: "
                                 "bf16-mixed on a GPU or CPU with native bf16, else 16-mixed (GPU) or 32-true (CPU); "
                                 "resolved and printed at start-up, recorded resolved")
        parser.set_defaults({f"trainer.{k}": v for k, v in self.trainer_defaults.items()})
        parser.add_lightning_class_args(self.model_class, "model")
        parser.add_lightning_class_args(self.datamodule_class, "data")

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_function_arguments(run_settings, None)
        if _takes(self.model_class, "tokenizer") and _takes(self.datamodule_class, "tokenizer"):
            parser.link_arguments("data.tokenizer", "model.tokenizer")  # stored in every checkpoint

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        self.config = parser.parse_args(args)
        sub = self.config.get("subcommand")
        if sub:
            # Resolved by this class after the checks: LightningCLI would otherwise read the
            # checkpoint's hyperparameters over the user's own flags (a resumed --model.lr lost).
            self._ckpt_arg = self.config[sub].get("ckpt_path")
            self.config[sub].ckpt_path = None

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand]
        cfg.ckpt_path = self._ckpt_arg
        if cfg.get("weights_only") is None:
            cfg.weights_only = True  # our checkpoints hold plain data only: never unpickle code
        t = cfg.trainer
        check_slurm_tasks(t.devices, t.num_nodes, t.accelerator)
        # Resolved here, before the Trainer exists, so that the Trainer, config.yaml, the CSV
        # hparams and W&B all see the real precision, never "auto".
        t.precision, why = resolve_precision(t.precision, t.accelerator)
        if why.startswith("auto") and _rank_zero():
            print(f"precision: {t.precision} ({why})", flush=True)
        for key, low in (("checkpoint_every", 0), ("keep_checkpoints", -1), ("val_every", 0), ("print_every", 1)):
            if cfg[key] is not None and cfg[key] < low:
                _fail(RunError(f"--{key} {cfg[key]}: must be >= {low}"))
        if cfg.keep_checkpoints == 0:
            _fail(RunError("--keep_checkpoints 0 keeps nothing: use --checkpoint_every 0 for last.ckpt only"))
        self.run_dir = RunDir(Path(cfg.run_dir or Path("runs") / cfg.group / self.stage))
        cfg.run_dir = str(self.run_dir.path)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except USER_ERRORS as e:
            _fail(e)

    # ---- the trainer and everything around it ------------------------------------------
    def instantiate_trainer(self, **kwargs: Any) -> Any:
        cfg = self.config[self.subcommand]
        t = cfg.trainer
        fit = self.subcommand == "fit"
        A = int(t.accumulate_grad_batches or 1)
        bar = t.enable_progress_bar is not False and stdout_is_terminal()
        self.monitor = RunMonitor(print_every=cfg.print_every or t.log_every_n_steps or 50, lines=not bar,
                                  window=max(2, t.log_every_n_steps or 10))
        self.record = RunRecord()
        ours: list[Any] = [self.monitor] + ([RunProgressBar()] if bar else [])
        if fit:
            ours += [RunCheckpoint(str(self.run_dir.checkpoints), cfg.checkpoint_every, cfg.keep_checkpoints,
                                   cfg.val_every), self.record]
        yaml_callbacks = self.config_init[self.subcommand]["trainer"].get("callbacks") or []
        # Lightning counts validation intervals in training batches; a module whose batch takes several
        # optimizer steps (gpt.rl: one rollout, steps_per_rollout updates) says how many.
        per_batch = max(1, int(getattr(self.model, "steps_per_rollout", 1)))
        kwargs.update(callbacks=list(yaml_callbacks) + ours, logger=False, default_root_dir=str(self.run_dir.path),
                      enable_progress_bar=bar, enable_checkpointing=fit, check_val_every_n_epoch=None,
                      val_check_interval=A * max(1, (cfg.val_every or 1) // per_batch))
        if fit and not cfg.val_every:
            kwargs["limit_val_batches"] = 0
        trainer = super().instantiate_trainer(**kwargs)
        if fit:
            self._prepare_fit(trainer)
        else:
            self._prepare_validate(trainer)
        return trainer

    def _resolve_ckpt(self, arg: Optional[str]) -> tuple[Optional[Path], list[str]]:
        if not arg:
            return None, []
        if arg == "last":
            return find_resume_checkpoint(self.run_dir.checkpoints)
        if arg in ("best", "hpc", "registry"):
            raise RunError(f"--ckpt_path {arg}: use 'last' (this run's newest checkpoint) or a checkpoint path")
        p = Path(arg)
        if not p.exists():
            raise RunError(f"--ckpt_path {p}: no such file or directory")
        return p, []

    def _identity(self, trainer: Any) -> dict[str, Any]:
        dm, model = self.datamodule, self.model
        identity: dict[str, Any] = {"stage": self.stage}
        identity.update(getattr(dm, "run_identity", dict)())
        if getattr(dm, "micro_batch_size", None):
            identity["global_batch_size"] = dm.micro_batch_size * trainer.accumulate_grad_batches * trainer.world_size
        identity.update(getattr(model, "run_identity", dict)())
        return identity

    def _prepare_fit(self, trainer: Any) -> None:
        cfg, rd = self.config[self.subcommand], self.run_dir
        try:
            if hasattr(self.model, "check_run"):  # settings that need the trainer or the data (gpt.rl)
                self.model.check_run(trainer, self.datamodule)
            if hasattr(self.datamodule, "check_run"):
                self.datamodule.check_run(trainer)
            identity = self._identity(trainer)
            ckpt, notes = self._resolve_ckpt(cfg.ckpt_path)
            step, parent = 0, None
            if ckpt is not None:
                meta = checkpoint_meta(ckpt)
                saved, more = checkpoint_identity(meta)
                notes += more
                differences = compare_identity(saved, identity)
                if differences:
                    raise RunError(f"cannot resume {ckpt}: {'; '.join(differences)}. It is another run's checkpoint: "
                                   f"start this run in a new --run_dir (or --group), or take its weights with --init_from")
                step, parent = int(meta.get("global_step", 0)), (meta.get("run") or {}).get("parent")
                if cfg.init_from:
                    notes.append(f"--init_from {cfg.init_from} is not applied: resuming, the weights come from {ckpt}")
            else:
                done = rd.checkpoint_paths()
                if done:
                    raise RunError(f"{rd.path} already holds a run ({', '.join(p.name for p in done[-3:])}): resume it "
                                   f"with --ckpt_path last, or start this run in a new --run_dir (or --group)")
                if cfg.init_from:
                    parent = self._init_from(trainer, cfg.init_from)
            record = rd.read_record()
            if record.get("stage") not in (None, self.stage):
                raise RunError(f"{rd.path} holds a {record['stage']} run, not {self.stage}: use another --run_dir")
        except USER_ERRORS as e:
            _fail(e)
        self.record.identity, self.record.parent = identity, parent
        self.config_init[self.subcommand]["ckpt_path"] = str(ckpt) if ckpt else None
        self._start_tracking(trainer, record, identity, ckpt, step, parent, notes)

    def _init_from(self, trainer: Any, path: str) -> str:
        if not hasattr(type(self.model), "init_from"):
            raise RunError(f"the {self.stage} module does not take --init_from")
        if getattr(trainer.strategy, "sharded_init", False):
            raise RunError("--init_from with sharded_init: true is not supported (ZeRO-3 would re-initialize the "
                           "loaded weights); set sharded_init: false")
        differences = compare_identity(model_identity(peek_model_config(path)),
                                       getattr(self.model, "run_identity", dict)())
        if self.stage != "reward":
            refuse_reward_model(path, f"--init_from {path}", f"the {self.stage} stage starts from a language model "
                                "(after SFT: the SFT run's checkpoint)")
        if differences:
            raise RunError(f"--init_from {path}: the model shapes differ: "
                           + "; ".join(d.replace(" now", " in this run") for d in differences))
        self.model.init_from = str(Path(path).resolve())
        return self.model.init_from

    def _start_tracking(self, trainer: Any, record: dict[str, Any], identity: dict[str, Any],
                        ckpt: Optional[Path], step: int, parent: Optional[str], notes: list[str]) -> None:
        cfg, rd = self.config[self.subcommand], self.run_dir
        wandb_id = record.get("wandb_id") or new_wandb_id()
        dumped = yaml.safe_load(self.parser.dump(self.config, skip_none=False))[self.subcommand]
        full = {**dumped, "run": {
            "stage": self.stage, "run_dir": str(rd.path.resolve()), "world_size": trainer.world_size,
            "global_batch_size": identity.get("global_batch_size"), "seed": cfg.seed_everything,
            "git_commit": git_commit(), "identity": identity, "parent_checkpoint": parent,
            "resumed_from": str(ckpt) if ckpt else None, "resumed_at_step": step, "wandb_id": wandb_id}}
        loggers: list[Any] = [RunCSVLogger(save_dir=str(rd.path), name="csv")]
        if _rank_zero():
            rd.write_record({"stage": self.stage, "group": cfg.group, "wandb_id": wandb_id})
            atomic_write_text(rd.config_file, yaml.safe_dump(dumped, sort_keys=False))
            loggers[0].log_hyperparams(full)
        if cfg.wandb:
            experiment = None
            if _rank_zero():
                experiment = start_wandb(rd.path, wandb_id, project=cfg.project, group=cfg.group,
                                         job_type=self.stage, name=cfg.name or f"{cfg.group}-{self.stage}",
                                         config=full)
            loggers.insert(0, RunWandbLogger(experiment=experiment, save_dir=str(rd.path), project=cfg.project))
        trainer.loggers = loggers
        if _rank_zero():
            start = f"resuming {ckpt} at step {step}" if ckpt else (
                f"new run from the weights of {parent}" if parent else "new run")
            tracking = f"W&B {os.environ.get('WANDB_MODE', 'online')} run {wandb_id}" if cfg.wandb else "W&B off"
            for note in notes:
                print(f"note: {note}", flush=True)
            print(f"{self.stage}: {rd.path}: {start}; {tracking}; CSV in {rd.path / 'csv'}", flush=True)

    def _prepare_validate(self, trainer: Any) -> None:
        cfg = self.config[self.subcommand]
        try:
            ckpt, notes = self._resolve_ckpt(cfg.ckpt_path)
            if ckpt is not None:  # the shapes must fit (the data may be any)
                differences = compare_identity(model_identity(peek_model_config(ckpt)),
                                               getattr(self.model, "run_identity", dict)())
                if differences:
                    raise RunError(f"cannot validate {ckpt} with this model: {'; '.join(differences)}")
        except USER_ERRORS as e:
            _fail(e)
        if _rank_zero():
            for note in notes:
                print(f"note: {note}", flush=True)
            step = checkpoint_meta(ckpt).get("global_step") if ckpt else None
            print(f"validating {ckpt} (step {step})" if ckpt else "validating the initial weights (no --ckpt_path)",
                  flush=True)
        self.config_init[self.subcommand]["ckpt_path"] = str(ckpt) if ckpt else None


# ---- entry point -----------------------------------------------------------------------------
def normalize_argv(argv: list[str]) -> list[str]:
    """`--max-steps 5` -> `--max_steps 5` (option names only, never values); the subcommand first
    wherever it was written (`--config C validate`), and `fit` when there is none."""
    out = []
    for arg in argv:
        if arg.startswith("--") and "-" in arg[2:].split("=", 1)[0]:
            name, eq, value = arg[2:].partition("=")
            arg = "--" + name.replace("-", "_") + eq + value
        out.append(arg)
    # A subcommand is a bare word that is not the value of the option before it.
    where = [i for i, a in enumerate(out) if a in SUBCOMMANDS and (i == 0 or not out[i - 1].startswith("-")
                                                                   or "=" in out[i - 1])]
    if not where:
        return ["fit", *out]
    return [out[where[0]], *out[:where[0]], *out[where[0] + 1:]]


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("💡 Tip")  # Lightning's LitLogger advert


def quiet_library_noise() -> None:
    """Silence messages a user of these recipes cannot act on (no library internals patched)."""
    for message in (
            r".*`srun` command is available on your system but is not used.*",  # we run srun ourselves, or not at all
            r".*resuming from a checkpoint that ended before the epoch ended.*",  # our sampler resumes mid-epoch
            r".*isinstance\(treespec, LeafSpec\).*",  # Lightning 2.6 on torch >= 2.13, its own deprecated call
            r".*Checkpoint directory .* exists and is not empty.*",  # resuming: expected; fresh runs are checked
    ):
        warnings.filterwarnings("ignore", message=message)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropAdverts())


def run(module_cls: type, datamodule_cls: type, stage: str, args: Optional[list[str]] = None) -> GPTCLI:
    """Parse the command line (or `args`), check, set up the run directory and train: a recipe's main."""
    quiet_library_noise()
    wandb_offline_unless_configured()
    try:
        return GPTCLI(module_cls, datamodule_cls, stage, normalize_argv(sys.argv[1:] if args is None else list(args)))
    except CheckpointError as e:  # found while loading (e.g. a ZeRO shard refused): one line, on every rank
        _fail(e)
