"""Model configuration: one typed dataclass for both flavours, plus named presets.

    from gpt.config import GPTConfig
    cfg = GPTConfig.from_preset("tiny")            # or "gpt2-124m", "llama-1b", ...
    cfg = GPTConfig.from_preset("tiny", vocab_size=4096)

Two flavours share one model (see gpt/model.py):
- "gpt2":  learned positions, LayerNorm, tanh-GELU MLP, biases, tied embeddings;
- "llama": RoPE, RMSNorm, SwiGLU MLP, grouped-query attention, optional QK-norm, untied.
Fields left as None take the flavour's default in __post_init__, so a preset only says
what differs. The config is plain data (ints, floats, strings) so it can be written to
JSON, YAML and Lightning checkpoints and read back with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, Optional

Flavour = Literal["gpt2", "llama"]


@dataclass
class GPTConfig:
    flavour: Flavour = "gpt2"
    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_kv_head: Optional[int] = None  # grouped-query attention; None = n_head (plain MHA)
    intermediate_size: Optional[int] = None  # MLP hidden width; None = flavour default
    bias: Optional[bool] = None  # Linear/LayerNorm biases; gpt2 True, llama False
    tie_embeddings: Optional[bool] = None  # gpt2 True, llama False
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    qk_norm: bool = False  # RMSNorm on per-head queries and keys (llama flavour only)
    dropout: float = 0.0
    init_std: float = 0.02
    activation_checkpointing: bool = False
    vocab_multiple: int = 64  # embedding rows are padded to this multiple for fast GEMMs

    def __post_init__(self) -> None:
        if self.flavour not in ("gpt2", "llama"):
            raise ValueError(f"flavour must be 'gpt2' or 'llama', got {self.flavour!r}")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.bias is None:
            self.bias = self.flavour == "gpt2"
        if self.tie_embeddings is None:
            self.tie_embeddings = self.flavour == "gpt2"
        if self.intermediate_size is None:
            if self.flavour == "gpt2":
                self.intermediate_size = 4 * self.n_embd
            else:  # SwiGLU: 2/3 of 4x keeps the parameter count of a 4x GELU MLP
                self.intermediate_size = _round_up(int(8 * self.n_embd / 3), 64)
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        if self.flavour == "gpt2" and (self.n_kv_head != self.n_head or self.qk_norm):
            raise ValueError("grouped-query attention and qk_norm belong to the llama flavour")
        if self.flavour == "llama" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return _round_up(self.vocab_size, self.vocab_multiple)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GPTConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown model config field(s): {', '.join(unknown)}")
        return cls(**d)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "GPTConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


def _round_up(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)


# Shapes follow the published models: GPT-2 (Radford et al. 2019), TinyLlama-1.1B for
# llama-1b, Llama-2-7B for llama-7b.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(flavour="gpt2", vocab_size=4096, block_size=128, n_layer=2, n_head=4, n_embd=64),
    "tiny-llama": dict(flavour="llama", vocab_size=4096, block_size=128, n_layer=2, n_head=4,
                       n_kv_head=2, n_embd=64, intermediate_size=192),
    "gpt2-124m": dict(flavour="gpt2", vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),
    "gpt2-350m": dict(flavour="gpt2", vocab_size=50257, block_size=1024, n_layer=24, n_head=16, n_embd=1024),
    "gpt2-774m": dict(flavour="gpt2", vocab_size=50257, block_size=1024, n_layer=36, n_head=20, n_embd=1280),
    "gpt2-1.5b": dict(flavour="gpt2", vocab_size=50257, block_size=1024, n_layer=48, n_head=25, n_embd=1600),
    "llama-1b": dict(flavour="llama", vocab_size=32000, block_size=2048, n_layer=22, n_head=32,
                     n_kv_head=4, n_embd=2048, intermediate_size=5632, norm_eps=1e-5),
    "llama-7b": dict(flavour="llama", vocab_size=32000, block_size=4096, n_layer=32, n_head=32,
                     n_kv_head=32, n_embd=4096, intermediate_size=11008, norm_eps=1e-5),
}
