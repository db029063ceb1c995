"""Every error the gateway raises on purpose.

    GatewayError                      base of everything below
    ├── ClientError                   the request is wrong: a 4xx, never logged as a fault
    │   ├── BadRequest                400 malformed body, missing or invalid field
    │   │   └── BadFrame              400 a websocket frame that is not a valid kernel message
    │   ├── Unauthorized              401 no token given
    │   ├── Forbidden                 403 wrong token
    │   ├── NotFound                  404 unknown kernel, session, kernelspec or file
    │   ├── Conflict                  409 the kernel is in a state that forbids the action
    │   ├── PayloadTooLarge           413 a request body over the gateway's cap
    │   └── LimitReached              429 a kernel limit (global or per user) is reached
    │       └── TooManySessions       429 a kernel has as many client sessions as allowed
    ├── KernelError                   500 a kernel could not be started, reached or signalled
    │   ├── KernelStartError          500 the backend failed to launch it
    │   ├── KernelTimeout             504 it did not answer within its launch timeout
    │   ├── BackendUnavailable        503 a host, engine or scheduler cannot be reached now
    │   ├── EngineError               500 the Docker engine refused a request (`code`: its status)
    │   └── SchedulerError            500 a batch scheduler's answer that cannot be read or used
    ├── StateError                    500 the state database cannot be opened or written
    └── Unavailable                   503 the gateway is stopping: the request was undone

Foreign failures are translated where they enter, by one context manager per library, with
`raise ... from`: sshpool.ssh_errors (asyncssh), dockerengine.docker_errors (aiodocker),
batchlogin.command_errors (subprocesses), so one failure is one error wherever it happens.
The web face turns these into JSON {"reason", "message"}; the CLI prints `Type: message` and
exits non-zero.
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


class BadFrame(BadRequest):
    """A websocket frame from a client that is not a valid kernel message."""


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


class PayloadTooLarge(ClientError):
    status = 413
    reason = "Payload Too Large"


class LimitReached(ClientError):
    status = 429
    reason = "Too Many Kernels"


class TooManySessions(LimitReached):
    reason = "Too Many Sessions"


class KernelError(GatewayError):
    status = 500
    reason = "Kernel Error"


class KernelStartError(KernelError):
    reason = "Kernel Start Failed"


class KernelTimeout(KernelError):
    status = 504
    reason = "Kernel Timeout"


class BackendUnavailable(KernelError):
    """A host, engine or scheduler cannot be reached now; the same request may work later."""

    status = 503
    reason = "Backend Unavailable"


class EngineError(KernelError):
    """The Docker engine refused a request; `code` is its HTTP status (404: no such object)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class SchedulerError(KernelError):
    """A batch scheduler's answer that cannot be read, or a request it cannot do."""


class StateError(GatewayError):
    reason = "State Store Error"


class Unavailable(GatewayError):
    status = 503
    reason = "Service Unavailable"
