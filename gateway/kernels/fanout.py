"""Fan-out: one iopub subscription per kernel, shared by all its client sessions, and the
sessions themselves, kept for a reconnect (replay) until they expire."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Sequence

from .. import wire
from ..errors import TooManySessions
from .budget import MemoryBudget
from .pump import Pump
from .session import ClientSession, KernelLink

log = logging.getLogger(__name__)


class Fanout:
    def __init__(
        self,
        kernel: KernelLink,
        *,
        replay_seconds: float,
        replay_max_bytes: int,
        on_iopub: Callable[[Sequence[wire.Part]], None],
        budget: MemoryBudget | None = None,
        max_sessions: int = 0,
    ) -> None:
        self.kernel = kernel
        self.sessions: dict[str, ClientSession] = {}
        self.live: asyncio.Future[None] | None = None  # done at iopub's first message
        self._replay_seconds = replay_seconds
        self._replay_max_bytes = replay_max_bytes
        self._budget = budget
        self._max_sessions = max_sessions
        self._on_iopub = on_iopub
        self._iopub: Pump | None = None

    @property
    def connections(self) -> int:
        return sum(1 for s in self.sessions.values() if s.attached)

    # -- iopub ---------------------------------------------------------------------------

    def open(self) -> None:
        """Subscribe to the kernel's iopub (again, after a restart)."""
        self.live = asyncio.get_running_loop().create_future()
        self._iopub = Pump(self.kernel.connect("iopub"), self.kernel.id, "iopub", self._received)

    def close(self) -> None:
        if self._iopub is not None:
            self._iopub.close()
            self._iopub = None

    def _received(self, parts: list[wire.Part]) -> None:
        if self.live is not None and not self.live.done():
            self.live.set_result(None)
        self._on_iopub(parts)
        for session in list(self.sessions.values()):
            session.deliver(b"iopub", parts)

    def broadcast(self, parts: Sequence[wire.Part]) -> None:
        """An iopub message of the gateway's own (a status) to every session."""
        for session in list(self.sessions.values()):
            session.deliver(b"iopub", parts)

    # -- across a restart ----------------------------------------------------------------

    def reopen_channels(self) -> None:
        """The kernel's ports moved (or it died with requests queued): new sockets."""
        for session in self.sessions.values():
            session.reopen_channels()

    async def stdin_connected(self) -> None:
        await asyncio.gather(*(s.stdin_connected() for s in self.sessions.values()))

    def release_held(self) -> None:
        for session in self.sessions.values():
            session.release_held()

    def discard_held(self) -> None:
        for session in self.sessions.values():
            session.discard_held()

    # -- client sessions -----------------------------------------------------------------

    def session_for(self, session_id: str) -> ClientSession:
        """The session with this id (reused across reconnects), created when new. Sessions
        without an id are not kept after their socket closes."""
        self.expire()
        session = self.sessions.get(session_id) if session_id else None
        if session is None:
            self._make_room()
            session = ClientSession(
                self.kernel, session_id, max_bytes=self._replay_max_bytes, budget=self._budget
            )
            session.open_channels()
            self.sessions[session_id or uuid.uuid4().hex] = session
        return session

    def check_room(self, session_id: str) -> None:
        """Called at a websocket's handshake, before the upgrade: TooManySessions if this
        kernel already has --max-sessions-per-kernel sessions with a socket attached (ones
        kept only for a reconnect make room, oldest first) and `session_id` is none of them."""
        self.expire()
        if not self._max_sessions or (session_id and session_id in self.sessions):
            return
        if self.connections >= self._max_sessions:
            raise TooManySessions(
                f"kernel {self.kernel.id} already has {self.connections} connected client "
                f"sessions, the most this gateway allows (--max-sessions-per-kernel); "
                "close one first"
            )

    def _make_room(self) -> None:
        """Below --max-sessions-per-kernel: drop the sessions kept for a reconnect, the one
        detached longest ago first."""
        kept = sorted(
            (s for s in self.sessions.values() if s.detached_at is not None),
            key=lambda s: s.detached_at or 0.0,
        )
        while self._max_sessions and len(self.sessions) >= self._max_sessions and kept:
            self._drop(kept.pop(0))

    def release(self, session: ClientSession) -> None:
        """Called when a session's socket closed."""
        if not session.session_id and not session.attached:
            self._drop(session)
        self.expire()

    def expire(self) -> None:
        now = time.monotonic()
        for session in list(self.sessions.values()):
            if session.detached_at is not None and now - session.detached_at > self._replay_seconds:
                self._drop(session)

    def _drop(self, session: ClientSession) -> None:
        session.close_channels()
        session.drop_replay()
        for key, value in list(self.sessions.items()):
            if value is session:
                del self.sessions[key]

    def close_sessions(self, code: int, reason: str) -> None:
        """Close every client's socket with `code` and drop the sessions' ZMQ sockets."""
        for session in list(self.sessions.values()):
            session.close(code, reason)
            session.drop_replay()
        self.sessions.clear()
