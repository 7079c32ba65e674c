"""Held-out exact-match through generation at every validation: the chat stages' quality metric.

    trainer.callbacks in a recipe YAML (recipes/configs/sft-tiny-cpu.yaml):
      - class_path: gpt.chat_eval.ChatEval
        init_args: {data: runs/demo/task/val.jsonl, examples: 200, max_new_tokens: 24}

At the start of a fresh run (the model it starts from) and after every validation, the model
answers each held-out conversation (gpt.evaluate.generate_replies: the chat template's prompt,
greedy, KV cache, stop at <|end|>) and each reply is scored by gpt.demo_task.check. Logged at
the optimizer step: `val/exact_match`, `val/exact_match/<family>`, `val/ended` (share of
replies that ended their turn) and `val/truncated` (ran to max_new_tokens); a W&B table
`chat_replies` (step, family, prompt, reply, answer, correct) of the first rows; one line on
stdout. SFT, DPO and RL use the same callback, so their numbers are comparable.

Data: JSONL, one conversation per line in TRL's `messages` format, ending with the assistant
turn that is the reference answer, as data_prep.make_demo_task writes: {"messages": [...],
"family": "add", "answer": "19"}. "answer" defaults to the last assistant turn's content and
"family" to "all". A bad line is one error naming file:line.

Ranks: under DDP and ZeRO-1/2 each rank answers its share of the rows and the counts are
summed; under ZeRO-3 every forward needs every rank, so each rank answers all rows (same
greedy replies everywhere) and nothing is summed.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger

from gpt.chat import ChatFormatError, ChatTemplate, validate_messages
from gpt.demo_task import check, prompt_messages
from gpt.evaluate import generate_replies
from gpt.tokenizer import Tokenizer


def load_eval_rows(path: str, examples: Optional[int] = None) -> list[dict]:
    """The first `examples` conversations of a JSONL file, each with "answer" and "family"."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file (held-out conversations, e.g. from data_prep.make_demo_task)")
    rows = []
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if examples is not None and len(rows) >= examples:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ChatFormatError(f"expected a JSON object, got {type(row).__name__}")
                validate_messages(row.get("messages"), require_final_assistant=True)
            except (json.JSONDecodeError, ChatFormatError) as e:
                raise ValueError(f"{p}:{lineno}: {e}") from None
            answer = row.get("answer", row["messages"][-1]["content"])
            rows.append({**row, "answer": str(answer), "family": str(row.get("family", "all"))})
    if not rows:
        raise ValueError(f"{p}: no conversations")
    return rows


class ChatEval(Callback):
    """Exact-match of greedy replies on held-out conversations, per family, at every validation.

    Args:
        data: JSONL of held-out conversations (see the module docstring).
        examples: use the first N conversations (None: all).
        max_new_tokens: reply length limit (a reply that reaches it counts as truncated).
        batch_size: prompts per generate call.
        table_rows: replies logged to the W&B table per validation (0: none).
        at_start: also evaluate before the first step of a fresh run (the starting model).
    """

    def __init__(self, data: str, examples: Optional[int] = 200, max_new_tokens: int = 32, batch_size: int = 64,
                 table_rows: int = 16, at_start: bool = True):
        if max_new_tokens < 1 or batch_size < 1:
            raise ValueError("ChatEval: max_new_tokens and batch_size must be >= 1")
        self.data, self.examples, self.max_new_tokens = data, examples, max_new_tokens
        self.batch_size, self.table_rows, self.at_start = batch_size, table_rows, at_start
        self.rows: list[dict] = []
        self.families: list[str] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.rows = load_eval_rows(self.data, self.examples)
        self.families = sorted({r["family"] for r in self.rows})
        tok = self._tokenizer(pl_module)
        template, block = ChatTemplate(tok), pl_module.config.block_size
        for i, r in enumerate(self.rows):
            n = len(template.render_prompt(prompt_messages(r)))
            if n + self.max_new_tokens > block:
                raise ValueError(f"{self.data}: conversation {i}: a prompt of {n} tokens + max_new_tokens "
                                 f"{self.max_new_tokens} is past the model's block_size {block}")

    @staticmethod
    def _tokenizer(pl_module: L.LightningModule) -> Tokenizer:
        tok_json = getattr(pl_module, "tokenizer_json", None)
        if tok_json is None:
            raise ValueError("ChatEval needs the tokenizer in the module (set data.tokenizer)")
        return Tokenizer.from_str(tok_json)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_start and trainer.global_step == 0:
            self.evaluate(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.evaluate(trainer, pl_module)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        everywhere = bool(getattr(trainer.strategy, "zero_stage_3", False))
        rank, world = trainer.global_rank, trainer.world_size
        mine = self.rows if everywhere or world == 1 else self.rows[rank::world]
        tok = self._tokenizer(pl_module)
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            replies = generate_replies(pl_module.model, tok, [prompt_messages(r) for r in mine],
                                       max_new_tokens=self.max_new_tokens, batch_size=self.batch_size)
        hits = [check(r, rep.text) for r, rep in zip(mine, replies)]
        # Per family (hits, rows), then the stop counts (end, limit): summed over ranks as one tensor.
        counts = torch.zeros(len(self.families) + 1, 2, dtype=torch.float64, device=pl_module.device)
        for r, hit in zip(mine, hits):
            counts[self.families.index(r["family"])] += torch.tensor([float(hit), 1.0], dtype=torch.float64)
        counts[-1, 0] = sum(rep.stop == "end" for rep in replies)
        counts[-1, 1] = sum(rep.stop == "limit" for rep in replies)
        if not everywhere and world > 1:
            counts = trainer.strategy.reduce(counts, reduce_op="sum")
        per_family, n = counts[:-1].tolist(), len(self.rows)
        metrics = {"val/exact_match": sum(h for h, _ in per_family) / n,
                   "val/ended": counts[-1, 0].item() / n, "val/truncated": counts[-1, 1].item() / n}
        metrics.update({f"val/exact_match/{f}": h / max(c, 1) for f, (h, c) in zip(self.families, per_family)})
        if trainer.is_global_zero:
            self._log(trainer, metrics, mine, replies, hits)
        return metrics

    def _log(self, trainer: L.Trainer, metrics: dict[str, float], rows: list[dict], replies: list[Any],
             hits: list[bool]) -> None:
        step = trainer.global_step
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            if isinstance(logger, WandbLogger) and self.table_rows > 0:
                data = [[step, r["family"], prompt_messages(r)[-1]["content"], rep.text, r["answer"], hit]
                        for r, rep, hit in list(zip(rows, replies, hits))[:self.table_rows]]
                logger.log_text(key="chat_replies", columns=["step", "family", "prompt", "reply", "answer", "correct"],
                                data=data, step=step)
        fams = ", ".join(f"{f} {100 * metrics[f'val/exact_match/{f}']:.0f}%" for f in self.families)
        # Named by its file: in the demo this is the dev split, not the held-out one read once per stage.
        print(f"[step {step}] exact-match on {Path(self.data).name} {100 * metrics['val/exact_match']:.1f}% of {len(self.rows)} "
              f"(ended its turn {100 * metrics['val/ended']:.0f}%): {fams}", flush=True)
