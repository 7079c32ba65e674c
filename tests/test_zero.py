"""DeepSpeed ZeRO on CPU (gpt.zero) through the real pretraining recipe, 2 gloo ranks.

    TORCH_EXTENSIONS_DIR=$HOME/.cache/gpt-pipeline/torch_extensions \\
        .venv/bin/python -m pytest tests/test_zero.py -m slow -x -q

Each run is `python -m recipes.pretrain fit --config <yaml>` with the strategy selected in the
YAML (`class_path: gpt.zero.ZeroStrategy`, `init_args.config: recipes/deepspeed/zeroN.json`).
The first run compiles DeepSpeed's shm comm op (~60 s), cached in TORCH_EXTENSIONS_DIR after.
Kills inside a save use tests.zero_callbacks.KillDuringSave, which SIGKILLs the run's process group
at a chosen file of a chosen rank; the publish protocol's own steps are killed in
tests/test_zero_checkpoint.py.
"""
from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from gpt.checkpoint import CheckpointError, load_model
from gpt.config import GPTConfig
from gpt.model import GPT
from gpt.resume import checkpoint_step, find_resume_checkpoint
from gpt.zero import load_consolidated
from tests.checkpoint_fixtures import rewrite_manifest, write_crafted
from tests.zero_callbacks import probe_tokens
from tests.pretrain_fixtures import (ROOT, losses_by_step, metric_by_step, recipe_cmd, recipe_env, run_recipe,
                                     write_config, write_random_shards)

pytestmark = pytest.mark.slow
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "gpt-pipeline" / "torch_extensions"))

STEPS = 10
ZERO_JSON = {s: str(ROOT / "recipes" / "deepspeed" / f"{s}.json") for s in ("zero1", "zero2", "zero3", "zero3_offload")}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_random_shards(tmp_path_factory.mktemp("zero") / "shards")


def _config(tmp: Path, shards: Path, strategy: str, every: int = 5, kill: dict | None = None) -> tuple[Path, Path]:
    tmp.mkdir(parents=True, exist_ok=True)
    run_dir = tmp / strategy
    callbacks = [{"class_path": "tests.zero_callbacks.SaveLiveLogits", "init_args": {"path": str(tmp / "logits.pt")}}]
    if kill:
        callbacks.append({"class_path": "tests.zero_callbacks.KillDuringSave", "init_args": kill})
    # vocab 300: room for the 300-id tokenizer gpt sample borrows below (a larger one is refused).
    cfg_path = write_config(tmp / f"{strategy}.yaml", run_dir, shards, devices=2, max_steps=STEPS,
                            every_n_train_steps=every, callbacks=callbacks, vocab_size=300)
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


# ---- kills inside a save ------------------------------------------------------------------------
# Each chain kills the run twice at different moments, resuming in between from what
# find_resume_checkpoint picks, then lets a third run finish. Saves per run: step 5 periodic, step 5
# last.ckpt, step 10 periodic, step 10 last.ckpt (a resumed run: only the step-10 pair).
KILL_CHAINS = {
    "zero2": [
        # inside last.ckpt's save at step 10: rank 1 has written half of its optimizer shard
        ({"save": 4, "rank": 1, "moment": "partial", "file": 0}, ("last.ckpt", 5, 0)),
        # the resumed run's step-10 periodic save: rank 0 has written its model states, rank 1 maybe not
        ({"save": 1, "rank": 0, "moment": "after", "file": 0}, ("last.ckpt", 5, 0)),
    ],
    "zero3": [
        # the first last.ckpt (step 5): every rank's files written, nothing published: no last.ckpt at all
        ({"save": 2, "rank": 0, "moment": "commit"}, ("epoch=0-step=5.ckpt", 5, 2)),
        # the resumed run's step-10 periodic save: rank 1 has written half of its model states
        ({"save": 1, "rank": 1, "moment": "partial", "file": 0}, ("epoch=0-step=5.ckpt", 5, 2)),
    ],
}


def _run_until_killed(cfg: Path, *extra: str) -> None:
    # Its own session: KillDuringSave kills the run's process group, which must not hold pytest.
    p = subprocess.run(recipe_cmd(cfg, *extra), cwd=ROOT, env=recipe_env(), capture_output=True, text=True,
                       timeout=600, start_new_session=True)
    assert p.returncode == -signal.SIGKILL, f"rc {p.returncode}\n{p.stderr[-3000:]}"


def _last_run_losses(run_dir: Path) -> dict[int, float]:
    """train/loss by step from the newest CSV version only (a killed run may have flushed nothing)."""
    newest = max((run_dir / "csv").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    with open(newest / "metrics.csv") as f:
        return {int(float(r["step"])): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def _hidden(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_kill_inside_a_save_then_resume_equals_uninterrupted(tmp_path, shards, zero_runs, stage):
    full = zero_runs(stage)[0]
    resume_from: Path | None = None
    for kill, (name, step, n_notes) in KILL_CHAINS[stage]:
        cfg, run_dir = _config(tmp_path, shards, stage, kill=kill)
        _run_until_killed(cfg, *(["--ckpt_path", str(resume_from)] if resume_from else []))
        ckpts = run_dir / "checkpoints"
        assert len(_hidden(ckpts)) == 1, _hidden(ckpts)  # the killed save's staging (earlier ones collected)
        resume_from, notes = find_resume_checkpoint(ckpts)
        assert (resume_from, checkpoint_step(resume_from), len(notes)) == (ckpts / name, step, n_notes), notes
        if n_notes:
            assert notes == [f"no last.ckpt in {ckpts}",
                             f"resuming from {name}, step {step}: the newest valid periodic checkpoint"]
    cfg, run_dir = _config(tmp_path, shards, stage)
    run_recipe(cfg, "--ckpt_path", str(resume_from), timeout=600)
    resumed = _last_run_losses(run_dir)
    assert sorted(resumed) == list(range(5, STEPS))
    _assert_close(resumed, {s: full[s] for s in resumed}, tol=0.0)
    ckpts = run_dir / "checkpoints"
    assert find_resume_checkpoint(ckpts) == (ckpts / "last.ckpt", []) and checkpoint_step(ckpts / "last.ckpt") == STEPS
    assert _hidden(ckpts) == []


# ---- crafted pickles ------------------------------------------------------------------------------
def _shards_of(ckpt: Path) -> list[str]:
    return sorted(p.relative_to(ckpt).as_posix() for p in (ckpt / "checkpoint").glob("*.pt"))


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_crafted_shard_never_runs_when_consolidating(tmp_path, zero_runs, stage):
    """Every file kind (model states with the client state, optimizer shards; ZeRO-3: one model states per rank)."""
    src = zero_runs(stage)[1] / "checkpoints" / "last.ckpt"
    marker = tmp_path / "pwned"
    for rel in _shards_of(src):
        ckpt = tmp_path / rel.replace("/", "_") / "last.ckpt"
        shutil.copytree(src, ckpt)
        write_crafted(ckpt / rel, marker)
        rewrite_manifest(ckpt)  # a self-consistent directory: only the content gives it away
        for load in (load_consolidated, load_model):
            with pytest.raises(CheckpointError) as e:
                load(ckpt)
            msg = str(e.value)
            assert msg.startswith(f"{ckpt / rel}: refusing to load: its pickle imports posix.system"), msg
            assert "\n" not in msg
        assert not marker.exists()


@pytest.mark.parametrize("stage,rel", [("zero2", "checkpoint/zero_pp_rank_1_mp_rank_00_optim_states.pt"),
                                       ("zero3", "checkpoint/zero_pp_rank_0_mp_rank_00_model_states.pt")])
def test_resume_refuses_a_crafted_shard_in_one_line(tmp_path, shards, zero_runs, stage, rel):
    ckpt = tmp_path / "last.ckpt"
    shutil.copytree(zero_runs(stage)[1] / "checkpoints" / "last.ckpt", ckpt)
    marker = tmp_path / "pwned"
    write_crafted(ckpt / rel, marker)
    rewrite_manifest(ckpt)
    cfg, _ = _config(tmp_path / "resumed", shards, stage)
    p = run_recipe(cfg, "--ckpt_path", str(ckpt), timeout=600, check=False)
    assert p.returncode != 0
    assert not marker.exists()
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and p.stderr.strip().splitlines()[-1] == errors[0], p.stderr[-3000:]  # rank 0 says it once
    assert errors[0].startswith(f"error: {ckpt / rel}: refusing to load: its pickle imports posix.system")
    assert "Traceback" not in p.stderr and "weights_only=False" not in p.stderr, p.stderr[-3000:]
