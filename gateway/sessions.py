"""Sessions: a path (notebook or file) bound to a kernel, as /api/sessions exposes them.
Kept in memory, written through to the state store so they survive a gateway restart."""

from __future__ import annotations

import uuid
from collections.abc import Container
from dataclasses import dataclass

from .errors import NotFound
from .state import StateStore


@dataclass
class Session:
    id: str
    path: str
    name: str
    type: str
    kernel_id: str


class SessionStore:
    def __init__(self, state: StateStore, live_kernels: Container[str]) -> None:
        """Loads the recorded sessions whose kernel is still there."""
        self._state = state
        self._sessions = {
            row[0]: Session(*row) for row in state.sessions() if row[4] in live_kernels
        }

    async def create(self, *, path: str, name: str, type: str, kernel_id: str) -> Session:
        session = Session(str(uuid.uuid4()), path, name, type, kernel_id)
        self._sessions[session.id] = session
        await self.save(session)
        return session

    async def save(self, s: Session) -> None:
        await self._state.put_session(s.id, s.path, s.name, s.type, s.kernel_id)

    def get(self, session_id: str) -> Session:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise NotFound(f"no session with id {session_id}") from None

    def all(self) -> list[Session]:
        return list(self._sessions.values())

    def using_kernel(self, kernel_id: str) -> list[Session]:
        return [s for s in self._sessions.values() if s.kernel_id == kernel_id]

    def forget(self, session_id: str) -> None:
        """A session whose kernel is gone (its record went with the kernel's)."""
        self._sessions.pop(session_id, None)

    async def remove(self, session_id: str) -> Session:
        session = self.get(session_id)
        del self._sessions[session_id]
        await self._state.delete_session(session_id)
        return session
