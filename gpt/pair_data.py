"""Preference-pair data: (prompt, chosen, rejected) from a pairs shard directory, for reward models and DPO.

    from gpt.pair_data import PairDataModule
    dm = PairDataModule("runs/demo/pairs", tokenizer="runs/demo/tokenizer.json", block_size=256,
                        micro_batch_size=8, seed=1337)
    logits = model(b["input_ids"], position_ids=b["position_ids"], attn_mask=b.get("attn_mask"))
    logp = token_logprobs(logits[b["row_index"]], b["labels"]).sum(-1)   # (2B,): DPO's sequence log-probs
    chosen, rejected = logp.chunk(2)                              # [0, B) chosen, [B, 2B) rejected
    reward = head(hidden[b["row_index"], b["last_index"]])        # a reward model reads here

Sample i of the run is pair feistel_permute(i % N, N, key(seed, epoch = i // N)) of the N
pairs, dealt to ranks and micro-steps by gpt.data.StepBatchSampler: a pure function of (seed, i),
so resume after kill -9 (and on another world size with the same global batch) is exact.

Batch of B pairs. Each pair is 2 sequences, chosen first: index s in [0, 2B) is pair s % B's
chosen (s < B) or rejected reply. They sit in R rows (the data prep keeps prompt + reply
within block_size tokens, so a reward model can read the reply's last token):
- share_prompt (the data module's default): R = B rows of prompt + chosen + rejected. The
  rejected reply's positions restart where the chosen one's did and its queries are masked
  off the chosen reply, so each logit and hidden state is the one a separate row would give,
  while the prompt (most of a pair's tokens) is computed once. A batch whose rows would pass
  block_size falls back to:
- two rows per pair: R = 2B rows, chosen rows first, each prompt + reply.
    input_ids       (R, T) int64    padded with <|pad|> on the right (default) or the left
    row_index       (2B,) int64     the row holding sequence s (arange(2B), or arange(B) twice)
    labels          (2B, T) int64   in row_index[s]'s columns: the token predicted at each column
                                    where it is s's reply, else -100 (token_logprobs reads the reply only)
    position_ids    (R, T) int64    0 at each sequence's first real token
    attn_mask       (R, 1, T, T) bool  shared rows and left padding: causal, padding masked out
    last_index      (2B,) int64     column of s's last reply token in its row (where a reward
                                    model reads its scalar), right under either padding
    response_tokens (2B,) int64     reply lengths (log them: reward hacking by length)
    pair_index      (B,) int64      pair ids in the split (key for cached reference log-probs)
    num_pairs_global    () int64    pairs in this optimizer step's global batch (= G)
    num_targets_global  () int64    reply tokens (labels != -100) in the global batch
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import Dataset

from gpt.data import feistel_permute, permutation_key
from gpt.objectives import IGNORE_INDEX
from gpt.sft_data import StepDataModule, StepTargets, open_examples, pad_id_of
from gpt.shards import ExampleShards, ShardError
from gpt.tokenizer import Tokenizer

Padding = Literal["right", "left"]


class PairRows(Dataset):
    """Global sample index -> one pair (or, with seed None, pair i: validation)."""

    def __init__(self, pairs: ExampleShards, seed: Optional[int], allow_repeat: bool = True,
                 count: Optional[int] = None):
        self.pairs, self.seed, self.allow_repeat = pairs, seed, allow_repeat
        self.n = len(pairs) if count is None else min(count, len(pairs))
        self.targets = pairs.supervised()[:self.n]  # reply tokens of chosen + rejected
        self.step_targets: Optional[StepTargets] = None
        self.global_batch_size: Optional[int] = None

    def pair_of(self, i: int) -> int:
        if self.seed is None:
            return i
        epoch, j = divmod(i, self.n)
        if epoch and not self.allow_repeat:
            raise IndexError(f"sample {i} is past the {self.n} pairs (allow_repeat is off)")
        return feistel_permute(j, self.n, permutation_key(self.seed, epoch))

    def targets_of_sample(self, i: int) -> int:
        return int(self.targets[self.pair_of(i)])

    def set_global_batch(self, global_batch_size: int) -> None:
        self.global_batch_size = global_batch_size
        self.step_targets = StepTargets(self.targets_of_sample, global_batch_size)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        p = self.pair_of(i)
        ids, _ = self.pairs.example(p)
        prompt_end, chosen_end = self.pairs.bounds(p)
        prompt = ids[:prompt_end]
        item = {"chosen": np.concatenate([prompt, ids[prompt_end:chosen_end]]),
                "rejected": np.concatenate([prompt, ids[chosen_end:]]), "prompt_len": prompt_end, "pair_index": p}
        if self.step_targets is not None:
            item["num_targets_global"] = self.step_targets(i)
            item["num_pairs_global"] = self.global_batch_size
        return item


class PairCollator:
    """B pairs -> padded rows, reply labels and last-token indices: 2B rows (chosen rows first), or
    with share_prompt B rows of prompt + chosen + rejected whose prompt is computed once (see the
    module docstring); a batch whose shared rows would pass max_len falls back to 2B rows."""

    def __init__(self, pad_id: int, padding_side: Padding = "right", share_prompt: bool = False,
                 max_len: Optional[int] = None):
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        self.pad_id, self.left = pad_id, padding_side == "left"
        self.share_prompt, self.max_len = share_prompt, max_len

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = 0  # of the shared rows: prompt + both replies
        if self.share_prompt:
            longest = max(len(it["chosen"]) + len(it["rejected"]) - it["prompt_len"] for it in items)
        if self.share_prompt and (self.max_len is None or longest <= self.max_len):
            out = self._shared(items, longest)
        else:
            out = self._separate(items)
        out["response_tokens"] = torch.tensor([len(it[k]) - it["prompt_len"] for k in ("chosen", "rejected")
                                               for it in items])  # (2B,): chosen replies first
        out["pair_index"] = torch.tensor([it["pair_index"] for it in items], dtype=torch.long)
        for key in ("num_targets_global", "num_pairs_global"):
            if key in items[0]:
                out[key] = torch.tensor(items[0][key], dtype=torch.long)
        return out

    def _separate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        seqs = [it["chosen"] for it in items] + [it["rejected"] for it in items]
        prompt = [it["prompt_len"] for it in items] * 2
        R, T = len(seqs), max(len(s) for s in seqs)
        ids, pos, real = self._blank(R, T)
        labels = torch.full((R, T), IGNORE_INDEX, dtype=torch.long)
        last = torch.empty(R, dtype=torch.long)
        for r, (s, p) in enumerate(zip(seqs, prompt)):
            n = len(s)
            a = T - n if self.left else 0  # first real column
            t = torch.from_numpy(s)
            ids[r, a:a + n], real[r, a:a + n] = t, True
            pos[r, a:a + n] = torch.arange(n)
            labels[r, a + p - 1:a + n - 1] = t[p:]  # the reply's tokens, each predicted one column earlier
            last[r] = a + n - 1
        out = {"input_ids": ids, "labels": labels, "position_ids": pos, "last_index": last,
               "row_index": torch.arange(R)}
        if self.left:
            out["attn_mask"] = _mask(real, torch.zeros(R, T, T, dtype=torch.bool))
        return out

    def _shared(self, items: list[dict[str, Any]], T: int) -> dict[str, torch.Tensor]:
        """Row b = prompt, chosen reply, rejected reply. The rejected reply's positions restart where
        the chosen one's did and its queries may not see the chosen reply's keys, so every logit and
        hidden state equals the separate rows' (tested); the label rows stay 2B, in this row's columns."""
        B = len(items)
        ids, pos, real = self._blank(B, T)
        labels = torch.full((2 * B, T), IGNORE_INDEX, dtype=torch.long)
        last = torch.empty(2 * B, dtype=torch.long)
        hidden_from = torch.zeros(B, T, T, dtype=torch.bool)  # True: this query may NOT see this key
        for b, it in enumerate(items):
            p = it["prompt_len"]
            c, r = torch.from_numpy(it["chosen"][p:]), torch.from_numpy(it["rejected"][p:])
            n = p + len(c) + len(r)
            a = T - n if self.left else 0
            row = torch.cat([torch.from_numpy(it["chosen"][:p]), c, r])
            ids[b, a:a + n], real[b, a:a + n] = row, True
            pos[b, a:a + p + len(c)] = torch.arange(p + len(c))
            pos[b, a + p + len(c):a + n] = torch.arange(p, p + len(r))
            cs, rs = a + p, a + p + len(c)  # first columns of the two replies
            labels[b, cs - 1:cs + len(c) - 1] = c
            labels[B + b, cs - 1] = r[0]  # the rejected reply's first token: predicted at the prompt's end too
            labels[B + b, rs:rs + len(r) - 1] = r[1:]
            last[b], last[B + b] = rs - 1, a + n - 1
            hidden_from[b, rs:a + n, cs:rs] = True
        return {"input_ids": ids, "labels": labels, "position_ids": pos, "last_index": last,
                "row_index": torch.arange(B).repeat(2), "attn_mask": _mask(real, hidden_from)}

    def _blank(self, R: int, T: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """input_ids (all <|pad|>), position_ids, and the real-token mask."""
        return (torch.full((R, T), self.pad_id, dtype=torch.long), torch.zeros((R, T), dtype=torch.long),
                torch.zeros((R, T), dtype=torch.bool))


def _mask(real: torch.Tensor, hidden_from: torch.Tensor) -> torch.Tensor:
    """(R, 1, T, T) bool: causal, real keys only, minus `hidden_from`; a padding query sees itself
    only, so no attention row is empty (SDPA would give NaN)."""
    T = real.size(1)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    eye = torch.eye(T, dtype=torch.bool)
    return ((causal & real.unsqueeze(1) & ~hidden_from) | eye).unsqueeze(1)


class PairDataModule(StepDataModule):
    """Train/val dataloaders over a pairs directory (data_prep.make_sft --kind pairs).

    Args:
        data_dir: pairs directory with manifest.json (SFT or pretraining directories are refused).
        tokenizer: tokenizer.json the data was written with (checked against the manifest).
        block_size: the model's context; every prompt + reply of the directory must fit.
        micro_batch_size: pairs per rank per forward/backward (2x rows).
        seed: seed of the sample order.
        padding_side: "right" (no attention mask needed) or "left".
        val_pairs: the first val_pairs pairs of the val split (fixed set).
        val_batch_size: pairs per validation batch (default: micro_batch_size).
        allow_repeat: let a run read more pairs than the train split holds (fresh permutation per epoch).
        num_workers: DataLoader worker processes per rank.
        share_prompt: one row per pair, prompt + chosen + rejected, the prompt computed once (same
            numbers as two rows, ~45% fewer tokens on the demo); False: a chosen row and a rejected row.
    """

    def __init__(self, data_dir: str, tokenizer: Optional[str] = None, block_size: int = 256,
                 micro_batch_size: int = 8, seed: int = 1337, padding_side: Padding = "right",
                 val_pairs: int = 256, val_batch_size: Optional[int] = None, allow_repeat: bool = True,
                 num_workers: int = 0, share_prompt: bool = True):
        super().__init__(micro_batch_size, seed, val_batch_size, allow_repeat, num_workers)
        self.save_hyperparameters(logger=False)
        self.data_dir, self.tokenizer_path, self.block_size = data_dir, tokenizer, block_size
        self.padding_side, self.val_pairs, self.share_prompt = padding_side, val_pairs, share_prompt
        manifest = Path(data_dir) / "manifest.json"
        sha = hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None
        self.hparams["manifest_sha256"] = sha

    def _open(self) -> None:
        tok = self.tokenizer = Tokenizer.from_file(self.tokenizer_path) if self.tokenizer_path else None
        train = open_examples(self.data_dir, "train", "pairs", tok)
        self.manifest = train.manifest
        val = open_examples(self.data_dir, "val", "pairs", tok)
        longest = max((_longest_sequence(ex) for ex in (train, val)), default=0)
        if longest > self.block_size:
            raise ValueError(f"{self.data_dir} holds prompt + reply sequences of up to {longest} tokens, more than "
                             f"data.block_size {self.block_size} (re-run the pairs prep with --block_size "
                             f"{self.block_size} or raise data.block_size)")
        if len(train) == 0:
            raise ShardError(f"{self.data_dir}: the train split holds no pairs")
        self.collate = PairCollator(pad_id_of(train.manifest), self.padding_side, self.share_prompt, self.block_size)
        self.train = PairRows(train, self.seed, self.allow_repeat)
        self.val = PairRows(val, seed=None, count=self.val_pairs)
        rank_zero_info(f"pairs: {len(self.train):,} train, {len(self.val):,} val")

    def identity(self) -> dict[str, Any]:
        return {"seed": self.seed, "block_size": self.block_size}


def _longest_sequence(ex: ExampleShards) -> int:
    """The longest prompt + reply of a pairs split."""
    if len(ex) == 0:
        return 0
    rows = ex.rows - ex.rows[:, :1]  # (0, prompt_end, chosen_end, end) per pair
    return int(np.maximum(rows[:, 2], rows[:, 3] - rows[:, 2] + rows[:, 1]).max())
