"""`precision: auto` (gpt/precision.py) and how the recipes resolve it (recipes/cli.py).

    pytest tests/test_precision.py -q
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

from gpt import precision as P
from recipes.pretrain import main

ROOT = Path(__file__).resolve().parents[1]
TINY_CPU = ROOT / "recipes" / "configs" / "tiny-cpu.yaml"
FLAGS = "fpu vme sse sse2 avx avx2 avx512f avx512bw"


def _cpuinfo(tmp_path: Path, flags: str) -> Path:
    f = tmp_path / "cpuinfo"
    f.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\n"
                 f"processor\t: 1\nflags\t\t: {flags}\n")
    return f


@pytest.fixture
def cpu(monkeypatch, tmp_path):
    """Point gpt.precision at a fake /proc/cpuinfo with the given flags; no GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def set_flags(flags: str) -> None:
        monkeypatch.setattr(P, "CPUINFO", _cpuinfo(tmp_path, flags))
    return set_flags


@pytest.mark.parametrize("flag", ["avx512_bf16", "amx_bf16"])
def test_cpu_with_native_bf16_gets_bf16_mixed(cpu, flag):
    cpu(f"{FLAGS} {flag}")
    assert P.resolve_precision("auto", "cpu") == ("bf16-mixed", f"auto: CPU has {flag}")
    assert P.resolve_precision("auto", "auto")[0] == "bf16-mixed"  # no GPU: Lightning's auto is the CPU


def test_cpu_without_native_bf16_gets_fp32(cpu):
    cpu(FLAGS + " avx512_vnni")  # AVX-512 alone emulates bf16: slower than fp32
    precision, why = P.resolve_precision("auto", "cpu")
    assert precision == "32-true" and why.startswith("auto: CPU has no native bf16")


def test_no_cpuinfo_means_fp32(monkeypatch, tmp_path):
    monkeypatch.setattr(P, "CPUINFO", tmp_path / "absent")  # macOS, Windows
    assert P.cpu_flags(tmp_path / "absent") == set()
    assert P.resolve_precision("auto", "cpu")[0] == "32-true"


def test_this_machines_cpuinfo_is_read():
    flags = P.cpu_flags()
    if not Path("/proc/cpuinfo").is_file():
        pytest.skip("no /proc/cpuinfo")
    assert "fpu" in flags or "sse2" in flags or "fp" in flags  # every x86/arm Linux lists some


@pytest.mark.parametrize("bf16,want", [(True, "bf16-mixed"), (False, "16-mixed")])
@pytest.mark.parametrize("accelerator", ["gpu", "cuda", "auto"])
def test_cuda_chooses_bf16_where_supported_else_fp16(monkeypatch, bf16, want, accelerator):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Some GPU")
    precision, why = P.resolve_precision("auto", accelerator)
    assert precision == want and "Some GPU" in why


def test_cpu_accelerator_ignores_a_gpu(cpu, monkeypatch):
    cpu(FLAGS)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert P.resolve_precision("auto", "cpu")[0] == "32-true"


@pytest.mark.parametrize("value", ["32-true", "bf16-mixed", "16-mixed", 32, "bf16", None])
def test_explicit_values_pass_through(cpu, value):
    cpu(FLAGS + " avx512_bf16")
    assert P.resolve_precision(value, "cpu") == (value, "set in the config")


def test_tiny_cpu_asks_for_auto():
    assert yaml.safe_load(TINY_CPU.read_text())["trainer"]["precision"] == "auto"


# ---- through the recipe: resolved before the Trainer exists, recorded resolved ----------------
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from tests.pretrain_fixtures import write_random_shards
    return write_random_shards(tmp_path_factory.mktemp("prec") / "shards")


def _fit(tmp_path: Path, shards: Path, *extra: str) -> None:
    from tests.pretrain_fixtures import write_config
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "run", shards, max_steps=2, precision="auto")
    main(["fit", "--config", str(cfg), "--wandb", "false", "--checkpoint_every", "0", "--val_every", "0", *extra])


@pytest.mark.parametrize("flags,want", [(FLAGS + " avx512_bf16", "bf16-mixed"), (FLAGS, "32-true")])
def test_recipe_resolves_auto_prints_it_and_records_the_real_value(tmp_path, shards, cpu, capsys, monkeypatch,
                                                                    flags, want):
    monkeypatch.setattr(sys, "argv", ["recipes.pretrain"])
    cpu(flags)
    _fit(tmp_path, shards)
    out = capsys.readouterr().out
    line = [ln for ln in out.splitlines() if ln.startswith("precision:")]
    assert len(line) == 1 and line[0].startswith(f"precision: {want} (auto: CPU has ")
    assert f"1 process(es), {want}" in out  # the Trainer ran in it
    run = tmp_path / "run"
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["precision"] == want
    hparams = yaml.safe_load(next(run.glob("csv/version_*/hparams.yaml")).read_text())
    assert hparams["trainer"]["precision"] == want
    # The checkpoint records the resolved value too; a resume where auto resolves the same continues.
    _fit(tmp_path, shards, "--ckpt_path", "last", "--trainer.max_steps", "3")
    out = capsys.readouterr().out
    assert "resuming" in out and "at step 2" in out and f"1 process(es), {want}" in out
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["precision"] == want


def test_explicit_precision_prints_no_auto_line(tmp_path, shards, cpu, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["recipes.pretrain"])
    cpu(FLAGS + " avx512_bf16")
    _fit(tmp_path, shards, "--trainer.precision", "32-true")
    out = capsys.readouterr().out
    assert "precision:" not in out and "1 process(es), 32-true" in out


def test_bad_precision_is_one_line(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["recipes.pretrain"])
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(TINY_CPU), "--trainer.precision", "bf17"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: --trainer.precision:") and "\n" not in err


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_gradients_are_clipped_with_the_fused_adamw(tmp_path, shards, capsys, monkeypatch, precision):
    """The recipe's AdamW is fused on CPU (gpt.optim); under bf16 autocast Lightning would refuse to clip
    for it, so gpt.lm clips itself: every step, to trainer.gradient_clip_val, the logged pre-clip norm."""
    from tests.pretrain_fixtures import metric_by_step, write_config
    monkeypatch.setattr(sys, "argv", ["recipes.pretrain"])
    seen, optimizers = [], []
    clip = torch.nn.utils.clip_grad_norm_

    def spy(parameters, max_norm, *args, **kwargs):
        params = [p for p in parameters if p.grad is not None]
        norm = clip(params, max_norm, *args, **kwargs)
        after = torch.nn.utils.get_total_norm([p.grad for p in params])
        seen.append((float(norm), float(max_norm), float(after)))
        return norm
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: (optimizers.append(self), step(self, *a, **k))[1])
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "run", shards, max_steps=3, precision=precision,
                       model_args={"lr": 0.5})  # a large lr: the gradients after step 0 exceed the clip
    main(["fit", "--config", str(cfg), "--checkpoint_every", "0", "--val_every", "0"])
    assert len(seen) == 3 and all(max_norm == 1.0 and after <= 1.0 + 1e-5 for _, max_norm, after in seen), seen
    assert any(norm > 1.0 for norm, _, _ in seen), seen  # clipping did something
    logged = metric_by_step(tmp_path / "run", "train/grad_norm")
    assert [round(logged[s], 4) for s in sorted(logged)] == [round(n, 4) for n, _, _ in seen]
    assert optimizers and all(o.defaults["fused"] for o in optimizers)
