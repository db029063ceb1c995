"""Speed of remote-kernel-gateway next to a direct connection and Jupyter Kernel Gateway.

One invocation runs the same workloads, on this machine with local python3 ipykernel kernels,
against up to four targets side by side and prints medians and ratios:

  direct       jupyter_client's AsyncKernelManager and client over ZMQ, no gateway: the baseline
  ours         `python -m gateway serve`  (this repository)
  jkg          `jupyter kernelgateway` 3 with its defaults (IOPub rate limit of jupyter_server on)
  jkg-nolimit  the same with `--ZMQChannelsWebsocketConnection.limit_rate=False`; run for the
               throughput workload only, where the rate limit matters
  ours-pool    ours with `--pool python3=1` (ours-docker-pool: ours-docker's, with its
               kernelspec's pool): the start workload only, each start from a full pool,
               then as many unpooled starts on the same gateway

Gateway targets are driven by a plain `websockets` client (library defaults, no socket options;
only max_size is lifted so that a 20 MB message can arrive), over both websocket protocols:
legacy JSON text frames and `v1.kernel.websocket.jupyter.org` binary frames. Throughput is
measured with two more clients, because for a 50 MB message the client library costs as much
as the gateway's hop: `aiohttp` (its defaults; frames parsed in C) and Node's `ws` (what
Hydrogen and @jupyterlab/services run; bench/nodeclient.js, needs `./dev test` to have
installed tests/js/node_modules).

Workloads (--only, comma-separated):
  start       POST /api/kernels -> websocket -> kernel_info_reply; median of N after one
              uncounted warm-up start
  roundtrip   N sequential `pass` executes: execute_request -> execute_reply and iopub idle
  throughput  50 MB printed to stdout, then one 20 MB display_data: MB/s, share delivered
  concurrent  20 kernels started at once: first POST to the last kernel_info_reply; median
              of 3 rounds
  rss         the gateway process's RSS: idle, and with the 20 kernels of `concurrent` running

    .venv/bin/python bench/bench.py                   # everything, 3-5 minutes on 2 cores
    .venv/bin/python bench/bench.py --quick           # smoke run, < 2 minutes
    .venv/bin/python bench/bench.py --targets direct,ours --only roundtrip

Traffic goes to 127.0.0.1 only, on free ports chosen at run time. Every kernel and server the
run starts is stopped at the end, whatever happens (see `Reaper`). Results: a table on stdout
and bench/results/<time>.json. See bench/README.md for how to read them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import queue
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from dockerloop import KERNEL_NAME as DOCKER_KERNEL_NAME
from dockerloop import LocalDockerd
from sshloop import KERNEL_NAME, LoopbackSSH

ROOT = Path(__file__).resolve().parent.parent
# The gateway process and the client's wire format are the test suite's (tests/conftest.py,
# tests/gwclient.py): one client-side copy of the protocol, kept apart from gateway/'s codec.
sys.path.insert(0, str(ROOT / "tests"))
from conftest import GatewayProcess, free_port  # noqa: E402
from gwclient import V1, encode, legacy_decode, message, v1_decode  # noqa: E402

MB = 1_000_000
STALL_MS = 35.0  # a round trip this slow on loopback is a delayed-ACK stall (Linux: 40 ms)
TINY = "pass"
MARK = "RKG_BENCH_RUN"  # in the environment of every process this run starts, kernels included


def print_code(mb: int) -> str:
    return f"import sys\nfor _ in range({mb}):\n    sys.stdout.write('x' * 999_999 + '\\n')\n"


def display_code(mb: int) -> str:
    return (
        "from IPython.display import display\n"
        f"display({{'text/plain': 'y' * {mb * MB}}}, raw=True)\n"
    )


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- cleaning up -----------------------------------------------------------------------------


class Reaper:
    """Finds every process this run started, by a mark in its environment.

    Kernels run in sessions of their own (jupyter_client starts them with start_new_session),
    so killing a gateway's process group would not reach them; but they inherit the gateway's
    environment, and the gateway inherits ours."""

    def __init__(self) -> None:
        self.tag = f"{MARK}={uuid.uuid4().hex}".encode()
        os.environ[MARK] = self.tag.decode().split("=", 1)[1]

    def pids(self, exclude: set[int] | None = None) -> list[int]:
        exclude = (exclude or set()) | {os.getpid()}
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) in exclude:
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if self.tag in f.read().split(b"\0"):
                        found.append(int(entry))
            except OSError:  # gone, or a zombie
                pass
        return found

    async def settle(self, exclude: set[int], seconds: float) -> list[int]:
        """The marked processes still alive after waiting up to `seconds` for them to go."""
        deadline = time.monotonic() + seconds
        while (left := self.pids(exclude)) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        return left

    def kill_all(self) -> list[int]:
        left = self.pids()
        for pid in left:
            with contextlib.suppress(OSError):
                os.killpg(os.getpgid(pid), signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        return left


# -- HTTP ------------------------------------------------------------------------------------


async def http(
    server: Server, method: str, path: str, body: Any = None, timeout: float = 120
) -> tuple[int, Any]:
    from tornado.httpclient import AsyncHTTPClient, HTTPRequest

    data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
    req = HTTPRequest(
        server.url + path,
        method=method,
        body=data,
        headers={"Authorization": f"token {server.token}"},
        request_timeout=timeout,
        connect_timeout=10,
    )
    resp = await AsyncHTTPClient().fetch(req, raise_error=False)
    if resp.code == 599 and resp.error:
        raise OSError(str(resp.error))
    try:
        payload = json.loads(resp.body) if resp.body else None
    except ValueError:
        payload = resp.body[:300]
    return resp.code, payload


# -- targets ---------------------------------------------------------------------------------


class Server:
    """A gateway process: ours or JKG."""

    def __init__(self, name: str, tmp: Path) -> None:
        self.name = name
        self.port, self.token = free_port(), secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}/"
        self.ws_url = f"ws://127.0.0.1:{self.port}/"
        self.kernel_name = "python3"
        self.ssh: LoopbackSSH | None = None
        self.dockerd: LocalDockerd | None = None
        self.extensions = "?"  # what the server negotiated with the client's default offer
        self.log_path = tmp / f"{name}-{self.port}.log"
        self.gateway: GatewayProcess | None = None  # ours: the test suite's gateway process
        self._proc: subprocess.Popen[bytes] | None = None  # JKG
        self.pooled = name.endswith("-pool")  # starts are taken from a warm pool
        if name in ("ours", "ours-ssh", "ours-docker", "ours-pool", "ours-docker-pool"):
            # no --max-kernels (default 500): scale.py holds up to 1,000
            args = ["--log-level", "WARNING", "--max-kernels", "0"]
            if name == "ours-ssh":  # the same gateway, kernels over SSH to a loopback sshd
                self.ssh = LoopbackSSH(tmp)
                specs = tmp / "ssh-kernelspecs"
                self.ssh.write_kernelspec(specs)
                args += ["--kernelspec-dir", str(specs)]
                self.kernel_name = KERNEL_NAME
            if name.startswith("ours-docker"):  # the same gateway, kernels in containers
                home = tmp / name  # ours-docker and ours-docker-pool run one after the other
                home.mkdir()
                self.dockerd = LocalDockerd(home)
                specs = home / "docker-kernelspecs"
                self.dockerd.write_kernelspec(specs)
                args += ["--kernelspec-dir", str(specs)]
                self.kernel_name = DOCKER_KERNEL_NAME
            if self.pooled:  # FRESH in a start's env makes it an unpooled one (README)
                args += ["--pool", f"{self.kernel_name}=1", "--env-allow", FRESH]
            # started by wait_ready, as tests/conftest.py starts it (its --kernelspec-dir of
            # test kernels is searched too; they are not used here)
            self.gateway = GatewayProcess(
                port=self.port, token=self.token, extra_args=args, workdir=tmp
            )
        else:
            jkg = shutil.which("jupyter-kernelgateway", path=str(Path(sys.executable).parent))
            if not jkg:
                raise RuntimeError(
                    "jupyter-kernelgateway not found beside this python: "
                    "pip install jupyter_kernel_gateway (or -e .[bench])"
                )
            # list_kernels lives on the websocket personality: KernelGatewayApp.list_kernels is
            # not a trait of JKG 3.0.1 (GET /api/kernels stays 403 with it).
            args = [
                jkg,
                "--KernelGatewayApp.ip=127.0.0.1",
                f"--KernelGatewayApp.port={self.port}",
                f"--KernelGatewayApp.auth_token={self.token}",
                "--JupyterWebsocketPersonality.list_kernels=True",
                "--KernelGatewayApp.log_level=WARN",
            ]
            if name == "jkg-nolimit":
                # jupyter_server 2.x: the limit is a trait of the websocket connection class
                # (ServerApp.iopub_data_rate_limit of jupyter_server 1 no longer exists).
                # limit_rate=False turns off both the data and the message rate limit.
                args.append("--ZMQChannelsWebsocketConnection.limit_rate=False")
            with open(self.log_path, "wb") as log_file:
                self._proc = subprocess.Popen(
                    args,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    cwd=tmp,
                    env={**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp / f"runtime-{self.port}")},
                    start_new_session=True,
                )

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        proc = self.gateway.proc if self.gateway else self._proc
        assert proc is not None, f"{self.name} was not started"
        return proc

    async def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        if self.gateway:  # returns once GET /api answers (no token needed for that)
            await asyncio.to_thread(self.gateway.start, timeout)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                code, _ = await http(self, "GET", "api/kernels", timeout=5)
                if code == 200:
                    return
                raise RuntimeError(f"{self.name}: GET /api/kernels answered {code}")
            except OSError:
                await asyncio.sleep(0.1)
        raise RuntimeError(f"{self.name} did not come up; log tail:\n{self.log_tail()}")

    def log_tail(self, n: int = 20) -> str:
        path = self.gateway.log_path if self.gateway else self.log_path
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path else ""
        except OSError:
            return ""

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return kb / 1024

    async def stop(self) -> None:
        if self.gateway and self.gateway.proc is None:  # never started
            self._stop_infra()
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 30
            while self.proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self._stop_infra()

    def _stop_infra(self) -> None:
        if self.ssh:
            self.ssh.stop()
        if self.dockerd:
            self.dockerd.stop()


class Result:
    __slots__ = ("display", "reply_status", "stdout")

    def __init__(self) -> None:
        self.stdout = self.display = 0
        self.reply_status = ""


class DirectKernel:
    """jupyter_client straight to the kernel's ZMQ sockets."""

    def __init__(self, km: Any, kc: Any) -> None:
        self.km, self.kc = km, kc

    @classmethod
    async def start(cls) -> tuple[DirectKernel, float]:
        from jupyter_client.manager import AsyncKernelManager

        t0 = time.perf_counter()
        km = AsyncKernelManager(kernel_name="python3")
        await km.start_kernel(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self = cls(km, km.client())
        try:
            self.kc.start_channels()
            msg_id = self.kc.kernel_info()
            while (await self.kc.get_shell_msg(timeout=60))["parent_header"].get(
                "msg_id"
            ) != msg_id:
                pass
            elapsed = time.perf_counter() - t0
            await self.iopub_ready(msg_id)
        except BaseException:
            await self.stop()
            raise
        return self, elapsed

    async def iopub_ready(self, msg_id: str) -> None:
        """Outside the clock: iopub subscribed (its status for our request seen), so that no
        output of the first execute is lost, as wait_for_ready does."""
        for _ in range(30):
            with contextlib.suppress(queue.Empty, TimeoutError, asyncio.TimeoutError):
                while True:
                    m = await self.kc.get_iopub_msg(timeout=1)
                    if m["parent_header"].get("msg_id") == msg_id:
                        return
            msg_id = self.kc.kernel_info()
        raise RuntimeError("direct: no iopub status for kernel_info")

    async def execute(self, code: str) -> Result:
        res = Result()
        msg_id = self.kc.execute(code, allow_stdin=False)
        while True:  # iopub until idle, then the reply (already queued by ZMQ)
            m = await self.kc.get_iopub_msg(timeout=600)
            if m["parent_header"].get("msg_id") != msg_id:
                continue
            t = m["header"]["msg_type"]
            if t == "stream" and m["content"]["name"] == "stdout":
                res.stdout += len(m["content"]["text"])
            elif t == "display_data":
                res.display += len(m["content"]["data"].get("text/plain", ""))
            elif t == "status" and m["content"]["execution_state"] == "idle":
                break
        while True:
            m = await self.kc.get_shell_msg(timeout=600)
            if m["parent_header"].get("msg_id") == msg_id:
                res.reply_status = m["content"]["status"]
                return res

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.kc.stop_channels()
        await self.km.shutdown_kernel(now=True)


class WsClient:
    """The client end of one kernel websocket, in one of two client libraries, each with its
    defaults (only the message size limit lifted, so that a 20 MB message can arrive):

      websockets  pure Python frame parsing; offers permessage-deflate (unless --no-deflate).
                  The plain client of every figure without a client in its name.
      aiohttp     frames parsed by its C reader; offers no compression. Used for throughput
                  too: with it the client library's own cost is small, so what is left of the
                  gap to direct is the gateway's.
    """

    def __init__(
        self, kind: str, ws: Any, session: Any, subprotocol: str | None, extensions: str
    ) -> None:
        self.kind, self.ws, self.session = kind, ws, session
        self.subprotocol, self.extensions = subprotocol, extensions

    @classmethod
    async def connect(cls, kind: str, url: str, token: str, v1: bool, deflate: bool) -> WsClient:
        headers = {"Authorization": f"token {token}"}
        if kind == "aiohttp":
            import aiohttp

            session = aiohttp.ClientSession()
            try:
                aws = await session.ws_connect(
                    url,
                    headers=headers,
                    protocols=[V1] if v1 else (),
                    max_msg_size=0,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=10),
                )
            except BaseException:
                await session.close()
                raise
            return cls(
                kind,
                aws,
                session,
                aws.protocol,
                aws._response.headers.get("Sec-WebSocket-Extensions") or "none",
            )
        import websockets
        from websockets.typing import Subprotocol

        ws = await websockets.connect(
            url,
            additional_headers=headers,
            subprotocols=[Subprotocol(V1)] if v1 else None,
            max_size=None,
            open_timeout=60,
            compression="deflate" if deflate else None,  # "deflate" is websockets' default
        )
        assert ws.response is not None  # set once the handshake is done
        return cls(
            kind,
            ws,
            None,
            ws.subprotocol,
            ws.response.headers.get("Sec-WebSocket-Extensions") or "none",
        )

    async def send(self, data: str | bytes) -> None:
        if self.kind == "websockets":
            await self.ws.send(data)
        elif isinstance(data, str):
            await self.ws.send_str(data)
        else:
            await self.ws.send_bytes(data)

    async def recv(self) -> str | bytes:
        if self.kind == "websockets":
            return await self.ws.recv()  # type: ignore[no-any-return]
        msg = await self.ws.receive()
        if not isinstance(msg.data, str | bytes):
            raise ConnectionError(f"websocket closed: {msg.type.name} {msg.extra or ''}")
        return msg.data

    def quickack(self) -> None:
        sock = self.ws.transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, "TCP_QUICKACK", 12), 1)

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.ws.close(), 10)
        finally:
            if self.session is not None:
                await self.session.close()


class WsKernel:
    """One kernel of a gateway, through one websocket (see WsClient)."""

    def __init__(self, server: Server, kernel_id: str, ws: WsClient, v1: bool) -> None:
        self.server, self.id, self.ws, self.v1 = server, kernel_id, ws, v1
        self.session = uuid.uuid4().hex
        self.quickack = False  # diagnostic only: TCP_QUICKACK after every read

    @classmethod
    async def start(
        cls,
        server: Server,
        v1: bool,
        deflate: bool = True,
        client: str = "websockets",
        env: dict[str, str] | None = None,
    ) -> tuple[WsKernel, float, float]:
        """(kernel, POST->201 seconds, POST->kernel_info_reply seconds)"""
        body: dict[str, Any] = {"name": server.kernel_name, **({"env": env} if env else {})}
        t0 = time.perf_counter()
        code, model = await http(server, "POST", "api/kernels", body)
        t_post = time.perf_counter() - t0
        if code != 201 or not isinstance(model, dict) or "id" not in model:
            raise RuntimeError(f"{server.name}: POST /api/kernels -> {code} {model!r}")
        self = None
        try:
            ws = await WsClient.connect(
                client,
                f"{server.ws_url}api/kernels/{model['id']}/channels?session_id={uuid.uuid4().hex}",
                server.token,
                v1,
                deflate,
            )
            self = cls(server, model["id"], ws, v1)
            if client == "websockets":
                server.extensions = ws.extensions
            if (ws.subprotocol == V1) != v1:
                raise RuntimeError(
                    f"{server.name}: asked for {'v1' if v1 else 'legacy'}, "
                    f"server chose subprotocol {ws.subprotocol!r}"
                )
            msg_id = await self.send("kernel_info_request", {})
            status_seen = False
            async with asyncio.timeout(60):
                while True:
                    m = await self.recv()
                    if m["parent_header"].get("msg_id") != msg_id:
                        continue
                    if m["header"]["msg_type"] == "status":
                        status_seen = True
                    elif m["header"]["msg_type"] == "kernel_info_reply":
                        break
            elapsed = time.perf_counter() - t0
            if not status_seen:
                await self.iopub_ready(msg_id)
        except BaseException:
            if self is not None:
                await self.stop()
            else:
                with contextlib.suppress(Exception):
                    await http(server, "DELETE", f"api/kernels/{model['id']}")
            raise
        return self, t_post, elapsed

    async def iopub_ready(self, msg_id: str) -> None:
        """Outside the clock: a client needs iopub status for its kernel_info too."""
        with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
            async with asyncio.timeout(10):
                while True:
                    m = await self.recv()
                    if (
                        m["parent_header"].get("msg_id") == msg_id
                        and m["header"]["msg_type"] == "status"
                    ):
                        return
        raise RuntimeError(
            f"{self.server.name}: kernel_info_reply came, but no iopub status "
            "with that parent within 10 s"
        )

    async def send(self, msg_type: str, content: dict[str, Any]) -> str:
        msg = message(self.session, msg_type, content, username="bench")
        await self.ws.send(encode(msg, self.v1))
        return str(msg["header"]["msg_id"])

    async def recv(self) -> dict[str, Any]:
        """The next message, decoded as a client would: parts are views of the frame, each
        decoded from UTF-8 straight into the text json.loads reads (no copy of the bytes;
        gwclient's decoders do so when given a memoryview)."""
        frame = await self.ws.recv()
        if self.quickack:
            self.ws.quickack()
        if isinstance(frame, str):
            return legacy_decode(frame)
        view = memoryview(frame)
        # a legacy binary frame is a message with buffers
        return v1_decode(view) if self.v1 else legacy_decode(view)

    async def execute(self, code: str) -> Result:
        res = Result()
        msg_id = await self.send(
            "execute_request",
            {
                "code": code,
                "silent": False,
                "store_history": True,
                "user_expressions": {},
                "allow_stdin": False,
                "stop_on_error": True,
            },
        )
        idle = False
        while not (idle and res.reply_status):
            m = await self.recv()
            if m["parent_header"].get("msg_id") != msg_id:
                continue
            t = m["header"]["msg_type"]
            if t == "stream" and m["content"]["name"] == "stdout":
                res.stdout += len(m["content"]["text"])
            elif t == "display_data":
                res.display += len(m["content"]["data"].get("text/plain", ""))
            elif t == "execute_reply":
                res.reply_status = m["content"]["status"]
            elif t == "status" and m["content"]["execution_state"] == "idle":
                idle = True
        return res

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close()
        code, body = await http(self.server, "DELETE", f"api/kernels/{self.id}")
        if code not in (204, 404):
            raise RuntimeError(f"{self.server.name}: DELETE kernel -> {code} {body!r}")


class Target:
    """Starts kernels the way one target does; protocol 'zmq' (direct), 'legacy' or 'v1'."""

    def __init__(self, name: str, server: Server | None, deflate: bool) -> None:
        self.name, self.server, self.deflate = name, server, deflate
        self.protocols = ["zmq"] if server is None else ["legacy", "v1"]
        self.clients = ["zmq"] if server is None else ["websockets", "aiohttp", "node"]

    async def start(self, protocol: str, client: str = "websockets") -> tuple[Any, float, float]:
        if self.server is None:
            k, elapsed = await DirectKernel.start()
            return k, float("nan"), elapsed
        return await WsKernel.start(self.server, protocol == "v1", self.deflate, client)


# -- workloads -------------------------------------------------------------------------------


async def w_start(t: Target, a: argparse.Namespace, out: dict[str, Any]) -> None:
    if t.server and t.server.pooled:
        await w_start_pooled(t.server, a, out)
        return
    proto = t.protocols[-1]
    k, _, _ = await t.start(proto)  # warm-up, not counted: first imports, caches, and
    await k.stop()  # for a gateway its first kernelspec lookup
    total, post = [], []
    for _ in range(a.starts):
        k, p, e = await t.start(proto)
        total.append(e)
        post.append(p)
        await k.stop()
    out["start_s"] = statistics.median(total)
    out["start_runs_s"] = total
    if t.server:
        out["start_post_s"] = statistics.median(post)


FRESH = "RKG_BENCH_FRESH"  # allow-listed by the pool targets' gateway: a start it is in is
# one the pool does not serve


async def pool_full(server: Server, timeout: float = 120) -> None:
    """Until the server's pool is full and launching nothing (its /api/status)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code, body = await http(server, "GET", "api/status", timeout=10)
        pools = body.get("pools", []) if code == 200 and isinstance(body, dict) else []
        if any(p["ready"] >= p["size"] and not p["launching"] for p in pools):
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{server.name}: its pool was not full within {timeout:g} s")


async def w_start_pooled(server: Server, a: argparse.Namespace, out: dict[str, Any]) -> None:
    """The start workload from a warm pool: before each start (warm-up included) the pool is
    full again and has been for 0.5 s, outside the clock, so no refill runs during a start
    (a pool's kernels usually wait much longer). Then the same count of unpooled starts on
    the same gateway, with its pool full: the pool's cost to a start it cannot serve."""
    for fresh in (False, True):
        env = {FRESH: "1"} if fresh else None
        total, post = [], []
        for i in range(a.starts + 1):  # the first: warm-up, not counted
            await pool_full(server)
            await asyncio.sleep(0.5)
            k, p, e = await WsKernel.start(server, True, a.deflate, env=env)
            await k.stop()
            if i:
                total.append(e)
                post.append(p)
        key = "start_unpooled" if fresh else "start"
        out[f"{key}_s"] = statistics.median(total)
        out[f"{key}_runs_s"] = total
        out[f"{key}_post_s"] = statistics.median(post)


async def w_roundtrip(t: Target, a: argparse.Namespace, out: dict[str, Any]) -> None:
    for proto in t.protocols:
        k, _, _ = await t.start(proto)
        try:
            for _ in range(20):  # warm up
                await k.execute(TINY)
            times = []
            for _ in range(a.executes):
                t0 = time.perf_counter()
                r = await k.execute(TINY)
                times.append((time.perf_counter() - t0) * 1000)
                if r.reply_status != "ok":
                    raise RuntimeError(f"execute_reply status {r.reply_status!r}")
            add_roundtrip(out, proto, times)
            if isinstance(k, WsKernel) and proto == "legacy" and a.diag:
                # Diagnostic (not a plain client): TCP_QUICKACK after every read. If this removes
                # ~40 ms stalls, they came from the client's delayed ACK meeting the server's
                # Nagle algorithm (a server socket without TCP_NODELAY).
                k.quickack = True
                times = []
                for _ in range(min(a.executes, 200)):
                    t0 = time.perf_counter()
                    await k.execute(TINY)
                    times.append((time.perf_counter() - t0) * 1000)
                out["roundtrip_quickack_legacy_ms"] = statistics.median(times)
        finally:
            await k.stop()


def add_roundtrip(out: dict[str, Any], proto: str, times: list[float]) -> None:
    s = sorted(times)
    for p in [proto] if proto != "zmq" else ["legacy", "v1"]:
        out[f"roundtrip_{p}_ms"] = statistics.median(s)
        out[f"roundtrip_{p}_p90_ms"] = s[int(0.9 * len(s))]
        out[f"roundtrip_{p}_stalled"] = sum(x >= STALL_MS for x in s) / len(s)
    if proto == "zmq":
        out["roundtrip_runs"] = len(s)


THROUGHPUT_CLIENTS = {"zmq": "", "websockets": "", "aiohttp": "_aiohttp", "node": "_node"}
NODE_CLIENT = ROOT / "bench" / "nodeclient.js"
NODE_WS = ROOT / "tests" / "js" / "node_modules" / "ws"


async def w_throughput(t: Target, a: argparse.Namespace, out: dict[str, Any]) -> None:
    """Each figure is the median of --repeats runs on one kernel; `delivered` is the worst
    run's share. Direct's one ZMQ figure stands in for every protocol and client."""
    workloads = (
        ("print", print_code(a.print_mb), a.print_mb * MB),
        ("display", display_code(a.display_mb), a.display_mb * MB),
    )
    for proto in t.protocols:
        for client in t.clients:
            if client == "node":
                if not (shutil.which("node") and NODE_WS.is_dir()):
                    out.setdefault("notes", []).append(
                        "node client skipped: node or tests/js/node_modules/ws missing "
                        "(./dev test installs it)"
                    )
                    continue
                for kind, code, expect in workloads:
                    runs = await node_runs(t, proto, code, a.repeats)
                    record(
                        out,
                        t,
                        kind,
                        proto,
                        client,
                        expect,
                        [
                            (r["stdout"] if kind == "print" else r["display"], r["seconds"])
                            for r in runs
                        ],
                    )
                continue
            k, _, _ = await t.start(proto, client)
            try:
                for kind, code, expect in workloads:
                    timed: list[tuple[int, float]] = []
                    for _ in range(a.repeats):
                        t0 = time.perf_counter()
                        r = await k.execute(code)
                        timed.append(
                            (r.stdout if kind == "print" else r.display, time.perf_counter() - t0)
                        )
                    record(out, t, kind, proto, client, expect, timed)
                if t.server and client == "websockets":
                    out[f"rss_after_throughput_{proto}_MB"] = t.server.rss_mb()
            finally:
                await k.stop()


def record(
    out: dict[str, Any],
    t: Target,
    kind: str,
    proto: str,
    client: str,
    expect: int,
    runs: list[tuple[int, float]],
) -> None:
    """runs: (characters received, seconds) per run."""
    rates = [got / MB / s for got, s in runs]
    for p in [proto] if proto != "zmq" else ["legacy", "v1"]:
        for c in [client] if client != "zmq" else list(THROUGHPUT_CLIENTS):
            key = f"{kind}_{p}{THROUGHPUT_CLIENTS[c]}"
            out[f"{key}_MBps"] = statistics.median(rates)
            out[f"{key}_MBps_runs"] = rates
            out[f"{key}_delivered"] = min(got for got, _ in runs) / expect
            out[f"{key}_s"] = statistics.median(s for _, s in runs)


async def node_runs(t: Target, proto: str, code: str, repeats: int) -> list[dict[str, Any]]:
    """bench/nodeclient.js on a kernel of its own."""
    server = t.server
    assert server is not None
    status, model = await http(server, "POST", "api/kernels", {"name": server.kernel_name})
    if status != 201 or not isinstance(model, dict) or "id" not in model:
        raise RuntimeError(f"{server.name}: POST /api/kernels -> {status} {model!r}")
    try:
        proc = await asyncio.create_subprocess_exec(
            "node",
            str(NODE_CLIENT),
            f"{server.ws_url}api/kernels/{model['id']}/channels?session_id={uuid.uuid4().hex}",
            server.token,
            proto,
            str(repeats),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            stdout, stderr = await proc.communicate(code.encode())
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        if proc.returncode != 0:
            raise RuntimeError(f"node client exited {proc.returncode}: {stderr.decode()[-500:]}")
        return json.loads(stdout)  # type: ignore[no-any-return]
    finally:
        await http(server, "DELETE", f"api/kernels/{model['id']}")


async def w_concurrent(t: Target, a: argparse.Namespace, out: dict[str, Any]) -> None:
    """--rounds rounds of N starts at once; the median round's wall time (one round alone
    moved by 10% between runs on 2 cores)."""
    walls, slowest = [], []
    for _ in range(a.rounds):
        wall, slow = await concurrent_round(t, a, out)
        walls.append(wall)
        slowest.append(slow)
    out[f"concurrent{a.concurrent}_s"] = statistics.median(walls)
    out[f"concurrent{a.concurrent}_runs_s"] = walls
    out[f"concurrent{a.concurrent}_slowest_start_s"] = statistics.median(slowest)


async def concurrent_round(
    t: Target, a: argparse.Namespace, out: dict[str, Any]
) -> tuple[float, float]:
    proto = t.protocols[-1]
    t0 = time.perf_counter()
    results = await asyncio.gather(
        *(t.start(proto) for _ in range(a.concurrent)), return_exceptions=True
    )
    wall = time.perf_counter() - t0
    started = [r for r in results if not isinstance(r, BaseException)]
    kernels = [r[0] for r in started]
    errors = [r for r in results if isinstance(r, BaseException)]
    try:
        if t.server:
            out[f"rss_{a.concurrent}k_MB"] = t.server.rss_mb()
        if errors:
            raise RuntimeError(
                f"{len(errors)} of {a.concurrent} starts failed; first: "
                f"{type(errors[0]).__name__}: {errors[0]}"
            )
        return wall, max(r[2] for r in started)
    finally:
        stops = await asyncio.gather(*(k.stop() for k in kernels), return_exceptions=True)
        bad = [s for s in stops if isinstance(s, BaseException)]
        if bad:
            out.setdefault("problems", []).append(
                f"concurrent: {len(bad)} stops failed: {bad[0]!r}"
            )


WORKLOADS: dict[str, tuple[Callable[..., Awaitable[None]], Callable[[Any], float]]] = {
    # name: (function, timeout in seconds given the arguments)
    "start": (w_start, lambda a: 90 * a.starts),
    "roundtrip": (w_roundtrip, lambda a: 180 + 0.3 * a.executes),
    "throughput": (w_throughput, lambda a: 600),
    "concurrent": (w_concurrent, lambda a: a.rounds * (120 + 10 * a.concurrent)),
}


async def bench_target(
    name: str, a: argparse.Namespace, tmp: Path, reaper: Reaper
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    wanted = a.only
    if name == "jkg-nolimit" and not a.only_given:
        wanted = ["throughput"]  # the rate limit changes nothing else
    if name == "direct":
        wanted = [w for w in wanted if w != "rss"]
    if name.endswith("-pool"):
        wanted = [w for w in wanted if w == "start"]  # the other workloads would take pooled
    server = None
    try:
        if name != "direct":
            server = Server(name, tmp)
            await server.wait_ready()
            await asyncio.sleep(1)
            out["rss_idle_MB"] = server.rss_mb()
        target = Target(name, server, a.deflate)
        ran_concurrent = False
        for w in wanted:
            if w == "rss":
                if ran_concurrent:
                    continue
                w = "concurrent"
            if w == "concurrent":
                ran_concurrent = True
            fn, limit = WORKLOADS[w]
            log(f"  {name}: {w} ...")
            t0 = time.perf_counter()
            try:
                await asyncio.wait_for(fn(target, a, out), limit(a))
            except Exception as e:
                kind = (
                    "timed out"
                    if isinstance(e, TimeoutError | asyncio.TimeoutError)
                    else f"{type(e).__name__}: {e}"
                )
                msg = f"{w} failed after {time.perf_counter() - t0:.1f} s: {kind}"
                log(f"  {name}: {msg}")
                if a.verbose:
                    traceback.print_exc()
                out.setdefault("problems", []).append(msg)
            if server and server.proc.poll() is not None:
                out.setdefault("problems", []).append(
                    f"server exited with {server.proc.returncode} during {w}"
                )
                break
        if server:
            out["ws_extensions"] = server.extensions
        if server and server.proc.poll() is None:
            out["rss_end_MB"] = server.rss_mb()
            exclude = {server.proc.pid}
            # a pool's kernel runs until its gateway stops (checked below, after the stop)
            left = [] if server.pooled else await reaper.settle(exclude, 10)
            if left:
                out.setdefault("problems", []).append(
                    f"{len(left)} kernel process(es) still running after every kernel was "
                    f"deleted: pids {left}"
                )
    finally:
        if server:
            await server.stop()
            left = await reaper.settle(set(), 10)
            if left:
                out.setdefault("problems", []).append(
                    f"{len(left)} process(es) left after SIGTERM to the server (killed)"
                )
            reaper.kill_all()
            if out.get("problems"):
                out["server_log_tail"] = server.log_tail(40)
    return out


# -- report ----------------------------------------------------------------------------------

ROWS: list[tuple[str, str, str]] = [
    # (metric key, label, format); {p} is the websocket protocol
    ("start_s", "start: POST..kernel_info_reply s", ".3f"),
    ("start_post_s", "  of which POST -> 201 s", ".3f"),
    ("start_unpooled_s", "  unpooled, same gateway s", ".3f"),
    ("roundtrip_{p}_ms", "roundtrip {p} median ms", ".2f"),
    ("roundtrip_{p}_p90_ms", "roundtrip {p} p90 ms", ".2f"),
    ("roundtrip_{p}_stalled", "roundtrip {p} share >=35ms", ".2f"),
    ("roundtrip_quickack_legacy_ms", "diag: legacy+TCP_QUICKACK ms", ".2f"),
    ("print_{p}_MBps", "print {p} MB/s", ".1f"),
    ("print_{p}_delivered", "print {p} delivered", ".3f"),
    ("print_{p}_aiohttp_MBps", "print {p} MB/s (aiohttp)", ".1f"),
    ("print_{p}_aiohttp_delivered", "print {p} delivered (aiohttp)", ".3f"),
    ("print_{p}_node_MBps", "print {p} MB/s (node ws)", ".1f"),
    ("print_{p}_node_delivered", "print {p} delivered (node ws)", ".3f"),
    ("display_{p}_MBps", "display {p} MB/s", ".1f"),
    ("display_{p}_delivered", "display {p} delivered", ".3f"),
    ("display_{p}_aiohttp_MBps", "display {p} MB/s (aiohttp)", ".1f"),
    ("display_{p}_aiohttp_delivered", "display {p} delivered (aiohttp)", ".3f"),
    ("display_{p}_node_MBps", "display {p} MB/s (node ws)", ".1f"),
    ("display_{p}_node_delivered", "display {p} delivered (node ws)", ".3f"),
    ("concurrent{n}_s", "{n} concurrent starts: wall s", ".2f"),
    ("concurrent{n}_slowest_start_s", "  slowest single start s", ".2f"),
    ("rss_idle_MB", "gateway RSS idle MB", ".1f"),
    ("rss_{n}k_MB", "gateway RSS, {n} kernels MB", ".1f"),
    ("rss_after_throughput_{p}_MB", "gateway RSS after thrpt {p} MB", ".1f"),
    ("rss_end_MB", "gateway RSS at the end MB", ".1f"),
]
HIGHER_IS_BETTER = ("MBps", "delivered")


# every target, in the table's column order
TARGETS = (
    "direct",
    "ours",
    "ours-pool",
    "ours-ssh",
    "ours-docker",
    "ours-docker-pool",
    "jkg",
    "jkg-nolimit",
)


def table(results: dict[str, dict[str, Any]], n: int) -> str:
    cols: list[str] = [c for c in TARGETS if c in results]
    ratios = [
        ("ours/direct", "ours", "direct"),
        ("jkg/direct", "jkg", "direct"),
        ("ours/jkg", "ours", "jkg"),
        ("ours/jkg-nolim", "ours", "jkg-nolimit"),
        ("ssh/ours", "ours-ssh", "ours"),
        ("docker/ours", "ours-docker", "ours"),
        ("pool/ours", "ours-pool", "ours"),
        ("dpool/docker", "ours-docker-pool", "ours-docker"),
    ]
    ratios = [r for r in ratios if r[1] in results and r[2] in results]
    w = 34
    head = (
        "metric".ljust(w)
        + "".join(c.rjust(max(12, len(c) + 1)) for c in cols)
        + "".join(r[0].rjust(15) for r in ratios)
    )
    lines = [head, "-" * len(head)]
    for key, label, fmt in ROWS:
        for p in ["legacy", "v1"] if "{p}" in key else [""]:
            k = key.format(p=p, n=n)
            vals: dict[str, Any] = {c: results[c].get(k) for c in cols}
            if all(v is None for v in vals.values()):
                continue
            cells = "".join(
                (format(v, fmt) if isinstance(v, float | int) else "-").rjust(max(12, len(c) + 1))
                for c, v in vals.items()
            )
            rcells = ""
            for _, num, den in ratios:
                a: Any = vals.get(num)
                b: Any = vals.get(den)
                ok = isinstance(a, float | int) and isinstance(b, float | int) and b
                rcells += (
                    f"{a / b:.2f}x" if ok and "delivered" not in k and "stalled" not in k else ""
                ).rjust(15)
            lines.append(label.format(p=p, n=n).ljust(w) + cells + rcells)
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    """When, at which commit, on what and with which versions a run was taken."""
    from importlib.metadata import PackageNotFoundError, version

    def v(pkg: str) -> str:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return "-"

    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except OSError:
        commit = "-"
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "commit": commit,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {
            p: v(p)
            for p in (
                "jupyter_client",
                "ipykernel",
                "jupyter_server",
                "jupyter_kernel_gateway",
                "tornado",
                "websockets",
                "aiohttp",
                "pyzmq",
                "remote-kernel-gateway",
            )
        },
    }


def environment(a: argparse.Namespace) -> dict[str, Any]:
    return {
        **machine(),
        "args": {
            k: getattr(a, k)
            for k in (
                "quick",
                "targets",
                "only",
                "starts",
                "executes",
                "print_mb",
                "display_mb",
                "concurrent",
                "repeats",
                "rounds",
                "deflate",
                "diag",
            )
        },
    }


async def run(a: argparse.Namespace, reaper: Reaper) -> dict[str, Any]:
    from tornado.httpclient import AsyncHTTPClient

    AsyncHTTPClient.configure(None, max_clients=max(64, 2 * a.concurrent))
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="rkg-bench-") as tmp:
        os.environ["JUPYTER_RUNTIME_DIR"] = str(Path(tmp) / "runtime-direct")
        for name in a.targets:
            log(f"{name} ...")
            t0 = time.perf_counter()
            results[name] = await bench_target(name, a, Path(tmp), reaper)
            results[name]["bench_seconds"] = round(time.perf_counter() - t0, 1)
    return results


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--quick", action="store_true", help="small counts: a smoke run, < 2 min")
    p.add_argument(
        "--targets",
        default="direct,ours,ours-pool,jkg",
        help="comma-separated: direct, ours, ours-pool, ours-ssh, ours-docker, "
        "ours-docker-pool, jkg (jkg also runs jkg-nolimit), jkg-nolimit (default: %(default)s)",
    )
    p.add_argument(
        "--only",
        default="",
        help="comma-separated workloads: start,roundtrip,throughput,concurrent,rss (default: all)",
    )
    p.add_argument("--starts", type=int, help="start workload runs (5; quick 2)")
    p.add_argument("--executes", type=int, help="roundtrip executes (1000; quick 100)")
    p.add_argument("--print-mb", type=int, help="MB printed (50; quick 10)")
    p.add_argument("--display-mb", type=int, help="MB in one display_data (20; quick 5)")
    p.add_argument("--concurrent", type=int, help="concurrent starts (20; quick 5)")
    p.add_argument("--repeats", type=int, help="throughput runs per figure (3; quick 1)")
    p.add_argument("--rounds", type=int, help="concurrent-start rounds (3; quick 1)")
    p.add_argument(
        "--no-deflate",
        dest="deflate",
        action="store_false",
        help="do not offer permessage-deflate (the websockets default offers it)",
    )
    p.add_argument(
        "--no-diag",
        dest="diag",
        action="store_false",
        help="skip the TCP_QUICKACK round-trip diagnostic",
    )
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("-v", "--verbose", action="store_true", help="tracebacks of failures")
    a = p.parse_args()
    q = a.quick
    for attr, full, quick in (
        ("starts", 5, 2),
        ("executes", 1000, 100),
        ("print_mb", 50, 10),
        ("display_mb", 20, 5),
        ("concurrent", 20, 5),
        ("repeats", 3, 1),
        ("rounds", 3, 1),
    ):
        if getattr(a, attr) is None:
            setattr(a, attr, quick if q else full)
    targets = []
    for t in a.targets.split(","):
        t = t.strip()
        if t not in TARGETS:
            p.error(f"unknown target {t!r}")
        targets += [t, "jkg-nolimit"] if t == "jkg" else [t]
    a.targets = list(dict.fromkeys(targets))
    a.only_given = bool(a.only)
    a.only = [w.strip() for w in a.only.split(",") if w.strip()] or [*WORKLOADS, "rss"]
    for w in a.only:
        if w not in (*WORKLOADS, "rss"):
            p.error(f"unknown workload {w!r}")

    reaper = Reaper()

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    results: dict[str, dict[str, Any]] = {}
    try:
        results = asyncio.run(run(a, reaper))
    except KeyboardInterrupt:
        log("interrupted: stopping everything")
        return 130
    finally:
        killed = reaper.kill_all()
        if killed:
            log(f"killed {len(killed)} leftover process(es): {killed}")

    print()
    print(
        f"remote-kernel-gateway bench: {os.cpu_count()} CPUs, local python3 kernels, "
        f"{'quick' if q else 'full'} run; plain `websockets` client "
        f"({'offers' if a.deflate else 'without'} permessage-deflate); throughput also "
        f"with aiohttp's and Node's ws; {a.repeats} run(s) per throughput figure"
    )
    print(
        f"start: median of {a.starts}; roundtrip: median of {a.executes} `{TINY}` executes; "
        f"print {a.print_mb} MB, display {a.display_mb} MB; {a.concurrent} concurrent starts, "
        f"median of {a.rounds} round(s)"
    )
    print(
        "direct has no websocket: its one ZMQ figure stands in both legacy and v1 rows. "
        "Ratios: <1 faster/smaller for times and sizes; >1 faster for MB/s."
    )
    print()
    print(table(results, a.concurrent))
    notes = dict.fromkeys(m for r in results.values() for m in r.get("notes", []))
    for m in notes:
        print(f"note: {m}")
    problems = [(n, m) for n, r in results.items() for m in r.get("problems", [])]
    if problems:
        print("\nproblems:")
        for n, m in problems:
            print(f"  {n}: {m}")
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / time.strftime("%Y%m%d-%H%M%S.json")
    path.write_text(
        json.dumps({"environment": environment(a), "results": results}, indent=1, default=str)
    )
    print(f"\nwritten to {path}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
