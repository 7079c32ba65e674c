"""data_prep/cli.py and the Slurm wrappers: `--a-b` = `--a_b`, usage lines that name runnable
commands, `merge` in make_shards' help, every flag documented, `--help` on the shell scripts."""
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep import make_shards as ms
from data_prep import train_tokenizer as tt
from data_prep.cli import underscore_options
from gpt.shards import read_manifest
from tests.test_make_shards import _jsonl, corpus, tok_path  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def test_underscore_options():
    names = {"max_bad_lines", "hub_config", "print_config"}
    assert underscore_options(["--max-bad-lines", "2", "--max-bad-lines=3", "--source+", "a-b", "--hub-config+", "x",
                               "--print-config", "--not-known", "-h"], names) == \
        ["--max_bad_lines", "2", "--max_bad_lines=3", "--source+", "a-b", "--hub_config+", "x",
         "--print_config", "--not-known", "-h"]


def test_dashes_and_underscores_alike(tmp_path, corpus, tok_path, capsys):
    src = _jsonl(tmp_path / "in.jsonl", [t[:300 + 20 * i] for i, t in enumerate(corpus[:20])] + [""])
    ms.main(["--source", str(src), "--tokenizer", str(tok_path), "--out", str(tmp_path / "a"), "--val-fraction=0.2",
             "--max-tokens-per-shard", "3000", "--max-doc-chars", "500", "--progress", "false"])
    ms.main(["--source", str(src), "--tokenizer", str(tok_path), "--out", str(tmp_path / "b"), "--val_fraction=0.2",
             "--max_tokens_per_shard", "3000", "--max_doc_chars", "500", "--progress", "false"])
    a, b = read_manifest(tmp_path / "a"), read_manifest(tmp_path / "b")
    assert a["splits"] == b["splits"] and a["skipped"] == b["skipped"] == {"empty": 1, "too_long": 9}
    assert a["val_fraction"] == 0.2 and a["splits"]["train"]["documents"] + a["splits"]["val"]["documents"] == 11
    ms.main(["merge", "--out", str(tmp_path / "a")])
    tt.main(["--source", str(src), "--out", str(tmp_path / "t.json"), "--vocab-size", "300", "--min-frequency", "3"])
    capsys.readouterr()


@pytest.mark.parametrize("argv,usage", [
    (["-m", "data_prep.make_shards", "--help"], "usage: python -m data_prep.make_shards [--config CONFIG]"),
    (["-m", "data_prep.make_shards", "merge", "--help"], "usage: python -m data_prep.make_shards merge [--config"),
    (["-m", "data_prep.train_tokenizer", "--help"], "usage: python -m data_prep.train_tokenizer [--config")])
def test_help_names_runnable_commands(argv, usage):
    run = subprocess.run([sys.executable, *argv], cwd=ROOT, env=ENV, capture_output=True, text=True, check=True)
    assert run.stdout.startswith(usage) and ".py" not in run.stdout.split("\n\n")[0]
    if argv[1:] == ["data_prep.make_shards", "--help"]:
        text = " ".join(run.stdout.split())
        assert ("Subcommand merge: once every task of an array job has finished, `python -m data_prep.make_shards "
                "merge --out DIR` checks them") in text


@pytest.mark.parametrize("func", [ms.make_shards, ms.merge, tt.train_tokenizer])
def test_every_flag_has_help_text(func):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_function_arguments(func)
    helps = {a.dest: a.help for a in parser._actions}
    for name in inspect.signature(func).parameters:
        assert helps.get(name) and len(helps[name]) > 10, f"--{name} has no help text"


def test_slurm_scripts_help():
    for script, first in (("data_prep.sh", "Submit the data-prep job array"),
                          ("data_prep.sbatch", "Data prep on Slurm: one task of the sharding job array")):
        for flag in ("--help", "-h"):
            run = subprocess.run(["bash", str(ROOT / "slurm" / script), flag], capture_output=True, text=True,
                                 env={k: v for k, v in os.environ.items() if not k.startswith("SLURM_")})
            assert (run.returncode, run.stderr) == (0, "") and run.stdout.startswith(first), (script, run)
            assert "python -m data_prep.make_shards" in run.stdout


def test_sbatch_keeps_a_dashed_num_proc(tmp_path):
    """`--num-proc 3` must not get the script's default `--num_proc $SLURM_CPUS_PER_TASK` appended
    after it (the later flag would win). PYTHON is a stand-in that prints its arguments."""
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\necho "$@"\n')
    fake.chmod(0o755)
    env = {**ENV, "GPT_REPO": str(ROOT), "PYTHON": str(fake), "SLURM_CPUS_PER_TASK": "8", "SLURM_JOB_ID": "1"}
    for given, want in ((["--num-proc", "3"], "--num-proc 3"), (["--num_proc=3"], "--num_proc=3"),
                        ([], "--num_proc 8")):
        run = subprocess.run(["bash", str(ROOT / "slurm" / "data_prep.sbatch"), "shard", "--out", "d", *given],
                             capture_output=True, text=True, env=env, check=True)
        assert run.stdout.splitlines()[-1] == f"-m data_prep.make_shards --out d {want}".replace("  ", " ").strip()
