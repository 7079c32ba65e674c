"""Pretraining data: fixed-length windows of the token shards in a seeded, resumable order.

    from gpt.data import PretrainDataModule
    dm = PretrainDataModule("runs/demo/shards", tokenizer="runs/demo/tokenizer.json",
                            block_size=256, micro_batch_size=16, seed=1337)
    trainer = L.Trainer(max_steps=300, use_distributed_sampler=False, ...); trainer.fit(module, dm)

Sample order is a pure function of (seed, global sample index i): the train split is cut into
N non-overlapping windows of block_size + 1 tokens (consecutive windows share one token), and

    sample i = window feistel_permute(i % N, N, key(seed, epoch = i // N))

a keyed bijection of [0, N) computed in O(1) memory (a Feistel network with cycle-walking), so a
web-scale N needs no permutation array and every epoch gets a fresh order. With micro-batch m,
accumulation A and W ranks, the global batch G = m*A*W is what stays fixed: micro-step k of
optimizer step s on rank r reads samples s*G + k*W*m + r*m ... + m. Resume starts at step
`trainer.global_step` (restored from the checkpoint), so the run continues exactly, also on
a different world size with the same G (e.g. 2 ranks x A=1 -> 1 rank x A=2).

Validation is a fixed set: the first `val_windows` windows of the val split, dealt to ranks
round-robin; each val batch carries the UTF-8 byte count of its targets for bits-per-byte.

For the run shape (recipes/cli.py): `check_run(trainer)` fails in one line before anything is
written when the shards cannot serve the run (missing, wrong tokenizer, too few tokens), and
`run_identity()` is what a resume must share (shard and tokenizer hashes, seed, window length).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from gpt.run import shards_sha256
from gpt.shards import TokenShards, read_manifest
from gpt.tokenizer import Tokenizer

_M64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64's finalizer: a cheap, well-mixed 64-bit hash."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _M64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _M64
    return x ^ (x >> 31)


def permutation_key(seed: int, epoch: int) -> int:
    return _mix64((seed & _M64) * 0x9E3779B97F4A7C15 + epoch + 1 & _M64)


def feistel_permute(i: int, n: int, key: int, rounds: int = 6) -> int:
    """The image of i under a keyed bijection of [0, n).

    A balanced Feistel network permutes [0, 4^h) for the smallest 4^h >= n; values that land
    outside [0, n) are encrypted again (cycle-walking), which stays a bijection of [0, n) and
    takes < 4 rounds of walking on average.
    """
    if not 0 <= i < n:
        raise IndexError(f"{i} outside [0, {n})")
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = (1 << half) - 1
    x = i
    while True:
        left, right = x >> half, x & mask
        for r in range(rounds):
            left, right = right, left ^ (_mix64(key ^ (r << 56) ^ right) & mask)
        x = (left << half) | right
        if x < n:
            return x


class PretrainWindows(Dataset):
    """Sample i (global index) -> {"input_ids", "labels"}: one window of block_size + 1 tokens."""

    def __init__(self, shards: TokenShards, block_size: int, seed: int, allow_repeat: bool = False):
        self.shards, self.block_size, self.seed, self.allow_repeat = shards, block_size, seed, allow_repeat
        self.num_windows = (shards.num_tokens - 1) // block_size
        if self.num_windows < 1:
            raise ValueError(f"{shards.data_dir}: split {shards.split!r} has {shards.num_tokens} tokens, "
                             f"fewer than one window of {block_size + 1}")

    def window_of(self, i: int) -> int:
        epoch, j = divmod(i, self.num_windows)
        if epoch and not self.allow_repeat:
            raise IndexError(f"sample {i} is past the {self.num_windows} train windows (allow_repeat is off)")
        return feistel_permute(j, self.num_windows, permutation_key(self.seed, epoch))

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        w = self.window_of(i)
        t = torch.from_numpy(self.shards.window(w * self.block_size, self.block_size + 1))
        return {"input_ids": t[:-1], "labels": t[1:]}


class StepBatchSampler(Sampler[list[int]]):
    """This rank's micro-batches of global sample indices, from the resume step to total_steps.

    `start_step` is read when iteration begins (not at construction), so a dataloader built
    before the checkpoint was restored, or re-iterated in a later epoch, still starts at the
    right step. `len()` counts from step 0, the count Lightning's in-epoch batch counter
    continues from on resume.
    """

    def __init__(self, micro_batch_size: int, accumulate: int, rank: int, world_size: int,
                 total_steps: int, start_step: Callable[[], int] = lambda: 0):
        self.m, self.A, self.r, self.W = micro_batch_size, accumulate, rank, world_size
        self.total_steps, self.start_step = total_steps, start_step

    @property
    def global_batch_size(self) -> int:
        return self.m * self.A * self.W

    def indices(self, step: int, micro_step: int) -> list[int]:
        first = step * self.global_batch_size + micro_step * self.W * self.m + self.r * self.m
        return list(range(first, first + self.m))

    def __iter__(self) -> Iterator[list[int]]:
        for s in range(self.start_step(), self.total_steps):
            for k in range(self.A):
                yield self.indices(s, k)

    def __len__(self) -> int:
        return self.total_steps * self.A


class ValWindows(Dataset):
    """Fixed validation windows (indices into the val split) with their targets' byte counts."""

    def __init__(self, shards: TokenShards, block_size: int, windows: list[int],
                 bytes_per_token: Optional[np.ndarray]):
        self.shards, self.block_size, self.windows, self.bytes_per_token = shards, block_size, windows, bytes_per_token

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, j: int) -> dict[str, torch.Tensor]:
        t = self.shards.window(self.windows[j] * self.block_size, self.block_size + 1)
        nbytes = int(self.bytes_per_token[t[1:]].sum()) if self.bytes_per_token is not None else 0
        t = torch.from_numpy(t)
        return {"input_ids": t[:-1], "labels": t[1:], "num_bytes": torch.tensor(nbytes)}


def bytes_per_token(tokenizer: Tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for: byte-level BPE maps every byte to one symbol,
    so a token's byte count is its symbol count; special tokens are not text (0 bytes)."""
    table = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    special = set(tokenizer.special_ids.values())
    for i in range(tokenizer.vocab_size):
        piece = tokenizer.backend.id_to_token(i)
        if i not in special and piece is not None:
            table[i] = len(piece)
    return table


class PretrainDataModule(L.LightningDataModule):
    """Train/val dataloaders over a shard directory (gpt/shards.py) for causal-LM pretraining.

    Args:
        data_dir: shard directory with manifest.json (data_prep.make_shards --out).
        tokenizer: tokenizer.json the shards were written with: checked against the manifest,
            used for val bits-per-byte and stored in checkpoints. None skips both.
        block_size: tokens per training sequence (<= the model's block_size); fixed for a run.
        micro_batch_size: sequences per rank per forward/backward; micro_batch_size x
            accumulate_grad_batches x devices x num_nodes is the global batch, fixed for a run.
        seed: seed of the sample order (independent of the model-init seed); fixed for a run.
        val_windows: number of validation windows (fixed set; capped at what the val split holds).
        val_batch_size: sequences per validation batch (default: micro_batch_size).
        allow_repeat: let a run ask for more tokens than the train split holds (later epochs use
            fresh permutations); off, such a config fails before training.
        num_workers: DataLoader worker processes per rank.
    """

    def __init__(self, data_dir: str, tokenizer: Optional[str] = None, block_size: int = 256,
                 micro_batch_size: int = 16, seed: int = 1337, val_windows: int = 64,
                 val_batch_size: Optional[int] = None, allow_repeat: bool = False, num_workers: int = 0):
        super().__init__()
        self.save_hyperparameters(logger=False)  # the recipe logs the whole resolved config
        self.data_dir, self.tokenizer_path, self.block_size = data_dir, tokenizer, block_size
        self.micro_batch_size, self.seed, self.allow_repeat = micro_batch_size, seed, allow_repeat
        self.val_windows, self.num_workers = val_windows, num_workers
        self.val_batch_size = val_batch_size or micro_batch_size
        self.tokenizer: Optional[Tokenizer] = None
        self.train: Optional[PretrainWindows] = None
        self.val: Optional[ValWindows] = None
        self._restored_global_batch: Optional[int] = None

    # ---- set-up -------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        self._open()
        if stage == "fit":
            self.check_token_budget()

    def _open(self) -> None:
        if self.tokenizer is None and self.tokenizer_path:
            self.tokenizer = Tokenizer.from_file(self.tokenizer_path)
        tok = self.tokenizer
        if self.train is None:
            self.train = PretrainWindows(TokenShards(self.data_dir, "train", tokenizer=tok), self.block_size,
                                         self.seed, self.allow_repeat)
            val_shards = TokenShards(self.data_dir, "val", tokenizer=tok)
            n_val = min(self.val_windows, max(0, (val_shards.num_tokens - 1) // self.block_size))
            self.val = ValWindows(val_shards, self.block_size, list(range(n_val)),
                                  bytes_per_token(tok) if tok is not None else None)

    def check_run(self, trainer: L.Trainer) -> None:
        """Before anything is written: the shards exist, match the tokenizer and hold the run's tokens."""
        self.trainer = trainer
        self._open()
        self.check_token_budget()

    def run_identity(self) -> dict[str, Any]:
        """What a resume must share with its checkpoint (gpt.run)."""
        self._open()
        return {"tokenizer_sha256": self.tokenizer.content_hash if self.tokenizer else None,
                "shards_sha256": shards_sha256(read_manifest(self.data_dir)),
                "data.seed": self.seed, "data.block_size": self.block_size}

    @property
    def global_batch_size(self) -> int:
        t = self.trainer
        return self.micro_batch_size * t.accumulate_grad_batches * t.world_size

    def check_token_budget(self) -> None:
        """Fail before training, in one line, when the run wants more windows than exist."""
        steps = self.trainer.max_steps
        if steps is None or steps < 1:
            raise ValueError("pretraining needs trainer.max_steps >= 1 (it fixes the sample order and lr schedule)")
        want = steps * self.global_batch_size * self.block_size
        have = self.train.num_windows * self.block_size
        if want > have and not self.allow_repeat:
            raise ValueError(
                f"the run needs {want:,} train tokens (max_steps {steps} x global batch {self.global_batch_size} x "
                f"block_size {self.block_size}) but {self.data_dir} holds {have:,} in windows "
                f"({self.train.shards.num_tokens:,} tokens); lower max_steps or set data.allow_repeat=true")

    # ---- loaders ------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        t = self.trainer
        if self._restored_global_batch not in (None, self.global_batch_size):
            raise ValueError(
                f"the checkpoint was trained with global batch {self._restored_global_batch}, this run has "
                f"{self.global_batch_size} (micro_batch_size x accumulate_grad_batches x world size); keep it "
                f"equal to resume the same sample sequence")
        sampler = StepBatchSampler(self.micro_batch_size, t.accumulate_grad_batches, t.global_rank, t.world_size,
                                   total_steps=t.max_steps, start_step=lambda: t.global_step)
        return DataLoader(self.train, batch_sampler=sampler, num_workers=self.num_workers,
                          pin_memory=t.strategy.root_device.type == "cuda", persistent_workers=False)

    def val_dataloader(self) -> DataLoader:
        t = self.trainer
        mine = list(range(t.global_rank, len(self.val), t.world_size))
        return DataLoader(torch.utils.data.Subset(self.val, mine), batch_size=self.val_batch_size,
                          shuffle=False, num_workers=self.num_workers)

    # ---- checkpoint state: what resume must agree with ----------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"global_batch_size": self.global_batch_size, "seed": self.seed, "block_size": self.block_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._restored_global_batch = state.get("global_batch_size")
        if state.get("seed", self.seed) != self.seed or state.get("block_size", self.block_size) != self.block_size:
            raise ValueError(f"the checkpoint's data seed/block_size ({state.get('seed')}, {state.get('block_size')}) "
                             f"differ from this run's ({self.seed}, {self.block_size}); resume would change the data")


def check_restored(state: dict[str, Any], identity: dict[str, Any], what: str, changes: str) -> None:
    """Refuse a resume whose checkpointed settings (state) differ from this run's (identity), naming each."""
    changed = {k: (state[k], v) for k, v in identity.items() if k in state and state[k] != v}
    if changed:
        said = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise ValueError(f"the checkpoint's {what} settings differ from this run's ({said}); resume would "
                         f"change {changes}")
