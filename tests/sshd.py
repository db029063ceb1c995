"""Real OpenSSH servers as remote hosts, each in its own network namespace with its own address
and hostname (../shared/INFRA.md), for the SSH backend's tests.

    root ns ──veth── rhost1 (sshd)          10.200.B.2
            ──veth── rhost2 (sshd)          10.200.B+1.2
            ──veth── rdown  (no sshd)       10.200.B+2.2   refuses connections
            ──veth── rjump  (sshd) ──veth── rinner (sshd)  10.200.B+4.2, only via rjump

Network safety: a blackhole route for this run's /20 (B is picked free) is added before the
first namespace and removed after the last one is gone, so nothing addressed to a test host
ever leaves the machine. Keys and known_hosts are per test session, in a temporary directory.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from conftest import pid_alive, require_infra

SSHD = "/usr/sbin/sshd"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"
REMOTE_PYTHON = str(Path(__file__).resolve().parent.parent / ".venv" / "bin" / "python")


def sh(*args: str, check: bool = True) -> str:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=20).stdout


def _ppid_and_comm(pid: int) -> tuple[int, str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            head, _, tail = f.read().rpartition(")")
    except OSError:
        return None
    return int(tail.split()[1]), head.partition("(")[2]


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@dataclass
class RemoteHost:
    """One namespace; `addr` is where its sshd listens (port 22)."""

    name: str
    ns: str
    addr: str
    workdir: Path
    proc: subprocess.Popen | None = None
    host_pub: str = ""

    def pids(self) -> list[int]:
        return [int(p) for p in sh("ip", "netns", "pids", self.ns, check=False).split()]

    def kernels(self) -> list[str]:
        """ipykernel processes running inside this namespace."""
        return [f"{self.name}:{p}" for p in self.pids()
                if "ipykernel" in _cmdline(p) and pid_alive(p)]

    def start_sshd(self, timeout: float = 10) -> None:
        conf = self.workdir / f"sshd-{self.name}.conf"
        log = open(self.workdir / f"sshd-{self.name}.log", "ab")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, "unshare", "--uts", "sh", "-c",
             f"hostname {self.name}; exec {SSHD} -D -e -f {conf}"],
            stdout=log, stderr=log, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = sh("ip", "netns", "exec", self.ns, "ss", "-ltnH", "sport = :22", check=False)
            if out.strip():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"sshd on {self.name} did not start: "
                           f"{(self.workdir / f'sshd-{self.name}.log').read_text()}")

    def stop_sshd(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None
        for pid in self.sshd_children():
            os.kill(pid, signal.SIGKILL)

    def sshd_children(self) -> list[int]:
        """The per-connection sshd processes (everything named sshd in the namespace but the
        listener)."""
        listener = self.proc.pid if self.proc else -1
        out = []
        for pid in self.pids():
            info = _ppid_and_comm(pid)
            if info and info[1] == "sshd" and pid != listener and pid_alive(pid):
                out.append(pid)
        return out

    def established(self) -> int:
        """TCP connections established to this sshd."""
        out = sh("ip", "netns", "exec", self.ns, "ss", "-tnH", "state", "established",
                 "( sport = :22 )", check=False)
        return len([line for line in out.splitlines() if line.strip()])


@dataclass
class SSHLab:
    workdir: Path
    client_key: Path
    known_hosts: Path
    hosts: dict[str, RemoteHost] = field(default_factory=dict)
    block: int = 0
    _links: list[str] = field(default_factory=list)

    def config(self, host: str, **over: Any) -> dict[str, Any]:
        """Provisioner config for a kernel on `host` (a name in `hosts`)."""
        h = self.hosts[host]
        cfg: dict[str, Any] = {
            "host": f"root@{h.addr}", "identity_file": str(self.client_key),
            "known_hosts": str(self.known_hosts), "python": REMOTE_PYTHON,
            "runtime_dir": str(self.workdir / "remote-runtime"),
        }
        if host == "rinner":
            cfg["jump_hosts"] = [f"root@{self.hosts['rjump'].addr}"]
        cfg.update(over)
        return cfg

    def write_spec(self, directory: Path, name: str, host: str, **over: Any) -> None:
        from gateway.specs import ssh_spec, write_spec

        spec = ssh_spec(host, display_name=f"SSH {name}")
        spec["metadata"]["kernel_provisioner"]["config"] = self.config(host, **over)
        write_spec(name, spec, str(directory))

    def leftovers(self) -> list[str]:
        return [k for h in self.hosts.values() for k in h.kernels()]


def _free_block() -> int:
    """A 10.200.B.0/20 with no route or address on this machine (the machine is shared)."""
    used = sh("ip", "-4", "route", "show", "table", "all") + sh("ip", "-4", "-o", "addr")
    taken = set()
    for word in used.split():
        parts = word.split("/")[0].split(".")
        if len(parts) == 4 and parts[:2] == ["10", "200"] and parts[2].isdigit():
            taken.add(int(parts[2]) // 16)
    for block in range(1, 16):
        if block not in taken:
            return block * 16
    raise RuntimeError("no free /20 left in 10.200.0.0/16")


def _keygen(path: Path) -> str:
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "", "-f", str(path))
    return path.with_suffix(".pub").read_text().strip()


def _link(lab: SSHLab, outer_ns: str | None, inner: RemoteHost, subnet: str) -> None:
    """A veth pair from outer_ns (None: the root namespace) into inner.ns."""
    tag = inner.ns[3:9] + inner.name[-2:]
    a, b = f"va{tag}", f"vb{tag}"
    sh("ip", "link", "add", a, "type", "veth", "peer", "name", b)
    if outer_ns is None:
        lab._links.append(a)
    else:
        sh("ip", "link", "set", a, "netns", outer_ns)
    sh("ip", "link", "set", b, "netns", inner.ns)
    pre = ["ip", "netns", "exec", outer_ns] if outer_ns else []
    sh(*pre, "ip", "addr", "add", f"{subnet}.1/24", "dev", a)
    sh(*pre, "ip", "link", "set", a, "up")
    sh("ip", "netns", "exec", inner.ns, "ip", "addr", "add", f"{subnet}.2/24", "dev", b)
    sh("ip", "netns", "exec", inner.ns, "ip", "link", "set", b, "up")


def _write_sshd_config(lab: SSHLab, host: RemoteHost) -> None:
    key = lab.workdir / f"hostkey-{host.name}"
    host.host_pub = _keygen(key)
    (lab.workdir / f"sshd-{host.name}.conf").write_text("\n".join([
        "Port 22", f"HostKey {key}", f"PidFile {lab.workdir}/sshd-{host.name}.pid",
        f"AuthorizedKeysFile {lab.workdir}/authorized_keys", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no",
        "PermitRootLogin prohibit-password", "AllowTcpForwarding yes", "LogLevel ERROR",
        f"Subsystem sftp {SFTP_SERVER}",
        # bash sources ~/.bashrc for commands run by sshd unless SHLVL says it is nested; this
        # machine's root .bashrc runs `pyenv init`, which can hang on a stale rehash lock
        "SetEnv SHLVL=1", ""]))


def _teardown(lab: SSHLab, blackhole: str | None) -> None:
    for host in lab.hosts.values():
        if host.proc is not None and host.proc.poll() is None:
            host.proc.kill()
            host.proc.wait(10)
        for _ in range(50):  # everything still running in the namespace: sshd, kernels
            pids = [p for p in host.pids() if pid_alive(p)]
            if not pids:
                break
            for p in pids:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
    for host in reversed(list(lab.hosts.values())):
        sh("ip", "netns", "del", host.ns, check=False)
    for link in lab._links:
        if sh("ip", "-o", "link", "show", link, check=False):
            sh("ip", "link", "del", link, check=False)
    remaining = [h.ns for h in lab.hosts.values()
                 if h.ns in sh("ip", "netns", "list", check=False).split()]
    if blackhole and not remaining:  # only once the last namespace is gone
        sh("ip", "route", "del", "blackhole", blackhole, check=False)


@pytest.fixture(scope="session")
def ssh_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHLab]:
    """Four OpenSSH hosts (one behind a jump host) and one host without sshd."""
    if not os.path.exists(SSHD):
        require_infra(f"{SSHD} is missing (apt-get install openssh-server)")
    if os.geteuid() != 0:
        require_infra("network namespaces need root")
    for tool in ("ip", "unshare", "ss", "ssh-keygen"):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode:
            require_infra(f"{tool} is missing (apt-get install iproute2 openssh-client)")
    workdir = tmp_path_factory.mktemp("sshlab")
    os.makedirs("/run/sshd", exist_ok=True)
    client_key = workdir / "client_key"
    (workdir / "authorized_keys").write_text(_keygen(client_key) + "\n")
    lab = SSHLab(workdir, client_key, workdir / "known_hosts")
    lab.block = _free_block()
    blackhole = f"10.200.{lab.block}.0/20"
    sh("ip", "route", "replace", "blackhole", blackhole)  # before any namespace
    tag = secrets.token_hex(3)
    try:
        for i, name in enumerate(["rhost1", "rhost2", "rdown", "rjump", "rinner"]):
            subnet = f"10.200.{lab.block + i}"
            host = RemoteHost(name, f"rkg{tag}{name}", f"{subnet}.2", workdir)
            lab.hosts[name] = host
            sh("ip", "netns", "add", host.ns)
            sh("ip", "netns", "exec", host.ns, "ip", "link", "set", "lo", "up")
            _link(lab, lab.hosts["rjump"].ns if name == "rinner" else None, host, subnet)
            if name != "rdown":
                _write_sshd_config(lab, host)
                host.start_sshd()
        lab.known_hosts.write_text("".join(
            f"{h.addr} {h.host_pub}\n" for h in lab.hosts.values() if h.host_pub))
        yield lab
    finally:
        _teardown(lab, blackhole)
