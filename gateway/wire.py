"""The kernel's ZMQ wire format, as pure functions over message *parts* (no I/O).

A message travels through the gateway as its parts: [header, parent_header, metadata,
content, *buffers], each the kernel's own JSON bytes (buffers raw). On ZMQ it is

    [*idents, b"<IDS|MSG>", signature, header, parent, metadata, content, *buffers]

The kernel side (kernels/) reads and writes this; the websocket side (bridge/codec.py) turns
the same parts into websocket frames. Both depend on this module, which depends on neither.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

from jupyter_client import protocol_version  # type: ignore[attr-defined]

from .errors import BadFrame

DELIMITER = b"<IDS|MSG>"

Part = bytes | memoryview  # large parts stay views of the received ZMQ frames: no copy

LARGE = 64 * 1024


def frames_as_parts(frames: list[Any]) -> list[Part]:
    """zmq.Frame objects (recv_multipart(copy=False)) as bytes, or as views when large."""
    return [f.buffer if len(f) >= LARGE else f.bytes for f in frames]


def parts_from_zmq(frames: list[Part]) -> list[Part]:
    """The message parts of a ZMQ multipart message (idents and signature dropped)."""
    try:
        i = frames.index(DELIMITER)
    except ValueError:
        raise BadFrame("ZMQ message without delimiter") from None
    parts = frames[i + 2 :]
    if len(parts) < 4:
        raise BadFrame("ZMQ message with fewer than four parts")
    return parts


def sign(key: bytes, parts: list[bytes]) -> bytes:
    """HMAC-SHA256 hex digest over header, parent, metadata and content, as the kernel checks."""
    if not key:
        return b""
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for part in parts[:4]:
        mac.update(part)
    return mac.hexdigest().encode()


def zmq_from_parts(key: bytes, parts: list[bytes]) -> list[bytes]:
    return [DELIMITER, sign(key, parts), *parts]


# A kernel's model shows two times that rarely change between two lists (started, and
# last_activity of an idle kernel), and strftime costs ~9 us: at 1,000 kernels, 44 % of
# GET /api/kernels before this cache. Two entries per kernel fit.
@functools.lru_cache(maxsize=8192)
def iso(ts: float) -> str:
    """A time as the gateway writes it in REST models and in its own requests' headers."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def status_parts(state: str, session: str = "") -> list[bytes]:
    """An iopub status message made by the gateway itself (kernel restarting or dead)."""
    # date and version as jupyter_client writes them (jsonutil.json_default, protocol_version),
    # as in the kernel's own messages and in jupyter_server's status messages
    header = {
        "msg_id": uuid4().hex,
        "msg_type": "status",
        "username": "gateway",
        "session": session,
        "date": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "version": protocol_version,
    }
    return [
        json.dumps(header).encode(),
        b"{}",
        b"{}",
        json.dumps({"execution_state": state}).encode(),
    ]


def status_content(parts: Sequence[Part]) -> Any:
    """The decoded content of a status message; None for any other message. Only status
    messages, which are small, are decoded. Raises ValueError on undecodable JSON."""
    header = bytes(parts[0])  # headers are small: bytes already, so no copy
    if b'"status"' not in header or json.loads(header).get("msg_type") != "status":
        return None
    return json.loads(bytes(parts[3]))


def parent_msg_id(parts: Sequence[Part]) -> Any:
    """The msg_id of the request a message answers. Raises ValueError, AttributeError."""
    return json.loads(bytes(parts[1])).get("msg_id")
