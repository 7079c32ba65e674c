"""SFT data: conversations from an SFT shard directory, packed or padded, in a seeded resumable order.

    from gpt.sft_data import SFTDataModule
    dm = SFTDataModule("runs/demo/sft", tokenizer="runs/demo/tokenizer.json", block_size=256,
                       micro_batch_size=8, seed=1337, packing=True)
    logits = model(b["input_ids"], position_ids=b["position_ids"], attn_mask=b.get("attn_mask"))
    loss_sum, n = causal_lm_loss(logits, b["labels"]); loss = loss_sum / b["num_targets_global"]

Rows. A training row holds up to block_size + 1 tokens: its inputs are the first block_size
and its labels the last. `packing=True` fills rows with several whole conversations, chosen by
a packing plan computed once from the example lengths: best-fit (each conversation goes to
the open row it fills most tightly) over a seeded order of the examples (gpt.data's Feistel
permutation). `packing=False` puts one conversation in each row. Sample i of the run is row
feistel_permute(i % R, R, key(seed, epoch = i // R)) of the R rows, exactly as pretraining
windows (gpt/data.py), and gpt.data.StepBatchSampler deals global indices to ranks and
micro-steps, so the order is a pure function of (seed, i): resume after kill -9 is exact, and
so is a change of world size that keeps the global batch.

Batch (B rows, T = the longest row of the micro-batch, <= block_size):
    input_ids     (B, T) int64   pad = the tokenizer's <|pad|>, never end-of-turn or end-of-text
    labels        (B, T) int64   next token where the loss mask is 1, else -100; never across
                                 two conversations, never on padding
    position_ids  (B, T) int64   restart at 0 for each conversation
    segment_ids   (B, T) int64   conversation number in its row, -1 on padding
    attn_mask     (B, 1, T, T) bool, packing only: causal within a conversation, nothing across
                                 (padded rows need none: right padding is invisible to causal
                                 attention, so the fast is_causal kernel runs)
    num_targets_global  () int64 labels != -100 in the whole global batch of this optimizer
                                 step, the same on every rank (gpt/lm.py divides by it)

Memory: the mask is B*T*T bytes (8 x 256^2 = 0.5 MiB; 8 x 4096^2 = 128 MiB) and an explicit
mask keeps scaled_dot_product_attention off its flash kernel. For long rows set
`attn_mask=False` and build it on the device from segment_ids (`block_causal_mask`), or use a
varlen/flex attention kernel keyed on segment_ids on GPUs.

Plan cost: the Feistel order takes ~11 us per example in Python (11 s per million examples,
once per process at set-up), the best-fit a few us.
"""
from __future__ import annotations

import bisect
import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from gpt.data import StepBatchSampler, check_restored, feistel_permute, permutation_key
from gpt.objectives import IGNORE_INDEX
from gpt.shards import ExampleShards, ShardError
from gpt.tokenizer import PAD, Tokenizer

PLAN_EPOCH = -1  # the packing order's key: permutation_key(seed, -1), never a sample epoch's


def seeded_order(n: int, seed: int) -> list[int]:
    """A seeded permutation of range(n) (the packing plan's order)."""
    key = permutation_key(seed, PLAN_EPOCH)
    return [feistel_permute(i, n, key) for i in range(n)]


def best_fit(lengths: Sequence[int], capacity: int, order: Sequence[int]) -> list[list[int]]:
    """Pack items into rows of `capacity` in the given order; each goes to the open row whose room
    it fills most tightly (a new row when none has room). Deterministic; O(n log capacity)."""
    rooms: list[int] = []  # sorted distinct rooms that open rows have
    rows_with: dict[int, list[int]] = {}  # room -> rows with exactly that room (a stack)
    rows: list[list[int]] = []
    for e in order:
        n = int(lengths[e])
        if n > capacity:
            raise ValueError(f"example {e} has {n} tokens, more than a row's {capacity}")
        k = bisect.bisect_left(rooms, n)
        if k < len(rooms):
            room = rooms[k]
            r = rows_with[room].pop()
            if not rows_with[room]:
                del rows_with[room], rooms[k]
        else:
            room, r = capacity, len(rows)
            rows.append([])
        rows[r].append(e)
        room -= n
        if room > 0:
            if room not in rows_with:
                bisect.insort(rooms, room)
                rows_with[room] = []
            rows_with[room].append(r)
    return rows


class PackingPlan:
    """Rows of example indices: packed (best-fit over a seeded order) or one example per row."""

    def __init__(self, lengths: np.ndarray, capacity: int, pack: bool, seed: Optional[int]):
        n = len(lengths)
        if pack:
            order = seeded_order(n, seed) if seed is not None else range(n)
            rows = best_fit(lengths, capacity, order)
        else:
            too_long = np.flatnonzero(lengths > capacity)
            if too_long.size:
                raise ValueError(f"example {too_long[0]} has {lengths[too_long[0]]} tokens, more than a row's {capacity}")
            rows = [[e] for e in range(n)]
        self.members = np.fromiter((e for r in rows for e in r), dtype=np.int64, count=n)
        self.offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows], dtype=np.int64)])
        self.row_tokens = np.add.reduceat(lengths[self.members], self.offsets[:-1]) if n else np.zeros(0, np.int64)
        self.capacity = capacity

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def row(self, r: int) -> np.ndarray:
        return self.members[self.offsets[r]:self.offsets[r + 1]]

    def sums(self, per_example: np.ndarray) -> np.ndarray:
        """A per-example quantity summed per row."""
        return np.add.reduceat(per_example[self.members], self.offsets[:-1]) if len(self) else per_example[:0]

    @property
    def fill(self) -> float:
        """Share of row capacity holding tokens."""
        return float(self.row_tokens.sum()) / max(1, len(self) * self.capacity)


def row_arrays(parts: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate a row's examples ((ids, mask) each) into inputs, labels, positions, segments."""
    ids = np.concatenate([p[0] for p in parts])
    mask = np.concatenate([p[1] for p in parts]).astype(bool)
    seg = np.concatenate([np.full(len(p[0]), k, dtype=np.int64) for k, p in enumerate(parts)])
    pos = np.concatenate([np.arange(len(p[0]), dtype=np.int64) for p in parts])
    same = seg[1:] == seg[:-1]  # the last token of a conversation never predicts the next one's first
    labels = np.where(mask[1:] & same, ids[1:], IGNORE_INDEX)
    return {"input_ids": ids[:-1], "labels": labels, "position_ids": pos[:-1], "segment_ids": seg[:-1]}


class StepTargets:
    """Targets in the global batch of step s, from the sample order alone (any rank, any worker)."""

    def __init__(self, targets_of_sample: Callable[[int], int], global_batch_size: int):
        self.of_sample, self.G = targets_of_sample, global_batch_size
        self._step, self._value = -1, 0

    def __call__(self, i: int) -> int:
        step = i // self.G
        if step != self._step:
            self._step, self._value = step, sum(self.of_sample(j) for j in range(step * self.G, (step + 1) * self.G))
        return self._value


class SFTRows(Dataset):
    """Global sample index -> one training row (or, with seed None, row i in plan order: validation)."""

    def __init__(self, examples: ExampleShards, block_size: int, pack: bool, seed: Optional[int],
                 allow_repeat: bool = True, count: Optional[int] = None):
        self.examples, self.block_size, self.seed, self.allow_repeat = examples, block_size, seed, allow_repeat
        n = len(examples) if count is None else min(count, len(examples))  # the first n examples
        self.plan = PackingPlan(examples.lengths[:n], block_size + 1, pack, seed)
        self.row_targets = self.plan.sums(examples.supervised(skip_first=True)[:n])
        self.step_targets: Optional[StepTargets] = None  # set by the DataModule for training

    def row_of(self, i: int) -> int:
        if self.seed is None:
            return i
        epoch, j = divmod(i, len(self.plan))
        if epoch and not self.allow_repeat:
            raise IndexError(f"sample {i} is past the {len(self.plan)} rows (allow_repeat is off)")
        return feistel_permute(j, len(self.plan), permutation_key(self.seed, epoch))

    def targets_of_sample(self, i: int) -> int:
        return int(self.row_targets[self.row_of(i)])

    def set_global_batch(self, global_batch_size: int) -> None:
        self.step_targets = StepTargets(self.targets_of_sample, global_batch_size)

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = row_arrays([self.examples.example(int(e)) for e in self.plan.row(self.row_of(i))])
        if self.step_targets is not None:
            item["num_targets_global"] = self.step_targets(i)
        return item


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) segment ids -> (B, 1, T, T) bool: query t may see key s <= t of its own segment.

    Padding (segment -1) sees earlier padding, so no query row is empty (SDPA would give NaN).
    """
    T = segment_ids.size(-1)
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    return (segment_ids.unsqueeze(-1) == segment_ids.unsqueeze(-2)).unsqueeze(1) & causal


class SFTCollator:
    """Right-pads rows to the longest of the micro-batch; attn_mask: add the block-causal mask
    (packed rows; padded rows need none)."""

    def __init__(self, pad_id: int, attn_mask: bool):
        self.pad_id, self.attn_mask = pad_id, attn_mask

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        B, T = len(items), max(len(it["input_ids"]) for it in items)
        fill = {"input_ids": self.pad_id, "labels": IGNORE_INDEX, "segment_ids": -1, "position_ids": 0}
        out = {k: torch.full((B, T), v, dtype=torch.long) for k, v in fill.items()}
        out["position_ids"] += torch.arange(T)  # padding's positions: any value < block_size will do
        for b, it in enumerate(items):
            n = len(it["input_ids"])
            for k in fill:
                out[k][b, :n] = torch.from_numpy(it[k])
        if self.attn_mask:
            out["attn_mask"] = block_causal_mask(out["segment_ids"])
        if "num_targets_global" in items[0]:
            out["num_targets_global"] = torch.tensor(items[0]["num_targets_global"], dtype=torch.long)
        return out


class StepDataModule(L.LightningDataModule):
    """What the SFT and pair data modules share: step-indexed training order, fixed validation set,
    the global-batch check on resume. Subclasses build `self.train` / `self.val` in `_open()`."""

    def __init__(self, micro_batch_size: int, seed: int, val_batch_size: Optional[int], allow_repeat: bool,
                 num_workers: int):
        super().__init__()
        self.micro_batch_size, self.seed, self.allow_repeat = micro_batch_size, seed, allow_repeat
        self.val_batch_size, self.num_workers = val_batch_size or micro_batch_size, num_workers
        self.train: Optional[Dataset] = None
        self.val: Optional[Dataset] = None
        self.collate: Optional[Callable] = None
        self.tokenizer: Optional[Tokenizer] = None  # set by _open, with the train split's manifest
        self.manifest: dict[str, Any] = {}
        self._restored: Optional[dict[str, Any]] = None

    def _open(self) -> None:
        raise TypeError(f"{type(self).__name__} must build its datasets in _open()")

    def setup(self, stage: str) -> None:
        if self.train is None:
            self._open()
        if stage == "fit":
            self.check_budget()

    @property
    def global_batch_size(self) -> int:
        t = self.trainer
        return self.micro_batch_size * t.accumulate_grad_batches * t.world_size

    def check_budget(self) -> None:
        steps, n = self.trainer.max_steps, len(self.train)
        if steps is None or steps < 1:
            raise ValueError("post-training needs trainer.max_steps >= 1 (it fixes the sample order and lr schedule)")
        want = steps * self.global_batch_size
        if want > n and not self.allow_repeat:
            raise ValueError(f"the run reads {want:,} samples (max_steps {steps} x global batch {self.global_batch_size}) "
                             f"but the train split has {n:,}; lower max_steps or set data.allow_repeat=true")
        rank_zero_info(f"{type(self).__name__}: {n:,} train samples; the run reads {want:,} ({want / max(n, 1):.2f} epochs)")

    def train_dataloader(self) -> DataLoader:
        t = self.trainer
        if self._restored and self._restored.get("global_batch_size") not in (None, self.global_batch_size):
            raise ValueError(
                f"the checkpoint was trained with global batch {self._restored['global_batch_size']}, this run has "
                f"{self.global_batch_size} (micro_batch_size x accumulate_grad_batches x world size); keep it "
                f"equal to resume the same sample sequence")
        self.train.set_global_batch(self.global_batch_size)
        sampler = StepBatchSampler(self.micro_batch_size, t.accumulate_grad_batches, t.global_rank, t.world_size,
                                   total_steps=t.max_steps, start_step=lambda: t.global_step)
        return DataLoader(self.train, batch_sampler=sampler, collate_fn=self.collate, num_workers=self.num_workers,
                          pin_memory=t.strategy.root_device.type == "cuda")

    def val_dataloader(self) -> DataLoader:
        t = self.trainer
        mine = list(range(t.global_rank, len(self.val), t.world_size))
        return DataLoader(torch.utils.data.Subset(self.val, mine), batch_size=self.val_batch_size, shuffle=False,
                          collate_fn=self.collate, num_workers=self.num_workers)

    def identity(self) -> dict[str, Any]:
        """What must not change across a resume (besides the global batch)."""
        return {"seed": self.seed}

    # ---- the run shape hooks of recipes/cli.py --------------------------------------------
    def check_run(self, trainer: L.Trainer) -> None:
        """Before anything is written: the data opens, matches the tokenizer and serves the run."""
        self.trainer = trainer
        if self.train is None:
            self._open()
        self.check_budget()

    def run_identity(self) -> dict[str, Any]:
        """What a resume must share with its checkpoint: data, tokenizer and this module's settings."""
        if self.train is None:
            self._open()
        return {"tokenizer_sha256": self.tokenizer.content_hash if self.tokenizer else None,
                "shards_sha256": data_sha256(self.manifest), **{f"data.{k}": v for k, v in self.identity().items()}}

    def state_dict(self) -> dict[str, Any]:
        return {"global_batch_size": self.global_batch_size, **self.identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._restored = state
        check_restored(state, self.identity(), "data", "the data")


def data_sha256(manifest: dict[str, Any]) -> str:
    """A hash of the examples a manifest lists: every token, mask and index file's sha256."""
    content = {s: [[r["file"], r["tokens"], r["sha256"], r.get("mask", {}).get("sha256"),
                    r.get("index", {}).get("sha256")] for r in split["shards"]]
               for s, split in sorted(manifest.get("splits", {}).items())}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def open_examples(data_dir: str, split: str, kind: str, tokenizer: Optional[Tokenizer]) -> ExampleShards:
    """ExampleShards, also refusing data written with another chat template than this code's."""
    from gpt.chat import jinja_template

    ex = ExampleShards(data_dir, split, kind, tokenizer=tokenizer)
    want = ex.manifest.get("chat_template_sha256")
    if want != hashlib.sha256(jinja_template().encode()).hexdigest():
        raise ShardError(f"{data_dir}: written with another chat template than this code's (gpt/chat.py); "
                         f"re-run {kind} data prep")
    return ex


def pad_id_of(manifest: dict[str, Any]) -> int:
    try:
        return int(manifest["special_ids"][PAD])
    except (KeyError, TypeError):
        raise ShardError(f"manifest lists no {PAD} id among its special_ids") from None


class SFTDataModule(StepDataModule):
    """Train/val dataloaders over an SFT shard directory (data_prep.make_sft).

    Args:
        data_dir: SFT directory with manifest.json (a pretraining or pairs directory is refused).
        tokenizer: tokenizer.json the data was written with (checked against the manifest).
        block_size: inputs per row (<= the model's block_size); a row holds up to block_size + 1
            tokens, so every example of the directory must fit (made with the same --block_size or less).
        micro_batch_size: rows per rank per forward/backward.
        seed: seed of the packing order and the sample order.
        packing: several conversations per row (True) or one, right-padded (False).
        attn_mask: put the (B, 1, T, T) packed attention mask into batches (else build it on the
            device from segment_ids with block_causal_mask).
        val_examples: the first val_examples conversations of the val split (fixed set).
        val_batch_size: rows per validation batch (default: micro_batch_size).
        allow_repeat: let a run read more rows than the train split holds (later epochs use fresh
            permutations of the same rows); SFT usually runs for several epochs.
        num_workers: DataLoader worker processes per rank.
    """

    def __init__(self, data_dir: str, tokenizer: Optional[str] = None, block_size: int = 256,
                 micro_batch_size: int = 8, seed: int = 1337, packing: bool = True, attn_mask: bool = True,
                 val_examples: int = 256, val_batch_size: Optional[int] = None, allow_repeat: bool = True,
                 num_workers: int = 0):
        super().__init__(micro_batch_size, seed, val_batch_size, allow_repeat, num_workers)
        self.save_hyperparameters(logger=False)
        self.data_dir, self.tokenizer_path, self.block_size = data_dir, tokenizer, block_size
        self.packing, self.attn_mask, self.val_examples = packing, attn_mask, val_examples
        manifest = Path(data_dir) / "manifest.json"
        self.hparams["manifest_sha256"] = hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None

    def _open(self) -> None:
        tok = self.tokenizer = Tokenizer.from_file(self.tokenizer_path) if self.tokenizer_path else None
        train = open_examples(self.data_dir, "train", "sft", tok)
        self.manifest = train.manifest
        val = open_examples(self.data_dir, "val", "sft", tok)
        longest = int(max(train.lengths.max(initial=0), val.lengths.max(initial=0)))
        if longest > self.block_size + 1:
            raise ValueError(f"{self.data_dir} holds examples of up to {longest} tokens; data.block_size "
                             f"{self.block_size} fits {self.block_size + 1} (re-run make_sft with --block_size "
                             f"{self.block_size} or raise data.block_size)")
        if len(train) == 0:
            raise ShardError(f"{self.data_dir}: the train split holds no examples")
        self.collate = SFTCollator(pad_id_of(train.manifest), self.attn_mask and self.packing)
        self.train = SFTRows(train, self.block_size, self.packing, self.seed, self.allow_repeat)
        self.val = SFTRows(val, self.block_size, self.packing, seed=None, count=self.val_examples)
        rank_zero_info(f"SFT data: {len(train):,} conversations in {len(self.train):,} rows "
                       f"({100 * self.train.plan.fill:.1f}% of row tokens used); val {len(self.val):,} rows")

    def identity(self) -> dict[str, Any]:
        return {"seed": self.seed, "block_size": self.block_size, "packing": self.packing}
