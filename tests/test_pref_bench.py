"""benchmarks/pref_bench.py and benchmarks/common.py: the timed window, which steps are counted, TRL's
settings against our yaml, and the table's arithmetic.

    .venv/bin/python -m pytest tests/test_pref_bench.py -q

The benchmark itself (ours vs TRL's RewardTrainer and DPOTrainer, minutes) runs by hand:
python -m benchmarks.pref_bench.
"""
import argparse
import types

import pytest
import yaml

from benchmarks.common import step_timing
from benchmarks.pref_bench import CONFIGS, PairClock, report, speed


def test_step_timing_times_the_steps_after_warmup():
    r = step_timing([10.0, 11.0, 13.0, 16.0], [1.0, 3.0, 7.0, 11.0], warmup=1)  # steps 2..3: 5 s, 8 CPU s
    assert r == {"steps_timed": 2, "sec_per_step": 2.5, "cpu_sec_per_step": 4.0}
    with pytest.raises(ValueError, match="2 steps ran: need more than warmup=1"):
        step_timing([1.0, 2.0], [1.0, 2.0], warmup=1)


def test_pair_clock_counts_optimizer_steps_not_micro_batches(tmp_path):
    clock = PairClock(str(tmp_path / "c.json"))
    trainer = types.SimpleNamespace(global_step=0)
    clock.on_train_start(trainer, None)
    for micro in range(6):  # accumulate 2: the optimizer steps after micro-batches 1, 3, 5
        clock.on_train_batch_start(trainer, None, None, micro)
        trainer.global_step = (micro + 1) // 2
        clock.on_train_batch_end(trainer, None, None, None, micro)
    assert len(clock.ends) == len(clock.cpu) == 3
    clock.on_train_end(trainer, None)
    assert (tmp_path / "c.json").read_text().startswith('{"ends": [')


def test_speed_counts_pairs_and_the_reference_pass():
    clock = {"ends": [12.0, 13.0, 15.0, 17.0], "cpu": [0.0, 1.0, 2.0, 3.0], "reference_s": 6.0, "start": 1.0}
    s = speed({"clock": clock, "pairs_per_step": 16}, warmup=1)
    assert s["sec_per_step"] == 2.0 and s["pairs_per_sec"] == 8.0 and s["pairs_per_cpu_sec"] == 16.0
    assert s["reference_s"] == 6.0 and s["pairs_per_sec_total"] == 16 * 4 / 16.0  # 4 steps from start to the end


@pytest.mark.parametrize("kind", ["rm", "dpo"])
def test_trl_runs_with_our_yaml_settings(kind, tmp_path):
    pytest.importorskip("trl", reason="TRL is the benchmark extra: pip install -e '.[bench]'")
    from benchmarks.pref_bench import trl_args

    args, cfg = trl_args(kind, str(tmp_path), steps=7)
    want = yaml.safe_load(CONFIGS[kind].read_text())
    assert args.max_steps == 7 and args.learning_rate == want["model"]["lr"]
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == 16  # pairs per step, as ours
    assert args.lr_scheduler_type == "cosine_with_min_lr" and args.warmup_steps == want["model"]["warmup_steps"]
    assert (args.adam_beta1, args.adam_beta2, args.weight_decay) == (0.9, 0.95, 0.0)
    assert args.max_grad_norm == 1.0 and args.gradient_checkpointing is False  # TRL's default is True; ours is off
    if kind == "dpo":
        assert args.beta == want["model"]["beta"] and args.loss_type == ["sigmoid"]


def test_report_states_the_ratios_of_both_comparisons():
    def side(pairs_per_sec, per_cpu, **extra):
        sp = {"sec_per_step": 16 / pairs_per_sec, "pairs_per_sec": pairs_per_sec, "cpu_sec_per_step": 16 / per_cpu,
              "pairs_per_cpu_sec": per_cpu, "reference_s": 3.0, "pairs_per_sec_total": pairs_per_sec / 2}
        return {"speed": sp, **extra}

    rm = {"ours": side(30.0, 20.0, accuracy=0.95), "trl": side(20.0, 10.0, accuracy=0.9)}
    em = {"exact_match": 0.6}
    dpo = {"ours": side(9.0, 6.0, em=em), "pre": side(6.0, 4.0, em=em), "nopre": side(3.0, 3.0, em=em)}
    a = argparse.Namespace(sft="S", tokenizer="T", pairs="P", pairs_src="PS", task_val="V", rm_steps=150, dpo_steps=100,
                           warmup=10, eval_rows=300)
    body = report(rm, dpo, {"exact_match": 0.5}, a, "load average 1.00, 1.00, 1.00")
    assert "Ours / TRL: 1.50x pairs/s wall clock, 2.00x pairs per CPU second." in body
    assert "Ours / TRL (precompute on): 1.50x pairs/s wall clock, 1.50x pairs per CPU second." in body
    assert "Ours / TRL (precompute off): 3.00x pairs/s wall clock, 2.00x pairs per CPU second." in body
    assert "| ours | 150 | 0.533 | 30.0 | 0.800 | 20.0 | 95.0% |" in body
    assert "`python -m benchmarks.pref_bench --sft S --tokenizer T --pairs P --pairs_src PS --task_val V " in body
    assert "| SFT model (before DPO) | 0 |" in body and "50.0%" in body
    # The caption states the β both sides trained with: the config's (it once said 0.1 whatever the config held).
    dpo_model = yaml.safe_load(CONFIGS["dpo"].read_text())["model"]
    assert f"DPO (beta {dpo_model['beta']:g}, sigmoid, lr {dpo_model['lr']:g})" in body
