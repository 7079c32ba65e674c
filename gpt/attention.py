"""`gpt attention`: what each head looks at, as heat maps and as a named pattern per head.

    gpt attention --checkpoint runs/demo/pretrain/checkpoints/last.ckpt \
                  --prompt "ROMEO: But soft, what light" [--layer 0] [--head 1] [--out runs/attention]

    from gpt.attention import attention_maps, classify
    maps = attention_maps(model, ids)            # (n_layer, n_head, T, T), rows = queries, sum to 1
    scores = classify(maps[0, 1], ids, delimiters)  # {"previous": 0.93, "first": 0.02, ...}

The weights are computed on an explicit path, softmax(q k^T / sqrt(d)) under the causal mask, from
each layer's own q and k: a forward hook on every `Attention` module records its input and the
RoPE tables it was given, and the q/k projection, QK-norm, RoPE and GQA sharing are re-applied
with the module's weights. gpt/model.py's forward (SDPA) is untouched; tests/test_attention.py
checks that weights @ V, through the layer's output projection, equals what the layer returned.

Patterns (score = mean over query rows of the attention mass on the pattern's key positions;
rows without such a position are left out; row 0 is left out, it can only attend to itself):
- previous: the token before (i - 1);        self: the token itself (i);
- first: position 0 (an attention sink);     delimiter: newline, punctuation and special tokens;
- same: earlier occurrences of the same token id;
- induction: the tokens that followed earlier occurrences of the current token ("the next token");
- broad: spread evenly (the mass shared with the uniform distribution over positions <= i).
"""
from __future__ import annotations

import math
import unicodedata
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from gpt.model import GPT, apply_rope

PATTERNS = ("previous", "self", "first", "delimiter", "same", "induction", "broad")


# ---- the weights ----------------------------------------------------------------------------
def _layer_weights(attn: torch.nn.Module, x: torch.Tensor, rope: Optional[tuple[torch.Tensor, torch.Tensor]],
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights (B, n_head, T, T), values (B, n_head, T, head_dim)) of one Attention module's forward."""
    B, T, _ = x.shape
    nh, nkv, hd = attn.n_head, attn.n_kv_head, attn.head_dim
    q, k, v = attn.qkv(x).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
    q = q.view(B, T, nh, hd).transpose(1, 2)
    k = k.view(B, T, nkv, hd).transpose(1, 2)
    v = v.view(B, T, nkv, hd).transpose(1, 2)
    if attn.q_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    if nkv != nh:  # grouped-query attention: each kv head serves n_head / n_kv_head query heads
        k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(hd)
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    weights = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
    return weights, v.float()


@torch.no_grad()
def capture(model: GPT, ids: torch.Tensor) -> list[dict[str, Any]]:
    """Run the model once on ids (B, T) and return, per layer, the Attention module's input x, its
    RoPE tables and its output (what SDPA + proj produced), recorded by forward hooks."""
    records: list[dict[str, Any]] = []

    def hook(module, args, output):
        x, rope, attn_mask, cache = args[:4]
        if attn_mask is not None or cache is not None:
            raise ValueError("attention maps are computed for a plain causal forward (no mask, no cache)")
        records.append({"module": module, "x": x, "rope": rope, "output": output})

    handles = [block.attn.register_forward_hook(hook) for block in model.blocks]
    try:
        model(ids)
    finally:
        for h in handles:
            h.remove()
    return records


@torch.no_grad()
def attention_maps(model: GPT, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Attention weights of every layer and head for one sequence: (n_layer, n_head, T, T), fp32."""
    ids = torch.as_tensor(ids, dtype=torch.long, device=next(model.parameters()).device).reshape(1, -1)
    if ids.size(1) > model.config.block_size:
        raise ValueError(f"the prompt is {ids.size(1)} tokens; the model's block_size is {model.config.block_size}")
    was_training = model.training
    model.eval()  # dropout off: the weights shown are the ones inference uses
    try:
        records = capture(model, ids)
    finally:
        model.train(was_training)
    return torch.stack([_layer_weights(r["module"], r["x"], r["rope"])[0][0] for r in records])


# ---- patterns -------------------------------------------------------------------------------
def delimiter_ids(tokenizer: Any, ids: Sequence[int]) -> set[int]:
    """Ids among `ids` whose text is whitespace, punctuation only, or a special token."""
    special = set(getattr(tokenizer, "special_ids", {}).values())
    out = set()
    for i in set(ids):
        text = tokenizer.decode([i]).strip()
        if i in special or not text or all(unicodedata.category(c).startswith("P") for c in text):
            out.add(i)
    return out


def pattern_masks(ids: Sequence[int], delimiters: set[int] = frozenset()) -> dict[str, torch.Tensor]:
    """(T, T) boolean key masks per pattern (not 'broad', which compares with the uniform)."""
    T = len(ids)
    t = torch.as_tensor(list(ids))
    i = torch.arange(T).unsqueeze(1)
    j = torch.arange(T).unsqueeze(0)
    causal = j <= i
    prev_tok = torch.cat([torch.full((1,), -1, dtype=t.dtype), t[:-1]])  # the token before each position
    return {
        "previous": j == i - 1,
        "self": j == i,
        "first": (j == 0).expand(T, T),
        "delimiter": causal & torch.isin(t, torch.tensor(sorted(delimiters), dtype=t.dtype)).unsqueeze(0),
        "same": (j < i) & (t.unsqueeze(0) == t.unsqueeze(1)),
        "induction": (j < i) & (j > 0) & (prev_tok.unsqueeze(0) == t.unsqueeze(1)),
    }


def classify(weights: torch.Tensor, ids: Sequence[int], delimiters: set[int] = frozenset()) -> dict[str, float]:
    """Score of every pattern for one head's (T, T) weights: mean attention mass on the pattern's
    positions over the query rows that have one (NaN when no row has); rows 1..T-1."""
    w = weights.float()[1:]
    scores = {}
    for name, mask in pattern_masks(ids, delimiters).items():
        mask = mask[1:]
        rows = mask.any(dim=1)
        scores[name] = float((w * mask).sum(dim=1)[rows].mean()) if rows.any() else float("nan")
    T = w.size(1)
    uniform = torch.ones_like(w).tril(1) / torch.arange(2, T + 1).unsqueeze(1)  # row i: 1/(i+1) on j <= i
    scores["broad"] = float(torch.minimum(w, uniform).sum(dim=1).mean())
    return scores


def best_pattern(scores: dict[str, float]) -> tuple[str, float]:
    known = {k: v for k, v in scores.items() if not math.isnan(v)}
    name = max(known, key=known.get)
    return name, known[name]


def pattern_table(maps: torch.Tensor, ids: Sequence[int], delimiters: set[int] = frozenset(),
                  layers: Optional[Sequence[int]] = None, heads: Optional[Sequence[int]] = None) -> str:
    """Layer, head, best pattern and its score, then every pattern's score."""
    head = ["layer", "head", "pattern", "score", *PATTERNS]
    rows = [head]
    for L in layers if layers is not None else range(maps.size(0)):
        for H in heads if heads is not None else range(maps.size(1)):
            s = classify(maps[L, H], ids, delimiters)
            name, score = best_pattern(s)
            rows.append([str(L), str(H), name, f"{score:.2f}",
                         *("-" if math.isnan(s[p]) else f"{s[p]:.2f}" for p in PATTERNS)])
    widths = [max(len(r[c]) for r in rows) for c in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)


# ---- pictures -------------------------------------------------------------------------------
def token_labels(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Each token's text, with whitespace made visible (a newline is shown as \\n)."""
    labels = []
    for i in ids:
        text = tokenizer.decode([i]) if tokenizer is not None else str(i)
        labels.append(text.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "·") or f"<{i}>")
    return labels


def heatmaps(weights: torch.Tensor, labels: Sequence[str], title: str, panel_titles: Sequence[str]) -> Any:
    """A figure with one heat map per (T, T) matrix in weights (N, T, T): keys across, queries down."""
    from gpt.plots import _pyplot

    plt = _pyplot()
    n, T = weights.size(0), weights.size(-1)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    side = min(max(3.0, 0.22 * T + 1.0), 9.0)
    fig, axes = plt.subplots(rows, cols, figsize=(side * cols, side * rows), squeeze=False)
    step = max(1, math.ceil(T / 48))  # at most ~48 tick labels per axis stay readable
    for k, ax in enumerate(axes.flat):
        if k >= n:
            ax.remove()
            continue
        ax.imshow(weights[k].cpu().numpy(), cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(panel_titles[k], fontsize=9)
        ticks = list(range(0, T, step))
        ax.set_xticks(ticks, [labels[t] for t in ticks], rotation=90, fontsize=7)
        ax.set_yticks(ticks, [labels[t] for t in ticks], fontsize=7)
        ax.set_xlabel("key (attended to)", fontsize=8)
        ax.set_ylabel("query", fontsize=8)
    fig.suptitle(title)
    return fig


def attention(checkpoint: str, prompt: str, layer: Optional[int] = None, head: Optional[int] = None,
              out: str = "runs/attention", device: str = "cpu", tokenizer: Optional[str] = None) -> None:
    """Heat maps of a prompt's attention weights and the pattern each head matches best.

    Args:
        checkpoint: a .ckpt file, a DeepSpeed checkpoint dir, a native export or an HF directory.
        prompt: the text whose attention is drawn.
        layer: only this layer (default: every layer, one PNG each).
        head: only this head (default: every head, a grid per layer).
        out: directory for the PNGs (layerLL.png, or layerLL_headHH.png with --head).
        device: cpu or cuda.
        tokenizer: a tokenizer.json overriding the checkpoint's.
    """
    from gpt.checkpoint import CheckpointError, check_vocab, load_model, load_tokenizer
    from gpt.plots import save_figure

    override = load_tokenizer(tokenizer) if tokenizer is not None else None
    model, tok = load_model(checkpoint, device=device)
    if override is not None:  # ids past the model's vocabulary would index out of its embedding
        check_vocab(override, model.config, f"--tokenizer {tokenizer}")
        tok = override
    if tok is None:
        raise CheckpointError(f"{checkpoint}: holds no tokenizer; pass --tokenizer PATH")
    ids = tok.encode(prompt)
    if len(ids) < 2:
        raise ValueError(f"the prompt is {len(ids)} token(s); attention needs at least 2")
    cfg = model.config
    for name, value, n in (("layer", layer, cfg.n_layer), ("head", head, cfg.n_head)):
        if value is not None and not 0 <= value < n:
            raise ValueError(f"--{name} {value} is out of range: the model has {n} ({name}s 0..{n - 1})")
    maps = attention_maps(model, ids)
    layers = [layer] if layer is not None else list(range(cfg.n_layer))
    heads = [head] if head is not None else list(range(cfg.n_head))
    labels, delims = token_labels(tok, ids), delimiter_ids(tok, ids)
    for L in layers:
        title = f"{Path(checkpoint).name}: layer {L}" + (f", head {head}" if head is not None else "")
        names = [f"head {H}: {best_pattern(classify(maps[L, H], ids, delims))[0]}" for H in heads]
        fig = heatmaps(maps[L, heads], labels, title, names)
        name = f"layer{L:02d}" + (f"_head{head:02d}" if head is not None else "")
        print(save_figure(fig, Path(out) / f"{name}.png"))
    print(pattern_table(maps, ids, delims, layers, heads))
