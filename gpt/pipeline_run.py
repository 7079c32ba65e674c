"""Run a pipeline (gpt/pipeline.py) stage by stage: subprocesses, logs, ETA, skip/resume, Ctrl-C, summary.

    from gpt.pipeline_run import Runner
    status = Runner(pipe).run(force=None)        # the exit status: 0, 1 (a stage failed), 130 (stopped)

Each stage runs its commands as subprocesses in the current directory (its main part — a recipe
or a data-prep job — then its `run` commands), with the runner's Python and this checkout first
on PYTHONPATH. Their output goes to the terminal and to DIR/logs/NAME.log (appended on every
attempt). Before a stage starts, its marker DIR/stages/NAME.json records its fingerprint and
state "started"; on success "done", with the wall time (summed over the attempts that resumed
it), the metrics and, for a transcript stage, its output. A stage's run gets PNGs of its logged
curves (gpt.plots.plot_run). After every stage DIR/summary.json and summary.md are rewritten.

Progress: a line per stage with its estimate and the pipeline's ETA. A stage's estimate is its
last completed wall time on this machine, else the YAML's estimate_s; the estimates of the
stages still to run are scaled by how the stages that ran so far compared with theirs (shrunk
towards 1 by a minute of prior: a 3 s tokenizer that was estimated at 20 s says little about
a 4-minute pretraining).

Stopping. Ctrl-C (or SIGTERM) stops the running stage gracefully: a recipe gets SIGUSR1 —
slurm.requeue.RequeueOnSignal, added to every recipe the runner starts, saves last.ckpt after the
current optimizer step and stops —, any other command SIGINT. A second Ctrl-C terminates the
stage's process group, a third kills it. The stage stays "started", so the next run of the same
command resumes it: a recipe with `--ckpt_path last`, data prep by skipping its finished tasks.
A failing command stops the pipeline with one line naming the stage and its log. If the runner
itself dies (kill -9, a closed terminal), the running command gets SIGTERM from the kernel
(Linux: PR_SET_PDEATHSIG) instead of running on unseen; its marker stays "started" and the
next run resumes it from what it saved.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from gpt.pipeline import (Decision, Pipeline, PipelineError, Step, clean, decide, fingerprint, forced_from, plan,
                          read_marker, write_marker)
from gpt.pipeline_summary import collect, fmt_seconds, fmt_value, read_metric, table, write_summary

REPO = Path(__file__).resolve().parents[1]
READY = b"RequeueOnSignal: rank 0 ready"  # printed once a recipe can take SIGUSR1 (slurm/requeue.py)
SCALE_PRIOR_S = 60.0  # seconds of "as estimated" the ETA's scale starts from
TRANSCRIPT_LIMIT = 20_000  # characters of a transcript stage's output kept for summary.md


class Stopped(Exception):
    """The user stopped the pipeline (Ctrl-C / SIGTERM)."""


def child_env() -> dict[str, str]:
    """The stages' environment: the Hub offline, this checkout importable, output unbuffered.

    (W&B: each recipe goes offline unless the user logged in or set WANDB_MODE, gpt.run.)"""
    env = dict(os.environ)
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"  # progress lines reach the log as they are printed
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def _die_with_runner(runner_pid: int) -> None:
    """In the stage's process before exec: SIGTERM when the runner dies (Linux), so no stage runs
    on unseen after a kill -9 of the pipeline; a runner already gone means stop now."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1: PR_SET_PDEATHSIG
    if os.getppid() != runner_pid:
        os._exit(143)


def argv_of(cmd: list[str]) -> list[str]:
    return [sys.executable, *cmd[1:]] if cmd[0] == "python" else list(cmd)


def show(cmd: list[str]) -> str:
    return shlex.join(cmd)


class Runner:
    """Runs one pipeline; see the module docstring."""

    def __init__(self, pipe: Pipeline, out: Any = None):
        self.pipe = pipe
        self.out = out or sys.stdout
        self.env = child_env()
        self.status: dict[str, str] = {}
        self.transcripts: dict[str, str] = {}
        self.started_at = time.time()
        self.proc: Optional[subprocess.Popen] = None
        self.ready = False
        self.graceful = signal.SIGINT
        self.stops = 0
        self.measured = [0.0, 0.0]  # seconds spent and estimated, over the stages run so far
        self.last_line = ""
        self.exit_status = 0

    # ---- output ----------------------------------------------------------------------------------
    def say(self, text: str, log: Any = None) -> None:
        self.out.write(text + "\n")
        self.out.flush()
        if log is not None:
            log.write((text + "\n").encode())
            log.flush()

    def _write_out(self, data: bytes) -> None:
        buf = getattr(self.out, "buffer", None)
        if buf is not None:
            buf.write(data)
            buf.flush()
        else:
            self.out.write(data.decode("utf-8", "replace"))
            self.out.flush()

    # ---- estimates -------------------------------------------------------------------------------
    def estimate(self, step: Step) -> float:
        marker = read_marker(self.pipe, step.name)
        return float(marker.get("last_wall_s") or step.estimate_s)

    def scale(self) -> float:
        spent, estimated = self.measured
        return min(4.0, max(0.25, (spent + SCALE_PRIOR_S) / (estimated + SCALE_PRIOR_S)))

    # ---- signals ---------------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stops += 1
        proc = self.proc
        if proc is None or proc.poll() is not None:
            raise Stopped()
        if self.stops == 1:
            sig = signal.SIGUSR1 if self.graceful == signal.SIGUSR1 and self.ready else (
                signal.SIGTERM if self.graceful == signal.SIGUSR1 else self.graceful)
            os.write(2, b"\npipeline: stopping the stage (a recipe saves last.ckpt after its current step); "
                        b"Ctrl-C again to stop at once\n")
        else:
            sig = signal.SIGTERM if self.stops == 2 else signal.SIGKILL
        try:
            os.killpg(proc.pid, sig)  # the stage's own process group: DDP ranks and workers included
        except ProcessLookupError:
            pass

    # ---- one command -----------------------------------------------------------------------------
    def command(self, step: Step, cmd: list[str], log: Any, recipe: bool, keep: Optional[list[bytes]]) -> int:
        """Run one command of a stage, its output to the terminal and the log; its exit status."""
        argv = argv_of(cmd)
        env = self.env
        if recipe:
            argv.append("--trainer.callbacks+=slurm.requeue.RequeueOnSignal")
            env = {**env, "GPT_REQUEUE_FILE": str(self.stop_file(step))}
        self.say(f"$ {show(cmd)}", log)
        self.ready, self.graceful = False, (signal.SIGUSR1 if recipe else signal.SIGINT)
        runner = os.getpid()
        # A session of its own: the terminal's Ctrl-C reaches the runner only, which decides what
        # the stage gets (a recipe must checkpoint, not die of a KeyboardInterrupt).
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE if step.stdin is not None else subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True, preexec_fn=lambda: _die_with_runner(runner))
        try:
            if step.stdin is not None:
                assert self.proc.stdin is not None
                try:
                    self.proc.stdin.write(step.stdin.encode())
                    self.proc.stdin.close()
                except BrokenPipeError:
                    pass
            assert self.proc.stdout is not None
            fd, tail = self.proc.stdout.fileno(), b""
            while True:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                self._write_out(chunk)
                log.write(chunk)
                log.flush()
                if keep is not None:
                    keep.append(chunk)
                if recipe and not self.ready:
                    self.ready = READY in tail + chunk
                    tail = (tail + chunk)[-len(READY):]
            return self.proc.wait()
        finally:
            if self.proc.poll() is None:  # the runner itself is failing: leave nothing behind
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            self.proc = None

    def stop_file(self, step: Step) -> Path:
        return self.pipe.markers / f"{step.name}.stopped"

    # ---- one stage -------------------------------------------------------------------------------
    def stage(self, step: Step, decision: Decision, after_main: bool = False) -> str:
        """Run one stage; "done", "failed" or "stopped"."""
        pipe = self.pipe
        fp = fingerprint(pipe, step)
        marker = read_marker(pipe, step.name)
        spent = float(marker.get("spent_s") or 0) if decision.action == "resume" else 0.0
        if decision.action == "fresh" and not after_main:
            removed = clean(pipe, step)
            if removed:
                self.say(f"    removed {', '.join(removed)} (a fresh start)")
        record = {"state": "started", "fingerprint": fp, "spent_s": spent,
                  "last_wall_s": marker.get("wall_s") or marker.get("last_wall_s"), "started_at": time.time()}
        write_marker(pipe, step.name, record)
        pipe.logs.mkdir(parents=True, exist_ok=True)
        stop_file = self.stop_file(step)
        stop_file.unlink(missing_ok=True)
        t0 = time.time()
        commands = step.run if after_main else step.commands
        keep: Optional[list[bytes]] = [] if step.transcript else None
        with open(pipe.log_path(step.name), "ab") as log:
            self.say(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} stage {step.name}: {decision.reason}", log)
            for cmd in commands:
                is_main = cmd is step.main and step.kind == "recipe"
                rc = self.command(step, cmd, log, recipe=is_main, keep=keep if cmd is not step.main else None)
                elapsed = time.time() - t0
                write_marker(pipe, step.name, {**record, "spent_s": spent + elapsed})
                if self.stops:
                    saved = stop_file.read_text().split() if stop_file.is_file() else []
                    where = f"; last.ckpt saved at step {saved[1]}" if len(saved) > 1 else ""
                    self.say(f"==== stage {step.name} stopped after {fmt_seconds(elapsed)}{where}", log)
                    return "stopped"
                if rc != 0:
                    self.exit_status = rc
                    self.say(f"==== stage {step.name} failed: exit status {rc} from {show(cmd)}", log)
                    return "failed"
        wall = spent + time.time() - t0
        notes = self.plots(step)
        if keep is not None:
            self.transcripts[step.name] = b"".join(keep).decode("utf-8", "replace")[-TRANSCRIPT_LIMIT:]
        metrics = {m.name: read_metric(m, step)[0] for m in step.metrics}
        write_marker(pipe, step.name, {**record, "state": "done", "spent_s": wall, "wall_s": wall,
                                       "last_wall_s": wall, "finished_at": time.time(), "metrics": metrics,
                                       "notes": notes, "transcript": self.transcripts.get(step.name)})
        return "done"

    def plots(self, step: Step) -> list[str]:
        """PNG curves of the stage's run (gpt.plots.plot_run); a problem is a note, not a failure."""
        if not step.run_dir or not Path(step.run_dir, "csv").is_dir():
            return []
        try:
            from gpt.plots import plot_run

            plot_run(step.run_dir)
            return []
        except Exception as e:  # a picture must not fail a finished stage
            note = f"plots of {step.run_dir}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            self.say(f"    note: {note}")
            return [note]

    # ---- the pipeline ----------------------------------------------------------------------------
    def run(self, force: Optional[str] = None, only: Optional[str] = None, after_main: bool = False) -> int:
        pipe = self.pipe
        decisions = plan(pipe, force)
        for s, d in decisions:  # what ran before, as the summary's starting point
            if read_marker(pipe, s.name).get("state") == "done":
                self.status[s.name] = "done" if d.action == "skip" else "pending"
        todo = [(s, d) for s, d in decisions if (only is None or s.name == only)]
        if only is not None and not todo:
            raise PipelineError(f"--only {only}: no such stage")
        remaining = sum(self.estimate(s) for s, d in todo if d.action != "skip")
        self.say(f"pipeline {pipe.source or ''}: {len(pipe.steps)} stages into {pipe.dir} (W&B group {pipe.group}); "
                 f"to run: "
                 f"{', '.join(s.name for s, d in todo if d.action != 'skip') or 'nothing'}; "
                 f"estimate {fmt_seconds(remaining)}, ETA {self.clock(remaining)}")
        previous = {signal.SIGINT: signal.getsignal(signal.SIGINT), signal.SIGTERM: signal.getsignal(signal.SIGTERM)}
        for sig in previous:
            signal.signal(sig, self._on_signal)
        result = "done"
        try:
            for step, _ in todo:
                result = self._one(step, force, after_main, len(pipe.steps))
                if result != "done":
                    break
        except Stopped:
            result = "stopped"
            self.last_line = "pipeline: stopped between stages; the same command continues where it stopped"
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.finish(result, only)
        if self.last_line:  # last, under the table: what failed and where to look
            print(self.last_line, file=sys.stderr, flush=True)
        return {"done": 0, "failed": 1, "stopped": 130}[result]

    def _one(self, step: Step, force: Optional[str], after_main: bool, n: int) -> str:
        pipe = self.pipe
        head = f"[{step.index + 1}/{n}] {step.name}"
        first = forced_from(pipe, force)
        forced = first is not None and step.index >= first
        decision = Decision("fresh", "after the main job") if after_main else decide(
            pipe, step, fingerprint(pipe, step), forced)
        if decision.action == "skip":
            self.status[step.name] = "skipped"
            took = read_marker(pipe, step.name).get("wall_s")
            self.say(f"{head}: skipped ({decision.reason}; took {fmt_seconds(took)})")
            return "done"
        raw = self.estimate(step)
        est = raw * self.scale()
        rest = est + self.scale() * sum(self.estimate(s) for s in pipe.steps[step.index + 1:]
                                        if self.status.get(s.name) != "done")
        self.say(f"\n{head}: {decision.reason}; estimate {fmt_seconds(est)}, pipeline ETA {self.clock(rest)} "
                 f"({fmt_seconds(rest)} left); log {pipe.log_path(step.name)}")
        self.status[step.name] = "running"
        t0 = time.time()
        result = self.stage(step, decision, after_main)
        self.status[step.name] = result
        if result == "done":
            self.measured[0] += time.time() - t0
            self.measured[1] += raw
            metrics = read_marker(pipe, step.name).get("metrics") or {}
            shown = ", ".join(f"{m.name} {fmt_value(metrics.get(m.name), m.percent)}" for m in step.metrics)
            self.say(f"{head}: done in {fmt_seconds(time.time() - t0)}" + (f": {shown}" if shown else ""))
        elif result == "failed":
            self.last_line = (f"error: stage {step.name} failed (exit status {self.exit_status}); "
                              f"its log: {pipe.log_path(step.name)}")
        else:
            self.last_line = (f"pipeline: stopped in stage {step.name}; the same command resumes it "
                              f"(log: {pipe.log_path(step.name)})")
        return result

    @staticmethod
    def clock(seconds: float) -> str:
        return time.strftime("%H:%M:%S", time.localtime(time.time() + seconds))

    def finish(self, result: str, only: Optional[str]) -> None:
        state = {"done": "done", "failed": "failed", "stopped": "stopped"}[result]
        if only is not None and result == "done":
            state = "running"  # one stage of a Slurm chain: the report job writes the final state
        summary = collect(self.pipe, self.status, self.transcripts, state=state, started_at=self.started_at)
        js, md = write_summary(self.pipe, summary)
        if only is None:
            self.say("\n" + table(summary) + f"\n\nsummary: {js} and {md}")
