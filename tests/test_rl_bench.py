"""benchmarks/rl_bench.py: the reward wrapper TRL calls, the per-step logs read from Lightning, TRL's settings
against rl-tiny-cpu.yaml, and the table's arithmetic.

    .venv/bin/python -m pytest tests/test_rl_bench.py -q

The benchmark itself (ours vs TRL's GRPOTrainer, minutes) runs by hand: python -m benchmarks.rl_bench.
"""
import argparse
import types

import pytest
import yaml

from benchmarks.rl_bench import CONFIG, RolloutClock, report, speed, trl_reward


def test_trl_reward_is_the_demo_tasks_reward_and_counts_tokens():
    tokens, rewards = [], []
    fn = trl_reward(["answer", "family"], tokens, rewards)
    completions = [[{"role": "assistant", "content": "19"}], [{"role": "assistant", "content": "18"}]]
    out = fn(prompts=[[], []], completions=completions, completion_ids=[[7, 5], [8, 9, 5]],
             answer=["19", "19"], family=["add", "add"], trainer_state=None)
    assert out == [1.0, 0.0]
    assert tokens == [5] and rewards == [0.5]


def test_rollout_clock_reads_each_steps_logs_after_lightning_publishes_them(tmp_path):
    clock = RolloutClock(str(tmp_path / "c.json"), responses=128)
    trainer = types.SimpleNamespace(callback_metrics={})
    for step, (length, reward) in enumerate([(2.0, 0.5), (3.0, 0.25)]):
        clock.on_train_batch_start(trainer, None, None, step)
        clock.on_train_batch_end(trainer, None, None, None, step)
        # Lightning fills callback_metrics after on_train_batch_end
        trainer.callback_metrics = {"train/response_length": length, "train/reward": reward}
    clock.on_train_end(trainer, None)
    assert clock.tokens == [256.0, 384.0] and clock.rewards == [0.5, 0.25]


def test_trl_runs_with_our_yaml_settings(tmp_path):
    pytest.importorskip("trl", reason="TRL is the benchmark extra: pip install -e '.[bench]'")
    from benchmarks.rl_bench import grpo_args

    args, _ = grpo_args(str(tmp_path), steps=5)
    m = yaml.safe_load(CONFIG.read_text())["model"]
    assert args.max_steps == 5 and args.num_generations == m["group_size"] == 8
    d = yaml.safe_load(CONFIG.read_text())["data"]
    assert args.per_device_train_batch_size == d["micro_batch_size"] * 8 == 512  # 64 prompts x 8
    assert args.gradient_accumulation_steps == 1
    assert args.max_completion_length == m["max_new_tokens"] and args.beta == m["kl_coef"]
    assert args.learning_rate == m["lr"] and args.epsilon == m["clip_eps"] and args.num_iterations == 1
    assert args.loss_type == "dapo" and args.scale_rewards == "group" and args.gradient_checkpointing is False


def test_speed_and_report():
    clock = {"ends": [0.0, 4.0, 6.0, 10.0], "cpu": [0.0, 2.0, 5.0, 8.0], "tokens": [100, 200, 300, 500],
             "rewards": [0.25, 0.5, 0.5, 0.75]}
    s = speed(clock, warmup=1)  # steps 3..4: 6 s, 6 CPU s, 800 tokens
    assert s["sec_per_step"] == 3.0 and s["cpu_sec_per_step"] == 3.0 and s["tokens_per_step"] == 400
    assert s["tokens_per_sec"] == 800 / 6 and s["reward_first"] == 0.25 and s["reward_last"] == 0.5
    slow = dict(s, sec_per_step=6.0, cpu_sec_per_step=4.5)
    em = {"exact_match": 0.7}
    body = report({"ours": {"speed": s, "em": em}, "trl": {"speed": slow, "em": em}}, {"exact_match": 0.6},
                  argparse.Namespace(sft="S", tokenizer="T", task="D", steps=4, warmup=1, eval_rows=300), "load average 1.00, 1.00, 1.00")
    assert "Ours / TRL: 2.00x faster per step wall clock, 1.50x in CPU time per step." in body
    assert "| ours | 4 | 3.00 | 3.00 | 133 | 400 | 0.25 -> 0.50 | 70.0% |" in body
    assert "`python -m benchmarks.rl_bench --sft S --tokenizer T --task D --steps 4`" in body
    assert "| SFT model (before RL) | 0 |" in body and "60.0%" in body
