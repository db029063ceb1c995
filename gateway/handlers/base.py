"""What every REST handler shares: authentication, CORS, JSON in and out, and errors as
JSON {"reason", "message"} (no traceback ever leaves the server)."""

from __future__ import annotations

import json
import logging
from typing import Any

from tornado import web

from .. import logs
from ..auth import authenticate
from ..config import Config
from ..errors import BadRequest, ClientError, GatewayError, NotFound
from ..kernels.kernel import ManagedKernel
from ..kernels.registry import KernelRegistry
from ..users import Tokens, User, hidden

log = logging.getLogger(__name__)


class APIHandler(web.RequestHandler):
    config: Config
    registry: KernelRegistry
    tokens: Tokens
    user: User  # who the request is, set by prepare() (users.py)

    def initialize(self, **collaborators: Any) -> None:
        for name, value in collaborators.items():
            setattr(self, name, value)
        # Tornado sets the default headers before initialize(), when there is no config yet
        self._set_cors_headers()

    def set_default_headers(self) -> None:
        """Called by Tornado at construction and again when an error clears the headers."""
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.set_header("Cache-Control", "no-store")
        self._set_cors_headers()

    def _set_cors_headers(self) -> None:
        """Allow headers only for the configured origin (or any, with '*'): a browser page
        from another origin must not be told it may read the answers."""
        allowed = self.config.allow_origin if hasattr(self, "config") else ""
        if not allowed:
            return
        if allowed != "*":
            self.set_header("Vary", "Origin")  # the answer depends on who asks
            if self.request.headers.get("Origin") != allowed:
                return
        self.set_header("Access-Control-Allow-Origin", allowed)
        self.set_header(
            "Access-Control-Allow-Headers",
            "Authorization, Content-Type, X-Requested-With, X-XSRFToken",
        )
        self.set_header("Access-Control-Allow-Methods", "GET, POST, PATCH, PUT, DELETE, OPTIONS")

    def prepare(self) -> None:
        kernel_id = self.path_kwargs.get("kernel_id")
        if kernel_id:  # /api/kernels/ID...: this request's lines, its access line included
            logs.concerning(self.registry.kernels.get(kernel_id) or kernel_id)
        if self.request.method != "OPTIONS":
            self.user = authenticate(self.request, self.tokens, not self.config.token)

    def own_kernel(self, kernel_id: str) -> ManagedKernel:
        """The kernel, if this request's user may see it; else the NotFound of a missing one."""
        kernel = self.registry.get(kernel_id)
        hidden(kernel.owner, self.user, f"no kernel with id {kernel_id}")
        return kernel

    def options(self, *args: Any) -> None:
        self.set_status(204)
        self.finish()

    def check_xsrf_cookie(self) -> None:
        """Token-authenticated API: no cookies, so no XSRF."""

    def json_body(self) -> dict[str, Any]:
        """The body as a JSON object, whatever the Content-Type (services 7 sends text/plain)."""
        if not self.request.body.strip():
            return {}
        try:
            body = json.loads(self.request.body)
        except (ValueError, UnicodeDecodeError):
            raise BadRequest("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        return body

    def write_json(self, obj: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(obj))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, GatewayError):
            self.set_status(exc.status, exc.reason)
            body = {"reason": exc.reason, "message": exc.message}
        elif isinstance(exc, web.HTTPError):
            reason = exc.reason or self._reason
            body = {"reason": reason, "message": exc.log_message or reason}
        else:
            body = {
                "reason": self._reason,
                "message": "unexpected error in the gateway; its log has the details",
            }
        self.finish(json.dumps(body))

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, ClientError):
            log.info(
                "%s %s -> %d %s",
                self.request.method,
                self.request.path,
                value.status,
                value.message,
            )
        elif isinstance(value, GatewayError):
            log.warning(
                "%s %s -> %d %s",
                self.request.method,
                self.request.path,
                value.status,
                value.message,
            )
        elif isinstance(value, web.HTTPError):
            log.info("%s %s -> %d", self.request.method, self.request.path, value.status_code)
        else:
            super().log_exception(typ, value, tb)


class NotFoundHandler(APIHandler):
    """Unknown paths: JSON 404 (after auth, so the API's shape is not probed without a token)."""

    def prepare(self) -> None:
        super().prepare()
        raise NotFound(f"no such resource: {self.request.path}")
