"""The pipeline's summary: one row per stage — status, metrics, wall time, checkpoint, HF export, W&B run, plots.

    from gpt.pipeline_summary import collect, table, write_summary
    summary = collect(pipe, status={"pretrain": "done", ...})
    print(table(summary)); write_summary(pipe, summary)   # DIR/summary.json + DIR/summary.md

Everything is read back from what the stages wrote: metrics from their JSON files (`gpt eval
--json`, `python -m gpt.evaluate --json`, a manifest) or their runs' CSV (gpt.plots.read_metrics),
wall times from the stage markers (DIR/stages/NAME.json, summed over the attempts that resumed
the same stage), the W&B run from the run directory's run.json, the plots from RUN_DIR/plots.
Paths are shown relative to the pipeline's directory. Both files are written atomically.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Optional

from gpt.pipeline import Metric, Pipeline, Step, atomic_write_text, read_marker


def fmt_seconds(s: Optional[float]) -> str:
    if s is None:
        return "-"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def fmt_value(value: Any, percent: bool = False) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if percent:
        return f"{100 * value:.1f}%"
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 1000:
        return f"{int(value):,}"
    return f"{value:.4g}"


def read_metric(m: Metric, step: Step) -> tuple[Any, Optional[str]]:
    """(value, None) or (None, why it is missing)."""
    if m.json:
        try:
            value: Any = json.loads(Path(m.json).read_text())
        except FileNotFoundError:
            return None, f"{m.json} not written"
        except (OSError, json.JSONDecodeError) as e:
            return None, f"{m.json}: unreadable ({e})"
        for part in (m.key or "").split("."):
            if not isinstance(value, dict) or part not in value:
                return None, f"{m.json}: no key {m.key!r}"
            value = value[part]
        return value, None
    from gpt.plots import read_metrics

    try:
        series = read_metrics(step.run_dir).get(m.csv or "")
    except (OSError, ValueError) as e:
        return None, str(e).splitlines()[0]
    if not series:
        return None, f"{step.run_dir}: {m.csv} was not logged"
    return series[max(series)], None


def wandb_run(run_dir: Optional[str]) -> Optional[dict[str, str]]:
    """{"id", "mode", "path"} of the W&B run a recipe's run directory holds (from its run.json)."""
    if not run_dir:
        return None
    try:
        run_id = json.loads((Path(run_dir) / "run.json").read_text()).get("wandb_id")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    if not run_id:
        return None
    found = sorted(Path(run_dir, "wandb").glob(f"*run-*-{run_id}"))
    if not found:
        return {"id": run_id, "mode": "unknown", "path": ""}
    mode = "offline" if found[-1].name.startswith("offline-") else "online"
    return {"id": run_id, "mode": mode, "path": str(found[-1])}


def _rel(path: Optional[str], root: str) -> str:
    if not path:
        return "-"
    try:
        return os.path.relpath(path, root) if Path(path).resolve().is_relative_to(Path(root).resolve()) else path
    except ValueError:
        return path


def stage_row(pipe: Pipeline, step: Step, status: str, transcript: Optional[str] = None) -> dict[str, Any]:
    marker = read_marker(pipe, step.name)
    metrics, notes = {}, []
    if status in ("done", "skipped"):
        for m in step.metrics:
            value, why = read_metric(m, step)
            metrics[m.name] = value
            if why:
                notes.append(why)
    plots = sorted(str(p) for p in Path(step.run_dir, "plots").glob("*.png")) if step.run_dir else []
    row = {"stage": step.name, "status": status, "metrics": metrics,
           "percent": [m.name for m in step.metrics if m.percent],
           "wall_s": marker.get("wall_s") if status in ("done", "skipped") else marker.get("spent_s"),
           "checkpoint": step.out if step.kind == "recipe" else None, "output": step.out,
           "hf": step.hf if step.hf and Path(step.hf).exists() else None,
           "run_dir": step.run_dir, "wandb": wandb_run(step.run_dir), "plots": plots,
           "log": str(pipe.log_path(step.name)), "notes": notes + list(marker.get("notes") or [])}
    if transcript is None and step.transcript:
        transcript = marker.get("transcript")
    if transcript:
        row["transcript"] = transcript
    return row


def collect(pipe: Pipeline, status: dict[str, str], transcripts: Optional[dict[str, str]] = None,
            state: str = "done", started_at: Optional[float] = None, extra: Optional[dict] = None,
            walls: Optional[dict[str, float]] = None) -> dict[str, Any]:
    """The summary as data: the pipeline's state and a row per stage (stages not reached: "pending").
    `walls`: stage times measured elsewhere (a Slurm chain's jobs). They win over the markers' own, except
    that Slurm clocks whole seconds: a stage that ran in under one second spans 0 there, so the larger counts."""
    rows = [stage_row(pipe, s, status.get(s.name, "pending"), (transcripts or {}).get(s.name)) for s in pipe.steps]
    for r in rows:
        if walls and r["stage"] in walls:
            r["wall_s"] = max(walls[r["stage"]], r["wall_s"] or 0.0)
    now = time.time()
    return {"pipeline": {"config": pipe.source, "dir": pipe.dir, "group": pipe.group, "state": state,
                         "started_at": started_at, "finished_at": now,
                         "wall_s": None if started_at is None else now - started_at,
                         "stage_time_s": sum(r["wall_s"] or 0 for r in rows if r["status"] in ("done", "skipped")),
                         "load_average": list(os.getloadavg()), **(extra or {})},
            "stages": rows}


def _metrics_text(row: dict[str, Any]) -> str:
    return ", ".join(f"{k} {fmt_value(v, k in row['percent'])}" for k, v in row["metrics"].items()) or "-"


def _wandb_text(w: Optional[dict[str, str]]) -> str:
    return f"{w['id']} ({w['mode']})" if w else "-"


COLUMNS = ("stage", "status", "metrics", "time", "checkpoint / output", "HF export", "W&B run")


def rows_text(summary: dict[str, Any]) -> list[list[str]]:
    root = summary["pipeline"]["dir"]
    return [[r["stage"], r["status"], _metrics_text(r), fmt_seconds(r["wall_s"]), _rel(r["output"], root),
             _rel(r["hf"], root), _wandb_text(r["wandb"])] for r in summary["stages"]]


def table(summary: dict[str, Any]) -> str:
    """The summary as fixed-width text (what the runner prints at the end)."""
    rows = [list(COLUMNS)] + rows_text(summary)
    p = summary["pipeline"]
    rows.append(["total", p["state"], "", fmt_seconds(p["stage_time_s"]), f"(paths relative to {p['dir']})", "", ""])
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(summary: dict[str, Any]) -> str:
    """summary.md: the table, then plots, W&B runs and transcripts, with links relative to the file."""
    p = summary["pipeline"]
    root = p["dir"]
    out = [f"# Pipeline {p['group']}: {p['state']}", "",
           f"Config `{p['config']}`, directory `{root}`; stage time {fmt_seconds(p['stage_time_s'])}"
           + (f", this run {fmt_seconds(p['wall_s'])}" if p.get("wall_s") is not None else "")
           + f"; load average at the end {', '.join(f'{x:.2f}' for x in p['load_average'])}.", "",
           "| " + " | ".join(COLUMNS) + " | log |", "|" + "---|" * (len(COLUMNS) + 1)]
    for r, cells in zip(summary["stages"], rows_text(summary)):
        cells = [c.replace("|", "\\|") for c in cells]
        for i, key in ((4, "output"), (5, "hf")):
            if r[key] and cells[i] != "-":
                cells[i] = f"[{cells[i]}]({_rel(r[key], root)})"
        out.append("| " + " | ".join(cells) + f" | [log]({_rel(r['log'], root)}) |")
    for r in summary["stages"]:
        extras = []
        if r["plots"]:
            extras.append(" ".join(f"![{Path(x).stem}]({_rel(x, root)})" for x in r["plots"]))
        w = r["wandb"]
        if w and w["mode"] == "offline":
            extras.append(f"W&B run {w['id']} (offline): `wandb sync {w['path']}`")
        elif w:
            extras.append(f"W&B run {w['id']} ({w['mode']}), files in `{w['path']}`")
        if r.get("notes"):
            extras.append("Notes: " + "; ".join(r["notes"]))
        if r.get("transcript"):
            extras.append("```text\n" + r["transcript"].rstrip() + "\n```")
        if extras:
            out += ["", f"## {r['stage']}", ""] + [e + "\n" for e in extras]
    return "\n".join(out).rstrip() + "\n"


def write_summary(pipe: Pipeline, summary: dict[str, Any]) -> tuple[Path, Path]:
    """DIR/summary.json and DIR/summary.md, each written atomically."""
    js, md = Path(pipe.dir) / "summary.json", Path(pipe.dir) / "summary.md"
    # unique temporary names: stages that do not read each other finish as parallel Slurm jobs,
    # and each rewrites the summary at its end
    atomic_write_text(js, json.dumps(summary, indent=1) + "\n", unique=True)
    atomic_write_text(md, markdown(summary), unique=True)
    return js, md
