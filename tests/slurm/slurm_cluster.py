"""A throw-away one-node SLURM cluster on this host, for testing the batch scripts for real.

Debian's slurm-wlm and munge are installed with apt-get when missing (root only). Every
daemon runs in the foreground as our child, with its key, socket, state, spool, logs and
ports inside one temporary directory, so nothing in /etc or /run is touched and stop()
leaves no process behind. Client commands find the cluster through ``env`` (SLURM_CONF).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "sinfo", "scancel")


class SlurmUnavailable(Exception):
    """SLURM cannot be provided on this machine: a reason to skip, not a failure."""


def ensure_installed(timeout: float = 900) -> None:
    """Install slurm-wlm and munge with apt-get unless their commands are already there."""
    if all(shutil.which(cmd) for cmd in DAEMONS + CLIENTS):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("slurm-wlm/munge are not installed and installing them needs root")
    if not shutil.which("apt-get"):
        raise SlurmUnavailable("slurm-wlm/munge are not installed and there is no apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # Wait for a dpkg lock held by another apt run instead of failing at once.
    apt = ["apt-get", "-q", "-o", "DPkg::Lock::Timeout=120"]
    for cmd in (apt + ["update"], apt + ["install", "-y", "slurm-wlm", "munge"]):
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise SlurmUnavailable(f"`{' '.join(cmd)}` took more than {timeout:.0f} s") from None
        if done.returncode != 0:
            tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
            raise SlurmUnavailable(f"`{' '.join(cmd)}` failed: {' | '.join(tail)}")
    missing = [cmd for cmd in DAEMONS + CLIENTS if not shutil.which(cmd)]
    if missing:
        raise SlurmUnavailable(f"installed slurm-wlm/munge but still missing {missing}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Cluster:
    """munged + slurmctld + slurmd for one node (this host), all under ``root``."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.node = socket.gethostname().split(".")[0]  # what `hostname -s` says
        self.cpus = os.cpu_count() or 1
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.processes: list[subprocess.Popen] = []  # their output goes to log/<name>.out

    # -- set-up ---------------------------------------------------------------------
    def _write_files(self) -> None:
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # munged refuses a socket directory that others cannot traverse.
        os.chmod(self.root, 0o755)
        os.chmod(self.root / "munge", 0o755)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        root = self.root
        self.conf.write_text(f"""\
ClusterName=meshmpi-test
SlurmctldHost={self.node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
# No cgroups in a container: track processes by /proc and leave task binding alone.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
# {self.cpus} real CPUs; jobs that want more ranks than that submit with --overcommit.
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=test Nodes={self.node} Default=YES MaxTime=30 State=UP OverSubscribe=FORCE
""")

    def _spawn(self, name: str, *args: str) -> None:
        log = open(self.root / "log" / f"{name}.out", "wb")
        self.processes.append(subprocess.Popen([name, *args], stdout=log, stderr=subprocess.STDOUT,
                                               env=self.env, start_new_session=True))
        log.close()  # the child holds its own copy

    def logs(self, lines: int = 15) -> str:
        """The tail of every daemon log, for failure messages."""
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            tail = path.read_text(errors="replace").strip().splitlines()[-lines:]
            parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)

    def start(self, timeout: float = 60) -> None:
        self._write_files()
        munge = self.root / "munge"
        self._spawn("munged", "--foreground", "--force", f"--socket={munge}/munge.socket",
                    f"--key-file={munge}/munge.key", f"--pid-file={munge}/munged.pid",
                    f"--seed-file={munge}/munged.seed", f"--log-file={munge}/munged.log")
        self._wait_for(lambda: (munge / "munge.socket").exists(), "munged to create its socket", 10)
        self._spawn("slurmctld", "-D", "-f", str(self.conf))
        self._spawn("slurmd", "-D", "-f", str(self.conf))
        self._wait_for(lambda: self.run("sinfo", "-h", "-o", "%T").stdout.strip() == "idle",
                       f"node {self.node} to become idle in sinfo", timeout)

    def _wait_for(self, ready, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(proc.poll() is not None for proc in self.processes):
                raise RuntimeError(f"a SLURM daemon exited while waiting for {what}\n{self.logs()}")
            if ready():
                return
            time.sleep(0.5)
        raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.logs()}")

    # -- use ------------------------------------------------------------------------
    def run(self, *cmd: str, timeout: float = 30, **kwargs) -> subprocess.CompletedProcess:
        """A client command (sinfo, sbatch, srun, ...) against this cluster."""
        kwargs.setdefault("env", self.env)
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)

    # -- tear-down ------------------------------------------------------------------
    def stop(self) -> None:
        """Cancel leftover jobs, then stop the daemons, newest first. Never raises."""
        if self.processes:
            try:
                self.run("scancel", "--user", "root", timeout=10)
                time.sleep(1)  # let slurmd deliver the signals to the job steps
            except (OSError, subprocess.SubprocessError):
                pass
        for proc in reversed(self.processes):
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self.processes.clear()
