"""Run directories: one folder per training job, and the identity a resume must agree with.

    rd = RunDir("runs/demo/pretrain")
    rd.checkpoints, rd.config_file, rd.read_record()           # where things are
    meta = checkpoint_meta(rd.checkpoints / "last.ckpt")       # a checkpoint's dict (tensors mmapped)
    differences = compare_identity(checkpoint_identity(meta)[0], now)   # [] when it may resume

The recipes (recipes/cli.py) build every run on this; a run directory holds everything one
training job writes, whatever restarts it goes through:

    checkpoints/    last.ckpt + periodic step=N.ckpt (files, or DeepSpeed directories)
    csv/version_N/  metrics.csv + hparams.yaml (the full config), one version per start of the job
    wandb/          the W&B run: offline-run-*-<id>/ unless online; one run id for the whole job
    config.yaml     the resolved config of the latest start (reusable with --config)
    run.json        the stage and the W&B run id, so that a restart continues the same W&B run

Identity. Every checkpoint carries `checkpoint["run"] = {"identity": {...}, "parent": PATH}`: a
flat dict of what must not change while a run continues (stage, model shape, tokenizer and shard
hashes, global batch, data seed and window, optimizer settings that live in the optimizer state).
Resuming compares it with the identity of the run being started and refuses, naming each
difference with both values, before anything is written. What may change on resume (learning
rate, max_steps and the schedule, precision, devices at the same global batch, validation and
checkpoint intervals) is not part of it and takes effect.
"""
from __future__ import annotations

import configparser
import hashlib
import json
import netrc
import os
import secrets
import string
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional
from urllib.parse import urlparse

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from gpt.checkpoint import CheckpointError
from gpt.safe_load import safe_load

RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"
# Model config fields that change neither a parameter's shape nor its meaning (init_std acts only
# before step 0): free to change on resume.
RUNTIME_FIELDS = ("activation_checkpointing", "dropout", "init_std")
REPO = Path(__file__).resolve().parents[1]


class RunError(Exception):
    """A run that cannot start as configured; the message is one line saying what and why."""


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RunDir:
    """The folder of one training job (see the module docstring for its layout)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    def checkpoint_paths(self) -> list[Path]:
        return sorted(self.checkpoints.glob("*.ckpt")) if self.checkpoints.is_dir() else []

    def read_record(self) -> dict[str, Any]:
        f = self.path / RUN_FILE
        try:
            return json.loads(f.read_text()) if f.is_file() else {}
        except (OSError, json.JSONDecodeError) as e:
            raise RunError(f"{f}: unreadable ({_one_line(e)}); delete it to start the W&B run afresh") from None

    def write_record(self, record: Mapping[str, Any]) -> None:
        atomic_write_text(self.path / RUN_FILE, json.dumps(dict(record), indent=1) + "\n")


# ---- identity ------------------------------------------------------------------------------
def plain(value: Any) -> Any:
    """Tuples as lists, recursively: how a value reads back from a checkpoint or YAML."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def model_identity(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """`model.<field>` for every GPTConfig field that fixes the weights' shapes or meaning."""
    return {f"model.{k}": plain(v) for k, v in model_config.items() if k not in RUNTIME_FIELDS}


def shards_sha256(manifest: Mapping[str, Any]) -> str:
    """A hash of the shard contents a manifest lists (file, tokens and sha256 of each shard).

    Unlike the manifest file's own hash it ignores bookkeeping (sources, timings), so the same
    shards copied elsewhere or re-described still count as the same data.
    """
    splits = manifest.get("splits", {})
    content = {s: [[r.get("file"), r.get("tokens"), r.get("sha256")] for r in splits[s].get("shards", [])]
               for s in sorted(splits)}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _show(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12]  # a sha256: the first 12 hex digits tell two apart
    return json.dumps(plain(value)) if not isinstance(value, str) else value


def compare_identity(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """"KEY A in the checkpoint, B now" for every key both have with different values."""
    return [f"{k} {_show(saved[k])} in the checkpoint, {_show(v)} now"
            for k, v in now.items() if k in saved and plain(saved[k]) != plain(v)]


def checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The dict a checkpoint holds (a Lightning file, or a DeepSpeed directory's client state)."""
    p = Path(path)
    try:
        if p.is_dir():
            from gpt.zero import load_meta

            return load_meta(p)
        return safe_load(p)  # weights-only, mmap; a truncated or foreign file named in one line
    except CheckpointError as e:  # already names the file at fault (a shard inside a directory)
        raise RunError(_one_line(e)) from None
    except Exception as e:
        raise RunError(f"{p}: not a readable checkpoint ({_one_line(e)})") from None


def checkpoint_identity(meta: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(identity, notes) of a checkpoint; older checkpoints without a run record give what they hold."""
    run = meta.get("run")
    if isinstance(run, dict) and isinstance(run.get("identity"), dict):
        return dict(run["identity"]), []
    identity: dict[str, Any] = {}
    gpt_meta = meta.get("gpt") or {}
    if isinstance(gpt_meta.get("model_config"), dict):
        identity.update(model_identity(gpt_meta["model_config"]))
    if gpt_meta.get("tokenizer"):
        from gpt.tokenizer import Tokenizer

        identity["tokenizer_sha256"] = Tokenizer.from_str(gpt_meta["tokenizer"]).content_hash
    data_state = meta.get("PretrainDataModule") or {}
    for key, name in (("global_batch_size", "global_batch_size"), ("seed", "data.seed"),
                      ("block_size", "data.block_size")):
        if key in data_state:
            identity[name] = data_state[key]
    return identity, ["the checkpoint predates run records: its shards cannot be compared with this run's"]


class RunRecord(Callback):
    """Writes `checkpoint["run"]` (identity and parent checkpoint) into every checkpoint."""

    def __init__(self, identity: Optional[dict[str, Any]] = None, parent: Optional[str] = None):
        self.identity, self.parent = dict(identity or {}), parent

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        checkpoint["run"] = {"identity": plain(self.identity), "parent": self.parent}


# ---- starting from another run's weights ---------------------------------------------------
def peek_model_config(path: str | os.PathLike) -> dict[str, Any]:
    """The GPTConfig dict of any checkpoint kind, without reading its weights."""
    p = Path(path)
    if not p.exists():
        raise RunError(f"{p}: no such file or directory")
    try:
        if p.is_dir() and (p / "latest").is_file():
            return checkpoint_meta(p)["gpt"]["model_config"]
        if p.is_dir():
            cfg = json.loads((p / "config.json").read_text())
            if "gpt_config" in cfg:
                return cfg["gpt_config"]
            from gpt.hf import config_from_hf

            return config_from_hf(cfg).to_dict()
        return checkpoint_meta(p)["gpt"]["model_config"]
    except RunError:
        raise
    except Exception as e:
        raise RunError(f"{p}: not a checkpoint with a model config ({_one_line(e)})") from None


def load_initial_weights(model: torch.nn.Module, path: str | os.PathLike, reward_model_ok: bool = False) -> None:
    """Copy the weights of any checkpoint kind (gpt.checkpoint.load_model) into `model`, in place.

    The caller checked the shapes (peek_model_config); under ZeRO-3 call it before the strategy
    partitions the model (a module's configure_model). A reward model's backbone only where
    reward_model_ok (a reward model's own --init_from): elsewhere its LM head is stale.
    """
    from gpt.checkpoint import load_model

    source, _ = load_model(path, reward_model_ok=reward_model_ok)
    with torch.no_grad():
        model.load_state_dict(source.state_dict(), strict=True)


# ---- loggers -------------------------------------------------------------------------------
class RunCSVLogger(CSVLogger):
    """CSVLogger without Lightning's `epoch` column (one endless epoch: it says nothing)."""

    def log_metrics(self, metrics: dict[str, Any], step: Optional[int] = None) -> None:
        super().log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step)


class RunWandbLogger(WandbLogger):
    """WandbLogger that logs at W&B step = optimizer step, without `epoch`.

    With the step explicit, a W&B run resumed after a requeue continues at the step where the job
    stopped, and the second part of the run lines up with the first when both are synced.
    """

    def log_metrics(self, metrics: Mapping[str, Any], step: Optional[int] = None) -> None:
        from lightning.pytorch.utilities.rank_zero import rank_zero_only

        if rank_zero_only.rank != 0:
            return
        metrics = {k: v for k, v in metrics.items() if k != "epoch"}
        if step is None:
            self.experiment.log(metrics)
        else:
            self.experiment.log(metrics, step=int(step))


def start_wandb(run_dir: Path, run_id: str, *, project: str, group: str, job_type: str, name: str,
                config: dict[str, Any]) -> Any:
    """wandb.init for this run: the id stored in run.json, resumed if it exists, the full config."""
    import wandb

    settings = wandb.Settings(git_root=str(REPO)) if (REPO / ".git").exists() else wandb.Settings(disable_git=True)
    return wandb.init(id=run_id, resume="allow", project=project, group=group, job_type=job_type, name=name,
                      dir=str(run_dir), config=config, settings=settings)


def new_wandb_id() -> str:
    """An 8-character W&B run id (lowercase letters and digits, as wandb's own)."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def wandb_logged_in() -> bool:
    """Whether W&B can go online: an API key, or a netrc entry for the W&B host in use.

    The host is WANDB_BASE_URL, else the base_url that `wandb login --host` saved in wandb's
    settings file, else api.wandb.ai; so a self-hosted server counts too.
    """
    if os.environ.get("WANDB_API_KEY"):
        return True
    hosts = {"api.wandb.ai"}
    urls = [os.environ.get("WANDB_BASE_URL")]
    settings = Path(os.environ.get("WANDB_CONFIG_DIR", Path.home() / ".config" / "wandb")) / "settings"
    if settings.is_file():
        parser = configparser.ConfigParser()
        try:
            parser.read(settings)
            urls.append(parser.get("default", "base_url", fallback=None))
        except configparser.Error:
            pass
    hosts.update(urlparse(u).hostname or u for u in urls if u)
    try:
        entries = netrc.netrc(os.environ.get("NETRC")).hosts
    except (OSError, netrc.NetrcParseError):
        return False
    return any(h in entries for h in hosts)


def wandb_offline_unless_configured() -> None:
    """Offline W&B by default: online only when the user is logged in or chose WANDB_MODE."""
    if "WANDB_MODE" not in os.environ and not wandb_logged_in():
        os.environ["WANDB_MODE"] = "offline"


def git_commit() -> Optional[str]:
    """The commit of the code that runs (with "-dirty" for local changes), for reproducibility."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("-dirty" if dirty else "")) or None
