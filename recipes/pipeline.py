"""The whole pipeline as one command: the stages of one YAML, e.g. tokenizer -> shards -> pretrain -> sample.

    python -m recipes.pipeline --config recipes/configs/pipeline-tiny-cpu.yaml     # run, or continue
    python -m recipes.pipeline --config C --dry_run            # what would run, and why
    python -m recipes.pipeline --config C --force              # every stage again
    python -m recipes.pipeline --config C --force pretrain     # pretrain and every stage after it
    python -m recipes.pipeline --config C --dir runs/try2 --group try2     # another copy of the pipeline
    slurm/pipeline.sh [sbatch options] -- C                    # the same stages as chained Slurm jobs

The YAML lists the stages and each one's overrides (gpt/pipeline.py documents its keys); every
stage runs as subprocesses with the project's real commands — data-prep jobs, recipes started
`--init_from` the previous stage's checkpoint, `gpt eval`, `python -m gpt.evaluate`, `gpt export`,
`gpt sample`, `gpt chat` — so the runner only chains them (gpt/pipeline_run.py). Progress is a
line per stage with its ETA, then the stage's own output, also in DIR/logs/NAME.log; at the end
one table (metrics, wall time, checkpoint, HF export, W&B run per stage), also written as
DIR/summary.json and DIR/summary.md. A re-run skips the finished stages whose inputs did not
change; Ctrl-C stops the running stage after a checkpoint, and the same command resumes it.
A training stage after pretraining is one more entry, e.g.

    - name: sft
      recipe: sft                       # python -m recipes.sft fit --config ... --run_dir DIR/sft ...
      config: recipes/configs/sft-tiny-cpu.yaml
      args: [--init_from, "{pretrain.out}"]   # reading pretrain's checkpoint chains the two stages
      metrics: [{name: val loss, csv: val/loss}]

Exit status: 0, 1 when a stage failed (one line names it and its log), 2 for a bad config,
130 when stopped.
"""
from __future__ import annotations

import sys
from typing import Any, Optional

from jsonargparse import ArgumentParser

from gpt.pipeline import PipelineError, Stage, build, plan
from gpt.pipeline_summary import fmt_seconds


def pipeline(stages: list[Stage], dir: str = "runs/demo", group: str = "demo", force: Optional[str] = None,
             dry_run: bool = False, only: Optional[str] = None, after_main: bool = False,
             slurm_plan: bool = False, report: Optional[str] = None) -> None:
    """Run the pipeline's stages in order, skipping finished ones, resuming an interrupted one.

    Args:
        stages: the stages, in order (normally from --config; see gpt/pipeline.py for their keys).
        dir: where the pipeline writes: a folder per stage, logs/, stages/ (markers), summary.json/md.
        group: the experiment: the W&B group of every training stage (and their --group).
        force: run again even if finished: "all" (or a bare --force), or a stage name for that stage
            and every stage after it.
        dry_run: print what would run and why, run nothing.
        only: run just this stage (what a Slurm job of the chain does).
        after_main: with --only, run just the commands after the stage's recipe or data-prep job.
        slurm_plan: clean the stages that will start afresh and print the Slurm jobs (slurm/pipeline.sh).
        report: NAME=JOBID,... of a submitted chain: summarize it and name a failed stage (its last job).
    """


def _one_line(message: str) -> str:
    text = " ".join(str(message).split())
    return text.replace('Parser key "', 'key "')


class _Parser(ArgumentParser):
    def error(self, message: str, ex: Optional[Exception] = None) -> None:
        if not self.exit_on_error:
            return super().error(message, ex)
        sys.stderr.write(f"error: {_one_line(message)} (--help lists every option)\n")
        self.exit(2)


def parser() -> ArgumentParser:
    p = _Parser(prog="python -m recipes.pipeline", description=__doc__.split("\n\n")[0],
                default_config_files=[])
    p.add_argument("--config", action="config", help="the pipeline YAML (recipes/configs/pipeline-*.yaml)")
    p.add_function_arguments(pipeline, None)
    return p


FLAGS = ("--dry_run", "--after_main", "--slurm_plan")  # switches: a bare flag means true


def normalize(argv: list[str]) -> list[str]:
    """`--dry-run` = `--dry_run`; a bare switch means true; a bare `--force` means `--force all`."""
    out = []
    for i, a in enumerate(argv):
        if a.startswith("--") and "-" in a[2:].split("=", 1)[0]:
            name, eq, value = a[2:].partition("=")
            a = "--" + name.replace("-", "_") + eq + value
        out.append(a)
        bare = i + 1 == len(argv) or argv[i + 1].startswith("--")
        if bare and a in FLAGS:
            out.append("true")
        elif bare and a == "--force":
            out.append("all")
    return out


def _config_arg(argv: list[str]) -> Optional[str]:
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--config="):
            return a.split("=", 1)[1]
    return None


def main(argv: Optional[list[str]] = None) -> int:
    argv = normalize(sys.argv[1:] if argv is None else list(argv))
    cfg = parser().parse_args(argv)
    try:
        return _main(cfg, _config_arg(argv), argv)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _main(cfg: Any, config: Optional[str], argv: list[str]) -> int:
    pipe = build(cfg.stages, cfg.dir, cfg.group, source=config)
    if cfg.force not in (None, "all"):
        pipe.step(cfg.force)  # an unknown stage is one line, before anything runs
    if cfg.after_main and not cfg.only:
        raise PipelineError("--after_main goes with --only STAGE")
    if cfg.dry_run:
        for s, d in plan(pipe, cfg.force):
            what = "skip" if d.action == "skip" else f"run ({d.action})"
            print(f"{s.name:<12} {what:<15} {d.reason}")
            if d.action != "skip":
                for cmd in s.commands:
                    print(f"{'':<12} $ {' '.join(cmd)}")
        return 0
    if cfg.slurm_plan:
        return _slurm_plan(pipe, cfg, config, argv)
    if cfg.report is not None:
        return _report(pipe, cfg.report)
    from gpt.pipeline_run import Runner

    return Runner(pipe).run(force=cfg.force, only=cfg.only, after_main=cfg.after_main)


def _slurm_plan(pipe: Any, cfg: Any, config: Optional[str], argv: list[str]) -> int:
    from gpt.pipeline_slurm import plan_lines, prepare, slurm_plan

    if not config:
        raise PipelineError("--slurm_plan needs --config: the jobs read the same YAML")
    decisions = plan(pipe, cfg.force)
    for line in prepare(pipe, decisions):
        print(f"pipeline: {line}", file=sys.stderr)
    extra = [a for k in ("dir", "group") if f"--{k}" in argv or any(x.startswith(f"--{k}=") for x in argv)
             for a in (f"--{k}", str(getattr(cfg, k)))]
    sys.stdout.write(plan_lines(slurm_plan(pipe, config, decisions, extra)))
    return 0


def _report(pipe: Any, jobs_text: str) -> int:
    from gpt.pipeline_slurm import failures, parse_jobs, stage_status
    from gpt.pipeline_summary import collect, table, write_summary

    jobs = parse_jobs(jobs_text)
    first, cancelled, states, walls = failures(jobs)
    summary = collect(pipe, stage_status(pipe, jobs, states), state="failed" if first else "done",
                      extra={"slurm_jobs": {n: ids for n, ids in jobs}, "slurm_states": states}, walls=walls)
    js, md = write_summary(pipe, summary)
    print(table(summary) + f"\n\nsummary: {js} and {md} (stage times: {fmt_seconds(summary['pipeline']['stage_time_s'])})")
    if first:
        after = f"; cancelled after it: {', '.join(cancelled)}" if cancelled else ""
        print(f"error: {first}{after}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
