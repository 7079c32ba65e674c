"""Fixtures for the RL tests: a tiny "SFT" checkpoint, demo-task prompt files, a dense reward, a trainer.

    from tests.rl_fixtures import write_rl_inputs, rl_module, rl_trainer, vowel_share
    inputs = write_rl_inputs(tmp_path)                     # {"sft", "tokenizer", "train", "val"}
    module = rl_module(inputs, algorithm="grpo", lr=3e-3)  # init_from = the tiny checkpoint
    trainer = rl_trainer(tmp_path / "run", max_steps=6); trainer.fit(module, prompt_data(inputs))
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from gpt.checkpoint import save_model
from gpt.config import GPTConfig
from gpt.demo_task import make_rows
from gpt.model import GPT
from tests.chat_fixtures import shakespeare_tokenizer

TINY = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 128, "vocab_size": 1024}


def vowel_share(row: dict, reply: str) -> float:
    """A dense verifiable reward a random tiny model can climb: the share of vowels among the letters."""
    letters = [c for c in reply.lower() if c.isalpha()]
    return sum(c in "aeiou" for c in letters) / len(letters) if letters else 0.0


def write_rl_inputs(out: Path, n_train: int = 64, n_val: int = 8, seed: int = 0) -> dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    tok = shakespeare_tokenizer()
    (out / "tokenizer.json").write_text(tok.to_str())
    torch.manual_seed(seed)
    save_model(GPT(GPTConfig.from_preset("tiny", **TINY)), out / "sft", tokenizer=tok)
    # RL's prompts are the task's "post" split, as in the demo (not SFT's rows, which change with SFT's data).
    for name, split, n in (("train", "post", n_train), ("val", "val", n_val)):
        rows = make_rows(n, split, seed=0, families=["count", "compare", "copy", "first_last"])
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"sft": str(out / "sft"), "tokenizer": str(out / "tokenizer.json"), "train": str(out / "train.jsonl"),
            "val": str(out / "val.jsonl"), "rm": write_reward_model(out / "rm.ckpt")}


def write_reward_model(path: Path, seed: int = 1) -> str:
    """A reward model checkpoint as recipes/reward.py writes it (.ckpt), with random weights."""
    from gpt.reward import HEAD, head_meta, make_head

    torch.manual_seed(seed)
    config = GPTConfig.from_preset("tiny", **TINY)
    backbone, head = GPT(config), make_head(config)
    torch.nn.init.normal_(head.weight, 0.0, 0.5)  # scores that differ between responses
    state = {**{f"model.{k}": v for k, v in backbone.state_dict().items()},
             **{f"{HEAD}.{k}": v for k, v in head.state_dict().items()}}
    torch.save({"state_dict": state, "gpt": {"model_config": config.to_dict(), "tokenizer": shakespeare_tokenizer().to_str(),
                                             "heads": {HEAD: head_meta(head)}}}, path)
    return str(path)


def rl_module(inputs: dict[str, str], **kw: Any):
    from gpt.rl import RLModule

    args = dict(preset="tiny", model_config=TINY, tokenizer=inputs["tokenizer"], reward_fn="tests.rl_fixtures:vowel_share",
                group_size=4, max_new_tokens=8, lr=3e-3, kl_coef=0.05, seed=0, table_rows=0)
    module = RLModule(**{**args, **kw})
    module.init_from = inputs["sft"]
    return module


def prompt_data(inputs: dict[str, str], **kw: Any):
    from gpt.prompt_data import PromptDataModule

    args = dict(tokenizer=inputs["tokenizer"], val_data=inputs["val"], micro_batch_size=4, seed=3, max_prompt_tokens=96)
    return PromptDataModule(inputs["train"], **{**args, **kw})


def rl_trainer(run_dir: Path, max_steps: int, every: int = 0, val_every: int = 0, **kw: Any):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    callbacks = [ModelCheckpoint(dirpath=run_dir / "checkpoints", every_n_train_steps=every, save_top_k=-1,
                                 save_last=True)] if every else []
    args = dict(accelerator="cpu", devices=1, max_steps=max_steps, logger=CSVLogger(str(run_dir), name="csv"),
                callbacks=callbacks, enable_checkpointing=bool(every), use_distributed_sampler=False,
                num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                default_root_dir=str(run_dir), limit_val_batches=1.0 if val_every else 0,
                val_check_interval=val_every or None, check_val_every_n_epoch=None)
    return L.Trainer(**{**args, **kw})


def write_rl_config(path: Path, run_dir: Path, inputs: dict[str, str], *, max_steps: int = 6,
                    checkpoint_every: int = 2, val_every: int = 0, callbacks: list[dict] | None = None,
                    **model: Any) -> Path:
    """A tiny fp32 config for recipes/rl.py: GRPO from the tiny "SFT" checkpoint on the prompt files."""
    import yaml

    cfg = {
        "run_dir": str(run_dir), "group": "test", "wandb": False, "init_from": inputs["sft"],
        "checkpoint_every": checkpoint_every, "keep_checkpoints": -1, "val_every": val_every, "seed_everything": 1234,
        "trainer": {"accelerator": "cpu", "devices": 1, "num_nodes": 1, "precision": "32-true", "max_steps": max_steps,
                    "log_every_n_steps": 1, "enable_progress_bar": False,
                    "plugins": [{"class_path": "gpt.checkpoint_io.AtomicCheckpointIO"}],
                    "callbacks": [{"class_path": "gpt.callbacks.NonFiniteGuard"}, *(callbacks or [])]},
        "model": {"preset": "tiny", "model_config": TINY, "reward_fn": "tests.rl_fixtures:vowel_share",
                  "group_size": 4, "max_new_tokens": 8, "lr": 3e-3, "kl_coef": 0.05, "seed": 0, "table_rows": 0,
                  **model},
        "data": {"data": inputs["train"], "val_data": inputs["val"], "tokenizer": inputs["tokenizer"],
                 "micro_batch_size": 4, "seed": 3, "max_prompt_tokens": 96},
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
