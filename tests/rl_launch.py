"""One RL training run on 1 or 2 CPU processes, for the distribution tests (Lightning re-launches it per rank).

    python -m tests.rl_launch --inputs DIR --out RUN --strategy ddp|zero2|zero3 --devices 2 --steps 4 [--algorithm ppo]

Writes RUN/csv (metrics), RUN/rollouts_rank{r}.pt (each step's sampled token rows), RUN/final.pt
(the policy's logits on a probe batch after training, and the reference's and reward model's weights).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import warnings
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

ROOT = Path(__file__).resolve().parents[1]
ZERO_JSON = {s: str(ROOT / "recipes" / "deepspeed" / f"{s}.json") for s in ("zero2", "zero3")}


class SaveRollouts(Callback):
    """Each step's rollout tokens on this rank, and at the end the live policy's logits on a probe."""

    def __init__(self, out: Path):
        self.out, self.rows = out, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.rows.append(pl_module.last_experience.ro.input_ids.cpu())

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save(self.rows, self.out / f"rollouts_rank{trainer.global_rank}.pt")
        probe = (torch.arange(32).reshape(2, 16) * 7 + 3) % pl_module.config.vocab_size
        # The policy's whole weights (every rank: a ZeRO-3 gather needs all of them) in a plain GPT:
        # outside the engine's forward, ZeRO-3's hooks do not serve a forward of the live module.
        from gpt.model import GPT

        policy = GPT(pl_module.config)
        policy.load_state_dict(_full_state(pl_module.model))
        with torch.no_grad():
            logits = policy.eval()(probe).float()
        frozen = {}
        for name in ("reference", "reward"):
            m = pl_module._frozen.get(name)
            if m is not None:
                frozen[name] = _full_state(m)
        if trainer.is_global_zero:
            torch.save({"logits": logits, "frozen": frozen}, self.out / "final.pt")


def _gathered(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """Whole ZeRO-3 parameters inside the block (outside the engine's forward no hook gathers them)."""
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(model.parameters()))
    return contextlib.nullcontext()


def _full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    with _gathered(model):
        return {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--strategy", default="ddp")
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--algorithm", default="grpo")
    ap.add_argument("--micro", type=int, default=3)
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "gpt-pipeline" / "torch_extensions"))
    from tests.rl_fixtures import prompt_data, rl_module, rl_trainer

    inputs = {k: str(Path(a.inputs) / v) for k, v in
              {"sft": "sft", "tokenizer": "tokenizer.json", "train": "train.jsonl", "val": "val.jsonl"}.items()}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    kw = {}
    if a.algorithm == "ppo":
        kw = dict(algorithm="ppo", reward_model=str(Path(a.inputs) / "rm.ckpt"), rm_weight=1.0, ppo_epochs=2,
                  num_minibatches=2, micro_batch_size=4, group_size=2)
    module = rl_module(inputs, micro_batch_size=kw.pop("micro_batch_size", a.micro or None), **kw)
    if a.strategy == "ddp":
        strategy = "ddp" if a.devices > 1 else "auto"
    else:
        from gpt.zero import ZeroStrategy

        import json

        config = json.loads(Path(ZERO_JSON[a.strategy]).read_text())
        # Partition every parameter: the default threshold keeps a tiny model's small ones whole.
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        strategy = ZeroStrategy(config=config)
    trainer = rl_trainer(out, max_steps=a.steps * module.steps_per_rollout, devices=a.devices, strategy=strategy,
                         callbacks=[SaveRollouts(out)])
    trainer.fit(module, prompt_data(inputs, micro_batch_size=2))


if __name__ == "__main__":
    main()
