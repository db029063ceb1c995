"""/api/sessions: what JupyterLab and Hydrogen use to bind a document to a kernel.

A session belongs to its kernel's owner (users.py): a non-admin sees only theirs, and anyone
else's answers as a missing id does. A path names one session per user: two users with the
same path have two sessions."""

from __future__ import annotations

from typing import Any

from ..errors import BadRequest, NotFound
from ..kernels.registry import KernelRegistry
from ..sessions import Session, SessionStore
from ..users import hidden
from .base import APIHandler


def _text(body: dict[str, Any], key: str, default: str = "") -> str:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise BadRequest(f"'{key}' must be a string")
    return value


def _kernel_field(body: dict[str, Any]) -> dict[str, Any]:
    kernel = body.get("kernel") or {}
    if not isinstance(kernel, dict):
        raise BadRequest('\'kernel\' must be an object like {"name": "python3"}')
    return kernel


def _notebook(body: dict[str, Any]) -> dict[str, Any]:
    """The pre-2017 shape {"notebook": {"path", "name"}}, still sent by old clients."""
    notebook = body.get("notebook")
    return notebook if isinstance(notebook, dict) else {}


class SessionBase(APIHandler):
    registry: KernelRegistry
    sessions: SessionStore

    def model(self, session: Session) -> dict[str, Any]:
        kernel = self.registry.get(session.kernel_id).model()
        return {
            "id": session.id,
            "path": session.path,
            "name": session.name,
            "type": session.type,
            "kernel": kernel,
            # services 0.x and notebook < 5 read the older shape
            "notebook": {"path": session.path, "name": session.name},
        }

    def live(self) -> list[Session]:
        """This user's sessions whose kernel still exists (a deleted or culled kernel ends
        its session)."""
        out = []
        for session in self.sessions.all():
            kernel = self.registry.kernels.get(session.kernel_id)
            if kernel is None:
                self.sessions.forget(session.id)
            elif self.user.sees(kernel.owner):
                out.append(session)
        return out

    def own_session(self, session_id: str) -> Session:
        """The session, if its kernel is there and this user may see it."""
        session = self.sessions.get(session_id)
        kernel = self.registry.kernels.get(session.kernel_id)
        if kernel is None:
            self.sessions.forget(session_id)
            raise NotFound(f"session {session_id} ended: its kernel is gone")
        hidden(kernel.owner, self.user, f"no session with id {session_id}")
        return session

    def by_path(self, path: str) -> Session | None:
        """This user's own session on `path` (an admin's too: another's is not theirs)."""
        return next(
            (
                s
                for s in self.live()
                if s.path == path and self.registry.kernels[s.kernel_id].owner == self.user.name
            ),
            None,
        )

    async def kernel_for(self, kernel: dict[str, Any], env: Any = None) -> str:
        """An existing kernel of this user's by id, or a new one by name."""
        if kernel.get("id"):
            return self.own_kernel(str(kernel["id"])).id
        name = kernel.get("name")
        if name is not None and not isinstance(name, str):
            raise BadRequest("'kernel.name' must be a string")
        return (await self.registry.start(name, env, self.user)).id

    async def release_kernel(self, kernel_id: str) -> None:
        """Shut a kernel down once no session uses it."""
        if not self.sessions.using_kernel(kernel_id):
            try:
                await self.registry.shutdown(kernel_id)
            except NotFound:
                pass


class SessionsHandler(SessionBase):
    def get(self) -> None:
        self.write_json([self.model(s) for s in self.live()])

    async def post(self) -> None:
        body = self.json_body()
        notebook = _notebook(body)
        path = _text(body, "path") or _text(notebook, "path")
        if not path:
            raise BadRequest("a session needs a 'path'")
        existing = self.by_path(path)
        if existing is not None:
            self.write_json(self.model(existing), 201)
            return
        kernel_id = await self.kernel_for(_kernel_field(body), body.get("env"))
        name = _text(body, "name") or _text(notebook, "name")
        session = await self.sessions.create(
            path=path, name=name, type=_text(body, "type"), kernel_id=kernel_id
        )
        self.set_header("Location", f"{self.config.base_url}api/sessions/{session.id}")
        self.write_json(self.model(session), 201)


class SessionHandler(SessionBase):
    def get(self, session_id: str) -> None:
        self.write_json(self.model(self.own_session(session_id)))

    async def patch(self, session_id: str) -> None:
        session = self.own_session(session_id)
        body = self.json_body()
        notebook = _notebook(body)
        path = _text(body, "path") or _text(notebook, "path")
        if path:
            session.path = path
        if "name" in body:
            session.name = _text(body, "name")
        if "type" in body:
            session.type = _text(body, "type")
        if "kernel" in body:
            old = session.kernel_id
            session.kernel_id = await self.kernel_for(_kernel_field(body))
            if old != session.kernel_id:
                await self.release_kernel(old)
        await self.sessions.save(session)
        self.write_json(self.model(session))

    async def delete(self, session_id: str) -> None:
        kernel = self.registry.kernels.get(self.sessions.get(session_id).kernel_id)
        if kernel is not None:  # one whose kernel is gone is no one's, and ended
            hidden(kernel.owner, self.user, f"no session with id {session_id}")
        session = await self.sessions.remove(session_id)
        await self.release_kernel(session.kernel_id)
        self.set_status(204)
        self.finish()


routes = [
    (r"api/sessions/?", SessionsHandler),
    (r"api/sessions/(?P<session_id>[\w-]+)/?", SessionHandler),
]
