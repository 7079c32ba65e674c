"""slurm/pipeline.sh + gpt/pipeline_slurm.py: the pipeline as one Slurm submission.

    pytest tests/test_pipeline_slurm.py                 # the submitted chain, through a recording sbatch
    pytest tests/test_pipeline_slurm.py -m cluster      # the real chain on the two-node test cluster

Without a cluster, a stand-in `sbatch` on PATH records every submission (its options, and the
script a runner job gets on stdin) and answers job ids, so the tests check the chain that
slurm/pipeline.sh builds: which jobs, in which order, waiting for which (--dependency=afterok).
The report job's reading of Slurm's records is checked with recorded `scontrol show job` output.
The `cluster` tests run the chain for real (tests/slurm_fixtures.py; never on a shared machine).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from gpt.pipeline import build, fingerprint, plan, write_marker
from gpt.pipeline_slurm import slurm_plan
from recipes.pipeline import main, parser
from slurm_fixtures import SlurmJobs, assert_completed, slurm_cluster, slurm_jobs  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "recipes" / "configs" / "pipeline-tiny-cpu.yaml"


def test_slurm_plan_chains_the_stages_and_skips_finished_ones(tmp_path):
    cfg = parser().parse_args(["--config", str(ROOT / "recipes" / "configs" / "pipeline-tiny-cpu.yaml"),
                               "--dir", str(tmp_path / "demo")])
    pipe = build(cfg.stages, cfg.dir, cfg.group)
    jobs = slurm_plan(pipe, "P.yaml", plan(pipe), ["--dir", cfg.dir])
    by_name = {j[0]: j for j in jobs}
    assert by_name["tokenizer"][:4] == ["tokenizer", "run", "-", "--"]
    assert by_name["tokenizer"][4:] == ["--config", "P.yaml", "--dir", cfg.dir, "--only", "tokenizer"]
    shards = by_name["shards"]
    assert shards[1:6] == ["prep", "tokenizer", "--tasks", "2", "--"] and shards[6] == "data_prep.make_shards"
    assert by_name["shards_after"][1:3] == ["run", "shards"] and by_name["shards_after"][-1] == "--after_main"
    train = by_name["pretrain"]
    assert train[1:3] == ["train", "tokenizer,shards_after"]
    assert train[train.index("--") + 1:][:2] == ["pretrain", "recipes/configs/tiny-cpu.yaml"]
    assert train[-4:] == ["--group", "demo", "--run_dir", f"{cfg.dir}/pretrain"]
    # A stage already done with the same inputs gets no job, and nothing waits for it.
    (tmp_path / "demo" / "tokenizer.json").parent.mkdir(parents=True)
    (tmp_path / "demo" / "tokenizer.json").write_text("{}")
    write_marker(pipe, "tokenizer", {"state": "done", "fingerprint": fingerprint(pipe, pipe.step("tokenizer"))})
    jobs = slurm_plan(pipe, "P.yaml", plan(pipe))
    assert [j[0] for j in jobs][:2] == ["shards", "shards_after"] and jobs[0][2] == "-"


# ---- slurm/pipeline.sh: the submitted chain, without a cluster -------------------------------------

FAKE_SBATCH = """#!{python}
# Records each submission (its options and, for a script given on stdin, the script) and answers
# the next job id, as `sbatch --parsable` does.
import json, os, sys
log = os.environ["FAKE_SBATCH_LOG"]
n = sum(1 for _ in open(log)) if os.path.exists(log) else 0
args = sys.argv[1:]
script = next((a for a in args if not a.startswith("-")), None)
stdin = sys.stdin.read() if script is None else None  # real sbatch reads stdin only without a script
with open(log, "a") as f:
    f.write(json.dumps({{"id": str(101 + n), "args": args, "stdin": stdin}}) + "\\n")
print(f"{{101 + n}};cluster")
"""


def submit_chain(tmp_path: Path, *pipeline_args: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(FAKE_SBATCH.format(python=sys.executable))
    sbatch.chmod(0o755)
    log = tmp_path / "sbatch.jsonl"
    log.unlink(missing_ok=True)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_SBATCH_LOG": str(log),
           "GPT_REPO": str(ROOT), "PYTHON": sys.executable}
    r = subprocess.run([str(ROOT / "slurm" / "pipeline.sh"), "--partition=debug", "--",
                        str(ROOT / "recipes" / "configs" / "pipeline-tiny-cpu.yaml"), "--dir", str(tmp_path / "demo"),
                        *pipeline_args], cwd=tmp_path, env=env, capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=120)
    assert r.returncode == 0, r.stderr
    return r, [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _runner_args(job: dict) -> list[str]:
    """The options of a runner job (its script on stdin: cd REPO && exec PYTHON -m recipes.pipeline ...)."""
    words = shlex.split(job["stdin"].splitlines()[-1])
    return words[words.index("recipes.pipeline") + 1:]


def _dep(job: dict) -> str | None:
    """The job's one --dependency (sbatch would take the last of several: a chain must give one)."""
    deps = [a.split("=", 1)[1] for a in job["args"] if a.startswith("--dependency")]
    assert len(deps) <= 1, job["args"]
    return deps[0] if deps else None


def test_slurm_pipeline_submits_the_stages_as_a_dependency_chain(tmp_path):
    r, jobs = submit_chain(tmp_path)
    d = tmp_path / "demo"
    tok, array, merge, shards_after, pretrain, pretrain_after, sample = jobs[:7]
    report = jobs[-1]
    assert all("--partition=debug" in j["args"] for j in jobs)  # the options before `--`, on every job
    # tokenizer: a runner job for the one stage, first, waiting for nothing
    assert _dep(tok) is None and "--job-name=gpt-tokenizer" in tok["args"]
    assert tok["stdin"].startswith(f"#!/usr/bin/env bash\ncd {ROOT} && exec {sys.executable} -m recipes.pipeline")
    config = str(ROOT / "recipes" / "configs" / "pipeline-tiny-cpu.yaml")
    assert _runner_args(tok) == ["--config", config, "--dir", str(d), "--only", "tokenizer"]
    # shards: slurm/data_prep.sh's array after the tokenizer, its merge after the array alone
    assert "--array=0-1" in array["args"] and _dep(array) == f"afterok:{tok['id']}"
    assert "--kill-on-invalid-dep=yes" in array["args"]
    shard_cmd = array["args"][array["args"].index(str(ROOT / "slurm" / "data_prep.sbatch")) + 1:]
    assert shard_cmd[:3] == ["shard", "--source", "data/shakespeare.jsonl.gz"] and f"{d}/tokenizer.json" in shard_cmd
    assert _dep(merge) == f"afterok:{array['id']}" and merge["args"][-3:] == ["merge", "--out", f"{d}/shards"]
    assert _dep(shards_after) == f"afterok:{merge['id']}"
    assert _runner_args(shards_after)[-3:] == ["--only", "shards", "--after_main"]
    # pretrain: slurm/train.sbatch after both stages it reads, with the pipeline's group and run dir
    assert _dep(pretrain) == f"afterok:{tok['id']}:{shards_after['id']}" and "--job-name=gpt-pretrain" in pretrain["args"]
    train = pretrain["args"][pretrain["args"].index(str(ROOT / "slurm" / "train.sbatch")) + 1:]
    assert train[:2] == ["pretrain", "recipes/configs/tiny-cpu.yaml"]
    assert train[-4:] == ["--group", "demo", "--run_dir", f"{d}/pretrain"]
    assert _dep(pretrain_after) == f"afterok:{pretrain['id']}"
    assert _runner_args(pretrain_after)[-3:] == ["--only", "pretrain", "--after_main"]
    assert _dep(sample) == f"afterok:{pretrain_after['id']}" and _runner_args(sample)[-2:] == ["--only", "sample"]
    # the assistant half: each post-training job waits for the stages it reads, by path
    names = {}  # job name -> record, from the --job-name of each submission
    for j in jobs:
        name = next((a.split("=", 1)[1] for a in j["args"] if a.startswith("--job-name=")), None)
        names[name] = j
    task = names["gpt-task"]
    assert _dep(task) is None  # the demo task reads nothing earlier

    def after(name: str) -> set[str]:
        kind, _, ids = _dep(names[f"gpt-{name}"]).partition(":")
        assert kind == "afterok"
        return set(ids.split(":"))

    ids = {n: names[f"gpt-{n}"]["id"] for n in ("tokenizer", "pretrain_after", "sft_data_after", "sft_after", "pairs")}
    assert after("sft") == {ids["pretrain_after"], ids["tokenizer"], ids["sft_data_after"]}
    assert after("pairs") == {ids["sft_after"], task["id"], ids["tokenizer"]}
    for stage in ("reward", "dpo"):
        assert after(stage) == {ids["sft_after"], ids["pairs"], ids["tokenizer"]}
        train = names[f"gpt-{stage}"]["args"]
        assert train[train.index(str(ROOT / "slurm" / "train.sbatch")) + 1:][:2] == \
            [stage, f"recipes/configs/{stage}-tiny-cpu.yaml"]
    assert after("rl") == {ids["sft_after"], task["id"], ids["tokenizer"]}
    assert after("chat") == {names["gpt-rl_after"]["id"]}
    # the report: after every job whatever happened, told which jobs are which stage
    every = [j["id"] for j in jobs[:-1]]
    assert _dep(report) == "afterany:" + ":".join(every)
    told = _runner_args(report)
    assert told[:5] == ["--config", config, "--dir", str(d), "--report"]
    assert told[5].startswith(f"tokenizer={tok['id']},shards={array['id']}:{merge['id']},"
                              f"shards_after={shards_after['id']},pretrain={pretrain['id']},"
                              f"pretrain_after={pretrain_after['id']},sample={sample['id']},task={task['id']},")
    assert told[5].endswith(f"chat={names['gpt-chat']['id']}")
    printed = r.stdout.splitlines()
    assert printed[0].split()[:3] == ["tokenizer", "job", tok["id"]] and printed[0].endswith(
        f"log runs/slurm/gpt-tokenizer-{tok['id']}.out")
    assert printed[-1].split()[:3] == ["report", "job", report["id"]]


def test_slurm_pipeline_submits_no_job_for_a_finished_stage(tmp_path):
    (tmp_path / "fresh").mkdir()
    _, everything = submit_chain(tmp_path / "fresh")
    d = tmp_path / "demo"
    cfg = parser().parse_args(["--config", str(ROOT / "recipes" / "configs" / "pipeline-tiny-cpu.yaml"),
                               "--dir", str(d)])
    pipe = build(cfg.stages, cfg.dir, cfg.group)
    d.mkdir()
    (d / "tokenizer.json").write_text("{}")
    write_marker(pipe, "tokenizer", {"state": "done", "fingerprint": fingerprint(pipe, pipe.step("tokenizer"))})
    _, jobs = submit_chain(tmp_path)
    assert "--array=0-1" in jobs[0]["args"] and _dep(jobs[0]) is None  # shards first, waiting for nothing
    assert not any(j["stdin"] and "tokenizer" in _runner_args(j) for j in jobs)
    assert _runner_args(jobs[-1])[-1].startswith("shards=")
    # --force tokenizer: it and everything after it again
    _, jobs = submit_chain(tmp_path, "--force", "tokenizer")
    assert _runner_args(jobs[0])[-2:] == ["--only", "tokenizer"] and len(jobs) == len(everything)


def test_slurm_report_names_the_failed_stage_its_job_and_log(tmp_path, monkeypatch, capsys):
    import gpt.pipeline_slurm as ps
    records = {  # `scontrol show job -o ID`, as parsed: the shards merge failed, what waited was cancelled
        "1": [{"JobId": "1", "JobState": "COMPLETED", "ExitCode": "0:0", "StartTime": "2026-11-29T10:00:00",
               "EndTime": "2026-11-29T10:00:20"}],
        "2": [{"JobId": "2_0", "JobState": "COMPLETED", "ExitCode": "0:0", "StartTime": "2026-11-29T10:00:21",
               "EndTime": "2026-11-29T10:00:40"}],
        "3": [{"JobId": "3", "JobState": "FAILED", "ExitCode": "1:0", "StdOut": "/w/runs/slurm/merge-3.out",
               "StartTime": "2026-11-29T10:00:41", "EndTime": "2026-11-29T10:00:45"}],
        "4": [{"JobId": "4", "JobState": "CANCELLED", "Reason": "DependencyNeverSatisfied", "ExitCode": "0:0"}],
        "5": [{"JobId": "5", "JobState": "CANCELLED", "Reason": "DependencyNeverSatisfied", "ExitCode": "0:0"}],
    }
    monkeypatch.setattr(ps, "job_records", lambda job_id: records.get(job_id, []))
    config = ROOT / "recipes" / "configs" / "pipeline-tiny-cpu.yaml"
    assert main(["--config", str(config), "--dir", str(tmp_path / "demo"),
                 "--report", "tokenizer=1,shards=2:3,shards_after=4,pretrain=5"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: stage shards failed: job 3 FAILED (exit 1:0); its log: /w/runs/slurm/merge-3.out; "
                   "cancelled after it: shards_after, pretrain"]
    s = json.loads((tmp_path / "demo" / "summary.json").read_text())
    rows = {row["stage"]: row for row in s["stages"]}
    assert s["pipeline"]["state"] == "failed"
    assert [rows[n]["status"] for n in ("tokenizer", "shards", "pretrain", "sample")] == \
        ["pending", "failed", "cancelled", "pending"]
    assert rows["shards"]["wall_s"] == 24.0  # from the array's start to the merge's end


def test_slurm_report_keeps_a_sub_second_stage_time(tmp_path, monkeypatch, capsys):
    """Slurm clocks whole seconds: a job that started and ended within one second spans 0 there.
    The stage's own measured time then stands (CI once failed on `wall_s > 0` for such a stage)."""
    import gpt.pipeline_slurm as ps
    records = {"1": [{"JobId": "1", "JobState": "COMPLETED", "ExitCode": "0:0",
                      "StartTime": "2026-11-29T10:00:00", "EndTime": "2026-11-29T10:00:00"}]}
    monkeypatch.setattr(ps, "job_records", lambda job_id: records.get(job_id, []))
    config = ROOT / "recipes" / "configs" / "pipeline-tiny-cpu.yaml"
    argv = ["--config", str(config), "--dir", str(tmp_path / "demo")]
    cfg = parser().parse_args(argv)
    pipe = build(cfg.stages, cfg.dir, cfg.group, source=str(config))
    write_marker(pipe, "tokenizer", {"state": "done", "wall_s": 0.4, "spent_s": 0.4})
    assert main(argv + ["--report", "tokenizer=1"]) == 0
    rows = {row["stage"]: row for row in json.loads((tmp_path / "demo" / "summary.json").read_text())["stages"]}
    assert rows["tokenizer"]["status"] == "done" and rows["tokenizer"]["wall_s"] == 0.4


# ---- the real chain on the test cluster (never run on a shared machine) ------------------------------

def _submit(slurm_jobs: SlurmJobs, config: Path) -> dict[str, str]:
    """slurm/pipeline.sh's printed table: job name -> job id."""
    out = slurm_jobs.run(ROOT / "slurm" / "pipeline.sh", "--", config, timeout=180)
    return {line.split()[0]: line.split()[2] for line in out.splitlines() if " job " in line}


@pytest.mark.cluster
def test_the_pipeline_as_one_slurm_submission(slurm_jobs: SlurmJobs, tmp_path: Path):
    from tests.pipeline_fixtures import shrunk_pipeline, write_pipeline
    d = tmp_path / "demo"
    config = write_pipeline(shrunk_pipeline(d, slurm=True), tmp_path / "pipeline.yaml")
    jobs = _submit(slurm_jobs, config)
    assert list(jobs) == ["tokenizer", "shards", "shards_after", "pretrain", "pretrain_after", "sample", "task",
                          "sft_data", "sft_data_after", "sft", "sft_after", "pairs", "reward", "reward_after",
                          "dpo", "dpo_after", "rl", "rl_after", "chat", "report"]
    record = slurm_jobs.wait(jobs["report"], timeout=1500)[jobs["report"]]
    logs = slurm_jobs.workdir / "runs" / "slurm"
    assert_completed(record, logs / f"gpt-pipeline-report-{jobs['report']}.out")
    s = json.loads((d / "summary.json").read_text())
    rows = {row["stage"]: row for row in s["stages"]}
    assert s["pipeline"]["state"] == "done", rows
    assert not {n: (r["status"], r["wall_s"]) for n, r in rows.items() if r["status"] != "done" or not r["wall_s"] > 0}
    assert 0 < rows["pretrain"]["metrics"]["val loss"] < 8.4 and Path(rows["pretrain"]["checkpoint"]).is_file()
    assert "ROMEO:" in rows["sample"]["transcript"]
    # The assistant half ran from the pretrained checkpoint: SFT, pairs, reward model, DPO, RL, a chat.
    for stage in ("sft", "dpo", "rl"):
        assert 0 <= rows[stage]["metrics"]["exact-match"] <= 1 and Path(rows[stage]["checkpoint"]).is_file()
    assert 0 <= rows["reward"]["metrics"]["pair accuracy"] <= 1
    assert (Path(rows["rl"]["hf"]) / "config.json").is_file()
    assert "What was the word?" in rows["chat"]["transcript"]
    # Submitted again: every stage is done with unchanged inputs, nothing to submit.
    out = slurm_jobs.run(ROOT / "slurm" / "pipeline.sh", "--", config, timeout=180)
    assert out.startswith("nothing to submit")


@pytest.mark.cluster
def test_a_failed_slurm_stage_stops_the_chain_with_its_log_named(slurm_jobs: SlurmJobs, tmp_path: Path):
    from tests.pipeline_fixtures import shrunk_pipeline, write_pipeline
    d = tmp_path / "demo"
    cfg = shrunk_pipeline(d, slurm=True)
    pretrain = next(s for s in cfg["stages"] if s["name"] == "pretrain")
    pretrain["args"] += ["--model.model_config.n_layer", "zero"]  # the recipe refuses its arguments
    config = write_pipeline(cfg, tmp_path / "pipeline.yaml")
    jobs = _submit(slurm_jobs, config)
    records = slurm_jobs.wait(*jobs.values(), timeout=900)
    assert records[jobs["pretrain"]]["JobState"] == "FAILED"
    downstream = ("pretrain_after", "sample", "sft", "sft_after", "pairs", "reward", "reward_after", "dpo",
                  "dpo_after", "rl", "rl_after", "chat")
    assert all(records[jobs[n]]["JobState"] == "CANCELLED" for n in downstream)
    assert all(records[jobs[n]]["JobState"] == "COMPLETED" for n in ("task", "sft_data_after"))  # they read no pretrain
    report_log = slurm_jobs.workdir / "runs" / "slurm" / f"gpt-pipeline-report-{jobs['report']}.out"
    assert records[jobs["report"]]["ExitCode"] == "1:0"
    pretrain_log = slurm_jobs.workdir / "runs" / "slurm" / f"gpt-pretrain-{jobs['pretrain']}.out"
    line = f"error: stage pretrain failed: job {jobs['pretrain']} FAILED (exit [0-9]+:0); its log: {pretrain_log}; "
    assert re.search(re.escape(line).replace(re.escape("[0-9]+"), "[0-9]+")
                     + "cancelled after it: " + ", ".join(downstream), report_log.read_text())
    rows = {row["stage"]: row["status"] for row in json.loads((d / "summary.json").read_text())["stages"]}
    assert rows == {"tokenizer": "done", "shards": "done", "pretrain": "failed", "sample": "cancelled", "task": "done",
                    "sft_data": "done", **{n: "cancelled" for n in ("sft", "pairs", "reward", "dpo", "rl", "chat")}}
