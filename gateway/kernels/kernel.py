"""One kernel: its jupyter_client manager (and so its provisioner, the backend), one iopub
subscription shared by all its clients, the client sessions, and the lifecycle operations,
serialised by a lock so a delete during a restart waits instead of failing.

States: starting -> running <-> restarting -> running | dead; any -> stopping -> (removed)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, cast

import zmq
import zmq.asyncio
from jupyter_client.manager import AsyncKernelManager

from ..bridge import codec
from ..bridge.session import ClientSession
from ..errors import ClientError, KernelError, KernelStartError, KernelTimeout

log = logging.getLogger(__name__)

_ISO = "%Y-%m-%dT%H:%M:%S.%fZ"


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime(_ISO)


class ManagedKernel:
    def __init__(self, km: AsyncKernelManager, *, name: str, replay_seconds: float,
                 replay_max_bytes: int, autorestart: bool, restart_limit: int,
                 on_gone: Callable[[ManagedKernel], None],
                 on_launched: Callable[[ManagedKernel], Awaitable[None]]) -> None:
        self.km = km
        self.id: str = km.kernel_id
        self.name = name
        self.state = "starting"
        self.execution_state = "starting"
        self.last_activity = time.time()
        self.sessions: dict[str, ClientSession] = {}
        self._replay_seconds = replay_seconds
        self._replay_max_bytes = replay_max_bytes
        self._autorestart = autorestart
        self._restart_limit = restart_limit
        self._restarts: list[float] = []
        self._on_gone = on_gone
        self._on_launched = on_launched
        self.created = time.time()
        self.launch: dict[str, Any] = {"env": {}, "cwd": None}  # what the registry relaunches
        self._lock = asyncio.Lock()
        self._iopub: zmq.asyncio.Socket | None = None
        self._iopub_task: asyncio.Task[None] | None = None
        self._iopub_live: asyncio.Future[None] | None = None  # done at its first message
        self._monitor_task: asyncio.Task[None] | None = None
        self._shutdown: asyncio.Task[None] | None = None
        self._handshakes: dict[str, asyncio.Future[None]] = {}
        self._conn_info: dict[str, Any] = {}

    # -- model -------------------------------------------------------------------------

    @property
    def key(self) -> bytes:
        return self.km.session.key

    @property
    def connections(self) -> int:
        return sum(1 for s in self.sessions.values() if s.attached)

    def model(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "last_activity": iso(self.last_activity),
                "execution_state": self.execution_state, "connections": self.connections}

    def touch(self) -> None:
        self.last_activity = time.time()

    # -- sockets -----------------------------------------------------------------------

    def connect_channel(self, channel: str, identity: bytes, *, immediate: bool = False
                        ) -> zmq.asyncio.Socket:
        """A socket to one of the kernel's channels. `immediate`: its pipe exists only once
        the ZMTP handshake with the kernel completed, so POLLOUT on it means "connected"
        (ZMQ reads IMMEDIATE at connect time, hence set on the context for the call)."""
        connect = getattr(self.km, f"connect_{channel}")
        if not immediate:
            return cast(zmq.asyncio.Socket, connect(identity=identity))
        ctx = self.km.context
        ctx.setsockopt(zmq.IMMEDIATE, 1)
        try:
            return cast(zmq.asyncio.Socket, connect(identity=identity))
        finally:
            ctx.sockopts.pop(zmq.IMMEDIATE, None)

    def _open_iopub(self) -> None:
        sock = cast(zmq.asyncio.Socket, self.km.connect_iopub())
        self._iopub = sock
        self._iopub_live = asyncio.get_running_loop().create_future()
        self._iopub_task = asyncio.create_task(self._pump_iopub(sock))

    def _close_iopub(self) -> None:
        if self._iopub_task:
            self._iopub_task.cancel()
            self._iopub_task = None
        if self._iopub is not None:
            self._iopub.close(linger=0)
            self._iopub = None

    async def _pump_iopub(self, sock: zmq.asyncio.Socket) -> None:
        try:
            while True:
                frames = codec.frames_as_parts(await sock.recv_multipart(copy=False))
                try:
                    parts = codec.parts_from_zmq(frames)
                except codec.BadFrame as e:
                    log.warning("kernel %s sent a bad iopub message: %s", self.id, e)
                    continue
                self.last_activity = time.time()
                if self._iopub_live is not None and not self._iopub_live.done():
                    self._iopub_live.set_result(None)
                self._observe(parts)
                for session in list(self.sessions.values()):
                    session.deliver(b"iopub", parts)
        except (asyncio.CancelledError, zmq.ContextTerminated):
            pass
        except zmq.ZMQError as e:
            log.debug("iopub pump of %s stopped: %s", self.id, e)

    def _observe(self, parts: Sequence[codec.Part]) -> None:
        """Track execution_state, and complete readiness handshakes (only status messages,
        which are small, are decoded)."""
        header = bytes(parts[0])  # headers are small: bytes already, so no copy
        if b'"status"' not in header:
            return
        try:
            if json.loads(header).get("msg_type") != "status":
                return
            state = json.loads(bytes(parts[3])).get("execution_state")
            # during a restart the old kernel's last statuses must not make it look idle
            if isinstance(state, str) and self.state == "running":
                self.execution_state = state
            if self._handshakes:
                parent = json.loads(bytes(parts[1])).get("msg_id")
                fut = self._handshakes.get(parent)
                if fut is not None and not fut.done():
                    fut.set_result(None)
        except (ValueError, AttributeError):
            log.warning("kernel %s sent an undecodable status message", self.id)

    def broadcast_status(self, state: str) -> None:
        parts = codec.status_parts(state)
        for session in list(self.sessions.values()):
            session.deliver(b"iopub", parts)

    # -- client sessions -----------------------------------------------------------------

    def session_for(self, session_id: str) -> ClientSession:
        """The session with this id (reused across reconnects), created when new. Sessions
        without an id are not kept after their socket closes."""
        self.expire_sessions()
        session = self.sessions.get(session_id) if session_id else None
        if session is None:
            session = ClientSession(self, session_id, max_bytes=self._replay_max_bytes)
            session.open_channels()
            self.sessions[session_id or uuid.uuid4().hex] = session
        return session

    def release(self, session: ClientSession) -> None:
        """Called when a session's socket closed."""
        if not session.session_id and not session.attached:
            self._drop_session(session)
        self.expire_sessions()

    def expire_sessions(self) -> None:
        now = time.monotonic()
        for session in list(self.sessions.values()):
            if session.detached_at is not None and now - session.detached_at > self._replay_seconds:
                self._drop_session(session)

    def _drop_session(self, session: ClientSession) -> None:
        session.close_channels()
        for key, value in list(self.sessions.items()):
            if value is session:
                del self.sessions[key]

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self, *, launch_timeout: float, **kwargs: Any) -> None:
        """Launch through the provisioner and wait until the kernel answers and its iopub
        reaches us. On any failure, cancellation included, nothing is left running.
        The kernel is recorded as soon as its process exists, so a gateway that dies
        during the wait leaves a record for the next one rather than an orphan."""
        try:
            async with asyncio.timeout(launch_timeout):
                await self.km.start_kernel(**kwargs)
                await self._on_launched(self)
                self._conn_info = dict(self.km.get_connection_info())
                self._open_iopub()
                await self._wait_ready()
        except asyncio.CancelledError:
            await self._abandon()
            raise
        except TimeoutError:
            await self._abandon()
            # a backend that queues its kernels says where the start stood (batch.py)
            note = getattr(self.km.provisioner, "launch_note", lambda: "")()
            raise KernelTimeout(f"kernel {self.name!r} did not become ready within "
                                f"{launch_timeout:g} s (KERNEL_LAUNCH_TIMEOUT)"
                                + (f": {note}" if note else "")) from None
        except (KernelError, ClientError):  # a backend may refuse the request (uid, GPUs)
            await self._abandon()
            raise
        except Exception as e:
            await self._abandon()
            raise KernelStartError(f"kernel {self.name!r} failed to start: "
                                   f"{type(e).__name__}: {e}") from e
        self.state = "running"
        self.execution_state = "idle"
        self._monitor_task = asyncio.create_task(self._monitor())

    async def reattach(self, *, launch_timeout: float) -> None:
        """Take over a kernel a previous gateway process started (its manager and provisioner
        already loaded from the state store): reconnect and prove it answers."""
        self._conn_info = dict(self.km.get_connection_info())
        self._open_iopub()
        # jupyter_client opens its control socket in start_kernel(), which was not called
        # here; shutdown and restart requests need it.
        self.km._connect_control_socket()
        try:
            await asyncio.wait_for(self._wait_ready(), launch_timeout)
        except (TimeoutError, KernelError):
            await self._abandon()
            raise
        self.state = "running"
        self.execution_state = "idle"
        self._monitor_task = asyncio.create_task(self._monitor())

    async def discard(self) -> None:
        """A recorded kernel that is gone: remove what it left (connection file)."""
        self.state = "dead"
        try:
            await self.km.cleanup_resources()
        except Exception as e:
            log.debug("cleaning up after kernel %s: %s", self.id, e)
        # jupyter_client removes only connection files it wrote in this process
        with contextlib.suppress(OSError):
            os.remove(self.km.connection_file)

    def detach(self) -> None:
        """Leave the kernel running (--keep-kernels): close our sockets and stop watching."""
        self.state = "stopping"
        if self._monitor_task:
            self._monitor_task.cancel()
        self._close_sessions(1001, "gateway restarting; the kernel keeps running")
        self._close_iopub()

    def _close_sessions(self, code: int, reason: str) -> None:
        """Close every client's socket with `code` and drop the sessions' ZMQ sockets."""
        for session in list(self.sessions.values()):
            if session.sink is not None:
                session.sink.close_with(code, reason)
            session.close_channels()
        self.sessions.clear()

    async def _abandon(self) -> None:
        self._close_iopub()
        try:
            if self.km.has_kernel:
                await self.km.shutdown_kernel(now=True)
        except Exception:
            log.exception("cleaning up kernel %s after a failed start", self.id)
        self.state = "dead"

    async def _wait_ready(self) -> None:
        """Send kernel_info_request until an iopub status answering it arrives: proves the
        kernel runs and that our iopub subscription is live, so no early output is lost.

        Requests go only over a completed connection (IMMEDIATE, set before connecting:
        ZMQ reads it at connect time), so a kernel not listening yet, still starting or
        waiting in a batch queue, finds none piled up: each queued request costs a starting
        kernel a reply and two statuses, which with 20 kernels starting at once on 2 cores
        cost more than the gateway itself. A request goes when the connection completes
        (the socket turns writable), again as soon as our iopub subscription proves live
        (a status published before it was is lost; ipykernel 7 says so at once with
        iopub_welcome, older kernels with their first status), before that at growing
        intervals, and after that only every 2 s."""
        loop = asyncio.get_running_loop()
        shell = self.connect_channel("shell", uuid.uuid4().hex.encode(), immediate=True)
        answered: asyncio.Future[None] = loop.create_future()
        sent: list[str] = []
        resend = 0.05  # seconds after a request before another
        last_sent = -1.0
        live_when_sent = False
        alive_checked = loop.time()
        try:
            while not answered.done():
                now = loop.time()
                if now - alive_checked >= 0.1:
                    alive_checked = now
                    await self._check_alive()
                live = self._iopub_live is not None and self._iopub_live.done()
                # sent while our subscription was live, its status cannot be missed: only
                # a lost connection could lose it, so the next try is much later
                wait = max(resend, 2.0) if live_when_sent else resend
                if last_sent < 0 or now - last_sent >= wait or (live and not live_when_sent):
                    if not await shell.poll(timeout=100, flags=zmq.POLLOUT):  # type: ignore[call-arg]
                        continue  # not connected yet
                    msg_id = uuid.uuid4().hex
                    with contextlib.suppress(zmq.Again):
                        await shell.send_multipart(self._kernel_info_request(msg_id),
                                                   flags=zmq.NOBLOCK)
                        self._handshakes[msg_id] = answered  # any of them will do
                        sent.append(msg_id)
                        if last_sent >= 0:
                            resend = min(resend * 2, 1.0)
                        last_sent, live_when_sent = loop.time(), live
                waits: set[asyncio.Future[Any]] = {answered}
                if self._iopub_live is not None and not live_when_sent:
                    waits.add(self._iopub_live)
                await asyncio.wait(waits, timeout=min(resend, 0.1),
                                   return_when=asyncio.FIRST_COMPLETED)
        finally:
            for msg_id in sent:
                self._handshakes.pop(msg_id, None)
            shell.close(linger=0)

    def _kernel_info_request(self, msg_id: str) -> list[bytes]:
        header = {"msg_id": msg_id, "msg_type": "kernel_info_request", "session": msg_id,
                  "username": "gateway", "date": iso(time.time()), "version": "5.3"}
        return codec.zmq_from_parts(self.key, [json.dumps(header).encode(), b"{}", b"{}", b"{}"])

    async def _check_alive(self) -> None:
        if not await self.km.is_alive():
            tail = getattr(self.km.provisioner, "log_tail", lambda: "")()
            raise KernelStartError(
                f"kernel {self.name!r} exited during start-up (exit code "
                f"{self._exit_code()})" + (f"; its last output:\n{tail}" if tail else ""))

    def _exit_code(self) -> Any:
        prov = self.km.provisioner
        proc = getattr(prov, "process", None)
        return getattr(proc, "returncode", "unknown")

    async def interrupt(self) -> None:
        if self.state not in ("running",):
            return
        await self.km.interrupt_kernel()

    async def restart(self) -> None:
        """REST restart: answered once the new kernel is reachable."""
        async with self._lock:
            if self.state in ("stopping", "dead"):
                raise KernelError(f"kernel {self.id} is {self.state}; it cannot be restarted")
            await self._restart(now=False)

    async def _restart(self, *, now: bool) -> None:
        """Relaunch, then let client messages through only once iopub is live again.
        `now`: the kernel died, so what is queued in its sockets was meant for a dead
        process; those sockets are replaced rather than replayed into the new kernel."""
        self.state = "restarting"
        self.execution_state = "restarting"
        try:
            await self.km.restart_kernel(now=now)
            log.debug("kernel %s relaunched; waiting for it to answer", self.id)
            info = dict(self.km.get_connection_info())
            if info != self._conn_info or now:
                self._conn_info = info
                self._close_iopub()
                self._open_iopub()
                for session in self.sessions.values():
                    session.reopen_channels()
            await asyncio.wait_for(self._wait_ready(), self.km.shutdown_wait_time + 60)
            # what was held may ask for input: the new kernel must know our stdin first
            await asyncio.gather(*(s.stdin_connected() for s in self.sessions.values()))
        except Exception:
            self.state = "dead"
            self.execution_state = "dead"
            for session in self.sessions.values():
                session.discard_held()
            raise
        for session in self.sessions.values():
            session.release_held()
        self.state = "running"
        self.execution_state = "idle"
        await self._on_launched(self)

    async def _monitor(self) -> None:
        """Notice a kernel that died on its own; restart it or declare it dead."""
        while True:
            await asyncio.sleep(0.5)
            if self.state != "running" or self._lock.locked():
                continue
            if await self.km.is_alive():
                continue
            async with self._lock:
                if self.state != "running":
                    continue
                await self._on_died()

    async def _on_died(self) -> None:
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < 60] + [now]
        if not self._autorestart or len(self._restarts) > self._restart_limit:
            log.warning("kernel %s died; not restarting it", self.id)
            self.state = self.execution_state = "dead"
            self.broadcast_status("dead")
            return
        log.warning("kernel %s died; restarting it", self.id)
        self.broadcast_status("restarting")
        try:
            await self._restart(now=True)
        except Exception as e:
            log.error("kernel %s could not be restarted: %s", self.id, e)
            self.broadcast_status("dead")

    def shutdown(self) -> asyncio.Task[None]:
        """Stop the kernel for good; concurrent callers share the one shutdown."""
        if self._shutdown is None:
            self._shutdown = asyncio.create_task(self._do_shutdown())
        return self._shutdown

    async def _do_shutdown(self) -> None:
        async with self._lock:
            self.state = "stopping"
            if self._monitor_task:
                self._monitor_task.cancel()
            try:
                if self.km.has_kernel:
                    await self.km.shutdown_kernel(now=False)
            except Exception:
                log.exception("shutting down kernel %s", self.id)
                await self.km.shutdown_kernel(now=True)
            finally:
                self.execution_state = "dead"
                self.broadcast_status("dead")
                self._close_sessions(1000, "kernel deleted")
                self._close_iopub()
                self.state = "dead"
                self._on_gone(self)
