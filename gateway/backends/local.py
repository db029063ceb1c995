"""Local kernels that outlive the gateway process.

jupyter_client's LocalProvisioner launches kernels with JPY_PARENT_PID, so ipykernel exits when
the gateway does, and it can only poll or signal a process it spawned itself. This one launches
kernels independent of the gateway (their output goes to a log file beside the connection file)
and re-attaches to a running kernel by pid after a gateway restart, checking the process start
time so that a recycled pid is never mistaken for the kernel.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import os
import secrets
import signal
import socket
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from jupyter_client.connect import KernelConnectionInfo, LocalPortCache
from jupyter_client.launcher import launch_kernel
from jupyter_client.provisioning.local_provisioner import LocalProvisioner
from traitlets import Float

from .contract import GatewayHooks


def inherited_env(environ: Mapping[str, str], secret: Iterable[str]) -> dict[str, str]:
    """The part of the gateway's own environment that a kernel it starts on this machine
    inherits: all but RKG_* (the token among them) and the operator's --secret-env names
    and globs (fnmatch, case-sensitive)."""
    patterns = tuple(secret)
    return {
        k: v
        for k, v in environ.items()
        if not k.startswith("RKG_") and not any(fnmatch.fnmatchcase(k, p) for p in patterns)
    }


def process_start_time(pid: int) -> int | None:
    """Start time of a live, non-zombie process in clock ticks since boot (from /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


PORT_NAMES = ("shell_port", "iopub_port", "stdin_port", "hb_port", "control_port")


def ephemeral_low() -> int:
    """The first port of the range the system hands out as source ports."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def kernel_port(ip: str) -> int:
    """A free port for a kernel to bind, below the ephemeral range when there is room.

    jupyter_client picks ports by binding port 0, i.e. from the ephemeral range, and the
    kernel binds them only a while later (seconds, when many start at once). In between,
    any outgoing connection on the machine may be given one as its source port, above all
    the gateway's own sockets retrying connects to kernels not yet listening, and a connect
    to an unbound local port can even connect to itself: the kernel then fails with
    "Address already in use". Ports outside that range are never handed out that way."""
    lo = ephemeral_low()
    low = max(1024, lo - 16384)
    cache = LocalPortCache.instance()
    if lo - low >= 1024:
        for _ in range(100):
            port = low + secrets.randbelow(lo - low)
            if port in cache.currently_used_ports:
                continue
            with socket.socket() as s:
                try:
                    s.bind((ip, port))
                except OSError:
                    continue
            cache.currently_used_ports.add(port)  # returned by LocalProvisioner.cleanup
            return port
    return int(cache.find_available_port(ip))


class DurableLocalProvisioner(GatewayHooks, LocalProvisioner):
    """Registered as `rkg-local` (and `rkg-local-provisioner`, its old name); the gateway's
    default for local kernels."""

    backend = "local"
    launch_timeout = Float(
        0.0,
        config=True,
        help="seconds a start may take unless the client sets KERNEL_LAUNCH_TIMEOUT "
        "(0: the gateway's --kernel-launch-timeout); the gateway reads it (kernels/env.py)",
    )

    @classmethod
    def as_gateway_user(cls, config: dict[str, Any]) -> bool:
        return True

    attached_pid: int | None = None
    start_time: int | None = None
    log_path: str | None = None

    @property
    def has_process(self) -> bool:
        return self.process is not None or self.attached_pid is not None

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        """As jupyter_client's, with the kernel's ports chosen by kernel_port()."""
        km = self.parent
        if km is not None and km.transport == "tcp" and km.cache_ports and not self.ports_cached:
            for name in PORT_NAMES:
                setattr(km, name, kernel_port(km.ip))
            self.ports_cached = True
        return await super().pre_launch(**kwargs)

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        """Called by the kernel manager to start the process. As jupyter_client's, but
        independent of this process and with stdout/stderr in a log file."""
        scrubbed = LocalProvisioner._scrub_kwargs(kwargs)
        self.stage(f"launching {os.path.basename(cmd[0]) if cmd else 'the kernel'}")
        conn_file = getattr(self.parent, "connection_file", "")
        self.log_path = str(Path(conn_file).with_suffix(".log")) if conn_file else os.devnull
        # Local file open and fork, as jupyter_client's own launch does: fast, not network.
        # The log is the kernel's output: 0600 whatever the umask, as its connection file.
        fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        if self.log_path != os.devnull:
            os.fchmod(fd, 0o600)  # a log kept across a restart, made before this rule
        with open(fd, "ab") as log:  # noqa: ASYNC230
            scrubbed.setdefault("stdout", log)
            scrubbed.setdefault("stderr", log)
            self.process = launch_kernel(cmd, independent=True, **scrubbed)
        self.pid = self.process.pid
        self.pgid = os.getpgid(self.pid)
        self.start_time = process_start_time(self.pid)
        self.attached_pid = None
        self.cwd = kwargs.get("cwd", Path.cwd())
        return self.connection_info

    @classmethod
    async def reachable(cls, config: dict[str, Any]) -> list[tuple[str, str]]:
        """Nothing to reach: the kernel runs on the gateway's own machine."""
        return [("this machine", "")]

    def log_tail(self, lines: int = 15) -> str:
        """The last lines the kernel wrote (from its log file)."""
        if not self.log_path or self.log_path == os.devnull:
            return ""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, os.path.getsize(self.log_path) - 8192))
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def exit_fd(self) -> int | None:
        """GatewayHooks.exit_fd: a pidfd of the kernel's process (Linux 5.3 and later), so
        that a thousand idle kernels cost no polling. An attached pid was checked against its
        start time when it was attached, and a pidfd then stays bound to that process."""
        pid = self.process.pid if self.process is not None else self.attached_pid
        if pid is None or not hasattr(os, "pidfd_open"):
            return None
        try:
            return os.pidfd_open(pid)
        except OSError:  # gone already (the next poll says so), or no pidfd here
            return None

    async def poll(self) -> int | None:
        """None while the kernel runs; called by the kernel manager's is_alive()."""
        if self.process is not None:
            return await super().poll()
        if self.attached_pid is not None:
            if process_start_time(self.attached_pid) == self.start_time:
                return None
            return -1  # exit code unknown: it was not our child
        return 0

    async def wait(self) -> int | None:
        if self.process is not None:
            return await super().wait()
        # Not our child: nothing to wait() on, so poll as jupyter_client does for its own.
        while await self.poll() is None:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        self.attached_pid = None
        return -1

    async def send_signal(self, signum: int) -> None:
        if self.process is not None:
            await super().send_signal(signum)
            return
        if self.attached_pid is None or await self.poll() is not None:
            return
        try:
            if self.pgid:
                os.killpg(self.pgid, signum)
            else:
                os.kill(self.attached_pid, signum)
        except ProcessLookupError:
            pass

    async def kill(self, restart: bool = False) -> None:
        if self.process is not None:
            await super().kill(restart)
        else:
            await self.send_signal(signal.SIGKILL)

    async def terminate(self, restart: bool = False) -> None:
        if self.process is not None:
            await super().terminate(restart)
        else:
            await self.send_signal(signal.SIGTERM)

    async def cleanup(self, restart: bool = False) -> None:
        """Called by the kernel manager after the kernel stopped; a restart keeps the log."""
        await super().cleanup(restart)
        if not restart and self.log_path and self.log_path != os.devnull:
            with contextlib.suppress(OSError):
                os.remove(self.log_path)

    async def get_provisioner_info(self) -> dict[str, Any]:
        """Called when the gateway records the kernel: what re-attaching needs."""
        info: dict[str, Any] = await super().get_provisioner_info()
        info.update(start_time=self.start_time, log_path=self.log_path)
        return info

    async def load_provisioner_info(self, provisioner_info: dict[str, Any]) -> None:
        """Called when a restarted gateway re-attaches to a kernel it recorded."""
        await super().load_provisioner_info(provisioner_info)
        self.attached_pid = self.pid
        self.start_time = provisioner_info.get("start_time")
        self.log_path = provisioner_info.get("log_path")
