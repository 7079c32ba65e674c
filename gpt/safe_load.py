"""Reading torch files that may come from elsewhere: weights only, a short allow-list, one-line errors.

    from gpt.safe_load import safe_load, weights_only_scope
    state = safe_load("ckpt/checkpoint/mp_rank_00_model_states.pt", deepspeed=True)  # CheckpointError names the file
    with weights_only_scope():      # every torch.load inside, DeepSpeed's own included, is weights-only
        engine.load_checkpoint(...)

A pickle can run code on load: a file whose pickle reduces to `os.system` runs it under
`torch.load(weights_only=False)`, which is what DeepSpeed calls internally (its checkpoint engine,
`zero_to_fp32`). torch's weights-only unpickler builds only tensors and plain containers plus the
globals one allow-lists. DeepSpeed's optimizer shards hold three of its own types (below): plain data
classes with no `__reduce__` / `__setstate__` of their own, so allowing them runs no code.

Why an environment variable: DeepSpeed passes `weights_only=False` explicitly, and torch's documented
override `TORCH_FORCE_WEIGHTS_ONLY_LOAD=1` is the one public switch that turns those calls safe
without patching DeepSpeed. `weights_only_scope` sets it (and the allow-list, with
`torch.serialization.safe_globals`) only around our calls into DeepSpeed's loaders and restores it.
It is process-wide while set: a torch.load in another thread of the same process is weights-only too,
which is safe, only stricter.

Errors are `gpt.checkpoint.CheckpointError` with one line naming the file; torch's advice to retry
with `weights_only=False` is never repeated (following it is how such a file runs its code).
"""
from __future__ import annotations

import functools
import os
import pickle
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Generator, Optional

import torch

from gpt.checkpoint import CheckpointError, one_line

_FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_FORCE_NOT = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"  # torch raises if both are set: cleared inside the scope


@functools.lru_cache(maxsize=None)
def deepspeed_safe_globals() -> tuple[Callable, ...]:
    """The DeepSpeed types its ZeRO checkpoints hold (found with get_unsafe_globals_in_checkpoint on
    ZeRO-1/2/3 fp32 and bf16 shards): the fp16 loss scaler objects (plain attributes: cur_scale,
    dynamic, ...), the ZeRO stage enum, and the fragment address dataclass (numel, start) of
    param_slice_mappings."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return (LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address)


def _qualname(g: Callable) -> str:
    return f"{g.__module__}.{g.__qualname__}"


def check_zip(path: Path) -> None:
    """A torch zip file whose central directory (written last) is intact: what truncation breaks."""
    try:
        if path.stat().st_size == 0:
            raise CheckpointError(f"{path}: empty file (0 bytes), the write was interrupted")
        with zipfile.ZipFile(path) as z:
            if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in z.namelist()):
                raise CheckpointError(f"{path}: not a torch file (zip without data.pkl)")
    except zipfile.BadZipFile:
        raise CheckpointError(f"{path}: truncated or not a torch zip file (no readable zip directory)") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None


def check_globals(path: Path, allowed: tuple[Callable, ...] = ()) -> None:
    """Refuse a file whose pickle imports anything but torch's weights-only set and `allowed`.

    Reads only the pickle's opcodes (torch.serialization.get_unsafe_globals_in_checkpoint), nothing
    is unpickled: this is what names the offending global in the error; the weights-only unpickler
    behind it is the guard.
    """
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable pickle ({one_line(e)})") from None
    bad = sorted(set(found) - {_qualname(g) for g in allowed})
    if bad:
        raise CheckpointError(f"{path}: refusing to load: its pickle imports {', '.join(bad[:3])}, which no "
                              "checkpoint of ours holds (a file from elsewhere can run code when unpickled)")


def safe_load(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = True,
              deepspeed: bool = False) -> Any:
    """torch.load(weights_only=True) of a zip-format torch file; CheckpointError (one line) otherwise.

    deepspeed: also allow DeepSpeed's own types (deepspeed_safe_globals). mmap: tensors stay on disk
    until touched, so reading a multi-GB optimizer shard this way costs its pickle, not its tensors.
    """
    p = Path(path)
    allowed = deepspeed_safe_globals() if deepspeed else ()
    check_zip(p)
    check_globals(p, allowed)
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(p, map_location=map_location, weights_only=True, mmap=mmap)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{p}: {one_line(e)}") from None  # says what was refused, never the unsafe advice
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{p}: not readable ({one_line(e)})") from None


@contextmanager
def weights_only_scope(source: str | os.PathLike = "a checkpoint file",
                       allowed: Optional[tuple[Callable, ...]] = None) -> Generator[None, None, None]:
    """Every torch.load in the block is weights-only with DeepSpeed's types allowed; an unpickling
    error leaves it as CheckpointError naming `source` (one line, no weights_only=False advice)."""
    allowed = deepspeed_safe_globals() if allowed is None else allowed
    saved = {k: os.environ.get(k) for k in (_FORCE, _FORCE_NOT)}
    os.environ[_FORCE] = "1"
    os.environ.pop(_FORCE_NOT, None)
    try:
        with torch.serialization.safe_globals(list(allowed)):
            yield
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{source}: {one_line(e)}") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
