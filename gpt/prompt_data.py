"""RL prompts: rows of a dataset rendered with the chat template, in a seeded, resumable order.

    from gpt.prompt_data import PromptDataModule
    dm = PromptDataModule("runs/demo/task/train.jsonl", val_data="runs/demo/task/val.jsonl",
                          tokenizer="runs/demo/tokenizer.json", micro_batch_size=16, seed=1337)
    batch = {"prompt_ids": [[...], ...], "rows": [{...}, ...]}    # one rollout's prompts on this rank

Rows come through `datasets` (a local .jsonl/.json/.parquet file, or a Hub dataset name), in
TRL's prompt formats:
- `messages`: a conversation; a final assistant turn is the reference answer (dropped from the
  prompt; the row's "answer" defaults to it), otherwise the conversation must end with a user turn;
- `prompt`: a string (one user turn) or a message list ending with a user turn; an optional
  `completion` string is the reference answer.
Every column rides along in `rows`, so a verifiable reward function (`gpt.demo_task.reward(row,
reply)`) reads what it needs ("answer", "family", ...). A row that is neither is one error naming
the file and row; a prompt longer than `max_prompt_tokens` is skipped and counted.

Order. Sample i of the run (a global index) is prompt feistel_permute(i % N, N, key(seed, i // N)),
the permutation gpt.data uses for pretraining windows, and gpt.data.StepBatchSampler deals rollout
s's global batch to ranks: rank r reads samples s*G + r*m ... + m (G = m x world size). A rollout
is a training step of gpt.rl, which may take several optimizer steps (PPO epochs x minibatches =
`steps_per_rollout`), so the sampler starts at trainer.global_step // steps_per_rollout: a resumed
run reads the prompts the interrupted one would have.

Validation: the first `val_examples` rows of `val_data`, dealt to ranks round-robin; gpt.rl
answers them greedily and scores them with the reward function.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Optional

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from gpt.chat import ChatFormatError, ChatTemplate, validate_messages
from gpt.data import StepBatchSampler, check_restored, feistel_permute, permutation_key
from gpt.tokenizer import Tokenizer

_LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def prompt_of(row: dict[str, Any]) -> tuple[list[dict], Optional[str]]:
    """(prompt messages ending with a user turn, reference answer or None) of a row; ChatFormatError."""
    answer = None
    if row.get("messages") is not None:
        msgs = row["messages"]
        validate_messages(msgs)
        if msgs[-1]["role"] == "assistant":
            msgs, answer = msgs[:-1], msgs[-1]["content"]
    elif row.get("prompt") is not None:
        p = row["prompt"]
        msgs = [{"role": "user", "content": p}] if isinstance(p, str) else p
        validate_messages(msgs)
        answer = row.get("completion") if isinstance(row.get("completion"), str) else None
    else:
        raise ChatFormatError("neither a 'messages' nor a 'prompt' column")
    if msgs[-1]["role"] != "user":
        raise ChatFormatError(f"message {len(msgs) - 1}: a prompt must end with a user turn, not {msgs[-1]['role']!r}")
    return list(msgs), answer


def load_rows(source: str, split: str = "train", limit: Optional[int] = None) -> list[dict[str, Any]]:
    """Rows of a local file (by extension) or a Hub dataset name, through datasets."""
    from datasets import load_dataset

    path = Path(source)
    if path.suffix in _LOADERS:
        if not path.is_file():
            raise FileNotFoundError(f"{source}: no such file (prompts: a .jsonl/.json/.parquet file or a dataset name)")
        ds = load_dataset(_LOADERS[path.suffix], data_files=str(path), split="train")
    else:
        ds = load_dataset(source, split=split)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return ds.to_list()


class Prompts(Dataset):
    """Rendered prompts; item i = the prompt at position i (training: a global sample index, permuted)."""

    def __init__(self, source: str, template: ChatTemplate, max_prompt_tokens: int, split: str = "train",
                 limit: Optional[int] = None, seed: Optional[int] = None, allow_repeat: bool = True):
        self.source, self.seed, self.allow_repeat = source, seed, allow_repeat
        self.ids: list[list[int]] = []
        self.rows: list[dict[str, Any]] = []
        self.skipped_long = 0
        for i, row in enumerate(load_rows(source, split, limit), 1):
            try:
                msgs, answer = prompt_of(row)
            except ChatFormatError as e:
                raise ValueError(f"{source}: row {i}: {e}") from None
            ids = template.render_prompt(msgs)
            if len(ids) > max_prompt_tokens:
                self.skipped_long += 1
                continue
            self.ids.append(ids)
            self.rows.append({**row, "prompt_messages": msgs,
                              "answer": row["answer"] if row.get("answer") is not None else answer})
        if not self.ids:
            raise ValueError(f"{source}: no usable prompts ({self.skipped_long} longer than max_prompt_tokens "
                             f"{max_prompt_tokens})")

    def index_of(self, i: int) -> int:
        if self.seed is None:
            return i
        n = len(self.ids)
        epoch, j = divmod(i, n)
        if epoch and not self.allow_repeat:
            raise IndexError(f"sample {i} is past the {n} prompts (allow_repeat is off)")
        return feistel_permute(j, n, permutation_key(self.seed, epoch))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        k = self.index_of(i)
        return {"prompt_ids": self.ids[k], "row": self.rows[k]}


def collate_prompts(items: list[dict[str, Any]]) -> dict[str, list]:
    return {"prompt_ids": [it["prompt_ids"] for it in items], "rows": [it["row"] for it in items]}


def file_sha256(source: str) -> Optional[str]:
    p = Path(source)
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None


class PromptDataModule(L.LightningDataModule):
    """Prompt batches for gpt.rl.RLModule; see the module docstring.

    Args:
        data: training prompts: a .jsonl/.json/.parquet file or a Hub dataset name (split `split`).
        tokenizer: tokenizer.json; prompts are rendered with its chat tokens (gpt.chat).
        val_data: held-out prompts with reference answers (same formats); None: no validation.
        micro_batch_size: prompts per rank per rollout; each is sampled model.group_size times.
        seed: seed of the prompt order.
        max_prompt_tokens: longer prompts are skipped (counted); prompt + response must fit the
            model's block_size.
        split: the split of a Hub dataset.
        examples: use only the first N training rows (None: all).
        val_examples: the first N rows of val_data.
        val_batch_size: prompts per validation batch.
        allow_repeat: let a run read more prompts than the data holds (later epochs permute afresh).
    """

    def __init__(self, data: str, tokenizer: Optional[str] = None, val_data: Optional[str] = None,
                 micro_batch_size: int = 8, seed: int = 1337, max_prompt_tokens: int = 192, split: str = "train",
                 examples: Optional[int] = None, val_examples: int = 200, val_batch_size: int = 64,
                 allow_repeat: bool = True):
        super().__init__()
        self.save_hyperparameters(logger=False)
        if tokenizer is None:
            raise ValueError("data.tokenizer is required: prompts are rendered with its chat tokens")
        if micro_batch_size < 1:
            raise ValueError(f"data.micro_batch_size must be >= 1, got {micro_batch_size}")
        self.data, self.tokenizer_path, self.val_data = data, tokenizer, val_data
        self.micro_batch_size, self.seed, self.max_prompt_tokens = micro_batch_size, seed, max_prompt_tokens
        self.split, self.examples, self.val_examples = split, examples, val_examples
        self.val_batch_size, self.allow_repeat = val_batch_size, allow_repeat
        self.tokenizer: Optional[Tokenizer] = None
        self.train: Optional[Prompts] = None
        self.val: Optional[Prompts] = None
        self._restored: Optional[dict[str, Any]] = None
        self.steps_per_rollout: Optional[int] = None  # optimizer steps per rollout (gpt.rl)

    def _open(self) -> None:
        self.tokenizer = Tokenizer.from_file(self.tokenizer_path)
        template = ChatTemplate(self.tokenizer)
        self.train = Prompts(self.data, template, self.max_prompt_tokens, self.split, self.examples, self.seed,
                             self.allow_repeat)
        if self.val_data:
            self.val = Prompts(self.val_data, template, self.max_prompt_tokens, limit=self.val_examples)
        rank_zero_info(f"RL prompts: {len(self.train):,} from {self.data} ({self.train.skipped_long} skipped as longer "
                       f"than {self.max_prompt_tokens} tokens)"
                       + (f"; {len(self.val):,} held out from {self.val_data}" if self.val else ""))

    def setup(self, stage: str) -> None:
        if self.train is None:
            self._open()
        if stage == "fit":
            self.check_budget()

    # ---- the run ------------------------------------------------------------------------
    def _steps_per_rollout(self) -> int:
        # Told by gpt.rl.RLModule.check_run before fit; during fit the module is the trainer's.
        return int(self.steps_per_rollout or getattr(self.trainer.lightning_module, "steps_per_rollout", 1))

    def rollouts(self) -> int:
        """Rollouts (training batches) of the run: trainer.max_steps optimizer steps / steps_per_rollout."""
        steps, k = self.trainer.max_steps, self._steps_per_rollout()
        if steps is None or steps < 1:
            raise ValueError("RL needs trainer.max_steps >= 1 (it fixes the prompt order and lr schedule)")
        if steps % k:
            raise ValueError(f"trainer.max_steps {steps} is not a multiple of the optimizer steps per rollout, {k} "
                             f"(model.ppo_epochs x model.num_minibatches)")
        return steps // k

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.trainer.world_size

    def check_budget(self) -> None:
        want, n = self.rollouts() * self.global_batch_size, len(self.train)
        if want > n and not self.allow_repeat:
            raise ValueError(f"the run reads {want:,} prompts ({self.rollouts()} rollouts x {self.global_batch_size}) "
                             f"but {self.data} has {n:,}; lower max_steps or set data.allow_repeat=true")

    def check_run(self, trainer: L.Trainer) -> None:
        """The run-shape hook (recipes/cli.py): the data opens and serves the run, before anything is written."""
        self.trainer = trainer
        if self.train is None:
            self._open()
        self.check_budget()

    def identity(self) -> dict[str, Any]:
        return {"seed": self.seed, "max_prompt_tokens": self.max_prompt_tokens, "examples": self.examples}

    def run_identity(self) -> dict[str, Any]:
        """What a resume must share with its checkpoint: the prompts, the tokenizer, the order's settings."""
        if self.train is None:
            self._open()
        return {"tokenizer_sha256": self.tokenizer.content_hash, "prompts_sha256": file_sha256(self.data) or self.data,
                **{f"data.{k}": v for k, v in self.identity().items()}}

    # ---- loaders ------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        t = self.trainer
        if self._restored and self._restored.get("global_batch_size") not in (None, self.global_batch_size):
            raise ValueError(f"the checkpoint was trained with {self._restored['global_batch_size']} prompts per "
                             f"rollout, this run has {self.global_batch_size} (micro_batch_size x world size); keep it "
                             "equal to resume the same prompt sequence")
        k = self._steps_per_rollout()
        sampler = StepBatchSampler(self.micro_batch_size, 1, t.global_rank, t.world_size, total_steps=self.rollouts(),
                                   start_step=lambda: t.global_step // k)
        return DataLoader(self.train, batch_sampler=sampler, collate_fn=collate_prompts)

    def val_dataloader(self) -> DataLoader:
        if self.val is None:
            return []  # type: ignore[return-value]  # Lightning skips validation without batches
        t = self.trainer
        mine = list(range(t.global_rank, len(self.val), t.world_size))
        from torch.utils.data import Subset

        return DataLoader(Subset(self.val, mine), batch_size=self.val_batch_size, shuffle=False,
                          collate_fn=collate_prompts)

    # ---- checkpoint state ---------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"global_batch_size": self.global_batch_size, **self.identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._restored = state
        check_restored(state, self.identity(), "prompt", "the prompts")
