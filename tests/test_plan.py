"""gpt/plan.py: model states equal DeepSpeed's own estimators; activations equal a measured CPU
forward/backward; the recommendation, the time and the CLI."""
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from gpt.config import GPTConfig
from gpt.flops import flops_per_token
from gpt.model import GPT
from gpt.objectives import causal_lm_loss
from gpt.plan import activation_bytes, make_plan, model_states, param_counts

ROOT = Path(__file__).resolve().parents[1]
# (gpus per node, nodes): one GPU, one node, several nodes, small nodes.
LAYOUTS = [(1, 1), (8, 1), (8, 8), (2, 4)]
PRESETS = ["gpt2-124m", "gpt2-1.5b", "llama-1b", "llama-7b"]


@pytest.fixture(scope="module")
def ds():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.zero import stage3, stage_1_and_2

    return stage_1_and_2, stage3


@pytest.mark.parametrize("preset", PRESETS)
def test_model_states_equal_deepspeed_estimators(ds, preset):
    z2, z3 = ds
    P, L = param_counts(GPTConfig.from_preset(preset))
    for g, n in LAYOUTS:
        G = g * n
        for off in (False, True):
            cpu, gpu = z2.estimate_zero2_model_states_mem_needs(P, g, n, cpu_offload=off)
            s = model_states(P, L, 2, G, g, offload_optimizer=off)
            assert (s.gpu, s.host) == (gpu, cpu), (preset, g, n, off)
        for off_opt, off_par in ((False, False), (True, False), (True, True)):
            cpu, gpu, layer = z3.estimate_zero3_model_states_mem_needs(
                P, L, g, n, cpu_offload=off_opt, cpu_offload_params=off_par, zero_init=True)
            s = model_states(P, L, 3, G, g, offload_optimizer=off_opt, offload_params=off_par)
            assert (s.gpu, s.host, s.gathered) == (gpu, cpu, layer), (preset, g, n, off_opt, off_par)
            # the breakdown adds up to the total (DeepSpeed truncates its split part to whole bytes)
            assert abs(s.weights + s.grads + s.optimizer + s.gathered - s.gpu) < 1


def test_all_cold_printouts_show_the_plans_numbers(ds):
    """The functions the DeepSpeed docs name print a table; the plan's GiB are the ones printed."""
    z2, z3 = ds
    P, L = param_counts(GPTConfig.from_preset("llama-7b"))
    g, n = 8, 8
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        z2.estimate_zero2_model_states_mem_needs_all_cold(P, g, n)
        z3.estimate_zero3_model_states_mem_needs_all_cold(P, L, g, n)
    printed = {}  # options -> (per CPU, per GPU) as printed, e.g. " 301.23GB |  14.32GB | offload_optimizer=none"
    for cpu, gpu, options in re.findall(r"^\s*([\d.]+)GB \|\s*([\d.]+)GB \| (.+)$", out.getvalue(), re.M):
        options = re.sub(r"\s+", "", options.replace("OffloadDeviceEnum.", ""))  # the enum prints oddly on 3.11+
        printed.setdefault(options, (cpu, gpu))  # zero2's rows come first
    rows = {
        "offload_optimizer=cpu": model_states(P, L, 2, g * n, g, offload_optimizer=True),
        "offload_optimizer=none": model_states(P, L, 2, g * n, g),
        "offload_param=cpu,offload_optimizer=cpu,zero_init=1": model_states(P, L, 3, g * n, g, True, True),
        "offload_param=none,offload_optimizer=cpu,zero_init=1": model_states(P, L, 3, g * n, g, True, False),
        "offload_param=none,offload_optimizer=none,zero_init=1": model_states(P, L, 3, g * n, g),
    }
    for options, s in rows.items():
        assert printed[options] == (f"{s.host / 2**30:.2f}", f"{s.gpu / 2**30:.2f}"), options


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama", "gpt2-124m"])
def test_param_counts_equal_the_built_model_and_deepspeed(ds, preset):
    _, z3 = ds
    cfg = GPTConfig.from_preset(preset)
    model = GPT(cfg)
    assert param_counts(cfg) == (model.num_params(), z3.model_to_params(model)[1])
    assert z3.model_to_params(model)[0] == model.num_params()


def test_model_states_by_stage_count_every_byte():
    P, L, G = 1000, 100, 4
    assert model_states(P, L, 0, G, G).gpu == 20 * P  # fp32 weights, grads + DDP buckets, Adam
    assert model_states(P, L, 1, G, G).gpu == 4 * P + 16 * P // G
    assert model_states(P, L, 1, G, G, offload_optimizer=True).gpu == 4 * P
    with pytest.raises(ValueError, match="ZeRO stage"):
        model_states(P, L, 4, G, G)


# ---- activations, measured on CPU ---------------------------------------------------------------------
ACT_CONFIGS = {  # small, with an LLM's proportions (vocab >> width)
    "gpt2": dict(flavour="gpt2", vocab_size=2048, block_size=64, n_layer=2, n_head=4, n_embd=128),
    "llama-gqa-qknorm": dict(flavour="llama", vocab_size=2048, block_size=64, n_layer=2, n_head=4, n_kv_head=2,
                             n_embd=128, intermediate_size=384, qk_norm=True),
}
B, T = 2, 64


def _model(name: str, precision: str, ckpt: bool = False) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_dict({**ACT_CONFIGS[name], "activation_checkpointing": ckpt})).train()
    return model.bfloat16() if precision == "bf16" else model  # bf16: what DeepSpeed's bf16 engine runs


def _loss(model: GPT, idx: torch.Tensor, precision: str) -> torch.Tensor:
    amp = torch.autocast("cpu", torch.bfloat16) if precision == "amp" else contextlib.nullcontext()
    with amp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # RMSNorm under autocast: "cannot dispatch to fused"
        return causal_lm_loss(model(idx), idx)[0]


@pytest.mark.parametrize("precision", ["fp32", "bf16", "amp"])
@pytest.mark.parametrize("name", list(ACT_CONFIGS))
def test_saved_activations_equal_saved_tensor_bytes(name, precision):
    """Bytes of the tensors autograd saves for backward (parameters excluded, each storage once)."""
    model = _model(name, precision)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            saved[s.data_ptr()] = s.nbytes()
        return t

    idx = torch.randint(0, 2048, (B, T))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _loss(model, idx, precision)
    plan = activation_bytes(model.config, B, T, precision, device="cpu").saved
    assert plan == pytest.approx(sum(saved.values()), rel=0.01)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "amp"])
@pytest.mark.parametrize("ckpt", [False, True])
@pytest.mark.parametrize("name", list(ACT_CONFIGS))
def test_activation_memory_equals_a_measured_forward_backward(name, ckpt, precision):
    """torch's MemTracker (every allocation by category) over one training step: memory held after the
    forward within 1%, peak during forward + backward within 15%, with and without checkpointing."""
    from torch.distributed._tools.mem_tracker import MemTracker

    model = _model(name, precision, ckpt)
    idx = torch.randint(0, 2048, (B, T))
    _loss(model, idx, precision).backward()  # gradients exist from here on: constant during the step
    tracker, dev = MemTracker(), torch.device("cpu")
    tracker.track_external(model)
    with tracker:
        loss = _loss(model, idx, precision)
        after_forward = tracker.get_tracker_snapshot("current")[dev]
        loss.backward()
    peak = tracker.get_tracker_snapshot("peak")[dev]

    def activations(snap):
        return snap["Total"] - snap["Parameter"] - snap["Gradient"] - snap["Buffer"]

    plan = activation_bytes(model.config, B, T, precision, checkpointing=ckpt, device="cpu")
    assert plan.saved == pytest.approx(activations(after_forward), rel=0.01)
    assert plan.peak == pytest.approx(activations(peak), rel=0.15)


def test_checkpointing_keeps_one_residual_per_layer():
    cfg = GPTConfig.from_preset("llama-7b")
    full = activation_bytes(cfg, 1, 4096, "bf16")
    ckpt = activation_bytes(cfg, 1, 4096, "bf16", checkpointing=True)
    no_layers = activation_bytes(GPTConfig.from_preset("llama-7b", n_layer=1), 1, 4096, "bf16", checkpointing=True)
    assert ckpt.saved - no_layers.saved == 31 * 2 * 4096 * 4096  # bf16 block inputs of 31 more layers
    assert ckpt.saved < full.saved / 8


# ---- the plan -----------------------------------------------------------------------------------------
def test_llama_7b_on_64_h100_zero3():
    p = make_plan("llama-7b", gpus=64, gpu="h100", zero=3, seq=4096, tokens=1e12, mfu=0.4)
    chosen = [r for r in p["rows"] if r["chosen"]]
    assert [(r["zero"], r["offload"]) for r in chosen] == [(3, False)]
    rec = p["recommended"]
    assert rec["recipe"] == "recipes/deepspeed/zero3.json" and not rec["activation_checkpointing"]
    assert rec["micro_batch"] * rec["accumulate_grad_batches"] * 64 * 4096 == rec["global_batch_tokens"] == 2**20
    fpt = flops_per_token(GPTConfig.from_preset("llama-7b"), 4096)
    assert p["time"]["seconds"] == pytest.approx(1e12 * fpt / (64 * 989.4e12 * 0.4))  # Lightning's H100 SXM row
    # the largest micro-batch fits the usable memory and one more does not
    row, cfg = chosen[0], GPTConfig.from_preset("llama-7b")
    m = row["max_micro_batch"]
    assert row["states"] + activation_bytes(cfg, m, 4096).peak <= 0.9 * 81559 * 2**20
    assert row["states"] + activation_bytes(cfg, m + 1, 4096).peak > 0.9 * 81559 * 2**20


def test_recommendation_prefers_the_cheapest_strategy_that_fits():
    small = make_plan("gpt2-124m", gpus=8, gpu="a100-80g")["recommended"]
    assert small["zero"] == 0 and small["recipe"] == "ddp" and not small["activation_checkpointing"]
    # a 7B model on 8 x 40 GB: DDP and ZeRO-1/2 keep the full bf16 weights; ZeRO-3 fits
    big = make_plan("llama-7b", gpus=8, gpu="a100-40g")["recommended"]
    assert big["zero"] == 3
    nothing = make_plan("llama-7b", gpus=1, gpu="h100", gpu_mem_gib=0.25)["recommended"]
    assert nothing["zero"] is None and "does not fit" in nothing["reason"]


def test_rl_counts_four_models():
    p = make_plan("llama-1b", gpus=8, gpu="h100", stage="rl")
    P, L = param_counts(GPTConfig.from_preset("llama-1b"))
    ddp = p["rows"][0]
    assert ddp["frozen"] == 2 * P + 2 * P  # reference + reward: bf16 weights
    assert ddp["states"] == 2 * 20 * P + 4 * P  # policy + value trainable (DDP, 20 B/param) + frozen
    z3 = p["rows"][5]
    assert z3["frozen"] == pytest.approx(2 * (2 * L + 2 * P / 8))


def _gpt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpt", "plan", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)


def test_cli_table_and_json(capsys):
    from gpt.cli import main

    r = _gpt("--preset", "llama-7b", "--gpus", "64", "--gpu", "h100", "--zero", "3", "--seq", "4096",
             "--micro-batch", "1", "--tokens", "1e12", "--mfu", "0.4")
    assert r.returncode == 0, r.stderr
    assert re.search(r"^\*\s+3\s+-\s", r.stdout, re.M), r.stdout
    assert "recipes/deepspeed/zero3.json" in r.stdout and "days" in r.stdout
    main(["plan", "--preset", "gpt2-124m", "--gpus", "8", "--gpu", "a100-80g", "--json"])  # bare flag = true
    p = json.loads(capsys.readouterr().out)
    assert p["params"] == GPT(GPTConfig.from_preset("gpt2-124m")).num_params()
    assert len(p["rows"]) == 7 and p["recommended"]["zero"] == 0


@pytest.mark.parametrize("args, message", [
    (["--gpu", "tpu"], "gpt: error: unknown --gpu 'tpu'; choose from h100"),
    (["--zero", "0", "--offload"], "gpt: error: --offload needs DeepSpeed"),
    (["--zero", "0", "--offload", "true"], "gpt: error: --offload needs DeepSpeed"),
    (["--preset", "nope"], "gpt: error: unknown preset 'nope'"),
])
def test_cli_errors_are_one_line(args, message, capsys):
    from gpt.cli import main

    with pytest.raises(SystemExit) as e:
        main(["plan", *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(message) and len(err.strip().splitlines()) == 1, err
