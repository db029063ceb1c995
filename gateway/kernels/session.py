"""One client's view of one kernel: its shell, control and stdin sockets, and where the
kernel's replies and iopub go.

A session outlives its websocket. While no socket is attached, everything the kernel sends it
is kept (bounded by bytes and time) and handed to the next socket that attaches with the same
session_id, so a client that reconnects loses no output and still gets its replies.

The two seams: `Sink`, what a session delivers to (bridge/connection.py's websocket), and
`KernelLink`, what it needs of its kernel (kernel.ManagedKernel). So this module knows
neither websockets nor the kernel's lifecycle.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections import deque
from collections.abc import Sequence
from typing import Protocol

import zmq.asyncio

from .. import wire
from .budget import MemoryBudget
from .pump import Pump

log = logging.getLogger(__name__)

CHANNELS = ("shell", "control", "stdin")
STDIN_CONNECT_TIMEOUT_MS = 10_000


class Sink(Protocol):
    """Where a session delivers messages: a websocket connection."""

    def send(self, channel: bytes, parts: Sequence[wire.Part]) -> None: ...

    def close_with(self, code: int, reason: str) -> None: ...


class KernelLink(Protocol):
    """What a session needs of its kernel."""

    @property
    def id(self) -> str: ...

    @property
    def key(self) -> bytes: ...

    @property
    def state(self) -> str: ...

    def touch(self) -> None: ...

    def connect(
        self, channel: str, identity: bytes | None = None, *, immediate: bool = False
    ) -> zmq.asyncio.Socket: ...


class ClientSession:
    def __init__(
        self,
        kernel: KernelLink,
        session_id: str,
        *,
        max_bytes: int,
        budget: MemoryBudget | None = None,
    ) -> None:
        self.kernel = kernel
        self.session_id = session_id
        self.identity = (session_id or uuid.uuid4().hex).encode()
        self.sink: Sink | None = None
        self.detached_at: float | None = time.monotonic()
        self._max_bytes = max_bytes
        self._budget = budget  # the gateway's, shared by every session's replay
        self._backlog: deque[tuple[bytes, Sequence[wire.Part]]] = deque()
        self._backlog_bytes = 0
        self._overflowed = False
        self._pumps: dict[str, Pump] = {}
        # Client messages that arrive while the kernel restarts wait here until its iopub is
        # live again; sent earlier, their output would be published before we subscribe.
        self._held: list[tuple[str, list[bytes]]] = []

    # -- kernel side -------------------------------------------------------------------

    def open_channels(self) -> None:
        """Connect shell/control/stdin. Shell and stdin share one identity: the kernel sends
        input_request to the identity that sent the execute_request. Stdin and control are
        connected with IMMEDIATE, so that POLLOUT on them means the handshake completed.

        Each socket has its own pump (pump.py): a waiting socket costs nothing."""
        for channel in CHANNELS:
            sock = self.kernel.connect(channel, self.identity, immediate=channel != "shell")
            received = functools.partial(self._received, channel.encode())
            self._pumps[channel] = Pump(sock, self.kernel.id, channel, received)

    def close_channels(self) -> None:
        for pump in self._pumps.values():
            pump.close()
        self._pumps.clear()

    def reopen_channels(self) -> None:
        """After a restart that moved the kernel's ports."""
        self.close_channels()
        self.open_channels()

    def close(self, code: int, reason: str) -> None:
        """The kernel goes away (or the gateway leaves it): close the client's socket with
        `code` and drop our ZMQ sockets."""
        if self.sink is not None:
            self.sink.close_with(code, reason)
        self.close_channels()

    def _received(self, channel: bytes, parts: list[wire.Part]) -> None:
        self.kernel.touch()
        self.deliver(channel, parts)

    async def send_to_kernel(self, channel: str, parts: list[bytes]) -> None:
        self.kernel.touch()
        if self.kernel.state == "restarting":
            self._held.append((channel, parts))
            return
        if channel == "shell":
            await self.stdin_connected()
            if self.kernel.state == "restarting":  # it died while we waited
                self._held.append((channel, parts))
                return
        pump = self._pumps.get(channel)
        if pump is not None:
            sent = pump.send(wire.zmq_from_parts(self.kernel.key, parts))
            if sent is not None:  # past the high-water mark: the client waits with it
                await sent

    async def stdin_connected(self) -> None:
        """Return once our stdin socket's connection to the kernel is complete.

        The kernel's stdin is a ROUTER: it silently drops an input_request addressed to an
        identity whose connection it has not seen yet. Shell and stdin connect separately, so
        an execute_request sent on a fresh (or just reconnected) shell connection could run
        input() before the stdin handshake finished, and the cell would wait forever. So
        nothing goes out on shell before stdin is connected: with IMMEDIATE, its POLLOUT is
        set only once the ZMTP handshake with the kernel completed, i.e. after the kernel's
        side answered our greeting. Checking costs a getsockopt when connected, as it nearly
        always is. A kernel whose stdin never answers does not block shell for good."""
        pump = self._pumps.get("stdin")
        if pump is None or pump.writable():
            return
        try:
            await asyncio.wait_for(pump.until_writable(), STDIN_CONNECT_TIMEOUT_MS / 1000)
            connected = True
        except TimeoutError:
            connected = False
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            return  # the socket was closed under us: the kernel restarts or goes away
        except zmq.ZMQError:
            return
        if not connected:
            log.warning(
                "kernel %s: stdin of session %s not connected after %d ms; sending on shell anyway",
                self.kernel.id,
                self.session_id,
                STDIN_CONNECT_TIMEOUT_MS,
            )

    def release_held(self) -> None:
        """Send what was held during a restart, in order. Synchronous on purpose: nothing a
        client sends after the restart can overtake these."""
        held, self._held = self._held, []
        for channel, parts in held:
            pump = self._pumps.get(channel)
            if pump is not None:
                pump.send(wire.zmq_from_parts(self.kernel.key, parts))  # in order, queued

    def discard_held(self) -> None:
        self._held.clear()

    # -- client side -------------------------------------------------------------------

    def deliver(self, channel: bytes, parts: Sequence[wire.Part]) -> None:
        if self.sink is not None:
            self.sink.send(channel, parts)
            return
        if self._overflowed:
            return
        size = sum(len(p) for p in parts)
        if self._backlog_bytes + size > self._max_bytes:
            # Replaying a gapped stream would be worse than saying it is gone.
            log.warning(
                "replay buffer of session %s on kernel %s exceeded %d bytes; "
                "it will not be replayed",
                self.session_id,
                self.kernel.id,
                self._max_bytes,
            )
            self.drop_replay()
            return
        self._backlog.append((channel, parts))
        self._backlog_bytes += size
        if self._budget is not None:
            self._budget.replay_held(self, self._backlog_bytes)

    def drop_replay(self) -> None:
        """Forget the replay (over its own cap, or called by the gateway's MemoryBudget, or
        the session is dropped); until a socket attaches, nothing more is kept."""
        self._overflowed = True
        self._backlog.clear()
        self._backlog_bytes = 0
        if self._budget is not None:
            self._budget.replay_held(self, 0)

    def attach(self, sink: Sink) -> None:
        """Make `sink` the session's socket; an older one is closed. Backlog goes first."""
        old, self.sink = self.sink, None
        if old is not None and old is not sink:
            old.close_with(4000, "replaced by a newer connection with the same session_id")
        if self._budget is not None:  # from replay to the socket's pending writes
            self._budget.replay_held(self, 0)
        while self._backlog:
            sink.send(*self._backlog.popleft())
        self._backlog_bytes = 0
        self._overflowed = False
        self.sink = sink
        self.detached_at = None

    def detach(self, sink: Sink) -> None:
        if self.sink is sink:
            self.sink = None
            self.detached_at = time.monotonic()

    @property
    def attached(self) -> bool:
        return self.sink is not None

    @property
    def replay_bytes(self) -> int:
        """Output held for this session's reconnect."""
        return self._backlog_bytes
