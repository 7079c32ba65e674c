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
Anything else (a missing path, an empty, truncated or foreign file, weights whose names, shapes
or dtypes disagree with the config, pickled objects the weights-only loader refuses) raises
CheckpointError with one line naming the path, the tensor and what is wrong.

Exports (`save_model` here, gpt.hf.export_hf) are written through `atomic_dir`: a temporary
directory renamed into place when complete, with the modes the umask gives.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

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


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded or written; the message is one line naming the path."""


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def one_line(e: BaseException) -> str:
    """The first line of a library's error, with torch's weights-only refusal said plainly.

    torch's refusal spans a dozen lines and advises `weights_only=False`, i.e. running the
    file's code: we name what it refused and never repeat that advice.
    """
    text = _ANSI.sub("", str(e))
    if "Weights only load failed" in text or "WeightsUnpickler" in text:
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found:
            return (f"holds a pickled {found.group(1)}, which the weights-only loader refuses "
                    "(unpickling it could run code from the file)")
        found = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
        return f"holds pickled data the weights-only loader refuses ({found.group(1).strip() if found else 'unknown'})"
    if "mmap can only be used" in text:
        return "not in the zip format torch.save writes (empty, truncated or another format)"
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0][:300] if lines else type(e).__name__


def _few(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


# ---- writing a directory whole -----------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_dir(out_dir: str | os.PathLike, replaceable: set[str]) -> Iterator[Path]:
    """Yield a temporary directory beside `out_dir`; when the block ends it becomes `out_dir`.

    An existing `out_dir` is replaced only if it holds nothing but `replaceable` file names; on
    an error the temporary directory is removed and `out_dir` is untouched. The result gets the
    modes the umask gives (mkdtemp makes 0700 and safetensors writes 0600, which would keep
    teammates on a shared file system out of an export).
    """
    out = Path(out_dir).resolve()  # "." or a symlink: the rename below needs the real directory
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a directory")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in replaceable)
        if foreign:
            raise CheckpointError(f"{out}: refusing to replace a directory holding non-export files "
                                  f"({', '.join(foreign[:5])})")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        mask = _umask()
        for f in tmp.iterdir():
            f.chmod(0o666 & ~mask)
        tmp.chmod(0o777 & ~mask)
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


def save_model(model: GPT, out_dir: str | os.PathLike, tokenizer: Any = None) -> Path:
    """Write the native export directory atomically (see atomic_dir).

    safetensors refuses tensors that share memory, so a tied lm_head is left out and re-tied on
    load. An existing directory is replaced only if it holds nothing but export files.
    """
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    with atomic_dir(out_dir, NATIVE_FILES) as tmp:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps({"gpt_config": model.config.to_dict()}, indent=2) + "\n", "utf-8")
        if tokenizer is not None:
            (tmp / TOKENIZER).write_text(tokenizer.to_str(), "utf-8")
    return Path(out_dir).resolve()


# ---- loading -----------------------------------------------------------------------------
def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", *,
               reward_model_ok: bool = False) -> tuple[GPT, Any]:
    """(GPT in eval mode on `device`, gpt.tokenizer.Tokenizer or None) from any known checkpoint.

    A reward model's checkpoint holds a GPT too, but its LM head stayed behind while the backbone
    learnt to score: it is refused unless `reward_model_ok` (its backbone is wanted, as by
    gpt.reward.load_reward_model or a reward model's --init_from)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    if p.is_file() and p.name in (WEIGHTS, CONFIG):
        p = p.parent  # pointed at a file of a checkpoint directory
    if not reward_model_ok:  # from the metadata, before any weights are read
        refuse_reward_model(p, str(p), "a language model is wanted here (a reward model is read with "
                            "gpt.reward.load_reward_model, or scores replies with gpt score)")
    try:
        if p.is_dir():
            model, tokenizer = _load_dir(p)
        else:
            model, tokenizer = _load_lightning(p)
    except CheckpointError:
        raise
    except Exception as e:  # a library deep inside: keep its reason, say which path
        raise CheckpointError(f"{p}: {one_line(e)}") from None
    if tokenizer is not None:
        check_vocab(tokenizer, model.config, f"{p}: the checkpoint's tokenizer")
    return model.to(device).eval(), tokenizer


def announced_heads(path: str | os.PathLike) -> dict[str, Any]:
    """The heads besides the GPT a checkpoint announces (checkpoint["gpt"]["heads"]: a reward model's
    "reward_head", PPO's "critic"); {} for an export directory, which holds a language model only."""
    p = Path(path)
    if not p.exists() or p.name in NATIVE_FILES or (p.is_dir() and not (p / "latest").is_file()):
        return {}
    try:
        if p.is_dir():
            from gpt.zero import load_meta

            meta = load_meta(p)
        else:
            meta = _read_torch_file(p)
    except Exception:  # noqa: BLE001 -- an unreadable checkpoint is load_model's to name, in its words
        return {}
    gpt_meta = meta.get("gpt") if isinstance(meta, dict) else None
    return dict(gpt_meta.get("heads") or {}) if isinstance(gpt_meta, dict) else {}


def refuse_reward_model(path: str | os.PathLike, what: str, why: str) -> None:
    """CheckpointError if `path` is a reward model, where a language model is wanted. load_model reads
    a reward model's GPT too, but its LM head stayed behind while the backbone learnt to score: as an
    LM it is broken, and nothing would say so."""
    if "reward_head" in announced_heads(path):
        raise CheckpointError(f"{what}: holds a reward model (recipes/reward.py), not a language model; {why}")


def check_vocab(tokenizer: Any, config: GPTConfig, what: str) -> None:
    """Refuse a tokenizer whose text ids reach past the model's vocabulary (one line).

    Counted is the highest id plain text can encode to (any id but a special token's) + 1, and at
    least end-of-text + 1: the chat/pad specials gpt.tokenizer appends to a GPT-2 vocabulary
    (ids 50257+) do not count, so GPT-2 itself passes.
    """
    special = set(tokenizer.special_ids.values())
    ids = tokenizer.backend.get_vocab(with_added_tokens=True).values()
    text_ids = max([i + 1 for i in ids if i not in special] + [tokenizer.eot_id + 1])
    if text_ids > config.vocab_size:
        raise CheckpointError(f"{what} has {text_ids} token ids but the model's vocabulary has {config.vocab_size}: "
                              "they do not belong together")


def _load_dir(d: Path) -> tuple[GPT, Any]:
    if (d / "latest").is_file():
        return _load_deepspeed(d)
    if not (d / CONFIG).is_file():
        raise CheckpointError(f"{d}: not a checkpoint directory (no config.json, no DeepSpeed 'latest' file)")
    try:
        cfg = json.loads((d / CONFIG).read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{d / CONFIG}: not valid JSON ({one_line(e)})") from None
    if isinstance(cfg, dict) and isinstance(cfg.get("gpt_config"), dict):
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
        raise CheckpointError(f"{d / WEIGHTS}: not a readable safetensors file ({one_line(e)})") from None
    model = build_model(d / WEIGHTS, _config(d / CONFIG, cfg), state)
    tok = _tokenizer_file(d / TOKENIZER) if (d / TOKENIZER).is_file() else None
    return model, tok


def _load_deepspeed(d: Path) -> tuple[GPT, Any]:
    from gpt.zero import load_consolidated

    state, meta = load_consolidated(d)
    heads = tuple(f"{h}." for h in meta.get("heads") or ())  # e.g. a reward model's head: not the GPT's
    state = {k: v for k, v in state.items() if not k.startswith(heads)} if heads else state
    state = merged_state(meta, state)
    return build_model(d, _config(d, meta["model_config"]), state), _tokenizer_str(d, meta.get("tokenizer"))


def _read_torch_file(f: Path) -> Any:
    """torch.load(weights_only=True), with a one-line reason for each way a file can be wrong."""
    size = f.stat().st_size
    if size == 0:
        raise CheckpointError(f"{f}: empty file (0 bytes), not a checkpoint")
    if not zipfile.is_zipfile(f):  # torch.save has written zip archives since torch 1.6
        raise CheckpointError(f"{f}: not a readable PyTorch checkpoint, truncated or another format "
                              f"({size:,} bytes, not the zip archive torch.save writes)")
    try:
        return torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        if "Weights only load failed" in str(e):
            raise CheckpointError(f"{f}: {one_line(e)}") from None
        raise CheckpointError(f"{f}: not a readable PyTorch checkpoint, truncated or another format ({one_line(e)})") from None


def _load_lightning(f: Path) -> tuple[GPT, Any]:
    ckpt = _read_torch_file(f)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"{f}: not a Lightning checkpoint (no 'state_dict')")
    meta = ckpt.get("gpt")
    if not isinstance(meta, dict) or not isinstance(meta.get("model_config"), dict):
        raise CheckpointError(f"{f}: no checkpoint['gpt']['model_config']; not written by gpt.lm")
    state = {}
    for k, v in ckpt["state_dict"].items():
        k = str(k).replace("_orig_mod.", "")  # a torch.compile wrapper's name in the key path
        for prefix in _PREFIXES:
            if k.startswith(prefix):
                state[k[len(prefix):]] = v
                break
    state = merged_state(meta, state)
    return build_model(f, _config(f, meta["model_config"]), state), _tokenizer_str(f, meta.get("tokenizer"))


def _config(src: Path, cfg: Any) -> GPTConfig:
    try:
        return GPTConfig.from_dict(dict(cfg))
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise CheckpointError(f"{src}: bad model config ({one_line(e)})") from None


def check_state(src: Any, state: dict[str, Any], model: GPT) -> None:
    """Refuse weights that do not fit `model` exactly, in one line naming the first bad tensor.

    Missing and unexpected names, non-tensors, non-float tensors and shape mismatches: what
    load_state_dict reports as a multi-line RuntimeError, or (for a dtype) casts silently.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(f"{src}: weights do not match the model config: missing {_few(missing)}")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise CheckpointError(f"{src}: weights do not match the model config: unexpected {_few(unexpected)}")
    for k, ref in expected.items():
        t = state[k]
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{src}: {k} is a {type(t).__name__}, not a tensor")
        if not t.is_floating_point():
            raise CheckpointError(f"{src}: {k} has dtype {str(t.dtype).removeprefix('torch.')}; "
                                  "weights must be floating point")
        if t.shape != ref.shape:
            raise CheckpointError(f"{src}: {k} has shape {tuple(t.shape)}, the model config implies {tuple(ref.shape)}")


def build_model(src: Any, config: GPTConfig, state: dict[str, Any]) -> GPT:
    """A fp32 GPT holding `state` (checked by check_state); a tied head missing from `state` is re-tied."""
    with torch.device("meta"):
        model = GPT(config)
    if config.tie_embeddings and "lm_head.weight" not in state and "wte.weight" in state:
        state = {**state, "lm_head.weight": state["wte.weight"]}
    check_state(src, state, model)
    # assign=True: take the loaded tensors as they are, no second copy of the weights.
    model.load_state_dict(state, strict=True, assign=True)
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
        raise CheckpointError(f"{src}: the tokenizer stored in the checkpoint does not load ({one_line(e)})") from None


def _tokenizer_file(f: Path) -> Any:
    from gpt.tokenizer import Tokenizer

    try:
        return Tokenizer.from_file(f)
    except Exception as e:
        raise CheckpointError(f"{f}: not a loadable tokenizer ({one_line(e)})") from None


def load_tokenizer(path: str | os.PathLike) -> Any:
    """gpt.tokenizer.Tokenizer from a tokenizer.json / GPT-2 vocab+merges / directory, or CheckpointError."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    return _tokenizer_file(p)
