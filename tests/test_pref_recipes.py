"""recipes/reward.py and recipes/dpo.py end to end, as a user runs them: the demo configs, a run started
from --init_from, held-out pair accuracy (reward model) and margins (DPO) rising, exact resume after
kill -9 (the DPO reference table read back from the checkpoint), and 2 DDP ranks giving the 1-rank numbers.

    pytest tests/test_pref_recipes.py              # the configs
    pytest tests/test_pref_recipes.py -m slow      # the runs (subprocesses, ~5 minutes on 2 cores)
"""
import math
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from gpt.checkpoint import load_model, save_model
from gpt.config import GPTConfig
from gpt.model import GPT
from gpt.objectives import sequence_logprobs
from gpt.pair_data import PairCollator, PairDataModule
from gpt.reward import load_reward_model
from tests.chat_fixtures import shakespeare_tokenizer
from tests.pref_fixtures import (csv_metrics, demo_pair_rows, pref_recipe, tiny_config, write_pairs_dir,
                                 write_pref_config)
from tests.pretrain_fixtures import ROOT

slow = pytest.mark.slow
SLOW_DOWN = [{"class_path": "tests.pretrain_fixtures.SlowDown", "init_args": {"seconds": 0.5}}]


# ---- the demo configs ------------------------------------------------------------------------
@pytest.mark.parametrize("stage", ["reward", "dpo"])
def test_demo_config_parses_and_chains_from_sft(stage, capsys, monkeypatch):
    import importlib

    monkeypatch.setattr(sys, "argv", [f"recipes.{stage}"])
    main = importlib.import_module(f"recipes.{stage}").main
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(ROOT / "recipes" / "configs" / f"{stage}-tiny-cpu.yaml"), "--print_config"])
    assert e.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    pretrain = yaml.safe_load((ROOT / "recipes" / "configs" / "tiny-cpu.yaml").read_text())
    assert printed["group"] == "demo" and printed["init_from"] == "runs/demo/sft/checkpoints/last.ckpt"
    assert printed["model"]["model_config"] == pretrain["model"]["model_config"]  # the demo chain's one shape
    assert printed["data"]["block_size"] == printed["model"]["model_config"]["block_size"]
    assert printed["data"]["tokenizer"] == pretrain["data"]["tokenizer"]
    assert printed["trainer"]["use_distributed_sampler"] is False
    assert printed["val_every"] > 0 and printed["checkpoint_every"] > 0
    if stage == "dpo":
        assert printed["model"]["loss_type"] == "sigmoid" and printed["model"]["beta"] > 0
        assert any(c["class_path"] == "gpt.chat_eval.ChatEval" for c in printed["trainer"]["callbacks"])
    else:
        assert "margin" in printed["model"]


# ---- runs ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    return shakespeare_tokenizer()


@pytest.fixture(scope="module")
def data(tmp_path_factory, tok) -> Path:
    """Demo-task pairs (DPO: 48 train, 16 held-out val; reward model: 480 and 40) and a starting model
    (the --init_from export)."""
    d = tmp_path_factory.mktemp("pref_recipes")
    tok.save(d / "tokenizer.json")
    write_pairs_dir(d, d / "tokenizer.json", demo_pair_rows(48, "train", seed=1), demo_pair_rows(16, "val", seed=2))
    write_pairs_dir(d / "rm", d / "tokenizer.json", demo_pair_rows(480, "train", seed=1),
                    demo_pair_rows(40, "val", seed=2))
    torch.manual_seed(0)
    save_model(GPT(GPTConfig.from_preset("tiny", **tiny_config(tok.vocab_size))), d / "init", tokenizer=tok)
    return d


def _config(d: Path, tok, name: str, stage: str, **kw) -> Path:
    dpo = stage == "dpo"
    model_args = {"lr": 3e-3, "warmup_steps": 2 if dpo else 5, **({"beta": 0.1} if dpo else {})}
    pairs = d / "pairs" if dpo else d / "rm" / "pairs"
    path = write_pref_config(d / f"{name}.yaml", d / name, pairs, d / "tokenizer.json", tok.vocab_size,
                             model_args=model_args, **kw)
    cfg = yaml.safe_load(path.read_text())
    cfg["init_from"] = str(d / "init")
    cfg["data"]["val_pairs"] = 16 if dpo else 40
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _val_batch(pairs: Path, n: int) -> dict[str, torch.Tensor]:
    dm = PairDataModule(str(pairs), str(pairs.parent.parent / "tokenizer.json"), block_size=128, val_pairs=n)
    dm._open()
    return PairCollator(dm.collate.pad_id)([dm.val[i] for i in range(n)])  # two rows per pair (training shares)


@slow
def test_reward_recipe_from_init_ranks_held_out_pairs(data, tok):
    cfg = _config(data, tok, "rm", "reward", devices=1, max_steps=60, micro_batch_size=16, accumulate=1,
                  checkpoint_every=30, val_every=30)
    out = pref_recipe("reward", cfg).stdout
    assert f"new run from the weights of {data / 'init'}" in out
    run = data / "rm"
    assert csv_metrics(run, "train/loss")[0] == pytest.approx(math.log(2), abs=0.05)  # a fresh head: r ~ 0
    acc = csv_metrics(run, "val/accuracy")
    print(f"held-out pair accuracy by step: {acc}")
    assert sorted(acc) == [30, 60] and acc[60] >= 0.75  # chance is 0.5
    # the checkpoint scores the held-out pairs as training measured them
    rm, _ = load_reward_model(run / "checkpoints" / "last.ckpt")
    b = _val_batch(data / "rm" / "pairs", 40)
    with torch.no_grad():
        chosen, rejected = rm.score(b["input_ids"], b["last_index"]).chunk(2)
    assert (chosen > rejected).float().mean().item() == pytest.approx(acc[60], abs=1e-6)
    # the backbone came from --init_from and was trained (not only the head)
    start = load_model(data / "init")[0].state_dict()
    assert any(not torch.equal(v, start[k]) for k, v in rm.backbone.state_dict().items())


@pytest.fixture(scope="module")
def dpo_one_rank(data, tok) -> Path:
    """24 steps of 8 pairs (4 x 2 accumulated) from --init_from, validation and checkpoints at 12 and 24."""
    cfg = _config(data, tok, "dpo1", "dpo", devices=1, max_steps=24, micro_batch_size=4, accumulate=2,
                  checkpoint_every=12, val_every=12)
    out = pref_recipe("dpo", cfg)
    assert "DPO reference: log-probs of 48 pairs cached" in out.stdout + out.stderr  # a fresh run computes them
    return data / "dpo1"


@slow
def test_dpo_recipe_from_init_raises_margins(dpo_one_rank, data):
    run = dpo_one_rank
    loss = csv_metrics(run, "train/loss")
    assert sorted(loss) == list(range(24)) and loss[0] == pytest.approx(math.log(2), abs=1e-6)
    # step 0's policy log-probs are the --init_from model's on the first global batch (pairs 0..7 of the order)
    model, _ = load_model(data / "init")
    dm = PairDataModule(str(data / "pairs"), str(data / "tokenizer.json"), block_size=128, micro_batch_size=4,
                        seed=7, val_pairs=16)
    dm._open()
    b = PairCollator(dm.collate.pad_id)([dm.train[i] for i in range(8)])  # two rows per pair: independent of training's
    with torch.no_grad():
        logp = sequence_logprobs(model(b["input_ids"]), b["labels"]).double()
    chosen, rejected = logp.chunk(2)
    assert csv_metrics(run, "logps/chosen")[0] == pytest.approx(chosen.mean().item(), abs=1e-4)
    assert csv_metrics(run, "logps/rejected")[0] == pytest.approx(rejected.mean().item(), abs=1e-4)
    margins, acc = csv_metrics(run, "val/rewards/margins"), csv_metrics(run, "val/rewards/accuracies")
    print(f"held-out margins {margins}, accuracies {acc}")
    assert sorted(margins) == [12, 24] and 0 < margins[12] < margins[24]
    assert acc[24] >= 0.75
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["dpo_reference"]["train"].shape == (48, 2)  # the reference rides in the checkpoint


@slow
def test_dpo_recipe_kill_9_then_resume_is_exact(dpo_one_rank, data, tok):
    """Killed (SIGKILL) after its step-12 checkpoint: `--ckpt_path last` repeats steps 12-23 of the
    uninterrupted run exactly (the reference table from the checkpoint, never recomputed)."""
    cfg = _config(data, tok, "killed", "dpo", devices=1, max_steps=24, micro_batch_size=4, accumulate=2,
                  checkpoint_every=12, val_every=12, callbacks=SLOW_DOWN)
    run = data / "killed"
    p = pref_recipe("dpo", cfg, wait=False)
    deadline = time.time() + 600
    while not (run / "checkpoints" / "step=12.ckpt").is_file():
        assert p.poll() is None and time.time() < deadline, "the run ended before its step-12 checkpoint"
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert not (run / "checkpoints" / "step=24.ckpt").exists()
    out = pref_recipe("dpo", cfg, "--ckpt_path", "last")
    assert "DPO reference" not in out.stdout + out.stderr  # read from the checkpoint, not recomputed
    want = dpo_one_rank
    for key in ("train/loss", "rewards/margins", "logps/chosen", "logps/rejected"):
        got, ref = csv_metrics(run, key), csv_metrics(want, key)
        assert set(range(12, 24)) <= set(got), key
        assert all(got[s] == ref[s] for s in range(12, 24)), (key, got, ref)
    assert csv_metrics(run, "val/rewards/margins")[24] == csv_metrics(want, "val/rewards/margins")[24]


@slow
def test_dpo_recipe_two_ranks_match_one(dpo_one_rank, data, tok):
    """2 DDP processes (gloo) x 4 pairs = the 1-rank run's 4 pairs x 2 accumulated: the same global batches,
    the same reference table (each rank computes half), the same numbers."""
    cfg = _config(data, tok, "dpo2", "dpo", devices=2, max_steps=24, micro_batch_size=4, accumulate=1,
                  checkpoint_every=12, val_every=12)
    pref_recipe("dpo", cfg)
    for key in ("train/loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected",
                "val/loss", "val/rewards/margins", "val/rewards/accuracies"):
        got, want = csv_metrics(data / "dpo2", key), csv_metrics(dpo_one_rank, key)
        assert sorted(got) == sorted(want) and want, key
        if key == "rewards/accuracies":  # at step 0 policy = reference: chosen > rejected is a tie broken by
            got.pop(0), want.pop(0)      # float noise (the ranks batch the reference pairs differently)
        assert max(abs(got[s] - want[s]) for s in want) <= 1e-4, (key, got, want)
