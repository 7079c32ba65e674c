"""Reward model: the GPT backbone with a scalar head read at the last token of the response.

    from gpt.reward import load_reward_model
    rm, tok = load_reward_model("runs/demo/reward/checkpoints/last.ckpt")   # .ckpt or DeepSpeed dir
    rm.score_texts(tok, [[{"role": "user", "content": "What is 2 + 3?"}]], ["5"])   # -> [1.93]
    r = rm.score(input_ids, last_index, position_ids=pos, attn_mask=mask)          # (B,) fp32

    python -m recipes.reward --config recipes/configs/reward-tiny-cpu.yaml --init_from SFT_CKPT
    gpt score --checkpoint RM --prompt "What is 2 + 3?" --response "5"

RewardModel = `backbone` (gpt.model.GPT, its lm_head unused) + `head` (nn.Linear(n_embd, 1,
bias=False): a bias cancels out of every preference loss, so it would never train). The
reward of a sequence is the head applied to the backbone's final hidden state at `last_index`,
the column of the response's last token (its <|end|>, as the chat template renders a reply):
gpt.pair_data gives that index under right and left padding. PPO can start its value head
from `head` (same shape, per token instead of at the last one).

RewardModule trains it with the Bradley-Terry loss (gpt.objectives.bradley_terry_loss, with
an optional margin) on gpt.pair_data batches: rows [0, B) chosen, [B, 2B) rejected, the
per-pair losses summed and divided by the pairs of the global batch. Logged per optimizer
step: train/loss, train/accuracy (chosen scored above rejected), train/margin (mean r_c - r_r),
train/reward_mean and train/reward_std (over both rows: a drifting scale shows here); at each
validation the same under val/, plus val/reward_chosen and val/reward_rejected.

Checkpoints: the backbone under `model.` (as every stage's, so gpt.checkpoint.load_model and
the next stage's --init_from read an RM checkpoint as a plain GPT) and the head under
`reward_head.`, announced by checkpoint["gpt"]["heads"]["reward_head"] = {"in_features",
"out_features", "bias"}. `load_reward_model` reads both from a Lightning .ckpt or a DeepSpeed
checkpoint directory (ZeRO 1/2/3), the two kinds recipes/reward.py writes.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from gpt.chat import ChatTemplate
from gpt.checkpoint import CheckpointError, load_model, one_line
from gpt.config import GPTConfig
from gpt.model import GPT
from gpt.pair_module import PairModule

HEAD = "reward_head"  # the head's state-dict prefix in RewardModule checkpoints


def make_head(config: GPTConfig) -> nn.Linear:
    """A fresh scalar head: N(0, init_std) like the backbone's projections, no bias."""
    head = nn.Linear(config.n_embd, 1, bias=False)
    nn.init.normal_(head.weight, 0.0, config.init_std)
    return head


def head_meta(head: nn.Linear) -> dict[str, Any]:
    return {"in_features": head.in_features, "out_features": head.out_features, "bias": head.bias is not None}


def read_rewards(backbone: GPT, head: nn.Module, input_ids: torch.Tensor, last_index: torch.Tensor,
                 position_ids: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
                 row_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(S,) fp32 rewards: the head on the hidden state at (row_index[s], last_index[s]) for each
    sequence s (row_index None: sequence s is row s; gpt.pair_data's shared rows hold two)."""
    h = backbone(input_ids, position_ids=position_ids, attn_mask=attn_mask, hidden=True)
    rows = torch.arange(h.size(0), device=h.device) if row_index is None else row_index.to(h.device)
    last = h[rows, last_index.to(h.device)]
    return head(last).squeeze(-1).float()


class RewardModel(nn.Module):
    """A GPT backbone and a scalar head; see the module docstring."""

    def __init__(self, config: GPTConfig, backbone: Optional[GPT] = None, head: Optional[nn.Linear] = None):
        super().__init__()
        self.config = config
        self.backbone = backbone if backbone is not None else GPT(config)
        self.head = head if head is not None else make_head(config)

    def score(self, input_ids: torch.Tensor, last_index: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
              attn_mask: Optional[torch.Tensor] = None, row_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rewards of token rows, read at (row_index, last_index) (position_ids/attn_mask as for the
        GPT; row_index None: one reward per row)."""
        return read_rewards(self.backbone, self.head, input_ids, last_index, position_ids, attn_mask, row_index)

    forward = score

    @torch.no_grad()
    def score_texts(self, tokenizer: Any, prompts: Sequence[Sequence[dict]], responses: Sequence[str],
                    batch_size: int = 32) -> list[float]:
        """Reward of each (prompt messages, assistant reply) pair, rendered as training renders them:
        the chat template's prompt (ending in <|assistant|>) + the reply + <|end|>."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        chat = ChatTemplate(tokenizer)
        seqs = []
        for i, (p, r) in enumerate(zip(prompts, responses)):
            ids = chat.render_prompt(list(p)) + chat.render_reply(r)
            if len(ids) > self.config.block_size:
                raise ValueError(f"row {i}: prompt + response are {len(ids)} tokens, more than the reward model's "
                                 f"block_size {self.config.block_size}")
            seqs.append(ids)
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        out: list[float] = []
        try:
            for start in range(0, len(seqs), batch_size):
                chunk = seqs[start:start + batch_size]
                T = max(map(len, chunk))
                ids = torch.full((len(chunk), T), chat.pad_id, dtype=torch.long)
                for r, s in enumerate(chunk):  # right padding: causal attention never sees it
                    ids[r, :len(s)] = torch.tensor(s)
                last = torch.tensor([len(s) - 1 for s in chunk])
                out += self.score(ids.to(device), last.to(device)).tolist()
        finally:
            self.train(was_training)
        return out


# ---- loading ----------------------------------------------------------------------------
def _head_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The head's tensors and its checkpoint["gpt"]["heads"] entry, read without the backbone's."""
    from gpt.zero import load_meta

    is_ds = path.is_dir() and (path / "latest").is_file()
    if is_ds:
        meta = load_meta(path)
    elif path.is_file():
        meta = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # load_model checked the file
    else:
        meta = {}  # an export directory holds a GPT only
    spec = ((meta.get("gpt") or {}).get("heads") or {}).get(HEAD)
    if not isinstance(spec, dict):
        raise CheckpointError(f"{path}: no reward head (checkpoint['gpt']['heads']['{HEAD}']): a language model "
                              f"checkpoint, not a reward model; train one with recipes/reward.py")
    if is_ds:
        import contextlib
        import sys

        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(sys.stderr):  # zero_to_fp32 prints its progress
            lazy = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=(path / "latest").read_text().strip(),
                                                            lazy_mode=True)
        items = {k: v for k, v in lazy.items()}
    else:
        items = meta.get("state_dict", {})
    state = {}
    for k, v in items.items():
        name = str(k)
        if f"{HEAD}." in name:
            state[name[name.index(f"{HEAD}.") + len(HEAD) + 1:]] = v.contiguous() if is_ds else v
    return state, spec


def load_reward_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[RewardModel, Any]:
    """(RewardModel in eval mode on `device`, tokenizer or None) from a reward model checkpoint.

    Works on the Lightning .ckpt and DeepSpeed checkpoint directories recipes/reward.py writes;
    anything else (a language model checkpoint, a head of the wrong shape) is one CheckpointError line.
    """
    p = Path(path)
    backbone, tokenizer = load_model(p, reward_model_ok=True)  # every check of a backbone checkpoint; the head is left out
    try:
        state, spec = _head_state(p)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{p}: cannot read the reward head ({one_line(e)})") from None
    head = nn.Linear(int(spec["in_features"]), int(spec["out_features"]), bias=bool(spec["bias"]))
    if head.in_features != backbone.config.n_embd or head.out_features != 1:
        raise CheckpointError(f"{p}: the reward head is {head.in_features} -> {head.out_features}, the backbone's "
                              f"width is {backbone.config.n_embd} (a head must be n_embd -> 1)")
    want = head.state_dict()
    if set(state) != set(want) or any(state[k].shape != want[k].shape for k in want):
        raise CheckpointError(f"{p}: reward head tensors {sorted(state)} do not match {sorted(want)} "
                              f"of shapes {[tuple(t.shape) for t in want.values()]}")
    head.load_state_dict({k: v.float() for k, v in state.items()})
    return RewardModel(backbone.config, backbone, head).to(device).eval(), tokenizer


# ---- training ---------------------------------------------------------------------------
class RewardModule(PairModule):
    """Bradley-Terry reward model training over gpt.pair_data batches; see the module docstring.

    Args:
        preset, model_config, tokenizer, lr, weight_decay, betas, eps, schedule, warmup_steps,
            min_lr_ratio, decay_fraction, compile: as gpt.lm.CausalLMModule (model_config must
            describe the --init_from checkpoint's shape).
        margin: the Bradley-Terry margin: the loss asks r_chosen - r_rejected >= margin (0: plain BT).
    """

    init_from_reward_model_ok = True  # --init_from another reward model: its backbone (the head starts anew)

    def __init__(self, preset: str = "tiny", model_config: Optional[dict[str, Any]] = None,
                 tokenizer: Optional[str] = None, lr: float = 1e-4, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, schedule: str = "cosine",
                 warmup_steps: int = 10, min_lr_ratio: float = 0.1, decay_fraction: float = 0.2,
                 compile: bool = False, margin: float = 0.0):
        super().__init__(preset=preset, model_config=model_config, tokenizer=tokenizer, lr=lr,
                         weight_decay=weight_decay, betas=betas, eps=eps, schedule=schedule,
                         warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio, decay_fraction=decay_fraction,
                         compile=compile)
        self.reward_head: Optional[nn.Linear] = None

    STATS = ("loss", "accuracy", "margin", "reward_sum", "reward_sq", "chosen", "rejected")

    def configure_model(self) -> None:
        super().configure_model()
        if self.reward_head is None:
            self.reward_head = make_head(self.config)

    def reward_model(self) -> RewardModel:
        """A RewardModel view of this module's backbone and head (shared weights, not a copy)."""
        return RewardModel(self.config, self.model, self.reward_head)

    def pair_stats(self, batch: dict[str, torch.Tensor], split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        rewards = read_rewards(self.model, self.reward_head, batch["input_ids"], batch["last_index"],
                               batch.get("position_ids"), batch.get("attn_mask"), batch.get("row_index"))
        chosen, rejected = rewards.chunk(2)
        losses = self.loss_fn(chosen, rejected)
        d = (chosen - rejected).detach()
        r = rewards.detach()
        stats = torch.stack([losses.detach().sum(), (d > 0).float().sum(), d.sum(), r.sum() / 2, (r ** 2).sum() / 2,
                             chosen.detach().sum(), rejected.detach().sum()])
        return losses, stats

    def loss_fn(self, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
        from gpt.objectives import bradley_terry_loss

        return bradley_terry_loss(chosen, rejected, self.hparams.margin or None)

    def metrics(self, sums: list[float], pairs: float, prefix: str) -> dict[str, float]:
        loss, acc, margin, rsum, rsq, chosen, rejected = (s / pairs for s in sums)
        # rewards are 2 per pair: rsum and rsq were halved so that dividing by pairs gives per-row moments
        var = max(rsq - rsum ** 2, 0.0)
        out = {f"{prefix}/loss": loss, f"{prefix}/accuracy": acc, f"{prefix}/margin": margin,
               f"{prefix}/reward_mean": rsum, f"{prefix}/reward_std": var ** 0.5}
        if prefix == "val":
            out.update({"val/reward_chosen": chosen, "val/reward_rejected": rejected})
        return out

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["gpt"]["heads"] = {HEAD: head_meta(self.reward_head)}
