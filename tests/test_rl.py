"""gpt/rl.py: GRPO and PPO on a tiny model through a real Lightning Trainer.

    .venv/bin/python -m pytest tests/test_rl.py -q            # the fast checks
    .venv/bin/python -m pytest tests/test_rl.py -q -m slow    # training runs (about a minute)

The "SFT" policy is a random tiny GPT with the demo-task prompts; the verifiable reward in the
learning tests is tests.rl_fixtures.vowel_share (dense, so a random model can climb it in a few
steps); the reward model is a random tiny RewardModel checkpoint.
"""
from __future__ import annotations

import pytest
import torch

from gpt.checkpoint import load_model
from gpt.rl import RLModule, load_reward_fn
from tests.pretrain_fixtures import metric_by_step, read_csv_metrics
from tests.rl_fixtures import TINY, prompt_data, rl_module, rl_trainer, write_rl_inputs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    return write_rl_inputs(tmp_path_factory.mktemp("rl_inputs"))


def _fit(inputs, run_dir, max_steps, data=None, ckpt_path=None, every=0, **kw):
    module = rl_module(inputs, **kw)
    trainer = rl_trainer(run_dir, max_steps=max_steps, every=every)
    trainer.fit(module, data or prompt_data(inputs), ckpt_path=ckpt_path)
    return module, trainer


# ---- arguments ------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, error", [
    ({"algorithm": "dpo"}, "model.algorithm must be grpo or ppo"),
    ({"group_size": 1}, "GRPO compares responses within a group: model.group_size must be >= 2"),
    ({"temperature": 0.0}, "model.temperature must be > 0"),
    ({"ppo_epochs": 0}, "model.ppo_epochs must be >= 1"),
    ({"reward_fn": None}, "no reward: set model.reward_fn"),
    ({"reward_fn": "gpt.demo_task"}, "expected 'package.module:function'"),
    ({"reward_fn": "gpt.demo_task:nope"}, "has no attribute 'nope'"),
    ({"guide": True, "reward_fn": None, "reward_model": "rm.ckpt"}, "model.guide .* set model.reward_fn"),
    ({"guide": True, "algorithm": "ppo", "group_size": 1}, "model.guide needs model.group_size >= 2"),
])
def test_bad_settings_are_one_line(kw, error):
    with pytest.raises(ValueError, match=error):
        RLModule(**{"preset": "tiny", "model_config": TINY, **kw})


def test_reward_fn_is_the_demo_verifier():
    fn = load_reward_fn("gpt.demo_task:reward")
    assert fn({"answer": "19"}, "19.") == 1.0 and fn({"answer": "19"}, "20") == 0.0


# ---- GRPO ---------------------------------------------------------------------------------
def test_guide_puts_the_reference_answer_into_groups_the_verifier_rewards_nowhere(tmp_path, inputs):
    """A random tiny model never answers a demo row right: with model.guide every group's last
    response becomes the row's reference answer, scored 1 by the verifier, the only positive advantage."""
    module, trainer = _fit(inputs, tmp_path / "run", 1, reward_fn="gpt.demo_task:reward", guide=True,
                           reward_model=inputs["rm"], rm_weight=0.0)  # RM scored (logged), not in the reward
    exp, G = module.last_experience, module.hparams.group_size
    # Only the replaced replies are scored again: every score equals a full pass over the final rollout.
    with torch.no_grad():
        total, verifier, rm = module.score(exp.ro, exp.rows)
    torch.testing.assert_close(exp.rewards, total)
    torch.testing.assert_close(exp.verifier, verifier)
    torch.testing.assert_close(exp.rm, rm, rtol=1e-5, atol=1e-5)
    groups = exp.ro.size // G
    assert exp.guided == groups == 4
    for g in range(groups):
        last = g * G + G - 1
        answer = exp.rows[last]["answer"]
        assert exp.ro.replies[last] == module.tokenizer.encode(answer) and bool(exp.ro.ended[last])
        assert exp.verifier[last] == 1.0 and exp.verifier[g * G:last].sum() == 0
        assert exp.advantages[last] > 0 and (exp.advantages[g * G:last] < 0).all()
    logged = trainer.callback_metrics
    assert float(logged["train/guided"]) == 1.0
    # A reference longer than any reply the policy may sample (its reply + <|end|> past max_new_tokens) is left out.
    module, _ = _fit(inputs, tmp_path / "short", 1, reward_fn="gpt.demo_task:reward", guide=True, max_new_tokens=1)
    assert module.last_experience.guided == 0
    # Without guidance the same rollout has no rewarded response: every advantage is 0, nothing to learn.
    module, _ = _fit(inputs, tmp_path / "plain", 1, reward_fn="gpt.demo_task:reward")
    assert module.last_experience.guided == 0 and module.last_experience.verifier.sum() == 0
    assert (module.last_experience.advantages == 0).all()


@pytest.fixture(scope="module")
def grpo_runs(inputs, tmp_path_factory):
    """Two 12-step GRPO runs at a high lr: without the KL term and with a strong one."""
    runs = {}
    for beta in (0.0, 1.0):
        run_dir = tmp_path_factory.mktemp(f"grpo_beta{beta}")
        module, _ = _fit(inputs, run_dir, 12, kl_coef=beta, lr=3e-2)
        runs[beta] = (module, run_dir)
    return runs


@pytest.mark.slow
def test_grpo_reward_rises(grpo_runs):
    reward = metric_by_step(grpo_runs[0.0][1], "train/reward")
    assert sorted(reward) == list(range(1, 13))
    first, last = sum(reward[s] for s in (1, 2, 3)) / 3, sum(reward[s] for s in (10, 11, 12)) / 3
    print(f"vowel-share reward: first 3 steps {first:.3f}, last 3 steps {last:.3f}")
    assert last > first + 0.1


@pytest.mark.slow
def test_reward_hack_guard_kl_rises_without_the_kl_term(grpo_runs):
    free = metric_by_step(grpo_runs[0.0][1], "train/kl_token")
    held = metric_by_step(grpo_runs[1.0][1], "train/kl_token")
    print(f"KL per token at step 12: beta 0 -> {free[12]:.3f}, beta 1 -> {held[12]:.3f}")
    assert free[12] > 5 * held[12]
    assert free[12] > free[6] > free[2]  # it keeps rising without the term


@pytest.mark.slow
def test_logged_metrics(grpo_runs):
    rows = [r for r in read_csv_metrics(grpo_runs[1.0][1]) if "train/reward" in r]
    want = {"train/reward", "train/reward_std", "train/verifier_reward", "train/verifier_reward_std", "train/kl",
            "train/kl_token", "train/entropy", "train/response_length", "train/ended", "train/truncated",
            "train/clipfrac", "train/approx_kl", "train/loss", "train/kl_coef", "perf/gen_tokens_per_s"}
    assert want <= set(rows[0])
    assert all(r["train/truncated"] + r["train/ended"] <= 1 for r in rows)
    assert all(r["train/response_length"] <= 8 for r in rows)


@pytest.mark.slow
def test_frozen_reference_is_bitwise_unchanged_and_never_optimized(grpo_runs, inputs):
    module = grpo_runs[0.0][0]
    ref = module._frozen["reference"]
    fresh, _ = load_model(inputs["sft"])
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    for (k, a), b in zip(ref.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
    optimized = {id(p) for g in module.optimizers().optimizer.param_groups for p in g["params"]}
    assert not optimized & {id(p) for p in ref.parameters()}
    # The policy did move (this run reached a KL of several nats), and is the only thing optimized.
    assert optimized == {id(p) for p in module.model.parameters()}
    assert not torch.equal(module.model.wte.weight, fresh.wte.weight)


@pytest.mark.slow
def test_checkpoint_holds_the_policy_only(tmp_path, inputs):
    module, _ = _fit(inputs, tmp_path, 2, every=2)
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    assert {k.split(".")[0] for k in saved["state_dict"]} == {"model"}
    assert saved["rl"]["reference"] == inputs["sft"]
    policy, tok = load_model(ckpt)
    probe = torch.arange(20).reshape(2, 10)
    with torch.no_grad():
        torch.testing.assert_close(policy(probe), module.model.eval()(probe), rtol=0, atol=0)
    assert tok is not None


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path, inputs):
    """A run resumed from its step-3 checkpoint samples the same prompts and responses: same metrics."""
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    _fit(inputs, full_dir, 6, every=3, group_size=2, micro_batch_size=3)
    ckpt = next((full_dir / "checkpoints").glob("*step=3*.ckpt"))
    module = rl_module(inputs, group_size=2, micro_batch_size=3)
    module.init_from = None  # a resume takes the reference from the checkpoint
    rl_trainer(resumed_dir, max_steps=6).fit(module, prompt_data(inputs), ckpt_path=str(ckpt))
    for key in ("train/loss", "train/reward", "train/kl_token", "train/response_length"):
        full, resumed = metric_by_step(full_dir, key), metric_by_step(resumed_dir, key)
        assert sorted(resumed) == [4, 5, 6]
        assert all(resumed[s] == full[s] for s in resumed), (key, full, resumed)
    assert module.reference_path == inputs["sft"]


def test_resume_keeps_its_frozen_models_by_their_weights_not_their_paths(tmp_path, inputs):
    """A checkpoint records the reference's and the reward model's fingerprints; a resume with other
    weights (retrained in place, another file) is refused, the same file moved elsewhere is not."""
    import shutil

    from gpt.checkpoint import CheckpointError, save_model
    from gpt.config import GPTConfig
    from gpt.model import GPT
    from tests.rl_fixtures import write_reward_model

    kw = dict(group_size=2, micro_batch_size=3, reward_model=inputs["rm"], rm_weight=0.5)
    _fit(inputs, tmp_path / "run", 2, every=2, **kw)
    ckpt = str(next((tmp_path / "run" / "checkpoints").glob("*step=2*.ckpt")))
    assert set(torch.load(ckpt, weights_only=True)["rl"]["frozen"]) == {"reference", "reward"}
    other_rm = write_reward_model(tmp_path / "rm2.ckpt", seed=2)
    torch.manual_seed(5)
    save_model(GPT(GPTConfig.from_preset("tiny", **TINY)), tmp_path / "sft2")
    moved = str(shutil.copy(inputs["rm"], tmp_path / "moved.ckpt"))

    def resume(name, **override):
        module = rl_module(inputs, **{**kw, **override})
        module.init_from = None
        rl_trainer(tmp_path / name, max_steps=4).fit(module, prompt_data(inputs), ckpt_path=ckpt)
        return module

    for name, override, what in (("rm", {"reward_model": other_rm}, f"model.reward_model {other_rm}"),
                                 ("ref", {"reference": str(tmp_path / "sft2")}, f"model.reference {tmp_path / 'sft2'}")):
        with pytest.raises(CheckpointError, match="not the weights this run trained against") as e:
            resume(name, **override)
        assert str(e.value).startswith(what + ": ") and "\n" not in str(e.value)
    module = resume("moved", reward_model=moved)
    assert module.trainer.global_step == 4


# ---- PPO ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ppo_run(inputs, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ppo")
    kw = dict(algorithm="ppo", reward_model=inputs["rm"], reward_fn=None, group_size=2, ppo_epochs=2,
              num_minibatches=2, micro_batch_size=3, lr=3e-3, critic_lr=1e-2, adaptive_kl=True, kl_target=0.5,
              kl_horizon=50, kl_coef=0.1)
    module, _ = _fit(inputs, run_dir, 8 * 4, every=4, **kw)
    return module, run_dir


@pytest.mark.slow
def test_ppo_critic_starts_from_the_reward_model_and_learns(ppo_run, inputs):
    from gpt.reward import load_reward_model

    module, run_dir = ppo_run
    rm, _ = load_reward_model(inputs["rm"])
    frozen = module._frozen["reward"]
    for (k, a), b in zip(frozen.state_dict().items(), rm.state_dict().values()):
        assert torch.equal(a, b), k  # the frozen reward model never changed
    # The critic began as that reward model and was trained (it is in the optimizer).
    assert not torch.equal(module.critic.head.weight, rm.head.weight)
    optimized = {id(p) for g in module.optimizers().optimizer.param_groups for p in g["params"]}
    assert {id(p) for p in module.critic.parameters()} <= optimized
    assert not optimized & {id(p) for p in frozen.parameters()}
    assert [g["lr"] for g in module.optimizers().optimizer.param_groups][-1] == pytest.approx(1e-2)
    steps = metric_by_step(run_dir, "train/value_loss")
    assert sorted(steps) == [4 * k for k in range(1, 9)]  # one row per rollout, at its last optimizer step
    rows = {int(r["step"]): r for r in read_csv_metrics(run_dir) if "train/explained_variance" in r}
    assert {"train/rm_reward", "train/rm_reward_std", "train/value_clipfrac"} <= set(rows[4])


@pytest.mark.slow
def test_ppo_adaptive_kl_coefficient_moves_and_is_checkpointed(ppo_run):
    module, run_dir = ppo_run
    coef = metric_by_step(run_dir, "train/kl_coef")  # logged after the rollout's update
    kl = metric_by_step(run_dir, "train/kl")
    assert len(set(coef.values())) > 1
    # Each rollout multiplies it by 1 + clip(KL / target - 1, -.2, .2) x n / horizon (n = 8 responses).
    before = 0.1
    for s in range(4, 33, 4):
        err = min(max(kl[s] / 0.5 - 1, -0.2), 0.2)
        assert coef[s] == pytest.approx(before * (1 + err * 8 / 50), rel=1e-6)
        before = coef[s]
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["rl"]["kl_coef"] == pytest.approx(module.kl_coef)
    assert {k.split(".")[0] for k in saved["state_dict"]} == {"model", "critic"}
    assert saved["gpt"]["heads"] == {"critic": {"kind": "value model"}}
    policy, _ = load_model(run_dir / "checkpoints" / "last.ckpt")  # the critic is left out
    torch.testing.assert_close(policy.wte.weight, module.model.wte.weight)
