"""Pictures of runs, offline: PNG curves from the metrics a run logged with Lightning's CSVLogger.

    gpt plot runs/demo/pretrain                               # -> runs/demo/pretrain/plots/*.png
    gpt plot runs/lr3e-4 runs/lr1e-3 --out runs/compare      # one figure per metric, a line per run
    gpt plot runs/a runs/b --metrics train/loss,val/loss --out runs/compare

    from gpt.plots import read_metrics, plot_run
    series = read_metrics("runs/demo/pretrain")              # {"train/loss": {step: value}, ...}
    paths = plot_run("runs/demo/pretrain")

A run directory holds `csv/version_*/metrics.csv`, one version per start: a resumed run writes a
new version, and its rows overwrite the steps they repeat (later versions win). PANELS says which
metrics go together, keyed on metric-name prefixes, so a new stage only adds names there; a metric
that no panel claims still gets a figure of its own. Figures use matplotlib's non-interactive Agg
backend and are written atomically (a temporary file, then a rename).
"""
from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

Series = dict[int, float]  # step -> value

# (file name, title, y label, name prefixes, log scale). A metric's name is matched without its split
# ("train/", "val/", "test/"), so a panel shows the training and validation curves of a quantity
# together; the first panel whose prefix matches takes the metric.
PANELS: list[tuple[str, str, str, tuple[str, ...], bool]] = [
    ("loss", "loss", "nats / token", ("loss",), False),
    ("bpb", "bits per byte", "bits / byte", ("bpb",), False),
    ("lr", "learning rate", "lr", ("lr-", "lr"), True),
    ("grad_norm", "gradient norm (before clipping)", "L2 norm", ("grad_norm",), True),
    ("throughput", "throughput per device", "tokens / s", ("device/items_per_sec", "items_per_sec"), False),
    ("mfu", "model FLOPs utilization", "MFU", ("device/mfu", "mfu"), False),
    ("accuracy", "reward model accuracy", "accuracy", ("accuracy", "acc"), False),
    ("exact_match", "exact match", "fraction", ("exact_match",), False),
    ("rewards", "DPO implicit rewards", "reward", ("rewards/",), False),  # chosen, rejected, margins
    ("logps", "log-probabilities", "log p", ("logps/",), False),        # chosen, rejected
    ("nll", "NLL of the chosen reply", "nats / token", ("nll_loss",), False),  # DPO's rpo_alpha term
    ("margin", "reward margin (chosen - rejected)", "reward", ("margin",), False),
    ("reward", "RL reward", "reward", ("reward", "score", "verifier_reward"), False),
    ("kl", "KL to the reference", "KL (nats)", ("kl",), False),
    ("length", "response length", "tokens", ("length", "response_length"), False),
]
SPLITS = ("train/", "val/", "test/")
# Bookkeeping columns (counters, per-sample and per-batch rates): read, but not drawn unless asked for.
SKIP = {"step", "epoch", "train/tokens", "train/skipped_steps", "train/batches", "train/samples", "train/time",
        "train/lengths"}
SKIP_PREFIXES = ("validate/", "train/device/batches_per_sec", "train/device/samples_per_sec",
                 "train/device/flops_per_sec", "train/batches_per_sec", "train/samples_per_sec",
                 "train/flops_per_sec")


def _stem(metric: str) -> str:
    return next((metric[len(s):] for s in SPLITS if metric.startswith(s)), metric)


# ---- reading ------------------------------------------------------------------------------
def metric_files(run_dir: str | os.PathLike) -> list[Path]:
    """`csv/version_*/metrics.csv` of a run in version order (numeric: version_10 after version_9)."""
    versions = [p for p in Path(run_dir, "csv").glob("version_*") if p.name.split("_", 1)[1].isdigit()]
    return [v / "metrics.csv" for v in sorted(versions, key=lambda p: int(p.name.split("_", 1)[1]))
            if (v / "metrics.csv").is_file()]


def read_csv_rows(run_dir: str | os.PathLike) -> list[dict[str, float]]:
    """Every row of every version, in version order, empty cells dropped, values as floats."""
    rows = []
    for path in metric_files(run_dir):
        with open(path, newline="") as f:
            for line, row in enumerate(csv.DictReader(f), start=2):
                try:
                    rows.append({k: float(x) for k, x in row.items() if k and x not in ("", None)})
                except (TypeError, ValueError) as e:
                    raise ValueError(f"{path}:{line}: not a number ({e})") from None
    return rows


def read_metrics(run_dir: str | os.PathLike) -> dict[str, Series]:
    """{metric: {step: value}} merged over versions: a resumed run's rows overwrite the steps they repeat.

    Every logged column but `step` itself (bookkeeping such as train/tokens included)."""
    if not metric_files(run_dir):
        raise FileNotFoundError(f"{run_dir}: no csv/version_*/metrics.csv (was the run logged with CSVLogger?)")
    series: dict[str, Series] = {}
    for row in read_csv_rows(run_dir):
        if "step" not in row:
            continue
        step = int(row["step"])
        for key, value in row.items():
            if key != "step":
                series.setdefault(key, {})[step] = value
    return {k: dict(sorted(v.items())) for k, v in series.items()}


# ---- panels -------------------------------------------------------------------------------
def panel_of(metric: str) -> tuple[str, str, str, bool]:
    """(file name, title, y label, log scale) of the panel that shows `metric`."""
    stem = _stem(metric)
    for name, title, ylabel, prefixes, log in PANELS:
        if stem.startswith(prefixes):
            return name, title, ylabel, log
    return metric.replace("/", "_"), metric, metric, False


def group_panels(metrics: Sequence[str]) -> dict[str, list[str]]:
    """Panel file name -> metrics on it, in PANELS order, then unclaimed metrics one each."""
    groups: dict[str, list[str]] = {}
    for m in sorted(metrics):
        groups.setdefault(panel_of(m)[0], []).append(m)
    order = [p[0] for p in PANELS]
    return dict(sorted(groups.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0])))


# ---- drawing ------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, safe in Slurm jobs and CI
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Write a figure as PNG atomically (temp file in the same directory, then rename) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        _pyplot().close(fig)
    return path


def figure(panel: str, runs: dict[str, dict[str, Series]], metrics: Sequence[str]) -> Any:
    """One panel: a line per (run, metric); validation metrics drawn with markers (they are sparse)."""
    plt = _pyplot()
    _, title, ylabel, log = panel_of(metrics[0])
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for run, series in runs.items():
        for m in metrics:
            points = series.get(m)
            if not points:
                continue
            label = m if len(runs) == 1 else (run if len(metrics) == 1 else f"{run}: {m}")
            style = {"marker": "o", "markersize": 3} if m.startswith("val/") or len(points) < 3 else {}
            ax.plot(list(points), list(points.values()), label=label, linewidth=1.2, **style)
    positive = all(v > 0 for s in runs.values() for m in metrics for v in s.get(m, {}).values())
    if log and positive:
        ax.set_yscale("log")
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.grid(True, alpha=0.3)
    if len(ax.get_lines()) > 1 or len(runs) > 1:
        ax.legend(fontsize=8)
    return fig


def figures(runs: dict[str, dict[str, Series]], metrics: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Panel file name -> matplotlib Figure, for the given metrics (default: every metric logged)."""
    logged = sorted({m for s in runs.values() for m, pts in s.items() if pts})
    present = [m for m in logged if m not in SKIP and not m.startswith(SKIP_PREFIXES)]
    if metrics:
        missing = [m for m in metrics if m not in logged]
        if missing:
            raise ValueError(f"metric(s) not logged by any run: {', '.join(missing)}; logged: {', '.join(present)}")
        present = list(metrics)
    return {name: figure(name, runs, ms) for name, ms in group_panels(present).items()}


def plot_run(run_dir: str | os.PathLike, out: Optional[str | os.PathLike] = None,
             metrics: Optional[Sequence[str]] = None) -> list[Path]:
    """PNGs of one run's metrics, written to `out` (default `<run_dir>/plots/`); returns their paths."""
    return plot_runs([run_dir], out or Path(run_dir) / "plots", metrics)


def plot_runs(run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike,
              metrics: Optional[Sequence[str]] = None) -> list[Path]:
    """One PNG per panel with a line per run, labelled by the run directory's name."""
    runs: dict[str, dict[str, Series]] = {}
    for d in run_dirs:
        label = _run_label(Path(d), runs)
        runs[label] = read_metrics(d)
    return [save_figure(fig, Path(out) / f"{name}.png") for name, fig in figures(runs, metrics).items()]


def _run_label(path: Path, taken: dict[str, Any]) -> str:
    """The run directory's name, or parent/name when two runs share a name (a/pretrain, b/pretrain)."""
    label = path.resolve().name
    if label in taken:
        label = f"{path.resolve().parent.name}/{label}"
    return label


def plot(run_dirs: list[str], out: Optional[str] = None, metrics: Optional[str] = None) -> None:
    """Draw a run's logged metrics as PNGs, or overlay several runs (e.g. two learning rates).

    Args:
        run_dirs: run directories (each holding csv/version_*/metrics.csv), given first: gpt plot A B.
        out: output directory; default `<run>/plots` for one run, required for several.
        metrics: only these metrics, comma-separated (e.g. train/loss,val/loss); default all.
    """
    if not run_dirs:
        raise ValueError("give at least one run directory")
    if len(run_dirs) > 1 and out is None:
        raise ValueError("several runs: say where the overlays go with --out DIR")
    names = [m.strip() for m in metrics.split(",") if m.strip()] if metrics else None
    paths = plot_run(run_dirs[0], out, names) if len(run_dirs) == 1 else plot_runs(run_dirs, out, names)
    for p in paths:
        print(p)



plot.positional = "run_dirs"  # type: ignore[attr-defined]  # gpt.cli: `gpt plot RUN... --out DIR`
