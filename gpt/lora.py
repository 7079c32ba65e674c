"""LoRA adapters on gpt.model.GPT through `peft`: add them for training, merge them for export.

    from gpt.lora import LoRASettings, add_lora, merge_lora, merged_model
    settings = LoRASettings(r=8, alpha=16, dropout=0.05)       # targets: the four projections
    add_lora(model, settings)       # in place: peft LoRA layers; only lora_A / lora_B train
    plain = merge_lora(model, settings)    # a new GPT with W + (alpha / r) B A and no adapters

    python -m recipes.sft --config recipes/configs/sft-tiny-cpu.yaml --model.lora_r 8   # LoRA SFT

The adapters are peft's own (`LoraConfig` + `inject_adapter_in_model` on our plain nn.Module),
on the attention and MLP projections of every block: `attn.qkv`, `attn.proj`, `mlp.fc`,
`mlp.proj` (TARGETS). The injected layers keep their base weight as `<name>.base_layer.weight`
and add `<name>.lora_A.default.weight` / `<name>.lora_B.default.weight`; every other parameter
is frozen (requires_grad False, so never in the optimizer). B starts at zero: before the first
step the adapted model computes exactly the base model.

A checkpoint of a LoRA run holds the whole adapted state dict plus checkpoint["gpt"]["lora"] =
`LoRASettings.to_dict()`; gpt.checkpoint.load_model sees that entry and returns the merged
plain GPT (`merged_model`: a fresh GPT, peft's LoraModel over it, the state loaded strictly, then
peft's `merge_and_unload`). So `gpt sample`, `gpt chat`, `gpt export` and `--init_from` of a
later stage all see an ordinary model. peft is an optional dependency (the `lora` extra):
without it a LoRA run stops with one line saying how to install it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch

from gpt.config import GPTConfig
from gpt.model import GPT

TARGETS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
ADAPTER = "default"  # peft's adapter name; it appears in the state-dict keys
MISSING_PEFT = "LoRA needs the peft package: pip install 'gpt-pipeline[lora]' (or pip install peft)"


@dataclass
class LoRASettings:
    """rank r, scale alpha / r, dropout on the adapter input, the projections that get adapters."""
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(TARGETS))

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"lora r must be an integer >= 1, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"lora alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout!r}")
        self.targets = list(self.targets)
        unknown = [t for t in self.targets if t not in TARGETS]
        if not self.targets or unknown:
            raise ValueError(f"lora targets must be one or more of {', '.join(TARGETS)}, got {self.targets!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LoRASettings":
        return cls(**{k: d[k] for k in ("r", "alpha", "dropout", "targets") if k in d})


def _peft():
    try:
        import peft
    except ImportError:
        raise ImportError(MISSING_PEFT) from None
    return peft


def peft_config(settings: LoRASettings) -> Any:
    peft = _peft()
    return peft.LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                           target_modules=list(settings.targets), bias="none")


def add_lora(model: GPT, settings: LoRASettings) -> GPT:
    """Inject peft LoRA layers into `model` in place and freeze everything but the adapters."""
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters")
    peft = _peft()
    model = peft.inject_adapter_in_model(peft_config(settings), model, adapter_name=ADAPTER)
    # peft leaves its config on the module; a GPT stays a plain GPT (nothing extra to pickle).
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model


def has_lora(model: torch.nn.Module) -> bool:
    return any(".lora_A." in n for n, _ in model.named_parameters())


def is_lora_state(state: dict[str, Any]) -> bool:
    return any(".lora_A." in k or ".base_layer." in k for k in state)


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def merged_model(config: GPTConfig, state: dict[str, torch.Tensor], settings: LoRASettings,
                 dtype: Optional[torch.dtype] = None) -> GPT:
    """A plain GPT from an adapted state dict: peft's LoraModel + load + merge_and_unload."""
    peft = _peft()
    model = GPT(config)
    tuner = peft.tuners.lora.LoraModel(model, peft_config(settings), ADAPTER)
    if config.tie_embeddings and "lm_head.weight" not in state and "wte.weight" in state:
        state = {**state, "lm_head.weight": state["wte.weight"]}
    missing, unexpected = tuner.model.load_state_dict(state, strict=False)
    if missing or unexpected:
        names = ", ".join((missing + unexpected)[:4])
        raise ValueError(f"the LoRA checkpoint does not match its model config and lora settings ({names})")
    plain = tuner.merge_and_unload()
    if hasattr(plain, "peft_config"):
        del plain.peft_config
    if config.tie_embeddings:
        plain.lm_head.weight = plain.wte.weight
    return plain if dtype is None else plain.to(dtype)


def merge_lora(model: GPT, settings: LoRASettings) -> GPT:
    """A new plain GPT computing what the adapted `model` computes (its weights untouched)."""
    state = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    return merged_model(model.config, state, settings)


def merged_state(meta: dict[str, Any], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The plain GPT state of a checkpoint: adapters merged when checkpoint["gpt"] has "lora".

    What gpt.checkpoint.load_model calls on every Lightning and DeepSpeed checkpoint; a state
    without adapters comes back as it is.
    """
    settings = meta.get("lora")
    if not settings:
        if is_lora_state(state):
            raise ValueError("holds LoRA adapter weights but no checkpoint['gpt']['lora'] settings")
        return state
    config = GPTConfig.from_dict(dict(meta["model_config"]))
    plain = merged_model(config, state, LoRASettings.from_dict(settings)).state_dict()
    if config.tie_embeddings:
        plain.pop("lm_head.weight", None)  # re-tied by the loader
    return plain


class LoRAMixin:
    """LoRA for a gpt.lm.CausalLMModule subclass (SFT, DPO): set `self.lora` with `init_lora` in
    __init__, then `configure_model` injects the adapters after the base weights are in (so a fresh
    run's --init_from weights become the base layers), `run_identity` records the LoRA shape (a
    resume must adapt the same projections the same way), and checkpoints carry the settings that
    gpt.checkpoint.load_model merges with. Put it before the module class in the bases."""

    lora: Optional[LoRASettings] = None

    def init_lora(self, r: int, alpha: float, dropout: float, targets: Optional[list[str]]) -> None:
        if r < 0:
            raise ValueError(f"model.lora_r must be >= 0 (0 = full fine-tuning), got {r}")
        self.lora = LoRASettings(r, alpha, dropout, list(targets or TARGETS)) if r else None

    def run_identity(self) -> dict[str, Any]:
        lora = self.lora
        return {**super().run_identity(), "model.lora_r": lora.r if lora else 0,  # type: ignore[misc]
                "model.lora_alpha": lora.alpha if lora else None, "model.lora_targets": lora.targets if lora else None}

    def configure_model(self) -> None:
        if getattr(self, "model", None) is not None:
            return
        super().configure_model()  # type: ignore[misc]  # the GPT, with --init_from's weights on a fresh run
        if self.lora is not None:
            from lightning.pytorch.utilities import rank_zero_info

            add_lora(self.model, self.lora)  # type: ignore[attr-defined]
            trainable, total = trainable_parameters(self.model)  # type: ignore[attr-defined]
            rank_zero_info(f"LoRA r={self.lora.r} alpha={self.lora.alpha:g} on {', '.join(self.lora.targets)}: "
                           f"{trainable:,} of {total:,} parameters train ({100 * trainable / total:.2f}%)")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]
        if self.lora is not None:  # how gpt.checkpoint.load_model merges the adapters
            checkpoint["gpt"]["lora"] = self.lora.to_dict()

