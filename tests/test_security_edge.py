"""The network edge, attacked: --no-auth on an open address, DNS rebinding (a foreign Host),
cross-origin requests to a gateway without a token, bodies sent with a bad token or too big,
slow clients (slow-loris), a client that never reads while its kernel prints, and more
sessions on one kernel than allowed. Each attack is made for real against a gateway process
and must be refused, with the gateway's memory (VmRSS from /proc) bounded where it is the
target."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
import subprocess
import sys
import time

import pytest
import websockets

from conftest import eventually, free_port, serving
from gwclient import KernelSocket, api, message, start_kernel

MB = 1024 * 1024


def rss(gw) -> int:
    """The gateway process's resident memory, in bytes."""
    with open(f"/proc/{gw.proc.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def raw_request(gw, head: str, *, timeout: float = 10) -> tuple[int, dict, bytes]:
    """Send `head` (request line and headers, no body) and read the answer up to EOF or its
    Content-Length: (status, headers, body). The body is never sent: an answer proves the
    gateway decided from the headers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(head.replace("\n", "\r\n").encode() + b"\r\n")
        await writer.drain()
        async with asyncio.timeout(timeout):
            status_line, _, rest = (await reader.readuntil(b"\r\n\r\n")).partition(b"\r\n")
            headers = {}
            for line in rest.decode().split("\r\n"):
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", 0)))
    finally:
        writer.close()
    return int(status_line.split()[1]), headers, body


def refusal(body: bytes) -> dict:
    payload = json.loads(body)
    assert set(payload) == {"reason", "message"}, payload
    return payload


# -- --no-auth on an open address ---------------------------------------------------------


def test_no_auth_on_an_open_address_refuses_to_start(tmp_path):
    args = [sys.executable, "-m", "gateway", "serve", "--no-auth", "--ip", "0.0.0.0"]
    args += ["--port", str(free_port()), "--state-db", ":memory:"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert proc.returncode == 2, proc
    assert "--no-auth" in proc.stderr and "--no-auth-i-know-this-is-open" in proc.stderr
    assert "Traceback" not in proc.stderr


async def test_no_auth_on_an_open_address_with_the_loud_flag(gateway_factory):
    # listens on every address; the test's traffic goes to 127.0.0.1 only
    gw = gateway_factory(token="", extra_args=["--ip", "0.0.0.0", "--no-auth-i-know-this-is-open"])
    assert "ANYONE WHO CAN REACH IT CAN RUN CODE" in gw.log()
    status, _ = await api(gw, "GET", "api/kernels")
    assert status == 200


# -- Host (DNS rebinding) -------------------------------------------------------------------


@pytest.fixture(scope="module")
def hosts_gateway(tmp_path_factory):
    yield from serving(
        tmp_path_factory.mktemp("hosts"),
        *("--allowed-host", "gw.example.org", "--allowed-host", "*.corp.test"),
    )


@pytest.mark.parametrize(
    "host",
    ["evil.example", "evil.example:80", "localhost.evil.example", "corp.test", "EVIL.example."],
)
async def test_foreign_host_refused_on_rest(hosts_gateway, host):
    gw = hosts_gateway
    for path in ("api", "api/kernels"):  # before auth: the health check too
        head = f"GET /{path} HTTP/1.1\nHost: {host}\nAuthorization: token {gw.token}\n"
        status, _, body = await raw_request(gw, head)
        assert status == 403, body
        name = host.lower().rstrip(".").removesuffix(":80")
        assert f"--allowed-host {name}" in refusal(body)["message"]


@pytest.mark.parametrize(
    "host",
    [
        "localhost",
        "LOCALHOST:8888",
        "jupyter.localhost",
        "127.0.0.1:1",
        "[::1]:8888",
        "10.1.2.3",  # IP literals: no DNS, no rebinding
        "gw.example.org",
        "a.corp.test",
        None,
    ],
)
async def test_allowed_hosts(hosts_gateway, host):
    gw = hosts_gateway
    version = "1.1" if host else "1.0"  # HTTP/1.1 requires a Host (Tornado: 400)
    head = f"GET /api/kernels HTTP/{version}\nAuthorization: token {gw.token}\n"
    head += f"Connection: close\nHost: {host}\n" if host else ""
    status, _, body = await raw_request(gw, head)
    assert status == 200, body


def upgrade(gw, kid: str, host: str) -> str:
    """A websocket handshake's request, by hand (a client library sets Host itself)."""
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET /api/kernels/{kid}/channels?session_id=s HTTP/1.1\nHost: {host}\n"
        f"Upgrade: websocket\nConnection: Upgrade\nSec-WebSocket-Key: {key}\n"
        f"Sec-WebSocket-Version: 13\nAuthorization: token {gw.token}\n"
    )


async def test_foreign_host_refused_on_the_websocket(hosts_gateway):
    gw = hosts_gateway
    kid = (await start_kernel(gw))["id"]
    try:
        status, _, body = await raw_request(gw, upgrade(gw, kid, "evil.example"))
        assert status == 403
        assert "--allowed-host evil.example" in refusal(body)["message"]
        status, _, _ = await raw_request(gw, upgrade(gw, kid, "gw.example.org"))
        assert status == 101
    finally:
        await api(gw, "DELETE", f"api/kernels/{kid}")


# -- cross-origin to a gateway without a token ----------------------------------------------


async def test_cross_origin_refused_without_a_token(gateway_factory):
    gw = gateway_factory(token="")
    same = f"http://127.0.0.1:{gw.port}"
    evil = {"Origin": "http://evil.example"}
    for method in ("POST", "PATCH", "PUT", "DELETE"):
        status, body = await api(gw, method, "api/kernels/nope", headers=evil)
        assert status == 403, (method, body)
        assert "http://evil.example" in body["message"] and "--allow-origin" in body["message"]
    status, body = await api(gw, "POST", "api/sessions", {}, headers={"Origin": "null"})
    assert status == 403, body
    # the same origin passes (to the handler: 404, no such kernel); so does a GET (CORS keeps
    # its answer from another origin's page) and a request without Origin (not a browser)
    status, _ = await api(gw, "DELETE", "api/kernels/nope", headers={"Origin": same})
    assert status == 404
    assert (await api(gw, "GET", "api/kernels", headers=evil))[0] == 200
    assert (await api(gw, "DELETE", "api/kernels/nope"))[0] == 404

    kid = (await start_kernel(gw))["id"]
    try:
        url = f"{gw.ws_url}api/kernels/{kid}/channels"
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(url, origin=websockets.Origin("http://evil.example"))
        assert refused.value.response.status_code == 403
        ws = await websockets.connect(url, origin=websockets.Origin(same))
        await ws.close()
    finally:
        await api(gw, "DELETE", f"api/kernels/{kid}")


async def test_allow_origin_lets_that_origin_in(gateway_factory):
    gw = gateway_factory(token="", extra_args=["--allow-origin", "http://lab.example"])
    status, _ = await api(
        gw, "DELETE", "api/kernels/nope", headers={"Origin": "http://lab.example"}
    )
    assert status == 404
    status, _ = await api(gw, "DELETE", "api/kernels/nope", headers={"Origin": "http://x.example"})
    assert status == 403


# -- bodies ---------------------------------------------------------------------------------


async def test_body_with_a_bad_token_is_refused_unread(gateway):
    """50 MB announced (and then sent) with a wrong or no token: answered from the headers,
    the connection closed, and the gateway's memory does not grow by the body."""
    gw = gateway
    await api(gw, "GET", "api/kernels")  # warm
    before = rss(gw)
    for auth, expected in (("Authorization: token wrong\n", 403), ("", 401)):
        head = f"POST /api/kernels HTTP/1.1\nHost: 127.0.0.1\n{auth}Content-Length: {50 * MB}\n"
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(head.replace("\n", "\r\n").encode() + b"\r\n")
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert answer.split()[1] == str(expected).encode(), answer
        sent = 0
        chunk = b"x" * MB
        async with asyncio.timeout(30):  # a gateway that neither reads nor closes: fails
            try:
                while sent < 50 * MB:
                    writer.write(chunk)
                    await writer.drain()
                    sent += len(chunk)
            except ConnectionError:
                pass  # closed by the gateway, as it should be
        writer.close()
        assert sent < 50 * MB, "the gateway read the whole body"
    assert rss(gw) - before < 8 * MB, (before, rss(gw))


async def test_oversized_body_is_a_413_from_the_headers(gateway):
    head = (
        f"POST /api/kernels HTTP/1.1\nHost: 127.0.0.1\nAuthorization: token {gateway.token}\n"
        f"Content-Length: {4 * MB + 1}\n"
    )
    status, _, body = await raw_request(gateway, head)
    assert status == 413
    assert str(4 * MB) in refusal(body)["message"]
    # at the cap: read, and answered by the handler (a body that is not JSON: 400)
    status, body = await api(gateway, "POST", "api/kernels", raw=b"x" * (4 * MB))
    assert status == 400 and body["reason"] == "Bad Request", body


# -- slow clients -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def impatient(tmp_path_factory):
    yield from serving(
        tmp_path_factory.mktemp("impatient"), "--idle-timeout", "2", "--body-timeout", "2"
    )


async def closed_after(reader, writer, drip: bytes, every: float, limit: float) -> float:
    """Send `drip` a byte every `every` seconds; seconds until the gateway closed the
    connection (AssertionError if it is still open after `limit`)."""
    start = time.monotonic()
    eof = asyncio.ensure_future(reader.read())
    try:
        for byte in drip:
            if eof.done() or time.monotonic() - start > limit:
                break
            writer.write(bytes([byte]))
            await asyncio.wait([eof], timeout=every)
        await asyncio.wait([eof], timeout=max(0.0, limit - (time.monotonic() - start)))
        if not eof.done():
            raise AssertionError(f"still open after {limit} s")
        eof.exception()  # EOF or a reset: closed either way
        return time.monotonic() - start
    finally:
        eof.cancel()
        writer.close()


async def test_slow_headers_are_cut_off(impatient):
    reader, writer = await asyncio.open_connection("127.0.0.1", impatient.port)
    head = f"GET /api/kernels HTTP/1.1\r\nAuthorization: token {impatient.token}\r\n" * 5
    took = await closed_after(reader, writer, head.encode(), 0.3, limit=6)
    assert took < 4, took


async def test_slow_body_is_cut_off(impatient):
    reader, writer = await asyncio.open_connection("127.0.0.1", impatient.port)
    writer.write(
        f"POST /api/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: token "
        f"{impatient.token}\r\nContent-Length: 1000\r\n\r\n".encode()
    )
    took = await closed_after(reader, writer, b"{" + b" " * 999, 0.3, limit=6)
    assert took < 4, took


async def test_idle_connection_is_closed(impatient):
    reader, writer = await asyncio.open_connection("127.0.0.1", impatient.port)
    writer.write(b"GET /api HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    await reader.readuntil(b"\r\n\r\n")
    start = time.monotonic()
    await asyncio.wait_for(reader.read(), 6)  # the body, then EOF
    assert time.monotonic() - start < 4
    writer.close()


# -- a client that never reads ------------------------------------------------------------------


async def open_unread_socket(gw, kid: str, session: str):
    """A raw websocket (legacy protocol) that sends but never reads."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port, limit=64 * 1024)
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET /api/kernels/{kid}/channels?session_id={session} HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{gw.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: token {gw.token}\r\n\r\n"
        ).encode()
    )
    answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert answer.startswith(b"HTTP/1.1 101"), answer
    return reader, writer


def masked_text_frame(text: str) -> bytes:
    data = text.encode()
    mask = os.urandom(4)
    header = struct.pack("!BBQ", 0x81, 0x80 | 127, len(data))
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))


async def test_a_client_that_never_reads_is_bounded_by_the_budget(gateway_factory):
    """The kernel prints 400 MB to a socket whose client never reads: the gateway holds at
    most its --memory-budget (32 MB) of it, then cuts that socket off."""
    gw = gateway_factory(extra_args=["--memory-budget", str(32 * MB)])
    kid = (await start_kernel(gw))["id"]
    warm = await KernelSocket.open(gw, kid)
    await warm.execute("s = 'x' * (1 << 20)")
    await warm.close()
    before = rss(gw)
    _, writer = await open_unread_socket(gw, kid, "never-reads")
    code = "for i in range(400): print(s, flush=True)\nprint('done')"
    msg = message("never-reads", "execute_request", {"code": code, "silent": False})
    writer.write(masked_text_frame(json.dumps(msg)))
    await writer.drain()
    peak = before
    deadline = time.monotonic() + 120
    # until the kernel is done printing (its status through a fresh socket) and the gateway
    # let go of that socket
    watcher = await KernelSocket.open(gw, kid)
    try:
        while time.monotonic() < deadline:
            peak = max(peak, rss(gw))
            if "memory budget" in gw.log() and "closing the client socket" in gw.log():
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"not cut off; peak RSS growth {(peak - before) / MB:.0f} MB")
        # the kernel keeps printing into a gateway that keeps its memory
        await watcher.until_status("idle", timeout=120)
        for _ in range(20):
            peak = max(peak, rss(gw))
            await asyncio.sleep(0.05)
    finally:
        writer.close()
        await watcher.close()
        await api(gw, "DELETE", f"api/kernels/{kid}")
    assert peak - before < 32 * MB + 48 * MB, f"RSS grew by {(peak - before) / MB:.0f} MB"


async def test_oldest_replay_dropped_first(gateway_factory):
    """Two sessions away, each holding 20 MB of replay, and a third one's 20 MB being
    written, in a 48 MB budget: the one that left first loses its replay, the other keeps
    it."""
    gw = gateway_factory(extra_args=["--memory-budget", str(48 * MB)])
    kid = (await start_kernel(gw))["id"]
    try:
        for name in ("first", "second"):
            ks = await KernelSocket.open(gw, kid, session=name)
            await ks.close()
            await asyncio.sleep(0.2)
        driver = await KernelSocket.open(gw, kid, session="driver")
        out, _ = await driver.execute("print('y' * (20 << 20)); print('end')", timeout=60)
        assert out.endswith("end\n")
        await driver.close()
        second = await KernelSocket.open(gw, kid, session="second")
        got = await second.until(lambda m: m["content"].get("text", "").endswith("end\n"), 30)
        assert sum(len(m["content"].get("text", "")) for m in got) > 20 * MB
        await second.close()
        first = await KernelSocket.open(gw, kid, session="first")
        msg_id = await first.send("kernel_info_request", {})
        got = await first.until(lambda m: m["parent_header"].get("msg_id") == msg_id, 30)
        assert not [m for m in got if m["header"]["msg_type"] == "stream"]
        await first.close()
    finally:
        await api(gw, "DELETE", f"api/kernels/{kid}")


# -- sessions per kernel --------------------------------------------------------------------------


async def test_sessions_per_kernel_capped(gateway_factory):
    gw = gateway_factory(extra_args=["--max-sessions-per-kernel", "2"])
    kid = (await start_kernel(gw))["id"]
    socks = []
    try:
        socks = [await KernelSocket.open(gw, kid, session=f"s{i}") for i in range(2)]
        with pytest.raises(websockets.InvalidStatus) as refused:
            await KernelSocket.open(gw, kid, session="s2")
        assert refused.value.response.status_code == 429
        payload = refusal(bytes(refused.value.response.body))
        assert "--max-sessions-per-kernel" in payload["message"], payload
        # the same session_id reconnecting is no new session
        again = await KernelSocket.open(gw, kid, session="s1")
        socks.append(again)
        # sessions kept only for a reconnect make room
        for ks in socks:
            await ks.close()
        await eventually(
            lambda: api(gw, "GET", f"api/kernels/{kid}"),
            until=lambda r: r[1]["connections"] == 0,
        )
        socks = [await KernelSocket.open(gw, kid, session=f"t{i}") for i in range(2)]
        # ...by going: s0 coming back is a new session, past the cap
        with pytest.raises(websockets.InvalidStatus) as refused:
            await KernelSocket.open(gw, kid, session="s0")
        assert refused.value.response.status_code == 429
        out, _ = await socks[1].execute("print(6 * 7)")
        assert out == "42\n"
    finally:
        for ks in socks:
            await ks.close()
        await api(gw, "DELETE", f"api/kernels/{kid}")
