"""Held-out loss and bits per byte of a model on a shard split: the engine of `gpt eval`.

    from gpt.checkpoint import load_model
    from gpt.lm_eval import evaluate, open_split
    model, tok = load_model("runs/x/checkpoints/last.ckpt")
    result = evaluate(model, open_split("runs/demo/shards", "val"), tokenizer=tok, windows=64)
    result["loss"], result["bpb"], result["tokens"], result["bytes"]

The windows and the arithmetic are the training run's validation, reused rather than copied:
window j holds tokens [j*T, j*T + T + 1) of the split (gpt.data.ValWindows, with the target
bytes of gpt.data.bytes_per_token), the loss is gpt.objectives.causal_lm_loss, and loss and
bits/byte are sums over all windows divided once. So `windows=N, block_size=T` gives the
`val/loss` and `val/bpb` that a run with `data.val_windows: N`, `data.block_size: T` logged for
the same weights. The shards' tokenizer must be the checkpoint's (gpt.shards.check_tokenizer).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader

from gpt.data import ValWindows, bytes_per_token
from gpt.model import GPT
from gpt.objectives import causal_lm_loss
from gpt.shards import MANIFEST, TokenShards, atomic_write_bytes, check_tokenizer, sha256_file


def check_options(block_size: Optional[int], windows: Optional[int], batch_size: int) -> None:
    """ValueError, naming the option, before anything is loaded."""
    for name, value, floor in (("block_size", block_size, 1), ("windows", windows, 1), ("batch_size", batch_size, 1)):
        if value is not None and value < floor:
            raise ValueError(f"{name} must be >= {floor}, got {value}")


def open_split(data_dir: str | os.PathLike, split: str = "val") -> TokenShards:
    """The split's shards, sizes and headers checked (ShardError, one line, naming the file)."""
    return TokenShards(data_dir, split)


@torch.inference_mode()
def evaluate(model: GPT, shards: TokenShards, tokenizer: Any = None, block_size: Optional[int] = None,
             windows: Optional[int] = None, batch_size: int = 8) -> dict[str, Any]:
    """Loss (nats per target token) and bits/byte over the first `windows` windows (None = all).

    tokenizer: the model's; checked against the shards' manifest and used for bits/byte. None
    skips both (bpb is then None). block_size: tokens per window, default the model's.
    """
    check_options(block_size, windows, batch_size)
    cfg = model.config
    T = block_size or cfg.block_size
    if T > cfg.block_size:
        raise ValueError(f"block_size {T} is longer than the model's block_size {cfg.block_size}")
    if tokenizer is not None:
        check_tokenizer(shards.manifest, tokenizer, str(shards.data_dir))
    available = (shards.num_tokens - 1) // T
    if available < 1:
        raise ValueError(f"{shards.data_dir}: split {shards.split!r} has {shards.num_tokens} tokens, "
                         f"fewer than one window of {T + 1}")
    n = available if windows is None else min(windows, available)
    data = ValWindows(shards, T, list(range(n)), bytes_per_token(tokenizer) if tokenizer is not None else None)
    device = next(model.parameters()).device
    sums = torch.zeros(3, dtype=torch.float64)  # loss sum (nats), targets, bytes: as gpt.lm's validation
    for batch in DataLoader(data, batch_size=batch_size, shuffle=False):
        x, y = batch["input_ids"], batch["labels"]
        top = max(int(y.max()), int(x[:, 0].max()))  # y: every token of a window but its first
        if top >= cfg.vocab_size:
            raise ValueError(f"{shards.data_dir}: token id {top} in split {shards.split!r} is past the model's "
                             f"vocabulary ({cfg.vocab_size}); the shards were written with another tokenizer")
        loss_sum, count = causal_lm_loss(model(x.to(device)), y.to(device))
        sums += torch.stack([loss_sum.double().cpu(), count.double().cpu(), batch["num_bytes"].sum().double()])
    loss_sum, count, nbytes = sums.tolist()
    return {"data": str(shards.data_dir), "split": shards.split,
            "loss": loss_sum / count,
            "bpb": loss_sum / math.log(2) / nbytes if nbytes > 0 else None,
            "windows": n, "block_size": T, "tokens": int(count), "bytes": int(nbytes),
            "manifest_sha256": sha256_file(Path(shards.data_dir) / MANIFEST),
            "tokenizer_sha256": tokenizer.content_hash if tokenizer is not None else None}


def summary_line(result: dict[str, Any]) -> str:
    """One line a person reads: loss, bits/byte, what was measured and on what."""
    bpb = f"{result['bpb']:.4f}" if result.get("bpb") is not None else "n/a (no tokenizer)"
    return (f"{result['split']} loss {result['loss']:.4f} | bpb {bpb} | {result['windows']} windows x "
            f"{result['block_size']} tokens ({result['tokens']:,} targets, {result['bytes']:,} bytes) | "
            f"{result.get('checkpoint', 'model')} on {result['data']}")


def write_json(result: dict[str, Any], path: str | os.PathLike) -> None:
    """The result as JSON, written atomically (temp + rename); "-" means stdout."""
    text = json.dumps(result, indent=2) + "\n"
    if str(path) == "-":
        print(text, end="", flush=True)
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(p, text.encode("utf-8"))


def log_wandb(result: dict[str, Any], project: str, group: Optional[str] = None,
              save_dir: Optional[str] = None) -> str:
    """Log one W&B run (job_type "eval") with the result as config and metrics; returns its id.

    Online when W&B has credentials (any host: wandb.login decides), else offline; an explicit
    WANDB_MODE wins, as in the recipes.
    """
    import wandb

    mode = None if "WANDB_MODE" in os.environ else (
        "online" if wandb.login(prompt=False, verify=False) else "offline")
    if save_dir:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=project, group=group, job_type="eval", dir=save_dir, mode=mode,
                     config={k: v for k, v in result.items() if k not in ("loss", "bpb")})
    metrics = {"eval/loss": result["loss"]}
    if result.get("bpb") is not None:
        metrics["eval/bpb"] = result["bpb"]
    run.log(metrics)
    run.summary.update(metrics)
    run.finish()
    return run.id
