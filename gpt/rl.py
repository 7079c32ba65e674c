"""RLModule: online RL from feedback on gpt.model.GPT, GRPO or PPO, as a LightningModule.

    python -m recipes.rl --config recipes/configs/rl-tiny-cpu.yaml --init_from runs/demo/sft/checkpoints/last.ckpt
    module = RLModule(algorithm="grpo", group_size=8, max_new_tokens=24, kl_coef=0.04, lr=1e-5)

One training step = one rollout: this rank's prompts (gpt.prompt_data) are each answered
`group_size` times by the policy through the KV-cache generator (gpt.rollout.sample_rollout:
batched, left-padded, stopping at the chat template's end of turn), the responses are scored,
and the policy takes `ppo_epochs x num_minibatches` optimizer steps on them (manual optimization:
Lightning counts each as a global step, so trainer.max_steps = rollouts x that product).

Rewards: the verifiable reward function `reward_fn(row, reply) -> float` (the demo task's exact
match, gpt.demo_task.reward), the frozen reward model's score (gpt.reward, read at the response's
last token), or `verifier_weight x verifier + rm_weight x rm`; minus `length_penalty` per response
token and `truncation_penalty` for a response that never ended its turn.

GRPO (Shao et al. 2024): advantages are each response's reward normalized within its prompt's
group (gpt.rl_losses.group_advantages); no value model; the loss is PPO's clipped surrogate with
the response's advantage on every token plus kl_coef x the k3 estimate of KL(policy || reference).
Guidance (model.guide, off-policy guidance as in LUFFY; Yan et al. 2025): a group in which no
response earns a verifier reward gives GRPO equal rewards, hence no gradient, however often the
prompt is drawn; with guide on, its last response is replaced by the row's reference answer, which
then is the group's one rewarded response. On the demo this is what lets RL teach the questions
the SFT model never answers right (docs/LOG.md, 2026-11-29 night).
PPO (InstructGPT; Ouyang et al. 2022): a critic (GPT backbone + scalar head, initialized from
the reward model, trained) gives per-token values; the per-token reward is -kl_coef x (log pi -
log pi_ref), plus the sequence reward at the last token; advantages by GAE (gamma, lam), whitened;
clipped policy and clipped value losses; kl_coef fixed or adaptive (Ziegler et al. 2019).

Log-probs for the ratio are recomputed by a forward pass of the policy on the sampled tokens with
the sampler's positions and mask (gpt.rollout), never taken from the sampler. The policy runs
without dropout (forced to 0: dropout would make the ratio noise). Losses are token sums divided
by the weighted token count of the global minibatch (loss_norm "token"), or per-response means
averaged over the global minibatch's responses ("sequence").

Frozen models (the reference = the --init_from weights unless model.reference says otherwise, and
the reward model) are never registered as submodules: not in the optimizer, not in checkpoints,
built on first use (after a resume restored where the reference came from), in eval mode with
requires_grad off. Under ZeRO-3 each is partitioned by its own DeepSpeed inference engine (its
layers gathered once per forward), and rollouts are sampled from a gathered copy of the policy
(`generation_model`), refreshed once per rollout before the training step (outside the engine's
forward, where ZeRO-3's prefetcher may hold parameters in flight): sampling never gathers layers
token by token.

Resume is exact: the prompt order is a function of (data seed, rollout), the sampling seed of
(model.seed, rollout, rank), the minibatch order of (model.seed, rollout, epoch, rank), and the
adaptive KL coefficient is checkpointed.
"""
from __future__ import annotations

import importlib
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional

import lightning as L
import torch

from gpt.chat import ChatTemplate
from gpt.config import GPTConfig
from gpt.lm import log_at_step
from gpt.model import GPT
from gpt.optim import LRSchedule, Schedule, param_groups
from gpt.rl_metrics import RolloutMetrics
from gpt.rl_models import begin_micro_step, check_frozen_sources, freeze, gathered_copy, same_weights
from gpt.rl_losses import (AdaptiveKLController, KLEstimator, gae, global_whiten, group_advantages, grpo_loss,
                           kl_estimate, ppo_policy_loss, value_loss)
from gpt.run import load_initial_weights, model_identity
from gpt.rollout import (Rollout, derive_seed, forward_rollout, last_token_index, replace_responses,
                         response_logprobs, response_values, sample_rollout)
from gpt.tokenizer import Tokenizer

Algorithm = Literal["grpo", "ppo"]


def load_reward_fn(spec: str) -> Callable[[dict, str], float]:
    """'package.module:function' -> the function (the user's own config names it, like a class_path)."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"model.reward_fn {spec!r}: expected 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"model.reward_fn {spec!r}: {e}") from None
    if not callable(fn):
        raise ValueError(f"model.reward_fn {spec!r} is not callable")
    return fn


@dataclass
class Experience:
    """One rollout, scored: what the optimization epochs read (per-token tensors are (N, R))."""
    ro: Rollout
    rows: list[dict]
    rewards: torch.Tensor              # (N,) total reward
    verifier: Optional[torch.Tensor]   # (N,) reward_fn, or None
    rm: Optional[torch.Tensor]         # (N,) reward model score, or None
    weights: torch.Tensor              # (N, R) loss weight per token
    old_logp: Optional[torch.Tensor]   # None: one optimizer step per rollout (the ratio's denominator = logp.detach())
    ref_logp: torch.Tensor
    advantages: torch.Tensor           # GRPO (N,), PPO (N, R)
    returns: Optional[torch.Tensor] = None
    old_values: Optional[torch.Tensor] = None
    guided: int = 0                    # groups whose last response is the row's reference answer (model.guide)


class RLModule(RolloutMetrics, L.LightningModule):
    """GRPO or PPO on a GPT policy; see the module docstring.

    Args:
        algorithm: grpo (group-normalized advantages, KL as a loss term, no critic) or ppo (critic,
            GAE, KL penalty in the reward).
        preset, model_config: the policy's shape (must match the --init_from checkpoint).
        tokenizer: tokenizer.json (linked from data.tokenizer): the chat template's ids, decoding.
        reference: the frozen reference's checkpoint; None = the --init_from checkpoint.
        reward_model: a reward model checkpoint (recipes/reward.py); None = no RM reward.
        critic: PPO's critic initialization; None = the reward model (else the policy's weights with
            a zero head).
        reward_fn: 'module:function' called as fn(row, reply_text) -> float (None: no verifier).
        verifier_weight, rm_weight: the reward = their weighted sum.
        length_penalty: subtracted per response token. truncation_penalty: subtracted from a response
            that ran to max_new_tokens without ending its turn.
        group_size: responses sampled per prompt (GRPO's G; PPO may use 1).
        max_new_tokens, temperature, top_k, top_p: sampling (temperature > 0).
        generation_batch_size: sequences per generate call (None: the whole rollout at once).
        kl_coef: GRPO: beta of the KL loss term; PPO: the per-token KL penalty's initial coefficient.
        kl_estimator: GRPO's KL term (k3: unbiased and >= 0).
        adaptive_kl, kl_target, kl_horizon: PPO's adaptive coefficient (target KL per response, in nats).
        clip_eps: the policy ratio's clip range. value_clip: the value clip range. vf_coef: the value
            loss's weight. gamma, lam: GAE. whiten_advantages: PPO advantages whitened over the global batch.
        scale_advantages: GRPO divides by the group's std (False: mean-centred only, Dr. GRPO).
        guide: off-policy guidance: in a group where no response earns a verifier reward > 0, the last
            response is replaced by the row's reference answer (its "answer"; rows without one, or with
            one longer than max_new_tokens allows, are left alone) before the advantages are computed.
            Logged as train/guided.
        loss_norm: token (sum over the minibatch's tokens / their count) or sequence (per-response means).
        ppo_epochs, num_minibatches: passes over each rollout, optimizer steps per pass.
        micro_batch_size: sequences per forward/backward (None: the whole minibatch).
        lr, critic_lr, weight_decay, betas, eps, schedule, warmup_steps, min_lr_ratio, decay_fraction:
            AdamW and its schedule over trainer.max_steps optimizer steps (critic_lr None = lr).
        gradient_clip_val: global-norm clipping (manual optimization clips itself; 0 = off).
        seed: seed of the sampling and minibatch streams (combined with the rollout and rank).
        val_max_new_tokens: reply limit at validation (None: max_new_tokens).
        table_rows, table_every: sampled responses logged to a W&B table every table_every rollouts.
    """

    init_from: Optional[str] = None  # set by the recipe (--init_from) on a fresh run

    def __init__(self, algorithm: Algorithm = "grpo", preset: str = "tiny", model_config: Optional[dict[str, Any]] = None,
                 tokenizer: Optional[str] = None, reference: Optional[str] = None, reward_model: Optional[str] = None,
                 critic: Optional[str] = None, reward_fn: Optional[str] = "gpt.demo_task:reward",
                 verifier_weight: float = 1.0, rm_weight: float = 1.0, length_penalty: float = 0.0,
                 truncation_penalty: float = 0.0, group_size: int = 8, max_new_tokens: int = 32,
                 temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 generation_batch_size: Optional[int] = None, kl_coef: float = 0.04, kl_estimator: KLEstimator = "k3",
                 adaptive_kl: bool = False, kl_target: float = 6.0, kl_horizon: int = 10000, clip_eps: float = 0.2,
                 value_clip: float = 0.2, vf_coef: float = 0.1, gamma: float = 1.0, lam: float = 0.95,
                 whiten_advantages: bool = True, scale_advantages: bool = True, guide: bool = False,
                 loss_norm: Literal["token", "sequence"] = "token", ppo_epochs: int = 1, num_minibatches: int = 1,
                 micro_batch_size: Optional[int] = None, lr: float = 1e-5, critic_lr: Optional[float] = None,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 schedule: Schedule = "constant", warmup_steps: int = 0, min_lr_ratio: float = 0.1,
                 decay_fraction: float = 0.2, gradient_clip_val: float = 1.0, seed: int = 0,
                 val_max_new_tokens: Optional[int] = None, table_rows: int = 8, table_every: int = 10):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.automatic_optimization = False
        if algorithm not in ("grpo", "ppo"):
            raise ValueError(f"model.algorithm must be grpo or ppo, got {algorithm!r}")
        for name, value, low in (("group_size", group_size, 1), ("max_new_tokens", max_new_tokens, 1),
                                 ("ppo_epochs", ppo_epochs, 1), ("num_minibatches", num_minibatches, 1)):
            if value < low:
                raise ValueError(f"model.{name} must be >= {low}, got {value}")
        if temperature <= 0:
            raise ValueError(f"model.temperature must be > 0 (RL samples its responses), got {temperature}")
        if algorithm == "grpo" and group_size < 2:
            raise ValueError("GRPO compares responses within a group: model.group_size must be >= 2")
        if reward_fn is None and reward_model is None:
            raise ValueError("no reward: set model.reward_fn (a verifier) and/or model.reward_model")
        if guide and reward_fn is None:
            raise ValueError("model.guide replaces a reply in groups the verifier rewards nowhere: set model.reward_fn")
        if guide and group_size < 2:  # a "group" of one: every wrong reply would become the reference (plain SFT)
            raise ValueError("model.guide needs model.group_size >= 2: it replaces one reply of a group with no right one")
        # Dropout would make log pi(a) at sampling and at training two different random variables.
        self.config = GPTConfig.from_preset(preset, **{**(model_config or {}), "dropout": 0.0})
        self.tokenizer_json = Tokenizer.from_file(tokenizer).to_str() if tokenizer else None
        self.steps_per_rollout = ppo_epochs * num_minibatches
        self.gradient_clip_val = gradient_clip_val  # read by gpt.zero.ZeroStrategy (DeepSpeed clips inside its step)
        self.reward_fn = load_reward_fn(reward_fn) if reward_fn else None
        self.kl = AdaptiveKLController(kl_coef, kl_target, kl_horizon) if adaptive_kl else None
        self.model: Optional[GPT] = None
        self.critic: Optional[torch.nn.Module] = None
        self.reference_path: Optional[str] = reference
        # Not submodules (a plain dict): never in the optimizer, the checkpoint or a strategy's wrapping.
        self._frozen: dict[str, Any] = {}  # "reference", "reward"
        self._fingerprints: dict[str, str] = {}  # theirs: recorded in each checkpoint, checked on resume
        self._aux: dict[str, Any] = {}     # "generation": ZeRO-3's gathered policy copy, "val": the model validation samples
        self._tok: Optional[Tokenizer] = None
        self._template: Optional[ChatTemplate] = None
        self._val: Optional[torch.Tensor] = None
        self.last_experience: Optional[Experience] = None
        self._gen_s = 0.0
        self._step_loss = torch.zeros(())  # read by gpt.callbacks.NonFiniteGuard

    # ---- models -------------------------------------------------------------------------
    @property
    def kl_coef(self) -> float:
        return self.kl.value if self.kl is not None else self.hparams.kl_coef

    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.model = GPT(self.config)
        if self.init_from:  # a new run from the SFT weights (recipes/cli.py sets it, having checked the shapes)
            load_initial_weights(self.model, self.init_from)
            self.reference_path = self.reference_path or self.init_from
        if self.hparams.algorithm == "ppo":
            self.critic = self._build_critic()

    def run_identity(self) -> dict[str, Any]:
        """What a resume must keep (gpt.run): shapes, the optimizer state's settings, and what maps
        optimizer steps to rollouts and samples them (the sampling seed, the group size)."""
        hp = self.hparams
        return {**model_identity(self.config.to_dict()), "model.weight_decay": hp.weight_decay,
                "model.betas": list(hp.betas), "model.eps": hp.eps, "model.algorithm": hp.algorithm,
                "model.steps_per_rollout": self.steps_per_rollout, "model.group_size": hp.group_size,
                "model.seed": hp.seed}

    def check_run(self, trainer: L.Trainer, datamodule: Any) -> None:
        """Before anything is written (recipes/cli.py): steps, intervals and lengths fit a rollout."""
        k, hp = self.steps_per_rollout, self.hparams
        if trainer.max_steps is None or trainer.max_steps < 1 or trainer.max_steps % k:
            raise ValueError(f"trainer.max_steps {trainer.max_steps} is not a positive multiple of the optimizer steps "
                             f"per rollout, {k} (model.ppo_epochs x model.num_minibatches)")
        for cb in trainer.callbacks:
            for name, attr in (("checkpoint_every", "every_n_steps"), ("val_every", "val_every")):
                every = int(getattr(cb, attr, 0) or 0)
                if every % k:
                    raise ValueError(f"--{name} {every} is not a multiple of the optimizer steps per rollout, {k} "
                                     "(model.ppo_epochs x model.num_minibatches): a rollout's steps are not split")
        longest = getattr(datamodule, "max_prompt_tokens", None)
        reply = max(hp.max_new_tokens, hp.val_max_new_tokens or 0)
        if longest is not None and longest + reply > self.config.block_size:
            raise ValueError(f"data.max_prompt_tokens {longest} + a reply of up to {reply} tokens is past the model's "
                             f"block_size {self.config.block_size}; lower one of them")
        check_frozen_sources(hp.reference, hp.reward_model, hp.critic)  # now, not at the first rollout
        if hasattr(datamodule, "steps_per_rollout"):
            datamodule.steps_per_rollout = k

    def batch_tokens(self, batch: dict[str, list]) -> int:
        """Tokens the run's throughput counts per step: the rollout's prompt tokens (each prompt
        group_size times); generated tokens/s is logged as perf/gen_tokens_per_s."""
        return sum(len(p) for p in batch["prompt_ids"]) * self.hparams.group_size

    def _build_critic(self) -> torch.nn.Module:
        """PPO's critic: a reward model's backbone and head (per token), trained; dropout off."""
        from gpt.reward import RewardModel, load_reward_model

        source = self.hparams.critic or self.hparams.reward_model
        if source:
            rm, _ = load_reward_model(source)
            critic = RewardModel(GPTConfig.from_dict({**rm.config.to_dict(), "dropout": 0.0}))
            critic.load_state_dict(rm.state_dict())
            return critic
        critic = RewardModel(self.config)  # no reward model: the policy's weights and a zero head
        critic.backbone.load_state_dict(self.model.state_dict())
        torch.nn.init.zeros_(critic.head.weight)
        return critic

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tok is None:
            if self.tokenizer_json is None:
                raise ValueError("RL needs the tokenizer (set data.tokenizer): the chat template and reply texts")
            self._tok = Tokenizer.from_str(self.tokenizer_json)
            self._template = ChatTemplate(self._tok)
        return self._tok

    @property
    def template(self) -> ChatTemplate:
        _ = self.tokenizer
        return self._template

    def _zero3(self) -> bool:
        return bool(getattr(self.trainer.strategy, "zero_stage_3", False)) if self._trainer is not None else False

    def frozen(self, name: Literal["reference", "reward"]) -> Optional[torch.nn.Module]:
        """The frozen reference policy / reward model, built on first use (on every rank at once)."""
        if name in self._frozen:
            return self._frozen[name]
        from gpt.checkpoint import load_model

        model = None
        if name == "reference":
            if not self.reference_path:
                raise ValueError("RL needs a frozen reference: start the run with --init_from (the SFT checkpoint) "
                                 "or set model.reference")
            model, _ = load_model(self.reference_path)
            if model.config.to_dict() | {"dropout": 0.0} != self.config.to_dict():
                raise ValueError(f"model.reference {self.reference_path}: its shape differs from the policy's")
        elif self.hparams.reward_model:
            from gpt.reward import load_reward_model

            model, tok = load_reward_model(self.hparams.reward_model)
            if tok is not None and tok.content_hash != self.tokenizer.content_hash:
                raise ValueError(f"model.reward_model {self.hparams.reward_model}: trained with another tokenizer")
        if model is not None:
            what = f"model.reference {self.reference_path}" if name == "reference" else \
                f"model.reward_model {self.hparams.reward_model}"
            self._fingerprints[name] = same_weights(model, self._fingerprints.get(name), what)
            model = self._freeze(model)
        self._frozen[name] = model
        return model

    def _freeze(self, model: torch.nn.Module) -> torch.nn.Module:
        return freeze(model, self.trainer, self.device, next(self.model.parameters()).dtype, self._zero3())

    def generation_model(self) -> GPT:
        """The policy to sample from: itself, or under ZeRO-3 a full copy refreshed from the shards
        (one parameter gathered at a time), so generation never gathers layers per token."""
        if not self._zero3():
            return self.model
        self._aux["generation"] = gathered_copy(self.model, self.config, self.device, self._aux.get("generation"))
        return self._aux["generation"]

    # ---- one rollout --------------------------------------------------------------------
    def _micro(self, n: int) -> list[torch.Tensor]:
        m = self.hparams.micro_batch_size or n
        return [torch.arange(s, min(s + m, n), device=self.device) for s in range(0, n, m)]

    @torch.no_grad()
    def _scan(self, fn: Callable[[Rollout], torch.Tensor], ro: Rollout) -> torch.Tensor:
        """fn over micro-batches of a rollout, per-token outputs padded back to (N, R)."""
        out = torch.zeros(ro.responses.shape, device=self.device)
        for idx in self._micro(ro.size):
            part = fn(ro.select(idx))
            out[idx, :part.size(1)] = part.float()
        return out

    @torch.no_grad()
    def rm_scores(self, ro: Rollout) -> torch.Tensor:
        """The frozen reward model's score of each response, read at its last token."""
        from gpt.generate import padded_causal_mask

        rm = self.frozen("reward")
        out = []
        for idx in self._micro(ro.size):
            sub = ro.select(idx)
            mask = padded_causal_mask(sub.valid, sub.valid.size(1))
            out.append(rm.score(sub.input_ids, last_token_index(sub), position_ids=sub.position_ids, attn_mask=mask))
        return torch.cat(out).float()

    @torch.no_grad()
    def score(self, ro: Rollout, rows: list[dict]) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(total reward, verifier reward or None, RM score or None), each (N,)."""
        hp = self.hparams
        total = torch.zeros(ro.size, device=self.device)
        verifier = rm = None
        if self.reward_fn is not None:
            verifier = torch.tensor([float(self.reward_fn(row, text)) for row, text in zip(rows, ro.texts(self.tokenizer))],
                                    device=self.device)
            total += hp.verifier_weight * verifier
        if hp.reward_model:
            rm = self.rm_scores(ro)
            total += hp.rm_weight * rm
        total -= hp.length_penalty * ro.lengths.float() + hp.truncation_penalty * ro.truncated.float()
        return total, verifier, rm

    def weights_of(self, ro: Rollout) -> torch.Tensor:
        mask = ro.response_mask.float()
        return mask / ro.lengths[:, None].float() if self.hparams.loss_norm == "sequence" else mask

    @torch.no_grad()
    def on_train_batch_start(self, batch: dict[str, list], batch_idx: int) -> None:
        # ZeRO-3: refresh the sampling copy here, outside the engine's forward (where training_step
        # runs): there the prefetcher may hold parameters in flight, which GatheredParameters skips.
        if self._zero3():
            self.generation_model()

    def make_experience(self, batch: dict[str, list], rollout: int) -> Experience:
        hp, t = self.hparams, self.template
        t0 = time.perf_counter()
        policy = self._aux["generation"] if self._zero3() else self.model  # refreshed by on_train_batch_start
        ro = sample_rollout(policy, batch["prompt_ids"], stop_ids=t.stop_ids, end_id=t.end_id,
                            pad_id=t.pad_id, group_size=hp.group_size, max_new_tokens=hp.max_new_tokens,
                            temperature=hp.temperature, top_k=hp.top_k, top_p=hp.top_p,
                            seed=derive_seed(hp.seed, rollout, self.global_rank), batch_size=hp.generation_batch_size)
        ro = ro.to(self.device)
        self._gen_s = time.perf_counter() - t0
        rows = [row for row in batch["rows"] for _ in range(hp.group_size)]
        rewards, verifier, rm = self.score(ro, rows)
        guided = []
        if hp.guide:
            ro, guided = self.guide(ro, rows, verifier)
            if guided:  # score the replaced replies only (an RM pass over the whole rollout again is waste)
                total, ver, score = self.score(ro.select(guided), [rows[i] for i in guided])
                rewards[guided], verifier[guided] = total, ver
                if rm is not None:
                    rm[guided] = score
        ref = self.frozen("reference")
        ref_logp = self._scan(lambda r: response_logprobs(ref, r, hp.temperature)[0], ro)
        one_step = self.steps_per_rollout == 1 and hp.algorithm == "grpo"
        old_logp = None if one_step else self._scan(lambda r: response_logprobs(self.model, r, hp.temperature)[0], ro)
        exp = Experience(ro, rows, rewards, verifier, rm, self.weights_of(ro), old_logp, ref_logp, advantages=rewards,
                         guided=len(guided))
        if hp.algorithm == "grpo":
            exp.advantages = group_advantages(rewards, hp.group_size, hp.scale_advantages)
            return exp
        values = self._scan(lambda r: response_values(self._critic_fn, r), ro)
        mask = ro.response_mask.float()
        token_rewards = -self.kl_coef * kl_estimate(old_logp, ref_logp, "k1") * mask
        token_rewards[torch.arange(ro.size, device=self.device), ro.lengths - 1] += rewards
        adv, returns = gae(token_rewards, values, mask, hp.gamma, hp.lam)
        if hp.whiten_advantages:
            adv = global_whiten(adv, mask, self.trainer.strategy.reduce)
        exp.advantages, exp.returns, exp.old_values = adv, returns, values
        return exp

    def guide(self, ro: Rollout, rows: list[dict], verifier: torch.Tensor) -> tuple[Rollout, list[int]]:
        """(the rollout with each unrewarded group's last response replaced by its reference answer,
        the rows replaced). Why: a prompt the policy never answers right gives GRPO a group of
        equal rewards, hence no gradient; the reference makes it one right answer among wrong ones."""
        G, t = self.hparams.group_size, self.template
        new = {}
        for g in range(ro.size // G):
            answer = rows[g * G].get("answer")
            if answer is None or not str(answer).strip() or float(verifier[g * G:(g + 1) * G].max()) > 0:
                continue
            ids = t.render_reply(str(answer))[:-1]  # the reply as SFT trains it, less <|end|>
            if len(ids) < self.hparams.max_new_tokens:  # longer than any reply the policy may sample: left out
                new[g * G + G - 1] = ids
        if not new:
            return ro, []
        return replace_responses(ro, new, end_id=t.end_id, pad_id=t.pad_id), sorted(new)

    def _critic_fn(self, ids: torch.Tensor, position_ids: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        h = self.critic.backbone(ids, position_ids=position_ids, attn_mask=attn_mask, hidden=True)
        return self.critic.head(h).squeeze(-1)

    # ---- optimization -------------------------------------------------------------------
    def training_step(self, batch: dict[str, list], batch_idx: int) -> None:
        rollout = self.trainer.global_step // self.steps_per_rollout
        t0 = time.perf_counter()
        exp = self.make_experience(batch, rollout)
        self.last_experience = exp  # for callbacks (tests, custom logging)
        t1 = time.perf_counter()
        stats = self.optimize(exp, rollout)
        t2 = time.perf_counter()
        if self.kl is not None:  # the rollout's KL to the reference, per response
            self.kl.update(stats["rollout_kl"], int(stats["responses"]))
        self.log_rollout(exp, stats, rollout, rollout_s=t1 - t0, train_s=t2 - t1)

    def optimize(self, exp: Experience, rollout: int) -> dict[str, float]:
        hp = self.hparams
        opt, sched = self.optimizers(), self.lr_schedulers()
        engine = getattr(self.trainer.strategy, "deepspeed_engine", None)
        W = self.trainer.world_size
        N = exp.ro.size
        if N % hp.num_minibatches:
            raise ValueError(f"{N} responses per rank do not split into model.num_minibatches {hp.num_minibatches}")
        sums = torch.zeros(len(_OPT_STATS), dtype=torch.float64, device=self.device)
        for epoch in range(hp.ppo_epochs):
            g = torch.Generator().manual_seed(derive_seed(hp.seed, rollout, epoch, self.global_rank))
            order = torch.randperm(N, generator=g).to(self.device) if N > 1 else torch.arange(N, device=self.device)
            for mb in order.chunk(hp.num_minibatches):
                denom = self.trainer.strategy.reduce(exp.weights[mb].sum().double(), reduce_op="sum").clamp(min=1e-8)
                micro = [mb[i] for i in self._micro(mb.numel())]
                step_loss = torch.zeros((), dtype=torch.float64, device=self.device)
                for k, idx in enumerate(micro):
                    last = k == len(micro) - 1
                    if engine is not None:
                        engine.set_gradient_accumulation_boundary(last)
                        begin_micro_step(engine)
                    with opt.toggle_model(sync_grad=last) if W > 1 and engine is None else nullcontext():
                        loss_sum, s = self.loss_on(exp, idx)
                        self.manual_backward(loss_sum * W / denom.float())
                    step_loss += loss_sum.detach().double() / denom
                    sums += s
                self._step_loss = self.trainer.strategy.reduce(step_loss, reduce_op="sum")
                if engine is None and hp.gradient_clip_val:
                    self.clip_gradients(opt, gradient_clip_val=hp.gradient_clip_val, gradient_clip_algorithm="norm")
                opt.step()
                opt.zero_grad()
                if sched is not None:
                    sched.step()
                sums[_OPT_STATS.index("loss")] += self._step_loss.double()
        out = dict(zip(_OPT_STATS, self.trainer.strategy.reduce(sums, reduce_op="sum").tolist()))
        # The rollout's KL to the reference per response (sum of k1 over its tokens, nats): from the
        # sampled policy's log-probs, or with one pass (no old log-probs kept) from that pass.
        if exp.old_logp is not None:
            local = torch.stack([(kl_estimate(exp.old_logp, exp.ref_logp, "k1") * exp.ro.response_mask).sum(),
                                 torch.tensor(float(N), device=self.device)]).double()
            kl_sum, n = self.trainer.strategy.reduce(local, reduce_op="sum").tolist()
        else:
            kl_sum, n = out["kl_sum"], out["n_sequences"]
        out.update(rollout_kl=kl_sum / max(n, 1.0), responses=n)
        return out

    def loss_on(self, exp: Experience, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss sum on rows idx of a rollout, and their statistics (as _OPT_STATS sums)."""
        hp = self.hparams
        ro = exp.ro.select(idx)
        R = ro.responses.size(1)
        w = exp.weights[idx, :R]
        logp, entropy = response_logprobs(self.model, ro, hp.temperature, with_entropy=True)
        old = logp.detach() if exp.old_logp is None else exp.old_logp[idx, :R]
        ref = exp.ref_logp[idx, :R]
        s = dict.fromkeys(_OPT_STATS, 0.0)
        if hp.algorithm == "grpo":
            loss, st = grpo_loss(logp, old, ref, exp.advantages[idx], w, hp.clip_eps, self.kl_coef, hp.kl_estimator)
        else:
            loss, st = ppo_policy_loss(logp, old, exp.advantages[idx, :R], w, hp.clip_eps)
            values = response_values(self._critic_fn, ro)
            vloss, vst = value_loss(values, exp.old_values[idx, :R], exp.returns[idx, :R], w, hp.value_clip)
            loss = loss + hp.vf_coef * vloss
            s.update(value_loss=vloss.detach(), value_clipped=vst["clipped"])
        with torch.no_grad():
            mask = ro.response_mask.float()
            s.update(weight=w.sum(), clipped=st["clipped"], approx_kl=st["approx_kl"],
                     entropy=(entropy * w).sum(), kl_token=(kl_estimate(logp, ref, "k3") * w).sum(),
                     kl_sum=(kl_estimate(logp, ref, "k1") * mask).sum(), n_sequences=float(idx.numel()))
        return loss, torch.stack([torch.as_tensor(s[k], dtype=torch.float64, device=self.device) for k in _OPT_STATS])

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        groups = param_groups(self.model, hp.weight_decay)
        if self.critic is not None:
            groups += [dict(g, lr=hp.critic_lr or hp.lr) for g in param_groups(self.critic, hp.weight_decay)]
        if getattr(self.trainer.strategy, "offloads_optimizer", False):
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            opt = DeepSpeedCPUAdam(groups, lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps, adamw_mode=True)
        else:
            opt = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps)
        schedule = LRSchedule(hp.schedule, hp.warmup_steps, max(1, self.trainer.max_steps), hp.min_lr_ratio,
                              hp.decay_fraction)
        return {"optimizer": opt,
                "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, schedule), "interval": "step"}}

    # ---- validation: greedy replies to held-out prompts, scored by the same rewards ----------
    def on_validation_epoch_start(self) -> None:
        self._val = torch.zeros(6, dtype=torch.float64, device=self.device)
        self._aux["val"] = self.generation_model()

    def validation_step(self, batch: dict[str, list], batch_idx: int) -> None:
        from gpt.generate import generate
        from gpt.rollout import build_rollout

        hp, t = self.hparams, self.template
        limit = hp.val_max_new_tokens or hp.max_new_tokens
        model = self._aux["val"]
        was_training = model.training
        model.eval()
        with torch.no_grad():
            g = generate(model, batch["prompt_ids"], limit, temperature=0.0, stop_ids=t.stop_ids, return_details=True)
        model.train(was_training)
        ro = build_rollout(batch["prompt_ids"], g.tokens, g.stops, g.logprobs, end_id=t.end_id, pad_id=t.pad_id,
                           device=self.device)
        total, verifier, rm = self.score(ro, batch["rows"])
        zero = torch.zeros_like(total)
        self._val += torch.stack([torch.tensor(float(ro.size), device=self.device), total.sum(),
                                  (verifier if verifier is not None else zero).sum(),
                                  (rm if rm is not None else zero).sum(), ro.ended.float().sum(),
                                  ro.lengths.float().sum()]).double()

    def on_validation_epoch_end(self) -> None:
        sums = self._val if self._zero3() else self.trainer.strategy.reduce(self._val, reduce_op="sum")
        n, total, ver, rm, ended, length = sums.tolist()
        if n == 0 or self.trainer.sanity_checking:
            return
        metrics = {"val/reward": total / n, "val/ended": ended / n, "val/response_length": length / n}
        if self.reward_fn is not None:
            metrics["val/verifier_reward"] = ver / n
        if self.hparams.reward_model:
            metrics["val/rm_reward"] = rm / n
        log_at_step(self, metrics)

    # ---- checkpoints --------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # `gpt sample`, `gpt export` and the next stage read the policy; "heads" names the critic's keys
        # so that loading a consolidated DeepSpeed checkpoint leaves them out.
        checkpoint["gpt"] = {"model_config": self.config.to_dict(), "tokenizer": self.tokenizer_json}
        if self.critic is not None:
            checkpoint["gpt"]["heads"] = {"critic": {"kind": "value model"}}
        checkpoint["rl"] = {"reference": self.reference_path, "kl_coef": self.kl_coef, "frozen": dict(self._fingerprints)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("rl") or {}
        self.reference_path = self.hparams.reference or state.get("reference")
        self._fingerprints = dict(state.get("frozen") or {})
        if self.kl is not None and "kl_coef" in state:
            self.kl.value = float(state["kl_coef"])


_OPT_STATS = ("loss", "weight", "clipped", "approx_kl", "entropy", "kl_token", "kl_sum", "n_sequences",
              "value_loss", "value_clipped")
