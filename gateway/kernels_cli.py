"""`rkg kernels`: the kernels of a running gateway as a table (or JSON), and `stop` or
`interrupt` for one of them, named by its id or a unique start of it.

    rkg kernels [list] [--json]   GET    /api/kernels
    rkg kernels stop ID           DELETE /api/kernels/ID
    rkg kernels interrupt ID      POST   /api/kernels/ID/interrupt

It speaks the REST API with the standard library alone, so it works against any Jupyter
kernel gateway: the columns only this gateway reports (its `gateway` object in each kernel's
model) stay blank for the others. --url (RKG_URL; default http://127.0.0.1:8888/, a base
URL such as https://host/gw/ included; a ?token= in it is used as the token) and --token
(RKG_TOKEN, or the file RKG_TOKEN_FILE names, as for `rkg serve`) say which gateway.

Every failure is one GatewayError for the CLI to print on one line: Unavailable when nothing
answers at the URL (refused, unresolved, timed out), NotFound when what answers is not a
gateway (no JSON, or not the kernels list), and the gateway's own refusals (401, 403, 404,
...) as the error of that status, with the message it sent.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .errors import (
    BadRequest,
    Conflict,
    Forbidden,
    GatewayError,
    KernelError,
    KernelTimeout,
    LimitReached,
    NotFound,
    Unauthorized,
    Unavailable,
)

DEFAULT_URL = "http://127.0.0.1:8888/"
DEFAULT_TIMEOUT = 30.0
COLUMNS = ("ID", "SPEC", "BACKEND", "HOST", "USER", "STATE", "CONN", "STARTED", "LAST ACTIVITY")
SHORT_ID = 8  # shown as much of each id as keeps them apart, at least this much

_BY_STATUS: dict[int, type[GatewayError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    429: LimitReached,
    500: KernelError,
    503: Unavailable,
    504: KernelTimeout,
}


# -- the command line ----------------------------------------------------------------------


def add_kernels_arguments(parser: argparse.ArgumentParser) -> None:
    """`rkg kernels` and its subcommands. The connection options are accepted before and
    after the subcommand; their defaults (SUPPRESS: absent) come from the environment."""
    _connection_options(parser)
    parser.add_argument("--json", action="store_true", help="the kernels' models as JSON")
    sub = parser.add_subparsers(dest="kernels_command", metavar="{list,stop,interrupt}")
    listing = sub.add_parser("list", help="the kernels as a table (what `rkg kernels` does)")
    _connection_options(listing)
    listing.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="as JSON")
    for name, text in (
        ("stop", "shut a kernel down"),
        ("interrupt", "interrupt what a kernel is running (SIGINT, or its interrupt message)"),
    ):
        action = sub.add_parser(name, help=text)
        _connection_options(action)
        action.add_argument("kernel_id", metavar="ID", help="a kernel id, or its first characters")


def _connection_options(parser: argparse.ArgumentParser) -> None:
    none = argparse.SUPPRESS
    parser.add_argument(
        "--url", default=none, help=f"the gateway's base URL [RKG_URL, default {DEFAULT_URL}]"
    )
    parser.add_argument(
        "--token", default=none, help="its token [RKG_TOKEN, or the file named by RKG_TOKEN_FILE]"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=none,
        help=f"seconds to wait for an answer [default {DEFAULT_TIMEOUT:g}]",
    )


def run_kernels_command(args: argparse.Namespace, environ: Mapping[str, str]) -> None:
    gateway = Gateway.from_args(args, environ)
    command = args.kernels_command or "list"
    kernels = gateway.kernels()
    if command == "list":
        if getattr(args, "json", False):
            print(json.dumps(kernels, indent=2))
        elif kernels:
            print(table(kernels, datetime.now(UTC)))
        else:
            print(f"no kernels at {gateway.url}")
        return
    kernel_id = match(kernels, args.kernel_id, gateway.url)
    path = f"api/kernels/{urllib.parse.quote(kernel_id, safe='')}"
    if command == "stop":
        gateway.call("DELETE", path)
        print(f"stopped {kernel_id}")
    else:
        gateway.call("POST", f"{path}/interrupt")
        print(f"interrupted {kernel_id}")
    sys.stdout.flush()


# -- talking to the gateway ----------------------------------------------------------------


@dataclass(frozen=True)
class Gateway:
    url: str  # the base URL, ending with a slash
    token: str
    timeout: float

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: Mapping[str, str]) -> Gateway:
        url, url_token = base_url(getattr(args, "url", None) or environ.get("RKG_URL") or "")
        token = getattr(args, "token", None)
        if token is None:
            token = url_token or environ.get("RKG_TOKEN") or ""
        if not token and environ.get("RKG_TOKEN_FILE"):
            with open(environ["RKG_TOKEN_FILE"]) as file:
                token = file.read().strip()
        timeout = getattr(args, "timeout", DEFAULT_TIMEOUT)
        if not timeout > 0:
            raise BadRequest("--timeout must be a number of seconds above 0")
        return cls(url, token.strip(), timeout)

    def kernels(self) -> list[dict[str, Any]]:
        found = self.call("GET", "api/kernels")
        if not (isinstance(found, list) and all(isinstance(k, dict) for k in found)):
            raise NotFound(
                f"{self.url} answered GET api/kernels with JSON that is not a list of kernels: "
                "is a Jupyter gateway there, under that base URL?"
            )
        return found

    def call(self, method: str, path: str) -> Any:
        """One request; its JSON answer (None for an empty one)."""
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"token {self.token}"
        # base_url() let http:// and https:// alone through
        request = urllib.request.Request(  # noqa: S310
            self.url + path,
            data=b"" if method in ("POST", "PUT", "PATCH") else None,
            headers=headers,
            method=method,
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as answer:  # noqa: S310
                body = answer.read()
        except urllib.error.HTTPError as e:
            raise self._refusal(e, f"{method} {path}") from None
        except urllib.error.URLError as e:
            reason = e.reason if isinstance(e.reason, BaseException) else OSError(str(e.reason))
            raise Unavailable(f"cannot reach the gateway at {self.url}: {self._why(reason)}") from e
        except (OSError, http.client.HTTPException) as e:
            raise Unavailable(f"cannot reach the gateway at {self.url}: {self._why(e)}") from e
        if not body.strip():
            return None
        try:
            return json.loads(body)
        except ValueError:
            raise NotFound(
                f"{self.url} answered {method} {path} with something other than JSON: "
                "is a Jupyter gateway there, under that base URL?"
            ) from None

    def _why(self, e: BaseException) -> str:
        if isinstance(e, ConnectionRefusedError):
            return "connection refused (is `rkg serve` running there, on that port?)"
        if isinstance(e, socket.gaierror):
            host = urllib.parse.urlsplit(self.url).hostname
            return f"cannot resolve the host name {host!r}"
        if isinstance(e, TimeoutError):
            return f"no answer within {self.timeout:g} s"
        if isinstance(e, ssl.SSLCertVerificationError):
            return f"TLS certificate not accepted: {e.verify_message}"
        if isinstance(e, ssl.SSLError):
            return f"TLS failed: {e.reason or e}"
        if isinstance(e, http.client.RemoteDisconnected):
            return "the connection was closed without an answer"
        if isinstance(e, http.client.HTTPException):
            return "what answers there does not speak HTTP"
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
        return str(e) or type(e).__name__

    def _refusal(self, e: urllib.error.HTTPError, what: str) -> GatewayError:
        """An error answer as the error of its status, with the gateway's own message (its
        JSON {"reason", "message"}). One that is not JSON is not from a gateway."""
        try:
            message = json.loads(e.read()).get("message")
        except (ValueError, AttributeError, OSError):
            message = None
        if not isinstance(message, str) or not message.strip():
            return NotFound(
                f"{self.url} answered {what} with {e.code} {e.reason} and no JSON message: "
                "is a Jupyter gateway there, under that base URL?"
            )
        message = " ".join(message.split())  # one line
        if e.code == 401:
            message += " (give it with --token, RKG_TOKEN or RKG_TOKEN_FILE)"
        elif e.code == 404 and what == "GET api/kernels":
            message += " (is the base URL right?)"
        cls = _BY_STATUS.get(e.code)
        if cls is None:
            return GatewayError(f"{self.url}: {e.code} {e.reason}: {message}")
        return cls(f"{self.url}: {message}")


def base_url(text: str) -> tuple[str, str]:
    """(the base URL ending with a slash, the ?token= it carries or ''). 'host:8888/gw' is
    taken as http://host:8888/gw/; the empty string is the default."""
    text = text.strip() or DEFAULT_URL
    if "://" not in text:
        text = "http://" + text
    try:
        parts = urllib.parse.urlsplit(text)
        parts.port  # noqa: B018 (raises ValueError for a port that is not one)
    except ValueError:
        raise BadRequest(f"--url {text!r} is not a URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadRequest(f"--url {text!r}: give an http:// or https:// URL with a host")
    token = urllib.parse.parse_qs(parts.query).get("token", [""])[-1]
    path = parts.path.rstrip("/") + "/"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", "")), token


def match(kernels: list[dict[str, Any]], wanted: str, url: str) -> str:
    """The id of the one kernel whose id is `wanted`, or starts with it."""
    wanted = wanted.strip()
    if not wanted:
        raise BadRequest("give a kernel id, or its first characters")
    ids = [str(k.get("id", "")) for k in kernels]
    if wanted in ids:
        return wanted
    found = [i for i in ids if i.startswith(wanted)]
    if not found:
        raise NotFound(f"no kernel at {url} has an id starting with {wanted!r}")
    if len(found) > 1:
        shown = ", ".join(sorted(found)[:5]) + (", ..." if len(found) > 5 else "")
        raise BadRequest(
            f"{wanted!r} is the start of {len(found)} kernel ids at {url} ({shown}); "
            "give more of the one you mean"
        )
    return found[0]


# -- the table -----------------------------------------------------------------------------


def table(kernels: list[dict[str, Any]], now: datetime) -> str:
    """COLUMNS, one row per kernel; what a gateway does not report is blank."""
    kernels = sorted(kernels, key=_order)
    ids = short_ids([str(k.get("id", "")) for k in kernels])
    rows = [COLUMNS, *(_row(k, short, now) for k, short in zip(kernels, ids, strict=True))]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _order(kernel: dict[str, Any]) -> tuple[bool, str, str]:
    """Oldest first; kernels whose start time is not reported after them, by id."""
    started = str(_own(kernel).get("started") or "")
    return (not started, started, str(kernel.get("id", "")))


def _own(kernel: dict[str, Any]) -> dict[str, Any]:
    """This gateway's extra object in a kernel model; empty from other gateways."""
    own = kernel.get("gateway")
    return own if isinstance(own, dict) else {}


def _row(kernel: dict[str, Any], short_id: str, now: datetime) -> tuple[str, ...]:
    own = _own(kernel)
    state = str(own.get("state") or "")
    if state in ("", "running"):  # then what the kernel itself says: idle, busy
        state = str(kernel.get("execution_state") or state)
    if own.get("stage"):
        state += f" ({own['stage']})"
    connections = kernel.get("connections")
    cells = (
        short_id,
        kernel.get("name"),
        own.get("backend"),
        own.get("host"),
        own.get("user"),
        state,
        "" if connections is None else connections,
        ago(own.get("started"), now),
        ago(kernel.get("last_activity"), now),
    )
    return tuple(" ".join(str(c if c is not None else "").split()) for c in cells)


def short_ids(ids: list[str]) -> list[str]:
    """Each id cut to the shortest length (SHORT_ID at least) that keeps them all apart."""
    length = SHORT_ID
    while length < max(map(len, ids), default=0) and len({i[:length] for i in ids}) < len(set(ids)):
        length += 1
    return [i[:length] for i in ids]


def ago(stamp: Any, now: datetime) -> str:
    """An ISO time as its age: '12s ago', '5m ago', '3h ago', '2d ago'."""
    if not isinstance(stamp, str) or not stamp:
        return ""
    try:
        when = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return stamp
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    seconds = max(0, int((now - when).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"
