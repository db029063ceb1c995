"""One memory budget for the whole gateway (--memory-budget): kernel output kept in replay
buffers (sessions whose socket is gone, session.py) and output written to sockets but not yet
sent (clients slow to read, bridge/connection.py).

Holders tell the budget what they hold. When the total passes the limit, it frees space: first
the replay of the session detached longest ago (all of it: a replay with a gap would be worse
than none), then it cuts off the socket with the most unsent bytes (its client reconnects and
gets what replay is left). So whatever clients and kernels do, the gateway holds at most the
budget, plus the one message being accounted.
"""

from __future__ import annotations

import logging
import math
from typing import Protocol

log = logging.getLogger(__name__)


class Replay(Protocol):
    """A session's replay buffer (session.ClientSession)."""

    @property
    def detached_at(self) -> float | None: ...

    def drop_replay(self) -> None:
        """Called by the budget: forget the replay, then report 0 bytes held."""


class Writer(Protocol):
    """A client socket with writes not yet sent (connection.KernelWebSocket)."""

    def cut_off(self) -> None:
        """Called by the budget: close the socket now, dropping its unsent writes."""


class MemoryBudget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._replay: dict[Replay, int] = {}
        self._pending: dict[Writer, int] = {}
        self.used = 0
        self._enforcing = False

    def replay_held(self, holder: Replay, nbytes: int) -> None:
        """`holder` now keeps `nbytes` for replay (0: none)."""
        self.used += nbytes - self._replay.pop(holder, 0)
        if nbytes:
            self._replay[holder] = nbytes
        self._enforce()

    def pending(self, writer: Writer, delta: int) -> None:
        """`writer`'s unsent bytes grew (written) or shrank (sent) by `delta`. A writer the
        budget cut off is no longer counted: what its closed stream held is being freed."""
        if delta > 0:
            self._pending[writer] = self._pending.get(writer, 0) + delta
        elif writer in self._pending:
            left = self._pending[writer] + delta
            if left > 0:
                self._pending[writer] = left
            else:
                del self._pending[writer]
                delta -= left  # never below what was counted
        else:
            return
        self.used += delta
        if delta > 0:
            self._enforce()

    def forget(self, writer: Writer) -> None:
        """`writer` is closed: whatever it held is being freed."""
        self.used -= self._pending.pop(writer, 0)

    def _enforce(self) -> None:
        if self._enforcing:  # a drop_replay() or cut_off() reporting back
            return
        self._enforcing = True
        try:
            while self.used > self.limit and self._replay:
                oldest = min(self._replay, key=lambda h: h.detached_at or math.inf)
                log.warning(
                    "memory budget of %d bytes reached: dropping the replay buffer (%d bytes) "
                    "of the session detached longest ago",
                    self.limit,
                    self._replay[oldest],
                )
                oldest.drop_replay()
                self.used -= self._replay.pop(oldest, 0)  # if it did not report back
            while self.used > self.limit and self._pending:
                slowest = max(self._pending, key=self._pending.__getitem__)
                log.warning(
                    "memory budget of %d bytes reached: closing the client socket with the "
                    "most unsent output (%d bytes)",
                    self.limit,
                    self._pending[slowest],
                )
                self.forget(slowest)
                slowest.cut_off()
        finally:
            self._enforcing = False
