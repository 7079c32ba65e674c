"""Real Slurm jobs on a two-node cluster on this machine (slurm/local_cluster.py): the project's
sbatch scripts for data prep and pretraining, and preemption with requeue and exact resume.

    .venv/bin/python -m pytest tests/test_slurm.py -m cluster -v

The session fixture installs Slurm + munge when missing (root + apt-get; otherwise the tests
skip), starts munged, slurmctld and slurmd n1, n2, and stops them at the end.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from slurm_fixtures import ROOT, SlurmJobs, assert_completed, slurm_cluster, slurm_jobs  # noqa: F401

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
