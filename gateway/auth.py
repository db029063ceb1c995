"""Token authentication: `Authorization: token T` (or `Bearer T`) on any request, or `?token=T`
(the websocket, where browsers and Hydrogen cannot set headers)."""

from __future__ import annotations

import hmac

from tornado.httputil import HTTPServerRequest

from .errors import Forbidden, Unauthorized


def request_token(request: HTTPServerRequest) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() in ("token", "bearer") and value.strip():
        return value.strip()
    values = request.query_arguments.get("token")
    if values:
        return values[-1].decode(errors="replace")
    return None


def authenticate(request: HTTPServerRequest, token: str) -> None:
    """Raise unless the request carries `token` (an empty `token` means --no-auth)."""
    if not token:
        return
    given = request_token(request)
    if given is None:
        raise Unauthorized(
            "this gateway needs a token: send 'Authorization: token <token>' "
            "or add ?token=<token> to the URL"
        )
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise Forbidden("the token is not valid for this gateway")
