"""scale.py's `direct` reference: the clients rounds with no gateway at all.

N stand-in kernels (bench/standin) are launched here from connection files, and one thread
of this process is every client: a DEALER on each kernel's shell and a SUB on its iopub,
driven by one zmq.Poller, signing with HMAC-SHA256 and decoding only headers, parents and the
status and reply contents. Same round trip as through a gateway (execute_request ->
execute_reply and iopub idle), so the busy round says what N busy clients cost the machine
when nothing relays them: the kernels' CPU and this client's.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import resource
import secrets
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import zmq

DELIM = b"<IDS|MSG>"
PORTS = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(exe: Path, folder: Path, n: int) -> tuple[list[subprocess.Popen[bytes]], list[dict]]:
    """n stand-ins, each on five fresh loopback ports (they inherit the bench's marker)."""
    folder.mkdir(parents=True, exist_ok=True)
    procs, infos = [], []
    for i in range(n):
        info: dict[str, Any] = {p: free_port() for p in PORTS}
        info |= {"ip": "127.0.0.1", "transport": "tcp", "signature_scheme": "hmac-sha256"}
        info["key"] = secrets.token_hex(16)
        cf = folder / f"kernel-direct-{i}.json"
        cf.write_text(json.dumps(info))
        procs.append(subprocess.Popen([str(exe), str(cf)], stdin=subprocess.DEVNULL))
        infos.append(info)
    return procs, infos


class Kernel:
    """One client's two sockets and its request in flight."""

    def __init__(self, ctx: zmq.Context, info: dict[str, Any]) -> None:  # type: ignore[type-arg]
        self.key = info["key"].encode()
        self.shell = ctx.socket(zmq.DEALER)
        self.shell.connect(f"tcp://127.0.0.1:{info['shell_port']}")
        self.iopub = ctx.socket(zmq.SUB)
        self.iopub.setsockopt(zmq.SUBSCRIBE, b"")
        self.iopub.connect(f"tcp://127.0.0.1:{info['iopub_port']}")
        self.msg_id = ""
        self.replied = self.idle = False
        self.t0 = 0.0
        self.times: list[float] = []

    def send(self, msg_type: str, content: dict[str, Any]) -> None:
        self.msg_id = uuid.uuid4().hex
        header = {
            "msg_id": self.msg_id,
            "msg_type": msg_type,
            "session": "direct",
            "username": "bench",
            "version": "5.3",
            "date": "2026-01-01T00:00:00.000000Z",
        }
        parts = [json.dumps(header).encode(), b"{}", b"{}", json.dumps(content).encode()]
        mac = hmac.new(self.key, digestmod=hashlib.sha256)
        for p in parts:
            mac.update(p)
        self.replied = self.idle = False
        self.t0 = time.perf_counter()
        self.shell.send_multipart([DELIM, mac.hexdigest().encode(), *parts])

    def received(self, frames: list[bytes], shell: bool) -> bool:
        """Whether this message completed the request in flight."""
        i = frames.index(DELIM)
        header, parent, _, content = frames[i + 2 : i + 6]
        if json.loads(parent).get("msg_id") != self.msg_id:
            return False
        msg_type = json.loads(header)["msg_type"]
        if shell and msg_type.endswith("_reply"):
            status = json.loads(content).get("status")
            if status != "ok":
                raise RuntimeError(f"{msg_type} status {status!r}")
            self.replied = True
        elif msg_type == "status" and json.loads(content)["execution_state"] == "idle":
            self.idle = True
        return self.replied and self.idle

    def close(self) -> None:
        self.shell.close(linger=0)
        self.iopub.close(linger=0)


EXECUTE = {
    "code": "pass",
    "silent": False,
    "store_history": False,
    "user_expressions": {},
    "allow_stdin": False,
    "stop_on_error": True,
}


def _poller(kernels: list[Kernel]) -> tuple[zmq.Poller, dict[Any, tuple[Kernel, bool]]]:
    poller = zmq.Poller()
    owner: dict[Any, tuple[Kernel, bool]] = {}
    for k in kernels:
        for sock, shell in ((k.shell, True), (k.iopub, False)):
            poller.register(sock, zmq.POLLIN)
            owner[sock] = (k, shell)
    return poller, owner


def _ready(kernels: list[Kernel], timeout: float = 60) -> None:
    """kernel_info answered on shell and iopub by each (a SUB misses what is published before
    its subscription reaches the kernel: asked again until iopub answers)."""
    poller, owner = _poller(kernels)
    deadline = time.monotonic() + timeout
    waiting = set(kernels)
    for k in waiting:
        k.send("kernel_info_request", {})
    asked = time.monotonic()
    while waiting:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(waiting)} stand-ins did not answer kernel_info")
        if time.monotonic() - asked > 0.5:
            for k in waiting:
                k.send("kernel_info_request", {})
            asked = time.monotonic()
        for sock, _ in poller.poll(100):
            k, shell = owner[sock]
            if k.received(sock.recv_multipart(), shell):
                waiting.discard(k)


def run(infos: list[dict], seconds: float, rate: float = 0) -> dict[str, Any]:
    """Every client at once for `seconds`: back to back, or (rate > 0) one execute every
    1/rate s each from a random phase. Blocking: call it in a thread."""
    ctx = zmq.Context()
    kernels = [Kernel(ctx, info) for info in infos]
    try:
        _ready(kernels)
        poller, owner = _poller(kernels)
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        until = start + seconds
        # when each client's next execute is due; the ones not running wait in `pending`
        sched = {k: start + (random.uniform(0, 1 / rate) if rate > 0 else 0) for k in kernels}
        pending = dict(sched)
        busy: set[Kernel] = set()
        late = 0
        while busy or pending:
            now = time.perf_counter()
            for k in [k for k, at in pending.items() if at <= now]:
                del pending[k]
                k.send("execute_request", EXECUTE)
                busy.add(k)
            timeout = 100.0 if busy or not pending else max(0.0, min(pending.values()) - now) * 1000
            for sock, _ in poller.poll(round(timeout)):
                k, shell = owner[sock]
                if not k.received(sock.recv_multipart(), shell):
                    continue
                done = time.perf_counter()
                k.times.append((done - k.t0) * 1000)
                busy.discard(k)
                sched[k] = at = sched[k] + 1 / rate if rate > 0 else done
                if at >= until:
                    continue  # this client's round is over
                if rate <= 0:  # back to back: the next one at once
                    k.send("execute_request", EXECUTE)
                    busy.add(k)
                    continue
                late += at < done
                pending[k] = at
        wall = time.perf_counter() - start
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime
        return {"times_ms": [k.times for k in kernels], "wall_s": wall, "cpu_s": cpu, "late": late}
    finally:
        for k in kernels:
            k.close()
        ctx.term()


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait(10)
