"""One shared aiodocker client per Docker endpoint, and what every container backend needs
from it: errors in words the user can act on, batched liveness, the orphan sweep.

Endpoints are DOCKER_HOST-style URLs: unix:///var/run/docker.sock, tcp://host:2376 (TLS by
DOCKER_TLS_VERIFY / DOCKER_CERT_PATH, as the docker CLI does), ssh://[user@]host[:port][/socket]
(the engine's socket, default /var/run/docker.sock, forwarded to a private local socket over
the SSH backend's shared connection to that host: one connection per host for the API and
every kernel's ports, re-forwarded after a reconnect). Kernels of one endpoint share its client:
one connection pool per engine, not one per kernel, and one `containers/json` call answers
every kernel's poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar, cast
from urllib.parse import urlsplit

from .. import aio
from ..errors import BackendUnavailable, EngineError, KernelError, KernelStartError
from . import sshpool
from .sshpool import PROBE_TIMEOUT, Hop, Target, ssh_errors

if TYPE_CHECKING:
    import asyncssh

try:
    import aiodocker
    import aiohttp
except ImportError:  # pragma: no cover - depends on the install
    aiodocker = None  # type: ignore[assignment]
    aiohttp = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

APP = "remote-kernel-gateway"
LABEL_APP, LABEL_COMPONENT, LABEL_KERNEL, LABEL_GATEWAY = (
    "app",
    "component",
    "kernel_id",
    "rkg.gateway",
)
T = TypeVar("T")


def require_aiodocker() -> None:
    if aiodocker is None:
        raise KernelStartError(
            "the Docker backends need aiodocker: pip install 'remote-kernel-gateway[docker]'"
        )


@contextlib.contextmanager
def docker_errors(engine: str, what: str) -> Iterator[None]:
    """aiodocker's failures in the block as gateway errors: a request the engine refused is an
    EngineError with its status; an engine that cannot be reached or does not answer is a
    BackendUnavailable."""
    unreachable = (
        f"the Docker engine at {engine} is unreachable ({{}}); is dockerd running, "
        "and is DOCKER_HOST / docker_host right?"
    )
    try:
        yield
    except aiodocker.DockerError as e:
        if e.status < 900:  # aiodocker's 900: it could not connect
            raise EngineError(e.status, f"{what} on {engine}: {e.message}") from e
        raise BackendUnavailable(unreachable.format(e.message)) from e
    except TimeoutError as e:
        raise BackendUnavailable(f"the Docker engine at {engine} did not answer ({what})") from e
    except (aiohttp.ClientConnectionError, OSError) as e:
        raise BackendUnavailable(unreachable.format(e)) from e


def endpoint(url: str) -> str:
    """The engine `url` names, for people (stages, the status page): the default is
    DOCKER_HOST, else the local socket; a password in the URL is left out."""
    url = url or os.environ.get("DOCKER_HOST", "") or "unix:///var/run/docker.sock"
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}@{host}" if parts.username else host
    return parts._replace(netloc=netloc + (f":{parts.port}" if parts.port else "")).geturl()


async def answers(engine: Engine, ask: Callable[[Engine], Awaitable[str]]) -> str:
    """'' when `ask` (a cheap question to the engine; it returns '' or what is wrong with
    the answer) is answered within PROBE_TIMEOUT, else why not. For reachable()."""
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            return await ask(engine)
    except TimeoutError:
        return f"no answer within {PROBE_TIMEOUT:g} s"
    except KernelError as e:
        return e.message


def our_labels(kernel_id: str, gateway_id: str) -> dict[str, str]:
    return {
        LABEL_APP: APP,
        LABEL_COMPONENT: "kernel",
        LABEL_KERNEL: kernel_id,
        LABEL_GATEWAY: gateway_id,
    }


def ssh_endpoint(
    url: str,
    *,
    identity_file: str = "",
    known_hosts: str = "~/.ssh/known_hosts",
    jump_hosts: tuple[str, ...] = (),
) -> tuple[Target, str] | None:
    """ssh://[user@]host[:port][/socket] -> (where to connect, the engine's socket there)."""
    if not url.startswith("ssh://"):
        return None
    parts = urlsplit(url)
    if not parts.hostname:
        raise KernelStartError(f"docker_host {url!r} names no host")
    hop = Hop(parts.hostname, parts.port or 22, parts.username)
    jumps = tuple(Hop.parse(j, 22, hop.username) for j in jump_hosts)
    return (
        Target(hop, jumps, identity_file or None, known_hosts),
        parts.path or "/var/run/docker.sock",
    )


class Engine:
    """A Docker endpoint and its client; `call` translates what can go wrong on the way."""

    pid: int | None = None  # an SSH connection watcher without a process to probe (sshpool.Watcher)

    def __init__(self, url: str, ssh: tuple[Target, str] | None = None) -> None:
        self.url = url
        self.refs = 0
        self.client: Any = None
        self._ssh_target = ssh
        self.ssh: sshpool.SSHHost | None = None  # the shared connection of an ssh:// engine
        self._sock_dir = ""
        self._listener: Any = None
        self._lock = asyncio.Lock()
        self._seen: dict[str, tuple[float, Any]] = {}  # listing -> (when, what)
        self._listing: dict[str, asyncio.Future[Any]] = {}  # listings under way

    @property
    def name(self) -> str:
        return self.url or "the default Docker engine"

    @property
    def connecting(self) -> bool:
        """Whether the next call has to open an SSH connection first (an ssh:// engine not
        used yet): worth a stage."""
        return self.client is None and self._ssh_target is not None

    async def open(self) -> Any:
        """The aiodocker client, made on first use (over SSH: after forwarding the socket)."""
        async with self._lock:
            if self.client is None:
                require_aiodocker()
                url = self.url or None
                if self._ssh_target is not None:
                    url = await self._open_ssh()
                try:
                    self.client = aiodocker.Docker(url=url)
                except (ValueError, OSError) as e:
                    raise KernelStartError(
                        f"cannot use the Docker engine {self.name!r}: {e} "
                        "(set DOCKER_HOST or the kernelspec's docker_host)"
                    ) from e
        return self.client

    async def _open_ssh(self) -> str:
        assert self._ssh_target is not None
        self.ssh = await sshpool.acquire(self._ssh_target[0])
        self._sock_dir = tempfile.mkdtemp(prefix="rkg-docker-")  # mode 0700: ours alone
        await self.reforward(await self.ssh.connection())
        self.ssh.watch(self)
        return f"unix://{self._sock_dir}/docker.sock"

    async def reforward(self, conn: asyncssh.SSHClientConnection) -> None:
        """Forward a private local socket to the engine's; called again after a reconnect."""
        assert self._ssh_target is not None
        if self._listener is not None:
            self._listener.close()
        sock = f"{self._sock_dir}/docker.sock"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)
        with ssh_errors(
            self._ssh_target[0],
            f"forwarding the Docker socket {self._ssh_target[1]} of {self.name}",
        ):
            self._listener = await conn.forward_local_path(sock, self._ssh_target[1])

    async def call(self, what: str, fn: Callable[[Any], Awaitable[T]]) -> T:
        """fn(client), `what` saying what it does, with the engine's failures translated
        (docker_errors)."""
        client = await self.open()
        with docker_errors(self.name, what):
            return await fn(client)

    async def states(self, max_age: float) -> dict[str, str]:
        """container id -> state ('running', 'exited', ...) of every container we labelled,
        from one listing shared by all callers and reused for max_age seconds."""
        return cast(
            dict[str, str], await self._cached("containers", max_age, self._list_containers)
        )

    async def task_states(self, max_age: float) -> dict[str, dict[str, Any]]:
        """Swarm: service id -> the Status of its newest task, shared the same way."""
        return cast(
            dict[str, dict[str, Any]], await self._cached("tasks", max_age, self._list_tasks)
        )

    async def _cached(self, key: str, max_age: float, fetch: Callable[[], Awaitable[Any]]) -> Any:
        seen_at, value = self._seen.get(key, (0.0, None))
        if time.monotonic() - seen_at <= max_age:
            return value
        fut = self._listing.get(key)
        if fut is None:
            fut = self._listing[key] = asyncio.ensure_future(fetch())
            fut.add_done_callback(lambda f: self._listed(key, f))
        return await asyncio.shield(fut)

    def _listed(self, key: str, fut: asyncio.Future[Any]) -> None:
        self._listing.pop(key, None)
        if not fut.cancelled() and fut.exception() is None:
            self._seen[key] = (time.monotonic(), fut.result())

    async def _list_containers(self) -> dict[str, str]:
        rows = await self.call(
            "listing containers",
            lambda c: c.containers.list(all=True, filters=f'{{"label": ["{LABEL_APP}={APP}"]}}'),
        )
        return {row["Id"]: row["State"] for row in rows}

    async def _list_tasks(self) -> dict[str, dict[str, Any]]:
        rows = await self.call("listing swarm tasks", lambda c: c.tasks.list())
        newest: dict[str, dict[str, Any]] = {}
        for task in sorted(rows, key=lambda t: t.get("Version", {}).get("Index", 0)):
            newest[task["ServiceID"]] = task
        return newest

    async def remove(self, ref: str, what: str) -> None:
        """Force-remove a container (id or name); one already gone is what we wanted."""
        await ignore_missing(
            self.call(f"removing {what}", lambda c: c.containers.container(ref).delete(force=True))
        )

    def forget_states(self) -> None:
        self._seen.clear()

    async def close(self) -> None:
        if self.client is not None:
            client, self.client = self.client, None
            with contextlib.suppress(Exception):
                await client.close()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self.ssh is not None:
            ssh, self.ssh = self.ssh, None
            ssh.unwatch(self)
            sshpool.release(ssh)
        if self._sock_dir:
            shutil.rmtree(self._sock_dir, ignore_errors=True)
            self._sock_dir = ""


_engines: dict[str, Engine] = {}


def acquire(url: str, **ssh_options: Any) -> Engine:
    """A lease on the engine at `url`; ssh_options (identity_file, known_hosts, jump_hosts)
    matter for ssh:// URLs."""
    engine = _engines.get(url)
    if engine is None:
        engine = _engines[url] = Engine(url, ssh_endpoint(url, **ssh_options))
    engine.refs += 1
    return engine


async def release(engine: Engine) -> None:
    engine.refs -= 1
    if engine.refs <= 0 and _engines.get(engine.url) is engine:
        del _engines[engine.url]
        await engine.close()


CREATE_GRACE = 30.0  # seconds a cancelled start still waits for the engine's answer


async def creation(creating: asyncio.Future[T], record: Callable[[T], None]) -> T:
    """Await the engine's answer to a create call and `record` it (the id to remove later).
    If the caller is cancelled meanwhile (its launch timed out, its kernel was deleted, the
    gateway stops), the answer is still awaited, up to CREATE_GRACE s and through further
    cancellations (the timeout's, then the delete's), and recorded before the cancellation
    goes on: the caller's clean-up then removes what the engine created, which would
    otherwise run on with nobody knowing its id."""

    def answered(fut: asyncio.Future[T]) -> None:
        if not fut.cancelled() and fut.exception() is None:
            record(fut.result())

    # called before any waiter wakes, so recorded whoever is still waiting
    creating.add_done_callback(answered)
    try:
        return await asyncio.shield(creating)
    except asyncio.CancelledError:
        await aio.outlast(creating, CREATE_GRACE, cancelled=True)
        raise


async def ignore_missing(coro: Awaitable[Any]) -> None:
    """Await a removal; an object already gone is what we wanted."""
    try:
        await coro
    except EngineError as e:
        if e.code != 404:
            raise
    except KernelError as e:
        log.warning("%s", e.message)


def log_text(lines: list[str] | str, keep: int = 15) -> str:
    text = "".join(lines) if isinstance(lines, list) else lines
    return "\n".join(text.strip().splitlines()[-keep:])
