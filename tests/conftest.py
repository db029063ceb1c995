"""Fixtures shared by every test: a real gateway process on a free port, and helpers to find
leftover kernel processes.

The gateway runs as a subprocess (`python -m gateway serve`), exactly as an operator starts it,
so the tests exercise the CLI, the config and the signal handling too.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pytest

pytest_plugins = ["backends", "dockerinfra", "slurm", "sshd"]

ROOT = Path(__file__).resolve().parent.parent
KERNELSPECS = Path(__file__).resolve().parent / "kernelspecs"


def pytest_sessionstart(session: pytest.Session) -> None:
    """Gateways and local kernels of an earlier run killed part-way (their teardown never
    ran) are stopped: found by the run's temporary directory in their command lines
    (state database, runtime directory), and only once that run is over (tests/sweep.py)."""
    import sweep

    procs = sweep.of_ended_runs(
        cmd=rf"({sweep.BASETEMP})/\S*(?:/state-\d+\.sqlite|/runtime-\d+/kernel-)",
        comms=("python", "python3", "python3.11"),
    )
    if procs:
        sweep.kill(procs)
        sweep.report("gateways and their kernels", [p.describe() for p in procs])


def rkg(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The `rkg` command (`rkg spec add ...`, `rkg token ...`) as a user runs it, its output
    captured as text; `check`: a non-zero exit fails with its stderr."""
    done = subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=timeout
    )
    if check and done.returncode != 0:
        raise AssertionError(f"rkg {' '.join(args)} exited {done.returncode}: {done.stderr}")
    return done


def serving(
    workdir: Path, *extra_args: str, env: dict[str, str] | None = None
) -> Iterator[GatewayProcess]:
    """A module's own gateway (`yield from serving(...)` in a fixture): started with
    `extra_args`, and at the end stopped, leaving no kernel process of its own behind."""
    gw = GatewayProcess(
        port=free_port(),
        token=secrets.token_hex(16),
        extra_args=list(extra_args),
        workdir=workdir,
        env=env or {},
    )
    gw.start()
    yield gw
    leftovers = _cleanup(gw)
    assert not leftovers, f"kernel processes left behind: {leftovers}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require_infra(reason: str) -> NoReturn:
    """Skip for missing infrastructure; in CI (RKG_REQUIRE_INFRA=1) that is a failure."""
    if os.environ.get("RKG_REQUIRE_INFRA") == "1":
        pytest.fail(f"infrastructure missing: {reason}")
    pytest.skip(reason)


def processes_matching(needle: str) -> list[int]:
    """Live processes whose command line contains `needle` (read from /proc)."""
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmdline and pid_alive(int(entry)):
            found.append(int(entry))
    return found


def _describe(probe: Callable[[], Any], what: str) -> str:
    return what or getattr(probe, "__qualname__", repr(probe))


async def eventually(
    probe: Callable[[], Any],
    *,
    until: Callable[[Any], Any] = bool,
    timeout: float = 10,
    interval: float = 0.05,
    ignore: tuple[type[BaseException], ...] = (),
    what: str = "",
) -> Any:
    """Call `probe` (sync or async) until `until(value)` holds, and return that value.
    On timeout, an AssertionError names the probe and shows the last value (or the last
    exception among `ignore`), which is what a failed wait needs to be diagnosed."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = probe()
            if inspect.isawaitable(value):
                value = await value
        except ignore as e:
            value = e
        else:
            if until(value):
                return value
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"{_describe(probe, what)}: not so within {timeout:g} s; last value: {value!r}"
            )
        await asyncio.sleep(interval)


def eventually_sync(
    probe: Callable[[], Any],
    *,
    until: Callable[[Any], Any] = bool,
    timeout: float = 10,
    interval: float = 0.05,
    ignore: tuple[type[BaseException], ...] = (),
    what: str = "",
) -> Any:
    """`eventually` for code outside an event loop (fixtures, sync tests)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = probe()
        except ignore as e:
            value = e
        else:
            if until(value):
                return value
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"{_describe(probe, what)}: not so within {timeout:g} s; last value: {value!r}"
            )
        time.sleep(interval)


def stop_process(proc: subprocess.Popen[Any], grace: float = 30) -> None:
    """SIGTERM, then SIGKILL to its whole process group after `grace` seconds (every daemon
    the tests start runs in a session of its own)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@dataclass
class GatewayProcess:
    """A running `rkg serve` subprocess."""

    port: int
    token: str
    base_url: str = "/"
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    workdir: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    seen_kernel_pids: set[int] = field(default_factory=set)

    @property
    def url(self) -> str:
        """http://127.0.0.1:PORT/base/ (always ends with a slash)."""
        return f"http://127.0.0.1:{self.port}{self.base_url.rstrip('/')}/"

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://", 1)

    def start(self, timeout: float = 30) -> None:
        assert self.workdir is not None
        self.log_path = self.workdir / f"gateway-{self.port}.log"
        args = [
            sys.executable,
            "-m",
            "gateway",
            "serve",
            "--ip",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--base-url",
            self.base_url,
            "--kernelspec-dir",
            str(KERNELSPECS),
            "--state-db",
            str(self.workdir / f"state-{self.port}.sqlite"),
            *(["--token", self.token] if self.token else ["--no-auth"]),
            *self.extra_args,
        ]
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "JUPYTER_RUNTIME_DIR": str(self.runtime_dir),
            **self.env,
        }
        with open(self.log_path, "ab") as log:
            self.proc = proc = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.workdir,
                start_new_session=True,
            )

        def answers() -> bool:
            if proc.poll() is not None:  # not among `ignore`: ends the wait at once
                raise RuntimeError(f"gateway exited with {proc.returncode}:\n{self.log()}")
            with urllib.request.urlopen(self.url + "api", timeout=1) as r:
                ok: bool = r.status == 200
                return ok

        try:
            eventually_sync(answers, timeout=timeout, ignore=(urllib.error.URLError, OSError))
        except AssertionError:
            raise RuntimeError(f"gateway did not answer within {timeout}s:\n{self.log()}") from None

    @property
    def runtime_dir(self) -> Path:
        """Each gateway gets its own: its kernels are the processes whose connection file is
        there, whether the gateway started them or re-attached to them after a restart."""
        assert self.workdir is not None
        return self.workdir / f"runtime-{self.port}"

    def kernel_pids(self) -> list[int]:
        pids = processes_matching(f"{self.runtime_dir}/kernel-")
        self.seen_kernel_pids.update(pids)
        return pids

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Stop the gateway; returns its exit code. Kills it if it does not exit in time."""
        assert self.proc is not None
        self.kernel_pids()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                raise RuntimeError(f"gateway ignored signal {sig}:\n{self.log()}") from None
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""


def _cleanup(gw: GatewayProcess) -> list[int]:
    """Stop the gateway and report kernel processes it left behind (killing them)."""
    try:
        if gw.proc and gw.proc.poll() is None:
            gw.stop()
    finally:
        leftovers = [p for p in gw.seen_kernel_pids if pid_alive(p)]
        for p in leftovers:
            os.kill(p, signal.SIGKILL)
        if gw.proc:
            try:  # anything else in its process group (sessions are new per gateway)
                os.killpg(gw.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return leftovers


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
    """Start gateways with custom arguments: `gw = gateway_factory(extra_args=[...])`.
    Every gateway started is stopped at teardown and must leave no kernel process behind."""
    started: list[GatewayProcess] = []

    def make(
        *,
        token: str | None = None,
        base_url: str = "/",
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        start: bool = True,
    ) -> GatewayProcess:
        token = secrets.token_hex(16) if token is None else token
        gw = GatewayProcess(
            port=free_port(),
            token=token,
            base_url=base_url,
            extra_args=extra_args or [],
            env=env or {},
            workdir=tmp_path,
        )
        started.append(gw)
        if start:
            gw.start()
        return gw

    yield make
    leftovers = [p for gw in started for p in _cleanup(gw)]
    assert not leftovers, f"kernel processes left behind: {leftovers}"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """One gateway shared by a test module (token auth on, base URL /). Kernels may work in
    this run's temporary directories: a jupyter_server in front sends its root_dir there."""
    gw = GatewayProcess(
        port=free_port(),
        token=secrets.token_hex(16),
        workdir=tmp_path_factory.mktemp("gateway"),
        extra_args=["--working-dir-root", str(tmp_path_factory.getbasetemp())],
    )
    gw.start()
    yield gw
    leftovers = _cleanup(gw)
    assert not leftovers, f"kernel processes left behind: {leftovers}"


@pytest.fixture(scope="session")
def node() -> str:
    """Path to node with tests/js/node_modules installed, or skip (fail in CI)."""
    exe = shutil.which("node")
    if not exe:
        require_infra("node is not installed")
    if not (ROOT / "tests" / "js" / "node_modules").is_dir():
        require_infra("tests/js/node_modules missing: run `npm ci --prefix tests/js`")
    return exe
