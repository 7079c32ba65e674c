"""DeepSpeed ZeRO on CPU (gpt.zero) through the real pretraining recipe, 2 gloo ranks.

    TORCH_EXTENSIONS_DIR=$HOME/.cache/gpt-pipeline/torch_extensions \\
        .venv/bin/python -m pytest tests/test_zero.py -m slow -x -q

Each run is `python -m recipes.pretrain fit --config <yaml>` with the strategy selected in the
YAML (`class_path: gpt.zero.ZeroStrategy`, `init_args.config: recipes/deepspeed/zeroN.json`).
The first run compiles DeepSpeed's shm comm op (~60 s), cached in TORCH_EXTENSIONS_DIR after.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from gpt.config import GPTConfig
from gpt.model import GPT
from gpt.zero import load_consolidated
from tests.zero_callbacks import probe_tokens
from tests.pretrain_fixtures import ROOT, losses_by_step, metric_by_step, recipe_env, run_recipe, write_config, write_random_shards

pytestmark = pytest.mark.slow
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "gpt-pipeline" / "torch_extensions"))

STEPS = 10
ZERO_JSON = {s: str(ROOT / "recipes" / "deepspeed" / f"{s}.json") for s in ("zero1", "zero2", "zero3", "zero3_offload")}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_random_shards(tmp_path_factory.mktemp("zero") / "shards")


def _config(tmp: Path, shards: Path, strategy: str, every: int = 5) -> tuple[Path, Path]:
    tmp.mkdir(parents=True, exist_ok=True)
    run_dir = tmp / strategy
    logits = {"class_path": "tests.zero_callbacks.SaveLiveLogits", "init_args": {"path": str(tmp / "logits.pt")}}
    # vocab 300: room for the 300-id tokenizer gpt sample borrows below (a larger one is refused).
    cfg_path = write_config(tmp / f"{strategy}.yaml", run_dir, shards, devices=2, max_steps=STEPS,
                            every_n_train_steps=every, callbacks=[logits], vocab_size=300)
    cfg = yaml.safe_load(cfg_path.read_text())
    if strategy != "ddp":
        # "_sharded": the model is built inside deepspeed.zero.Init, then initialized shard-wise.
        json_name, sharded = strategy.removesuffix("_sharded"), strategy.endswith("_sharded")
        cfg["trainer"]["strategy"] = {"class_path": "gpt.zero.ZeroStrategy",
                                      "init_args": {"config": ZERO_JSON[json_name], "sharded_init": sharded}}
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return cfg_path, run_dir


def _train(tmp: Path, shards: Path, strategy: str, *extra: str) -> tuple[dict[int, float], Path]:
    cfg, run_dir = _config(tmp, shards, strategy)
    run_recipe(cfg, *extra, timeout=600)
    return losses_by_step(run_dir), run_dir


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, shards) -> tuple[dict[int, float], Path]:
    losses, run_dir = _train(tmp_path_factory.mktemp("ddp"), shards, "ddp")
    assert len(losses) == STEPS
    return losses, run_dir


def _assert_close(got: dict[int, float], want: dict[int, float], tol: float = 1e-5) -> None:
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    diffs = {s: abs(got[s] - want[s]) for s in want}
    assert max(diffs.values()) <= tol, diffs


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory, shards):
    """One 10-step run per stage, trained on first use and shared by the tests below."""
    runs: dict[str, tuple[dict[int, float], Path, Path]] = {}

    def get(stage: str) -> tuple[dict[int, float], Path, Path]:
        if stage not in runs:
            tmp = tmp_path_factory.mktemp(stage)
            losses, run_dir = _train(tmp, shards, stage)
            runs[stage] = (losses, run_dir, tmp / "logits.pt")
        return runs[stage]
    return get


# zero3_offload_sharded is llama-7b.yaml's strategy: parameters and Adam in host RAM, sharded build.
# Its optimizer is DeepSpeedCPUAdam (DeepSpeed refuses torch's AdamW with offload), torch's AdamW for DDP.
@pytest.mark.parametrize("stage", ["zero1", "zero2", "zero3", "zero3_sharded", "zero3_offload_sharded"])
def test_zero_losses_equal_ddp(zero_runs, ddp_run, stage):
    ddp_losses, ddp_dir = ddp_run
    losses, run_dir, live_logits = zero_runs(stage)
    print(f"{stage}: max |loss - ddp| over {STEPS} steps = {max(abs(losses[s] - ddp_losses[s]) for s in ddp_losses):.2e}")
    _assert_close(losses, ddp_losses)
    # The pre-clip gradient norm DeepSpeed computed (gpt.lm logs it from the engine) is DDP's.
    _assert_close(metric_by_step(run_dir, "train/grad_norm"), metric_by_step(ddp_dir, "train/grad_norm"), tol=1e-4)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert (ckpt / "latest").is_file()  # a DeepSpeed directory
    # The consolidated checkpoint is the live model: same logits.
    state, meta = load_consolidated(ckpt)
    model = GPT(GPTConfig.from_dict(meta["model_config"]))
    model.load_state_dict(state, strict=True)
    model.eval()
    with torch.no_grad():
        logits = model(probe_tokens(model.config.vocab_size))
    torch.testing.assert_close(logits, torch.load(live_logits, weights_only=True), rtol=0, atol=1e-5)


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_zero_resume_equals_uninterrupted(tmp_path, shards, zero_runs, stage):
    full, run_dir, _ = zero_runs(stage)
    # Resume from the step-5 checkpoint of the same run, in a fresh directory: steps 6..10 again.
    resumed_cfg, resumed_dir = _config(tmp_path / "resumed", shards, stage)
    ckpt = next((run_dir / "checkpoints").glob("*step=5*.ckpt"))
    run_recipe(resumed_cfg, "--ckpt_path", str(ckpt), timeout=600)
    resumed = losses_by_step(resumed_dir)
    _assert_close(resumed, {s: full[s] for s in resumed}, tol=0.0)
    assert sorted(resumed) == list(range(5, STEPS))


def _gpt_cli(*args: str) -> str:
    p = subprocess.run([sys.executable, "-m", "gpt", *args], cwd=ROOT, env=recipe_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def test_zero3_checkpoint_feeds_gpt_export_and_sample(tmp_path, zero_runs):
    """`gpt export --format hf` and `gpt sample` take the ZeRO-3 directory as it is."""
    from transformers import AutoModelForCausalLM

    from data_prep.train_tokenizer import train_tokenizer

    _, run_dir, live_logits = zero_runs("zero3")
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    _gpt_cli("export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "hf"), "--format", "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    probe = probe_tokens(hf.config.vocab_size)
    with torch.no_grad():
        hf_logits = hf(probe).logits
    torch.testing.assert_close(hf_logits, torch.load(live_logits, weights_only=True), rtol=0, atol=1e-4)

    # The random-token run has no tokenizer: lend one whose end-of-text id (0) matches the data's.
    src = tmp_path / "text.jsonl"
    src.write_text('{"text": "to be or not to be, that is the question"}\n' * 20)
    tok_path = tmp_path / "tokenizer.json"
    tok = train_tokenizer(str(src), str(tok_path), vocab_size=300)
    out = _gpt_cli("sample", "--checkpoint", str(ckpt), "--tokenizer", str(tok_path), "--prompt", "",
                   "--max_new_tokens", "12", "--temperature", "0")
    # Greedy from end-of-text with transformers on the exported weights: the same tokens.
    with torch.no_grad():
        ids = hf.generate(torch.tensor([[tok.eot_id]]), max_new_tokens=12, do_sample=False,
                          eos_token_id=tok.eot_id, pad_token_id=tok.eot_id)[0, 1:].tolist()
    ids = ids[: ids.index(tok.eot_id)] if tok.eot_id in ids else ids
    assert out.rstrip("\n") == tok.decode(ids)
