"""One kernel: its jupyter_client manager (and so its provisioner, the backend), and the
lifecycle operations, serialised by a lock so a delete during a restart waits instead of
failing. Its clients are in `fanout` (fanout.py); readiness after each launch is proved by
`readiness.Handshake`.

States: starting -> running <-> restarting -> running | dead; any -> stopping -> (removed)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import zmq.asyncio
from jupyter_client.manager import AsyncKernelManager

from .. import aio, logs, wire
from ..backends.contract import GatewayKernelManager, backend_name, hooks
from ..errors import ClientError, KernelError, KernelStartError, KernelTimeout
from . import jc
from .budget import MemoryBudget
from .fanout import Fanout
from .readiness import Handshake
from .session import ClientSession

log = logging.getLogger(__name__)

UNDO_GRACE = 30.0  # seconds a failed start's undo may go on once it is cancelled


class ManagedKernel:
    def __init__(
        self,
        km: AsyncKernelManager,
        *,
        name: str,
        replay_seconds: float,
        replay_max_bytes: int,
        budget: MemoryBudget | None = None,
        max_sessions: int = 0,
        autorestart: bool,
        restart_limit: int,
        on_gone: Callable[[ManagedKernel], None],
        on_launched: Callable[[ManagedKernel], Awaitable[None]],
    ) -> None:
        self.km = km
        self.id: str = km.kernel_id
        self.name = name
        self.state = "starting"
        self.execution_state = "starting"
        self.last_activity = time.time()
        self.fanout = Fanout(
            self,
            replay_seconds=replay_seconds,
            replay_max_bytes=replay_max_bytes,
            on_iopub=self._on_iopub,
            budget=budget,
            max_sessions=max_sessions,
        )
        self._autorestart = autorestart
        self._restart_limit = restart_limit
        self._restarts: list[float] = []
        self._on_gone = on_gone
        self._on_launched = on_launched
        self.created = time.time()
        self.user = ""  # KERNEL_USERNAME at start
        self.owner = ""  # the user who started it (users.py); a warm pool's: no one yet
        self.launch: dict[str, Any] = {"env": {}, "cwd": None}  # what the registry relaunches
        self._lock = asyncio.Lock()
        self._monitor_task: asyncio.Task[None] | None = None
        self._shutdown: asyncio.Task[None] | None = None
        self._handshake = Handshake()
        self._conn_info: dict[str, Any] = {}

    # -- model -------------------------------------------------------------------------

    @property
    def key(self) -> bytes:
        key: bytes = self.km.session.key
        return key

    @property
    def connections(self) -> int:
        return self.fanout.connections

    def model(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "last_activity": wire.iso(self.last_activity),
            "execution_state": self.execution_state,
            "connections": self.connections,
            # the gateway's own: clients that know nothing of it ignore it
            "gateway": {
                "backend": self.backend,
                # the kernelspec it runs as: a failover spec's member, else `name`
                "spec": self.km.kernel_name,
                "host": self.location,
                "user": self.user,
                "state": self.state,
                "stage": self.stage,
                "started": wire.iso(self.created),
            },
        }

    @property
    def backend(self) -> str:
        return backend_name(self.km.provisioner) if self.km.provisioner else "none"

    @property
    def location(self) -> str:
        prov = self.km.provisioner
        if prov is None:
            return ""
        try:
            return hooks(prov).location()
        except Exception:  # a hook must never break a listing
            return ""

    @property
    def stage(self) -> str:
        """Where a start or restart stands, in words; '' once the kernel runs."""
        if self.state not in ("starting", "restarting"):
            return ""
        return self.km.stage if isinstance(self.km, GatewayKernelManager) else ""

    def _begin_stages(self, words: str) -> None:
        if isinstance(self.km, GatewayKernelManager):
            self.km.begin_stages()
            self.km.report_stage(words)

    def _stage(self, words: str) -> None:
        if isinstance(self.km, GatewayKernelManager):
            self.km.report_stage(words)

    def story(self) -> str:
        """The stages of the last launch, for the log line of a failed start."""
        return self.km.story() if isinstance(self.km, GatewayKernelManager) else ""

    def touch(self) -> None:
        self.last_activity = time.time()

    def connect(
        self, channel: str, identity: bytes | None = None, *, immediate: bool = False
    ) -> zmq.asyncio.Socket:
        """KernelLink.connect: a socket to one of the kernel's channels."""
        return jc.connect(self.km, channel, identity, immediate=immediate)

    def _on_iopub(self, parts: Sequence[wire.Part]) -> None:
        """Called by the fan-out for each iopub message: track execution_state, and complete
        readiness handshakes."""
        self.last_activity = time.time()
        try:
            content = wire.status_content(parts)
            if content is None:
                return
            state = content.get("execution_state")
            # during a restart the old kernel's last statuses must not make it look idle
            if isinstance(state, str) and self.state == "running":
                self.execution_state = state
            if self._handshake.waiting:
                self._handshake.answered(wire.parent_msg_id(parts))
        except (ValueError, AttributeError):
            log.warning("kernel %s sent an undecodable status message", self.id)

    def broadcast_status(self, state: str) -> None:
        self.fanout.broadcast(wire.status_parts(state))

    # -- client sessions (the bridge's side) ---------------------------------------------

    def session_key(self, session_id: str, user: str) -> str:
        """The fan-out's name for `user`'s session_id. The owner's is the id as given; another
        user (an admin, the only one who reaches someone else's kernel) gets their own session
        under it, so reusing the owner's session_id neither takes over its socket nor gets its
        replay (and an owner's id with a '/' is qualified too, so it cannot name another's)."""
        if session_id and (user != self.owner or "/" in session_id):
            return f"{user}/{session_id}"
        return session_id

    def session_for(self, session_id: str, user: str) -> ClientSession:
        """Called by the websocket handler when `user`'s client connects; see
        Fanout.session_for and session_key."""
        return self.fanout.session_for(self.session_key(session_id, user))

    def release(self, session: ClientSession) -> None:
        """Called by the websocket handler when a session's socket closed."""
        self.fanout.release(session)

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self, *, launch_timeout: float, **kwargs: Any) -> None:
        """Launch through the provisioner and wait until the kernel answers and its iopub
        reaches us. On any failure, cancellation included, nothing is left running.
        The kernel is recorded as soon as its process exists, so a gateway that dies
        during the wait leaves a record for the next one rather than an orphan."""
        self._begin_stages("launching")
        try:
            async with asyncio.timeout(launch_timeout):
                await self.km.start_kernel(**kwargs)
                await self._on_launched(self)
                self._conn_info = dict(self.km.get_connection_info())
                self.fanout.open()
                self._stage("waiting for the kernel to answer kernel_info")
                await self._wait_ready()
                jc.close_control(self.km)  # an idle kernel holds one ZMQ socket, iopub
        except asyncio.CancelledError:
            await self._abandon(cancelled=True)
            raise
        except TimeoutError:
            await self._abandon()
            # a backend that queues its kernels says where the start stood (batch.py)
            note = hooks(self.km.provisioner).launch_note()
            source = getattr(self.km, "launch_timeout_source", "") or "KERNEL_LAUNCH_TIMEOUT"
            raise KernelTimeout(
                f"kernel {self.name!r} did not become ready within "
                f"{launch_timeout:g} s ({source})" + (f": {note}" if note else "")
            ) from None
        except (KernelError, ClientError):  # a backend may refuse the request (uid, GPUs)
            await self._abandon()
            raise
        except Exception as e:
            await self._abandon()
            raise KernelStartError(
                f"kernel {self.name!r} failed to start: {type(e).__name__}: {e}"
            ) from e
        self.state = "running"
        self.execution_state = "idle"
        self._monitor_task = asyncio.create_task(self._monitor())

    async def reattach(self, *, launch_timeout: float) -> None:
        """Take over a kernel a previous gateway process started (its manager and provisioner
        already loaded from the state store): reconnect and prove it answers."""
        self._conn_info = dict(self.km.get_connection_info())
        self.fanout.open()
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
        self.fanout.close_sessions(1001, "gateway restarting; the kernel keeps running")
        self.fanout.close()

    async def _abandon(self, *, cancelled: bool = False) -> None:
        """Undo a start that failed or was cancelled (`cancelled`). A cancellation that comes
        meanwhile (the launch timed out, then a DELETE or the gateway's shutdown came) does not
        cut the undo short: the backend's clean-up comes last, after the kill's wait, and
        would be skipped, leaving the kernel's service or job behind."""
        self.fanout.close()
        try:
            stopping = asyncio.ensure_future(self._stop_now())
            await aio.outlast(stopping, UNDO_GRACE, cancelled=cancelled)
        finally:
            self.state = "dead"

    async def _stop_now(self) -> None:
        try:
            if self.km.has_kernel:
                await self.km.shutdown_kernel(now=True)
        except Exception:
            log.exception("cleaning up kernel %s after a failed start", self.id)

    async def _wait_ready(self) -> None:
        """Until the kernel answers a kernel_info_request through our iopub (readiness.py)."""
        await self._handshake.wait(
            connect_shell=lambda: self.connect("shell", uuid.uuid4().hex.encode(), immediate=True),
            key=self.key,
            iopub_live=lambda: self.fanout.live,
            check_alive=self._check_alive,
        )

    async def _check_alive(self) -> None:
        if not await self.km.is_alive():
            tail = hooks(self.km.provisioner).log_tail()
            raise KernelStartError(
                f"kernel {self.name!r} exited during start-up (exit code "
                f"{jc.exit_code(self.km.provisioner)})"
                + (f"; its last output:\n{tail}" if tail else "")
            )

    async def interrupt(self) -> None:
        if self.state not in ("running",):
            return
        jc.connect_control(self.km)  # a kernel in interrupt_mode "message" needs it
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
        self._begin_stages("restarting")
        try:
            jc.connect_control(self.km)  # its shutdown_request goes there
            await self.km.restart_kernel(now=now)
            self._stage("waiting for the kernel to answer kernel_info")
            info = dict(self.km.get_connection_info())
            if info != self._conn_info or now:
                self._conn_info = info
                self.fanout.close()
                self.fanout.open()
                self.fanout.reopen_channels()
            await asyncio.wait_for(self._wait_ready(), self.km.shutdown_wait_time + 60)
            # what was held may ask for input: the new kernel must know our stdin first
            await self.fanout.stdin_connected()
            jc.close_control(self.km)
        except Exception:
            self.state = "dead"
            self.execution_state = "dead"
            self.fanout.discard_held()
            raise
        self.fanout.release_held()
        self.state = "running"
        self.execution_state = "idle"
        await self._on_launched(self)

    async def _monitor(self) -> None:
        """Notice a kernel that died on its own; restart it or declare it dead. Where the
        backend gives a pidfd of the kernel's process, wait on it (a lookup every 30 s all
        the same); else ask the provisioner every 0.5 s."""
        woken = False
        while True:
            # woken by the pidfd but the kernel answers: poll once before trusting it again
            woken = await self._until_it_may_have_died(poll=woken)
            if self.state != "running" or self._lock.locked():
                continue
            if await self.km.is_alive():
                continue
            async with self._lock:
                if self.state != "running":
                    continue
                await self._on_died()

    async def _until_it_may_have_died(self, *, poll: bool) -> bool:
        """Returns whether the kernel's process was seen to end (its pidfd readable)."""
        use_fd = self.state == "running" and not poll
        fd = hooks(self.km.provisioner).exit_fd() if use_fd else None
        if fd is None:
            await asyncio.sleep(0.5)
            return False
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not ended.done():
                ended.set_result(None)

        loop.add_reader(fd, readable)
        try:
            await asyncio.wait_for(ended, 30)
        except TimeoutError:
            return False
        finally:
            loop.remove_reader(fd)
            os.close(fd)
        return True

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
        logs.concerning(self)  # whoever asked: a client, the culler, the gateway's shutdown
        async with self._lock:
            self.state = "stopping"
            if self._monitor_task:
                self._monitor_task.cancel()
            try:
                if self.km.has_kernel:
                    jc.connect_control(self.km)  # its shutdown_request goes there
                    await self.km.shutdown_kernel(now=False)
            except Exception:
                log.exception("shutting down kernel %s", self.id)
                await self.km.shutdown_kernel(now=True)
            finally:
                self.execution_state = "dead"
                self.broadcast_status("dead")
                self.fanout.close_sessions(1000, "kernel deleted")
                self.fanout.close()
                self.state = "dead"
                self._on_gone(self)
