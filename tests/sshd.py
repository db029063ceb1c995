"""Real OpenSSH servers as remote hosts, each in its own network namespace with its own address
and hostname (../shared/INFRA.md), for the SSH backend's tests.

    root ns ──veth── rhost1 (sshd)          10.200.B.2
            ──veth── rhost2 (sshd)          10.200.B+1.2
            ──veth── rdown  (no sshd)       10.200.B+2.2   refuses connections
            ──veth── rjump  (sshd) ──veth── rinner (sshd)  10.200.B+4.2, only via rjump

Network safety: a blackhole route for this run's /20 (B is picked free) is added before the
first namespace and removed after the last one is gone, so nothing addressed to a test host
ever leaves the machine. Keys and known_hosts are per test session, in a temporary directory.

A run killed before its teardown leaves its namespaces, their sshds and kernels, the veths and
its blackhole: the next run removes them first (`_sweep`), in the same order as the teardown.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sweep

from conftest import pid_alive, require_infra

SSHD = "/usr/sbin/sshd"
HOSTS = ["rhost1", "rhost2", "rdown", "rjump", "rinner"]
# a lab's namespaces: rkg + its tag (6 hex digits) + the host's name
LAB_NS = re.compile(rf"^rkg([0-9a-f]{{6}})({'|'.join(HOSTS)})$")
# a namespace with no process left, no claim, and older than this is no live run's: a live
# lab's sshds run from its first second to its teardown
UNCLAIMED_AGE = 120
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
    proc: subprocess.Popen[bytes] | None = None
    host_pub: str = ""

    def pids(self) -> list[int]:
        return [int(p) for p in sh("ip", "netns", "pids", self.ns, check=False).split()]

    def kernels(self) -> list[str]:
        """ipykernel processes running inside this namespace."""
        return [
            f"{self.name}:{p}" for p in self.pids() if "ipykernel" in _cmdline(p) and pid_alive(p)
        ]

    def start_sshd(self, timeout: float = 10) -> None:
        conf = self.workdir / f"sshd-{self.name}.conf"
        log = open(self.workdir / f"sshd-{self.name}.log", "ab")
        self.proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.ns,
                "unshare",
                "--uts",
                "sh",
                "-c",
                f"hostname {self.name}; exec {SSHD} -D -e -f {conf}",
            ],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = sh("ip", "netns", "exec", self.ns, "ss", "-ltnH", "sport = :22", check=False)
            if out.strip():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(
            f"sshd on {self.name} did not start: "
            f"{(self.workdir / f'sshd-{self.name}.log').read_text()}"
        )

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
        out = sh(
            "ip",
            "netns",
            "exec",
            self.ns,
            "ss",
            "-tnH",
            "state",
            "established",
            "( sport = :22 )",
            check=False,
        )
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
            "host": f"root@{h.addr}",
            "identity_file": str(self.client_key),
            "known_hosts": str(self.known_hosts),
            "python": REMOTE_PYTHON,
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
    (lab.workdir / f"sshd-{host.name}.conf").write_text(
        "\n".join(
            [
                "Port 22",
                f"HostKey {key}",
                f"PidFile {lab.workdir}/sshd-{host.name}.pid",
                f"AuthorizedKeysFile {lab.workdir}/authorized_keys",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                "StrictModes no",
                "PermitRootLogin prohibit-password",
                "AllowTcpForwarding yes",
                "LogLevel ERROR",
                f"Subsystem sftp {SFTP_SERVER}",
                # bash sources ~/.bashrc for commands run by sshd unless SHLVL says it is
                # nested; this machine's root .bashrc runs `pyenv init`, which can hang on a
                # stale rehash lock
                "SetEnv SHLVL=1",
                "",
            ]
        )
    )


def _teardown(lab: SSHLab, blackhole: str | None, claim: Path | None = None) -> None:
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
    remaining = [
        h.ns for h in lab.hosts.values() if h.ns in sh("ip", "netns", "list", check=False).split()
    ]
    if blackhole and not remaining:  # only once the last namespace is gone
        sh("ip", "route", "del", "blackhole", blackhole, check=False)
    if claim and not remaining:  # else the next run's sweep finishes the job
        claim.unlink(missing_ok=True)


def _lab_namespaces() -> dict[str, list[str]]:
    """Namespaces named like a lab's, by tag."""
    groups: dict[str, list[str]] = {}
    for line in sh("ip", "netns", "list", check=False).splitlines():
        name = line.split()[0] if line.strip() else ""
        if m := LAB_NS.match(name):
            groups.setdefault(m.group(1), []).append(name)
    return groups


def _lab_host(ns: str) -> str:
    """The host of a lab namespace (one that `_lab_namespaces` found)."""
    m = LAB_NS.match(ns)
    assert m is not None, ns
    return m.group(2)


def _ns_pids(ns: str) -> list[int]:
    return [int(p) for p in sh("ip", "netns", "pids", ns, check=False).split()]


def _lab_over(names: list[str], claim: dict[str, Any] | None) -> bool:
    """Whether the run that made these namespaces has ended: by its claim, or (a lab made
    before claims) by the temporary directory its sshds' configs are in, or by age."""
    if claim is not None:
        return sweep.owner_over(int(claim["pid"]))
    cmdlines = [_cmdline(p) for ns in names for p in _ns_pids(ns)]
    runs = {m.group(1) for c in cmdlines for m in re.finditer(rf"({sweep.BASETEMP})/", c)}
    if runs:
        return all(sweep.run_over(r) for r in runs)
    if any(cmdlines):
        return False  # someone's processes, whose we cannot tell: leave them
    ages = []
    for ns in names:
        with contextlib.suppress(OSError):
            ages.append(time.time() - os.stat(f"/run/netns/{ns}").st_mtime)
    return bool(ages) and min(ages) > UNCLAIMED_AGE


def _blocks_in(ns: str) -> set[int]:
    """The lab's /20 blocks (10.200.B.0/20) an ended lab's namespace has addresses in."""
    out = sh("ip", "netns", "exec", ns, "ip", "-4", "-o", "addr", check=False)
    return {int(m.group(1)) // 16 * 16 for m in re.finditer(r"\b10\.200\.(\d+)\.\d+/", out)}


def _blocks_in_use(tag: str) -> set[int]:
    """Blocks another lab uses or has claimed: an ended run killed between deleting its
    blackhole and its claim may see its block taken again since."""
    used = {
        int(rec["block"])
        for rec in sweep.claims("sshlab-").values()
        if rec.get("tag") != tag and not sweep.owner_over(int(rec["pid"]))
    }
    out = sh("ip", "-4", "-o", "addr", check=False)
    return used | {int(m.group(1)) // 16 * 16 for m in re.finditer(r"\b10\.200\.(\d+)\.\d+/", out)}


def _sweep() -> None:
    """Labs of ended runs: every process in their namespaces (sshds, kernels, a remote
    dockerd) killed, the veths and namespaces deleted, and only then their blackholes."""
    claims = {str(rec.get("tag")): (path, rec) for path, rec in sweep.claims("sshlab-").items()}
    groups = _lab_namespaces()
    for tag in claims:
        groups.setdefault(tag, [])
    for tag, names in sorted(groups.items()):
        path, rec = claims.get(tag, (None, None))
        # without namespaces, the tag came from a claim
        over = _lab_over(names, rec) if names or rec is None else sweep.owner_over(int(rec["pid"]))
        if not over:
            continue
        blocks = {b for ns in names for b in _blocks_in(ns)}
        if rec is not None:
            blocks.add(int(rec["block"]))
        procs = [
            sweep.Proc(p, 0, (_ppid_and_comm(p) or (0, "?"))[1], "", "")
            for ns in names
            for p in _ns_pids(ns)
        ]
        sweep.kill(procs)
        links = [
            line.split(":")[1].strip().split("@")[0]
            for line in sh("ip", "-o", "link", "show", check=False).splitlines()
            if line.split(":")[1].strip().startswith(f"va{tag}")
        ]
        for link in links:
            sh("ip", "link", "del", link, check=False)
        inner_first = sorted(names, key=lambda n: -HOSTS.index(_lab_host(n)))
        for ns in inner_first:
            sh("ip", "netns", "del", ns, check=False)
        left = _lab_namespaces().get(tag, [])
        routes = []
        if not left:  # the blackholes only once the last namespace is gone
            for block in sorted(blocks - _blocks_in_use(tag)):
                net = f"10.200.{block}.0/20"
                if sh("ip", "route", "show", "exact", net, "type", "blackhole", check=False):
                    sh("ip", "route", "del", "blackhole", net, check=False)
                    routes.append(f"blackhole {net}")
            if path is not None:
                path.unlink(missing_ok=True)
        sweep.report(
            f"SSH lab {tag}",
            [
                *(f"process {p.describe()}" for p in procs),
                *(f"veth {link}" for link in links),
                *(f"namespace {ns}" for ns in names if ns not in left),
                *routes,
            ],
        )
        if left:
            raise RuntimeError(f"namespaces of an ended run do not go: {left}")


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
    _sweep()
    workdir = tmp_path_factory.mktemp("sshlab")
    os.makedirs("/run/sshd", exist_ok=True)
    client_key = workdir / "client_key"
    (workdir / "authorized_keys").write_text(_keygen(client_key) + "\n")
    lab = SSHLab(workdir, client_key, workdir / "known_hosts")
    lab.block = _free_block()
    blackhole = f"10.200.{lab.block}.0/20"
    tag = secrets.token_hex(3)
    # claimed before made: a run killed from here on leaves nothing the next one cannot place
    claim = sweep.claim(f"sshlab-{tag}", tag=tag, block=lab.block)
    sh("ip", "route", "replace", "blackhole", blackhole)  # before any namespace
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
        lab.known_hosts.write_text(
            "".join(f"{h.addr} {h.host_pub}\n" for h in lab.hosts.values() if h.host_pub)
        )
        yield lab
    finally:
        _teardown(lab, blackhole, claim)
