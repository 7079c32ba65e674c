"""Real Slurm jobs on a two-node cluster on this machine (slurm/local_cluster.py): the project's
sbatch scripts for data prep and pretraining, and preemption with requeue and exact resume.

    .venv/bin/python -m pytest tests/test_slurm.py -m cluster -v

The session fixture installs Slurm + munge when missing (root + apt-get; otherwise the tests
skip), starts munged, slurmctld and slurmd n1, n2, and stops them at the end.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from slurm_fixtures import ROOT, SlurmJobs, assert_completed, slurm_cluster, slurm_jobs  # noqa: F401
from tests.pretrain_fixtures import read_wandb_run

pytestmark = pytest.mark.cluster


def test_srun_spans_both_nodes(slurm_jobs: SlurmJobs):
    job = slurm_jobs.sbatch("-N2", "--ntasks-per-node=2", "--output=runs/slurm/%x-%j.out", "--job-name=smoke",
                            "--wrap", "srun bash -c 'echo $SLURMD_NODENAME $SLURM_PROCID'")
    record = slurm_jobs.wait(job, timeout=60)[job]
    log = slurm_jobs.workdir / "runs" / "slurm" / f"smoke-{job}.out"
    assert_completed(record, log)
    ranks = sorted(tuple(line.split()) for line in log.read_text().splitlines() if line.strip())
    assert ranks == [("n1", "0"), ("n1", "1"), ("n2", "2"), ("n2", "3")]


@pytest.fixture(scope="session")
def tokenizer_json(tmp_path_factory, shakespeare_path: Path) -> Path:
    from data_prep.train_tokenizer import train_tokenizer
    out = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(str(shakespeare_path), str(out), vocab_size=4096)
    return out


def test_data_prep_array_and_merge(slurm_jobs: SlurmJobs, tokenizer_json: Path, shakespeare_path: Path,
                                   tmp_path: Path):
    from data_prep.make_shards import make_shards
    from gpt.shards import TokenShards

    out = tmp_path / "shards"
    ids = slurm_jobs.run(ROOT / "slurm" / "data_prep.sh", "--tasks", "3", "--", "--source", shakespeare_path,
                         "--tokenizer", tokenizer_json, "--out", out, "--val_fraction", "0.1",
                         "--progress", "false")
    array_id, merge_id = ids.split()
    records = slurm_jobs.wait(array_id, merge_id, timeout=180)
    logs = slurm_jobs.workdir / "runs" / "slurm"
    for task in range(3):
        assert (logs / f"gpt-data-prep-{array_id}_{task}.out").exists()
    assert_completed(records[array_id], logs / f"gpt-data-prep-{array_id}_0.out")
    assert_completed(records[merge_id], logs / f"gpt-data-prep-merge-{merge_id}.out")

    single = tmp_path / "single"
    make_shards(str(shakespeare_path), str(tokenizer_json), str(single), val_fraction=0.1, num_tasks=1,
                progress=False)
    for split in ("train", "val"):
        arrayed, alone = TokenShards(out, split, verify_sha256=True), TokenShards(single, split)
        assert arrayed.manifest["num_tasks"] == 3
        assert arrayed.num_tokens == alone.num_tokens > 0
        assert arrayed.num_documents == alone.num_documents
        assert len({r["file"] for r in arrayed.records}) > 1  # the tasks really split the work


# --- pretraining through slurm/pretrain.sbatch ---------------------------------------------

MAX_STEPS = 12
CKPT_EVERY = 4
KEEP_CALLBACKS = ("NonFiniteGuard",)


@pytest.fixture(scope="session")
def shards_dir(tmp_path_factory, tokenizer_json: Path, shakespeare_path: Path) -> Path:
    from data_prep.make_shards import make_shards
    out = tmp_path_factory.mktemp("shards")
    make_shards(str(shakespeare_path), str(tokenizer_json), str(out), val_fraction=0.1, progress=False)
    return out


def tiny_config(path: Path, run_dir: Path, shards: Path, tokenizer: Path) -> Path:
    """recipes/configs/tiny-cpu.yaml shrunk to seconds per step, its run directory `run_dir`:
    the CPU overrides a Slurm test needs, written as a config (the sbatch script takes any)."""
    import yaml
    cfg = yaml.safe_load((ROOT / "recipes" / "configs" / "tiny-cpu.yaml").read_text())
    cfg.update(run_dir=str(run_dir), checkpoint_every=CKPT_EVERY, keep_checkpoints=-1, val_every=0, print_every=4)
    t = cfg["trainer"]
    t.update(max_steps=MAX_STEPS, log_every_n_steps=1, precision="32-true")
    # Generation samples cost more than these steps.
    t["callbacks"] = [c for c in t["callbacks"] if c["class_path"].rsplit(".", 1)[1] in KEEP_CALLBACKS]
    cfg["model"]["model_config"].update(n_layer=2, n_head=2, n_embd=64, block_size=64)
    cfg["data"].update(data_dir=str(shards), tokenizer=str(tokenizer), block_size=64, micro_batch_size=4,
                       val_windows=4)
    path.write_text(yaml.safe_dump(cfg))
    return path


def submit_pretrain(jobs: SlurmJobs, config: Path, name: str, nodes: int, per_node: int) -> str:
    return jobs.sbatch(f"--nodes={nodes}", f"--ntasks-per-node={per_node}", f"--job-name={name}",
                       str(ROOT / "slurm" / "pretrain.sbatch"), str(config), "--trainer.strategy", "ddp")


def step_losses(run_dir: Path) -> dict[int, float]:
    """step -> train/loss from every CSVLogger version of a run (a requeued run adds one)."""
    import csv
    losses: dict[int, float] = {}
    for metrics in sorted((run_dir / "csv").glob("version_*/metrics.csv")):
        for row in csv.DictReader(metrics.open()):
            if row.get("train/loss"):
                step = int(row["step"])
                assert step not in losses, f"step {step} trained twice ({metrics})"
                losses[step] = float(row["train/loss"])
    return losses


def checkpoint_step(path: Path) -> int:
    import torch
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def test_pretrain_two_nodes_ddp(slurm_jobs: SlurmJobs, shards_dir: Path, tokenizer_json: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    config = tiny_config(tmp_path / "tiny.yaml", run_dir, shards_dir, tokenizer_json)
    job = submit_pretrain(slurm_jobs, config, "pretrain-ddp", nodes=2, per_node=2)
    log = slurm_jobs.workdir / "runs" / "slurm" / f"pretrain-ddp-{job}.out"
    assert_completed(slurm_jobs.wait(job, timeout=400)[job], log)

    text = log.read_text()
    assert "2 node(s) x 2 task(s) on n[1-2]" in text
    for rank in range(4):
        assert f"GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/4" in text
    assert checkpoint_step(run_dir / "checkpoints" / "last.ckpt") == MAX_STEPS
    losses = step_losses(run_dir)
    assert sorted(losses) == list(range(MAX_STEPS))
    assert list(run_dir.glob("wandb/offline-run-*/run-*.wandb")), "no offline W&B run file"
    # The job log is a file: plain progress lines, from rank 0 only, with the step's loss.
    lines = re.findall(r"^step (\d+)/12 \| loss (\d+\.\d{4}) \|", text, re.M)
    assert [int(s) for s, _ in lines] == [4, 8, 12]
    assert all(abs(float(loss) - losses[int(s) - 1]) < 6e-5 for s, loss in lines)


def test_preempted_job_requeues_and_resumes_exactly(slurm_jobs: SlurmJobs, shards_dir: Path,
                                                     tokenizer_json: Path, tmp_path: Path):
    ref_dir, pre_dir = tmp_path / "reference", tmp_path / "preempted"
    ref = submit_pretrain(slurm_jobs, tiny_config(tmp_path / "ref.yaml", ref_dir, shards_dir, tokenizer_json),
                          "pretrain-ref", nodes=2, per_node=1)
    job = submit_pretrain(slurm_jobs, tiny_config(tmp_path / "pre.yaml", pre_dir, shards_dir, tokenizer_json),
                          "pretrain-pre", nodes=2, per_node=1)
    logs = slurm_jobs.workdir / "runs" / "slurm"

    # Preempt as `--signal=USR1@90` would near the time limit, as soon as every rank can take it
    # (earlier, SIGUSR1 would kill a process still importing): on a fast machine the whole run
    # may take a second, and the signal must land before its last step.
    log = logs / f"pretrain-pre-{job}.out"
    slurm_jobs.wait_for(lambda: log.exists() and log.read_text().count("RequeueOnSignal: rank") == 2,
                        timeout=300, what="both ranks ready for SIGUSR1", job_id=job)
    slurm_jobs.run("scancel", "--signal=USR1", job)
    slurm_jobs.wait_for(lambda: slurm_jobs.job(job).get("Restarts") == "1", timeout=120,
                        what="the requeue", job_id=job)

    records = slurm_jobs.wait(ref, job, timeout=400)
    assert_completed(records[ref], logs / f"pretrain-ref-{ref}.out")
    assert_completed(records[job], log)
    assert records[job]["Restarts"] == "1"
    text = log.read_text()
    stopped = int(text.split("stopping for requeue")[0].rsplit("at step ", 1)[1].split(",")[0])
    assert 1 <= stopped < MAX_STEPS, text[-3000:]
    assert f"job {job} start 1:" in text and "requeueing" in text

    assert checkpoint_step(pre_dir / "checkpoints" / "last.ckpt") == MAX_STEPS
    reference, resumed = step_losses(ref_dir), step_losses(pre_dir)
    assert sorted(resumed) == sorted(reference) == list(range(MAX_STEPS))
    assert len(list((pre_dir / "csv").glob("version_*"))) == 2  # the run really restarted
    assert resumed == reference  # every step's loss, before and after the requeue

    # One W&B run for the job: both starts log into the same run id, which holds the full config,
    # and every step's loss is there exactly once (offline files read back).
    files = sorted(pre_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2, files
    runs = [read_wandb_run(f) for f in files]
    assert len({r["id"] for r in runs}) == 1 and {r["job_type"] for r in runs} == {"pretrain"}
    for r in runs:
        t = r["config"]["trainer"]
        assert (t["precision"], str(t["devices"]), t["num_nodes"], t["max_steps"], t["accumulate_grad_batches"],
                t["gradient_clip_val"]) == ("32-true", "1", 2, MAX_STEPS, 1, 1.0)  # devices: as srun's flag gave it
        assert t["strategy"] == "ddp" and r["config"]["seed_everything"] == 1337
        assert r["config"]["run"]["world_size"] == 2 and len(r["config"]["run"]["identity"]["shards_sha256"]) == 64
    assert [r["config"]["run"]["resumed_at_step"] for r in runs] == [0, stopped]
    wandb_losses = [(row["_step"], row["train/loss"]) for r in runs for row in r["history"] if "train/loss" in row]
    assert sorted(s for s, _ in wandb_losses) == list(range(MAX_STEPS))
    assert all(abs(loss - resumed[s]) < 1e-6 for s, loss in wandb_losses)


def test_layout_mismatch_fails_fast_with_one_line(slurm_jobs: SlurmJobs, tmp_path: Path):
    config = tmp_path / "any.yaml"
    config.write_text("trainer: {}\n")
    job = slurm_jobs.sbatch("-N2", "--ntasks-per-node=1", "--job-name=mismatch", str(ROOT / "slurm" / "pretrain.sbatch"),
                            str(config), "--trainer.devices", "2")
    record = slurm_jobs.wait(job, timeout=60)[job]
    assert record["JobState"] == "FAILED"
    log = (slurm_jobs.workdir / "runs" / "slurm" / f"mismatch-{job}.out").read_text()
    assert log.strip() == "error: --trainer.devices=2 but Slurm gave 1 (nodes=2, ntasks-per-node=1)"


# --- SFT through slurm/train.sbatch sft CONFIG (helper sft) ------------------------------------

SFT_STEPS = 8


@pytest.fixture(scope="session")
def sft_inputs(tmp_path_factory, tokenizer_json: Path) -> dict[str, Path]:
    """Demo-task SFT data (held-out file too) and a small starting checkpoint on the demo tokenizer."""
    import torch

    from data_prep.make_demo_task import make_demo_task
    from data_prep.make_sft import make_sft
    from gpt.checkpoint import load_tokenizer, save_model
    from gpt.config import GPTConfig
    from gpt.model import GPT
    d = tmp_path_factory.mktemp("sft")
    make_demo_task(str(d / "task"), train=600, val=40)
    make_sft(str(d / "task" / "train.jsonl"), str(tokenizer_json), str(d / "data"), block_size=64,
             val_source=str(d / "task" / "val.jsonl"), progress=False)
    tok = load_tokenizer(tokenizer_json)
    torch.manual_seed(0)
    init = GPT(GPTConfig.from_preset("tiny", n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=tok.vocab_size))
    save_model(init, d / "init", tokenizer=tok)
    return {"data": d / "data", "val": d / "task" / "val.jsonl", "init": d / "init"}


def sft_config(path: Path, run_dir: Path, inputs: dict[str, Path], tokenizer: Path) -> Path:
    """recipes/configs/sft-tiny-cpu.yaml shrunk to seconds, its run directory `run_dir`."""
    import yaml
    cfg = yaml.safe_load((ROOT / "recipes" / "configs" / "sft-tiny-cpu.yaml").read_text())
    cfg.update(run_dir=str(run_dir), init_from=str(inputs["init"]), checkpoint_every=4, keep_checkpoints=-1,
               val_every=SFT_STEPS, print_every=4)
    cfg["trainer"].update(max_steps=SFT_STEPS, log_every_n_steps=1)
    for c in cfg["trainer"]["callbacks"]:
        if c["class_path"].endswith("ChatEval"):
            c["init_args"].update(data=str(inputs["val"]), examples=40, max_new_tokens=6, batch_size=20)
    cfg["model"]["model_config"].update(n_layer=2, n_head=2, n_embd=64, block_size=64)
    cfg["data"].update(data_dir=str(inputs["data"]), tokenizer=str(tokenizer), block_size=64, micro_batch_size=4,
                       val_examples=16)
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_sft_two_nodes_through_train_sbatch(slurm_jobs: SlurmJobs, sft_inputs: dict[str, Path],
                                            tokenizer_json: Path, tmp_path: Path):
    """`slurm/train.sbatch sft CONFIG` on 2 nodes: the run starts from --init_from, trains, validates
    (val/loss and held-out exact-match, each rank answering half the rows) and checkpoints."""
    from gpt.chat_eval import load_eval_rows
    from gpt.checkpoint import load_model
    from gpt.evaluate import exact_match
    from tests.pretrain_fixtures import metric_by_step
    run_dir = tmp_path / "run"
    config = sft_config(tmp_path / "sft.yaml", run_dir, sft_inputs, tokenizer_json)
    job = slurm_jobs.sbatch("--nodes=2", "--ntasks-per-node=1", "--job-name=sft", str(ROOT / "slurm" / "train.sbatch"),
                            "sft", str(config), "--trainer.strategy", "ddp")
    log = slurm_jobs.workdir / "runs" / "slurm" / f"sft-{job}.out"
    assert_completed(slurm_jobs.wait(job, timeout=400)[job], log)

    text = log.read_text()
    assert "2 node(s) x 1 task(s) on n[1-2]" in text and "-m recipes.sft fit" in text
    assert f"new run from the weights of {sft_inputs['init']}" in text
    assert checkpoint_step(run_dir / "checkpoints" / "last.ckpt") == SFT_STEPS
    assert sorted(step_losses(run_dir)) == list(range(SFT_STEPS))
    assert sorted(metric_by_step(run_dir, "val/loss")) == [SFT_STEPS]
    em = metric_by_step(run_dir, "val/exact_match")
    assert sorted(em) == [0, SFT_STEPS]
    # Summed over the two ranks' halves = gpt.evaluate on all rows of the final checkpoint.
    model, tok = load_model(run_dir / "checkpoints" / "last.ckpt")
    r = exact_match(model, tok, load_eval_rows(str(sft_inputs["val"]), 40), max_new_tokens=6)
    assert abs(r["exact_match"] - em[SFT_STEPS]) < 1e-9
    assert abs(r["ended"] - metric_by_step(run_dir, "val/ended")[SFT_STEPS]) < 1e-9
    runs = [read_wandb_run(f) for f in run_dir.glob("wandb/offline-run-*/run-*.wandb")]
    assert len(runs) == 1 and runs[0]["job_type"] == "sft" and runs[0]["config"]["run"]["world_size"] == 2
