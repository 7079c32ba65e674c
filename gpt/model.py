"""The decoder-only Transformer: GPT-2 and Llama flavours from one GPTConfig.

    from gpt.config import GPTConfig
    from gpt.model import GPT
    model = GPT(GPTConfig.from_preset("tiny"))
    logits = model(idx)                       # (B, T, vocab_size)

The model knows nothing about data, distribution or logging; training objectives live
in gpt/objectives and the LightningModules. It takes optional `position_ids` and a
boolean `attn_mask` (True = may attend) so that left-padded batches, packed sequences
and the KV cache (gpt/generate.py) all run through the same forward.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gpt.config import GPTConfig


class KVCache:
    """Pre-allocated keys/values for every layer; `pos` is how many positions are filled."""

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's k/v at [pos, pos+T) and return all keys/values so far."""
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.max_len}")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def rope_cache(config: GPTConfig, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (length, head_dim) in the rotate-half layout that HF Llama uses."""
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, config.head_dim, 2, dtype=torch.float32) / config.head_dim))
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin: (B, 1, T, D). Rotate pairs (i, i + D/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def make_norm(config: GPTConfig, dim: int) -> nn.Module:
    if config.flavour == "gpt2":
        return nn.LayerNorm(dim, eps=config.norm_eps, bias=config.bias)
    return nn.RMSNorm(dim, eps=config.norm_eps)


class Attention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        # One fused projection for q, k and v: one GEMM instead of three.
        qkv_dim = (self.n_head + 2 * self.n_kv_head) * self.head_dim
        self.qkv = nn.Linear(config.n_embd, qkv_dim, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=config.norm_eps) if config.qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim, eps=config.norm_eps) if config.qk_norm else None

    def forward(self, x: torch.Tensor, rope: Optional[tuple[torch.Tensor, torch.Tensor]],
                attn_mask: Optional[torch.Tensor], cache: Optional[KVCache], layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        # No explicit mask and no cache prefix: the plain causal kernel is the fastest path.
        is_causal = attn_mask is None and k.size(2) == T and T > 1
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal,
            dropout_p=self.config.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.flavour = config.flavour
        hidden = config.intermediate_size
        if config.flavour == "gpt2":
            self.fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        else:  # SwiGLU: gate and up projections fused into one GEMM
            self.fc = nn.Linear(config.n_embd, 2 * hidden, bias=config.bias)
        self.proj = nn.Linear(hidden, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.flavour == "gpt2":
            return self.proj(F.gelu(self.fc(x), approximate="tanh"))
        gate, up = self.fc(x).chunk(2, dim=-1)
        return self.proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.norm1 = make_norm(config, config.n_embd)
        self.attn = Attention(config)
        self.norm2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope, attn_mask, cache, layer):
        x = x + self.dropout(self.attn(self.norm1(x), rope, attn_mask, cache, layer))
        return x + self.dropout(self.mlp(self.norm2(x)))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.padded_vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.flavour == "gpt2" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = make_norm(config, config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        if config.flavour == "llama":
            cos, sin = rope_cache(config, config.block_size)
            # Not persistent: derived from the config, so checkpoints stay weights-only.
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            self.init_parameter(name, p)

    def init_parameter(self, name: str, p: torch.Tensor) -> None:
        """N(0, 0.02) everywhere; residual projections scaled by 1/sqrt(2 * n_layer) (GPT-2).

        One parameter at a time, so a sharded build (ZeRO-3, gpt.zero) can gather each in turn.
        """
        std = self.config.init_std
        if name.endswith("bias"):
            nn.init.zeros_(p)
        elif "norm" in name:
            nn.init.ones_(p)
        elif name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
            nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.n_layer))
        else:
            nn.init.normal_(p, 0.0, std)

    def forward(self, idx: torch.Tensor, *, position_ids: Optional[torch.Tensor] = None,
                attn_mask: Optional[torch.Tensor] = None, cache: Optional[KVCache] = None,
                last_only: bool = False, select: Optional[torch.Tensor | tuple[torch.Tensor, torch.Tensor]] = None,
                hidden: bool = False) -> torch.Tensor:
        """Logits over the real (unpadded) vocabulary, shape (B, T, vocab_size).

        position_ids: (B, T) or (T,), defaults to cache.pos + arange(T).
        attn_mask: bool, broadcastable to (B, 1, T, S) where S = keys incl. the cache prefix.
        last_only: return logits for the last position only, (B, 1, V): prefill needs no more.
        select: bool (B, T): logits only where True, as (N, V) in row-major order; or a (rows,
            cols) pair of index tensors: logits at those N places, in that order. SFT scores
            the assistant tokens only (~15% of a chat row): the head and its softmax skip the rest.
        hidden: return the final (normed) hidden states, (B, T, n_embd), instead of logits: what a
            reward or value head reads (gpt/reward.py).
        """
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if position_ids is None:
            # Checked on Python ints: no device sync, no graph break under torch.compile.
            if start + T > self.config.block_size:
                raise ValueError(f"sequence of {start + T} positions is past block_size {self.config.block_size}")
            position_ids = torch.arange(start, start + T, device=idx.device)
        if position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0).expand(B, T)
        if attn_mask is None and start > 0 and T > 1:
            # A multi-token step after a cached prefix: causal with an offset.
            attn_mask = torch.ones(T, start + T, dtype=torch.bool, device=idx.device).tril(start)
        x = self.wte(idx)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(position_ids)
        else:
            rope = (self.rope_cos[position_ids].unsqueeze(1), self.rope_sin[position_ids].unsqueeze(1))
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            if self.config.activation_checkpointing and self.training:
                x = checkpoint(block, x, rope, attn_mask, cache, i, use_reentrant=False)
            else:
                x = block(x, rope, attn_mask, cache, i)
        if cache is not None:
            cache.pos += T
        if last_only:
            x = x[:, -1:]
        elif select is not None:
            x = x[select]
        x = self.norm_f(x)
        if hidden:
            return x
        # Only the first vocab_size rows: padded rows are never scored, so never sampled,
        # and the slice of a row-major weight is contiguous (no copy).
        w = self.lm_head.weight[: self.config.vocab_size]
        rows = x.numel() // x.size(-1)
        if rows <= 64 and not torch.is_grad_enabled():
            # Decode: on CPU, F.linear picks a slow small-M kernel for a few rows and a large
            # vocab; W @ x.T streams the weight once (+33-43% tokens/s at batch 8, docs/LOG.md).
            # One row would take BLAS's matrix-vector path, single-threaded (8 ms for a 50304 x 384
            # head on 2 cores, 3 ms as a 2-row product): pad it with a zero row.
            xs = x.reshape(rows, -1)
            if rows == 1:
                xs = torch.cat([xs, torch.zeros_like(xs)])
            return (w @ xs.mT)[:, :rows].mT.reshape(*x.shape[:-1], w.size(0))
        return F.linear(x, w)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (tied weights counted once)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.wte.weight.numel()
            if self.wpe is not None:
                n -= self.wpe.weight.numel()
        return n
