"""The network edge: what is decided from a request's headers alone, before Tornado reads its
body or routes it.

    Host            a name must be a loopback name, this machine's, --ip or an --allowed-host
                    (a page on a rebound DNS name would otherwise reach a loopback gateway);
                    IP literals pass (rebinding needs a name); a request without Host passes
    Origin          with --no-auth, a state-changing request (POST, PUT, PATCH, DELETE, a
                    websocket upgrade) from another origin than Host or --allow-origin
    token           a request with a body must carry a valid one (requests without a body are
                    authenticated by their handler, which knows the exempt routes)
    Content-Length  at most MAX_BODY_BYTES (413); a chunked body is cut there by Tornado

A refused request is answered from its headers, JSON {"reason", "message"}, and its connection
is closed once the answer is written, so its body is never held in memory. The server's timeouts
(serve(): --idle-timeout for headers and idle keep-alive, --body-timeout for a body) cut off
clients that send slowly.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from tornado import httputil

from .config import Config
from .errors import ClientError, Forbidden, PayloadTooLarge

log = logging.getLogger(__name__)

# The API's bodies are small JSON objects (a kernel start with its env is a few KB).
MAX_BODY_BYTES = 4 * 1024 * 1024
_STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def host_name(header: str) -> str:
    """The name in a Host header: 'Example.org.:8888' -> 'example.org', '[::1]:80' -> '::1'."""
    value = header.strip().lower()
    if value.startswith("["):
        return value[1:].partition("]")[0]
    if value.count(":") == 1:
        value = value.partition(":")[0]
    return value.rstrip(".")


class HostCheck:
    """Which Host headers this gateway answers to."""

    def __init__(self, config: Config) -> None:
        names = {config.ip, socket.gethostname(), socket.gethostname().partition(".")[0]}
        names.update(config.allowed_hosts)
        self.patterns = {n.strip().lower().rstrip(".") for n in names if n.strip()}

    def allows(self, header: str) -> bool:
        name = host_name(header)
        if name == "localhost" or name.endswith(".localhost"):
            return True
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            pass
        return any(fnmatch.fnmatchcase(name, p) for p in self.patterns)


class Edge(httputil.HTTPServerConnectionDelegate):
    """Wraps the application as the HTTPServer's delegate; see the module docstring."""

    def __init__(
        self,
        app: httputil.HTTPServerConnectionDelegate,
        config: Config,
        authenticate: Callable[[httputil.HTTPServerRequest], object],
    ) -> None:
        self.app = app
        self.config = config
        self.authenticate = authenticate
        self.hosts = HostCheck(config)

    def start_request(
        self, server_conn: object, request_conn: httputil.HTTPConnection
    ) -> httputil.HTTPMessageDelegate:
        return _Guard(self, request_conn, self.app.start_request(server_conn, request_conn))

    def on_close(self, server_conn: object) -> None:
        self.app.on_close(server_conn)

    def refusal(
        self,
        start_line: httputil.RequestStartLine,
        headers: httputil.HTTPHeaders,
        conn: httputil.HTTPConnection,
    ) -> ClientError | None:
        """Why this request is refused before its body is read, or None."""
        host = headers.get("Host")
        if host is not None and not self.hosts.allows(host):
            name = host_name(host)
            return Forbidden(
                f"this gateway does not answer to the host name {name!r} (a guard against "
                f"DNS rebinding); if that is its name, start it with --allowed-host {name}"
            )
        origin = headers.get("Origin")
        if self.config.no_auth and origin is not None and self._state_changing(start_line, headers):
            allowed = self.config.allow_origin
            same = urlsplit(origin).netloc.lower() == (host or "").strip().lower()
            if not (same or allowed == "*" or origin == allowed):
                return Forbidden(
                    f"a {start_line.method} from origin {origin!r} to a gateway without a "
                    "token is refused (cross-origin); allow that origin with --allow-origin"
                )
        length = headers.get("Content-Length", "").strip()
        size = int(length) if length.isdigit() else 0  # a bad one: Tornado answers 400
        if size or "chunked" in headers.get("Transfer-Encoding", "").lower():
            try:
                self.authenticate(
                    httputil.HTTPServerRequest(
                        connection=conn, start_line=start_line, headers=headers
                    )
                )
            except ClientError as e:
                return e
        if size > MAX_BODY_BYTES:
            return PayloadTooLarge(
                f"the request body has {size} bytes; this gateway accepts at most "
                f"{MAX_BODY_BYTES} bytes"
            )
        return None

    @staticmethod
    def _state_changing(
        start_line: httputil.RequestStartLine, headers: httputil.HTTPHeaders
    ) -> bool:
        upgrade = headers.get("Upgrade", "").lower() == "websocket"
        return start_line.method in _STATE_CHANGING or upgrade


class _Guard(httputil.HTTPMessageDelegate):
    """One request: passed on to the application's delegate, unless the edge refuses it, in
    which case the application never hears of it and the body is dropped as it arrives."""

    def __init__(
        self, edge: Edge, conn: httputil.HTTPConnection, inner: httputil.HTTPMessageDelegate
    ) -> None:
        self.edge, self.conn, self.inner = edge, conn, inner
        self.refused = False

    def headers_received(
        self,
        start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
        headers: httputil.HTTPHeaders,
    ) -> Awaitable[None] | None:
        assert isinstance(start_line, httputil.RequestStartLine)
        error = self.edge.refusal(start_line, headers, self.conn)
        if error is None:
            return self.inner.headers_received(start_line, headers)
        self.refused = True
        log.info("%s %s -> %d %s", start_line.method, start_line.path, error.status, error.message)
        body = json.dumps({"reason": error.reason, "message": error.message}).encode()
        self.conn.write_headers(
            httputil.ResponseStartLine("HTTP/1.1", error.status, error.reason),
            httputil.HTTPHeaders(
                {
                    "Content-Type": "application/json; charset=UTF-8",
                    "Content-Length": str(len(body)),
                    "Cache-Control": "no-store",
                    "Connection": "close",
                }
            ),
            body,
        )
        # finishing before the body is read makes Tornado close the connection once the
        # answer is out, instead of reading the body first
        self.conn.finish()
        return None

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        return None if self.refused else self.inner.data_received(chunk)

    def finish(self) -> None:
        if not self.refused:
            self.inner.finish()

    def on_connection_close(self) -> None:
        if not self.refused:
            self.inner.on_connection_close()
