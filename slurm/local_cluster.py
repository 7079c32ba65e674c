"""A real two-node Slurm cluster on this one machine, for tests and for trying the sbatch scripts.

    python -m slurm.local_cluster up              # install Slurm + munge if missing, start the daemons
    eval "$(python -m slurm.local_cluster env)"   # export SLURM_CONF for sbatch/squeue/scontrol
    sbatch -N2 --wrap 'srun hostname'
    python -m slurm.local_cluster down            # stop exactly the processes `up` started

`up` needs root. When Slurm is not installed it runs `apt-get update && apt-get install -y
--no-install-recommends slurmctld slurmd slurm-client munge` (Debian 12: Slurm 22.05, ~15 s).
Then, all under one private folder (default /tmp/gpt-pipeline-slurm, `--dir` to change it):
munged with its own root-owned key (Debian's key belongs to the munge user and munged refuses it
as root), slurmctld, and two slurmd "nodes" n1 and n2 on 127.0.0.1 with distinct ports, each
offering all of this machine's CPUs (they share the real cores). No systemd, no cgroups:
proctrack/linuxproc, task/none. The daemons run in the foreground of their own sessions, so the
PIDs written to DIR/cluster.json are the daemons themselves; `down` (or LocalCluster.stop())
cancels the cluster's jobs and then signals exactly those PIDs.

In Python (tests/slurm_fixtures.py uses this):

    cluster = LocalCluster(Path("/tmp/x")); cluster.start(); cluster.env  # {"SLURM_CONF": ...}
    cluster.stop()
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "sinfo", "scancel")
NODES = ("n1", "n2")
DEFAULT_DIR = Path("/tmp/gpt-pipeline-slurm")


class ClusterUnavailable(RuntimeError):
    """Slurm is missing and cannot be installed here (not root, or no apt-get): tests skip on this."""


def missing_programs() -> list[str]:
    return [p for p in PROGRAMS if shutil.which(p, path=_sbin_path()) is None]


def _sbin_path() -> str:
    # Daemons live in /usr/sbin, which a non-login PATH may lack.
    return os.environ.get("PATH", "") + ":/usr/sbin:/sbin"


def ensure_installed() -> None:
    """Install Debian's Slurm and munge when any of their programs is missing."""
    if not missing_programs():
        return
    if os.geteuid() != 0:
        raise ClusterUnavailable("Slurm is not installed and installing it needs root")
    if shutil.which("apt-get") is None:
        raise ClusterUnavailable("Slurm is not installed and there is no apt-get to install it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # The packages try to start their services; policy-rc.d refuses that here, which is fine:
    # this module starts the daemons itself.
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:  # apt is there but failed: an error to see, not a reason to skip
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()[-400:]}")
    still = missing_programs()
    if still:
        raise RuntimeError(f"installed {' '.join(PACKAGES)} but {', '.join(still)} still missing")


def free_ports(n: int) -> list[int]:
    """n TCP ports free right now on 127.0.0.1 (held open together so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def node_hardware() -> str:
    """This machine's CPUs/sockets/cores/memory as slurmd reports them (`slurmd -C`)."""
    out = subprocess.run([shutil.which("slurmd", path=_sbin_path()), "-C"], capture_output=True, text=True,
                         check=True).stdout
    first = out.splitlines()[0].split()
    return " ".join(f for f in first if not f.startswith(("NodeName=", "UpTime=")))


def slurm_conf(d: Path, ctld_port: int, node_ports: list[int]) -> str:
    hw = node_hardware()
    nodes = "\n".join(f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={p} {hw} State=UNKNOWN"
                      for n, p in zip(NODES, node_ports))
    return f"""\
# Written by slurm/local_cluster.py: a two-node cluster on one machine, no cgroups, no accounting.
ClusterName=gptlocal
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket={d / 'munge' / 'munge.socket'},cred_expire=10
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SchedulerType=sched/backfill
# Quick turnaround for tests: frequent scheduling passes, short kill grace.
SchedulerParameters=sched_interval=2,bf_interval=2
KillWait=5
MinJobAge=600
StateSaveLocation={d / 'state'}
SlurmdSpoolDir={d / 'spool'}/%n
SlurmctldPidFile={d / 'run'}/slurmctld.pid
SlurmdPidFile={d / 'run'}/slurmd-%n.pid
SlurmctldLogFile={d / 'log'}/slurmctld.log
SlurmdLogFile={d / 'log'}/slurmd-%n.log
{nodes}
PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""


class LocalCluster:
    """Start/stop munged + slurmctld + slurmd n1, n2 under one private folder."""

    def __init__(self, directory: Path = DEFAULT_DIR):
        self.dir = Path(directory).resolve()
        self.conf = self.dir / "slurm.conf"
        self.state_file = self.dir / "cluster.json"
        self.pids: dict[str, int] = {}

    @property
    def env(self) -> dict[str, str]:
        """Environment additions for client commands (sbatch, squeue, ...)."""
        return {"SLURM_CONF": str(self.conf), "PATH": _sbin_path()}

    def command(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster."""
        return subprocess.run(list(args), env={**os.environ, **self.env}, capture_output=True, text=True,
                              check=check, timeout=timeout)

    def start(self, timeout: float = 60) -> None:
        if os.geteuid() != 0:  # slurmd runs jobs as their users and munged as root here
            raise ClusterUnavailable("the local Slurm cluster runs its daemons as root")
        ensure_installed()
        if self.state_file.exists():
            raise RuntimeError(f"{self.state_file} exists: a cluster may be running; "
                               f"`python -m slurm.local_cluster down --dir {self.dir}` first")
        for sub in ("munge", "state", "spool", "run", "log"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        os.chmod(self.dir / "munge", 0o700)  # munged insists on a private key folder
        ports = free_ports(1 + len(NODES))
        self.conf.write_text(slurm_conf(self.dir, ports[0], ports[1:]))
        try:
            self._start_munged()
            self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
            for node in NODES:
                self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
            self._save_state()
            self.wait_idle(timeout)
        except BaseException:
            self.stop()
            raise

    def _start_munged(self) -> None:
        m = self.dir / "munge"
        key = m / "munge.key"
        if not key.exists():
            key.write_bytes(secrets.token_bytes(1024))
        os.chmod(key, 0o400)
        self._spawn("munged", ["munged", "--foreground", "--force", f"--socket={m / 'munge.socket'}",
                               f"--key-file={key}", f"--pid-file={m / 'munged.pid'}",
                               f"--seed-file={m / 'munge.seed'}", f"--log-file={self.dir / 'log' / 'munged.log'}"])
        self._wait(lambda: (m / "munge.socket").exists(), 10, "munged socket")

    def _spawn(self, name: str, argv: list[str]) -> None:
        exe = shutil.which(argv[0], path=_sbin_path())
        log = open(self.dir / "log" / f"{name}.stdout", "ab")
        # Own session: a Ctrl-C in the caller's terminal does not reach the daemons; `down` does.
        proc = subprocess.Popen([exe, *argv[1:]], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                env={**os.environ, **self.env}, start_new_session=True)
        log.close()
        self.pids[name] = proc.pid
        self._save_state()

    def _save_state(self) -> None:
        self.state_file.write_text(json.dumps({"pids": self.pids, "conf": str(self.conf)}, indent=1))

    def _alive(self) -> list[str]:
        return [n for n, pid in self.pids.items() if _pid_alive(pid)]

    def wait_idle(self, timeout: float) -> None:
        """Wait until sinfo reports every node idle (daemons registered and ready for jobs)."""
        def idle() -> bool:
            dead = set(self.pids) - set(self._alive())
            if dead:
                raise RuntimeError(f"{', '.join(sorted(dead))} exited; see {self.dir / 'log'}")
            r = self.command("sinfo", "-h", "-N", "-o", "%N %t", check=False, timeout=10)
            states = dict(line.split() for line in r.stdout.splitlines() if line.strip())
            return r.returncode == 0 and all(states.get(n) == "idle" for n in NODES)
        self._wait(idle, timeout, f"nodes {', '.join(NODES)} idle")

    @staticmethod
    def _wait(ok, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while not ok():
            if time.monotonic() > end:
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.2)

    @classmethod
    def attach(cls, directory: Path = DEFAULT_DIR) -> "LocalCluster":
        """The cluster `up` started in `directory` (for `down` from another process)."""
        c = cls(directory)
        if c.state_file.exists():
            c.pids = {k: int(v) for k, v in json.loads(c.state_file.read_text())["pids"].items()}
        return c

    def stop(self, timeout: float = 20) -> None:
        """Cancel this cluster's jobs, then stop exactly the daemons this cluster started."""
        if "slurmctld" in self._alive():
            self.command("scancel", "--full", "--user", "root", check=False, timeout=10)
            try:
                self._wait(lambda: not self.command("squeue", "-h", check=False, timeout=10).stdout.strip(),
                           timeout, "jobs to end")
            except TimeoutError:
                pass  # stopping the daemons anyway; leftover job steps die with their slurmstepd
        # slurmd before slurmctld (no node-down noise), munged last (the others talk through it).
        order = [n for n in self.pids if n.startswith("slurmd")] + ["slurmctld", "munged"]
        for name in order:
            pid = self.pids.get(name)
            if pid is not None:
                _terminate(pid, timeout)
        self.pids = {}
        self.state_file.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)  # reap our own child if it exited
        if waited == pid:
            return False
    except ChildProcessError:
        pass  # not our child (started by `up` in another process)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return _cmdline(pid) != "" and not _is_zombie(pid)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _terminate(pid: int, timeout: float) -> None:
    """SIGTERM, then SIGKILL after `timeout` s, to one PID if it is still one of our daemons."""
    if not _pid_alive(pid) or not any(d in _cmdline(pid) for d in ("munged", "slurmctld", "slurmd")):
        return  # gone, or the PID was reused by an unrelated process
    os.kill(pid, signal.SIGTERM)
    end = time.monotonic() + timeout
    while _pid_alive(pid):
        if time.monotonic() > end:
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.1)


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m slurm.local_cluster", description=__doc__.split("\n")[0])
    ap.add_argument("action", choices=["up", "down", "env", "status"])
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"private folder (default {DEFAULT_DIR})")
    args = ap.parse_args(argv)
    if args.action == "up":
        t0 = time.monotonic()
        cluster = LocalCluster(args.dir)
        try:
            cluster.start()
        except (ClusterUnavailable, RuntimeError, TimeoutError) as e:
            sys.exit(f"error: {e}")
        print(f"cluster up in {time.monotonic() - t0:.1f} s: nodes {', '.join(NODES)}; "
              f"PIDs in {cluster.state_file}", file=sys.stderr)
        print(f"export SLURM_CONF={cluster.conf}")
    elif args.action == "env":
        print(f"export SLURM_CONF={LocalCluster(args.dir).conf}")
    elif args.action == "status":
        cluster = LocalCluster.attach(args.dir)
        print(json.dumps({n: (pid, _pid_alive(pid)) for n, pid in cluster.pids.items()}))
    else:
        LocalCluster.attach(args.dir).stop()
        print(f"cluster in {args.dir} stopped", file=sys.stderr)


if __name__ == "__main__":
    main()
