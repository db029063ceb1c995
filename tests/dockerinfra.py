"""A real dockerd for the deployment tests, started the way ../shared/INFRA.md says (its own
socket, no iptables, no IP forwarding, addresses in the test range), plus the offline base
image and wheels the Dockerfile is built from (no registry can be reached here).

The daemon's data root is kept between runs on one machine (/var/lib/rkg-test-docker), so the
base image is built once per machine (~1 min with debootstrap), not once per run. What else an
earlier run left there (it was killed before its teardown) is removed when the daemon starts:
its dockerd if still running, the containers, services, networks, volumes and swarm state the
tests make (tests/sweep.py reports each).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sweep

from conftest import ROOT, pid_alive, require_infra, stop_process

BASE_IMAGE = "rkg-test-base:bookworm-ssh"
KERNEL_IMAGE = "rkg-test-kernel:latest"
# addresses dockerd hands out (bip, address pools): blackholed while it runs, below the
# routes of its live bridges, so nothing addressed to a removed container leaves the machine
BLACKHOLES = [("10.200.99.0/24", "4000"), ("10.201.0.0/16", "4000")]
DATA_ROOT = Path("/var/lib/rkg-test-docker")
DAEMON = {
    "bip": "10.200.99.1/24",
    "default-address-pools": [{"base": "10.201.0.0/16", "size": 24}],
    "storage-driver": "overlay2",
    "iptables": False,
    "ip-forward": False,
}


class Docker:
    def __init__(self, sock: Path) -> None:
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{sock}"}

    def run(
        self,
        *args: str,
        check: bool = True,
        timeout: float = 600,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            args,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def has_image(self, name: str) -> bool:
        return self.run("docker", "image", "inspect", name, check=False).returncode == 0

    @property
    def host(self) -> str:
        return self.env["DOCKER_HOST"]

    def ours(self, kind: str = "ps") -> list[str]:
        """Names of the containers (kind "ps") or services ("service") the gateway labelled."""
        args = [
            "docker",
            kind,
            "ls" if kind == "service" else "-a",
            "--filter",
            "label=app=remote-kernel-gateway",
            "--format",
            "{{.Names}}" if kind == "ps" else "{{.Name}}",
        ]
        out = self.run(*args, check=False).stdout
        return out.split()


@contextlib.contextmanager
def running_dockerd(tmp: Path, data_root: Path | str, netns: str = "") -> Iterator[Docker]:
    """dockerd with the safe daemon.json, its own socket in `tmp`, in this network namespace
    or in `netns` (nsenter: `ip netns exec` would mount a /sys without the cgroups); stopped
    on exit."""
    sock = tmp / "docker.sock"
    (tmp / "daemon.json").write_text(
        json.dumps(
            {
                **DAEMON,
                "data-root": str(data_root),
                "exec-root": str(tmp / "exec"),
                "pidfile": str(tmp / "docker.pid"),
                "hosts": [f"unix://{sock}"],
            }
        )
    )
    enter = ["nsenter", f"--net=/var/run/netns/{netns}"] if netns else []
    _sweep_daemons(Path(data_root))
    with open(tmp / "dockerd.log", "wb") as log:
        proc = subprocess.Popen(
            [*enter, "dockerd", "--config-file", str(tmp / "daemon.json")],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    dk = Docker(sock)
    try:
        for _ in range(100):
            if proc.poll() is not None:
                pytest.fail(f"dockerd exited:\n{(tmp / 'dockerd.log').read_text()}")
            if sock.exists() and dk.run("docker", "info", check=False).returncode == 0:
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"dockerd did not answer in 10 s:\n{(tmp / 'dockerd.log').read_text()}")
        _sweep_engine(dk, str(data_root))
        yield dk
    finally:
        stop_process(proc)
        _unmount_namespaces(tmp / "exec")


@pytest.fixture(scope="session")
def docker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Docker]:
    for tool in ("dockerd", "docker", "docker-compose"):
        if not shutil.which(tool):
            require_infra(f"{tool} is not installed (apt-get install docker.io docker-compose)")
    if os.geteuid() != 0:
        require_infra("dockerd needs root")
    tmp = tmp_path_factory.mktemp("dockerd")
    # one dockerd per data root: a second test run on this machine waits for the first
    lock = open(f"{DATA_ROOT}.lock", "w")
    deadline = time.monotonic() + 1800
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                pytest.fail(f"another test run holds {DATA_ROOT} (its dockerd) for 30 min")
            time.sleep(1)
    for net, metric in BLACKHOLES:
        subprocess.run(["ip", "route", "replace", "blackhole", net, "metric", metric], check=True)
    try:
        with running_dockerd(tmp, DATA_ROOT) as dk:
            yield dk
    finally:
        _remove_bridges()
        for net, metric in BLACKHOLES:
            subprocess.run(
                ["ip", "route", "del", "blackhole", net, "metric", metric],
                check=False,
                capture_output=True,
            )
        lock.close()


def _sweep_daemons(data_root: Path) -> None:
    """Before starting a dockerd on `data_root` (the caller holds it: see the lock in
    `docker`): stop the dockerd of an earlier run still using it (its pytest was killed; the
    daemon, in a session of its own, lives on), with its containerd and shims, and unmount
    what killed daemons of ended runs left mounted under their exec roots."""
    stray = []
    for p in sweep.processes():
        if p.comm != "dockerd":
            continue
        conf = re.search(r"--config-file (\S+)", p.cmdline)
        try:
            config = json.loads(Path(conf.group(1)).read_text()) if conf else {}
        except (OSError, ValueError):
            config = {}
        if config.get("data-root") == str(data_root) or _holds_files_in(p.pid, data_root):
            stray.append((p, config))
    for p, config in stray:
        exec_root = config.get("exec-root", "")
        # containerd and the shims are found by the exec root in their command lines
        helpers = [q for q in sweep.processes() if exec_root and f"{exec_root}/" in q.cmdline]
        sweep.kill([p], grace=30)
        sweep.kill([q for q in helpers if pid_alive(q.pid)])
        if exec_root:
            _unmount_namespaces(Path(exec_root))
        with contextlib.suppress(OSError):
            Path(config.get("pidfile", "")).unlink()
        sweep.report(f"dockerd on {data_root}", [f"dockerd {p.pid} ({exec_root or '?'})"])
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    exec_mounts = re.compile(rf"({sweep.BASETEMP})/(remote-)?dockerd\d*/exec/")
    gone = []
    for line in mounts:
        target = line.split()[1]
        m = exec_mounts.match(target)
        if m and sweep.run_over(m.group(1)):
            subprocess.run(["umount", "-l", target], check=False, capture_output=True)
            gone.append(target)
    sweep.report("mounts of a killed dockerd", gone)


def _holds_files_in(pid: int, root: Path) -> bool:
    """Covers a daemon whose daemon.json went with its run's temporary directory."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(f"{root}/"):
                return True
    return False


def _sweep_engine(dk: Docker, data_root: str) -> None:
    """What the tests make on the engine, left by an earlier run: the gateway's labelled
    kernel containers and services, the compose projects rkgtest* (containers, networks,
    volumes), the names the Docker tests give (rkg-test-*, the compose profile's
    rkg-kernels) and a swarm not left. Images stay: they are the reason the root is kept."""
    removed = []
    if (
        dk.run(
            "docker", "info", "--format", "{{.Swarm.LocalNodeState}}", check=False
        ).stdout.strip()
        == "active"
    ):
        services = dk.run(
            "docker", "service", "ls", "--format", "{{.Name}}", check=False
        ).stdout.split()
        if services:
            dk.run("docker", "service", "rm", *services, check=False)
            removed += [f"service {s}" for s in services]
        dk.run("docker", "swarm", "leave", "--force")
        removed.append("swarm (left)")

    def listed(kind: str, fmt: str) -> list[list[str]]:
        out = dk.run("docker", *kind.split(), "--format", fmt, check=False).stdout
        return [line.split("\t") for line in out.splitlines() if line.strip()]

    project = '{{.Label "com.docker.compose.project"}}'
    containers = [
        name
        for name, app, proj in listed("ps -a", '{{.Names}}\t{{.Label "app"}}\t' + project)
        if app == "remote-kernel-gateway"
        or proj.startswith("rkgtest")
        or name.startswith("rkg-test-")
    ]
    if containers:
        dk.run("docker", "rm", "-f", "-v", *containers)
        removed += [f"container {c}" for c in containers]
    networks = [
        name
        for name, proj in listed("network ls", "{{.Name}}\t" + project)
        if proj.startswith("rkgtest") or name.startswith("rkg-test-") or name == "rkg-kernels"
    ]
    for net in networks:
        dk.run("docker", "network", "rm", net)
        removed.append(f"network {net}")
    volumes = [
        name
        for name, proj in listed("volume ls", "{{.Name}}\t" + project)
        if proj.startswith("rkgtest") or name.startswith("rkgtest")
    ]
    if volumes:
        dk.run("docker", "volume", "rm", *volumes)
        removed += [f"volume {v}" for v in volumes]
    sweep.report(f"Docker engine on {data_root}", removed)


# What the first test that needs an image may take: on a fresh machine it builds the base
# image (debootstrap), the kernel image and the gateway's wheels, minutes on a busy 2-core
# machine, far past the per-test timeout meant for the test itself.
BUILD_TIMEOUT = 1800
BUILDERS = ({"base_image", "kernel_image"}, {"gateway_image", "build_context"})


def _needs(item: pytest.Item, fixtures: set[str]) -> bool:
    if fixtures & set(getattr(item, "fixturenames", ())):
        return True
    # the contract suite's backends are looked up by name at run time
    spec = getattr(item, "callspec", None)
    return (
        spec is not None
        and "kernel_image" in fixtures
        and spec.params.get("backend") in ("docker", "swarm")
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The first test to need each kind of image gets the time to build it; later ones find
    it built (the data root is kept), and keep the ordinary timeout."""
    for fixtures in BUILDERS:
        first = next((item for item in items if _needs(item, fixtures)), None)
        if first is not None:
            first.add_marker(pytest.mark.timeout(BUILD_TIMEOUT))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The sweeps' lines again where they are read after a run (tests/sweep.py)."""
    if sweep.swept:
        terminalreporter.section("leftovers of earlier runs removed")
        for line in sweep.swept:
            terminalreporter.write_line(line)


def _unmount_namespaces(exec_root: Path) -> None:
    """A Swarm dockerd keeps its ingress and overlay network namespaces bind-mounted under
    its exec root; a dockerd that had to be killed leaves them, and with them their veths
    (seen after an interrupted run). Unmounting the last reference removes the namespace."""
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    prefix = f"{exec_root}/"
    for line in mounts:
        target = line.split()[1]
        if target.startswith(prefix):
            subprocess.run(["umount", "-l", target], check=False, capture_output=True)


def _remove_bridges() -> None:
    """dockerd leaves its bridges (docker0, br-*, docker_gwbridge) behind when it exits; it
    makes them again from its data root at the next start."""
    links = subprocess.run(
        ["ip", "-o", "link", "show", "type", "bridge"], capture_output=True, text=True, check=False
    ).stdout
    for line in links.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name == "docker0" or name == "docker_gwbridge" or name.startswith("br-"):
            subprocess.run(["ip", "link", "del", name], check=False, capture_output=True)


@pytest.fixture(scope="session")
def base_image(docker: Docker, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Debian bookworm with python3, venv and tini, made locally: no registry is reachable."""
    if docker.has_image(BASE_IMAGE):
        return BASE_IMAGE
    if not shutil.which("debootstrap"):
        require_infra("debootstrap is not installed (apt-get install debootstrap)")
    rootfs = tmp_path_factory.mktemp("rootfs")
    subprocess.run(
        [
            "debootstrap",
            "--variant=minbase",
            "--include=python3,python3-venv,tini,openssh-server,openssh-client",
            "bookworm",
            str(rootfs),
            "http://deb.debian.org/debian",
        ],
        check=True,
        capture_output=True,
        timeout=900,
    )
    with subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE) as tar:
        subprocess.run(
            ["docker", "import", "-", BASE_IMAGE],
            stdin=tar.stdout,
            env=docker.env,
            check=True,
            capture_output=True,
            timeout=600,
        )
    shutil.rmtree(rootfs, ignore_errors=True)
    return BASE_IMAGE


@pytest.fixture(scope="session")
def build_context(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The working tree as the tests see it (tracked files and untracked ones git does not
    ignore), plus wheels of the package and its dependencies: `docker build` needs no network."""
    ctx = tmp_path_factory.mktemp("context")
    files = (
        subprocess.run(
            ["git", "ls-files", "-z", "-co", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (ctx / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, ctx / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "-w",
            str(ctx / "wheels"),
            f"{ctx}[ssh,docker]",
        ],
        check=True,
        capture_output=True,
        timeout=900,
    )
    return ctx


@pytest.fixture(scope="session")
def kernel_image(docker: Docker, base_image: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The base image with ipykernel in /opt/kernel (from wheels made here: no registry) and
    a user 1000 with a home, as a kernel image for the Docker and Swarm backends."""
    if docker.has_image(KERNEL_IMAGE):
        return KERNEL_IMAGE
    ctx = tmp_path_factory.mktemp("kernel-image")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "-w", str(ctx / "wheels"), "ipykernel"],
        check=True,
        capture_output=True,
        timeout=900,
    )
    (ctx / "Dockerfile").write_text(f"""FROM {base_image}
COPY wheels /wheels
RUN python3 -m venv /opt/kernel \\
    && /opt/kernel/bin/pip install --no-cache-dir --no-index --find-links /wheels ipykernel \\
    && rm -rf /wheels && useradd --create-home --uid 1000 --gid 100 jovyan
ENV PATH=/opt/kernel/bin:$PATH
USER 1000:100
WORKDIR /home/jovyan
""")
    docker.run("docker", "build", "-q", "-t", KERNEL_IMAGE, str(ctx), timeout=900)
    return KERNEL_IMAGE


@pytest.fixture(scope="session")
def swarm(docker: Docker) -> Iterator[Docker]:
    """The test dockerd as a one-node Swarm manager, advertised on loopback; it leaves the
    swarm at the end (swarm state would otherwise persist in the data root)."""
    docker.run("docker", "swarm", "leave", "--force", check=False)
    docker.run("docker", "swarm", "init", "--advertise-addr", "127.0.0.1")
    try:
        yield docker
    finally:
        docker.run("docker", "swarm", "leave", "--force", check=False)


@pytest.fixture(scope="session")
def gateway_image(docker: Docker, base_image: str, build_context: Path) -> str:
    """The repository's Dockerfile built from the working tree (as the operator builds it),
    tagged apart from the compose deployment's image."""
    tag = "rkg-test-gateway:latest"
    docker.run(
        "docker",
        "build",
        "-q",
        "--build-arg",
        f"BASE={base_image}",
        "-t",
        tag,
        str(build_context),
        timeout=900,
    )
    return tag
