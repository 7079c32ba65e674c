"""The per-rollout metrics of gpt.rl.RLModule: rewards, KL, entropy, clipping, lengths, a W&B table.

    class RLModule(RolloutMetrics, L.LightningModule): ...
    self.log_rollout(exp, stats, rollout, rollout_s, train_s)   # once per rollout, after its optimizer steps

Every number is reduced over the ranks first (sums of x and x**2, so means and stds are of the
global batch, not of rank 0's share), then logged at the optimizer step. Names (docs in gpt/rl.py):
train/reward(_std), train/verifier_reward(_std), train/rm_reward(_std), train/kl (per response,
nats), train/kl_token, train/entropy, train/clipfrac, train/approx_kl, train/response_length,
train/ended, train/truncated, train/kl_coef; PPO adds train/value_loss, train/value_clipfrac and
train/explained_variance; perf/rollout_s, perf/train_s, perf/generate_s, perf/gen_tokens_per_s.
The W&B table "rollouts" holds `table_rows` sampled replies with their rewards every `table_every` rollouts.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from lightning.pytorch.loggers import WandbLogger

if TYPE_CHECKING:
    from gpt.rl import Experience


class RolloutMetrics:
    """Mixin for gpt.rl.RLModule (reads its hparams, trainer, tokenizer, kl_coef and _gen_s)."""

    def log_rollout(self, exp: Experience, stats: dict[str, float], rollout: int, rollout_s: float,
                    train_s: float) -> None:
        ro = exp.ro
        zero = torch.zeros(ro.size, device=self.device)
        ver = exp.verifier if exp.verifier is not None else zero
        rm = exp.rm if exp.rm is not None else zero
        local = torch.stack([torch.tensor(float(ro.size), device=self.device), exp.rewards.sum(), (exp.rewards ** 2).sum(),
                             ver.sum(), (ver ** 2).sum(), rm.sum(), (rm ** 2).sum(), ro.lengths.float().sum(),
                             ro.ended.float().sum(), ro.truncated.float().sum(),
                             torch.tensor(float(exp.guided), device=self.device)]).double()
        n, r, r2, v, v2, m, m2, length, ended, trunc, guided = \
            self.trainer.strategy.reduce(local, reduce_op="sum").tolist()

        def std(s: float, s2: float) -> float:
            return math.sqrt(max(s2 / n - (s / n) ** 2, 0.0))

        passes = self.hparams.ppo_epochs
        w = max(stats["weight"], 1e-8)
        metrics = {"train/reward": r / n, "train/reward_std": std(r, r2), "train/response_length": length / n,
                   "train/ended": ended / n, "train/truncated": trunc / n,
                   "train/kl": stats["rollout_kl"],  # per response: sum of k1 over its tokens, nats
                   "train/kl_token": stats["kl_token"] / w, "train/entropy": stats["entropy"] / w,
                   "train/clipfrac": stats["clipped"] / w, "train/approx_kl": stats["approx_kl"] / w,
                   "train/loss": stats["loss"] / (passes * self.hparams.num_minibatches),
                   "train/kl_coef": self.kl_coef, "perf/rollout_s": rollout_s, "perf/train_s": train_s,
                   "perf/generate_s": self._gen_s,
                   "perf/gen_tokens_per_s": length / max(self._gen_s, 1e-9) / self.trainer.world_size}
        if exp.verifier is not None:
            metrics.update({"train/verifier_reward": v / n, "train/verifier_reward_std": std(v, v2)})
        if self.hparams.guide:  # share of groups given the reference answer (its reward is in train/reward)
            metrics["train/guided"] = guided * self.hparams.group_size / n
        if exp.rm is not None:
            metrics.update({"train/rm_reward": m / n, "train/rm_reward_std": std(m, m2)})
        if self.hparams.algorithm == "ppo":
            metrics.update({"train/value_loss": stats["value_loss"] / w, "train/value_clipfrac": stats["value_clipped"] / w,
                            "train/explained_variance": self._explained_variance(exp)})
        # Logged with Lightning's step set to the optimizer step ("step"), so that the metrics of this
        # rollout (and the callbacks' of this batch) line up with validation's and checkpoints' steps.
        shown = ("train/loss", "train/reward", "train/kl")
        self.log_dict({k: v for k, v in metrics.items() if k not in shown}, rank_zero_only=True)
        self.log_dict({k: metrics[k] for k in shown}, prog_bar=True, rank_zero_only=True)
        self.log("step", float(self.trainer.global_step), rank_zero_only=True)
        if self.trainer.is_global_zero:
            self._log_table(exp, rollout)

    def _explained_variance(self, exp: Experience) -> float:
        m = exp.ro.response_mask.float()
        ret, err = exp.returns, exp.returns - exp.old_values
        local = torch.stack([m.sum(), (ret * m).sum(), (ret ** 2 * m).sum(), (err * m).sum(), (err ** 2 * m).sum()])
        n, s, s2, e, e2 = self.trainer.strategy.reduce(local.double(), reduce_op="sum").tolist()
        var_r = s2 / n - (s / n) ** 2
        return 1.0 - (e2 / n - (e / n) ** 2) / max(var_r, 1e-8)

    def _log_table(self, exp: Experience, rollout: int) -> None:
        hp = self.hparams
        if hp.table_rows <= 0 or rollout % max(hp.table_every, 1):
            return
        texts = exp.ro.texts(self.tokenizer)
        data = []
        for i in range(min(hp.table_rows, exp.ro.size)):
            prompt = exp.rows[i].get("prompt_messages", [{}])[-1].get("content", "")
            data.append([self.trainer.global_step, prompt, texts[i], float(exp.rewards[i]),
                         float(exp.verifier[i]) if exp.verifier is not None else None,
                         float(exp.rm[i]) if exp.rm is not None else None, bool(exp.ro.ended[i])])
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_text(key="rollouts", columns=["step", "prompt", "response", "reward", "verifier", "rm", "ended"],
                                data=data, step=self.trainer.global_step)
