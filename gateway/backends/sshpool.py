"""SSH connections shared by the kernels of the SSH backend: one per (host, port, user, jump
chain), counted by leases, kept alive by keepalives, and re-established after a drop.

    acquire(target) -> SSHHost        a lease; connects on first use
    live(target)                      whether a shared connection to it is up now
    reachable(target)                 whether it and its jump hosts answer (the status page)
    ssh_errors(target, what)          asyncssh's failures as gateway errors, wherever they enter
    SSHHost.connection(timeout)       the live connection, waiting out a reconnect
    SSHHost.watch(kernel)             re-forward it after a reconnect, include it in probes
    SSHHost.alive(pid, max_age)       one batched `kill -0` per host for all its kernels
    release(host)                     end a lease; the connection closes after a short linger

A dropped connection is retried for `reconnect_timeout` seconds; after that the host is
`lost` (with a message) and every kernel on it polls as dead.

asyncssh is imported only here and in ssh.py, when a connection is first needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import BackendUnavailable, GatewayError, KernelError, KernelStartError

if TYPE_CHECKING:
    import asyncssh

log = logging.getLogger(__name__)

LINGER = 10.0  # seconds an unused connection stays open for the next kernel
PROBE_TIMEOUT = 4.0  # seconds reachable() gives a connection (its caller allows ~5)
# OpenSSH allows 10 sessions per connection by default (MaxSessions); one is our SFTP client
SESSIONS = 8
# AES-GCM first: asyncssh runs ChaCha20-Poly1305 (its default first choice) as several
# Python-level cipher calls per packet, 55-130 us, against 7-30 us for AES-GCM (one call, AES-NI
# where the CPU has it). Every kernel message and every synced file crosses as packets. The
# rest of asyncssh's list follows, so a server without GCM still negotiates.
CIPHERS = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes256-ctr",
    "aes192-ctr",
    "aes128-ctr",
)


def require_asyncssh() -> Any:
    try:
        import asyncssh
    except ImportError as e:
        raise KernelStartError(
            "the SSH backend needs asyncssh: pip install 'remote-kernel-gateway[ssh]'"
        ) from e
    return asyncssh


@dataclass(frozen=True)
class Hop:
    host: str
    port: int = 22
    username: str | None = None

    @classmethod
    def parse(cls, spec: str, port: int = 22, username: str | None = None) -> Hop:
        """`[user@]host[:port]`, as ssh -J takes it."""
        user, _, hostport = spec.rpartition("@")
        host, sep, p = hostport.rpartition(":") if hostport.count(":") == 1 else ("", "", "")
        if not sep:
            host = hostport
        return cls(host, int(p) if sep else port, user or username)

    def __str__(self) -> str:
        user = f"{self.username}@" if self.username else ""
        return f"{user}{self.host}:{self.port}"


def route(target: Target) -> str:
    """`user@host:port`, and the jump hosts it is reached through: for people (stages)."""
    via = f" via {', '.join(map(str, target.jumps))}" if target.jumps else ""
    return f"{target.hop}{via}"


@dataclass(frozen=True)
class Target:
    """Where to connect and how; equal targets share one connection."""

    hop: Hop
    jumps: tuple[Hop, ...] = ()
    identity_file: str | None = None
    known_hosts: str = "~/.ssh/known_hosts"
    connect_timeout: float = 10.0
    keepalive_interval: float = 5.0
    keepalive_count_max: int = 3
    reconnect_timeout: float = 30.0
    # the target hop's password or one-time code, for password and keyboard-interactive
    # auth: the output of a command run here, or a file's text (secret(); never a client's)
    password_command: str = ""
    password_file: str = ""

    @property
    def password_source(self) -> str:
        """Where the password comes from, for messages (a command's text may hold one)."""
        if self.password_command:
            return "the kernelspec's password_command"
        return f"password_file {self.password_file}" if self.password_file else ""


class Watcher(Protocol):
    pid: int | None

    async def reforward(self, conn: asyncssh.SSHClientConnection) -> None: ...


ALIVE_FN = (
    'alive() { kill -0 "$1" 2>/dev/null || return 1; [ -r "/proc/$1/stat" ] || return 0; '
    'case "$(sed "s/.*) //" "/proc/$1/stat")" in Z*|X*) return 1;; esac; }'
)


@contextlib.contextmanager
def ssh_errors(target: Target, what: str, hop: Hop | None = None) -> Iterator[None]:
    """asyncssh's and the network's failures in the block as gateway errors, `what` saying
    what was being done: a refused host key or login is the kernelspec's to fix
    (KernelStartError), a host that cannot be reached now or a dropped connection is a
    BackendUnavailable, any other SSH failure a KernelError."""
    mod = require_asyncssh()
    hop = hop or target.hop
    kh = target.known_hosts
    try:
        yield
    except mod.HostKeyNotVerifiable as e:
        scan = f"ssh-keyscan -p {hop.port} {hop.host} >> {kh}"
        raise KernelStartError(
            f"the SSH host key of {hop.host}:{hop.port} is not known "
            f"(unknown host keys are refused; checked {kh}). If you trust "
            f"this host, accept its key with: {scan}"
        ) from e
    except mod.PermissionDenied as e:
        ident = target.identity_file or "ssh-agent / ~/.ssh/id_*"
        check = f"the username and the key ({ident})"
        if target.password_source and hop == target.hop:
            check = f"the username, the key ({ident}) and the password ({target.password_source})"
        raise KernelStartError(
            f"SSH authentication to {hop} was refused ({e.reason}); check {check}"
        ) from e
    except TimeoutError as e:
        raise BackendUnavailable(
            f"{what}: SSH host {hop} did not answer in time (host unreachable?)"
        ) from e
    except (mod.DisconnectError, mod.ChannelOpenError) as e:
        raise BackendUnavailable(f"{what}: the SSH connection to {hop} failed: {e.reason}") from e
    except OSError as e:
        raise BackendUnavailable(f"{what}: cannot reach SSH host {hop}: {e.strerror or e}") from e
    except mod.Error as e:
        raise KernelError(f"{what} on {hop}: {e.reason}") from e


def _read_credentials(target: Target) -> tuple[Any, Any]:
    """known_hosts and the identity, read from disk (run in a thread: file I/O)."""
    mod = require_asyncssh()
    path = os.path.expanduser(target.known_hosts)
    try:
        with open(path) as f:
            known = mod.import_known_hosts(f.read())
    except FileNotFoundError:
        known = mod.import_known_hosts("")  # still refuse every host: never trust blindly
    keys = None
    if target.identity_file:
        keys = [mod.read_private_key(os.path.expanduser(target.identity_file))]
    return known, keys


SECRET_TIMEOUT = 60.0  # seconds a password_command may take (it may ask a person)


def check_password_file(path: str) -> str:
    """`path`, absolute, if it is a file only its owner may read (mode 0600 or stricter);
    a BadRequest otherwise: a password others can read is no secret."""
    from ..errors import BadRequest

    full = os.path.abspath(os.path.expanduser(path))
    try:
        mode = os.stat(full).st_mode
    except OSError as e:
        raise BadRequest(f"password_file {full}: {e.strerror}") from e
    if mode & 0o077:
        raise BadRequest(
            f"password_file {full} may be read by others (mode {mode & 0o777:04o}): "
            f"refused; chmod 600 {full}"
        )
    return full


def _read_text(path: str) -> str:
    with open(os.path.expanduser(path)) as f:
        return f.read()


async def secret(target: Target) -> str | None:
    """The password or one-time code of `target`'s hop: its password_command's output (one
    trailing line break dropped), or its password_file's text; None when it has neither.
    Read anew for every connection (a one-time code changes)."""
    if target.password_file:
        path = target.password_file
        try:
            check_password_file(path)
        except GatewayError as e:  # a BadRequest at `rkg spec add`; the spec's to fix here
            raise KernelStartError(e.message) from None
        try:
            text = await asyncio.to_thread(_read_text, path)
            return text.removesuffix("\n")
        except OSError as e:
            raise KernelStartError(f"cannot read password_file {path}: {e.strerror}") from e
    if not target.password_command:
        return None
    proc = await asyncio.create_subprocess_shell(
        target.password_command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), SECRET_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise KernelStartError(
            f"the password_command for {target.hop} gave no answer in {SECRET_TIMEOUT:g} s"
        ) from None
    if proc.returncode != 0:
        last = (err.decode(errors="replace").strip().splitlines() or [""])[-1]
        raise KernelStartError(
            f"the password_command for {target.hop} exited {proc.returncode}: {last}"
        )
    return out.decode(errors="replace").removesuffix("\n")


def _secret_client(password: str) -> Any:
    """An asyncssh client that gives `password` once to password auth and once to a
    keyboard-interactive challenge (every prompt of it: a password, a one-time code), so a
    wrong one ends the login instead of being retried."""
    base: Any = require_asyncssh().SSHClient

    class SecretClient(base):  # type: ignore[misc]
        def __init__(self) -> None:
            self.given: set[str] = set()

        def _once(self, method: str) -> bool:
            first = method not in self.given
            self.given.add(method)
            return first

        def password_auth_requested(self) -> str | None:
            return password if self._once("password") else None

        def kbdint_auth_requested(self) -> str:
            return ""  # any submethod

        def kbdint_challenge_received(
            self, name: str, instructions: str, lang: str, prompts: Any
        ) -> list[str] | None:
            if not prompts:
                return []  # a message only
            return [password] * len(prompts) if self._once("kbdint") else None

    return SecretClient


class SSHHost:
    """One shared SSH connection (and its jump connections) with a supervisor task that
    reconnects after a drop and re-forwards every watched kernel."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.refs = 0
        self.lost: str | None = None
        self.kernels: set[Watcher] = set()
        self.trying: Hop | None = None  # the hop being connected to, until all answered
        self._conn: asyncssh.SSHClientConnection | None = None
        self._jumps: list[asyncssh.SSHClientConnection] = []
        self._sftp: asyncssh.SFTPClient | None = None
        self._connected = asyncio.Event()
        self._lock = asyncio.Lock()
        self._supervisor: asyncio.Task[None] | None = None
        self._linger: asyncio.TimerHandle | None = None
        self._probe: asyncio.Task[dict[int, bool]] | None = None
        self._status: dict[int, bool] = {}
        self._status_at = 0.0
        self.sessions = asyncio.Semaphore(SESSIONS)  # hold one around every exec channel

    @property
    def name(self) -> str:
        return str(self.target.hop)

    async def _connect(self, *, ask: bool = True) -> asyncssh.SSHClientConnection:
        """The connection through every hop. `ask` False: no password or code is asked for
        (a check must not use up a one-time code or page a person), so a host that needs one
        refuses the login."""
        mod = require_asyncssh()
        t = self.target
        opened: list[asyncssh.SSHClientConnection] = []
        try:
            known, keys = await asyncio.to_thread(_read_credentials, t)
        except (OSError, mod.KeyImportError) as e:
            raise KernelStartError(f"cannot use the SSH key {t.identity_file}: {e}") from e
        try:
            tunnel = None
            for hop in (*t.jumps, t.hop):
                opts: dict[str, Any] = {
                    "known_hosts": known,
                    "tunnel": tunnel,
                    "keepalive_interval": t.keepalive_interval,
                    "keepalive_count_max": t.keepalive_count_max,
                    "connect_timeout": t.connect_timeout,
                    "encryption_algs": CIPHERS,
                }
                if hop.username:
                    opts["username"] = hop.username
                if keys is not None:
                    opts["client_keys"] = keys
                if hop == t.hop and t.password_source and ask:
                    password = await secret(t)
                    if password is not None:
                        opts["client_factory"] = _secret_client(password)
                elif hop == t.hop and t.password_source:
                    opts.update(password_auth=False, kbdint_auth=False)
                self.trying = hop
                with ssh_errors(t, "connecting", hop):
                    conn = await asyncio.wait_for(
                        mod.connect(hop.host, hop.port, **opts), t.connect_timeout
                    )
                opened.append(conn)
                tunnel = conn
        except BaseException:
            for c in opened:
                c.close()
            raise
        self._jumps, self.trying = opened[:-1], None
        return opened[-1]

    async def open(self) -> None:
        """First connection, for the first lease: errors go to the kernel start."""
        async with self._lock:
            if self._conn is not None or self._supervisor is not None:
                return
            self._conn = await self._connect()
            self._connected.set()
            # a context of its own: the connection outlives the kernel whose start opened it,
            # so its log lines must not carry that kernel's id (logs.py)
            self._supervisor = asyncio.create_task(self._supervise(), context=contextvars.Context())

    async def connection(self, wait: float = 30.0) -> asyncssh.SSHClientConnection:
        """The live connection; waits (bounded) while a dropped one is re-established."""
        if self.lost:
            raise BackendUnavailable(self.lost)
        if not self._connected.is_set():
            try:
                await asyncio.wait_for(self._connected.wait(), wait)
            except TimeoutError:
                raise BackendUnavailable(f"the SSH connection to {self.name} is down") from None
        if self.lost or self._conn is None:
            raise BackendUnavailable(self.lost or f"the SSH connection to {self.name} is closed")
        return self._conn

    @property
    def up(self) -> bool:
        return self._connected.is_set() and self._conn is not None

    async def sftp(self) -> asyncssh.SFTPClient:
        conn = await self.connection()
        async with self._lock:  # one SFTP session, however many kernels start at once
            if self._sftp is None:
                with ssh_errors(self.target, "opening SFTP"):
                    self._sftp = await conn.start_sftp_client()
            return self._sftp

    async def _supervise(self) -> None:
        """Owned by this host (cancelled in close()): wait for a drop, then reconnect."""
        loop = asyncio.get_running_loop()
        while True:
            assert self._conn is not None
            await self._conn.wait_closed()
            self._connected.clear()
            self._drop_connection()
            log.warning("SSH connection to %s lost; reconnecting", self.name)
            deadline = loop.time() + self.target.reconnect_timeout
            delay = 0.1
            while True:
                try:
                    self._conn = await self._connect()
                    break
                except KernelError as e:
                    if loop.time() + delay > deadline:
                        self.lost = (
                            f"lost the SSH connection to {self.name} and could not "
                            f"reconnect within {self.target.reconnect_timeout:g} s: "
                            f"{e.message}"
                        )
                        log.error("%s", self.lost)
                        _POOL.pop(self.target, None)
                        self._connected.set()  # wake waiters: they see `lost`
                        return
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
            log.info("SSH connection to %s re-established", self.name)
            RECONNECTS[self.name] = RECONNECTS.get(self.name, 0) + 1
            self._status.clear()
            self._connected.set()
            for kernel in list(self.kernels):
                try:
                    await kernel.reforward(self._conn)
                except Exception:
                    log.exception("re-forwarding a kernel on %s", self.name)

    def _drop_connection(self) -> None:
        for c in [self._conn, *self._jumps]:
            if c is not None:
                c.close()
        self._conn, self._jumps, self._sftp = None, [], None

    # -- liveness ------------------------------------------------------------------------

    def watch(self, kernel: Watcher) -> None:
        self.kernels.add(kernel)

    def unwatch(self, kernel: Watcher) -> None:
        self.kernels.discard(kernel)

    async def alive(self, pid: int, max_age: float) -> bool | None:
        """Whether `pid` runs on the host (None: cannot tell now). One probe command answers
        for every watched kernel, so N kernels polling cost one exec per `max_age`."""
        loop = asyncio.get_running_loop()
        if pid in self._status and loop.time() - self._status_at <= max_age:
            return self._status[pid]
        if not self.up:
            return None
        if self._probe is None or self._probe.done():
            pids = {k.pid for k in self.kernels if k.pid is not None} | {pid}
            self._probe = asyncio.create_task(self._run_probe(sorted(pids)))
        status = await asyncio.shield(self._probe)
        if pid not in status:  # registered after that probe started
            status = await self._run_probe([pid])
        return status.get(pid)

    async def _run_probe(self, pids: list[int]) -> dict[int, bool]:
        started = asyncio.get_running_loop().time()
        script = f"{ALIVE_FN}; for p in {' '.join(map(str, pids))}; do alive $p && echo $p; done"
        try:
            result = await self.exec(script, wait=0, limit=10)
        except KernelError:
            return {}
        if result.exit_status not in (0, 1):
            return {}
        out = str(result.stdout or "")
        running = {int(w) for w in out.split() if w.isdigit()}
        status = {p: p in running for p in pids}
        self._status.update(status)
        self._status_at = started
        return status

    async def run(self, command: str, limit: float = 15.0) -> str:
        """Run a short command, waiting at most `limit` s for the connection and again for
        the command; its stdout (empty when the host cannot be reached now)."""
        try:
            result = await self.exec(command, wait=limit, limit=limit)
        except KernelError as e:
            log.debug("on %s, %r failed: %s", self.name, command, e)
            return ""
        return str(result.stdout or "")

    async def exec(
        self,
        command: str,
        *,
        what: str = "",
        wait: float = 30.0,
        limit: float | None = None,
        stdin: str | None = None,
    ) -> asyncssh.SSHCompletedProcess:
        """Run `command` on one of the host's sessions (waiting at most `wait` s for the
        connection, `limit` s for the command); its failures as gateway errors."""
        conn = await self.connection(wait=wait)
        with ssh_errors(self.target, what or f"running {command.split(maxsplit=1)[0]}"):
            async with self.sessions:
                return await conn.run(command, input=stdin, check=False, timeout=limit)

    # -- leases --------------------------------------------------------------------------

    def close(self) -> None:
        if self._linger:
            self._linger.cancel()
        if self._supervisor:
            self._supervisor.cancel()
        if self._probe:
            self._probe.cancel()
        self._drop_connection()
        self._connected.clear()
        if _POOL.get(self.target) is self:
            del _POOL[self.target]


_POOL: dict[Target, SSHHost] = {}
RECONNECTS: dict[str, int] = {}  # by host name: connections re-established after a drop


def metric_families() -> Iterator[Any]:
    """For /metrics: the pool's connections and reconnects, by host."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    up = GaugeMetricFamily(
        "rkg_ssh_connections", "Shared SSH connections that are up, by host.", labels=["host"]
    )
    by_host: dict[str, int] = {}
    for host in list(_POOL.values()):
        by_host[host.name] = by_host.get(host.name, 0) + int(host.up)
    for name, n in sorted(by_host.items()):
        up.add_metric([name], n)
    yield up
    again = CounterMetricFamily(
        "rkg_ssh_reconnects",
        "SSH connections re-established after a drop, by host.",
        labels=["host"],
    )
    for name, n in sorted(RECONNECTS.items()):
        again.add_metric([name], n)
    yield again


def live(target: Target) -> bool:
    """Whether the shared connection to `target` is up now (a start then needs no connect)."""
    host = _POOL.get(target)
    return host is not None and host.up and not host.lost


async def reachable(target: Target) -> list[tuple[Hop, str]]:
    """Whether each hop to `target` answers, jump hosts first: (hop, '' or why not). A live
    shared connection answers for all of them; else a connection of its own is made, outside
    the pool, and closed at once. Hops behind one that failed are not tried. A host whose
    login needs a password or code is not asked for one: its sshd answering is enough."""
    hops = [*target.jumps, target.hop]
    if live(target):
        return [(hop, "") for hop in hops]
    probe = SSHHost(target)
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            probe._conn = await probe._connect(ask=False)
        return [(hop, "") for hop in hops]
    except TimeoutError:
        why = f"no answer within {PROBE_TIMEOUT:g} s"
    except KernelError as e:
        refused = isinstance(e.__cause__, require_asyncssh().PermissionDenied)
        if refused and target.password_source and probe.trying == target.hop:
            return [(hop, "") for hop in hops]
        why = e.message
    finally:
        probe._drop_connection()
    failed = hops.index(probe.trying) if probe.trying in hops else 0
    return [
        (hop, "" if i < failed else why if i == failed else f"not tried: {hops[failed]} failed")
        for i, hop in enumerate(hops)
    ]


async def acquire(target: Target) -> SSHHost:
    """A lease on the shared connection to `target`, connecting when there is none."""
    host = _POOL.get(target)
    if host is None or host.lost:
        host = _POOL[target] = SSHHost(target)
    host.refs += 1
    if host._linger:
        host._linger.cancel()
        host._linger = None
    try:
        await host.open()
    except BaseException:
        release(host, linger=0)
        raise
    return host


def release(host: SSHHost, linger: float = LINGER) -> None:
    """End a lease; the last one closes the connection after `linger` seconds."""
    host.refs -= 1
    if host.refs > 0:
        return
    if linger <= 0 or host.lost:
        host.close()
    else:
        host._linger = asyncio.get_running_loop().call_later(linger, _close_idle, host)


def _close_idle(host: SSHHost) -> None:
    if host.refs <= 0:
        with contextlib.suppress(Exception):
            host.close()
