"""recipes/pipeline.py + gpt/pipeline*.py: skip, force, resume, failure and summary with fake fast stages
(tests/pipeline_fakes.py); the real pipeline end to end on shrunken configs (slow). The Slurm chain:
tests/test_pipeline_slurm.py.

    pytest tests/test_pipeline.py                 # fake stages, a few seconds
    pytest tests/test_pipeline.py -m slow         # the real stages, tiny model, ~2-3 minutes
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from gpt.pipeline import Metric, PipelineError, Stage, build
from recipes.pipeline import main

ROOT = Path(__file__).resolve().parents[1]
FAKE = str(ROOT / "tests" / "pipeline_fakes.py")
CONFIGS = sorted((ROOT / "recipes" / "configs").glob("pipeline-*.yaml"))


def fake_stages(knob: Path, fail_b: bool = False, steps_b: int = 0, sleep: float = 0.0, quiet: bool = False
                ) -> list[dict]:
    """a -> b -> c; b also reads `knob` (a file outside the pipeline's dir, like a config)."""
    def cmd(name, *extra):
        return ["python", FAKE, name, "--ledger", "{dir}/ledger.txt", *extra]
    b_extra = ["--fail"] if fail_b else []
    if steps_b:
        b_extra += ["--steps", steps_b, "--sleep", sleep] + (["--quiet"] if quiet else [])
    return [
        {"name": "a", "run": [cmd("a", "--out", "{dir}/a.json", "--value", 1.5)], "out": "{dir}/a.json",
         "metrics": [{"name": "value", "json": "{dir}/a.json", "key": "value"}], "estimate_s": 1},
        {"name": "b", "run": [cmd("b", "--out", "{dir}/b/out.json", "--read", "{a.out}", "--read", str(knob),
                                  "--value", 0.25, *b_extra)],
         "out": "{dir}/b/out.json", "run_dir": "{dir}/b", "estimate_s": 1,
         "metrics": [{"name": "share", "json": "{b.out}", "key": "value", "percent": True}]},
        {"name": "c", "run": [cmd("c", "--out", "{dir}/c.json", "--read", "{b.out}")], "out": "{dir}/c.json",
         "transcript": True, "estimate_s": 1},
    ]


def write_config(tmp_path: Path, **kw) -> Path:
    knob = tmp_path / "knob.txt"
    if not knob.exists():
        knob.write_text("lr 1e-3\n")
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump({"dir": str(tmp_path / "out"), "group": "t", "stages": fake_stages(knob, **kw)}))
    return path


def ledger(tmp_path: Path) -> list[str]:
    f = tmp_path / "out" / "ledger.txt"
    return f.read_text().split() if f.exists() else []


def run(config: Path, *args: str) -> int:
    return main(["--config", str(config), *args])


def summary(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "out" / "summary.json").read_text())


def test_the_demo_post_trains_on_prompts_sft_never_saw():
    """Pairs and RL read the task's "post" split (phrasings of their own), not the SFT rows."""
    from recipes.pipeline import parser
    cfg = parser().parse_args(["--config", str(ROOT / "recipes" / "configs" / "pipeline-tiny-cpu.yaml")])
    pipe = build(cfg.stages, cfg.dir, cfg.group)
    rl = pipe.step("rl")
    assert rl.args[rl.args.index("--data.data") + 1] == f"{cfg.dir}/task/post.jsonl"
    pairs = next(c for c in pipe.step("pairs").commands if "data_prep.make_demo_pairs" in c)
    assert "--train_split" not in pairs  # make_demo_pairs' default: post
    import inspect
    from data_prep.make_demo_pairs import make_demo_pairs
    assert inspect.signature(make_demo_pairs).parameters["train_split"].default == "post"
    for name in ("rl-tiny-cpu.yaml", "rl-ppo-tiny-cpu.yaml"):
        data = yaml.safe_load((ROOT / "recipes" / "configs" / name).read_text())["data"]
        assert data["data"] == "runs/demo/task/post.jsonl", name
        assert data["val_data"] == "runs/demo/task/dev.jsonl", name


def test_the_stages_validate_on_dev_and_val_is_read_once_per_stage():
    """In-training validation (what one watches and tunes on) reads the dev split; the held-out test
    split (val) is scored once per stage, by gpt.evaluate (its own rows: gpt.demo_task "val")."""
    from recipes.pipeline import parser
    cfg = parser().parse_args(["--config", str(ROOT / "recipes" / "configs" / "pipeline-tiny-cpu.yaml")])
    pipe = build(cfg.stages, cfg.dir, cfg.group)
    words = lambda name: [str(w) for c in [pipe.step(name).args, *pipe.step(name).commands] for w in c]
    assert f"{cfg.dir}/task/dev.jsonl" in words("rl") and f"{cfg.dir}/task/val.jsonl" not in words("rl")
    assert f"{cfg.dir}/task/dev.jsonl" in words("sft_data") and f"{cfg.dir}/task/val.jsonl" not in words("sft_data")
    task = " ".join(words("task"))
    assert "--dev 500" in task and "--val 500" in task
    for name in ("sft-tiny-cpu.yaml", "dpo-tiny-cpu.yaml"):
        callbacks = yaml.safe_load((ROOT / "recipes" / "configs" / name).read_text())["trainer"]["callbacks"]
        (chat_eval,) = [c for c in callbacks if c["class_path"] == "gpt.chat_eval.ChatEval"]
        assert chat_eval["init_args"]["data"] == "runs/demo/task/dev.jsonl", name
    for name in ("sft", "dpo", "rl"):
        (evaluate,) = [c for c in pipe.step(name).commands if "gpt.evaluate" in c]
        assert "--rows" not in evaluate and "--data" not in evaluate  # gpt.evaluate's own held-out rows
    # Pairs: the reward model and DPO validate on dev pairs; the held-out pairs are scored once, after training.
    pairs = " ".join(words("pairs"))
    assert "--dev_prompts 300" in pairs and f"--val_source {cfg.dir}/pairs_src/dev.jsonl" in pairs
    (scored,) = [c for c in pipe.step("reward").commands if "score" in c]
    assert scored[scored.index("--pairs") + 1] == f"{cfg.dir}/pairs_src/val.jsonl"
    (metric,) = [m for m in pipe.step("reward").metrics if m.name == "pair accuracy"]
    assert metric.json == scored[scored.index("--json") + 1] and metric.key == "pair_accuracy"


def test_every_pipeline_config_builds():
    assert (ROOT / "recipes" / "configs" / "pipeline-tiny-cpu.yaml") in CONFIGS
    from recipes.pipeline import parser
    for path in CONFIGS:
        cfg = parser().parse_args(["--config", str(path)])
        pipe = build(cfg.stages, cfg.dir, cfg.group)
        names = [s.name for s in pipe.steps]
        assert names[:3] == ["tokenizer", "shards", "pretrain"], path
        pretrain = pipe.step("pretrain")
        assert pretrain.deps == ["tokenizer", "shards"]
        assert pretrain.main[-6:] == ["--group", cfg.group, "--run_dir", f"{cfg.dir}/pretrain", "--ckpt_path", "last"]
        for s in pipe.steps:  # a recipe after pretraining starts from an earlier stage's checkpoint
            if s.kind == "recipe" and s.name != "pretrain" and "--init_from" in s.args:
                source = s.args[s.args.index("--init_from") + 1]
                assert source in [pipe.step(d).out for d in s.deps], (s.name, source)


def test_first_run_runs_every_stage_and_writes_the_summary(tmp_path, capsys):
    config = write_config(tmp_path)
    assert run(config) == 0
    assert ledger(tmp_path) == ["a", "b", "c"]
    out = capsys.readouterr().out
    assert "[1/3] a: first run; estimate 0:01" in out and "[2/3] b: done in" in out and ": share 25.0%" in out
    s = summary(tmp_path)
    assert s["pipeline"]["state"] == "done" and s["pipeline"]["group"] == "t"
    rows = {r["stage"]: r for r in s["stages"]}
    assert [r["stage"] for r in s["stages"]] == ["a", "b", "c"]
    assert rows["a"]["metrics"] == {"value": 1.5} and rows["b"]["metrics"] == {"share": 0.25}
    assert all(r["status"] == "done" and r["wall_s"] > 0 for r in rows.values())
    assert rows["c"]["output"] == str(tmp_path / "out" / "c.json")
    assert "c: wrote" in rows["c"]["transcript"]
    for name in "abc":  # each stage's output is in its log, after the command line
        log = (tmp_path / "out" / "logs" / f"{name}.log").read_text()
        assert f"$ python {FAKE} {name}" in log and f"{name}: wrote" in log
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "| b | done | share 25.0% |" in md and "[log](logs/b.log)" in md and "```text" in md
    assert "stage  status" in out.split("[3/3] c: done")[1]  # the table, printed at the end


def test_a_rerun_skips_finished_stages(tmp_path, capsys):
    config = write_config(tmp_path)
    assert run(config) == 0
    assert run(config) == 0
    assert ledger(tmp_path) == ["a", "b", "c"]  # nothing ran twice
    assert "[2/3] b: skipped (done, inputs unchanged" in capsys.readouterr().out
    rows = {r["stage"]: r for r in summary(tmp_path)["stages"]}
    assert {r["status"] for r in rows.values()} == {"skipped"}
    assert rows["b"]["metrics"] == {"share": 0.25} and rows["b"]["wall_s"] > 0  # from the first run


def test_a_changed_input_reruns_that_stage_and_the_ones_reading_it(tmp_path, capsys):
    config = write_config(tmp_path)
    assert run(config) == 0
    (tmp_path / "out" / "b" / "leftover").write_text("from the first run")
    (tmp_path / "knob.txt").write_text("lr 3e-4\n")  # b's "config"
    capsys.readouterr()
    assert run(config, "--dry_run") == 0
    dry = capsys.readouterr().out
    assert "b            run (fresh)     changed since the last run: file " + str(tmp_path / "knob.txt") in dry
    assert "c            run (fresh)     an upstream stage runs again" in dry
    assert ledger(tmp_path) == ["a", "b", "c"]  # a dry run runs nothing
    assert run(config) == 0
    assert ledger(tmp_path) == ["a", "b", "c", "b", "c"]
    assert not (tmp_path / "out" / "b" / "leftover").exists()  # a fresh start: b's run directory was cleaned
    out = capsys.readouterr().out
    assert "[3/3] c: changed since the last run: after b" in out


def test_an_unchanged_upstream_output_keeps_downstream(tmp_path):
    config = write_config(tmp_path)
    assert run(config) == 0
    assert run(config, "--force", "b") == 0  # b runs again and writes the same bytes...
    assert ledger(tmp_path) == ["a", "b", "c", "b", "c"]  # ...but --force b means b and every stage after it
    stages = yaml.safe_load(config.read_text())["stages"]
    stages[2]["estimate_s"] = 2  # not part of the fingerprint
    config.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), "stages": stages}))
    assert run(config) == 0
    assert ledger(tmp_path) == ["a", "b", "c", "b", "c"]


def test_force_reruns_a_stage_and_the_later_ones_or_all(tmp_path):
    config = write_config(tmp_path)
    assert run(config) == 0
    assert run(config, "--force", "b") == 0
    assert ledger(tmp_path) == ["a", "b", "c", "b", "c"]
    assert run(config, "--force") == 0  # bare: all
    assert ledger(tmp_path)[5:] == ["a", "b", "c"]
    assert run(config, "--force", "nope") == 2


def test_a_failing_stage_stops_the_pipeline_with_one_line(tmp_path, capsys):
    config = write_config(tmp_path, fail_b=True)
    assert run(config) == 1
    assert ledger(tmp_path) == ["a", "b"]  # c never ran
    err = capsys.readouterr().err
    log = tmp_path / "out" / "logs" / "b.log"
    assert err.strip().splitlines() == [f"error: stage b failed (exit status 3); its log: {log}"]
    assert "b: something went wrong" in log.read_text()
    s = summary(tmp_path)
    assert s["pipeline"]["state"] == "failed"
    assert [r["status"] for r in s["stages"]] == ["done", "failed", "pending"]
    # Fixed (here: the same stage, now passing): the re-run continues at b, a stays done.
    write_config(tmp_path)
    assert run(config) == 0
    assert ledger(tmp_path) == ["a", "b", "b", "c"]


@pytest.mark.slow  # subprocesses
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_stops_the_stage_and_a_rerun_resumes_inside_it(tmp_path, sig):
    config = write_config(tmp_path, steps_b=60, sleep=0.05)
    cmd = [sys.executable, "-m", "recipes.pipeline", "--config", str(config)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "out" / "logs" / "b.log"
    deadline = time.monotonic() + 120
    while not (log.exists() and "b: step 3\n" in log.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(sig)  # Ctrl-C, or the SIGTERM of a closed session / `kill`
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out, err)
    assert f"pipeline: stopped in stage b; the same command resumes it (log: {log})" in err
    stopped = int((tmp_path / "out" / "b" / "out.json.state").read_text())
    assert 3 <= stopped < 60 and f"b: interrupted after step {stopped}" in out
    marker = json.loads((tmp_path / "out" / "stages" / "b.json").read_text())
    assert marker["state"] == "started" and marker["spent_s"] > 0
    assert summary(tmp_path)["pipeline"]["state"] == "stopped"

    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "[2/3] b: resuming the interrupted run" in r.stdout
    assert f"b: starting at step {stopped}" in r.stdout  # inside the stage: its own progress was kept
    assert json.loads((tmp_path / "out" / "b" / "out.json").read_text())["started_at_step"] == stopped
    assert ledger(tmp_path) == ["a", "b", "b", "c"]
    wall = {x["stage"]: x["wall_s"] for x in summary(tmp_path)["stages"]}
    assert wall["b"] >= marker["spent_s"]  # both attempts count


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True


@pytest.mark.slow  # subprocesses
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_runner_takes_its_stage_down_and_a_rerun_resumes_inside_it(tmp_path):
    # b is quiet: only the kernel's signal, not a broken pipe, can tell it that the runner is gone.
    config = write_config(tmp_path, steps_b=400, sleep=0.05, quiet=True)
    cmd = [sys.executable, "-m", "recipes.pipeline", "--config", str(config)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = tmp_path / "out" / "b" / "out.json.state"
    deadline = time.monotonic() + 120
    while not (state.exists() and int(state.read_text() or 0) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    log = (tmp_path / "out" / "logs" / "b.log").read_text()
    pid = int(log.split("(pid ", 1)[1].split(")")[0])
    proc.kill()  # kill -9: the runner gets no chance to stop the stage
    proc.communicate(timeout=60)
    deadline = time.monotonic() + 5  # b alone would need 20 s more
    while not _gone(pid):
        assert time.monotonic() < deadline, f"stage b (pid {pid}) runs on after its runner was killed"
        time.sleep(0.05)
    stopped = int(state.read_text())
    assert 3 <= stopped < 400
    assert json.loads((tmp_path / "out" / "stages" / "b.json").read_text())["state"] == "started"

    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "[1/3] a: skipped (done, inputs unchanged" in r.stdout
    assert "[2/3] b: resuming the interrupted run" in r.stdout
    assert json.loads((tmp_path / "out" / "b" / "out.json").read_text())["started_at_step"] == stopped
    assert ledger(tmp_path) == ["a", "b", "b", "c"]


@pytest.mark.parametrize("change, message", [
    ({"run": [["python", "-c", "print(1)", "{nope.out}"]]}, "stage 'b': {nope...} is neither dir, group nor an earlier stage"),
    ({"run": [["python", "-c", "print(1)", "{c.out}"]]}, "stage 'b': {c...} is neither dir, group nor an earlier stage"),
    ({"run": [["python", "{a.log}"]]}, "stage 'b': {a.log}: a stage offers out, run_dir, hf"),
    ({"name": "a"}, "stage 'a': a second stage with this name"),
    ({"name": "b-2"}, "stage 'b-2': name must be an identifier"),
    ({"args": ["--x"]}, "stage 'b': args go to a recipe or prep job; plain commands go in run"),
    ({"metrics": [{"name": "m", "json": "x.json"}]}, "stage 'b': metric 'm': give json + key, or csv"),
])
def test_bad_pipelines_are_one_line(tmp_path, change, message):
    stages = fake_stages(tmp_path / "knob.txt")
    stages[1].update(change)
    with pytest.raises(PipelineError) as e:
        build([_stage(s) for s in stages], "d", "g")
    assert str(e.value).startswith(message)


def _stage(d: dict) -> Stage:
    return Stage(**{**d, "metrics": [Metric(**m) for m in d.get("metrics", [])]})


def test_a_bad_key_is_one_line(tmp_path, capsys):
    config = write_config(tmp_path)
    cfg = yaml.safe_load(config.read_text())
    cfg["stages"][0]["rnu"] = [["x"]]
    config.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as e:
        run(config)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "rnu" in err[0]



# ---- the real pipeline, shrunk ------------------------------------------------------------------

def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and text in path.read_text()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"never saw {text!r} in {path}: {proc.communicate()[0][-3000:]}")
        time.sleep(0.02)


@pytest.mark.slow
def test_the_real_pipeline_end_to_end_with_a_ctrl_c_inside_pretraining(tmp_path):
    from tests.pipeline_fixtures import shrunk_pipeline, write_pipeline
    d = tmp_path / "demo"
    config = write_pipeline(shrunk_pipeline(d, pretrain_steps=60), tmp_path / "pipeline.yaml")
    cmd = [sys.executable, "-m", "recipes.pipeline", "--config", str(config)]
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    log = d / "logs" / "pretrain.log"
    _wait_for(log, "step 5/60 |", proc)
    proc.send_signal(signal.SIGINT)  # Ctrl-C: the recipe checkpoints after its current step and stops
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 130, out[-3000:]
    assert f"pipeline: stopped in stage pretrain; the same command resumes it (log: {log})" in out
    stopped = int(log.read_text().split("stopping for requeue")[0].rsplit("at step ", 1)[1].split(",")[0])
    assert 5 <= stopped < 60
    assert f"last.ckpt saved at step {stopped}" in log.read_text()

    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "[1/" in r.stdout and "tokenizer: skipped (done, inputs unchanged" in r.stdout
    assert "pretrain: resuming the interrupted run" in r.stdout
    assert f"resuming {d}/pretrain/checkpoints/last.ckpt at step {stopped}" in log.read_text()

    s = json.loads((d / "summary.json").read_text())
    rows = {row["stage"]: row for row in s["stages"]}
    assert s["pipeline"]["state"] == "done" and s["pipeline"]["group"] == "demo"
    assert all(row["status"] in ("done", "skipped") and row["wall_s"] > 0 for row in rows.values()), rows
    assert rows["shards"]["metrics"]["train tokens"] > 1_000_000
    pre = rows["pretrain"]
    assert 0 < pre["metrics"]["val loss"] < 8.4 and 0 < pre["metrics"]["bpb"] < 4.5  # below uniform (ln 4096 = 8.3)
    assert 0 <= pre["metrics"]["exact-match"] <= 1
    assert pre["checkpoint"] == f"{d}/pretrain/checkpoints/last.ckpt" and Path(pre["checkpoint"]).is_file()
    assert (Path(pre["hf"]) / "config.json").is_file()
    assert pre["wandb"]["mode"] == "offline" and Path(pre["wandb"]["path"]).is_dir()
    assert f"{d}/pretrain/plots/loss.png" in pre["plots"]
    assert "ROMEO:" in rows["sample"]["transcript"]
    # The training stages' W&B runs share the group; each recipe after pretraining started from the
    # checkpoint of the stage it names (`--init_from`), recorded by the run as its parent.
    from gpt.run import checkpoint_meta
    import yaml as _yaml
    for name, row in rows.items():
        if row["checkpoint"]:
            config_yaml = _yaml.safe_load((d / name / "config.yaml").read_text())
            assert config_yaml["group"] == "demo"
            parent = (checkpoint_meta(row["checkpoint"]).get("run") or {}).get("parent")
            if name != "pretrain":
                assert parent == str(Path(config_yaml["init_from"]).resolve())
                assert config_yaml["init_from"] in [rows[u]["checkpoint"] for u in rows]
    md = (d / "summary.md").read_text()
    assert "| pretrain | done |" in md and "![loss](pretrain/plots/loss.png)" in md


def test_the_eta_is_not_thrown_by_a_short_stage(tmp_path):
    from gpt.pipeline_run import Runner
    pipe = build([_stage(s) for s in fake_stages(tmp_path / "knob.txt")], str(tmp_path / "out"), "t")
    runner = Runner(pipe)
    assert runner.scale() == 1.0  # nothing measured yet: the YAML's estimates
    runner.measured = [3.0, 20.0]  # a 3 s tokenizer estimated at 20 s...
    assert 0.75 < runner.scale() < 1.0  # ...barely moves the estimate of a 4-minute pretraining
    runner.measured = [600.0, 200.0]  # stages that ran 3x their estimates: the rest will too, roughly
    assert 2.5 < runner.scale() <= 3.0


def test_summaries_written_by_parallel_jobs_do_not_collide(tmp_path, monkeypatch):
    """On Slurm, stages that do not read each other finish as parallel jobs, and each rewrites the
    summary: a second write between the first one's write and rename must not make it fail."""
    from types import SimpleNamespace

    from gpt.pipeline_summary import write_summary

    assert run(write_config(tmp_path)) == 0
    pipe, s, real, calls = SimpleNamespace(dir=tmp_path / "out"), summary(tmp_path), os.replace, []

    def interleaved(src, dst):
        if not calls:
            calls.append(src)
            write_summary(pipe, s)  # the other job
        real(src, dst)

    monkeypatch.setattr(os, "replace", interleaved)
    write_summary(pipe, s)
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == s
    assert not list((tmp_path / "out").glob("*.tmp"))
