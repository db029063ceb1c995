"""A real single-node SLURM cluster for the batch backend's tests (../shared/INFRA.md): munged
(as user munge, with its own key and socket), slurmctld and slurmd on free ports, every path in a
temporary directory, so nothing of the machine's own configuration is used or changed.

Clients find the cluster through SLURM_CONF (set in the gateway's environment). Teardown cancels
every job, stops the three daemons by their pids and checks that `squeue` is empty. A run killed
before its teardown leaves all of that running; the next run stops it first (`_sweep`).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sweep

from conftest import free_port, pid_alive, processes_matching, require_infra, stop_process

MUNGED = "/usr/sbin/munged"
SLURMCTLD = "/usr/sbin/slurmctld"
SLURMD = "/usr/sbin/slurmd"


@dataclass
class SlurmCluster:
    workdir: Path
    conf: Path
    node: str
    cpus: int
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def run(self, *args: str, check: bool = True) -> str:
        return subprocess.run(
            args,
            check=check,
            capture_output=True,
            text=True,
            timeout=20,
            env={**os.environ, **self.env},
        ).stdout

    def jobs(self) -> list[str]:
        """Jobs the scheduler still holds (pending, running, completing): `id state name`."""
        out = self.run("squeue", "--noheader", "--format=%i %T %j", check=False)
        return [line.strip() for line in out.splitlines() if line.strip()]

    def write_spec(
        self, directory: Path, name: str, config: dict[str, Any] | None = None, **over: Any
    ) -> None:
        """A kernelspec for `rkg spec add slurm` with this test's python and partition."""
        from gateway.specs import batch_spec, write_spec

        kwargs: dict[str, Any] = {"partition": "debug", "cpus": 1, "python": sys.executable}
        kwargs.update(over)
        spec = batch_spec("slurm", **kwargs)
        spec["metadata"]["kernel_provisioner"]["config"].update(config or {})
        write_spec(name, spec, str(directory))

    def leftovers(self, gw: Any, runtime_dir: Path | None = None) -> list[str]:
        """Jobs still queued or running, and kernel processes of the gateway's batch jobs."""
        where = runtime_dir or gw.runtime_dir
        procs = [f"pid {p}" for p in processes_matching(f"{where}/batch-kernel-")]
        return self.jobs() + procs

    def wait_no_jobs(self, timeout: float = 15) -> list[str]:
        deadline = time.monotonic() + timeout
        while (jobs := self.jobs()) and time.monotonic() < deadline:
            time.sleep(0.2)
        return jobs


def _write_conf(work: Path, node: str, cpus: int) -> Path:
    for d in ("state", "spool", "log"):
        (work / d).mkdir()
    conf = work / "slurm.conf"
    conf.write_text(
        "\n".join(
            [
                "ClusterName=rkgtest",
                f"SlurmctldHost={node}(127.0.0.1)",
                f"SlurmctldPort={free_port()}",
                f"SlurmdPort={free_port()}",
                "SlurmUser=root",
                "SlurmdUser=root",
                "AuthType=auth/munge",
                "CredType=cred/munge",
                f"AuthInfo=socket={work}/munge/munge.socket",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "JobAcctGatherType=jobacct_gather/none",
                "AccountingStorageType=accounting_storage/none",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core",
                "SchedulerType=sched/backfill",
                "ReturnToService=2",
                "MpiDefault=none",
                "KillWait=2",
                "MinJobAge=5",
                f"StateSaveLocation={work}/state",
                f"SlurmdSpoolDir={work}/spool",
                f"SlurmctldPidFile={work}/slurmctld.pid",
                f"SlurmdPidFile={work}/slurmd.pid",
                f"SlurmctldLogFile={work}/log/slurmctld.log",
                f"SlurmdLogFile={work}/log/slurmd.log",
                "SlurmctldDebug=info",
                "SlurmdDebug=info",
                f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN",
                f"PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP",
                "PartitionName=closed Nodes=ALL MaxTime=INFINITE State=DOWN",
                "",
            ]
        )
    )
    return conf


def _start_munged(work: Path) -> subprocess.Popen[bytes]:
    """munged as user munge, with a key of its own (munged insists on its ownership/modes)."""
    mdir = work / "munge"
    mdir.mkdir(mode=0o700)
    key = mdir / "munge.key"
    key.write_bytes(os.urandom(128))
    key.chmod(0o400)
    munge = pwd.getpwnam("munge")
    for p in (mdir, key):
        os.chown(p, munge.pw_uid, munge.pw_gid)
    # the socket's directory must be reachable by clients (root here) and munged checks it
    mdir.chmod(0o755)
    with open(work / "log" / "munged.err", "ab") as err:
        proc = subprocess.Popen(
            [
                "setpriv",
                "--reuid=munge",
                "--regid=munge",
                "--init-groups",
                MUNGED,
                "-F",
                "--force",
                f"--key-file={key}",
                f"--socket={mdir}/munge.socket",
                f"--pid-file={mdir}/munged.pid",
                f"--log-file={mdir}/munged.log",
                f"--seed-file={mdir}/munged.seed",
            ],
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
    _wait(lambda: (mdir / "munge.socket").exists(), proc, "munged", work / "log" / "munged.err")
    return proc


def _wait(
    ready: Callable[[], object],
    proc: subprocess.Popen[bytes],
    what: str,
    log: Path,
    timeout: float = 15,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    text = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    raise RuntimeError(f"{what} did not start:\n{text}")


def _sweep() -> None:
    """What a killed run's cluster left: its munged, slurmctld and slurmd, the slurmstepds and
    the jobs' processes (kernels) they ran, found by the run's SLURM_CONF in their environment,
    and its login node's sshd with its sessions; then those clusters' state and spool
    directories, so nothing can bring their jobs back."""
    procs = sweep.of_ended_runs(
        cmd=rf"({sweep.BASETEMP})/slurm(\d+/slurm\.conf|\d+/munge/|-login\d+/sshd\.conf)",
        comms=("munged", "slurmctld", "slurmd", "sshd"),
        env=rf"^SLURM_CONF=({sweep.BASETEMP})/slurm\d+/",
    )
    sweep.kill(procs)
    sweep.report("SLURM", [p.describe() for p in procs])
    works = {
        m.group(1)
        for p in procs
        if (m := re.search(rf"({sweep.BASETEMP}/slurm\d+)/slurm\.conf", p.cmdline))
    }
    dirs = [
        f"{w}/{d}" for w in sorted(works) for d in ("state", "spool") if os.path.isdir(f"{w}/{d}")
    ]
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
    sweep.report("SLURM state and spool directories", dirs)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    stop_process(proc, grace=10)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A one-node cluster (this machine, partition `debug`; partition `closed` is DOWN)."""
    for exe in (MUNGED, SLURMCTLD, SLURMD):
        if not os.path.exists(exe):
            require_infra(f"{exe} is missing (apt-get install slurmctld slurmd slurm-client munge)")
    for tool in ("sbatch", "squeue", "scancel", "setpriv"):
        if not shutil.which(tool):
            require_infra(f"{tool} is missing (apt-get install slurm-client)")
    if os.geteuid() != 0:
        require_infra("the test SLURM runs its daemons as root and munged as user munge")
    try:
        pwd.getpwnam("munge")
    except KeyError:
        require_infra("no user munge (apt-get install munge)")
    _sweep()
    work = tmp_path_factory.mktemp("slurm")
    # munged runs as munge and must traverse to its directory
    for parent in [work, *work.parents]:
        if parent == Path("/"):
            break
        parent.chmod(parent.stat().st_mode | 0o011)
    node = socket.gethostname().split(".")[0]
    cluster = SlurmCluster(
        work, _write_conf(work, node, os.cpu_count() or 1), node, os.cpu_count() or 1
    )
    env = {**os.environ, **cluster.env}
    try:
        cluster.procs.append(_start_munged(work))
        for argv, name in (
            ([SLURMCTLD, "-D", "-i", "-f", str(cluster.conf)], "slurmctld"),
            ([SLURMD, "-D", "-f", str(cluster.conf), "-N", node], "slurmd"),
        ):
            with open(work / "log" / f"{name}.err", "ab") as err:
                proc = subprocess.Popen(
                    argv, stdout=err, stderr=err, env=env, start_new_session=True
                )
            cluster.procs.append(proc)
            if name == "slurmctld":
                _wait(
                    lambda: (
                        subprocess.run(
                            ["scontrol", "ping"], env=env, capture_output=True, text=True
                        ).stdout.count("UP")
                        > 0
                    ),
                    proc,
                    name,
                    work / "log" / "slurmctld.log",
                )
        slurmd = cluster.procs[-1]
        _wait(
            lambda: "idle" in cluster.run("sinfo", "-h", "-p", "debug", "-o", "%T", check=False),
            slurmd,
            "slurmd",
            work / "log" / "slurmd.log",
        )
        yield cluster
    finally:
        left = []
        if len(cluster.procs) >= 2 and cluster.procs[1].poll() is None:
            left = cluster.jobs()
            if left:
                cluster.run("scancel", *[j.split()[0] for j in left], check=False)
                cluster.wait_no_jobs()
        for proc in reversed(cluster.procs):
            _stop(proc)
        stray = [p.pid for p in cluster.procs if pid_alive(p.pid)]
        assert not stray, f"SLURM daemons still running: {stray}"
        assert not left, f"jobs left in the queue: {left}"


@dataclass
class LoginNode:
    """An OpenSSH server on 127.0.0.1 standing in for a cluster's login node: its sessions
    see SLURM_CONF, so scheduler commands run there reach the test cluster."""

    config: dict[str, Any]
    runtime_dir: Path
    proc: subprocess.Popen[bytes]


@pytest.fixture(scope="session")
def slurm_login(
    slurm: SlurmCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LoginNode]:
    sshd = "/usr/sbin/sshd"
    if not os.path.exists(sshd):
        require_infra(f"{sshd} is missing (apt-get install openssh-server)")
    work = tmp_path_factory.mktemp("slurm-login")
    os.makedirs("/run/sshd", exist_ok=True)
    keys = {}
    for name in ("host", "client"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "", "-f", str(work / name)],
            check=True,
            timeout=20,
        )
        keys[name] = (work / f"{name}.pub").read_text().strip()
    (work / "authorized_keys").write_text(keys["client"] + "\n")
    port = free_port()
    (work / "known_hosts").write_text(f"[127.0.0.1]:{port} {keys['host']}\n")
    (work / "sshd.conf").write_text(
        "\n".join(
            [
                "ListenAddress 127.0.0.1",
                f"Port {port}",
                f"HostKey {work}/host",
                f"PidFile {work}/sshd.pid",
                f"AuthorizedKeysFile {work}/authorized_keys",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                "StrictModes no",
                "PermitRootLogin prohibit-password",
                "AllowTcpForwarding yes",
                "LogLevel ERROR",
                "Subsystem sftp /usr/lib/openssh/sftp-server",
                f"SetEnv SHLVL=1 SLURM_CONF={slurm.conf}",
                "",
            ]
        )
    )
    with open(work / "sshd.log", "ab") as log:
        proc = subprocess.Popen(
            [sshd, "-D", "-e", "-f", str(work / "sshd.conf")],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    try:
        for _ in range(200):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if proc.poll() is not None:
                raise RuntimeError((work / "sshd.log").read_text())
            time.sleep(0.05)
        runtime = work / "runtime"
        yield LoginNode(
            {
                "login": f"root@127.0.0.1:{port}",
                "identity_file": str(work / "client"),
                "known_hosts": str(work / "known_hosts"),
                "runtime_dir": str(runtime),
            },
            runtime,
            proc,
        )
    finally:
        _stop(proc)  # its per-connection processes end with the gateways' connections
