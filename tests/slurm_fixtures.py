"""Pytest fixtures and helpers for tests that run real Slurm jobs (tests/test_slurm.py).

`slurm_cluster` (session scope) brings up slurm.local_cluster's two-node cluster in a temporary
folder — installing Debian's Slurm and munge first when they are missing — and stops exactly
the daemons it started when the session ends. It skips only when Slurm is missing and cannot be
installed (not root, or no apt-get); any other failure is an error.

    from slurm_fixtures import slurm_cluster, SlurmJobs   # in a test module under tests/
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `slurm` is a top-level folder of the repository, not an installed package

from slurm.local_cluster import ClusterUnavailable, LocalCluster  # noqa: E402


class SlurmJobs:
    """Submit to and watch one cluster. Jobs run in the repository (GPT_REPO) with this
    interpreter (PYTHON); their logs land under `workdir`/runs/slurm."""

    def __init__(self, cluster: LocalCluster, workdir: Path):
        self.cluster = cluster
        self.workdir = workdir
        (workdir / "runs" / "slurm").mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, **cluster.env, "GPT_REPO": str(ROOT), "PYTHON": sys.executable}

    def run(self, *argv: str, timeout: float = 60) -> str:
        """Run a command (sbatch, a launcher script, scontrol, ...) on this cluster; its stdout."""
        r = subprocess.run([str(a) for a in argv], cwd=self.workdir, env=self.env, capture_output=True,
                           text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, argv))} failed ({r.returncode}): {r.stderr.strip()}")
        return r.stdout

    def sbatch(self, *args: str) -> str:
        """Submit; the job id."""
        return self.run("sbatch", "--parsable", *args).strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o` as a dict (JobState, ExitCode, Restarts, ...); {} once it is gone."""
        out = self.run("scontrol", "show", "job", "-o", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, *job_ids: str, timeout: float = 300) -> dict[str, dict[str, str]]:
        """Poll squeue until the jobs have left the queue; each job's final scontrol record."""
        end = time.monotonic() + timeout
        while self.run("squeue", "-h", "-j", ",".join(job_ids)).strip():
            if time.monotonic() > end:
                states = {j: self.job(j).get("JobState") for j in job_ids}
                self.run("scancel", *job_ids)
                raise TimeoutError(f"jobs still queued after {timeout:.0f} s: {states}")
            time.sleep(0.25)
        return {j: self.job(j) for j in job_ids}

    def wait_for(self, predicate, timeout: float, what: str, job_id: Optional[str] = None) -> None:
        """Poll `predicate()` until true; fail early if `job_id` has ended meanwhile."""
        end = time.monotonic() + timeout
        polls = 0
        while not predicate():
            polls += 1
            # The predicate is polled fast (a signal may have to land within a second); the
            # queue, which costs a client call, once a second.
            if job_id is not None and polls % 20 == 0 and not self.run("squeue", "-h", "-j", job_id).strip():
                if predicate():
                    return
                raise AssertionError(f"job {job_id} ended before {what}: {self.job(job_id)}")
            if time.monotonic() > end:
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.05)


def assert_completed(record: dict[str, str], log: Optional[Path] = None) -> None:
    """The job completed with exit code 0; shows its log when not."""
    if record.get("JobState") != "COMPLETED" or record.get("ExitCode") != "0:0":
        text = log.read_text()[-4000:] if log is not None and log.exists() else "(no log)"
        raise AssertionError(f"job {record.get('JobId')}: {record.get('JobState')} "
                             f"exit {record.get('ExitCode')}\n--- log ---\n{text}")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> Iterator[LocalCluster]:
    t0 = time.monotonic()
    cluster = LocalCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except ClusterUnavailable as e:
        pytest.skip(f"no Slurm cluster: {e}")
    print(f"\nslurm cluster up in {time.monotonic() - t0:.1f} s ({cluster.dir})", file=sys.stderr)
    yield cluster
    cluster.stop()


@pytest.fixture
def slurm_jobs(slurm_cluster: LocalCluster, tmp_path: Path) -> SlurmJobs:
    return SlurmJobs(slurm_cluster, tmp_path)
