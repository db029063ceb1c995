"""The gateway's log: set up once by `rkg serve`, as text or as one JSON object per line.

    {"time": "2026-01-01T12:00:00.123Z", "level": "INFO", "logger": "gateway.kernels.registry",
     "message": "kernel 5c1e... (python3) started", "kernel_id": "5c1e...", "user": "ada",
     "backend": "ssh", "host": "gpu1"}

A line is about a kernel when the work that logs it was begun for that kernel: whoever begins
it (a start, a restart, a shutdown, a cull, a request to /api/kernels/ID..., a kernel websocket)
calls `concerning(kernel)`, which sets a context variable for the rest of the current task.
asyncio copies a task's context into the tasks it creates, so the launch, the kernel's monitor
and its iopub pump, and whatever a backend logs on the kernel's behalf carry it too, including
a failed start's last line, logged after the registry has let go of the kernel. The variable
holds a weak reference: a task that outlives its kernel does not keep it in memory.

A token never reaches the log: the access log writes the path without its query (where a
websocket's ?token= is), and every line is scrubbed of `token=` query values and
`Authorization` header values, whoever logs them (Tornado's uncaught-exception lines quote
the full URI). Only the startup line that hands a generated token to the operator is exempt
(`SHOWS_TOKEN`).

The client of a request is the TCP peer, unless that peer is a trusted proxy
(--trusted-proxy): then it is the rightmost address of X-Forwarded-For that is not one.
"""

from __future__ import annotations

import contextlib
import contextvars
import ipaddress
import json
import logging
import re
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from .config import Config
from .errors import BadRequest

TEXT_FORMAT = "[%(levelname).1s %(asctime)s %(name)s] %(message)s"
# extra={...} for the one line that may show a token: the generated one, for the operator
SHOWS_TOKEN = {"rkg_shows_token": True}
KERNEL_FIELDS = ("kernel_id", "user", "backend", "host")


class Kernel(Protocol):
    """What a log line says of its kernel (kernels.kernel.ManagedKernel)."""

    @property
    def id(self) -> str: ...
    @property
    def user(self) -> str: ...
    @property
    def backend(self) -> str: ...
    @property
    def location(self) -> str: ...


_Subject = tuple[str, Callable[[], Kernel | None]]  # kernel id, weak reference
_subject: contextvars.ContextVar[_Subject | None] = contextvars.ContextVar(
    "rkg_kernel", default=None
)


def _no_kernel() -> None:
    return None


def concerning(kernel: Kernel | str) -> None:
    """From here on, the current task's log lines (and those of the tasks it creates) are
    about `kernel`, or about a kernel id this gateway does not know. Called where work for
    a kernel begins, inside the task doing it: never in a handler's constructor, which
    Tornado runs in the connection's task, where it would outlast the request."""
    _subject.set(_subject_of(kernel))


@contextlib.contextmanager
def about(kernel: Kernel | str) -> Iterator[None]:
    """`concerning(kernel)` for a block only: for code that works for several kernels in turn."""
    token = _subject.set(_subject_of(kernel))
    try:
        yield
    finally:
        _subject.reset(token)


def _subject_of(kernel: Kernel | str) -> _Subject:
    if isinstance(kernel, str):
        return (kernel, _no_kernel)
    return (kernel.id, weakref.ref(kernel))


def kernel_fields() -> dict[str, str]:
    """The kernel fields of a line logged now: empty when it concerns no kernel."""
    subject = _subject.get()
    if subject is None:
        return {}
    kernel_id, ref = subject
    kernel = ref()
    if kernel is None:
        return dict.fromkeys(KERNEL_FIELDS, "") | {"kernel_id": kernel_id}
    return {
        "kernel_id": kernel_id,
        "user": kernel.user,
        "backend": kernel.backend,
        "host": kernel.location,
    }


# -- secrets -------------------------------------------------------------------------------

# a value that starts with "<" is a placeholder in a help text (?token=<token>), left alone
_TOKEN_QUERY = re.compile(r"([?&;]token=)(?!<)[^&#;\s'\"]+", re.IGNORECASE)
_AUTH_HEADER = re.compile(
    r"(authorization['\"]?\s*[:=,]\s*['\"]?(?:token|bearer)\s+)(?!<)[^\s'\"]+", re.IGNORECASE
)


def redact(text: str) -> str:
    """`text` without token values in URLs (?token=T) or Authorization headers."""
    lowered = text.lower()
    if "token=" not in lowered and "authorization" not in lowered:  # most lines
        return text
    return _AUTH_HEADER.sub(r"\1[redacted]", _TOKEN_QUERY.sub(r"\1[redacted]", text))


# -- formats -------------------------------------------------------------------------------

# what every LogRecord has; anything else on a record was given as extra={...}
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class KernelFilter(logging.Filter):
    """Puts the kernel fields on each record the handler emits (logging is synchronous, so
    this runs in the context of the code that logged)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in kernel_fields().items():
            if not hasattr(record, name):  # an explicit extra={...} wins
                setattr(record, name, value)
        return True


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if getattr(record, "rkg_shows_token", False) else redact(text)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message; exc_info and
    stack_info as text when there are any; then the kernel fields and any extra={...}."""

    def format(self, record: logging.LogRecord) -> str:
        clean = (lambda s: s) if getattr(record, "rkg_shows_token", False) else redact
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": clean(record.getMessage()),
        }
        if record.exc_info:
            record.exc_text = record.exc_text or self.formatException(record.exc_info)
        if record.exc_text:
            line["exc_info"] = clean(record.exc_text)
        if record.stack_info:
            line["stack_info"] = clean(self.formatStack(record.stack_info))
        for name, value in record.__dict__.items():
            if name not in _STANDARD and name not in line and name != "rkg_shows_token":
                line[name] = clean(value) if isinstance(value, str) else value
        return json.dumps(line, default=str)


def setup(config: Config) -> None:
    """Called by `rkg serve` once, before anything logs. Also rejects a --trusted-proxy
    that is no address, so that the gateway does not start with it."""
    trusted_networks(config.trusted_proxies)
    handler = logging.StreamHandler()
    if config.log_format == "json":
        handler.addFilter(KernelFilter())
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter(TEXT_FORMAT))
    logging.basicConfig(level=config.log_level, handlers=[handler], force=True)
    logging.captureWarnings(True)  # a warning is a log line too, not bare text on stderr


# -- the client of a request ---------------------------------------------------------------

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def trusted_networks(addresses: Iterable[str]) -> tuple[Network, ...]:
    """--trusted-proxy values (an address, or a network such as 10.0.0.0/8) as networks."""
    found = []
    for text in addresses:
        try:
            found.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError:
            raise BadRequest(
                f"--trusted-proxy {text!r} is not an IP address or network (RKG_TRUSTED_PROXIES)"
            ) from None
    return tuple(found)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        return None


def client_address(peer: str, forwarded_for: Sequence[str], trusted: Sequence[Network]) -> str:
    """Who made a request. The TCP `peer`, unless it is a trusted proxy: then walk the
    X-Forwarded-For entries (each header line in order, comma-separated) from the right,
    past the trusted proxies, to the first address that is not one; what lies left of it
    is whatever the client chose to send. An entry that is no address ends the walk at
    the last proxy that was believed."""

    def is_trusted(address: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> bool:
        return address is not None and any(address in net for net in trusted)

    if not is_trusted(_address(peer)):
        return peer
    client = peer
    hops = [hop for line in forwarded_for for hop in line.split(",")]
    for hop in reversed(hops):
        address = _address(hop)
        if address is None:
            break
        client = str(address)
        if not is_trusted(address):
            break
    return client
