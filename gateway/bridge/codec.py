"""Frame codecs between message parts and the two websocket protocols (pure functions).

A message travels as *parts* (gateway/wire.py): [header, parent_header, metadata, content,
*buffers], each the kernel's own JSON bytes (buffers raw). Kernel -> client frames are
assembled from those bytes without decoding them; only client -> kernel legacy JSON needs a
parse (and a re-serialisation).

- v1:     uint64 LE n, n uint64 LE offsets, then channel, header, parent, metadata, content,
          *buffers (subprotocol v1.kernel.websocket.jupyter.org)
- legacy: one JSON object per text frame, {header, msg_id, msg_type, parent_header, metadata,
          content, channel, buffers} as jupyter_server writes it (msg_id and msg_type copied
          from the header); a message with buffers as a binary frame: uint32 BE count, count
          uint32 BE offsets, the JSON (without "buffers"), then the raw buffers.
"""

from __future__ import annotations

import base64
import functools
import json
import struct
from collections.abc import Sequence
from typing import Any

from ..errors import BadFrame as BadFrame  # what every parser here raises
from ..wire import Part

V1_PROTOCOL = "v1.kernel.websocket.jupyter.org"
CLIENT_CHANNELS = frozenset({"shell", "control", "stdin"})
_MSG_KEYS = ("header", "parent_header", "metadata", "content")


# -- v1 ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)  # by piece count: a handful in practice
def _v1_offsets(n: int) -> struct.Struct:
    return struct.Struct(f"<{n + 1}Q")


def v1_pieces(channel: bytes, parts: Sequence[Part]) -> list[Part]:
    """A v1 frame as the pieces that, joined, make it (writable without joining)."""
    pieces = [channel, *parts]
    n = len(pieces) + 1
    offsets = [8 * (n + 1)]
    for piece in pieces:
        offsets.append(offsets[-1] + len(piece))
    return [_v1_offsets(n).pack(n, *offsets), *pieces]


def v1_from_parts(channel: bytes, parts: Sequence[Part]) -> bytes:
    return b"".join(v1_pieces(channel, parts))


def parts_from_v1(frame: bytes) -> tuple[str, list[bytes]]:
    try:
        (n,) = struct.unpack_from("<Q", frame)
        if not 3 <= n <= 4096 or 8 * (n + 1) > len(frame):
            raise BadFrame("v1 frame with an impossible offset count")
        offsets = struct.unpack_from(f"<{n}Q", frame, 8)
    except struct.error:
        raise BadFrame("v1 frame too short") from None
    if list(offsets) != sorted(offsets) or offsets[-1] > len(frame) or offsets[0] != 8 * (n + 1):
        raise BadFrame("v1 frame offsets out of order or out of range")
    pieces = [frame[offsets[i] : offsets[i + 1]] for i in range(n - 1)]
    try:
        channel = pieces[0].decode()
    except UnicodeDecodeError:
        raise BadFrame("v1 frame channel is not text") from None
    parts = pieces[1:]
    if len(parts) < 4:
        raise BadFrame("v1 frame with fewer than four message parts")
    return channel, parts


# -- legacy --------------------------------------------------------------------------------


def _header_ids(header: Part) -> bytes:
    """`"msg_id":...,"msg_type":...,` copied from the header, as jupyter_server's serializer
    (jupyter_client `Session.deserialize`) puts them at the top level of every legacy
    message; Enterprise Gateway's client and jupyter_server's GatewayKernelClient read them
    there. Headers are small, so decoding one costs microseconds."""
    try:
        parsed = json.loads(bytes(header))
    except (ValueError, UnicodeDecodeError):
        parsed = None
    if not isinstance(parsed, dict):
        parsed = {}
    ids = {"msg_id": parsed.get("msg_id"), "msg_type": parsed.get("msg_type")}
    return json.dumps(ids, ensure_ascii=False)[1:-1].encode() + b","


def _legacy_json(channel: bytes, parts: Sequence[Part], buffers: list[str] | None) -> list[Part]:
    h, p, m, c = parts[:4]
    tail = b"" if buffers is None else b',"buffers":' + json.dumps(buffers).encode()
    return [
        b'{"header":',
        h,
        b"," + _header_ids(h) + b'"parent_header":',
        p,
        b',"metadata":',
        m,
        b',"content":',
        c,
        b',"channel":"' + channel + b'"' + tail + b"}",
    ]


def legacy_pieces(
    channel: bytes, parts: Sequence[Part], *, binary_ok: bool = True
) -> tuple[list[Part], bool]:
    """(pieces of the frame, is_binary). Messages with buffers become binary frames, or, for
    a client that cannot take binary frames (`binary_ok=False`), text with base64 buffers."""
    buffers = parts[4:]
    if not buffers:
        return _legacy_json(channel, parts, []), False
    if not binary_ok:
        return _legacy_json(channel, parts, [base64.b64encode(b).decode() for b in buffers]), False
    text = _legacy_json(channel, parts, None)
    sizes = [sum(len(t) for t in text), *(len(b) for b in buffers)]
    offsets = [4 * (len(sizes) + 1)]
    for size in sizes[:-1]:
        offsets.append(offsets[-1] + size)
    return [struct.pack(f">{len(sizes) + 1}I", len(sizes), *offsets), *text, *buffers], True


def legacy_from_parts(
    channel: bytes, parts: Sequence[Part], *, binary_ok: bool = True
) -> tuple[bytes, bool]:
    pieces, binary = legacy_pieces(channel, parts, binary_ok=binary_ok)
    return b"".join(pieces), binary


def _parts_from_message(msg: Any, buffers: list[bytes]) -> tuple[str, list[bytes]]:
    if not isinstance(msg, dict):
        raise BadFrame("message is not a JSON object")
    channel = msg.get("channel")
    if channel is None:  # as jupyter_server: a message that names no channel goes to shell
        channel = "shell"
    if not isinstance(channel, str):
        raise BadFrame("message channel is not a string")
    header = msg.get("header")
    if not isinstance(header, dict) or not isinstance(header.get("msg_type"), str):
        raise BadFrame("message header has no msg_type")
    parts = []
    for key in _MSG_KEYS:
        value = msg.get(key) or {}
        if not isinstance(value, dict):
            raise BadFrame(f"message {key} is not an object")
        parts.append(json.dumps(value, ensure_ascii=False, default=str).encode())
    return channel, parts + buffers


def parts_from_legacy_text(frame: str | bytes) -> tuple[str, list[bytes]]:
    try:
        msg = json.loads(frame)
    except (ValueError, UnicodeDecodeError):
        raise BadFrame("text frame is not JSON") from None
    buffers = msg.get("buffers") if isinstance(msg, dict) else None
    raw = []
    if isinstance(buffers, list):  # clients that cannot send binary may send base64
        try:
            raw = [base64.b64decode(b) for b in buffers if isinstance(b, str)]
        except ValueError:
            raise BadFrame("buffers are not base64") from None
    return _parts_from_message(msg, raw)


def parts_from_legacy_binary(frame: bytes) -> tuple[str, list[bytes]]:
    try:
        (n,) = struct.unpack_from(">I", frame)
        if not 1 <= n <= 4096:
            raise BadFrame("binary frame with an impossible buffer count")
        offsets = [*struct.unpack_from(f">{n}I", frame, 4), len(frame)]
    except struct.error:
        raise BadFrame("binary frame too short") from None
    if offsets != sorted(offsets) or offsets[0] < 4 * (n + 1):
        raise BadFrame("binary frame offsets out of order")
    chunks = [frame[offsets[i] : offsets[i + 1]] for i in range(n)]
    try:
        msg = json.loads(chunks[0])
    except (ValueError, UnicodeDecodeError):
        raise BadFrame("binary frame does not start with JSON") from None
    return _parts_from_message(msg, chunks[1:])
