"""Every error the gateway raises on purpose.

    GatewayError                      base of everything below
    ├── ClientError                   the request is wrong: a 4xx, never logged as a fault
    │   ├── BadRequest                400 malformed body, missing or invalid field
    │   ├── Unauthorized              401 no token given
    │   ├── Forbidden                 403 wrong token
    │   ├── NotFound                  404 unknown kernel, session, kernelspec or file
    │   ├── Conflict                  409 the kernel is in a state that forbids the action
    │   └── LimitReached              429 a kernel limit (global or per user) is reached
    ├── KernelError                   a kernel could not be started or reached: a 5xx
    │   ├── KernelStartError          500 the backend failed to launch it
    │   └── KernelTimeout             504 it did not answer within its launch timeout
    └── Unavailable                   503 the gateway is stopping: the request was undone

Backends translate their own failures (OSError, zmq, asyncssh, aiodocker) into KernelError
where they enter, with `raise ... from`. The web face turns these into JSON
{"reason", "message"}; the CLI prints `Type: message` and exits non-zero.
"""

from __future__ import annotations


class GatewayError(Exception):
    status = 500
    reason = "Internal Server Error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ClientError(GatewayError):
    status = 400
    reason = "Bad Request"


class BadRequest(ClientError):
    pass


class Unauthorized(ClientError):
    status = 401
    reason = "Unauthorized"


class Forbidden(ClientError):
    status = 403
    reason = "Forbidden"


class NotFound(ClientError):
    status = 404
    reason = "Not Found"


class Conflict(ClientError):
    status = 409
    reason = "Conflict"


class LimitReached(ClientError):
    status = 429
    reason = "Too Many Kernels"


class KernelError(GatewayError):
    status = 500
    reason = "Kernel Error"


class KernelStartError(KernelError):
    reason = "Kernel Start Failed"


class KernelTimeout(KernelError):
    status = 504
    reason = "Kernel Timeout"


class Unavailable(GatewayError):
    status = 503
    reason = "Service Unavailable"
