"""Token authentication: `Authorization: token T` (or `Bearer T`) on any request, or `?token=T`
(the websocket, where browsers and Hydrogen cannot set headers): the admin's (--token) or
a user's (`rkg token add`, users.py)."""

from __future__ import annotations

from tornado.httputil import HTTPServerRequest

from .errors import Forbidden, Unauthorized
from .users import ADMIN_USER, Tokens, User


def request_token(request: HTTPServerRequest) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() in ("token", "bearer") and value.strip():
        return value.strip()
    values = request.query_arguments.get("token")
    if values:
        return values[-1].decode(errors="replace")
    return None


def authenticate(request: HTTPServerRequest, tokens: Tokens, no_auth: bool) -> User:
    """The request's user (users.py), or Unauthorized / Forbidden. With `no_auth` (--no-auth:
    the config's token is empty) every request is the admin."""
    if no_auth:
        return ADMIN_USER
    given = request_token(request)
    if given is None:
        raise Unauthorized(
            "this gateway needs a token: send 'Authorization: token <token>' "
            "or add ?token=<token> to the URL"
        )
    user = tokens.user(given)
    if user is None:
        raise Forbidden("the token is not valid for this gateway")
    return user
