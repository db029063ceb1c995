"""The status page (/) and what it reads (/api/status). Placeholder: filled in next."""

from __future__ import annotations

from tornado import web

routes: list[tuple[str, type[web.RequestHandler]]] = []
