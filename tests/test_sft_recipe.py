"""recipes/sft.py end to end: the demo task on a tiny model, resume after kill -9, LoRA (also under
ZeRO-2), the configs, and the HF export chatting in transformers exactly as in gpt chat.

    pytest tests/test_sft_recipe.py                 # configs, HF chat parity on a chain model
    TORCH_EXTENSIONS_DIR=$HOME/.cache/gpt-pipeline/torch_extensions pytest tests/test_sft_recipe.py -m slow
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from gpt.chat import ChatTemplate
from gpt.checkpoint import load_model, save_model
from gpt.config import GPTConfig
from gpt.demo_task import prompt_messages
from gpt.evaluate import generate_replies
from gpt.model import GPT
from tests.chat_fixtures import shakespeare_tokenizer
from tests.pretrain_fixtures import (ROOT, TINY_MODEL, losses_by_step, metric_by_step, read_csv_metrics,
                                     recipe_env, write_config)

slow = pytest.mark.slow
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "gpt-pipeline" / "torch_extensions"))
CONFIGS = sorted((ROOT / "recipes" / "configs").glob("sft-*.yaml"))
BLOCK = 64


# ---- fixtures: demo-task SFT data, a starting checkpoint, configs ------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from data_prep.make_demo_task import make_demo_task
    from data_prep.make_sft import make_sft
    d = tmp_path_factory.mktemp("sft")
    tok = shakespeare_tokenizer()
    tok.save(d / "tok.json")
    make_demo_task(str(d / "task"), train=1200, val=60)
    make_sft(str(d / "task" / "train.jsonl"), str(d / "tok.json"), str(d / "sft_data"), block_size=BLOCK,
             val_source=str(d / "task" / "val.jsonl"), progress=False)
    torch.manual_seed(0)
    init = GPT(GPTConfig.from_preset("tiny", **{**TINY_MODEL, "block_size": BLOCK, "vocab_size": tok.vocab_size}))
    save_model(init, d / "init", tokenizer=tok)
    return d


def sft_config(path: Path, run_dir: Path, d: Path, *, max_steps: int = 12, devices: int = 1, accumulate: int = 1,
               micro_batch_size: int = 4, checkpoint_every: int = 4, val_every: int = 0, lora: int = 0,
               zero: int = 0, chat_eval: bool = False, wandb: bool = False, callbacks=()) -> Path:
    tok = shakespeare_tokenizer()
    write_config(path, run_dir, d / "sft_data", d / "tok.json", max_steps=max_steps, devices=devices,
                 accumulate=accumulate, checkpoint_every=checkpoint_every, val_every=val_every or max_steps,
                 model={"block_size": BLOCK}, vocab_size=tok.vocab_size, wandb=wandb, callbacks=list(callbacks),
                 model_args={"lr": 3e-3, "warmup_steps": 2, "weight_decay": 0.0, "lora_r": lora, "lora_alpha": 16.0})
    cfg = yaml.safe_load(path.read_text())
    cfg["init_from"] = str(d / "init")
    cfg["data"] = {"data_dir": str(d / "sft_data"), "tokenizer": str(d / "tok.json"), "block_size": BLOCK,
                   "micro_batch_size": micro_batch_size, "seed": 7, "val_examples": 24}
    if chat_eval:
        cfg["trainer"]["callbacks"].append({"class_path": "gpt.chat_eval.ChatEval", "init_args": {
            "data": str(d / "task" / "val.jsonl"), "examples": 40, "max_new_tokens": 8, "table_rows": 4}})
    if zero:
        cfg["trainer"]["strategy"] = {"class_path": "gpt.zero.ZeroStrategy",
                                      "init_args": {"config": str(ROOT / "recipes" / "deepspeed" / f"zero{zero}.json")}}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def sft_cmd(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "recipes.sft", "--config", str(config), *extra]


def run_sft(config: Path, *extra: str, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(sft_cmd(config, *extra), cwd=ROOT, env=recipe_env(), capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"sft failed (rc {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def ckpt_state(run_dir: Path, name: str = "last.ckpt") -> dict:
    return torch.load(run_dir / "checkpoints" / name, weights_only=True, map_location="cpu")


# ---- configs -----------------------------------------------------------------------------------
@pytest.mark.parametrize("config", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_sft_config_parses(config, capsys, monkeypatch):
    from recipes.sft import main
    monkeypatch.setattr(sys, "argv", ["recipes.sft"])
    with pytest.raises(SystemExit) as e:
        main(["--config", str(config), "--print_config"])
    assert e.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["init_from"]  # SFT starts from a pretrained checkpoint
    assert printed["data"]["packing"] is True and printed["model"]["lora_r"] == 0  # full fine-tuning by default
    assert any(c["class_path"] == "gpt.chat_eval.ChatEval" for c in printed["trainer"]["callbacks"])
    assert printed["val_every"] > 0 and printed["checkpoint_every"] > 0


def test_sft_configs_exist():
    assert {p.name for p in CONFIGS} >= {"sft-tiny-cpu.yaml", "sft-llama-1b.yaml"}


# ---- the HF export chats as gpt chat does --------------------------------------------------------
def hf_greedy_reply(hf_dir: Path, messages: list[dict], max_new_tokens: int) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)  # eos from generation_config.json
    new = out[0, ids["input_ids"].shape[1]:].tolist()
    stops = set(model.generation_config.eos_token_id)
    new = new[:next((i for i, t in enumerate(new) if t in stops), len(new))]
    return tok.decode(new)


def test_hf_export_replies_like_gpt_chat_on_a_model_that_ends_its_turn(tmp_path):
    from tests.test_evaluate import chain_model
    tok = shakespeare_tokenizer()
    t = ChatTemplate(tok)
    model = chain_model(tok, [t.role_ids["assistant"], *tok.encode(" ship rain"), t.end_id])
    save_model(model, tmp_path / "native", tokenizer=tok)
    p = subprocess.run([sys.executable, "-m", "gpt", "export", "--checkpoint", str(tmp_path / "native"), "--out",
                        str(tmp_path / "hf"), "--format", "hf"], cwd=ROOT, env=recipe_env(), capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort: rain ship"}]
    ours = generate_replies(model, tok, [msgs], max_new_tokens=10)[0]
    assert ours.text == " ship rain" and ours.stop == "end"
    assert hf_greedy_reply(tmp_path / "hf", msgs, 10) == ours.text


# ---- training runs -------------------------------------------------------------------------------
@slow
def test_sft_learns_the_demo_task_and_reports_exact_match(tmp_path, data):
    run = tmp_path / "run"
    cfg = sft_config(tmp_path / "cfg.yaml", run, data, max_steps=40, val_every=20, chat_eval=True, wandb=True,
                     micro_batch_size=8)
    p = run_sft(cfg)
    assert "exact-match on val.jsonl" in p.stdout  # named by its file (in the demo: dev.jsonl)
    losses = losses_by_step(run)
    assert sorted(losses) == list(range(40)) and losses[39] < 0.7 * losses[0]
    val = metric_by_step(run, "val/loss")
    assert sorted(val) == [20, 40] and val[40] < val[20]
    em = metric_by_step(run, "val/exact_match")
    assert sorted(em) == [0, 20, 40]  # the starting model, then each validation
    keys = set().union(*read_csv_metrics(run))
    assert {"val/ended", "val/truncated", "val/exact_match/compare", "val/exact_match/recall"} <= keys
    # The recorded exact-match is what gpt.evaluate measures on the same rows from the checkpoint.
    from gpt.chat_eval import load_eval_rows
    from gpt.evaluate import exact_match
    model, tok = load_model(run / "checkpoints" / "last.ckpt")
    r = exact_match(model, tok, load_eval_rows(str(data / "task" / "val.jsonl"), 40), max_new_tokens=8)
    assert abs(r["exact_match"] - em[40]) < 1e-9
    assert abs(r["ended"] - metric_by_step(run, "val/ended")[40]) < 1e-9
    assert r["ended"] > 0.9  # trained on <|end|>: replies end their turn
    from tests.pretrain_fixtures import read_wandb_history
    rows = read_wandb_history(next((run / "wandb").glob("offline-run-*/run-*.wandb")))
    assert [r["chat_replies/_type"] for r in rows if "chat_replies/_type" in r] == ["table-file"] * 3
    # The fine-tuned model chats in transformers exactly as in our generator.
    subprocess.run([sys.executable, "-m", "gpt", "export", "--checkpoint", str(run / "checkpoints" / "last.ckpt"),
                    "--out", str(tmp_path / "hf")], cwd=ROOT, env=recipe_env(), check=True, capture_output=True)
    rows_ = load_eval_rows(str(data / "task" / "val.jsonl"), 6)
    ours = generate_replies(model, tok, [prompt_messages(r) for r in rows_], max_new_tokens=8)
    for row, rep in zip(rows_, ours):
        assert hf_greedy_reply(tmp_path / "hf", prompt_messages(row), 8) == rep.text


@slow
def test_sft_resumes_exactly_after_sigkill(tmp_path, data):
    steps = 16
    ref = tmp_path / "ref"
    run_sft(sft_config(tmp_path / "ref.yaml", ref, data, max_steps=steps))
    want = losses_by_step(ref)
    assert sorted(want) == list(range(steps))

    run = tmp_path / "killed"
    cfg = sft_config(tmp_path / "killed.yaml", run, data, max_steps=steps,
                     callbacks=[{"class_path": "tests.pretrain_fixtures.SlowDown", "init_args": {"seconds": 0.15}}])
    proc = subprocess.Popen(sft_cmd(cfg), cwd=ROOT, env=recipe_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (run / "checkpoints" / "last.ckpt").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = ckpt_state(run)["global_step"]
    assert 0 < killed_at < steps, killed_at
    p = run_sft(cfg, "--ckpt_path", "last")
    assert f"resuming {run / 'checkpoints' / 'last.ckpt'} at step {killed_at}" in p.stdout
    got = losses_by_step(run)
    for s in range(killed_at, steps):
        assert abs(got[s] - want[s]) <= 1e-6, (s, got[s], want[s])
    a, b = ckpt_state(run)["state_dict"], ckpt_state(ref)["state_dict"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)


def _init_state(data: Path) -> dict[str, torch.Tensor]:
    model, _ = load_model(data / "init")
    return model.state_dict()


def _base_key(k: str) -> str:
    return k.replace(".base_layer.", ".")


@slow
def test_lora_sft_trains_only_the_adapters(tmp_path, data):
    run = tmp_path / "lora"
    p = run_sft(sft_config(tmp_path / "lora.yaml", run, data, max_steps=12, lora=4))
    assert "LoRA r=4 alpha=16 on attn.qkv, attn.proj, mlp.fc, mlp.proj" in p.stdout + p.stderr
    state = {k.removeprefix("model."): v for k, v in ckpt_state(run)["state_dict"].items()}
    init = _init_state(data)
    adapters = [k for k in state if ".lora_" in k]
    assert adapters and {_base_key(k) for k in state if ".lora_" not in k} == set(init)
    for k, v in state.items():
        if ".lora_" not in k:
            assert torch.equal(v, init[_base_key(k)]), k  # base weights bitwise equal to --init_from's
    assert any(k.endswith("lora_B.default.weight") and v.abs().max() > 0 for k, v in state.items())
    losses = losses_by_step(run)
    assert losses[11] < losses[0]
    assert ckpt_state(run)["gpt"]["lora"]["r"] == 4
    merged, _ = load_model(run / "checkpoints" / "last.ckpt")
    assert any(not torch.equal(merged.state_dict()[k], init[k]) for k in init)  # the merge moved the weights


@slow
def test_lora_under_zero2_checkpoints_resumes_and_merges(tmp_path, data):
    """2 processes, DeepSpeed ZeRO-2 on CPU: a resume from the step-4 checkpoint continues with the
    same losses, the base weights stay bitwise the init's, and the ZeRO directory loads merged."""
    full = tmp_path / "full"
    cfg = sft_config(tmp_path / "full.yaml", full, data, max_steps=8, devices=2, micro_batch_size=2, lora=4, zero=2)
    run_sft(cfg)
    want = losses_by_step(full)
    assert sorted(want) == list(range(8))
    resumed = tmp_path / "resumed"
    cfg2 = sft_config(tmp_path / "resumed.yaml", resumed, data, max_steps=8, devices=2, micro_batch_size=2, lora=4,
                      zero=2)
    run_sft(cfg2, "--ckpt_path", str(full / "checkpoints" / "step=4.ckpt"))
    got = losses_by_step(resumed)
    assert sorted(got) == [4, 5, 6, 7]
    for s in got:
        assert abs(got[s] - want[s]) <= 1e-5, (s, got[s], want[s])
    merged, _ = load_model(resumed / "checkpoints" / "last.ckpt")  # a DeepSpeed directory
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    raw = get_fp32_state_dict_from_zero_checkpoint(str(resumed / "checkpoints" / "last.ckpt"))
    init = _init_state(data)
    raw = {k.split("model.", 1)[1]: v for k, v in raw.items()}
    for k, v in raw.items():
        if ".lora_" not in k:
            assert torch.equal(v, init[_base_key(k)]), k
    ref, _ = load_model(full / "checkpoints" / "last.ckpt")
    for k, v in merged.state_dict().items():
        assert torch.allclose(v, ref.state_dict()[k], atol=1e-5), k
