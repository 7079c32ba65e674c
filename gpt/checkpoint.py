"""One loader for every checkpoint a user may point at, and the native export format.

    from gpt.checkpoint import load_model, save_model
    model, tokenizer = load_model("runs/x/checkpoints/last.ckpt")   # tokenizer may be None
    save_model(model, "exports/x", tokenizer=tokenizer)

`load_model(path)` recognises, in this order:
- a native export directory: config.json {"gpt_config": {...}} + model.safetensors [+ tokenizer.json]
  (what `save_model` / `gpt export --format native` write);
- a Lightning DeepSpeed checkpoint directory (`latest` + the tag folder), consolidated by
  gpt.zero.load_consolidated;
- a Hugging Face gpt2/llama directory (config.json with model_type), read by gpt.hf.load_hf;
- a Lightning `.ckpt` file written by gpt.lm (checkpoint["gpt"] carries the model config and
  the tokenizer), read with torch.load(weights_only=True).
Anything else (a missing path, a truncated file, a foreign file) raises CheckpointError with
one line naming the path and what is wrong.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from gpt.config import GPTConfig
from gpt.lora import merged_state  # a LoRA run's adapters are merged into the weights on load
from gpt.model import GPT

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
NATIVE_FILES = {WEIGHTS, CONFIG, TOKENIZER}
# Lightning wraps the module differently per strategy; the GPT itself is always `.model`.
_PREFIXES = ("_forward_module.model.", "module.model.", "model.")


class CheckpointError(Exception):
    """A checkpoint that cannot be loaded; the message is one line naming the path."""


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


# ---- saving ------------------------------------------------------------------------------
def save_model(model: GPT, out_dir: str | os.PathLike, tokenizer: Any = None) -> Path:
    """Write the native export directory atomically (temp dir, then rename).

    safetensors refuses tensors that share memory, so a tied lm_head is left out and re-tied on
    load. An existing directory is replaced only if it holds nothing but export files.
    """
    from safetensors.torch import save_file

    out = Path(out_dir).resolve()
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a directory")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in NATIVE_FILES)
        if foreign:
            raise CheckpointError(f"{out}: refusing to replace a directory holding other files ({', '.join(foreign[:5])})")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps({"gpt_config": model.config.to_dict()}, indent=2) + "\n", "utf-8")
        if tokenizer is not None:
            (tmp / TOKENIZER).write_text(tokenizer.to_str(), "utf-8")
        old = None
        if out.exists():  # a directory rename cannot overwrite: move the old one aside first
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ---- loading -----------------------------------------------------------------------------
def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[GPT, Any]:
    """(GPT in eval mode on `device`, gpt.tokenizer.Tokenizer or None) from any known checkpoint."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    if p.is_file() and p.name in (WEIGHTS, CONFIG):
        p = p.parent  # pointed at a file of a checkpoint directory
    try:
        if p.is_dir():
            model, tokenizer = _load_dir(p)
        else:
            model, tokenizer = _load_lightning(p)
    except CheckpointError:
        raise
    except Exception as e:  # a library deep inside: keep its reason, say which path
        raise CheckpointError(f"{p}: {_one_line(e)}") from None
    return model.to(device).eval(), tokenizer


def _load_dir(d: Path) -> tuple[GPT, Any]:
    if (d / "latest").is_file():
        return _load_deepspeed(d)
    if not (d / CONFIG).is_file():
        raise CheckpointError(f"{d}: not a checkpoint directory (no config.json, no DeepSpeed 'latest' file)")
    try:
        cfg = json.loads((d / CONFIG).read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{d / CONFIG}: not valid JSON ({_one_line(e)})") from None
    if isinstance(cfg, dict) and "gpt_config" in cfg:
        return _load_native(d, cfg["gpt_config"])
    if isinstance(cfg, dict) and "model_type" in cfg:
        from gpt.hf import load_hf

        tok = _tokenizer_file(d / TOKENIZER) if (d / TOKENIZER).is_file() else None
        return load_hf(d), tok
    raise CheckpointError(f"{d / CONFIG}: neither a gpt export ('gpt_config') nor a Hugging Face config ('model_type')")


def _load_native(d: Path, cfg: dict[str, Any]) -> tuple[GPT, Any]:
    from safetensors.torch import load_file

    if not (d / WEIGHTS).is_file():
        raise CheckpointError(f"{d}: no {WEIGHTS}")
    try:
        state = load_file(str(d / WEIGHTS))
    except Exception as e:
        raise CheckpointError(f"{d / WEIGHTS}: not a readable safetensors file ({_one_line(e)})") from None
    model = _build(d, cfg, state)
    tok = _tokenizer_file(d / TOKENIZER) if (d / TOKENIZER).is_file() else None
    return model, tok


def _load_deepspeed(d: Path) -> tuple[GPT, Any]:
    from gpt.zero import load_consolidated

    state, meta = load_consolidated(d)
    state = merged_state(meta, state)
    return _build(d, meta["model_config"], state), _tokenizer_str(d, meta.get("tokenizer"))


def _load_lightning(f: Path) -> tuple[GPT, Any]:
    try:
        ckpt = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(f"{f}: not a readable PyTorch checkpoint, truncated or another format ({_one_line(e)})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{f}: not a Lightning checkpoint (no 'state_dict')")
    meta = ckpt.get("gpt")
    if not isinstance(meta, dict) or "model_config" not in meta:
        raise CheckpointError(f"{f}: no checkpoint['gpt']['model_config']; not written by gpt.lm")
    state = {}
    for k, v in ckpt["state_dict"].items():
        k = k.replace("_orig_mod.", "")  # a torch.compile wrapper's name in the key path
        for prefix in _PREFIXES:
            if k.startswith(prefix):
                state[k[len(prefix):]] = v
                break
    state = merged_state(meta, state)
    return _build(f, meta["model_config"], state), _tokenizer_str(f, meta.get("tokenizer"))


def _build(src: Path, cfg: dict[str, Any], state: dict[str, torch.Tensor]) -> GPT:
    """A GPT with `state` loaded strictly; a tied head missing from `state` is re-tied."""
    try:
        config = GPTConfig.from_dict(dict(cfg))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{src}: bad model config ({_one_line(e)})") from None
    with torch.device("meta"):
        model = GPT(config)
    if config.tie_embeddings and "lm_head.weight" not in state and "wte.weight" in state:
        state = {**state, "lm_head.weight": state["wte.weight"]}
    try:
        # assign=True: take the loaded tensors as they are, no second copy of the weights.
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        msg = " ".join(str(e).split())[:300]
        raise CheckpointError(f"{src}: weights do not match the model config ({msg})") from None
    if config.tie_embeddings:
        model.lm_head.weight = model.wte.weight  # assign=True replaced the shared Parameter
    if config.flavour == "llama":  # non-persistent buffers were built on meta: rebuild them
        from gpt.model import rope_cache

        model.rope_cos, model.rope_sin = rope_cache(config, config.block_size)
    return model.float()


def _tokenizer_str(src: Path, tok_json: Optional[str]) -> Any:
    if not tok_json:
        return None
    from gpt.tokenizer import Tokenizer

    try:
        return Tokenizer.from_str(tok_json)
    except Exception as e:
        raise CheckpointError(f"{src}: the tokenizer stored in the checkpoint does not load ({_one_line(e)})") from None


def _tokenizer_file(f: Path) -> Any:
    from gpt.tokenizer import Tokenizer

    try:
        return Tokenizer.from_file(f)
    except Exception as e:
        raise CheckpointError(f"{f}: not a loadable tokenizer ({_one_line(e)})") from None


def load_tokenizer(path: str | os.PathLike) -> Any:
    """gpt.tokenizer.Tokenizer from a tokenizer.json / GPT-2 vocab+merges / directory, or CheckpointError."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    return _tokenizer_file(p)
