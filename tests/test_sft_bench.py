"""benchmarks/sft_bench.py: the arithmetic of its table (timed window, CPU time, TRL-style loss windows).

    .venv/bin/python -m pytest tests/test_sft_bench.py -q

The benchmark itself (our recipe vs TRL's SFTTrainer, minutes) runs by hand: python -m benchmarks.sft_bench.
"""
import argparse

from benchmarks.sft_bench import LOG_EVERY, loss_windows, report, throughput


def test_throughput_times_the_steps_after_warmup():
    ends = [10.0, 11.0, 13.0, 16.0]   # step ends: steps 2..3 (after warmup=1) took 5 s
    cpu = [1.0, 3.0, 7.0, 11.0]       # and 8 CPU seconds
    total, sup = [100, 200, 300, 500], [10, 20, 30, 50]
    r = throughput(ends, cpu, total, sup, warmup=1)
    assert r["steps_timed"] == 2 and r["seconds"] == 5.0 and r["sec_per_step"] == 2.5
    assert r["tokens_per_sec"] == 800 / 5 and r["supervised_per_sec"] == 80 / 5
    assert r["cpu_sec_per_step"] == 4.0 and r["tokens_per_cpu_sec"] == 800 / 8
    assert r["tokens_per_step"] == 400 and r["supervised_per_step"] == 40


def test_loss_windows_average_like_trl_logging_steps():
    losses = [float(i) for i in range(25)]  # steps 1..25; TRL logs at steps 10 and 20 only
    assert loss_windows(losses) == [[10, 4.5], [20, 14.5]]
    assert LOG_EVERY == 10


def test_report_states_both_ratios_and_the_loss_curve():
    def side(tps, cps, losses):
        speed = {"sec_per_step": 1.0, "tokens_per_sec": tps, "supervised_per_sec": tps / 8, "cpu_sec_per_step": 2.0,
                 "tokens_per_cpu_sec": cps, "tokens_per_step": 2000.0}
        return {"speed": speed, "em": {"exact_match": 0.5, "ended": 1.0}, "clock": {"losses": losses}}

    results = {"ours": side(300.0, 150.0, [[10, 3.0], [20, 2.0]]), "trl": side(200.0, 100.0, [[10, 3.5], [20, 2.5]])}
    body = report(results, {"exact_match": 0.0, "ended": 0.0}, argparse.Namespace(init="CKPT", steps=20, warmup=2,
                                                                                 eval_rows=30))
    assert "Ours / TRL: 1.50x tokens/s wall clock, 1.50x tokens per CPU second." in body
    assert "| step | 10 | 20 |" in body and "| ours | 3.000 | 2.000 |" in body and "| trl | 3.500 | 2.500 |" in body
    assert "| base model (no SFT) | 0 |" in body and "50.0%" in body
