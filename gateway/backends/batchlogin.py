"""Where the batch backend (batch.py) runs scheduler commands and keeps its files.

    LocalSite    this machine is a submit host; compute nodes share its runtime directory
    LoginSite    a cluster login node over the SSH backend's shared connection (sshpool.py):
                 commands run there, files go over SFTP, and the kernel's five ports are
                 forwarded from 127.0.0.1 here to the compute node through the login node

Both have the same methods: run, write_private, read, remove, connect, close. A command that
cannot be run there, or does not answer, is a BackendUnavailable on either (command_errors here,
sshpool.ssh_errors over SSH); one that runs and fails is the caller's to read from its exit code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import socket
from collections.abc import Iterator

from ..errors import BackendUnavailable, KernelError, KernelStartError
from . import sshpool
from .common import PortForwards

log = logging.getLogger(__name__)

COMMAND_TIMEOUT = 30.0  # for one sbatch / squeue / scancel


@contextlib.contextmanager
def command_errors(argv: list[str], where: str) -> Iterator[None]:
    """A local subprocess's failures in the block as gateway errors: one that cannot be
    started or does not finish in time means the scheduler cannot be reached from here."""
    try:
        yield
    except TimeoutError as e:
        raise BackendUnavailable(
            f"{argv[0]} did not answer within {COMMAND_TIMEOUT:g} s on {where}"
        ) from e
    except OSError as e:
        raise BackendUnavailable(
            f"cannot run {argv[0]} on {where}: {e.strerror or e} (is the "
            "scheduler's client on the gateway's PATH?)"
        ) from e


class LocalSite:
    """`env`: for the scheduler's commands (SLURM_CONF, SGE_ROOT...), not for the kernel."""

    name = "this machine"

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.env = dict(env or {})
        self.key = f"{self.name} {sorted(self.env.items())}"

    async def run(self, argv: list[str], stdin: str = "") -> tuple[int, str, str]:
        """A scheduler command as an asyncio subprocess: (exit code, stdout, stderr)."""
        with command_errors(argv, self.name):
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
                env={**os.environ, **self.env} if self.env else None,
            )
            try:
                out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), COMMAND_TIMEOUT)
            except BaseException:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
                raise
        return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")

    async def realpath(self, path: str) -> str:
        def real() -> str:
            full = os.path.abspath(os.path.expanduser(path))
            os.makedirs(full, mode=0o700, exist_ok=True)  # the runtime dir: keys, logs
            return full

        return await asyncio.to_thread(real)

    async def write_private(self, path: str, text: str) -> None:
        """Mode 0600 from its creation."""

        def write() -> None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)

        await asyncio.to_thread(write)

    async def read(self, path: str, tail: int = 0) -> str | None:
        def read() -> str | None:
            try:
                with open(path, "rb") as f:
                    if tail:
                        f.seek(max(0, os.path.getsize(path) - tail))
                    return f.read().decode(errors="replace")
            except OSError:
                return None

        return await asyncio.to_thread(read)

    async def remove(self, paths: list[str]) -> None:
        for path in paths:
            with contextlib.suppress(OSError):
                os.remove(path)

    async def connect(
        self, node: str, ip: str, ports: dict[str, int], forwards: PortForwards
    ) -> tuple[str, dict[str, int]]:
        """(address, ports) the gateway's ZMQ sockets connect to: the node itself."""
        if ip not in ("0.0.0.0", "*", ""):
            return ip, ports
        try:
            addrs = await asyncio.get_running_loop().getaddrinfo(
                node, None, family=socket.AF_INET, type=socket.SOCK_STREAM
            )
        except OSError as e:
            raise KernelStartError(
                f"the kernel runs on node {node!r}, which this gateway cannot resolve: {e}"
            ) from e
        return str(addrs[0][4][0]), ports

    def close(self, linger: float = 0) -> None:
        pass


class LoginSite:
    """A lease on the shared SSH connection to the login node."""

    def __init__(self, host: sshpool.SSHHost, env: dict[str, str] | None = None) -> None:
        self.host = host
        self.name = host.name
        self.env = dict(env or {})
        self.key = f"{self.name} {sorted(self.env.items())}"

    @classmethod
    async def open(cls, target: sshpool.Target, env: dict[str, str] | None = None) -> LoginSite:
        return cls(await sshpool.acquire(target), env)

    async def run(self, argv: list[str], stdin: str = "") -> tuple[int, str, str]:
        prefix = ["env", *[f"{k}={v}" for k, v in sorted(self.env.items())]]
        command = shlex.join(prefix + argv if self.env else argv)
        result = await self.host.exec(
            command, what=f"running {argv[0]} on {self.name}", stdin=stdin, limit=COMMAND_TIMEOUT
        )
        code = result.exit_status if result.exit_status is not None else -1
        return code, str(result.stdout or ""), str(result.stderr or "")

    async def realpath(self, path: str) -> str:
        import asyncssh

        sftp = await self.host.sftp()
        rel = path[2:] if path.startswith("~/") else path
        with sshpool.ssh_errors(self.host.target, f"making the directory {path}"):
            await sftp.makedirs(rel, asyncssh.SFTPAttrs(permissions=0o700), exist_ok=True)
            return str(await sftp.realpath(rel))

    async def write_private(self, path: str, text: str) -> None:
        import asyncssh

        sftp = await self.host.sftp()
        with sshpool.ssh_errors(self.host.target, f"writing {path}"):
            async with sftp.open(path, "w", asyncssh.SFTPAttrs(permissions=0o600)) as f:
                await f.write(text)
            await sftp.chmod(path, 0o600)

    async def read(self, path: str, tail: int = 0) -> str | None:
        mod = sshpool.require_asyncssh()
        try:
            sftp = await self.host.sftp()
            async with sftp.open(path, "rb") as f:
                if tail:
                    size = (await sftp.stat(path)).size or 0
                    await f.seek(max(0, size - tail))
                data = await f.read()
        except (OSError, mod.SFTPError):
            return None
        return data.decode(errors="replace") if isinstance(data, bytes) else str(data)

    async def remove(self, paths: list[str]) -> None:
        mod = sshpool.require_asyncssh()
        with contextlib.suppress(OSError, mod.Error, KernelError):
            sftp = await self.host.sftp()
            for path in paths:
                with contextlib.suppress(mod.SFTPError):
                    await sftp.remove(path)

    async def connect(
        self, node: str, ip: str, ports: dict[str, int], forwards: PortForwards
    ) -> tuple[str, dict[str, int]]:
        """Forwards from 127.0.0.1 here through the login node to the compute node, on the
        local ports `forwards` had (after a gateway restart: the recorded ones), else new."""
        dest = node if ip in ("0.0.0.0", "*", "") else ip
        return "127.0.0.1", await forwards.open(self.host, dest, ports)

    def close(self, linger: float = sshpool.LINGER) -> None:
        """End the lease; the connection stays open `linger` s for the next kernel."""
        sshpool.release(self.host, linger)
