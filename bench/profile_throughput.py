"""Where the time of a large print goes: bench.py's `print` throughput run, interleaved and
measured per process, through every client, next to ceilings that have no gateway.

    .venv/bin/python bench/profile_throughput.py                  # 7 rounds, every variant
    .venv/bin/python bench/profile_throughput.py --timeline       # + perf: who ran when
    .venv/bin/python bench/profile_throughput.py --py-spy         # + py-spy / node --cpu-prof

Variants (--variants, comma-separated; default all):
  direct                      jupyter_client over ZMQ to its own kernel (bench.py's baseline)
  ours-<client>-<proto>       through the gateway; client websockets, aiohttp or node,
                              proto legacy or v1 (bench.py's three throughput clients)
  ceil-<client>-<proto>       the same client reading the same frames from a trivial server
                              that writes them ready-made, no kernel: the client's own cost
  ceil-zmq                    jupyter_client reading the same message from a fake kernel
                              that sends it ready-made (signed in advance): the direct
                              client's own cost

Each round runs every variant once, in an order rotated per round, so a busy machine moves all
of them alike. Per run: wall seconds (execute_request to reply + idle, as bench.py), MB/s, CPU
seconds of the kernel, of the server (gateway, or ceiling server) and of the client process
(/proc, every thread), and the share of a CPU the rest of the machine used (/proc/stat). Tables:
all runs with ratios to direct's run of the same round, then the quiet runs only (others under
--quiet of a CPU, kernel CPU time within 10 % of its median).

--timeline records context switches with `perf` (ours and the idle task only) and prints each
process's on-CPU time per 10 ms of each variant's median run, and the phases of a run (kernel
done, the ZMQ receive of the big message, when the client took it up). --py-spy then runs each
variant --spy-runs more times under `py-spy record` (gateway, client and kernel; raw stacks) or,
for node, `node --cpu-prof`, and prints the top frames. --tuned adds a gateway with another
malloc configuration (variants tuned-* or huge-*). --report prints the tables of saved sessions
together. Everything goes to 127.0.0.1; results go to bench/out/throughput/ (gitignored).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

from bench import (
    MB,
    NODE_CLIENT,
    NODE_WS,
    ROOT,
    DirectKernel,
    Reaper,
    Server,
    WsClient,
    WsKernel,
    http,
    log,
    print_code,
)
from gateway.bridge import codec

OUT = ROOT / "bench" / "out" / "throughput"
CLIENTS = ("websockets", "aiohttp", "node")
PROTOS = ("legacy", "v1")
ALL_VARIANTS = [
    "direct",
    *(f"ours-{c}-{p}" for c in CLIENTS for p in PROTOS),
    *(f"ceil-{c}-{p}" for c in CLIENTS for p in PROTOS),
    "ceil-zmq",
]
DELIM = b"<IDS|MSG>"


# -- CPU accounting --------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """CPU seconds of a process, all its threads (ns-exact from schedstat; 0 when gone)."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for task in tasks:
        with (
            contextlib.suppress(OSError),
            open(f"/proc/{pid}/task/{task}/schedstat") as f,
        ):
            total += int(f.read().split()[0])
    return total / 1e9


def children(pid: int) -> set[int]:
    found: set[int] = set()
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with (
                contextlib.suppress(OSError),
                open(f"/proc/{pid}/task/{task}/children") as f,
            ):
                found.update(int(c) for c in f.read().split())
    return found


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (all CPUs, /proc/stat, clock ticks)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


Intervals = list[tuple[float, float]]
# The key of other processes' on-CPU intervals: only a lower bound, as a task that held a
# CPU since before perf started shows only once it stops (other processes' load is taken
# from /proc/stat instead, `others_share`).
OTHERS = -1


def _pid_filter(field: str, ours: set[int]) -> str:
    """A tracepoint filter matching `field` against our threads, consecutive ids as ranges
    (a filter may hold only about 4 KB)."""
    terms, ids = [], sorted(ours)
    while ids:
        lo = hi = ids.pop(0)
        while ids and ids[0] == hi + 1:
            hi = ids.pop(0)
        terms.append(f"{field} == {lo}" if lo == hi else f"({field} >= {lo} && {field} <= {hi})")
    return " || ".join(terms)


class Sched:
    """`perf record` of the context switches that involve our threads or the idle task, and
    of our threads' wakeups, machine-wide; read back as on-CPU intervals per thread and the
    intervals in which our threads were runnable but not running. Times are CLOCK_MONOTONIC,
    as time.monotonic()."""

    def __init__(self, path: Path, ours: set[int]) -> None:
        self.path, self.ours = path, ours
        switch = f"prev_pid == 0 || next_pid == 0 || {_pid_filter('prev_pid', ours)} || " + (
            _pid_filter("next_pid", ours)
        )
        if len(switch) > 4000:
            raise RuntimeError(f"too many threads for a perf filter: {len(ours)}")
        self.proc = subprocess.Popen(
            [
                *(
                    "perf",
                    "record",
                    "-q",
                    "-a",
                    "-m",
                    "1024",
                    "-k",
                    "CLOCK_MONOTONIC",
                    "-o",
                    str(path),
                ),
                *("-e", "sched:sched_switch", "--filter", switch),
                *("-e", "sched:sched_wakeup", "--filter", _pid_filter("pid", ours)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1)  # perf sets up its buffers

    def stop(self) -> tuple[dict[int, Intervals], dict[int, Intervals]]:
        """({tid or OTHERS: on-CPU intervals}, {tid: runnable-but-waiting intervals})."""
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait()
        script = subprocess.run(
            ["perf", "script", "-i", str(self.path), "-F", "cpu,time,event,trace"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        on: dict[int, Intervals] = {}
        wait: dict[int, Intervals] = {}
        cpu_task: dict[int, tuple[int, float]] = {}  # cpu -> (task or OTHERS, since)
        runnable: dict[int, float] = {}
        for line in script.splitlines():
            m = EVENT.match(line)
            if not m:
                continue
            cpu, t, rest = int(m[1]), float(m[2]), m[3]
            if "sched_switch:" in rest:
                sw = SWITCH.search(rest)
                if not sw:
                    continue
                prev, state, nxt = int(sw[1]), sw[2], int(sw[3])
                task = prev if prev in self.ours else OTHERS if prev else 0
                was, since = cpu_task.get(cpu, (task, t))
                if was:  # the idle task (0) is not kept
                    on.setdefault(was, []).append((since, t))
                if prev in self.ours:  # preempted: runnable from now; else asleep
                    if state.startswith("R"):
                        runnable[prev] = t
                    else:
                        runnable.pop(prev, None)
                if nxt in runnable:
                    wait.setdefault(nxt, []).append((runnable.pop(nxt), t))
                cpu_task[cpu] = (nxt if nxt in self.ours else OTHERS if nxt else 0, t)
            elif "sched_wakeup:" in rest:
                wk = WAKEUP.search(rest)
                if wk:
                    runnable.setdefault(int(wk[1]), t)
        return on, wait


EVENT = re.compile(r"\s*\[(\d+)\]\s+([\d.]+):\s+(.*)")
SWITCH = re.compile(r"prev_pid=(\d+) .*prev_state=(\S+) ==> .*next_pid=(\d+)")
WAKEUP = re.compile(r" pid=(\d+) ")


def tids(pid: int) -> set[int]:
    with contextlib.suppress(OSError):
        return {int(t) for t in os.listdir(f"/proc/{pid}/task")}
    return set()


def thread_kinds(pid: int) -> dict[str, set[int]]:
    """A process's threads by kind: its main thread, ZMQ's I/O threads, the rest."""
    kinds: dict[str, set[int]] = {}
    for tid in tids(pid):
        try:
            comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
        except OSError:
            continue
        kind = "main" if tid == pid else "zmq-io" if comm.startswith("ZMQbg") else "threads"
        kinds.setdefault(kind, set()).add(tid)
    return kinds


def overlap(intervals: list[tuple[float, float]], t0: float, t1: float) -> float:
    return sum(max(0.0, min(b, t1) - max(a, t0)) for a, b in intervals)


def timeline(
    on: dict[str, list[tuple[float, float]]], t0: float, t1: float, step: float = 0.01
) -> list[str]:
    """One line per process: its on-CPU time in each `step` from t0 to t1, all threads
    (' ' < 5 %, '.' < 35 %, '+' < 70 %, '#' < 130 %, '@' more: two threads busy)."""
    lines = []
    for name, intervals in on.items():
        near = [(a, b) for a, b in intervals if b > t0 and a < t1]
        cells = []
        t = t0
        while t < t1 - step / 2:
            use = overlap(near, t, t + step) / step
            cells.append(next((c for lim, c in LEVELS if use < lim), "@"))
            t += step
        lines.append(f"  {name:10s}|{''.join(cells)}|")
    return lines


LEVELS = ((0.05, " "), (0.35, "."), (0.7, "+"), (1.3, "#"))


# -- the messages of a print, ready-made -----------------------------------------------------


def stream_content(mb: int) -> bytes:
    """The content part ipykernel sends for print_code(mb): one stream message (its stdout is
    flushed once, at the end of the cell), JSON as jupyter_client's packer writes it."""
    return json.dumps(
        {"name": "stdout", "text": ("x" * 999_999 + "\n") * mb}, ensure_ascii=False
    ).encode()


def kernel_header(msg_type: str, session: str) -> bytes:
    return json.dumps(
        {
            "msg_id": uuid.uuid4().hex,
            "msg_type": msg_type,
            "username": "ceiling",
            "session": session,
            "date": "2026-01-01T00:00:00.000000Z",
            "version": "5.3",
        }
    ).encode()


def replies(
    msg_type: str, parent: bytes, session: str, stream: bytes
) -> list[tuple[bytes, list[bytes]]]:
    """(channel, parts) that a kernel sends for a request, in ipykernel's order."""

    def msg(channel: bytes, kind: str, content: bytes) -> tuple[bytes, list[bytes]]:
        return channel, [kernel_header(kind, session), parent, b"{}", content]

    def status(state: str) -> tuple[bytes, list[bytes]]:
        return msg(b"iopub", "status", json.dumps({"execution_state": state}).encode())

    if msg_type == "kernel_info_request":
        reply = b'{"status":"ok","protocol_version":"5.3","implementation":"ceiling"}'
        return [
            status("busy"),
            msg(b"shell", "kernel_info_reply", reply),
            status("idle"),
        ]
    if msg_type == "execute_request":
        ok = b'{"status":"ok","execution_count":1,"user_expressions":{},"payload":[]}'
        return [
            status("busy"),
            msg(b"iopub", "execute_input", b'{"code":"","execution_count":1}'),
            msg(b"iopub", "stream", stream),
            status("idle"),
            msg(b"shell", "execute_reply", ok),
        ]
    return []


# -- ceiling servers (subprocesses: --serve-frames, --serve-zmq) -----------------------------


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return bytes(buf)


def _frame_header(opcode: int, size: int) -> bytes:
    if size < 126:
        return bytes([0x80 | opcode, size])
    if size <= 0xFFFF:
        return bytes([0x80 | opcode, 126]) + size.to_bytes(2, "big")
    return bytes([0x80 | opcode, 127]) + size.to_bytes(8, "big")


def _frames_connection(sock: socket.socket, stream: bytes) -> None:
    """One websocket: the handshake, then ready-made frames for each request, each written
    as the gateway writes it (header, then the parts; the large part is not copied)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    request = b""
    while b"\r\n\r\n" not in request:
        chunk = sock.recv(65536)
        if not chunk:
            return
        request += chunk
    headers = {}
    for line in request.split(b"\r\n")[1:]:
        if b":" in line:
            k, v = line.split(b":", 1)
            headers[k.strip().lower()] = v.strip()
    accept = base64.b64encode(
        hashlib.sha1(  # RFC 6455's handshake
            headers[b"sec-websocket-key"] + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
        ).digest()
    )
    v1 = codec.V1_PROTOCOL.encode() in headers.get(b"sec-websocket-protocol", b"")
    # permessage-deflate accepted as tornado accepts it (the gateway's messages over
    # --ws-compress-max go uncompressed on such a connection, and so do all of ours)
    offer = headers.get(b"sec-websocket-extensions", b"").split(b",")[0].strip()
    deflate = offer.split(b";")[0].strip() == b"permessage-deflate"
    params = [x.strip() for x in offer.split(b";")[1:] if x.strip() != b"client_max_window_bits"]
    inflate = zlib.decompressobj(-15)
    sock.sendall(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: "
        + accept
        + b"\r\n"
        + (b"Sec-WebSocket-Protocol: " + codec.V1_PROTOCOL.encode() + b"\r\n" if v1 else b"")
        + (
            b"Sec-WebSocket-Extensions: " + b"; ".join([b"permessage-deflate", *params]) + b"\r\n"
            if deflate
            else b""
        )
        + b"\r\n"
    )
    while True:
        b0, b1 = _recv_exact(sock, 2)
        size = b1 & 0x7F
        if size == 126:
            size = int.from_bytes(_recv_exact(sock, 2), "big")
        elif size == 127:
            size = int.from_bytes(_recv_exact(sock, 8), "big")
        mask = _recv_exact(sock, 4) if b1 & 0x80 else b"\0\0\0\0"
        data = bytes(
            b ^ mask[i % 4] for i, b in enumerate(_recv_exact(sock, size))
        )  # client messages are small
        if b0 & 0x40:  # RSV1: a compressed message (RFC 7692)
            data = inflate.decompress(data + b"\x00\x00\xff\xff")
        opcode = b0 & 0x0F
        if opcode == 8:
            sock.sendall(_frame_header(8, len(data[:2])) + data[:2])
            return
        if opcode == 9:
            sock.sendall(_frame_header(10, len(data)) + data)
            continue
        if opcode not in (1, 2):
            continue
        if opcode == 1:
            msg = json.loads(data)
            header = json.dumps(msg["header"]).encode()
        else:
            _, parts = codec.parts_from_v1(data)
            header = parts[0]
            msg = {"header": json.loads(header)}
        session = str(msg["header"].get("session", ""))
        for channel, parts in replies(msg["header"]["msg_type"], header, session, stream):
            if v1:
                pieces, binary = codec.v1_pieces(channel, parts), True
            else:
                pieces, binary = codec.legacy_pieces(channel, parts)
            size = sum(len(p) for p in pieces)
            small = _frame_header(2 if binary else 1, size)
            for piece in pieces:
                if len(piece) > 65536:
                    sock.sendall(small)
                    sock.sendall(piece)
                    small = b""
                else:
                    small += bytes(piece)
            sock.sendall(small)


def serve_frames(port: int, mb: int) -> None:
    stream = stream_content(mb)
    server = socket.create_server(("127.0.0.1", port))
    while True:
        conn, _ = server.accept()
        threading.Thread(target=_guarded, args=(_frames_connection, conn, stream)).start()


def _guarded(fn: Any, sock: socket.socket, *args: Any) -> None:
    with contextlib.suppress(OSError, ConnectionError), sock:
        fn(sock, *args)


def serve_zmq(connection_file: str, mb: int) -> None:
    """A fake kernel: answers kernel_info and execute requests with ready-made messages. The
    stream message for the next execute_request is signed before it arrives (jupyter_client's
    msg_ids are `<session>_<pid>_<n>`, so the next one is known), so that the 50 MB HMAC is
    not in the time measured; a wrong guess is signed at once and counted on stderr."""
    import zmq

    info = json.loads(Path(connection_file).read_text())
    key = info["key"].encode()
    ctx = zmq.Context()
    url = "tcp://127.0.0.1:{}"
    shell, control, stdin = (ctx.socket(zmq.ROUTER) for _ in range(3))
    iopub, hb = ctx.socket(zmq.PUB), ctx.socket(zmq.ROUTER)  # hb: as ipykernel's echo
    for sock, name in (
        (shell, "shell"),
        (control, "control"),
        (stdin, "stdin"),
        (iopub, "iopub"),
        (hb, "hb"),
    ):
        sock.bind(url.format(info[f"{name}_port"]))
    threading.Thread(target=zmq.proxy, args=(hb, hb), daemon=True).start()
    stream = stream_content(mb)

    def sign(parts: list[bytes]) -> bytes:
        mac = hmac.new(key, digestmod=hashlib.sha256)
        for p in parts:
            mac.update(p)
        return mac.hexdigest().encode()

    prepared: dict[bytes, tuple[list[bytes], bytes]] = {}  # parent msg_id -> (parts, signature)

    def prepare(msg_id: str, session: str) -> None:
        parent = json.dumps(
            {"msg_id": msg_id, "msg_type": "execute_request", "session": session}
        ).encode()
        parts = [kernel_header("stream", session), parent, b"{}", stream]
        prepared.clear()
        prepared[msg_id.encode()] = (parts, sign(parts))

    misses = 0
    poller = zmq.Poller()
    poller.register(shell, zmq.POLLIN)
    poller.register(control, zmq.POLLIN)
    while True:
        for sock, _ in poller.poll():
            frames = sock.recv_multipart()
            i = frames.index(DELIM)
            idents, header_bytes = frames[:i], frames[i + 2]
            header = json.loads(header_bytes)
            msg_id, session = header["msg_id"], header.get("session", "")
            for channel, parts in replies(header["msg_type"], header_bytes, session, stream):
                kind = json.loads(parts[0])["msg_type"]
                if kind == "stream":
                    parts_sig = prepared.get(msg_id.encode())
                    if parts_sig is None:
                        misses += 1
                        print(
                            f"ceil-zmq: {misses} stream message(s) signed late",
                            file=sys.stderr,
                        )
                        parts_sig = (parts, sign(parts))
                    parts, sig = parts_sig
                else:
                    sig = sign(parts)
                if channel == b"iopub":
                    iopub.send_multipart(
                        [b"kernel.ceiling." + kind.encode(), DELIM, sig, *parts],
                        copy=False,
                    )
                else:
                    (shell if sock is shell else control).send_multipart(
                        [*idents, DELIM, sig, *parts]
                    )
            prefix, _, n = msg_id.rpartition("_")
            if n.isdigit():
                prepare(f"{prefix}_{int(n) + 1}", session)


# -- the variants ----------------------------------------------------------------------------


class Runner:
    """One variant: a client connected and ready; `run` times one print."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.kernel_pid: int | None = None
        self.server_pid: int | None = None
        self.client_pid = os.getpid()
        self.kernel: Any = None
        self.node: asyncio.subprocess.Process | None = None
        self.close_kernel: Any = None

    async def run(self, code: str) -> tuple[int, float]:
        """(stdout characters received, seconds)."""
        if self.node is not None:
            assert self.node.stdin is not None and self.node.stdout is not None
            self.node.stdin.write(json.dumps(code).encode() + b"\n")
            await self.node.stdin.drain()
            r = json.loads(await self.node.stdout.readline())
            return int(r["stdout"]), float(r["seconds"])
        t0 = time.perf_counter()
        res = await self.kernel.execute(code)
        return res.stdout, time.perf_counter() - t0

    async def close(self) -> None:
        if self.node is not None:
            if self.node.stdin is not None:
                self.node.stdin.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.node.wait(), 10)
            if self.node.returncode is None:
                self.node.kill()
                await self.node.wait()
            self.node = None
        if self.close_kernel is not None:
            with contextlib.suppress(Exception):
                await self.close_kernel()
            self.close_kernel = None


async def start_node(url: str, token: str, proto: str, prof_dir: Path | None) -> Any:
    prof = ["--cpu-prof", "--cpu-prof-dir", str(prof_dir)] if prof_dir else []
    proc = await asyncio.create_subprocess_exec(
        "node",
        *prof,
        str(NODE_CLIENT),
        url,
        token,
        proto,
        "serve",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 60)
    if not line.startswith(b'{"ready"'):
        proc.kill()
        raise RuntimeError(f"node client did not start: {line!r}")
    return proc


class Setup:
    """The gateway(s) and the two ceiling servers, shared by every variant."""

    def __init__(
        self,
        servers: dict[str, Server],
        frames_port: int,
        frames: subprocess.Popen[bytes],
    ) -> None:
        self.servers, self.frames_port, self.frames = servers, frames_port, frames
        self.tmp = Path(tempfile.mkdtemp(prefix="rkg-prof-"))
        self.fakes: list[subprocess.Popen[bytes]] = []

    async def runner(self, name: str, mb: int, prof_dir: Path | None = None) -> Runner:
        r = Runner(name)
        if name == "direct":
            k, _ = await DirectKernel.start()
            r.kernel, r.close_kernel = k, k.stop
            r.kernel_pid = k.km.provisioner.process.pid
            return r
        if name == "ceil-zmq":
            from jupyter_client.asynchronous import AsyncKernelClient
            from jupyter_client.connect import write_connection_file

            cf = str(self.tmp / f"fake-{uuid.uuid4().hex}.json")
            write_connection_file(cf, ip="127.0.0.1", key=uuid.uuid4().hex.encode())
            fake = subprocess.Popen([sys.executable, __file__, "--serve-zmq", cf, str(mb)])
            self.fakes.append(fake)
            kc = AsyncKernelClient()
            kc.load_connection_file(cf)
            kc.start_channels()
            k = DirectKernel(None, kc)
            await k.iopub_ready(kc.kernel_info())

            async def stop() -> None:
                kc.stop_channels()
                fake.terminate()
                fake.wait()

            r.kernel, r.close_kernel, r.server_pid = k, stop, fake.pid
            return r
        where, client, proto = name.split("-")
        v1 = proto == "v1"
        if where == "ceil":
            r.server_pid = self.frames.pid
            url, token = f"ws://127.0.0.1:{self.frames_port}/ceiling", "none"
            if client == "node":
                r.node = await start_node(url, token, proto, prof_dir)
                r.client_pid = r.node.pid
                return r
            ws = await WsClient.connect(client, url, token, v1, deflate=True)
            r.kernel = WsKernel(self.servers["ours"], "ceiling", ws, v1)
            r.close_kernel = ws.close
            return r
        server = self.servers[where]
        gw = r.server_pid = server.proc.pid
        before = children(gw)
        if client == "node":
            code, model = await http(server, "POST", "api/kernels", {"name": "python3"})
            assert code == 201, model
            kid = model["id"]
            url = f"{server.ws_url}api/kernels/{kid}/channels?session_id={uuid.uuid4().hex}"
            r.node = await start_node(url, server.token, proto, prof_dir)
            r.client_pid = r.node.pid

            async def delete() -> None:
                await http(server, "DELETE", f"api/kernels/{kid}")

            r.close_kernel = delete
        else:
            wk, _, _ = await WsKernel.start(server, v1, True, client)
            r.kernel, r.close_kernel = wk, wk.stop
        new = children(gw) - before
        r.kernel_pid = new.pop() if len(new) == 1 else None
        return r


async def measure(r: Runner, code: str) -> dict[str, Any]:
    pids = {"kernel": r.kernel_pid, "server": r.server_pid, "client": r.client_pid}
    c0 = {k: cpu_seconds(p) for k, p in pids.items() if p}
    busy0 = machine_busy()
    m0 = time.monotonic()
    chars, seconds = await r.run(code)
    m1 = time.monotonic()
    busy = machine_busy() - busy0
    c1 = {k: cpu_seconds(p) for k, p in pids.items() if p}
    ours = sum(c1[k] - c0[k] for k in c0)
    return {
        "variant": r.name,
        "chars": chars,
        "seconds": seconds,
        "t0": m1 - seconds if r.node else m0,  # node times itself: its window ends at m1
        "t1": m1,
        "cpu": {k: round(c1[k] - c0[k], 4) for k in c0},
        # the rest of the machine, per second of the run (ticks: +-0.02 s)
        "others_share": round(max(0.0, busy - ours) / (m1 - m0), 3),
    }


# -- profiles --------------------------------------------------------------------------------


def pyspy_summary(path: Path, rate: int, top: int = 8) -> list[str]:
    """Top frames of a py-spy raw (collapsed) profile, by own and by inclusive samples."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        frames = [
            f.split(" (")[0] + " " + f.rsplit("/", 1)[-1].rstrip(")") for f in stack.split(";")
        ]
        frames = [f for f in frames if f]
        total += int(n)
        own[frames[-1]] += int(n)
        for f in set(frames):
            incl[f] += int(n)
    out = [f"    {total} samples = {total / rate:.2f} CPU s"]
    out += [f"    own  {n / max(total, 1):5.1%}  {f}" for f, n in own.most_common(top)]
    out += [
        f"    incl {n / max(total, 1):5.1%}  {f}" for f, n in incl.most_common(top + 8)[: top + 8]
    ]
    return out


def cpuprofile_summary(path: Path, top: int = 12) -> list[str]:
    """Top functions of a node --cpu-prof profile by own time."""
    prof = json.loads(path.read_text())
    nodes = {n["id"]: n for n in prof["nodes"]}
    own: Counter[str] = Counter()
    for node_id, dt in zip(prof["samples"], prof["timeDeltas"], strict=False):
        cf = nodes[node_id]["callFrame"]
        where = cf["url"].rsplit("/", 1)[-1]
        own[f"{cf['functionName'] or '(anonymous)'} {where}:{cf['lineNumber'] + 1}"] += dt
    busy = sum(us for f, us in own.items() if not f.startswith("(idle)"))
    out = [f"    busy {busy / 1e6:.2f} s of {sum(own.values()) / 1e6:.2f} s profiled"]
    out += [
        f"    own  {us / 1e6:6.3f} s  {f}"
        for f, us in own.most_common(top)
        if not f.startswith("(idle)")
    ]
    return out


def start_spy(pid: int, path: Path, rate: int, native: bool) -> subprocess.Popen[bytes]:
    spy = str(Path(sys.executable).parent / "py-spy")
    args = [
        spy,
        "record",
        "-p",
        str(pid),
        "-r",
        str(rate),
        "--nonblocking",
        "-f",
        "raw",
        "-o",
        str(path),
    ]
    return subprocess.Popen(
        [*args, *(["--native"] if native else [])],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


async def profile(setup: Setup, names: list[str], a: argparse.Namespace, code: str) -> None:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in names:
        node = "-node-" in name
        prof_dir = OUT / f"nodeprof-{stamp}-{name}" if node else None
        r = await setup.runner(name, a.mb, prof_dir)
        try:
            roles = {"kernel": r.kernel_pid, "server": r.server_pid}
            if not node:
                roles["client"] = r.client_pid
            spies = {
                role: (
                    start_spy(pid, OUT / f"pyspy-{stamp}-{name}-{role}.txt", a.rate, a.native),
                    OUT / f"pyspy-{stamp}-{name}-{role}.txt",
                )
                for role, pid in roles.items()
                if pid
            }
            await asyncio.sleep(1.5)  # py-spy attaches
            runs = [await measure(r, code) for _ in range(a.spy_runs)]
            for spy, _ in spies.values():
                spy.send_signal(signal.SIGINT)
            for spy, _ in spies.values():
                spy.wait(30)
        finally:
            await r.close()
        secs = ", ".join(f"{x['seconds']:.3f}" for x in runs)
        print(f"\n{name}: {a.spy_runs} runs under the profiler ({secs} s)")
        for role, (spy, path) in spies.items():
            print(f"  {role} (py-spy, {a.rate} Hz{', native' if a.native else ''}): {path.name}")
            if path.exists():
                print("\n".join(pyspy_summary(path, a.rate)))
            else:
                err = spy.stderr.read().decode()[-300:] if spy.stderr else ""
                print(f"    no profile: {err}")
        if prof_dir:
            for path in sorted(prof_dir.glob("*.cpuprofile")):
                print(f"  client (node --cpu-prof): {path.relative_to(OUT)}")
                print("\n".join(cpuprofile_summary(path)))


# -- the run ---------------------------------------------------------------------------------


def table(runs: list[dict[str, Any]], names: list[str], mb: int) -> list[str]:
    by_round: dict[int, dict[str, dict[str, Any]]] = {}
    for x in runs:
        by_round.setdefault(x["round"], {})[x["variant"]] = x
    lines = [
        f"{'variant':24s} {'MB/s med':>8s} {'[min-max]':>13s} {'ratio med':>9s} {'[min-max]':>11s}"
        f" {'deliv':>5s}   CPU s (median): kernel server client"
    ]
    for name in names:
        mine = [x for x in runs if x["variant"] == name]
        if not mine:
            continue
        rates = [x["chars"] / MB / x["seconds"] for x in mine]
        ratios = [
            (x["chars"] / x["seconds"]) / (d["chars"] / d["seconds"])
            for x in mine
            if (d := by_round[x["round"]].get("direct"))
        ]
        ratio = (
            f"{statistics.median(ratios):8.2f}x {min(ratios):5.2f}-{max(ratios):.2f}"
            if ratios and not name.startswith("ceil")
            else " " * 21
        )
        cpu = "  ".join(
            f"{statistics.median(x['cpu'][k] for x in mine):6.3f}"
            if k in mine[0]["cpu"]
            else "     -"
            for k in ("kernel", "server", "client")
        )
        lines.append(
            f"{name:24s} {statistics.median(rates):8.1f} {min(rates):6.1f}-{max(rates):<6.1f}"
            f" {ratio} {min(x['chars'] for x in mine) / (mb * MB):5.3f}   {cpu}"
        )
    return lines


def quiet(x: dict[str, Any], share: float, runs: list[dict[str, Any]]) -> bool:
    """A run during which the rest of the machine used under `share` of one CPU, and our
    processes ran at full speed: the kernel does the same work in every run, so its CPU time
    is a probe of how fast the machine ran (this is a VM: a busy host slows every process
    without showing as load); it must be within 10 % of its median over `runs` (for the
    ceilings, without a kernel, the client's CPU time within 15 % of its variant's median)."""
    if "others_share" not in x or x["others_share"] >= share:
        return False
    if "kernel" in x["cpu"]:
        typical = statistics.median(y["cpu"]["kernel"] for y in runs if "kernel" in y["cpu"])
        return bool(x["cpu"]["kernel"] <= 1.1 * typical)
    mine = [y["cpu"]["client"] for y in runs if y["variant"] == x["variant"]]
    return bool(x["cpu"]["client"] <= 1.15 * statistics.median(mine))


def quiet_table(runs: list[dict[str, Any]], names: list[str], share: float) -> list[str]:
    """Figures over the quiet runs only; ratios against the median of direct's quiet runs."""
    calm = [x for x in runs if quiet(x, share, runs)]
    base = [x["chars"] / MB / x["seconds"] for x in calm if x["variant"] == "direct"]
    lines = [
        f"\nQuiet runs only (the rest of the machine under {share:.0%} of a CPU during the run, "
        "kernel CPU within 10 % of its median):",
        f"{'variant':24s} {'n':>3s} {'MB/s med':>8s} {'[min-max]':>13s} {'ratio':>6s}"
        f" {'[min-max]':>11s}  CPU s: kernel server client",
    ]
    for name in names:
        mine = [x for x in calm if x["variant"] == name]
        if not mine:
            lines.append(f"{name:24s}   0")
            continue
        rates = [x["chars"] / MB / x["seconds"] for x in mine]
        ratio = " " * 19
        if base and not name.startswith("ceil"):
            b = statistics.median(base)
            ratio = (
                f"{statistics.median(rates) / b:5.2f}x {min(rates) / b:5.2f}-{max(rates) / b:.2f}"
            )
        cpu = " ".join(
            f"{statistics.median(x['cpu'][k] for x in mine):6.3f}"
            if k in mine[0]["cpu"]
            else "     -"
            for k in ("kernel", "server", "client")
        )
        lines.append(
            f"{name:24s} {len(mine):3d} {statistics.median(rates):8.1f} "
            f"{min(rates):6.1f}-{max(rates):<6.1f} {ratio}  {cpu}"
        )
    return lines


def roles_of(r: Runner) -> dict[str, set[int]]:
    """The threads of each process of a variant, taken while they all run."""
    pids = {"kernel": r.kernel_pid, "server": r.server_pid, "client": r.client_pid}
    return {role: tids(pid) for role, pid in pids.items() if pid}


def by_role(
    roles: dict[str, set[int]], on: dict[int, list[tuple[float, float]]]
) -> dict[str, list[tuple[float, float]]]:
    return {role: [iv for t in ts for iv in on.get(t, [])] for role, ts in roles.items()}


def add_sched(
    x: dict[str, Any],
    roles: dict[str, set[int]],
    on: dict[int, list[tuple[float, float]]],
    wait: dict[int, list[tuple[float, float]]],
) -> None:
    """On-CPU seconds per process in the run's window, and how long our processes were
    runnable but not running (the machine busy)."""
    t0, t1 = x["t0"], x["t1"]
    x["oncpu"] = {k: round(overlap(v, t0, t1), 4) for k, v in by_role(roles, on).items()}
    x["waited"] = {
        role: round(sum(overlap(wait.get(t, []), t0, t1) for t in ts), 4)
        for role, ts in roles.items()
    }


def point(intervals: Intervals, t0: float, t1: float, share: float) -> float | None:
    """Seconds after t0 by which `share` of the on-CPU time in [t0, t1] had been spent."""
    total = overlap(intervals, t0, t1)
    if total <= 0:
        return None
    done = 0.0
    for a, b in sorted(intervals):
        a, b = max(a, t0), min(b, t1)
        if b > a:
            if done + (b - a) >= share * total:
                return a + (share * total - done) - t0
            done += b - a
    return t1 - t0


def add_phases(
    x: dict[str, Any], kinds: dict[str, dict[str, set[int]]], on: dict[int, Intervals]
) -> None:
    """Where a run's time went: when the kernel was done (97 % of its CPU time spent), when
    the ZMQ I/O threads that received the big message (the gateway's, or direct's client's)
    worked (5 % to 95 % of their CPU time) and when the client took up the message (5 % of
    its CPU time spent)."""
    t0, t1 = x["t0"], x["t1"]

    def iv(role: str, kind: str | None = None) -> Intervals:
        ts = [t for k, tids in kinds.get(role, {}).items() if kind in (None, k) for t in tids]
        return [i for t in ts for i in on.get(t, [])]

    receiver = "client" if x["variant"] == "direct" else "server"
    phases = {
        "kernel_done": point(iv("kernel"), t0, t1, 0.97),
        "zmq_recv_from": point(iv(receiver, "zmq-io"), t0, t1, 0.05),
        "zmq_recv_to": point(iv(receiver, "zmq-io"), t0, t1, 0.95),
        "client_from": point(iv("client"), t0, t1, 0.05),
    }
    x["phases"] = {k: round(v, 4) for k, v in phases.items() if v is not None}


def phase_table(runs: list[dict[str, Any]], names: list[str], share: float) -> list[str]:
    lines = [
        "\nPhases (medians over quiet runs, s from execute_request): kernel done = 97 % of its "
        "CPU time spent; ZMQ receive = the receiving ZMQ I/O thread's 5-95 % (the gateway's, or "
        "direct's client's); client from = 5 % of the client's CPU time spent",
        f"{'variant':24s} {'n':>3s} {'kernel done':>11s} {'ZMQ receive':>13s} {'client from':>11s}"
        f" {'client tail':>11s} {'wall':>6s}",
    ]
    for name in names:
        mine = [x for x in runs if x["variant"] == name and "phases" in x and quiet(x, share, runs)]
        if not mine:
            continue

        def med(key: str, mine: list[dict[str, Any]] = mine) -> float | None:
            got = [x["phases"][key] for x in mine if key in x["phases"]]
            return statistics.median(got) if got else None

        def f(v: float | None) -> str:
            return "-" if v is None else f"{v:.3f}"

        wall = statistics.median(x["seconds"] for x in mine)
        start = med("client_from")
        tail = (
            None
            if start is None
            else statistics.median(
                x["seconds"] - x["phases"]["client_from"]
                for x in mine
                if "client_from" in x["phases"]
            )
        )
        recv = f"{f(med('zmq_recv_from'))}-{f(med('zmq_recv_to'))}"
        lines.append(
            f"{name:24s} {len(mine):3d} {f(med('kernel_done')):>11s} {recv:>13s} "
            f"{f(start):>11s} {f(tail):>11s} {wall:6.3f}"
        )
    return lines


def sched_table(runs: list[dict[str, Any]], names: list[str]) -> list[str]:
    lines = [
        "\nFrom perf sched events, medians per run: on-CPU s in the run's window, and s runnable "
        "but waiting for a CPU",
        f"{'variant':24s} {'wall':>6s}   on-CPU: kernel server client  others/s"
        "   waiting: kernel server client",
    ]
    for name in names:
        mine = [x for x in runs if x["variant"] == name and "oncpu" in x]
        if not mine:
            continue

        def med(key: str, role: str, mine: list[dict[str, Any]] = mine) -> str:
            if role not in mine[0][key]:
                return "     -"
            return f"{statistics.median(x[key][role] for x in mine):6.3f}"

        on = " ".join(med("oncpu", k) for k in ("kernel", "server", "client"))
        on += f"  {statistics.median(x['others_share'] for x in mine):8.2f}"
        wt = " ".join(med("waited", k) for k in ("kernel", "server", "client"))
        wall = statistics.median(x["seconds"] for x in mine)
        lines.append(f"{name:24s} {wall:6.3f}   {on}   {wt}")
    return lines


SITECUSTOMIZE = """
import ctypes, os, sys
if sys.orig_argv[1:3] == ["-m", "gateway"]:  # the gateway only, not the kernels it starts
    os.environ.pop("GLIBC_TUNABLES", None)  # read at start-up already; kernels do without
    if {0}:
        libc = ctypes.CDLL(None)
        assert libc.mallopt(-3, {0}) == 1  # M_MMAP_THRESHOLD: blocks below it from the heap
        assert libc.mallopt(-1, {0}) == 1  # M_TRIM_THRESHOLD: freed heap up to it is kept
"""
TUNINGS = {
    "tuned": "keeps freed blocks for reuse",
    "huge": "maps large blocks in huge pages",
}


def tuned_server(tmp: Path, spec: str) -> tuple[str, Server]:
    """A second gateway whose glibc malloc does not page-fault fresh memory in for every
    large message: spec BYTES reuses freed blocks below BYTES (mallopt M_MMAP_THRESHOLD and
    M_TRIM_THRESHOLD, variants tuned-*); spec `hugetlb` maps large blocks in transparent huge
    pages (GLIBC_TUNABLES=glibc.malloc.hugetlb=1, variants huge-*). A sitecustomize on its
    PYTHONPATH applies it to the gateway process only: its kernels run as the others do."""
    name = "huge" if spec == "hugetlb" else "tuned"
    site = tmp / f"{name}-site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE.format(0 if name == "huge" else int(spec)))
    server = Server("ours", tmp)
    assert server.gateway is not None
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    server.gateway.env["PYTHONPATH"] = path
    if name == "huge":
        server.gateway.env["GLIBC_TUNABLES"] = "glibc.malloc.hugetlb=1"
    return name, server


async def main_async(a: argparse.Namespace, reaper: Reaper) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    code = print_code(a.mb)
    frames_port = _free_port()
    frames = subprocess.Popen(
        [sys.executable, __file__, "--serve-frames", str(frames_port), str(a.mb)]
    )
    with tempfile.TemporaryDirectory(prefix="rkg-prof-") as tmp:
        os.environ["JUPYTER_RUNTIME_DIR"] = str(Path(tmp) / "runtime-direct")
        servers = {"ours": Server("ours", Path(tmp))}
        for spec in a.tuned:
            name, servers[name] = tuned_server(Path(tmp), spec)
        try:
            for server in servers.values():
                await server.wait_ready()
            setup = Setup(servers, frames_port, frames)
            runners = [await setup.runner(n, a.mb) for n in a.variants]
            for r in runners:  # warm-up, not counted
                await r.run(code)
            sched = None
            if a.timeline:
                roles0 = [roles_of(r) for r in runners]
                sched = Sched(
                    OUT / "sched.data",
                    {t for ro in roles0 for ts in ro.values() for t in ts},
                )
            runs = []
            uptimes = [os.getloadavg()[0]]
            for rnd in range(a.runs):
                order = runners[rnd % len(runners) :] + runners[: rnd % len(runners)]
                for r in order:
                    x = await measure(r, code)
                    x["round"] = rnd
                    runs.append(x)
                    await asyncio.sleep(0.3)
                uptimes.append(os.getloadavg()[0])
                log(f"round {rnd + 1}/{a.runs} done, load {uptimes[-1]:.2f}")
            roles = {r.name: roles_of(r) for r in runners}
            kinds = {
                r.name: {
                    role: thread_kinds(pid)
                    for role, pid in (
                        ("kernel", r.kernel_pid),
                        ("server", r.server_pid),
                        ("client", r.client_pid),
                    )
                    if pid
                }
                for r in runners
            }
            for r in runners:
                await r.close()
            print(
                f"\n{a.mb} MB printed, {a.runs} interleaved rounds; 1-min load average "
                f"{min(uptimes):.2f}-{max(uptimes):.2f} during the rounds"
            )
            if sched:
                on, wait = sched.stop()
                for x in runs:
                    add_sched(x, roles[x["variant"]], on, wait)
                    add_phases(x, kinds[x["variant"]], on)
            print("\n".join(table(runs, a.variants, a.mb)))
            print("\n".join(quiet_table(runs, a.variants, a.quiet)))
            if sched:
                print("\n".join(sched_table(runs, a.variants)))
                print("\n".join(phase_table(runs, a.variants, a.quiet)))
                print(
                    "\nOn-CPU timeline of each variant's median run, 10 ms per column, all "
                    "threads (' ' <5%, '.' <35%, '+' <70%, '#' <130%, '@' more)"
                )
                for r in runners:
                    mine = sorted(
                        (x for x in runs if x["variant"] == r.name and quiet(x, a.quiet, runs))
                        or (x for x in runs if x["variant"] == r.name),
                        key=lambda x: x["seconds"],
                    )
                    if mine:
                        x = mine[len(mine) // 2]
                        print(
                            f"{r.name}: {x['seconds']:.3f} s, other processes "
                            f"{x['others_share']:.2f} CPUs"
                        )
                        rows = by_role(roles[r.name], on)
                        for role, pid in (
                            ("kernel", r.kernel_pid),
                            ("server", r.server_pid),
                        ):
                            if pid and role in rows:
                                for kind, ts in kinds[r.name][role].items():
                                    iv = [i for t in ts for i in on.get(t, [])]
                                    if overlap(iv, x["t0"], x["t1"]) > 0.005:
                                        rows[f" {role[0]}.{kind}"] = iv
                        row_order = [
                            "kernel",
                            " k.main",
                            " k.threads",
                            " k.zmq-io",
                            "server",
                            " s.main",
                            " s.threads",
                            " s.zmq-io",
                            "client",
                        ]
                        rows = {k: rows[k] for k in row_order if k in rows}
                        print("\n".join(timeline(rows, x["t0"], x["t1"])))
            rss = {name: round(server.rss_mb(), 1) for name, server in servers.items()}
            print(f"\ngateway RSS at the end, MB: {rss}")
            path = OUT / time.strftime("profile-%Y%m%d-%H%M%S.json")
            path.write_text(
                json.dumps(
                    {"args": vars(a), "runs": runs, "load": uptimes, "rss_MB": rss},
                    indent=1,
                    default=str,
                )
            )
            print(f"\nwritten to {path}")
            if a.py_spy:
                await profile(setup, a.variants, a, code)
        finally:
            for server in servers.values():
                await server.stop()
            frames.terminate()
            frames.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--serve-frames":
        serve_frames(int(sys.argv[2]), int(sys.argv[3]))
        return 0
    if len(sys.argv) == 4 and sys.argv[1] == "--serve-zmq":
        serve_zmq(sys.argv[2], int(sys.argv[3]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=7, help="interleaved rounds (7)")
    p.add_argument("--mb", type=int, default=50, help="MB printed (50)")
    p.add_argument("--variants", default=",".join(ALL_VARIANTS))
    p.add_argument("--timeline", action="store_true", help="perf sched: who ran when")
    p.add_argument(
        "--quiet",
        type=float,
        default=0.15,
        help="a run is quiet when other processes used under this share of a CPU (0.15)",
    )
    p.add_argument(
        "--tuned",
        action="append",
        default=[],
        metavar="BYTES|hugetlb",
        help="add a gateway whose malloc keeps freed blocks under BYTES for reuse (variants "
        "tuned-<client>-<proto>), or maps large blocks in huge pages (huge-<client>-<proto>)",
    )
    p.add_argument("--report", nargs="+", type=Path, help="only print tables of saved runs")
    p.add_argument("--py-spy", action="store_true", help="then profile each variant")
    p.add_argument("--spy-runs", type=int, default=5, help="runs per variant under py-spy (5)")
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second (250)")
    p.add_argument("--native", action="store_true", help="py-spy --native (C frames too)")
    a = p.parse_args()
    a.variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    for spec in a.tuned:
        prefix = "huge-" if spec == "hugetlb" else "tuned-"
        a.variants += [v.replace("ours-", prefix) for v in a.variants if v.startswith("ours-")]
    for v in a.variants:
        if v not in ALL_VARIANTS and not v.startswith(("tuned-", "huge-")):
            p.error(f"unknown variant {v!r}")
    if not (NODE_WS.is_dir()):
        a.variants = [v for v in a.variants if "-node-" not in v]
        log("node variants skipped: tests/js/node_modules/ws missing (./dev test installs it)")
    if a.report:
        runs = []
        for i, path in enumerate(a.report):
            for x in json.loads(path.read_text())["runs"]:
                runs.append({**x, "round": (i, x["round"])})
        seen = list(dict.fromkeys(x["variant"] for x in runs))
        names = [v for v in a.variants if v in seen] + [v for v in seen if v not in a.variants]
        print("\n".join(table(runs, names, a.mb)))
        print("\n".join(quiet_table(runs, names, a.quiet)))
        print("\n".join(sched_table(runs, names)))
        print("\n".join(phase_table(runs, names, a.quiet)))
        return 0
    reaper = Reaper()
    try:
        asyncio.run(main_async(a, reaper))
    finally:
        killed = reaper.kill_all()
        if killed:
            log(f"killed {len(killed)} leftover process(es): {killed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
