"""DeepSpeed ZeRO for the Trainer, on CUDA and (for development and CI) on CPU over gloo.

    trainer:
      strategy:
        class_path: gpt.zero.ZeroStrategy
        init_args: {config: recipes/deepspeed/zero2.json}
    # or, after `import gpt.zero`:  Trainer(strategy="zero_stage_2", accelerator="cpu", devices=2)

    state_dict, meta = load_consolidated("runs/x/checkpoints/last.ckpt")   # ZeRO dir -> GPT weights
    GPT(GPTConfig.from_dict(meta["model_config"])).load_state_dict(state_dict)

ZeroStrategy is Lightning's DeepSpeedStrategy, on GPUs unchanged but for checkpoints (below).
Lightning refuses any other accelerator; when the accelerator is the CPU this subclass (1) skips
that CUDA check and does the DDP environment set-up, (2) skips the check that device indices equal
local ranks (CPU devices have no index) and (3) reports `cpu:0` as the root device, because
DeepSpeed's engine compares the root device index with an int (DeepSpeed's CPU accelerator ignores
the index). DeepSpeed then runs ZeRO 1/2/3 with the gloo backend.

Gradient clipping: DeepSpeed defaults `gradient_clipping` to 1.0; the value written into the
engine config is always the Trainer's `gradient_clip_val` (0.0 when unset), so the recipe YAML
stays the one place to set it. A JSON that sets a different value is refused.

Checkpoints: DeepSpeed writes a checkpoint directory in place; `save_checkpoint` here writes each
save into a hidden staging directory and publishes it by rename only once every rank has finished
(gpt.zero_checkpoint), and `load_checkpoint` / `load_consolidated` verify the directory (complete,
one save, plain data) before DeepSpeed reads it, with every torch.load inside forced weights-only
(gpt.safe_load). docs/deepspeed.md describes the layout and what is checked.
"""
from __future__ import annotations

import contextlib
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Generator, Optional, Union

import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, StrategyRegistry
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.fabric.utilities.seed import reset_seed

from gpt import zero_checkpoint as zc
from gpt.checkpoint import CheckpointError
from gpt.safe_load import safe_load, weights_only_scope

# Without a GPU, tell DeepSpeed so: its auto-detection logs "Setting accelerator to CPU" to stdout,
# which lands in the middle of `--print_config` output.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

# DeepSpeed checkpoints (through Lightning) hold the wrapped LightningModule: strip both prefixes.
_PREFIXES = ("_forward_module.", "module.", "model.")


class ZeroStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeedStrategy that also runs on the CPU accelerator (gloo)."""

    strategy_name = "zero"

    def __init__(self, *args: Any, sharded_init: bool = False, **kwargs: Any) -> None:
        """Args as DeepSpeedStrategy's (`config`: a JSON path or dict, `stage`, ...), plus

        sharded_init: under ZeRO-3, build the model inside deepspeed.zero.Init, so each rank
            only ever holds its shard: the way to start a model larger than one rank's host RAM.
            zero.Init partitions each parameter to shape [0] as soon as its submodule is built, so
            GPT's own initialization runs again afterwards, one gathered parameter at a time
            (`_init_sharded`); the result equals the unsharded build (tested: same losses as DDP).
            Off by default: each rank builds the full model once and deepspeed.initialize shards
            it; training memory is the same, only start-up peaks at one full fp32 copy.
        """
        super().__init__(*args, **kwargs)
        self.sharded_init = sharded_init

    def _on_cpu(self) -> bool:
        return isinstance(self.accelerator, CPUAccelerator)

    def setup_environment(self) -> None:
        if not self._on_cpu():
            return super().setup_environment()
        # DeepSpeedStrategy.setup_environment = CUDA check + DDPStrategy's; keep only the latter.
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        if not self._on_cpu():
            return super().setup_distributed()
        # As DeepSpeedStrategy.setup_distributed, without the device-index == local-rank check.
        reset_seed()
        self.set_world_ranks()
        # Private, no public route: the parent's setup_distributed is the only caller, and it is
        # the method whose device-index check we must skip on CPU.
        self._init_deepspeed_distributed()

    @contextmanager
    def model_sharded_context(self) -> Generator[None, None, None]:
        if self.sharded_init:
            with super().model_sharded_context():
                yield
            if self.zero_stage_3:
                self._init_sharded()
            return
        # Private, no public route: the parent's model_sharded_context formats the config the same
        # way but also enters deepspeed.zero.Init, which is what sharded_init=False must avoid.
        self._init_config_if_needed()
        yield

    @property
    def offloads_optimizer(self) -> bool:
        """Whether Adam runs in host memory (ZeRO-Offload): CausalLMModule then builds DeepSpeedCPUAdam."""
        zero = self.config.get("zero_optimization", {}) if isinstance(self.config, dict) else {}
        return (zero.get("offload_optimizer") or {}).get("device") in ("cpu", "nvme")

    def _init_sharded(self) -> None:
        """Re-run each model's `init_parameter` on parameters zero.Init has already partitioned.

        Gathering one parameter at a time keeps peak memory at one full parameter. Every rank draws
        the same random numbers (same seed, same order as the unsharded build, whose in-__init__
        pass drew nothing from the empty shards); rank 0's values are the ones kept.
        """
        import deepspeed

        for module in self.lightning_module.modules():
            if not hasattr(module, "init_parameter"):
                continue
            for name, p in module.named_parameters():
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    module.init_parameter(name, p)

    @property
    def root_device(self) -> torch.device:
        if self._on_cpu():
            # deepspeed.initialize(args.device_rank=root_device.index) needs an int >= 0.
            return torch.device("cpu", 0)
        return super().root_device

    # Private override, no public route: Lightning fills DeepSpeed's batch/accumulation fields in
    # this hook and offers none other between its config formatting and deepspeed.initialize.
    def _format_batch_size_and_grad_accum_config(self) -> None:
        user_value = self.config.get("gradient_clipping") if isinstance(self.config, dict) else None
        super()._format_batch_size_and_grad_accum_config()
        if self.lightning_module is None:
            return
        trainer = self.lightning_module.trainer
        if trainer.gradient_clip_algorithm not in (None, "norm"):
            raise MisconfigurationException("DeepSpeed clips by global norm only; use gradient_clip_algorithm: norm")
        clip = float(trainer.gradient_clip_val or 0.0)
        if user_value is not None and float(user_value) != clip:
            raise MisconfigurationException(
                f"DeepSpeed config gradient_clipping={user_value} but trainer.gradient_clip_val={clip}: "
                "set it in one place (trainer.gradient_clip_val)")
        self.config["gradient_clipping"] = clip

    # Private override, no public route: the hook Lightning calls for the micro-batch size when the
    # config has none; the alternative, writing it into the JSON, would duplicate data.micro_batch_size.
    def _auto_select_batch_size(self) -> int:
        # Only for DeepSpeed's throughput logging. Lightning reads batch_sampler.batch_size, which
        # our step-indexed sampler (gpt.data) does not have: take the data module's micro-batch.
        dm = getattr(self.lightning_module.trainer, "datamodule", None)
        if getattr(dm, "micro_batch_size", None):
            return int(dm.micro_batch_size)
        try:
            return super()._auto_select_batch_size()
        except AttributeError:
            return 1

    # ---- checkpoints: published whole, verified before loading ---------------------------------
    def save_checkpoint(self, checkpoint: dict, filepath: Any, storage_options: Optional[Any] = None) -> None:
        """DeepSpeed's save, into a staging directory published (renamed over `filepath`) only
        after every rank has written and fsynced its files; see gpt.zero_checkpoint."""
        if storage_options is not None:
            return super().save_checkpoint(checkpoint, filepath, storage_options)  # Lightning's TypeError
        target = Path(os.path.abspath(self.broadcast(str(filepath))))
        save_id = self.broadcast(zc.new_save_id())
        staging = zc.staging_dir(target, save_id)
        engine = self.deepspeed_engine
        if engine.checkpoint_engine.is_decoupled():
            raise MisconfigurationException("gpt.zero publishes a checkpoint once its files are written: DeepSpeed's "
                                            "decoupled (asynchronous) checkpoint writer is not supported")
        if self.is_global_zero:
            target.parent.mkdir(parents=True, exist_ok=True)
            zc.collect_garbage(target.parent)
            zc.begin(staging, target.name)
        self.barrier("gpt.zero.save.staged")
        # The engine attribute is DeepSpeed's public CheckpointEngine slot; swapped back after the save.
        recorder = zc.RecordingEngine(engine.checkpoint_engine, staging,
                                      {"id": save_id, "step": int(checkpoint["global_step"]), "rank": self.global_rank})
        engine.checkpoint_engine = recorder
        try:
            super().save_checkpoint(checkpoint, str(staging))  # ends with DeepSpeed's barrier: all files written
        finally:
            engine.checkpoint_engine = recorder.inner
        per_rank = _all_gather_object(recorder.written)
        if self.is_global_zero:
            zc.finish(staging, name=target.name, save_id=save_id, step=int(checkpoint["global_step"]), per_rank=per_rank)
            zc.publish(staging, target)
        self.barrier("gpt.zero.save.published")

    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Verify the directory (complete, one save, plain data), then DeepSpeed's load with every
        torch.load forced weights-only; any refusal is a CheckpointError of one line."""
        if self.load_full_weights and self.zero_stage_3:
            return super().load_checkpoint(checkpoint_path, weights_only)  # one file, read by the CheckpointIO
        path = Path(checkpoint_path)
        try:
            zc.verify(path)
            refusal = None
        except CheckpointError as e:
            refusal = str(e)
        # Every rank checks (each reads what it will load); all refuse together, with the first reason,
        # so none is left waiting in a collective for one that stopped.
        refusals = [r for r in _all_gather_object(refusal) if r]
        if refusals:
            raise CheckpointError(refusals[0])
        with weights_only_scope(path):
            return super().load_checkpoint(path, weights_only)

    def remove_checkpoint(self, filepath: Any) -> None:
        """Top-k pruning: a published directory is hidden first, so no partial one keeps its name."""
        path = Path(filepath)
        if self.is_global_zero and path.is_dir() and (path / zc.MANIFEST).is_file():
            zc.remove(path)
            return
        super().remove_checkpoint(filepath)

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        """Registers `zero_stage_{1,2,3}` and `zero_stage_3_offload` (CPU-aware `deepspeed_stage_*`)."""
        for name, kwargs in {
            "zero_stage_1": {"stage": 1},
            "zero_stage_2": {"stage": 2},
            "zero_stage_3": {"stage": 3},
            "zero_stage_3_offload": {"stage": 3, "offload_optimizer": True, "offload_parameters": True},
        }.items():
            if name not in strategy_registry:
                strategy_registry.register(name, cls, description=f"CPU-aware DeepSpeed {name}", **kwargs)


ZeroStrategy.register_strategies(StrategyRegistry)


def _all_gather_object(obj: Any) -> list[Any]:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


# ---- consolidation ----------------------------------------------------------------------------
def _strip(key: str) -> str:
    for p in _PREFIXES:
        if key.startswith(p):
            key = key[len(p):]
    return key


def _model_states_file(path: Path, tag: str) -> Path:
    # DeepSpeed's shard names (no public API returns them): ZeRO 1/2 write one model-states file,
    # ZeRO-3 one per rank; rank 0's holds Lightning's client state in every case.
    d = path / tag
    f = d / "mp_rank_00_model_states.pt"
    return f if f.is_file() else d / "zero_pp_rank_0_mp_rank_00_model_states.pt"


def load_meta(path: Union[str, os.PathLike]) -> dict[str, Any]:
    """The client state Lightning saved with a ZeRO checkpoint, read weights-only (tensors memory-mapped).

    Lightning passes its checkpoint dict (minus state_dict / optimizer_states) to DeepSpeed as
    client state, which DeepSpeed merges into `<tag>/mp_rank_00_model_states.pt` beside its own
    entries (ZeRO-3: `zero_pp_rank_0_mp_rank_00_model_states.pt`). Everything in it is plain data
    (dicts, strings, numbers, tensors, torch.Size).
    """
    path = Path(path)
    return safe_load(_model_states_file(path, zc.read_tag(path)), deepspeed=True)


def load_consolidated(path: Union[str, os.PathLike]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Consolidate a Lightning DeepSpeed checkpoint directory (ZeRO 1/2/3) into GPT weights.

    Returns (state_dict with GPT's own keys in fp32, checkpoint["gpt"] = {"model_config",
    "tokenizer"}). Memory: DeepSpeed's lazy mode memory-maps each rank's fp32 optimizer shard and
    gathers one parameter at a time, so peak memory is about the fp32 model (what is returned)
    plus one parameter, not the model plus all the optimizer shards (Adam states stay on disk).
    The directory is verified first (gpt.zero_checkpoint.verify: complete, one save, plain data),
    and DeepSpeed's zero_to_fp32, which calls torch.load(weights_only=False), runs inside
    weights_only_scope: a shard that is not plain data is refused, never unpickled as code.
    Raises CheckpointError (one line naming the file) for anything unusable.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    path = Path(path)
    zc.verify(path)
    meta = load_meta(path)
    if not isinstance(meta, dict) or not isinstance(meta.get("gpt"), dict):
        raise CheckpointError(f"{path}: no checkpoint['gpt'] (model_config, tokenizer); not a gpt.lm checkpoint")
    # zero_to_fp32 print()s its progress: onto stderr, so `gpt sample > out.txt` holds only the text.
    with contextlib.redirect_stdout(sys.stderr), weights_only_scope(path):
        lazy = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=zc.read_tag(path), lazy_mode=True)
        state: dict[str, torch.Tensor] = {}
        for key in list(lazy):
            t = lazy.pop(key)
            state[_strip(key)] = t.contiguous()  # a GatheredTensor gathers its slices from each shard here
    return state, meta["gpt"]
