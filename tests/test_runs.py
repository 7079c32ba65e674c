"""The run shape (gpt/run.py, recipes/cli.py): one run directory, resumes that refuse another run,
--init_from, one W&B run per job, progress lines, one-line errors.

    pytest tests/test_runs.py                 # parsing, identities, W&B login, schedules
    pytest tests/test_runs.py -m slow         # real recipe runs (subprocesses, tiny models)
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from gpt.run import compare_identity, shards_sha256, wandb_logged_in, wandb_offline_unless_configured
from recipes.cli import normalize_argv
from recipes.pretrain import main
from tests.pretrain_fixtures import (ROOT, losses_by_step, metric_by_step, read_wandb_run,
                                     recipe_cmd, recipe_env, run_recipe, write_config, write_random_shards,
                                     write_text_shards)

slow = pytest.mark.slow
TINY_CPU = ROOT / "recipes" / "configs" / "tiny-cpu.yaml"


# ---- fast: parsing and the pieces ----------------------------------------------------------
def _main_error(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as e:
        main(list(args))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_bad_flags_are_one_line(capsys):
    line = _main_error(capsys, "--config", str(TINY_CPU), "--model.preset", "nope")
    assert "--model.preset" in line and "'tiny'" in line and "got nope" in line
    line = _main_error(capsys, "--config", str(TINY_CPU), "--trainer.max_steps", "abc")
    assert line.startswith("error: --trainer.max_steps: expected int. got abc")
    for gone in ("--optimizer", "--lr_scheduler"):  # LightningCLI's own, which the module never honoured
        assert f"unrecognized arguments: {gone} " in _main_error(capsys, "--config", str(TINY_CPU), gone, "Adam")
    line = _main_error(capsys, "--config", str(TINY_CPU), "--trainer.default_root_dir", "x")
    assert "use --run_dir" in line


def test_dashes_and_underscores_and_default_subcommand(capsys):
    assert normalize_argv(["--trainer.max-steps=5", "--print-config", "--data.data_dir", "a-b"]) == \
        ["fit", "--trainer.max_steps=5", "--print_config", "--data.data_dir", "a-b"]
    assert normalize_argv(["validate", "--ckpt-path", "last"]) == ["validate", "--ckpt_path", "last"]
    assert normalize_argv(["--config", "c.yaml", "validate"]) == ["validate", "--config", "c.yaml"]
    assert normalize_argv(["--group", "validate"]) == ["fit", "--group", "validate"]  # a value, not a subcommand
    with pytest.raises(SystemExit) as e:  # --print_config without `fit`, flags with dashes
        main(["--config", str(TINY_CPU), "--trainer.max-steps", "7", "--print-config"])
    assert e.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["max_steps"] == 7 and printed["checkpoint_every"] == 100
    assert "optimizer" not in printed and "lr_scheduler" not in printed


def test_help_lists_presets_and_documents_every_field(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "{tiny,tiny-llama,gpt2-124m,gpt2-350m,gpt2-774m,gpt2-1.5b,llama-1b,llama-7b}" in out
    # jsonargparse prints "(type: ..., default: ...)" alone for a field without a docstring.
    run_keys = ("group", "run_dir", "name", "project", "wandb", "init_from", "checkpoint_every",
                "keep_checkpoints", "val_every", "print_every")
    docs = {}
    for line in re.sub(r"\n {3,}", " ", out).splitlines():  # one line per option
        m = re.match(r"^  --((?:model|data)\.\w+|\w+) (?:[A-Z_]+|\{[^}]*\}|\[ITEM,\.\.\.\]) +(.*)$", line)
        if m and (m.group(1).startswith(("model.", "data.")) or m.group(1) in run_keys):
            docs[m.group(1)] = re.split(r"\((?:required, )?type:", m.group(2))[0].strip()
    assert len([k for k in docs if k.startswith("model.")]) == 11  # + model.tokenizer, linked from data.tokenizer
    assert len([k for k in docs if k.startswith("data.")]) == 9 and all(k in docs for k in run_keys), sorted(docs)
    assert not [k for k, doc in docs.items() if len(doc) < 15], docs


def test_compare_identity_names_each_difference_with_both_values():
    saved = {"stage": "pretrain", "model.n_embd": 32, "tokenizer_sha256": "a" * 64, "model.betas": [0.9, 0.95]}
    now = {"stage": "pretrain", "model.n_embd": 64, "tokenizer_sha256": "b" * 64, "model.betas": (0.9, 0.95),
           "new_key": 1}
    assert compare_identity(saved, now) == ["model.n_embd 32 in the checkpoint, 64 now",
                                            f"tokenizer_sha256 {'a' * 12} in the checkpoint, {'b' * 12} now"]


def test_shards_hash_is_the_content_not_the_bookkeeping(tmp_path):
    from gpt.shards import read_manifest, write_manifest
    a = write_random_shards(tmp_path / "a", train_tokens=3000, val_tokens=600, seed=0)
    b = write_random_shards(tmp_path / "b", train_tokens=3000, val_tokens=600, seed=1)
    ma, mb = read_manifest(a), read_manifest(b)
    assert shards_sha256(ma) != shards_sha256(mb)
    write_manifest(a, {**ma, "sources": ["moved/elsewhere.jsonl"], "elapsed_s": 12.5})
    assert shards_sha256(read_manifest(a)) == shards_sha256(ma)


def test_resumed_schedule_follows_the_new_lr_and_length():
    from gpt.optim import LRSchedule, StepScheduler

    def make(lr: float, total: int):
        p = torch.nn.Parameter(torch.zeros(2))
        opt = torch.optim.AdamW([p], lr=lr)
        return opt, StepScheduler(opt, LRSchedule("cosine", 2, total, 0.1))

    opt, sched = make(1e-2, 8)
    for _ in range(4):
        opt.step()
        sched.step()
    state_opt, state_sched = opt.state_dict(), sched.state_dict()
    same_opt, same = make(1e-2, 8)  # unchanged config: exactly the uninterrupted values
    same_opt.load_state_dict(state_opt)
    same.load_state_dict(state_sched)
    assert same_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    new_opt, new = make(5e-3, 20)  # Lightning restores the optimizer first, then the scheduler
    new_opt.load_state_dict(state_opt)
    new.load_state_dict(state_sched)
    assert new.last_epoch == 4
    assert new_opt.param_groups[0]["lr"] == pytest.approx(5e-3 * LRSchedule("cosine", 2, 20, 0.1)(4), rel=1e-12)
    new_opt.step()
    new.step()
    assert new_opt.param_groups[0]["lr"] == pytest.approx(5e-3 * LRSchedule("cosine", 2, 20, 0.1)(5), rel=1e-12)


def test_ckpt_path_last_finds_last_or_the_newest_periodic_checkpoint(tmp_path):
    from gpt.resume import find_resume_checkpoint
    d = tmp_path / "checkpoints"
    assert find_resume_checkpoint(d)[0] is None  # nothing yet: a fresh start
    d.mkdir()
    # step=12 written before step=8: the step in the name decides, not the modification time
    for name, step in (("step=12.ckpt", 12), ("step=8.ckpt", 8), ("last.ckpt", 12)):
        torch.save({"state_dict": {}, "global_step": step}, d / name)
    assert find_resume_checkpoint(d) == (d / "last.ckpt", [])
    (d / "last.ckpt").unlink()
    path, notes = find_resume_checkpoint(d)
    assert path == d / "step=12.ckpt"
    assert notes == [f"no last.ckpt in {d}",
                     "resuming from step=12.ckpt, step 12: the newest valid periodic checkpoint"]


def _netrc(home: Path, host: str) -> None:
    (home / ".netrc").write_text(f"machine {host}\n  login user\n  password x\n")
    (home / ".netrc").chmod(0o600)


@pytest.fixture
def bare_wandb_env(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    for k in ("NETRC", "WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_CONFIG_DIR"):
        monkeypatch.delenv(k, raising=False)
    return tmp_path


def test_wandb_offline_unless_logged_in_anywhere(bare_wandb_env, monkeypatch):
    home = bare_wandb_env
    wandb_offline_unless_configured()
    assert os.environ["WANDB_MODE"] == "offline"
    monkeypatch.delenv("WANDB_MODE")
    _netrc(home, "api.wandb.ai")
    assert wandb_logged_in()
    wandb_offline_unless_configured()
    assert "WANDB_MODE" not in os.environ
    monkeypatch.setenv("WANDB_MODE", "disabled")  # an explicit choice is kept
    wandb_offline_unless_configured()
    assert os.environ["WANDB_MODE"] == "disabled"


def test_self_hosted_wandb_server_counts_as_logged_in(bare_wandb_env, monkeypatch):
    home = bare_wandb_env
    _netrc(home, "wandb.example.org")
    assert not wandb_logged_in()  # a netrc entry for some other host is not a W&B login
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert wandb_logged_in()
    monkeypatch.delenv("WANDB_BASE_URL")
    settings = home / ".config" / "wandb" / "settings"  # what `wandb login --host URL` saves
    settings.parent.mkdir(parents=True)
    settings.write_text("[default]\nbase_url = https://wandb.example.org\n")
    assert wandb_logged_in()


# ---- slow: real runs -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_random_shards(tmp_path_factory.mktemp("shards"), train_tokens=20_000, val_tokens=1_000)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shards) -> Path:
    """An 8-step run (checkpoints at 4 and 8, validation at 4 and 8), W&B offline, shared read-only."""
    tmp = tmp_path_factory.mktemp("trained")
    cfg = write_config(tmp / "cfg.yaml", tmp / "run", shards, max_steps=8, val_every=4, wandb=True)
    run_recipe(cfg)
    return tmp / "run"


def _cfg(trained: Path) -> Path:
    return trained.parent / "cfg.yaml"


def _one_error_line(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, p.stderr[-3000:]
    return errors[0]


def _copy_run(trained: Path, dst: Path) -> Path:
    shutil.copytree(trained, dst)
    return dst


@slow
def test_resume_refuses_another_runs_data_shape_and_batch_before_writing_anything(tmp_path, trained, shards):
    run = _copy_run(trained, tmp_path / "run")
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    other = write_random_shards(tmp_path / "other", train_tokens=20_000, val_tokens=1_000, seed=5)
    cases = {
        "shards": (["--data.data_dir", str(other)], "shards_sha256 "),
        "shape": (["--model.model_config.n_embd", "64"], "model.n_embd 32 in the checkpoint, 64 now"),
        "batch": (["--data.micro_batch_size", "2"], "global_batch_size 4 in the checkpoint, 2 now"),
        "seed": (["--data.seed", "8"], "data.seed 7 in the checkpoint, 8 now"),
        "weight decay": (["--model.weight_decay", "0.0"], "model.weight_decay 0.1 in the checkpoint, 0.0 now"),
    }
    for what, (flags, expect) in cases.items():
        p = run_recipe(_cfg(trained), "--run_dir", str(run), "--trainer.max_steps", "12", "--ckpt_path", "last",
                       *flags, check=False)
        line = _one_error_line(p)
        assert line.startswith(f"error: cannot resume {run / 'checkpoints' / 'last.ckpt'}: ") and expect in line, \
            (what, line)
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before  # no W&B run, no CSV version


@slow
def test_resume_refuses_another_tokenizer_with_its_shards(tmp_path):
    from data_prep.train_tokenizer import train_tokenizer
    src = str(ROOT / "data" / "shakespeare.jsonl.gz")
    for name, vocab in (("a", 300), ("b", 310)):
        train_tokenizer(src, str(tmp_path / f"{name}.json"), vocab_size=vocab, max_chars=60_000)
        write_text_shards(tmp_path / f"shards_{name}", tmp_path / f"{name}.json", max_chars=60_000)
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "run", tmp_path / "shards_a", tmp_path / "a.json",
                       max_steps=2, vocab_size=320)
    run_recipe(cfg)
    p = run_recipe(cfg, "--data.data_dir", str(tmp_path / "shards_b"), "--data.tokenizer", str(tmp_path / "b.json"),
                   "--trainer.max_steps", "4", "--ckpt_path", "last", check=False)
    line = _one_error_line(p)
    assert re.search(r"tokenizer_sha256 \w{12} in the checkpoint, \w{12} now; shards_sha256 ", line), line


@slow
def test_a_fresh_start_in_a_used_run_dir_is_refused(trained):
    p = run_recipe(_cfg(trained), "--run_dir", str(trained), check=False)
    line = _one_error_line(p)
    assert f"error: {trained} already holds a run (" in line and "--ckpt_path last" in line


@slow
def test_resume_applies_a_new_lr_and_max_steps_and_the_schedule_follows(tmp_path, trained):
    from gpt.optim import LRSchedule
    run = _copy_run(trained, tmp_path / "run")
    run_recipe(_cfg(trained), "--run_dir", str(run), "--ckpt_path", "last", "--model.lr", "5e-3",
               "--trainer.max_steps", "12")
    lrs = metric_by_step(run, "train/lr")
    old = LRSchedule("cosine", 2, 8, 0.1)
    new = LRSchedule("cosine", 2, 12, 0.1)
    for s in range(8):
        assert lrs[s] == pytest.approx(1e-2 * old(s), rel=1e-6), s
    for s in range(8, 12):
        assert lrs[s] == pytest.approx(5e-3 * new(s), rel=1e-6), s
    logged = yaml.safe_load(sorted((run / "csv").glob("version_*/hparams.yaml"))[-1].read_text())
    assert logged["model"]["lr"] == 5e-3 and logged["trainer"]["max_steps"] == 12  # recorded = applied


@slow
def test_copied_run_dir_resumes_there_and_keeps_pruning(tmp_path, trained):
    run = _copy_run(trained, tmp_path / "elsewhere" / "run")
    run_recipe(_cfg(trained), "--run_dir", str(run), "--ckpt_path", "last", "--trainer.max_steps", "16",
               "--keep_checkpoints", "2")
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    # step 4 (from before the copy) pruned by the resumed run; last.ckpt rewritten, no last-v1.ckpt
    assert names == ["last.ckpt", "step=12.ckpt", "step=16.ckpt"], names
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 16
    assert sorted(losses_by_step(run)) == list(range(16))
    assert not (trained / "checkpoints" / "step=12.ckpt").exists()  # the original is untouched


@slow
def test_checkpoint_interval_and_keep_count_by_flag(tmp_path, shards):
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "run", shards, max_steps=7, accumulate=2)
    run_recipe(cfg, "--checkpoint_every", "2", "--keep_checkpoints", "2", "--val_every", "3")
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step=4.ckpt", "step=6.ckpt"], names
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 7
    # validation every 3 optimizer steps (6 micro-batches with accumulate 2), logged at that step
    assert sorted(metric_by_step(tmp_path / "run", "val/loss")) == [3, 6]


@slow
def test_init_from_any_checkpoint_kind_takes_the_weights_and_records_the_parent(tmp_path, trained, shards):
    from gpt.checkpoint import load_model, save_model
    parent = trained / "checkpoints" / "last.ckpt"
    model, _ = load_model(parent)
    save_model(model, tmp_path / "export")  # the native export directory: another checkpoint kind
    want = torch.load(parent, weights_only=True)["state_dict"]
    for name, source in (("from_ckpt", parent), ("from_export", tmp_path / "export")):
        run = tmp_path / name
        cfg = write_config(tmp_path / f"{name}.yaml", run, shards, max_steps=1, model_args={"lr": 0.0})
        run_recipe(cfg, "--init_from", str(source))  # lr 0: the weights stay what was loaded
        got = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
        assert all(torch.equal(got["state_dict"][k], want[k]) for k in want), name
        assert got["run"]["parent"] == str(source.resolve())
        logged = yaml.safe_load((run / "csv" / "version_0" / "hparams.yaml").read_text())
        assert logged["run"]["parent_checkpoint"] == str(source.resolve()) and logged["init_from"] == str(source)
    bad = write_config(tmp_path / "bad.yaml", tmp_path / "bad", shards, max_steps=1, model={"n_embd": 64})
    line = _one_error_line(run_recipe(bad, "--init_from", str(parent), check=False))
    assert line == f"error: --init_from {parent}: the model shapes differ: model.n_embd 32 in the checkpoint, " \
                   f"64 in this run; model.intermediate_size 128 in the checkpoint, 256 in this run"


@slow
def test_init_from_a_reward_model_is_refused_before_anything_is_written(tmp_path, trained, shards):
    # A reward model is a GPT too (load_model reads its backbone and LM head), but its backbone moved
    # under the scalar head while the LM head stayed: a policy started from it would be a broken LM.
    ck = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)
    ck["gpt"]["heads"] = {"reward_head": {"in_features": 32, "out_features": 1}}
    torch.save(ck, tmp_path / "rm.ckpt")
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "run", shards, max_steps=1)
    line = _one_error_line(run_recipe(cfg, "--init_from", str(tmp_path / "rm.ckpt"), check=False))
    assert line == f"error: --init_from {tmp_path / 'rm.ckpt'}: holds a reward model (recipes/reward.py), not a " \
                   "language model; the pretrain stage starts from a language model (after SFT: the SFT run's checkpoint)"
    assert not (tmp_path / "run" / "checkpoints").exists()


@slow
def test_one_wandb_run_across_restarts_with_the_full_config(tmp_path, trained):
    run = _copy_run(trained, tmp_path / "run")
    run_recipe(_cfg(trained), "--run_dir", str(run), "--ckpt_path", "last", "--trainer.max_steps", "12")
    p = run_recipe(_cfg(trained), "validate", "--run_dir", str(run), "--ckpt_path", "last")
    assert re.search(r"^validating .*last.ckpt \(step 12\)\nval: loss \d+\.\d{4}$", p.stdout, re.M), p.stdout
    files = sorted(run.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2  # the first start and the restart; validate made none
    runs = [read_wandb_run(f) for f in files]
    assert {r["id"] for r in runs} == {(yaml.safe_load((run / "run.json").read_text()))["wandb_id"]}
    assert {(r["group"], r["job_type"]) for r in runs} == {("test", "pretrain")}
    cfg = runs[1]["config"]
    assert cfg["trainer"]["max_steps"] == 12 and cfg["trainer"]["precision"] == "32-true"
    assert cfg["trainer"]["accumulate_grad_batches"] == 1 and cfg["trainer"]["gradient_clip_val"] == 1.0
    assert cfg["seed_everything"] == 1234 and cfg["run"]["git_commit"] and cfg["run"]["resumed_at_step"] == 8
    assert len(cfg["run"]["identity"]["shards_sha256"]) == 64 and cfg["run"]["world_size"] == 1
    losses = [(row["_step"], row["train/loss"]) for r in runs for row in r["history"] if "train/loss" in row]
    assert sorted(s for s, _ in losses) == list(range(12))  # every step once, at W&B step = optimizer step
    assert dict(losses) == pytest.approx(losses_by_step(run), abs=1e-6)
    vals = sorted(row["_step"] for r in runs for row in r["history"] if "val/loss" in row)
    assert vals == [4, 8, 12]
    keys = set().union(*(row for r in runs for row in r["history"]))
    assert {"train/lr", "train/tokens_per_sec", "train/mfu", "train/grad_norm", "train/tokens"} <= keys
    assert not keys & {"epoch", "train/lengths", "train/batches", "train/device/items_per_sec", "lr-AdamW/pg1"}


@slow
def test_progress_lines_in_a_log_file(tmp_path, shards):
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "run", shards, max_steps=7, val_every=4)
    log = tmp_path / "out.log"
    with open(log, "w") as f:  # stdout is a file, as in a Slurm job
        subprocess.run(recipe_cmd(cfg, "--print_every", "3"), cwd=ROOT, env=recipe_env(), stdout=f,
                       stderr=subprocess.STDOUT, check=True, timeout=300)
    text = log.read_text()
    lines = re.findall(r"^step (\d+)/7 \| loss (\d+\.\d{4}) \| lr \S+ \|.*elapsed \d+:\d\d:\d\d(?: \| ETA .*)?$",
                       text, re.M)
    assert [int(s) for s, _ in lines] == [3, 6, 7], text[-2000:]
    losses = losses_by_step(tmp_path / "run")
    for s, loss in lines:  # the line after step N shows that step's loss (CSV row N - 1)
        assert float(loss) == pytest.approx(losses[int(s) - 1], abs=6e-5)
    assert re.search(r"^val after step 4: loss \d+\.\d{4}$", text, re.M)
    assert "tokens/s | MFU" in text
    for noise in ("Epoch 0/-2", "v_num", "Total FLOPs", "litlogger", "`srun` command is available", "anonymous"):
        assert noise not in text, noise


@slow
def test_validation_metrics_survive_a_kill_after_the_next_checkpoint(tmp_path, shards):
    run = tmp_path / "run"
    slow_val = [{"class_path": "tests.pretrain_fixtures.SlowDown", "init_args": {"seconds": 0.3}},
                {"class_path": "tests.pretrain_fixtures.SlowValidation", "init_args": {"seconds": 3.0}}]
    cfg = write_config(tmp_path / "cfg.yaml", run, shards, max_steps=12, val_every=4, callbacks=slow_val)
    proc = subprocess.Popen(recipe_cmd(cfg), cwd=ROOT, env=recipe_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (run / "checkpoints" / "step=4.ckpt").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert metric_by_step(run, "val/loss").keys() == {4}  # logged before the checkpoint that follows it
    run_recipe(cfg, "--ckpt_path", "last")
    assert sorted(metric_by_step(run, "val/loss")) == [4, 8, 12]


@slow
def test_setup_errors_are_one_line_before_anything_is_written(tmp_path, shards):
    cases = {
        "too many tokens": ({"max_steps": 1000}, [], "the run needs 128,000 train tokens"),
        "missing data": ({}, ["--data.data_dir", str(tmp_path / "nope")], f"no manifest.json in {tmp_path / 'nope'}"),
        "missing checkpoint": ({}, ["--ckpt_path", str(tmp_path / "x.ckpt")], f"--ckpt_path {tmp_path / 'x.ckpt'}: no such"),
        "missing init_from": ({}, ["--init_from", str(tmp_path / "x.ckpt")], f"{tmp_path / 'x.ckpt'}: no such file"),
    }
    for what, (kw, flags, expect) in cases.items():
        run = tmp_path / what.replace(" ", "_")
        cfg = write_config(tmp_path / "cfg.yaml", run, shards, wandb=True, **kw)
        line = _one_error_line(run_recipe(cfg, *flags, check=False))
        assert expect in line, (what, line)
        assert not run.exists(), what  # no W&B run, no run.json, no CSV


def test_checkpoint_meta_names_a_garbage_file_in_one_line(tmp_path):
    """--init_from / --ckpt_path at random bytes: the safe loader's one line, not torch's mmap advice."""
    from gpt.run import RunError, checkpoint_meta

    bad = tmp_path / "garbage.ckpt"
    bad.write_bytes(os.urandom(1000))
    with pytest.raises(RunError) as e:
        checkpoint_meta(bad)
    assert str(e.value) == f"{bad}: truncated or not a torch zip file (no readable zip directory)"
