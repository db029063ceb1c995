"""Sessions: a path (notebook or file) bound to a kernel, as /api/sessions exposes them."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from .errors import NotFound


@dataclass
class Session:
    id: str
    path: str
    name: str
    type: str
    kernel_id: str


class SessionStore:
    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}

    def create(self, *, path: str, name: str, type: str, kernel_id: str) -> Session:
        session = Session(str(uuid.uuid4()), path, name, type, kernel_id)
        self._sessions[session.id] = session
        return session

    def get(self, session_id: str) -> Session:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise NotFound(f"no session with id {session_id}") from None

    def by_path(self, path: str) -> Session | None:
        return next((s for s in self._sessions.values() if s.path == path), None)

    def all(self) -> list[Session]:
        return list(self._sessions.values())

    def using_kernel(self, kernel_id: str) -> list[Session]:
        return [s for s in self._sessions.values() if s.kernel_id == kernel_id]

    def remove(self, session_id: str) -> Session:
        session = self.get(session_id)
        del self._sessions[session_id]
        return session
