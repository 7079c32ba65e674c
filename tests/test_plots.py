"""gpt/plots.py: CSVLogger versions merged by step (later versions win), panels by name, PNGs and overlays."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpt.plots import figures, group_panels, panel_of, plot_run, plot_runs, read_metrics

ROOT = Path(__file__).resolve().parents[1]


def write_version(run: Path, version: int, rows: list[dict]) -> None:
    """A CSVLogger metrics.csv: the union of the keys as header, empty cells where a row lacks one."""
    d = run / "csv" / f"version_{version}"
    d.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for r in rows for k in r})
    with open(d / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def make_run(run: Path, lr: float = 1e-3, scale: float = 1.0) -> Path:
    # version 0: steps 0..9, then killed; version 1 resumed from the step-5 checkpoint and reached step 14;
    # version 2 (e.g. a re-run that wrote one more validation) and version 10 (numeric, not text, order).
    write_version(run, 0, [{"step": s, "train/loss": scale * (10 - s), "lr-AdamW/pg1": lr, "epoch": 0}
                           for s in range(10)] + [{"step": 9, "val/loss": 7.5, "val/bpb": 2.0}])
    write_version(run, 1, [{"step": s, "train/loss": scale * (100 + s), "train/grad_norm": 0.5, "epoch": 0}
                           for s in range(5, 15)] + [{"step": 9, "val/loss": 6.5}])
    write_version(run, 2, [{"step": 14, "val/loss": 6.0, "train/tokens": 1000}])
    write_version(run, 10, [{"step": 15, "train/loss": scale * 1.0}])
    return run


def test_versions_merge_by_step_later_versions_win(tmp_path):
    s = read_metrics(make_run(tmp_path / "run"))
    assert s["train/loss"] == {0: 10, 1: 9, 2: 8, 3: 7, 4: 6, **{k: 100 + k for k in range(5, 15)}, 15: 1.0}
    assert s["val/loss"] == {9: 6.5, 14: 6.0}  # version 1's step-9 validation replaced version 0's
    assert s["val/bpb"] == {9: 2.0}
    assert s["lr-AdamW/pg1"] == {k: 1e-3 for k in range(10)}
    assert s["train/grad_norm"] == {k: 0.5 for k in range(5, 15)}
    assert s["train/tokens"] == {14: 1000} and "step" not in s
    assert list(figures({"run": s})) == ["loss", "bpb", "lr", "grad_norm"]  # bookkeeping (epoch, tokens) not drawn


def test_panels_group_by_name_without_the_split():
    assert panel_of("train/loss")[0] == panel_of("val/loss")[0] == "loss"
    assert panel_of("lr-AdamW/pg2")[0] == "lr" and panel_of("lr-AdamW/pg2")[3]  # log scale
    assert panel_of("train/rewards/margins")[0] == panel_of("val/rewards/chosen")[0] == "rewards"
    assert panel_of("train/logps/rejected")[0] == "logps"
    assert panel_of("train/reward")[0] == "reward" and panel_of("train/kl")[0] == "kl"
    assert panel_of("val/accuracy")[0] == "accuracy" and panel_of("train/device/items_per_sec")[0] == "throughput"
    assert panel_of("train/nll_loss")[0] == panel_of("val/nll_loss")[0] == "nll"  # not the loss panel
    assert panel_of("train/margin")[0] == panel_of("val/margin")[0] == "margin"
    assert panel_of("val/verifier_reward")[0] == panel_of("train/reward")[0] == "reward"
    assert panel_of("custom/thing")[0] == "custom_thing"  # unclaimed: a figure of its own
    assert list(group_panels(["val/bpb", "train/loss", "val/loss", "zzz"])) == ["loss", "bpb", "zzz"]


def test_plot_run_writes_pngs_with_the_merged_curves(tmp_path):
    from PIL import Image

    run = make_run(tmp_path / "run")
    figs = figures({"run": read_metrics(run)})
    lines = {l.get_label(): l for l in figs["loss"].axes[0].get_lines()}
    assert set(lines) == {"train/loss", "val/loss"}
    assert list(lines["train/loss"].get_xdata()) == list(range(16))
    assert list(lines["train/loss"].get_ydata())[4:7] == [6, 105, 106]
    assert figs["lr"].axes[0].get_yscale() == "log"
    paths = plot_run(run)
    assert sorted(p.name for p in paths) == ["bpb.png", "grad_norm.png", "loss.png", "lr.png"]
    assert all(p.parent == run / "plots" for p in paths)
    with Image.open(run / "plots" / "loss.png") as im:
        w, h = im.size
        assert 500 < w < 1000 and 300 < h < 700
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 16) or []) > 20  # axes, text and curves drawn
    assert not [p for p in (run / "plots").iterdir() if p.name.startswith(".")]  # no temporary left


def test_two_runs_overlay_one_line_each(tmp_path):
    a = make_run(tmp_path / "lr3e-4", lr=3e-4)
    b = make_run(tmp_path / "lr1e-3", lr=1e-3, scale=2.0)
    figs = figures({"lr3e-4": read_metrics(a), "lr1e-3": read_metrics(b)}, ["train/loss"])
    assert list(figs) == ["loss"]
    lines = figs["loss"].axes[0].get_lines()
    assert [l.get_label() for l in lines] == ["lr3e-4", "lr1e-3"]
    assert lines[1].get_ydata()[0] == 2 * lines[0].get_ydata()[0] == 20
    paths = plot_runs([a, b], tmp_path / "cmp", ["train/loss", "val/loss"])
    assert [p.name for p in paths] == ["loss.png"]


def test_bad_input_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no csv/version_"):
        read_metrics(tmp_path / "nothing")
    run = tmp_path / "bad"
    write_version(run, 0, [{"step": 1, "train/loss": "oops"}])
    with pytest.raises(ValueError, match=r"version_0/metrics.csv:2: not a number"):
        read_metrics(run)
    with pytest.raises(ValueError, match="not logged by any run: val/nope; logged: "):
        figures({"r": read_metrics(make_run(tmp_path / "ok"))}, ["val/nope"])


def _gpt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpt", "plot", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)


def test_cli(tmp_path, capsys):
    from gpt.cli import main

    a, b = make_run(tmp_path / "a"), make_run(tmp_path / "b", scale=3.0)
    r = _gpt(str(a), str(b), "--out", str(tmp_path / "cmp"), "--metrics", "train/loss,val/bpb")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(tmp_path / "cmp" / "loss.png"), str(tmp_path / "cmp" / "bpb.png")]
    main(["plot", str(a)])
    assert capsys.readouterr().out.split()[0] == str(a / "plots" / "loss.png") and (a / "plots" / "loss.png").is_file()
    for args, message in (([str(a), str(b)], "several runs: say where the overlays go with --out DIR"),
                          ([str(tmp_path / "missing")], f"{tmp_path / 'missing'}: no csv/version_*/metrics.csv")):
        with pytest.raises(SystemExit) as e:
            main(["plot", *args])
        assert e.value.code == 2 and capsys.readouterr().err.startswith(f"gpt: error: {message}")
