"""SFTModule: supervised fine-tuning of gpt.model.GPT on chat data, full or with LoRA adapters.

    python -m recipes.sft --config recipes/configs/sft-tiny-cpu.yaml \\
        --init_from runs/demo/pretrain/checkpoints/last.ckpt                    # the usual way in
    module = SFTModule(preset="tiny", model_config={...}, lr=1e-3, lora_r=8)     # LoRA instead of full

The causal-LM module (gpt.lm.CausalLMModule) on batches of gpt.sft_data.SFTDataModule: the
loss is the same summed cross-entropy, over the tokens the chat template's loss mask selects
(each assistant turn's content and its <|end|>; labels -100 elsewhere), divided by the
supervised-token count of the whole global batch (`num_targets_global`), so packing, padding,
gradient accumulation and world size do not change the gradient. Packed rows bring restarting
`position_ids` and a block-causal `attn_mask` (no attention across conversations), which
CausalLMModule.batch_logits passes to the model. The LM head runs only at the supervised
positions (`GPT.forward(select=...)`): a chat row is mostly prompt, and the head plus its
softmax over the vocabulary are a quarter of the tiny model's FLOPs, so a step costs ~25% less
for the same loss. Validation reports `val/loss` on the
assistant tokens of the held-out split; held-out exact-match through generation comes from
the gpt.chat_eval.ChatEval callback in the recipe config.

Weights come from `--init_from` (a pretrained checkpoint of any kind; a new run), loaded in
configure_model before anything wraps the model. With `lora_r > 0`, peft LoRA adapters are
then injected on the attention and MLP projections (gpt.lora) and only they train; the
checkpoint records the LoRA settings, so every loader (gpt sample, gpt chat, gpt export, the
next stage's --init_from) gets the merged model. Full fine-tuning (lora_r 0) is the default.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from gpt.lm import CausalLMModule, Preset
from gpt.lora import LoRAMixin
from gpt.objectives import IGNORE_INDEX, causal_lm_loss
from gpt.optim import Schedule


class SFTModule(LoRAMixin, CausalLMModule):
    """CausalLMModule for chat data, with optional LoRA.

    Args:
        preset, model_config, tokenizer, lr, weight_decay, betas, eps, schedule, warmup_steps,
            min_lr_ratio, decay_fraction, compile: as gpt.lm.CausalLMModule (model_config must
            describe the --init_from checkpoint's shape).
        lora_r: LoRA rank; 0 = full fine-tuning (every weight trains).
        lora_alpha: LoRA scale numerator (the update is alpha / r * B A).
        lora_dropout: dropout on the adapters' input.
        lora_targets: projections that get adapters, from attn.qkv, attn.proj, mlp.fc, mlp.proj.
    """

    def __init__(self, preset: Preset = "tiny", model_config: Optional[dict[str, Any]] = None,
                 tokenizer: Optional[str] = None, lr: float = 1e-4, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, schedule: Schedule = "cosine",
                 warmup_steps: int = 10, min_lr_ratio: float = 0.1, decay_fraction: float = 0.2,
                 compile: bool = False, lora_r: int = 0, lora_alpha: float = 16.0, lora_dropout: float = 0.0,
                 lora_targets: Optional[list[str]] = None):
        super().__init__(preset=preset, model_config=model_config, tokenizer=tokenizer, lr=lr,
                         weight_decay=weight_decay, betas=betas, eps=eps, schedule=schedule,
                         warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio, decay_fraction=decay_fraction,
                         compile=compile)
        self.init_lora(lora_r, lora_alpha, lora_dropout, lora_targets)

    def batch_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The causal-LM loss with logits computed at the supervised positions only."""
        labels = batch["labels"]
        targets = labels != IGNORE_INDEX
        logits = self.batch_logits(batch, select=targets)  # (N, V)
        return causal_lm_loss(logits[None], labels[targets][None])
