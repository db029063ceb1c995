"""A minimal client for the gateway's REST API and kernel websocket, for the API tests.

It speaks both websocket protocols with plain `websockets` so that tests see the raw frames.
Real-client behaviour is covered separately (jupyter_server, @jupyterlab/services in Node).
"""

from __future__ import annotations

import asyncio
import json
import struct
import uuid
from typing import Any

import websockets
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from websockets.typing import Subprotocol

V1 = "v1.kernel.websocket.jupyter.org"
Labels = tuple[tuple[str, str], ...]


async def api(
    gw: Any,
    method: str,
    path: str,
    body: Any = None,
    *,
    token: str | None = None,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """(status, decoded JSON or None). `token=""` sends no token."""
    tok = gw.token if token is None else token
    hdrs = {"Authorization": f"token {tok}"} if tok else {}
    hdrs.update(headers or {})
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    if data is None and method in ("POST", "PATCH", "PUT"):
        data = b""
    req = HTTPRequest(
        gw.url + path.lstrip("/"),
        method=method,
        body=data,
        headers=hdrs,
        request_timeout=60,
        allow_nonstandard_methods=True,
    )
    resp = await AsyncHTTPClient().fetch(req, raise_error=False)
    text = resp.body or b""
    try:
        payload = json.loads(text) if text else None
    except ValueError:
        payload = text
    return resp.code, payload


async def scrape(gw: Any, token: str | None = None) -> dict[tuple[str, Labels], float]:
    """/metrics, read with prometheus_client's parser: {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    status, body = await api(gw, "GET", "metrics", token=token)
    assert status == 200 and isinstance(body, bytes), (status, body)
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def metric(samples: dict[tuple[str, Labels], float], name: str, **labels: str) -> float:
    """One sample of a scrape(); 0 when absent (a counter not yet incremented)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


MSG_KEYS = ("header", "parent_header", "metadata", "content")


def message(
    session: str,
    msg_type: str,
    content: dict[str, Any],
    channel: str = "shell",
    username: str = "test",
) -> dict[str, Any]:
    """A client's message, as a dict (what a legacy JSON frame holds)."""
    return {
        "header": {
            "msg_id": uuid.uuid4().hex,
            "msg_type": msg_type,
            "session": session,
            "username": username,
            "version": "5.3",
            "date": "2026-01-01T00:00:00.000000Z",
        },
        "parent_header": {},
        "metadata": {},
        "content": content,
        "channel": channel,
    }


def encode(msg: dict[str, Any], v1: bool) -> str | bytes:
    """The frame a client sends for `msg` (see `message`): v1 binary or legacy JSON text."""
    if v1:
        return v1_encode(msg["channel"], [json.dumps(msg[k]).encode() for k in MSG_KEYS])
    return json.dumps(msg)


def v1_encode(channel: str, parts: list[bytes]) -> bytes:
    pieces = [channel.encode(), *parts]
    n = len(pieces) + 1
    offsets = [8 * (n + 1)]
    for p in pieces:
        offsets.append(offsets[-1] + len(p))
    return struct.pack(f"<{n + 1}Q", n, *offsets) + b"".join(pieces)


def _text(piece: bytes | memoryview) -> str:
    """A part as text; a memoryview is decoded in place (json.loads takes no memoryview)."""
    return str(piece, "utf-8")


def v1_decode(frame: bytes | memoryview) -> dict[str, Any]:
    """A v1 frame as a message dict, buffers included. Given a memoryview of the frame, the
    parts are views of it, each decoded from UTF-8 straight into the text json.loads reads:
    nothing of a large message is copied first (bench/bench.py times 50 MB messages so)."""
    (n,) = struct.unpack_from("<Q", frame)
    offs = struct.unpack_from(f"<{n}Q", frame, 8)
    pieces = [frame[offs[i] : offs[i + 1]] for i in range(n - 1)]
    msg = {k: json.loads(_text(p)) for k, p in zip(MSG_KEYS, pieces[1:5], strict=False)}
    msg["channel"] = _text(pieces[0])
    msg["buffers"] = pieces[5:]
    return msg


def legacy_decode(frame: str | bytes | memoryview) -> dict[str, Any]:
    """A legacy frame (JSON text, or binary with buffers) as a message dict; a memoryview is
    decoded without copies, as in `v1_decode`."""
    if isinstance(frame, str):
        msg: dict[str, Any] = json.loads(frame)
        return msg
    (n,) = struct.unpack_from(">I", frame)
    offs = [*struct.unpack_from(f">{n}I", frame, 4), len(frame)]
    msg = json.loads(_text(frame[offs[0] : offs[1]]))
    msg["buffers"] = [frame[offs[i] : offs[i + 1]] for i in range(1, n)]
    return msg


class KernelSocket:
    """One websocket to /api/kernels/ID/channels."""

    def __init__(self, ws: Any, v1: bool, session: str) -> None:
        self.ws, self.v1, self.session = ws, v1, session

    @classmethod
    async def open(
        cls,
        gw: Any,
        kernel_id: str,
        *,
        v1: bool = False,
        session: str | None = None,
        token: str | None = None,
        query_token: bool = False,
    ) -> KernelSocket:
        session = session or uuid.uuid4().hex
        tok = gw.token if token is None else token
        url = f"{gw.ws_url}api/kernels/{kernel_id}/channels?session_id={session}"
        headers = {}
        if query_token:
            url += f"&token={tok}"
        elif tok:
            headers["Authorization"] = f"token {tok}"
        ws = await websockets.connect(
            url,
            additional_headers=headers,
            max_size=None,
            subprotocols=[Subprotocol(V1)] if v1 else None,
            open_timeout=20,
        )
        return cls(ws, ws.subprotocol == V1, session)  # speak what the server chose

    def message(
        self, msg_type: str, content: dict[str, Any], channel: str = "shell"
    ) -> dict[str, Any]:
        return message(self.session, msg_type, content, channel)

    async def send(self, msg_type: str, content: dict[str, Any], channel: str = "shell") -> str:
        msg = self.message(msg_type, content, channel)
        await self.ws.send(encode(msg, self.v1))
        msg_id: str = msg["header"]["msg_id"]
        return msg_id

    async def recv(self, timeout: float = 30) -> dict[str, Any]:
        frame = await asyncio.wait_for(self.ws.recv(), timeout)
        return v1_decode(frame) if self.v1 else legacy_decode(frame)

    async def until(self, pred: Any, timeout: float = 30) -> list[dict[str, Any]]:
        """Messages received up to and including the first one matching `pred`."""
        seen: list[dict[str, Any]] = []
        async with asyncio.timeout(timeout):
            while True:
                msg = await self.recv(timeout)
                seen.append(msg)
                if pred(msg):
                    return seen

    async def until_status(self, state: str, timeout: float = 30) -> list[dict[str, Any]]:
        """Messages up to the first iopub status `state` (restarting, dead, ...)."""
        return await self.until(
            lambda m: (
                m["header"]["msg_type"] == "status" and m["content"]["execution_state"] == state
            ),
            timeout,
        )

    async def start_long_cell(self, seconds: int = 30) -> str:
        """Start a cell that sleeps, and return once it is provably inside the sleep, for
        interrupt tests. ipykernel swallows a SIGINT that lands between its 'busy' and the
        cell's first line, and print(flush=True) returns only after ipykernel's iopub thread
        sent the line, so after the line arrives the cell is given a moment to reach the
        sleep (interrupts were lost about once in ten loaded suite runs without it)."""
        msg_id = await self.send(
            "execute_request",
            {
                "code": f"import time; print('sleeping', flush=True); time.sleep({seconds})",
                "silent": False,
            },
        )
        await self.until(
            lambda m: (
                m["header"]["msg_type"] == "stream" and m["parent_header"].get("msg_id") == msg_id
            )
        )
        await asyncio.sleep(0.5)
        return msg_id

    async def reply_and_idle(self, msg_id: str, timeout: float = 30) -> list[dict[str, Any]]:
        """Everything with parent msg_id until both the reply and iopub idle arrived."""
        got: list[dict[str, Any]] = []
        reply = idle = False
        async with asyncio.timeout(timeout):
            while not (reply and idle):
                msg = await self.recv(timeout)
                if msg["parent_header"].get("msg_id") != msg_id:
                    continue
                got.append(msg)
                reply = reply or msg["header"]["msg_type"].endswith("_reply")
                idle = idle or (
                    msg["header"]["msg_type"] == "status"
                    and msg["content"]["execution_state"] == "idle"
                )
        return got

    async def execute(self, code: str, timeout: float = 30) -> tuple[str, dict[str, Any]]:
        """(stdout text, execute_reply content)."""
        msgs = await self.reply_and_idle(
            await self.send(
                "execute_request", {"code": code, "silent": False, "allow_stdin": False}
            ),
            timeout,
        )
        out = "".join(m["content"]["text"] for m in msgs if m["header"]["msg_type"] == "stream")
        reply = next(m["content"] for m in msgs if m["header"]["msg_type"] == "execute_reply")
        return out, reply

    async def close(self) -> None:
        await self.ws.close()


async def start_kernel(gw: Any, name: str = "python3", **body: Any) -> dict[str, Any]:
    status, model = await api(gw, "POST", "api/kernels", {"name": name, **body})
    assert status == 201, model
    assert isinstance(model, dict), model
    return model


async def input_first(gw: Any, kernel_id: str, *, v1: bool = False, timeout: float = 10) -> None:
    """Open a fresh socket, send a cell calling input() as its first message, answer the
    input_request, check the output (tests/test_stdin.py says why this can fail)."""
    ks = await KernelSocket.open(gw, kernel_id, v1=v1)
    try:
        msg_id = await ks.send(
            "execute_request",
            {"code": "print('got', input('name? '))", "silent": False, "allow_stdin": True},
        )
        got = await ks.until(lambda m: m["header"]["msg_type"] == "input_request", timeout)
        assert got[-1]["channel"] == "stdin" and got[-1]["content"]["prompt"] == "name? "
        await ks.send("input_reply", {"value": "ada"}, channel="stdin")
        msgs = await ks.reply_and_idle(msg_id)
        # a kernel may split one print into several stream messages (its flush timer)
        out = "".join(m["content"]["text"] for m in msgs if m["header"]["msg_type"] == "stream")
        assert out == "got ada\n", msgs
    finally:
        await ks.close()
