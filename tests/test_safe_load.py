"""gpt.safe_load: crafted pickles never run, DeepSpeed's own loaders are forced weights-only, errors are one line.

    .venv/bin/python -m pytest tests/test_safe_load.py -q
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from gpt.checkpoint import CheckpointError
from gpt.safe_load import safe_load, weights_only_scope
from tests.checkpoint_fixtures import write_crafted


def _one_line_naming(e: pytest.ExceptionInfo, path: Path) -> str:
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg
    assert "weights_only=False" not in msg and "weights_only" not in msg.replace("weights-only", ""), msg
    return msg


def test_crafted_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    f = write_crafted(tmp_path / "x.pt", marker)
    with pytest.raises(CheckpointError) as e:
        safe_load(f, deepspeed=True)
    assert "posix.system" in _one_line_naming(e, f)
    assert not marker.exists()


@pytest.mark.parametrize("content,reason", [(b"", "empty file"), (b"\x00garbage" * 100, "not a torch zip file")])
def test_empty_and_foreign_files(tmp_path, content, reason):
    f = tmp_path / "x.pt"
    f.write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        safe_load(f)
    assert reason in _one_line_naming(e, f)


def test_truncated_file(tmp_path):
    f = tmp_path / "x.pt"
    torch.save({"w": torch.zeros(1000)}, f)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError) as e:
        safe_load(f)
    assert "truncated" in _one_line_naming(e, f)


def test_deepspeed_types_only_when_asked(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    f = tmp_path / "optim.pt"
    torch.save({"loss_scaler": LossScaler(2.0), "zero_stage": ZeroStageEnum.gradients,
                "map": [fragment_address(numel=3, start=1)], "t": torch.ones(2)}, f)
    sd = safe_load(f, deepspeed=True)
    assert sd["loss_scaler"].cur_scale == 2.0 and sd["zero_stage"] is ZeroStageEnum.gradients
    assert sd["map"][0] == fragment_address(numel=3, start=1)
    with pytest.raises(CheckpointError) as e:  # a plain checkpoint holds none of them
        safe_load(f)
    assert "LossScaler" in _one_line_naming(e, f)


def test_scope_forces_deepspeeds_own_loaders_weights_only(tmp_path, monkeypatch):
    """DeepSpeed passes weights_only=False itself (checkpoint engine, zero_to_fp32): inside the scope
    those calls refuse a crafted pickle and still read DeepSpeed's real types; the env is restored."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.utils import zero_to_fp32

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # a user's setting is overridden, then restored
    marker = tmp_path / "pwned"
    crafted = write_crafted(tmp_path / "x.pt", marker)
    good = tmp_path / "good.pt"
    torch.save({"optimizer_state_dict": {"loss_scaler": LossScaler(1.0)}}, good)
    for load in (lambda p: TorchCheckpointEngine().load(str(p), map_location="cpu"),
                 lambda p: zero_to_fp32.parse_model_states([str(p)]),
                 lambda p: torch.load(p, weights_only=False)):
        with pytest.raises(CheckpointError) as e, weights_only_scope(crafted):
            load(crafted)
        _one_line_naming(e, crafted)
        assert not marker.exists()
    with weights_only_scope(good):
        assert isinstance(TorchCheckpointEngine().load(str(good))["optimizer_state_dict"]["loss_scaler"], LossScaler)
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ
    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1"
