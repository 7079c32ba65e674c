"""gpt/flops.py: the device peak behind MFU comes from Lightning's GPU table, else a measurement.

    pytest tests/test_flops.py
"""
import pytest
import torch

import gpt.flops as flops


@pytest.fixture
def measured(monkeypatch):
    calls = []

    def fake(device="cpu", dtype=torch.float32, *args):
        calls.append((device, dtype))
        return 123e9
    monkeypatch.setattr(flops, "measure_matmul_peak", fake)
    return calls


def test_known_gpu_peak_is_lightnings_table(monkeypatch, measured):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    assert flops.peak_flops(torch.device("cuda", 0), torch.bfloat16) == 312e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert flops.peak_flops(torch.device("cuda", 0), torch.bfloat16) == pytest.approx(989.4e12)
    assert not measured  # no second table, no measurement when Lightning knows the chip


def test_unknown_gpu_and_cpu_are_measured(monkeypatch, measured):
    # Lightning's table has "h200 sxm1"/"h200 nvl1" entries that the device name "NVIDIA H200" never matches.
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert flops.peak_flops(torch.device("cuda", 0), torch.bfloat16) == 123e9
    assert flops.peak_flops("cpu", torch.float32) == 123e9
    assert measured == [("cuda:0", torch.bfloat16), ("cpu", torch.float32)]


def test_precision_strings_map_to_matmul_dtypes():
    assert flops.dtype_of_precision("bf16-mixed") is torch.bfloat16
    assert flops.dtype_of_precision("16-mixed") is torch.float16
    assert flops.dtype_of_precision("32-true") is torch.float32
    assert flops.dtype_of_precision("64-true") is torch.float64
