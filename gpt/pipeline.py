"""The pipeline's description: its stages, their commands, and what each reads from the ones before it.

A pipeline YAML (recipes/configs/pipeline-tiny-cpu.yaml) lists the stages in order; the runner
(gpt/pipeline_run.py, `python -m recipes.pipeline`) runs each as subprocesses, and on a cluster
slurm/pipeline.sh submits the same stages as chained Slurm jobs (`slurm_plan` below).

    dir: runs/demo          # everything the pipeline writes: a folder per stage, logs/, stages/, summary.*
    group: demo             # the W&B group of every training stage (the recipes' --group)
    stages:
      - name: tokenizer     # plain commands
        run: [[python, -m, data_prep.train_tokenizer, --source, data/shakespeare.jsonl.gz, --out, "{dir}/tokenizer.json"]]
        out: "{dir}/tokenizer.json"
      - name: shards        # a data-prep job: a Slurm array + merge on a cluster
        prep: data_prep.make_shards
        args: [--source, data/shakespeare.jsonl.gz, --tokenizer, "{tokenizer.out}", --out, "{dir}/shards"]
        out: "{dir}/shards"
      - name: pretrain      # a training recipe: python -m recipes.pretrain fit --config C ARGS
        recipe: pretrain    #   --group GROUP --run_dir DIR/pretrain --ckpt_path last (+ Ctrl-C handling)
        config: recipes/configs/tiny-cpu.yaml
        args: [--data.data_dir, "{shards.out}", --data.tokenizer, "{tokenizer.out}"]
        run: [[python, -m, gpt, eval, --checkpoint, "{pretrain.out}", --data, "{shards.out}", --json, "{dir}/pretrain/eval.json"]]
        metrics: [{name: val loss, json: "{dir}/pretrain/eval.json", key: loss}]

A stage has one main part at most — `recipe` (+ `config`, `args`) or `prep` (+ `args`) — and then
its `run` commands in order (on Slurm: one job after the main one). Strings are templates:
`{dir}`, `{group}`, and `{STAGE.out}`, `{STAGE.run_dir}`, `{STAGE.hf}` of an earlier stage; such a
reference (or `needs: [STAGE]`) makes this stage depend on that one. `{{` and `}}` are literal
braces. A recipe stage's `run_dir` defaults to `{dir}/NAME` and its `out` to its
`checkpoints/last.ckpt`. A command whose first word is `python` runs with the runner's Python.

Fingerprints. Before a stage runs, the runner computes what its result depends on: the stage's
resolved description (commands, stdin, outputs), the content of every existing file its commands
name outside `dir` (configs, sources; a directory counts by its manifest.json), and the current
state of each upstream stage's output (content hash of a file up to 64 MiB, else size + mtime;
a directory by its files' sizes and mtimes). A finished stage's marker (DIR/stages/NAME.json)
keeps it; the stage is skipped while the fingerprint is unchanged and its outputs exist, so a
re-run upstream stage re-runs the stages that read it. Code changes are not fingerprinted:
`--force STAGE` re-runs a stage and every stage after it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

Word = Union[str, int, float, bool]  # YAML writes numbers and booleans bare; every word becomes a string
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
FIELDS = ("out", "run_dir", "hf")  # what a template may read of an earlier stage
HASH_LIMIT = 64 << 20  # files up to this size are fingerprinted by content, larger ones by size + mtime
MARKERS = "stages"     # DIR/stages/NAME.json: a stage's state and fingerprint
LOGS = "logs"          # DIR/logs/NAME.log: a stage's output, every attempt appended


class PipelineError(Exception):
    """A pipeline that cannot run as described; the message is one line naming the stage and field."""


@dataclass
class Metric:
    """One number of the summary table, read from what a stage wrote.

    Args:
        name: the column label (e.g. "val loss", "exact-match").
        json: a JSON file the stage wrote (e.g. `gpt eval --json`, `python -m gpt.evaluate --json`)...
        key: ...and the dotted key of the number in it (e.g. "loss", "splits.train.tokens").
        csv: or a metric the stage's run logged (its last value; e.g. "val/loss").
        percent: show as a percentage (a fraction in [0, 1]).
    """
    name: str
    json: Optional[str] = None
    key: Optional[str] = None
    csv: Optional[str] = None
    percent: bool = False


@dataclass
class Stage:
    """One stage of the pipeline, as the YAML writes it (see the module docstring).

    Args:
        name: an identifier, unique in the pipeline (templates say {name.out}).
        recipe: a training stage: recipes/RECIPE.py, run as `python -m recipes.RECIPE fit --config
            CONFIG ARGS --group G --run_dir RUN_DIR --ckpt_path last`, or slurm/train.sbatch on a cluster.
        config: the recipe's YAML.
        prep: a data-prep module (data_prep.make_shards, data_prep.make_sft): `python -m PREP ARGS`,
            or slurm/data_prep.sh (a job array and its merge) on a cluster.
        args: the recipe's or data-prep job's arguments (per-stage overrides of its config).
        run: commands run after the main part (or alone): evaluations, exports, samples.
        stdin: text given to every command's standard input (e.g. the turns of `gpt chat`).
        needs: stages this one depends on beyond those its templates name.
        run_dir: the stage's run directory (a recipe's; default DIR/NAME): W&B run, plots.
        out: what later stages read ({name.out}); a recipe's default is its last.ckpt.
        hf: a Hugging Face export the stage writes (shown in the summary).
        metrics: the numbers the summary shows for this stage.
        transcript: put the stage's output in summary.md (a sample, a chat).
        estimate_s: expected seconds on the reference machine (2 CPU cores), for the ETA.
        sbatch: extra sbatch options for this stage's main job on a cluster (nodes, tasks, GPUs).
        array_tasks: a data-prep stage's Slurm array size.
    """
    name: str
    recipe: Optional[str] = None
    config: Optional[str] = None
    prep: Optional[str] = None
    args: list[Word] = field(default_factory=list)
    run: list[list[Word]] = field(default_factory=list)
    stdin: Optional[str] = None
    needs: list[str] = field(default_factory=list)
    run_dir: Optional[str] = None
    out: Optional[str] = None
    hf: Optional[str] = None
    metrics: list[Metric] = field(default_factory=list)
    transcript: bool = False
    estimate_s: float = 60.0
    sbatch: list[str] = field(default_factory=list)
    array_tasks: int = 1


@dataclass
class Step:
    """A stage with its templates resolved: what the runner and the Slurm plan work from."""
    index: int
    name: str
    kind: Literal["recipe", "prep", "run"]
    main: Optional[list[str]]   # the recipe or data-prep command (None for a plain stage)
    run: list[list[str]]
    stdin: Optional[str]
    deps: list[str]
    run_dir: Optional[str]
    out: Optional[str]
    hf: Optional[str]
    metrics: list[Metric]
    transcript: bool
    estimate_s: float
    sbatch: list[str]
    array_tasks: int
    recipe: Optional[str] = None
    config: Optional[str] = None
    prep: Optional[str] = None
    args: list[str] = field(default_factory=list)

    @property
    def commands(self) -> list[list[str]]:
        return ([self.main] if self.main else []) + self.run

    def describe(self) -> dict[str, Any]:
        """What the stage does, as data: the part of its fingerprint that is not a file."""
        return {"commands": self.commands, "stdin": self.stdin, "run_dir": self.run_dir, "out": self.out,
                "hf": self.hf}


@dataclass
class Pipeline:
    dir: str
    group: str
    steps: list[Step]
    source: Optional[str] = None  # the YAML it came from

    def step(self, name: str) -> Step:
        for s in self.steps:
            if s.name == name:
                return s
        raise PipelineError(f"no stage named {name!r} (stages: {', '.join(s.name for s in self.steps)})")

    @property
    def markers(self) -> Path:
        return Path(self.dir) / MARKERS

    @property
    def logs(self) -> Path:
        return Path(self.dir) / LOGS

    def marker_path(self, name: str) -> Path:
        return self.markers / f"{name}.json"

    def log_path(self, name: str) -> Path:
        return self.logs / f"{name}.log"


# ---- templates ---------------------------------------------------------------------------------
def _word(w: Word) -> str:
    return ("true" if w else "false") if isinstance(w, bool) else str(w)


class _Context(dict):
    """format_map's namespace: {dir}, {group} and earlier stages' fields; records the stages used."""

    def __init__(self, base: dict[str, Any], stages: dict[str, Any], where: str):
        super().__init__(base)
        self.stages, self.where, self.used = stages, where, set()

    def __missing__(self, key: str) -> Any:
        if key in self.stages:
            self.used.add(key)
            return self.stages[key]
        raise PipelineError(f"{self.where}: {{{key}...}} is neither dir, group nor an earlier stage")


class _Fields:
    def __init__(self, name: str, values: dict[str, Optional[str]]):
        self._name, self._values = name, values

    def __getattr__(self, attr: str) -> str:
        if attr.startswith("_"):
            raise AttributeError(attr)
        if attr not in FIELDS:
            raise PipelineError(f"{{{self._name}.{attr}}}: a stage offers {', '.join(FIELDS)}")
        value = self._values.get(attr)
        if value is None:
            raise PipelineError(f"{{{self._name}.{attr}}}: stage {self._name} has no {attr}")
        return value


def _fill(text: Word, ctx: _Context) -> str:
    try:
        return string.Formatter().vformat(_word(text), (), ctx)
    except PipelineError as e:
        raise PipelineError(f"{ctx.where}: {e}" if not str(e).startswith(ctx.where) else str(e)) from None
    except (ValueError, IndexError, KeyError, AttributeError) as e:
        raise PipelineError(f"{ctx.where}: bad template {_word(text)!r} ({e}); literal braces are written {{{{ }}}}") \
            from None


def build(stages: list[Stage], dir: str, group: str, source: Optional[str] = None) -> Pipeline:
    """Check the stages and resolve their templates, in order (a stage reads only earlier ones)."""
    if not stages:
        raise PipelineError("the pipeline has no stages")
    base = {"dir": dir, "group": group}
    done: dict[str, _Fields] = {}
    steps = []
    for i, st in enumerate(stages):
        where = f"stage {st.name!r}" if st.name else f"stage {i + 1}"
        if not NAME.match(st.name or ""):
            raise PipelineError(f"{where}: name must be an identifier (letters, digits, _), e.g. sft or base_eval")
        if st.name in done:
            raise PipelineError(f"{where}: a second stage with this name")
        if st.recipe and st.prep:
            raise PipelineError(f"{where}: give recipe or prep, not both")
        if st.recipe and not st.config:
            raise PipelineError(f"{where}: recipe {st.recipe} needs config: a recipe YAML")
        if st.config and not st.recipe:
            raise PipelineError(f"{where}: config is a recipe's; this stage has no recipe")
        if st.args and not (st.recipe or st.prep):
            raise PipelineError(f"{where}: args go to a recipe or prep job; plain commands go in run")
        if not (st.recipe or st.prep or st.run):
            raise PipelineError(f"{where}: nothing to run (give recipe, prep or run)")
        if st.array_tasks < 1:
            raise PipelineError(f"{where}: array_tasks must be >= 1, got {st.array_tasks}")
        ctx = _Context(base, done, where)
        run_dir = _fill(st.run_dir, ctx) if st.run_dir else (f"{dir}/{st.name}" if st.recipe else None)
        out = _fill(st.out, ctx) if st.out else (f"{run_dir}/checkpoints/last.ckpt" if st.recipe else None)
        hf = _fill(st.hf, ctx) if st.hf else None
        # The stage's own fields are readable from here on (its run commands evaluate its checkpoint).
        ctx.stages = {**done, st.name: _Fields(st.name, {"out": out, "run_dir": run_dir, "hf": hf})}
        args = [_fill(a, ctx) for a in st.args]
        run = []
        for c, cmd in enumerate(st.run):
            if not cmd:
                raise PipelineError(f"{where}: run command {c + 1} is empty")
            run.append([_fill(w, ctx) for w in cmd])
        config = _fill(st.config, ctx) if st.config else None
        main = None
        if st.recipe:
            for taken in ("--run_dir", "--group", "--ckpt_path"):
                if any(a == taken or a.startswith(taken + "=") for a in args):
                    raise PipelineError(f"{where}: {taken} is set by the pipeline (dir, group; resume is automatic)")
            main = ["python", "-m", f"recipes.{st.recipe}", "fit", "--config", config, *args,
                    "--group", group, "--run_dir", run_dir, "--ckpt_path", "last"]
        elif st.prep:
            main = ["python", "-m", st.prep, *args]
        metrics = [Metric(m.name, _fill(m.json, ctx) if m.json else None, m.key, m.csv, m.percent) for m in st.metrics]
        for m in metrics:
            if bool(m.json) == bool(m.csv) or (m.json and not m.key):
                raise PipelineError(f"{where}: metric {m.name!r}: give json + key, or csv")
            if m.csv and not run_dir:
                raise PipelineError(f"{where}: metric {m.name!r} reads the run's CSV, but the stage has no run_dir")
        deps = [d for d in done if d in ctx.used]
        for d in st.needs:
            if d not in done:
                raise PipelineError(f"{where}: needs {d!r}, which is not an earlier stage")
            if d not in deps:
                deps.append(d)
        steps.append(Step(i, st.name, "recipe" if st.recipe else "prep" if st.prep else "run", main, run,
                          st.stdin, deps, run_dir, out, hf, metrics, st.transcript, float(st.estimate_s),
                          list(st.sbatch), st.array_tasks, st.recipe, config, st.prep, args))
        done[st.name] = ctx.stages[st.name]
    return Pipeline(dir, group, steps, source)


# ---- fingerprints --------------------------------------------------------------------------------
def inside(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    p, r = Path(path).resolve(), Path(root).resolve()
    return p == r or r in p.parents


def path_digest(path: str | os.PathLike) -> str:
    """A file by content (size + mtime above HASH_LIMIT), a directory by its files' sizes and mtimes."""
    p = Path(path)
    if p.is_file():
        st = p.stat()
        if st.st_size > HASH_LIMIT:
            return f"size {st.st_size} mtime {st.st_mtime_ns}"
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            st = f.stat()
            h.update(f"{f.relative_to(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()
    return "missing"


def input_files(step: Step, root: str) -> list[str]:
    """Files the stage's commands name that exist outside the pipeline's dir (configs, sources).

    Words after a command's program, and the value of `--opt=value`; a directory counts through
    its manifest.json (a shard directory's), if any. Paths under `root` are stage outputs, covered
    by the upstream stages' digests instead."""
    seen: list[str] = []
    for cmd in step.commands:
        for w in cmd[1:]:
            for cand in (w, w.split("=", 1)[1] if w.startswith("-") and "=" in w else None):
                if not cand or cand.startswith("-") or len(cand) > 4096:
                    continue
                p = Path(cand)
                target = p / "manifest.json" if p.is_dir() else p
                if target.is_file() and not inside(target, root) and str(target) not in seen:
                    seen.append(str(target))
    return seen


def fingerprint(pipe: Pipeline, step: Step) -> dict[str, str]:
    """{what: digest} of everything the stage's result depends on (see the module docstring)."""
    desc = json.dumps(step.describe(), sort_keys=True)
    fp = {"stage": hashlib.sha256(desc.encode()).hexdigest()}
    for f in input_files(step, pipe.dir):
        fp[f"file {f}"] = path_digest(f)
    for d in step.deps:
        up = pipe.step(d)
        target = up.out or up.run_dir
        if target:
            fp[f"after {d}"] = path_digest(target)
        else:  # a stage with no output: its last completion stands for it
            fp[f"after {d}"] = str(read_marker(pipe, d).get("finished_at"))
    return fp


def changed(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """The keys whose digests differ (the stage's description, a file, an upstream stage)."""
    keys = sorted(set(old) | set(new), key=lambda k: (k != "stage", k))
    return [("its description" if k == "stage" else k) for k in keys if old.get(k) != new.get(k)]


# ---- markers -------------------------------------------------------------------------------------
def read_marker(pipe: Pipeline, name: str) -> dict[str, Any]:
    """The stage's marker ({} when it never started; an unreadable one counts as absent)."""
    p = pipe.marker_path(name)
    try:
        data = json.loads(p.read_text()) if p.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def atomic_write_text(path: str | os.PathLike, text: str, unique: bool = False) -> None:
    """Write a text file via a temporary name and a rename (gpt.shards' writer), creating its folder;
    unique: for a file that parallel jobs rewrite (see gpt.shards.atomic_write_bytes)."""
    from gpt.shards import atomic_write_bytes  # numpy only: the runner stays light (no torch import)

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, text.encode("utf-8"), unique=unique)


def write_marker(pipe: Pipeline, name: str, record: dict[str, Any]) -> None:
    atomic_write_text(pipe.marker_path(name), json.dumps(record, indent=1, sort_keys=True) + "\n")


def outputs(step: Step) -> list[str]:
    """What a fresh start of the stage removes first: its run directory, output and export."""
    found: list[str] = []
    for p in (step.run_dir, step.out, step.hf):
        if p and not any(inside(p, q) for q in found):
            found.append(p)
    return found


@dataclass
class Decision:
    action: Literal["skip", "resume", "fresh"]
    reason: str


def decide(pipe: Pipeline, step: Step, fp: Optional[dict[str, str]], forced: bool) -> Decision:
    """Skip a finished stage whose inputs are unchanged; resume one interrupted with the same
    inputs; start afresh otherwise. `fp` None: an upstream stage runs first, so the inputs will change.

    A stage without a marker keeps what it finds (the recipes resume or refuse it, data prep skips
    finished tasks): the pipeline removes only what a run of its own wrote."""
    marker = read_marker(pipe, step.name)
    if forced:
        return Decision("fresh", "forced (--force)")
    if not marker:
        present = [p for p in outputs(step) if Path(p).exists()]
        return Decision("resume", f"continuing what is in {present[0]}") if present else Decision("fresh", "first run")
    if fp is None:
        return Decision("fresh", "an upstream stage runs again")
    old = marker.get("fingerprint") or {}
    if old != fp:
        return Decision("fresh", "changed since the last run: " + ", ".join(changed(old, fp)))
    missing = [p for p in (step.out, step.run_dir) if p and not Path(p).exists()]
    if marker.get("state") == "done" and not missing:
        return Decision("skip", "done, inputs unchanged")
    if marker.get("state") == "done":
        return Decision("fresh", f"{missing[0]} is missing")
    return Decision("resume", "resuming the interrupted run")


def forced_from(pipe: Pipeline, force: Optional[str]) -> Optional[int]:
    """The index of the first stage --force re-runs ("all": 0), None without --force."""
    if force is None:
        return None
    return 0 if force == "all" else pipe.step(force).index


def plan(pipe: Pipeline, force: Optional[str] = None) -> list[tuple[Step, Decision]]:
    """What a run would do now, stage by stage (a forecast for the ETA, --dry_run and Slurm: the
    runner decides again when it reaches each stage, from the outputs as they are then)."""
    first = forced_from(pipe, force)
    again: set[str] = set()
    out = []
    for s in pipe.steps:
        forced = first is not None and s.index >= first
        upstream = any(d in again for d in s.deps)
        d = decide(pipe, s, None if upstream else fingerprint(pipe, s), forced)
        if d.action != "skip":
            again.add(s.name)
        out.append((s, d))
    return out


def clean(pipe: Pipeline, step: Step) -> list[str]:
    """Remove the stage's outputs before a fresh start; only paths inside the pipeline's dir."""
    import shutil

    removed = []
    for p in outputs(step):
        path = Path(p)
        if not (path.exists() or path.is_symlink()):
            continue
        if not inside(path, pipe.dir) or path.resolve() == Path(pipe.dir).resolve():
            raise PipelineError(f"stage {step.name}: {p} is outside {pipe.dir}: remove it yourself or use another path")
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(p)
    return removed
