"""The pipeline on a Slurm cluster: the chain of jobs slurm/pipeline.sh submits, and the report at its end.

    python -m recipes.pipeline --config P.yaml --slurm_plan    # prepares, prints one job per line (shell words)
    python -m recipes.pipeline --config P.yaml --report tokenizer=11,shards=13,...   # the last job

`slurm_plan` turns the stages that must run (gpt.pipeline.plan: finished, unchanged stages get no
job) into jobs: a data-prep stage becomes slurm/data_prep.sh's array + merge, a recipe stage
slurm/train.sbatch, and the rest of a stage — its `run` commands (evaluations, exports), plots,
its marker — a small job running this runner with `--only NAME [--after_main]`, so the stage is
logged and summarized as on a laptop. Each job waits for the jobs of the stages it reads
(`--dependency=afterok`, `--kill-on-invalid-dep=yes`: a failure cancels everything after it).
Stages that will start afresh are cleaned when the chain is submitted.

The report job waits for every job (afterany), reads their states from `scontrol show job`,
writes DIR/summary.json and summary.md, prints the table, and when a stage failed prints one
line naming it, its job and its log (Slurm's StdOut), then exits 1.
"""
from __future__ import annotations

import re
import shlex
import subprocess
from datetime import datetime
from typing import Optional

from gpt.pipeline import Decision, Pipeline, Step, clean, read_marker

FAILED = ("FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED", "CANCELLED")


def slurm_plan(pipe: Pipeline, config: str, decisions: list[tuple[Step, Decision]],
               extra: Optional[list[str]] = None) -> list[list[str]]:
    """The jobs, one list of words each: NAME KIND AFTER [sbatch options] -- ARGS.

    KIND prep: slurm/data_prep.sh with ARGS = MODULE + the job's arguments (options: --tasks N +
    the stage's sbatch list); train: slurm/train.sbatch with ARGS = RECIPE CONFIG + arguments;
    run: `python -m recipes.pipeline` with ARGS as its options. AFTER: comma-separated job names
    to wait for, "-" for none. `extra`: pipeline options every runner job repeats (--dir, --group).
    """
    jobs: list[list[str]] = []
    last: dict[str, str] = {}  # stage -> the name of its last job (what later stages wait for)
    for s, d in decisions:
        if d.action == "skip":
            continue
        after = ",".join(last[x] for x in s.deps if x in last) or "-"
        if s.kind == "prep":
            assert s.prep is not None
            jobs.append([s.name, "prep", after, "--tasks", str(s.array_tasks), *s.sbatch, "--", s.prep, *s.args])
        elif s.kind == "recipe":
            assert s.recipe is not None and s.config is not None and s.run_dir is not None
            jobs.append([s.name, "train", after, *s.sbatch, "--", s.recipe, s.config, *s.args,
                         "--group", pipe.group, "--run_dir", s.run_dir])
        runner = ["--config", config, *(extra or []), "--only", s.name]
        if s.kind == "run":
            jobs.append([s.name, "run", after, "--", *runner])
            last[s.name] = s.name
        else:  # evaluations, exports, plots and the marker, once the main job succeeded
            jobs.append([f"{s.name}_after", "run", s.name, "--", *runner, "--after_main"])
            last[s.name] = f"{s.name}_after"
    return jobs


def prepare(pipe: Pipeline, decisions: list[tuple[Step, Decision]]) -> list[str]:
    """Before submitting: clean the stages that start afresh and forget their markers (a stage
    that then fails resumes on the next submission, like an interrupted local stage)."""
    lines = []
    for s, d in decisions:
        if d.action == "fresh":
            removed = clean(pipe, s)
            pipe.marker_path(s.name).unlink(missing_ok=True)
            if removed:
                lines.append(f"{s.name}: removed {', '.join(removed)} ({d.reason})")
    return lines


def plan_lines(jobs: list[list[str]]) -> str:
    return "".join(shlex.join(j) + "\n" for j in jobs)


# ---- the report ---------------------------------------------------------------------------------
def job_records(job_id: str) -> list[dict[str, str]]:
    """`scontrol show job -o ID` as dicts, one per job (an array job gives one per task)."""
    r = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        return []
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in r.stdout.splitlines() if line.strip()]


def parse_jobs(text: str) -> list[tuple[str, list[str]]]:
    """"name=id[:id...],name=id" -> [(name, [ids])], in order."""
    out = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, _, ids = item.partition("=")
        if not name or not ids:
            raise ValueError(f"--report: expected NAME=JOBID[:JOBID], got {item!r}")
        out.append((name, ids.split(":")))
    return out


def _time(text: Optional[str]) -> Optional[float]:
    try:
        return datetime.strptime(text or "", "%Y-%m-%dT%H:%M:%S").timestamp()
    except ValueError:  # "Unknown", "None": not started or not ended
        return None


def failures(jobs: list[tuple[str, list[str]]]
             ) -> tuple[Optional[str], list[str], dict[str, str], dict[str, float]]:
    """(the line naming the first failed job, the jobs cancelled after it, job name -> state,
    stage -> seconds from its first job's start to its last job's end)."""
    first, cancelled, states = None, [], {}
    spans: dict[str, list[float]] = {}
    for name, ids in jobs:
        for job_id in ids:
            for rec in job_records(job_id):
                start, end = _time(rec.get("StartTime")), _time(rec.get("EndTime"))
                if start is not None and end is not None and end >= start:
                    span = spans.setdefault(name.removesuffix("_after"), [start, end])
                    span[0], span[1] = min(span[0], start), max(span[1], end)
                state = rec.get("JobState", "?")
                if state not in FAILED:
                    states.setdefault(name, state)
                    continue
                states[name] = state
                if state == "CANCELLED" and rec.get("Reason") == "DependencyNeverSatisfied":
                    if name not in cancelled:
                        cancelled.append(name)
                elif first is None:
                    first = (f"stage {name.removesuffix('_after')} failed: job {rec.get('JobId')} "
                             f"{state} (exit {rec.get('ExitCode', '?')}); its log: {rec.get('StdOut', '?')}")
    return first, cancelled, states, {k: b - a for k, (a, b) in spans.items()}


def stage_status(pipe: Pipeline, jobs: list[tuple[str, list[str]]], states: dict[str, str]) -> dict[str, str]:
    """The summary's status per stage: its marker's, else what Slurm says of its jobs."""
    status = {}
    submitted = {n.removesuffix("_after") for n, _ in jobs}
    for s in pipe.steps:
        marker = read_marker(pipe, s.name)
        bad = [states[n] for n in (s.name, f"{s.name}_after") if states.get(n) in FAILED]
        if bad:
            status[s.name] = "cancelled" if all(b == "CANCELLED" for b in bad) else "failed"
        elif marker.get("state") == "done":
            status[s.name] = "done" if s.name in submitted else "skipped"
    return status
