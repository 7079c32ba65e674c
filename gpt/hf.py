"""Hugging Face conversion: our GPT <-> a `GPT2LMHeadModel` / `LlamaForCausalLM` directory.

    from gpt.hf import export_hf, load_hf
    export_hf(model, "out/hf", tokenizer=tok)      # config.json + model.safetensors (+ tokenizer)
    # then, anywhere:  transformers.AutoModelForCausalLM.from_pretrained("out/hf")
    model = load_hf("out/hf")                      # back to our GPT; also reads HF-saved dirs

The gpt2 flavour maps to `GPT2LMHeadModel`, the llama flavour to `LlamaForCausalLM`. The
weights are renamed, split (our fused qkv and gate|up projections) and, for GPT-2's Conv1D
layers, transposed. Only the real vocabulary is exported: our embedding rows are padded to a
multiple of 64 for fast GEMMs, and a padded row in HF's lm_head would be a token that can be
sampled but never decoded. What HF cannot represent exactly (QK-norm in Llama, an untied
GPT-2 head) is refused with a ValueError rather than exported approximately.

Reading needs only `safetensors` and `json`: transformers is not imported, no remote code is
run, and pickled `pytorch_model.bin` files are refused (convert them to safetensors first).
As in transformers, every tensor must have the shape config.json implies (and be floating
point): a wrong-sized embedding is refused in one line naming it, never cropped or zero-filled.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from gpt.checkpoint import CheckpointError, atomic_dir, build_model
from gpt.config import GPTConfig
from gpt.model import GPT

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
# Everything export_hf writes: a directory holding only these may be replaced by a new export.
EXPORT_FILES = {"config.json", WEIGHTS, "tokenizer.json", "tokenizer_config.json", "generation_config.json"}
# Non-weight buffers some HF versions saved (GPT-2's causal mask, Llama's RoPE frequencies).
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # all the tanh approximation


# ---- export ------------------------------------------------------------------------------
def export_hf(model: GPT, out_dir: str | os.PathLike, tokenizer: Any = None) -> Path:
    """Write `out_dir` as a Hugging Face checkpoint that `from_pretrained` loads.

    tokenizer: a gpt.tokenizer.Tokenizer; its tokenizer.json is written alongside, its eot/pad
    ids go into config.json, and the chat template (gpt.chat) into tokenizer_config.json and
    generation_config.json.
    The directory is written under a temporary name and renamed (gpt.checkpoint.atomic_dir), so
    a crash never leaves a half export; an existing directory is replaced only if it holds
    nothing but export files. Files and directory get the modes the umask gives.
    """
    cfg = model.config
    hf_config = _hf_config(cfg, next(model.parameters()).dtype)
    if tokenizer is not None:
        hf_config.update(_token_ids(tokenizer, cfg.vocab_size))
    with atomic_dir(out_dir, EXPORT_FILES) as tmp:
        tensors = _gpt2_to_hf(model) if cfg.flavour == "gpt2" else _llama_to_hf(model)
        # transformers refuses a safetensors file without format metadata.
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        _write_json(tmp / "config.json", hf_config)
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer.json")
            from gpt.chat import hf_chat_files  # the one chat template, as Jinja, and its stop tokens

            chat = hf_chat_files(tokenizer)
            _write_json(tmp / "tokenizer_config.json",
                        {**_tokenizer_config(tmp / "tokenizer.json", tokenizer, cfg), **chat["tokenizer_config.json"]})
            _write_json(tmp / "generation_config.json", chat["generation_config.json"])
    return Path(out_dir).resolve()


def _hf_config(cfg: GPTConfig, dtype: torch.dtype) -> dict[str, Any]:
    dtype_name = str(dtype).removeprefix("torch.")
    # "dtype" is what transformers >= 5 reads, "torch_dtype" what 4.x reads.
    common = dict(vocab_size=cfg.vocab_size, initializer_range=cfg.init_std, use_cache=True,
                  tie_word_embeddings=cfg.tie_embeddings, dtype=dtype_name, torch_dtype=dtype_name,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if cfg.flavour == "gpt2":
        if not cfg.tie_embeddings:
            raise ValueError("GPT2LMHeadModel ties lm_head to wte; an untied gpt2-flavour model cannot be exported")
        # A bias-free model is exported with zero biases: GPT-2 always has them, and zeros are exact.
        return dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", n_positions=cfg.block_size,
                    n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.intermediate_size,
                    activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps,
                    resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                    scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
                    reorder_and_upcast_attn=False, add_cross_attention=False, **common)
    if cfg.qk_norm:
        raise ValueError("LlamaForCausalLM has no QK-norm; a qk_norm=True model cannot be exported as llama")
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    # rope_parameters for transformers >= 5, the top-level rope_theta for 4.x readers.
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=cfg.n_embd,
                intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.n_layer,
                num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head, head_dim=cfg.head_dim,
                hidden_act="silu", max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps,
                rope_theta=cfg.rope_theta, rope_parameters=rope, rope_scaling=None,
                attention_bias=cfg.bias, mlp_bias=cfg.bias, attention_dropout=0.0, pretraining_tp=1, **common)


def _token_ids(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but the model only {vocab_size}")
    # GPT-2 convention: end-of-text also opens a document. A chat model must stop at
    # end-of-turn too, so HF's generate gets both as eos.
    end = getattr(tokenizer, "special_ids", {}).get("<|end|>")
    eos = tokenizer.eot_id if end is None else [tokenizer.eot_id, end]
    return dict(bos_token_id=tokenizer.eot_id, eos_token_id=eos, pad_token_id=tokenizer.pad_id)


def _tokenizer_config(tokenizer_json: Path, tokenizer: Any, cfg: GPTConfig) -> dict[str, Any]:
    """What AutoTokenizer needs to load tokenizer.json as a fast tokenizer with our specials."""
    added = {t["id"]: t["content"] for t in json.loads(tokenizer_json.read_text("utf-8")).get("added_tokens", [])}
    eot, pad = added.get(tokenizer.eot_id), added.get(tokenizer.pad_id)
    return dict(tokenizer_class="PreTrainedTokenizerFast", model_max_length=cfg.block_size,
                bos_token=eot, eos_token=eot, pad_token=pad, add_prefix_space=False)


def _dense(t: torch.Tensor) -> torch.Tensor:
    """A standalone contiguous CPU copy: safetensors refuses views that share storage."""
    return t.detach().to("cpu").clone(memory_format=torch.contiguous_format)


def _bias(t: Optional[torch.Tensor], n: int, like: torch.Tensor) -> torch.Tensor:
    """GPT-2 always has biases; a bias-free layer is exported exactly as zeros."""
    return _dense(t) if t is not None else torch.zeros(n, dtype=like.dtype)


def _gpt2_to_hf(model: GPT) -> dict[str, torch.Tensor]:
    cfg, w = model.config, model.wte.weight
    out = {"transformer.wte.weight": _dense(w[: cfg.vocab_size]),
           "transformer.wpe.weight": _dense(model.wpe.weight)}
    _put_norm(out, "transformer.ln_f", model.norm_f, w)
    for i, b in enumerate(model.blocks):
        p = f"transformer.h.{i}."
        _put_norm(out, p + "ln_1", b.norm1, w)
        _put_norm(out, p + "ln_2", b.norm2, w)
        # HF's Conv1D computes x @ W + b with W stored (in, out): the transpose of nn.Linear.
        for hf_name, lin in (("attn.c_attn", b.attn.qkv), ("attn.c_proj", b.attn.proj),
                             ("mlp.c_fc", b.mlp.fc), ("mlp.c_proj", b.mlp.proj)):
            out[p + hf_name + ".weight"] = _dense(lin.weight.t())
            out[p + hf_name + ".bias"] = _bias(lin.bias, lin.out_features, w)
    return out


def _put_norm(out: dict[str, torch.Tensor], name: str, norm: torch.nn.Module, like: torch.Tensor) -> None:
    out[name + ".weight"] = _dense(norm.weight)
    out[name + ".bias"] = _bias(norm.bias, norm.weight.numel(), like)


def _llama_to_hf(model: GPT) -> dict[str, torch.Tensor]:
    cfg, w = model.config, model.wte.weight
    out = {"model.embed_tokens.weight": _dense(w[: cfg.vocab_size]),
           "model.norm.weight": _dense(model.norm_f.weight)}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = _dense(model.lm_head.weight[: cfg.vocab_size])
    sizes = _qkv_sizes(cfg)
    for i, b in enumerate(model.blocks):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = _dense(b.norm1.weight)
        out[p + "post_attention_layernorm.weight"] = _dense(b.norm2.weight)
        parts = {"self_attn.q_proj": 0, "self_attn.k_proj": 1, "self_attn.v_proj": 2}
        for suffix in ("weight", "bias") if cfg.bias else ("weight",):
            fused = getattr(b.attn.qkv, suffix).split(sizes, dim=0)  # rows are [q | k | v]
            for hf_name, j in parts.items():
                out[f"{p}{hf_name}.{suffix}"] = _dense(fused[j])
            gate, up = getattr(b.mlp.fc, suffix).chunk(2, dim=0)  # rows are [gate | up]
            out[f"{p}mlp.gate_proj.{suffix}"] = _dense(gate)
            out[f"{p}mlp.up_proj.{suffix}"] = _dense(up)
            out[f"{p}self_attn.o_proj.{suffix}"] = _dense(getattr(b.attn.proj, suffix))
            out[f"{p}mlp.down_proj.{suffix}"] = _dense(getattr(b.mlp.proj, suffix))
    return out


def _qkv_sizes(cfg: GPTConfig) -> list[int]:
    return [cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim]


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ---- import ------------------------------------------------------------------------------
def load_hf(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> GPT:
    """Our GPT from an HF gpt2/llama directory (ours or transformers' `save_pretrained`).

    Reads config.json and model.safetensors (or a sharded model.safetensors.index.json) with
    plain json + safetensors. Every tensor must have exactly the shape config.json implies and a
    floating-point dtype, as transformers requires: an embedding with 8 or 5000 rows for a
    4096 vocabulary is refused, not cropped or zero-filled. Errors are one line (ValueError).
    """
    d = Path(path)
    hf = read_hf_config(d)
    cfg = config_from_hf(hf)
    weights = _Weights(d, _read_weights(d))
    state = _hf_to_gpt2(weights, cfg) if cfg.flavour == "gpt2" else _hf_to_llama(weights, cfg, hf)
    if weights.left():
        raise CheckpointError(f"{d}: unexpected weights for a plain {hf['model_type']} model: {', '.join(weights.left()[:5])}")
    return build_model(d, cfg, state).to(dtype).eval()


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """config.json of an HF gpt2/llama directory, or a one-line error saying why it is not one."""
    d = Path(path)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: no such directory")
    if not (d / "config.json").is_file():
        raise ValueError(f"{d}: not a Hugging Face checkpoint (no config.json)")
    try:
        hf = json.loads((d / "config.json").read_text("utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{d / 'config.json'}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{d / 'config.json'}: not a JSON object")
    if hf.get("model_type") not in ("gpt2", "llama"):
        raise ValueError(f"{d}: model_type {hf.get('model_type')!r} is not supported; only 'gpt2' and 'llama'")
    return hf


def config_from_hf(hf: dict[str, Any]) -> GPTConfig:
    """Our GPTConfig for an HF config dict; ValueError for a variant our model does not compute."""
    if hf["model_type"] == "gpt2":
        return _gpt2_config(hf)
    return _llama_config(hf)


def _gpt2_config(hf: dict[str, Any]) -> GPTConfig:
    act = hf.get("activation_function", "gelu_new")
    if act not in GELU_TANH:
        raise ValueError(f"gpt2 activation_function {act!r} is not supported; only the tanh GELU ({', '.join(GELU_TANH)})")
    if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx") or hf.get("add_cross_attention"):
        raise ValueError("gpt2 variants with unscaled/layer-scaled attention or cross-attention are not supported")
    n_embd = hf.get("n_embd", 768)
    return GPTConfig(flavour="gpt2", vocab_size=hf.get("vocab_size", 50257), block_size=hf.get("n_positions", 1024),
                     n_layer=hf.get("n_layer", 12), n_head=hf.get("n_head", 12), n_embd=n_embd,
                     intermediate_size=hf.get("n_inner") or 4 * n_embd, bias=True,
                     tie_embeddings=hf.get("tie_word_embeddings", True),
                     norm_eps=hf.get("layer_norm_epsilon", 1e-5), init_std=hf.get("initializer_range", 0.02))


def _llama_config(hf: dict[str, Any]) -> GPTConfig:
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"llama hidden_act {hf['hidden_act']!r} is not supported; only 'silu'")
    rope = hf.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default" or hf.get("rope_scaling"):
        raise ValueError(f"llama RoPE scaling ({hf.get('rope_scaling') or rope_type}) is not supported; only plain RoPE")
    n_embd, n_head = hf.get("hidden_size", 4096), hf.get("num_attention_heads", 32)
    if hf.get("head_dim") not in (None, n_embd // n_head):
        raise ValueError(f"llama head_dim {hf['head_dim']} != hidden_size / num_attention_heads is not supported")
    return GPTConfig(flavour="llama", vocab_size=hf.get("vocab_size", 32000),
                     block_size=hf.get("max_position_embeddings", 2048), n_layer=hf.get("num_hidden_layers", 32),
                     n_head=n_head, n_kv_head=hf.get("num_key_value_heads") or n_head, n_embd=n_embd,
                     intermediate_size=hf.get("intermediate_size", 11008),
                     # One bias flag for all Linears; a missing MLP/attention bias is loaded as zeros.
                     bias=bool(hf.get("attention_bias") or hf.get("mlp_bias")),
                     tie_embeddings=hf.get("tie_word_embeddings", False), norm_eps=hf.get("rms_norm_eps", 1e-6),
                     rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
                     init_std=hf.get("initializer_range", 0.02))


def _read_weights(d: Path) -> dict[str, torch.Tensor]:
    if (d / WEIGHTS).is_file():
        return load_file(str(d / WEIGHTS))
    if (d / INDEX).is_file():
        files = sorted(set(json.loads((d / INDEX).read_text("utf-8"))["weight_map"].values()))
        return {k: v for f in files for k, v in load_file(str(d / f)).items()}
    if any((d / n).exists() for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        raise ValueError(f"{d}: only safetensors weights are read (pytorch_model.bin is a pickle); "
                         "re-save with save_pretrained(..., safe_serialization=True)")
    raise ValueError(f"{d}: no {WEIGHTS} or {INDEX} in this directory")


def _strip_prefix(name: str) -> str:
    # transformers nests the body under "transformer." (GPT-2) or "model." (Llama); OpenAI's
    # original GPT-2 weights have no prefix at all.
    for prefix in ("transformer.", "model."):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


class _Weights:
    """An HF checkpoint's tensors by unprefixed name; `take` checks each against its expected shape."""

    def __init__(self, d: Path, tensors: dict[str, torch.Tensor]):
        self.d = d
        self.file_names = {_strip_prefix(k): k for k in tensors if not k.endswith(IGNORED_SUFFIXES)}
        self.tensors = {s: tensors[k] for s, k in self.file_names.items()}

    def take(self, name: str, *shape: int) -> torch.Tensor:
        if name not in self.tensors:
            raise CheckpointError(f"{self.d}: missing weight {name!r}: not a complete checkpoint for this config")
        return self.check(name, self.tensors.pop(name), shape)

    def take_optional(self, name: str, *shape: int) -> Optional[torch.Tensor]:
        return self.take(name, *shape) if name in self.tensors else None

    def check(self, name: str, t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        where = f"{self.d}: {self.file_names[name]}"
        if not t.is_floating_point():
            raise CheckpointError(f"{where} has dtype {str(t.dtype).removeprefix('torch.')}; weights must be floating point")
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{where} has shape {tuple(t.shape)}, config.json implies {shape}")
        return t

    def left(self) -> list[str]:
        return sorted(self.file_names[s] for s in self.tensors)


def _pad_rows(t: torch.Tensor, cfg: GPTConfig) -> torch.Tensor:
    """Zero rows up to the padded vocab: never indexed by a real token, never scored."""
    return F.pad(t, (0, 0, 0, cfg.padded_vocab_size - t.size(0)))


def _head(w: _Weights, wte: torch.Tensor, cfg: GPTConfig) -> torch.Tensor:
    head = w.take_optional("lm_head.weight", cfg.vocab_size, cfg.n_embd)
    if cfg.tie_embeddings:  # a tied model ignores a saved head, as HF does
        return wte
    if head is None:
        raise CheckpointError(f"{w.d}: missing weight 'lm_head.weight': config says untied embeddings")
    return _pad_rows(head, cfg)


def _hf_to_gpt2(w: _Weights, cfg: GPTConfig) -> dict[str, torch.Tensor]:
    C, I = cfg.n_embd, cfg.intermediate_size
    wte = _pad_rows(w.take("wte.weight", cfg.vocab_size, C), cfg)
    s = {"wte.weight": wte, "wpe.weight": w.take("wpe.weight", cfg.block_size, C), "lm_head.weight": _head(w, wte, cfg),
         "norm_f.weight": w.take("ln_f.weight", C), "norm_f.bias": w.take("ln_f.bias", C)}
    for i in range(cfg.n_layer):
        p, q = f"h.{i}.", f"blocks.{i}."
        for hf_name, ours in (("ln_1", "norm1"), ("ln_2", "norm2")):
            s[q + ours + ".weight"] = w.take(p + hf_name + ".weight", C)
            s[q + ours + ".bias"] = w.take(p + hf_name + ".bias", C)
        # HF's Conv1D stores weights (in, out): the transpose of nn.Linear.
        for hf_name, ours, n_in, n_out in (("attn.c_attn", "attn.qkv", C, 3 * C), ("attn.c_proj", "attn.proj", C, C),
                                           ("mlp.c_fc", "mlp.fc", C, I), ("mlp.c_proj", "mlp.proj", I, C)):
            s[q + ours + ".weight"] = w.take(p + hf_name + ".weight", n_in, n_out).t().contiguous()
            s[q + ours + ".bias"] = w.take(p + hf_name + ".bias", n_out)
    return s


def _hf_to_llama(w: _Weights, cfg: GPTConfig, hf: dict[str, Any]) -> dict[str, torch.Tensor]:
    C, I = cfg.n_embd, cfg.intermediate_size
    wte = _pad_rows(w.take("embed_tokens.weight", cfg.vocab_size, C), cfg)
    s = {"wte.weight": wte, "lm_head.weight": _head(w, wte, cfg), "norm_f.weight": w.take("norm.weight", C)}
    attn_bias, mlp_bias = bool(hf.get("attention_bias")), bool(hf.get("mlp_bias"))
    q_rows, kv_rows, _ = _qkv_sizes(cfg)
    for i in range(cfg.n_layer):
        p, q = f"layers.{i}.", f"blocks.{i}."
        s[q + "norm1.weight"] = w.take(p + "input_layernorm.weight", C)
        s[q + "norm2.weight"] = w.take(p + "post_attention_layernorm.weight", C)
        for suffix in ("weight", "bias") if cfg.bias else ("weight",):
            def get(name: str, has_bias: bool, rows: int, cols: int) -> torch.Tensor:
                if suffix == "bias":
                    return w.take(f"{p}{name}.bias", rows) if has_bias else torch.zeros(rows)
                return w.take(f"{p}{name}.weight", rows, cols)
            qkv = [get(f"self_attn.{n}_proj", attn_bias, r, C) for n, r in zip("qkv", (q_rows, kv_rows, kv_rows))]
            s[f"{q}attn.qkv.{suffix}"] = torch.cat(qkv, dim=0)
            s[f"{q}attn.proj.{suffix}"] = get("self_attn.o_proj", attn_bias, C, q_rows)
            gate_up = [get(f"mlp.{n}_proj", mlp_bias, I, C) for n in ("gate", "up")]
            s[f"{q}mlp.fc.{suffix}"] = torch.cat(gate_up, dim=0)
            s[f"{q}mlp.proj.{suffix}"] = get("mlp.down_proj", mlp_bias, C, I)
    return s
