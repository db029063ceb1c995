"""GET /api/spec.yaml: the OpenAPI document of the gateway's API (gateway/api.yaml), as
jupyter_server serves its own. With the token, as the rest of the API: the document holds
nothing secret, but an unauthenticated client is told nothing about what lies behind it (as
NotFoundHandler answers unknown paths only after the token check)."""

from __future__ import annotations

import functools
from pathlib import Path

from .base import APIHandler

DOCUMENT = Path(__file__).resolve().parent.parent / "api.yaml"
_SERVERS = "servers:\n  - url: /\n"


@functools.cache
def document(base_url: str) -> bytes:
    """The document with its server URL set to `base_url`, so that a client reading it
    (schemathesis, a code generator) finds the routes under the gateway's prefix."""
    text = DOCUMENT.read_text(encoding="utf-8")
    return text.replace(_SERVERS, f"servers:\n  - url: {base_url}\n", 1).encode()


class SpecHandler(APIHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "application/yaml; charset=UTF-8")
        self.finish(document(self.config.base_url))


routes = [(r"api/spec\.yaml", SpecHandler)]
