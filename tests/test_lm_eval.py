"""gpt/lm_eval.py and `gpt eval`: the val/loss and val/bpb training logs, for any checkpoint kind.

    pytest tests/test_lm_eval.py            # in-process Lightning validation vs `gpt eval`
    pytest tests/test_lm_eval.py -m slow    # a real recipe run's logged val/loss vs `gpt eval`
"""
import json
import os
import subprocess
import sys

import lightning as L
import pytest
import torch

from gpt.checkpoint import load_model
from gpt.cli import main
from gpt.data import PretrainDataModule
from gpt.lm_eval import summary_line
from gpt.lm import CausalLMModule
from tests.pretrain_fixtures import ROOT, read_csv_metrics, read_wandb_history, run_recipe, write_config, write_text_shards
from tests.test_cli import _tokenizer

MODEL = {"vocab_size": 300, "block_size": 64, "n_layer": 2, "n_head": 2, "n_embd": 32}
BLOCK, WINDOWS = 32, 8


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained 4 steps, its checkpoint, and the validation Lightning runs on it."""
    d = tmp_path_factory.mktemp("eval")
    _tokenizer().save(d / "tokenizer.json")
    shards = write_text_shards(d / "shards", d / "tokenizer.json", max_chars=60_000)
    torch.manual_seed(0)
    module = CausalLMModule(preset="tiny", model_config=MODEL, tokenizer=str(d / "tokenizer.json"), lr=1e-2,
                            warmup_steps=1)
    dm = PretrainDataModule(str(shards), tokenizer=str(d / "tokenizer.json"), block_size=BLOCK, micro_batch_size=4,
                            val_windows=WINDOWS)
    quiet = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                 enable_checkpointing=False, use_distributed_sampler=False, precision="32-true")
    fit = L.Trainer(max_steps=4, limit_val_batches=0, num_sanity_val_steps=0, **quiet)
    fit.fit(module, dm)
    fit.save_checkpoint(d / "last.ckpt")
    logged = L.Trainer(**quiet).validate(module, dm, verbose=False)[0]
    return d, shards, logged


def _eval(capsys, *argv: str) -> dict:
    main(["eval", *argv, "--json", "-"])
    out = capsys.readouterr()
    result = json.loads(out.out)
    assert out.err.splitlines()[-1] == summary_line(result)  # with --json -, the line goes to stderr
    return result


def test_eval_equals_the_validation_of_training_for_every_checkpoint_kind(trained, tmp_path, capsys):
    d, shards, logged = trained
    main(["export", "--checkpoint", str(d / "last.ckpt"), "--out", str(tmp_path / "hf")])
    main(["export", "--checkpoint", str(d / "last.ckpt"), "--out", str(tmp_path / "native"), "--format", "native"])
    capsys.readouterr()
    for ckpt in (d / "last.ckpt", tmp_path / "hf", tmp_path / "native"):
        r = _eval(capsys, "--checkpoint", str(ckpt), "--data", str(shards), "--windows", str(WINDOWS),
                  "--block-size", str(BLOCK), "--batch_size", "3")
        assert abs(r["loss"] - logged["val/loss"]) <= 1e-5, (ckpt, r, logged)
        assert abs(r["bpb"] - logged["val/bpb"]) <= 1e-5, (ckpt, r, logged)
        assert (r["windows"], r["block_size"], r["tokens"], r["split"]) == (WINDOWS, BLOCK, WINDOWS * BLOCK, "val")
        assert r["checkpoint"] == str(ckpt) and r["tokenizer_sha256"] == load_model(ckpt)[1].content_hash
    assert logged["val/loss"] < 5.6  # trained: below the ln(300) = 5.70 of a uniform guess


def test_eval_defaults_to_every_window_at_the_models_block_size(trained, capsys):
    d, shards, _ = trained
    from gpt.shards import TokenShards

    every = (TokenShards(shards, "val").num_tokens - 1) // MODEL["block_size"]
    r = _eval(capsys, "--checkpoint", str(d / "last.ckpt"), "--data", str(shards))
    assert (r["windows"], r["block_size"]) == (every, MODEL["block_size"])
    r = _eval(capsys, "--checkpoint", str(d / "last.ckpt"), "--data", str(shards), "--windows", "100000")
    assert r["windows"] == every  # capped at what the split holds, and the output says so
    r = _eval(capsys, "--checkpoint", str(d / "last.ckpt"), "--data", str(shards), "--split", "train",
              "--windows", "2")
    assert r["split"] == "train" and r["windows"] == 2


def test_eval_writes_json_atomically_and_no_wandb_run_unless_asked(trained, tmp_path, capsys, monkeypatch):
    d, shards, logged = trained
    monkeypatch.chdir(tmp_path)
    main(["eval", "--checkpoint", str(d / "last.ckpt"), "--data", str(shards), "--windows", str(WINDOWS),
          "--block_size", str(BLOCK), "--json", "out/eval.json"])
    line = capsys.readouterr().out
    result = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert line == summary_line(result) + "\n" and abs(result["loss"] - logged["val/loss"]) <= 1e-5
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["eval.json", "out"]  # no temp file, no wandb/


def test_eval_logs_one_wandb_run_when_asked(trained, tmp_path):
    """In a subprocess: wandb finishes writing its offline file when the process exits."""
    d, shards, _ = trained
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "gpt", "eval", "--checkpoint", str(d / "last.ckpt"), "--data", str(shards),
                        "--windows", "2", "--json", "-", "--wandb-project", "evals", "--wandb-group", "exp1",
                        "--wandb-dir", str(tmp_path / "wb")], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)  # W&B's own lines go to stderr: stdout stays JSON
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and not (tmp_path / "wandb").exists()
    rows = read_wandb_history(runs[0])
    assert [row["eval/loss"] for row in rows if "eval/loss" in row] == [pytest.approx(r["loss"], abs=1e-9)]
    assert [row["eval/bpb"] for row in rows if "eval/bpb" in row] == [pytest.approx(r["bpb"], abs=1e-9)]


def _error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        main(["eval", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("gpt: error: "), err
    return err


def test_eval_refuses_shards_of_another_tokenizer(trained, tmp_path, capsys):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from gpt.tokenizer import SPECIAL_TOKENS, Tokenizer

    d, _, _ = trained
    other = HFTokenizer(models.BPE())
    other.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    other.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=280, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    other.train_from_iterator(["an entirely different corpus of words"] * 20, trainer)
    Tokenizer(other).save(tmp_path / "other.json")
    shards = write_text_shards(tmp_path / "shards", tmp_path / "other.json", max_chars=20_000)
    err = _error(capsys, "--checkpoint", str(d / "last.ckpt"), "--data", str(shards))
    assert f"tokenizer mismatch for {shards}: shards were written with tokenizer" in err


def test_eval_without_a_tokenizer_gives_loss_and_says_why_no_bpb(trained, tmp_path, capsys):
    d, shards, logged = trained
    model, _ = load_model(d / "last.ckpt")
    from gpt.checkpoint import save_model

    save_model(model, tmp_path / "bare")  # no tokenizer.json
    r = _eval(capsys, "--checkpoint", str(tmp_path / "bare"), "--data", str(shards), "--windows", str(WINDOWS),
              "--block_size", str(BLOCK))
    assert r["bpb"] is None and r["tokenizer_sha256"] is None and abs(r["loss"] - logged["val/loss"]) <= 1e-5
    main(["eval", "--checkpoint", str(tmp_path / "bare"), "--data", str(shards), "--windows", "1"])
    assert "holds no tokenizer" in capsys.readouterr().err


def test_eval_bad_options_are_one_line(trained, tmp_path, capsys):
    d, shards, _ = trained
    ckpt = str(d / "last.ckpt")
    assert "windows must be >= 1, got 0" in _error(capsys, "--checkpoint", ckpt, "--data", str(shards), "--windows", "0")
    assert "block_size 65 is longer than the model's block_size 64" in _error(
        capsys, "--checkpoint", ckpt, "--data", str(shards), "--block_size", "65")
    assert f"no manifest.json in {tmp_path}" in _error(capsys, "--checkpoint", ckpt, "--data", str(tmp_path))
    assert "no split 'test' (has train, val)" in _error(capsys, "--checkpoint", ckpt, "--data", str(shards),
                                                         "--split", "test")
    assert "missing --data (see gpt eval --help)" in _error(capsys, "--checkpoint", ckpt)


@pytest.mark.slow
def test_eval_equals_the_val_loss_a_recipe_run_logged(tmp_path, capsys):
    """Through recipes/pretrain.py: the CSV's last val/loss and val/bpb, for last.ckpt and its HF export."""
    _tokenizer().save(tmp_path / "tokenizer.json")
    shards = write_text_shards(tmp_path / "shards", tmp_path / "tokenizer.json", max_chars=60_000)
    cfg = write_config(tmp_path / "run.yaml", tmp_path / "run", shards, tmp_path / "tokenizer.json", max_steps=8,
                       vocab_size=300)
    run_recipe(cfg)
    rows = [r for r in read_csv_metrics(tmp_path / "run") if "val/loss" in r]
    assert len(rows) == 1  # one validation, at the end (val_check_interval = max_steps)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    main(["export", "--checkpoint", str(last), "--out", str(tmp_path / "hf")])
    capsys.readouterr()
    for ckpt in (last, tmp_path / "hf"):
        r = _eval(capsys, "--checkpoint", str(ckpt), "--data", str(shards), "--windows", "8", "--block_size", "32")
        assert abs(r["loss"] - rows[0]["val/loss"]) <= 1e-5, (ckpt, r, rows[0])
        assert abs(r["bpb"] - rows[0]["val/bpb"]) <= 1e-5, (ckpt, r, rows[0])
