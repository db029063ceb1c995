"""Scale: remote-kernel-gateway and Jupyter Kernel Gateway holding 100, 300 and 1,000 kernels.

Real ipykernels cost 40-60 MB each, so the kernels are stand-ins (bench/standin/standin.c,
built here with `cc` into the run's temporary folder): one small native process per kernel,
launched by the gateway through an ordinary kernelspec (`standin {connection_file}`), that
binds the connection file's five ports and speaks the kernel protocol over ZMTP 3.0 on them:
heartbeat echo, kernel_info, execute of a no-op (busy, execute_input, execute_reply, idle),
shutdown and interrupt (by message and by SIGINT), HMAC-SHA256 signatures. The gateway's own
libzmq sockets connect to it, so for the gateway it is a kernel; about 0.2 MB each.

Both gateways run in one invocation, one after the other, on the same workload. Each N gets
a fresh gateway process (no N inherits an earlier one's clients), in which N kernels are
started by `POST /api/sessions` (as JupyterLab starts them; so `GET /api/sessions` lists N
too), at most --start-concurrency at a time. A target that cannot hold N kernels is recorded
with the first errors and not tried at larger N. At each N, with no client connected:

  rss        the gateway's VmRSS (/proc/PID/status); per kernel = (RSS at N - RSS at 0) / N,
             RSS at 0 being read after one warm-up kernel was started and deleted
  cpu        the gateway's utime+stime (/proc/PID/stat, every thread) over --idle-seconds
             with nothing asked of it: % of one core. The kernels' and the whole machine's
             CPU over the same window are recorded too, to judge noise from other work
  fds        /proc/PID/fd entries: all, sockets, eventfds
  zmq        the gateway's ZMQ sockets, counted two ways: its ESTABLISHED TCP connections to
             a kernel port (socket inodes in /proc/PID/fd joined with /proc/PID/net/tcp;
             a port is a kernel's when a connection file in the gateway's runtime dir names
             it), by channel; and its eventfds (libzmq gives every socket a mailbox eventfd,
             so that count is ZMQ sockets + a few per context, connected or not)
  list       GET /api/kernels and GET /api/sessions: --list-requests sequential requests after
             one warm-up, median and max, timed to the last byte of the body (not decoded)
  start      --starts starts: POST /api/kernels -> websocket -> kernel_info_reply (as
             bench.py), each kernel deleted after; median
  single     one client on one kernel executing `pass` back to back for --single-seconds
  busy       --clients websockets to as many different kernels, each executing `pass` back to
             back for --busy-seconds, all at once: aggregate executes/s, p50/p99 round trip
             (execute_request -> execute_reply and iopub idle), against single's p99
  paced      the same clients, each sending one execute every 1/--paced-rate s (random
             phase): p50/p99 at an offered load below saturation
  CPU        of each round: the gateway's, the clients', the kernels' (/proc, rusage), as %
             of one core and in ms per execute

--client node runs the three rounds in a Node process of its own (bench/scaleclient.js,
Node's `ws`), which costs less per execute than the Python clients, so the busy round is
bound by the gateway. The `direct` target runs them with no gateway at all
(bench/scaledirect.py: one Python thread on ZMQ straight to as many stand-ins): what the
clients and kernels cost by themselves.

A closed loop of 100 clients is throughput-bound: by Little's law its round trip is
100 / (executes/s), whatever the gateway's per-message latency, so `busy p99 / single p99`
mostly measures throughput; `paced` shows latency under load without that.

    .venv/bin/python bench/scale.py                      # 100, 300, 1000; ours and jkg: ~10 min
    .venv/bin/python bench/scale.py --quick              # 20 and 50 kernels, short windows: ~2 min
    .venv/bin/python bench/scale.py --targets ours --n 1000 --idle-seconds 30
    .venv/bin/python bench/scale.py --targets ours,direct --n 100 --client node

Everything listens on and talks to 127.0.0.1. Every process the run starts carries bench.py's
marker variable (kernels inherit it), and is killed at the end of each target and of the run.
The file-descriptor limit is raised to its hard limit for this process and so its children.
Results: a table on stdout and bench/results/scale-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import scaledirect

from bench import Reaper, Server, WsClient, WsKernel, http, log, machine

ROOT = Path(__file__).resolve().parent.parent
STANDIN_SRC = ROOT / "bench" / "standin" / "standin.c"
NODE_CLIENT = ROOT / "bench" / "scaleclient.js"
KERNEL_NAME = "standin"
TINY = "pass"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- the stand-in kernel -----------------------------------------------------------------------


def build_standin(tmp: Path) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("the stand-in kernel needs a C compiler (cc): apt-get install gcc")
    exe = tmp / "standin"
    done = subprocess.run(
        [cc, "-O2", "-Wall", "-o", str(exe), str(STANDIN_SRC)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        raise RuntimeError(f"building {STANDIN_SRC} failed:\n{done.stderr}")
    return exe


def write_kernelspec(tmp: Path, exe: Path) -> Path:
    """A Jupyter data dir (for JUPYTER_PATH) holding kernels/standin/kernel.json."""
    data = tmp / "jupyter-data"
    spec = data / "kernels" / KERNEL_NAME
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [str(exe), "{connection_file}"],
                "display_name": "stand-in (bench/standin)",
                "language": "python",
                "interrupt_mode": "signal",
            }
        )
    )
    return data


# -- /proc -------------------------------------------------------------------------------------


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime: every thread of the process


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
    except (OSError, StopIteration):
        return 0


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, all cores."""
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return sum(vals) - idle, sum(vals)


def fd_targets(pid: int) -> list[str]:
    out = []
    base = f"/proc/{pid}/fd"
    for fd in os.listdir(base):
        with contextlib.suppress(OSError):
            out.append(os.readlink(f"{base}/{fd}"))
    return out


def tcp_table(pid: int) -> dict[int, tuple[int, int, str]]:
    """inode -> (local port, remote port, state hex) for the pid's network namespace."""
    table: dict[int, tuple[int, int, str]] = {}
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                next(f)
                for line in f:
                    cols = line.split()
                    local, remote, state, inode = cols[1], cols[2], cols[3], int(cols[9])
                    table[inode] = (
                        int(local.rsplit(":", 1)[1], 16),
                        int(remote.rsplit(":", 1)[1], 16),
                        state,
                    )
        except OSError:
            pass
    return table


CHANNEL_PORTS = {
    "shell_port": "shell",
    "iopub_port": "iopub",
    "stdin_port": "stdin",
    "control_port": "control",
    "hb_port": "hb",
}


def kernel_ports(runtime_dir: Path) -> dict[int, str]:
    """port -> channel of every kernel whose connection file is in the gateway's runtime dir."""
    ports: dict[int, str] = {}
    for path in runtime_dir.glob("kernel-*.json"):
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for key, channel in CHANNEL_PORTS.items():
            if isinstance(info.get(key), int):
                ports[info[key]] = channel
    return ports


def sockets_of(pid: int, runtime_dir: Path) -> dict[str, Any]:
    """File descriptors and ZMQ connections of the gateway process (see the docstring)."""
    targets = fd_targets(pid)
    inodes = {int(t[8:-1]) for t in targets if t.startswith("socket:[")}
    ports = kernel_ports(runtime_dir)
    by_channel: dict[str, int] = dict.fromkeys(CHANNEL_PORTS.values(), 0)
    other_tcp = 0
    for inode, (_, rport, state) in tcp_table(pid).items():
        if inode not in inodes:
            continue
        if state == "01" and rport in ports:  # ESTABLISHED, to a kernel port
            by_channel[ports[rport]] += 1
        else:
            other_tcp += 1
    return {
        "fds": len(targets),
        "fd_sockets": len(inodes),
        "fd_eventfds": sum(1 for t in targets if t == "anon_inode:[eventfd]"),
        "zmq_tcp": sum(by_channel.values()),
        "zmq_tcp_by_channel": by_channel,
        "other_tcp": other_tcp,
    }


def kernel_pids(runtime_dir: Path) -> list[int]:
    """Live processes whose command line names a connection file in runtime_dir."""
    needle = f"{runtime_dir}/kernel-".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if needle in f.read():
                    found.append(int(entry))
        except OSError:
            pass
    return found


def kernels_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += cpu_ticks(pid)
    return total


# -- HTTP and websockets -------------------------------------------------------------------------


async def timed_get(server: Server, path: str) -> tuple[float, int, Any]:
    """(ms to the last byte, status, decoded body): the body is decoded after the clock."""
    from tornado.httpclient import AsyncHTTPClient, HTTPRequest

    req = HTTPRequest(
        server.url + path,
        headers={"Authorization": f"token {server.token}"},
        request_timeout=120,
        connect_timeout=10,
    )
    t0 = time.perf_counter()
    resp = await AsyncHTTPClient().fetch(req, raise_error=False)
    ms = (time.perf_counter() - t0) * 1000
    if resp.code == 599 and resp.error:
        raise OSError(str(resp.error))
    try:
        body = json.loads(resp.body) if resp.body else None
    except ValueError:
        body = resp.body[:300]
    return ms, resp.code, body


def ws_library(a: argparse.Namespace) -> str:
    """The Python client of every phase but the clients rounds (with --client node, aiohttp)."""
    return "aiohttp" if a.client == "node" else str(a.client)


async def connect(server: Server, kernel_id: str, a: argparse.Namespace) -> WsKernel:
    """A websocket to an existing kernel, ready: its kernel_info answered on shell and iopub.
    No session_id: the session ends with the socket, so an idle window measured later holds
    no sessions kept for a reconnect (both gateways drop such a session at close)."""
    v1 = a.protocol == "v1"
    ws = await WsClient.connect(
        ws_library(a), f"{server.ws_url}api/kernels/{kernel_id}/channels", server.token, v1, False
    )
    k = WsKernel(server, kernel_id, ws, v1)
    try:
        msg_id = await k.send("kernel_info_request", {})
        reply = status = False
        async with asyncio.timeout(60):
            while not (reply and status):
                m = await k.recv()
                if m["parent_header"].get("msg_id") != msg_id:
                    continue
                reply = reply or m["header"]["msg_type"] == "kernel_info_reply"
                status = status or m["header"]["msg_type"] == "status"
    except BaseException:
        await close_quietly(k)
        raise
    return k


async def close_quietly(k: WsKernel) -> None:
    with contextlib.suppress(Exception):
        await k.ws.close()


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


# -- phases --------------------------------------------------------------------------------------


async def start_sessions(
    server: Server, first: int, count: int, a: argparse.Namespace
) -> tuple[list[str], list[str], float]:
    """(kernel ids started, errors, seconds): `count` sessions, each with a new kernel, at most
    --start-concurrency at a time; after 10 errors the rest are not tried."""
    sem = asyncio.Semaphore(a.start_concurrency)
    ids: list[str] = []
    errors: list[str] = []

    async def one(i: int) -> None:
        async with sem:
            if len(errors) >= 10 or server.proc.poll() is not None:
                return
            body = {
                "path": f"scale/notebook-{i}.ipynb",
                "name": f"notebook-{i}.ipynb",
                "type": "notebook",
                "kernel": {"name": KERNEL_NAME},
            }
            try:
                code, model = await http(server, "POST", "api/sessions", body, timeout=180)
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}")
                return
            if code != 201 or not isinstance(model, dict) or "kernel" not in model:
                errors.append(f"POST /api/sessions -> {code} {str(model)[:300]}")
                return
            ids.append(model["kernel"]["id"])

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(first, first + count)))
    return ids, errors, time.perf_counter() - t0


async def snapshot(server: Server, runtime_dir: Path) -> dict[str, Any]:
    pid = server.proc.pid
    kpids = kernel_pids(runtime_dir)
    return {
        "rss_MB": rss_kb(pid) / 1024,
        **sockets_of(pid, runtime_dir),
        "kernel_processes": len(kpids),
        "kernels_pss_MB": sum(pss_kb(p) for p in kpids) / 1024,
    }


async def idle_cpu(server: Server, runtime_dir: Path, seconds: float) -> dict[str, Any]:
    pid = server.proc.pid
    kpids = kernel_pids(runtime_dir)
    g0, k0, m0, t0 = cpu_ticks(pid), kernels_ticks(kpids), machine_ticks(), time.monotonic()
    await asyncio.sleep(seconds)
    g1, k1, m1, t1 = cpu_ticks(pid), kernels_ticks(kpids), machine_ticks(), time.monotonic()
    wall = t1 - t0
    return {
        "idle_seconds": round(wall, 1),
        "idle_cpu_pct": 100 * (g1 - g0) / CLK_TCK / wall,
        "idle_kernels_cpu_pct": 100 * (k1 - k0) / CLK_TCK / wall,
        # all cores: 200 % is a 2-core machine fully busy; ours and the kernels are in it
        "idle_machine_cpu_pct": 100
        * (m1[0] - m0[0])
        / max(1, m1[1] - m0[1])
        * (os.cpu_count() or 1),
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
    }


async def list_latency(server: Server, a: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, key in (("api/kernels", "list_kernels"), ("api/sessions", "list_sessions")):
        await timed_get(server, path)  # warm-up
        times = []
        count = -1
        for _ in range(a.list_requests):
            ms, code, body = await timed_get(server, path)
            if code != 200:
                raise RuntimeError(f"GET /{path} -> {code} {str(body)[:200]}")
            times.append(ms)
            count = len(body) if isinstance(body, list) else -1
        out[f"{key}_ms"] = statistics.median(times)
        out[f"{key}_max_ms"] = max(times)
        out[f"{key}_count"] = count
    return out


async def start_latency(server: Server, a: argparse.Namespace) -> dict[str, Any]:
    times, posts = [], []
    for _ in range(a.starts):
        k, t_post, elapsed = await WsKernel.start(server, a.protocol == "v1", False, ws_library(a))
        times.append(elapsed)
        posts.append(t_post)
        await k.stop()
    return {
        "start_s": statistics.median(times),
        "start_post_s": statistics.median(posts),
        "start_runs_s": times,
    }


async def execute_loop(k: WsKernel, until: float, times: list[float]) -> None:
    while time.perf_counter() < until:
        t0 = time.perf_counter()
        r = await k.execute(TINY)
        times.append((time.perf_counter() - t0) * 1000)
        if r.reply_status != "ok":
            raise RuntimeError(f"execute_reply status {r.reply_status!r}")


async def paced_loop(k: WsKernel, start: float, until: float, rate: float, out: list[float]) -> int:
    """One execute every 1/rate s from a random phase; returns how many were sent late (the
    previous one was still running at the scheduled time)."""
    period = 1 / rate
    at = start + random.uniform(0, period)
    late = 0
    while at < until:
        now = time.perf_counter()
        if at > now:
            await asyncio.sleep(at - now)
        else:
            late += 1
        t0 = time.perf_counter()
        r = await k.execute(TINY)
        out.append((time.perf_counter() - t0) * 1000)
        if r.reply_status != "ok":
            raise RuntimeError(f"execute_reply status {r.reply_status!r}")
        at += period
    return late


def round_stats(
    prefix: str, per_client: list[list[float]], wall: float, cpu: dict[str, float]
) -> dict[str, Any]:
    """A round's figures: executes/s, p50/p99 round trip, and the CPU of the gateway, the
    clients and the kernels, as % of one core and as ms per execute."""
    allrt = [x for lst in per_client for x in lst]
    out: dict[str, Any] = {
        f"{prefix}_executes_per_s": len(allrt) / wall,
        f"{prefix}_p50_ms": pct(allrt, 0.5),
        f"{prefix}_p99_ms": pct(allrt, 0.99),
    }
    for who, seconds in cpu.items():  # gateway, client, kernels: CPU seconds
        if who in ("machine", "span"):
            continue
        out[f"{prefix}_{who}_cpu_pct"] = 100 * seconds / wall
        out[f"{prefix}_{who}_cpu_ms_per_execute"] = 1000 * seconds / max(1, len(allrt))
    out[f"{prefix}_machine_cpu_pct"] = 100 * cpu["machine"] / cpu["span"]  # over its own span
    return out


class Clocks:
    """CPU seconds of the gateway, this process, the kernels and the machine since start()."""

    def __init__(self, server: Server | None, kernel_pids: list[int]) -> None:
        self.server = server
        self.kpids = kernel_pids

    def _now(self) -> tuple[float, float, float, int, float]:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        gw = cpu_ticks(self.server.proc.pid) / CLK_TCK if self.server else 0.0
        kernels = kernels_ticks(self.kpids) / CLK_TCK
        return gw, ru.ru_utime + ru.ru_stime, kernels, machine_ticks()[0], time.monotonic()

    def start(self) -> None:
        self.t0 = self._now()

    def since(self, client_cpu: float | None = None) -> dict[str, float]:
        """`client_cpu`: the clients' own figure, when they are another process (node)."""
        (g0, me0, k0, m0, t0), (g1, me1, k1, m1, t1) = self.t0, self._now()
        out = {
            "client": me1 - me0 if client_cpu is None else client_cpu,
            "kernels": k1 - k0,
            "machine": (m1 - m0) / CLK_TCK,  # busy jiffies of all cores: CPU seconds
            "span": t1 - t0,
        }
        if self.server is not None:
            out["gateway"] = g1 - g0
        return out


async def node_round(
    server: Server,
    ids: list[str],
    a: argparse.Namespace,
    seconds: float,
    rate: float,
    clocks: Clocks,
) -> tuple[dict[str, Any], dict[str, float]]:
    """One round through bench/scaleclient.js: (its result, the CPU over the round)."""
    proc = await asyncio.create_subprocess_exec(
        "node",
        str(NODE_CLIENT),
        server.ws_url,
        server.token,
        a.protocol,
        str(seconds),
        str(rate),
        limit=1 << 26,  # the result is one line of every round trip's time
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(json.dumps(ids).encode())
    proc.stdin.close()
    try:
        line = await proc.stdout.readline()
        if not line.startswith(b'{"round"'):
            raise RuntimeError(f"bench/scaleclient.js: {line[:300]!r} (exit {await proc.wait()})")
        clocks.start()
        result = json.loads(await proc.stdout.readline())
        cpu = clocks.since(result["cpu_s"])
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await proc.wait()
    return result, cpu


async def clients_workload_node(
    server: Server, ids: list[str], a: argparse.Namespace, kpids: list[int]
) -> dict[str, Any]:
    """single, busy and paced with --client node: each round one Node process, its sockets
    opened (and warmed up) before the round's clocks start."""
    clocks = Clocks(server, kpids)
    out: dict[str, Any] = {}
    single, cpu = await node_round(server, ids[:1], a, a.single_seconds, 0, clocks)
    out |= round_stats("single", single["times_ms"], single["wall_s"], cpu)
    n = min(a.clients, len(ids))
    out["clients"] = n
    log(f"    {n} node clients busy for {a.busy_seconds:g} s ...")
    busy, cpu = await node_round(server, ids[:n], a, a.busy_seconds, 0, clocks)
    out |= round_stats("busy", busy["times_ms"], busy["wall_s"], cpu)
    out["busy_fewest_per_client"] = min(len(x) for x in busy["times_ms"])
    out["busy_most_per_client"] = max(len(x) for x in busy["times_ms"])
    out["busy_p99_over_single_p99"] = out["busy_p99_ms"] / out["single_p99_ms"]
    if a.paced_rate > 0:
        log(f"    {n} node clients paced at {a.paced_rate:g}/s for {a.busy_seconds:g} s ...")
        paced, cpu = await node_round(server, ids[:n], a, a.busy_seconds, a.paced_rate, clocks)
        out |= round_stats("paced", paced["times_ms"], paced["wall_s"], cpu)
        out["paced_offered_per_s"] = a.paced_rate * n
        out["paced_late"] = paced["late"]
        out["paced_p99_over_single_p99"] = out["paced_p99_ms"] / out["single_p99_ms"]
    return out


async def clients_workload(
    server: Server, ids: list[str], a: argparse.Namespace, kpids: list[int]
) -> dict[str, Any]:
    """single, then busy and paced over --clients websockets to as many kernels."""
    if a.client == "node":
        return await clients_workload_node(server, ids, a, kpids)
    clocks = Clocks(server, kpids)
    out: dict[str, Any] = {}
    single = await connect(server, ids[0], a)
    try:
        for _ in range(20):  # warm-up
            await single.execute(TINY)
        times: list[float] = []
        clocks.start()
        t0 = time.perf_counter()
        await execute_loop(single, t0 + a.single_seconds, times)
        out |= round_stats("single", [times], time.perf_counter() - t0, clocks.since())
    finally:
        await close_quietly(single)

    sem = asyncio.Semaphore(20)

    async def open_one(kid: str) -> WsKernel:
        async with sem:
            return await connect(server, kid, a)

    n = min(a.clients, len(ids))
    opened = await asyncio.gather(*(open_one(k) for k in ids[:n]), return_exceptions=True)
    clients = [c for c in opened if isinstance(c, WsKernel)]
    failed = [c for c in opened if isinstance(c, BaseException)]
    try:
        if failed:
            raise RuntimeError(
                f"{len(failed)} of {n} websockets failed; first: {type(failed[0]).__name__}: "
                f"{failed[0]}"
            )
        out["clients"] = n
        await asyncio.gather(*(c.execute(TINY) for c in clients))  # warm-up, all at once
        per_client: list[list[float]] = [[] for _ in clients]
        log(f"    {n} clients busy for {a.busy_seconds:g} s ...")
        clocks.start()
        t0 = time.perf_counter()
        until = t0 + a.busy_seconds
        await asyncio.gather(
            *(execute_loop(c, until, per_client[i]) for i, c in enumerate(clients))
        )
        out |= round_stats("busy", per_client, time.perf_counter() - t0, clocks.since())
        out["busy_fewest_per_client"] = min(len(x) for x in per_client)
        out["busy_most_per_client"] = max(len(x) for x in per_client)
        out["busy_p99_over_single_p99"] = out["busy_p99_ms"] / out["single_p99_ms"]
        if a.paced_rate > 0:
            paced: list[float] = []
            log(f"    {n} clients paced at {a.paced_rate:g}/s for {a.busy_seconds:g} s ...")
            clocks.start()
            t0 = time.perf_counter()
            until = t0 + a.busy_seconds
            lates = await asyncio.gather(
                *(paced_loop(c, t0, until, a.paced_rate, paced) for c in clients)
            )
            out |= round_stats("paced", [paced], time.perf_counter() - t0, clocks.since())
            out["paced_offered_per_s"] = a.paced_rate * len(clients)
            out["paced_late"] = sum(lates)
            out["paced_p99_over_single_p99"] = out["paced_p99_ms"] / out["single_p99_ms"]
    finally:
        await asyncio.gather(*(close_quietly(c) for c in clients))
    return out


async def direct_target(a: argparse.Namespace, tmp: Path, exe: Path) -> dict[str, Any]:
    """The `direct` reference (bench/scaledirect.py): the same rounds with no gateway."""
    out: dict[str, Any] = {"by_n": {}}
    for n in a.n:
        rec: dict[str, Any] = {"kernels": n}
        out["by_n"][n] = rec
        procs, infos = scaledirect.launch(exe, tmp / f"direct-{n}", min(n, a.clients))
        clocks = Clocks(None, [p.pid for p in procs])
        try:
            log(f"  direct: {len(infos)} stand-ins; single, busy, paced ...")
            for prefix, count, seconds, rate in (
                ("single", 1, a.single_seconds, 0.0),
                ("busy", len(infos), a.busy_seconds, 0.0),
                ("paced", len(infos), a.busy_seconds, a.paced_rate),
            ):
                if prefix == "paced" and rate <= 0:
                    continue
                r = await asyncio.to_thread(scaledirect.run, infos[:count], 0.0)  # warm-up
                clocks.start()
                r = await asyncio.to_thread(scaledirect.run, infos[:count], seconds, rate)
                # the round's own CPU (run() measures after its sockets are ready)
                cpu = clocks.since(r["cpu_s"])
                rec |= round_stats(prefix, r["times_ms"], r["wall_s"], cpu)
            rec["clients"] = len(infos)
            if a.paced_rate > 0:
                rec["paced_offered_per_s"] = a.paced_rate * len(infos)
            rec["busy_p99_over_single_p99"] = rec["busy_p99_ms"] / rec["single_p99_ms"]
            log(f"  direct: N={n} done: " + summary(rec))
        finally:
            scaledirect.stop(procs)
    return out


# -- one target ----------------------------------------------------------------------------------


async def phase(
    name: str, coro: Any, seconds: float, rec: dict[str, Any], a: argparse.Namespace
) -> bool:
    """Run one measurement, bounded; a failure is recorded under problems and returns False."""
    t0 = time.perf_counter()
    try:
        rec.update(await asyncio.wait_for(coro, seconds))
        return True
    except Exception as e:
        kind = "timed out" if isinstance(e, TimeoutError) else f"{type(e).__name__}: {e}"
        msg = f"{name} failed after {time.perf_counter() - t0:.1f} s: {kind}"
        log(f"    {msg}")
        if a.verbose:
            traceback.print_exc()
        rec.setdefault("problems", []).append(msg)
        return False


async def bench_target(
    name: str, a: argparse.Namespace, tmp: Path, reaper: Reaper
) -> dict[str, Any]:
    """Each N on a fresh gateway process, so that no N inherits an earlier one's clients (the
    allocator's high-water mark, sessions and sockets a gateway keeps after a close)."""
    out: dict[str, Any] = {"by_n": {}}
    for n in a.n:
        rec: dict[str, Any] = {}
        out["by_n"][n] = rec
        await one_n(name, n, a, tmp, reaper, rec)
        if rec.get("stopped"):
            out["held_at_most"] = rec["kernels"]
            out["stopped"] = rec["stopped"]
            break
    return out


async def one_n(
    name: str, n: int, a: argparse.Namespace, tmp: Path, reaper: Reaper, rec: dict[str, Any]
) -> None:
    server = Server(name, tmp)
    server.kernel_name = KERNEL_NAME
    runtime_dir = tmp / f"runtime-{server.port}"
    try:
        await server.wait_ready()
        # warm-up: first imports and kernelspec lookups, then RSS at 0 kernels
        k, _, _ = await asyncio.wait_for(
            WsKernel.start(server, a.protocol == "v1", False, ws_library(a)), 120
        )
        await k.execute(TINY)
        await k.stop()
        await asyncio.sleep(2)
        base = await snapshot(server, runtime_dir)
        rec["at_0"] = base
        log(f"  {name}: N={n}: RSS at 0 kernels {base['rss_MB']:.1f} MB; starting kernels ...")
        ids, errors, secs = await start_sessions(server, 0, n, a)
        rec["start_all_s"] = secs
        rec["kernels"] = len(ids)
        if errors or len(ids) < n:
            reason = errors[0] if errors else "server exited"
            if server.proc.poll() is not None:
                reason += f" (server exited with {server.proc.returncode})"
            rec["stopped"] = f"at {len(ids)} of {n} kernels: {reason}"
            rec["stopped_errors"] = errors[:5]
            rec["log_tail"] = server.log_tail(40)
            log(f"  {name}: stopped {rec['stopped']}")
            return
        log(f"  {name}: N={n}: up in {secs:.1f} s; settling {a.settle:g} s")
        await asyncio.sleep(a.settle)
        snap = await snapshot(server, runtime_dir)
        rec.update(snap)
        rec["rss_per_kernel_KB"] = (snap["rss_MB"] - base["rss_MB"]) * 1024 / n
        log(f"  {name}: N={n}: idle CPU over {a.idle_seconds:g} s ...")
        await phase(
            "idle cpu", idle_cpu(server, runtime_dir, a.idle_seconds), a.idle_seconds + 30, rec, a
        )
        log(f"  {name}: N={n}: list latency, start latency, clients ...")
        await phase("list", list_latency(server, a), 300, rec, a)
        await phase("start", start_latency(server, a), 60 + 60 * a.starts, rec, a)
        await phase(
            "clients",
            clients_workload(server, ids, a, kernel_pids(runtime_dir)),
            120 + a.single_seconds + 2 * a.busy_seconds,
            rec,
            a,
        )
        after = await snapshot(server, runtime_dir)
        rec["rss_after_clients_MB"] = after["rss_MB"]
        rec["zmq_tcp_after_clients"] = after["zmq_tcp"]
        if server.proc.poll() is not None:
            rec["stopped"] = f"server exited with {server.proc.returncode} at N={n}"
        log(f"  {name}: N={n} done: " + summary(rec))
        if rec.get("problems"):
            rec["log_tail"] = server.log_tail(40)
    finally:
        t0 = time.perf_counter()
        rec["stop_kernels"] = len(kernel_pids(runtime_dir))
        await server.stop()  # SIGTERM: the gateway stops its kernels; SIGKILL after 30 s
        rec["stop_s"] = time.perf_counter() - t0
        left = await reaper.settle(set(), 10)
        if left:
            rec["left_after_stop"] = len(left)
            log(f"  {name}: {len(left)} process(es) left after stopping the server: killed")
        reaper.kill_all()


def summary(rec: dict[str, Any]) -> str:
    keys = (
        ("rss_per_kernel_KB", "KB/kernel", ".0f"),
        ("idle_cpu_pct", "idle CPU %", ".2f"),
        ("list_kernels_ms", "list ms", ".1f"),
        ("start_s", "start s", ".3f"),
        ("busy_executes_per_s", "exec/s", ".0f"),
        ("busy_p99_ms", "busy p99 ms", ".1f"),
    )
    return ", ".join(f"{label} {rec[k]:{f}}" for k, label, f in keys if k in rec)


# -- report --------------------------------------------------------------------------------------

ROWS: list[tuple[str, str, str]] = [
    # key, label, format
    ("kernels", "kernels held", "d"),
    ("rss0_MB", "gateway RSS at 0 kernels MB", ".1f"),
    ("start_all_s", "  seconds to start them", ".1f"),
    ("rss_MB", "gateway RSS MB", ".1f"),
    ("rss_per_kernel_KB", "gateway RSS per kernel KB", ".0f"),
    ("idle_cpu_pct", "idle CPU % of one core", ".2f"),
    ("idle_kernels_cpu_pct", "  kernels' CPU % (all)", ".2f"),
    ("idle_machine_cpu_pct", "  machine CPU % (all cores)", ".1f"),
    ("list_kernels_ms", "GET /api/kernels ms", ".1f"),
    ("list_kernels_max_ms", "  max ms", ".1f"),
    ("list_sessions_ms", "GET /api/sessions ms", ".1f"),
    ("list_sessions_max_ms", "  max ms", ".1f"),
    ("start_s", "start: POST..kernel_info_reply s", ".3f"),
    ("fds", "file descriptors", "d"),
    ("fd_eventfds", "  eventfds (~ZMQ sockets)", "d"),
    ("zmq_tcp", "TCP connections to kernels", "d"),
    ("zmq_iopub", "  iopub", "d"),
    ("zmq_control", "  control", "d"),
    ("zmq_shell", "  shell", "d"),
    ("zmq_hb", "  hb", "d"),
    ("kernels_pss_MB", "kernel processes' PSS MB", ".0f"),
    ("single_p50_ms", "1 client: p50 ms", ".2f"),
    ("single_p99_ms", "1 client: p99 ms", ".2f"),
    ("busy_executes_per_s", "{c} clients: executes/s", ".0f"),
    ("busy_p50_ms", "{c} clients: p50 ms", ".1f"),
    ("busy_p99_ms", "{c} clients: p99 ms", ".1f"),
    ("busy_p99_over_single_p99", "  p99 / 1-client p99", ".1f"),
    ("busy_gateway_cpu_pct", "  gateway CPU %", ".0f"),
    ("busy_client_cpu_pct", "  bench client CPU %", ".0f"),
    ("busy_kernels_cpu_pct", "  kernels' CPU %", ".0f"),
    ("busy_machine_cpu_pct", "  machine CPU % (all cores)", ".0f"),
    ("busy_gateway_cpu_ms_per_execute", "  gateway CPU ms per execute", ".2f"),
    ("busy_client_cpu_ms_per_execute", "  client CPU ms per execute", ".2f"),
    ("busy_kernels_cpu_ms_per_execute", "  kernels' CPU ms per execute", ".2f"),
    ("paced_offered_per_s", "paced: offered executes/s", ".0f"),
    ("paced_p50_ms", "paced: p50 ms", ".1f"),
    ("paced_p99_ms", "paced: p99 ms", ".1f"),
    ("paced_p99_over_single_p99", "  p99 / 1-client p99", ".1f"),
    ("paced_gateway_cpu_pct", "  gateway CPU %", ".0f"),
    ("paced_client_cpu_pct", "  bench client CPU %", ".0f"),
    ("paced_machine_cpu_pct", "  machine CPU % (all cores)", ".0f"),
    ("rss_after_clients_MB", "gateway RSS after clients MB", ".1f"),
    ("stop_s", "SIGTERM to exit, N kernels s", ".1f"),
    ("left_after_stop", "  processes left (killed)", "d"),
]

# the targets, checked on ours at the N they name (None: every N)
GOALS: list[tuple[str, str, float, int | None]] = [
    ("idle_cpu_pct", "idle CPU < 2% of one core at 1,000", 2.0, 1000),
    ("rss_per_kernel_KB", "RSS < 100 KB per idle kernel", 100.0, None),
    ("list_kernels_ms", "GET /api/kernels < 50 ms at 1,000", 50.0, 1000),
    ("busy_p99_over_single_p99", "busy p99 < 3x single-client p99", 3.0, None),
    ("paced_p99_over_single_p99", "(paced, not the issue's) p99 < 3x single", 3.0, None),
]


def flat(rec: dict[str, Any]) -> dict[str, Any]:
    f = dict(rec)
    if "at_0" in rec:
        f["rss0_MB"] = rec["at_0"]["rss_MB"]
    for ch, v in (rec.get("zmq_tcp_by_channel") or {}).items():
        f[f"zmq_{ch}"] = v
    return f


def table(results: dict[str, dict[str, Any]], a: argparse.Namespace) -> str:
    cols = [t for t in ("ours", "jkg", "direct") if t in results]
    ratio = "ours" in cols and "jkg" in cols
    w = 34
    head = "metric".ljust(w) + "".join(c.rjust(12) for c in cols) + ("ours/jkg".rjust(10) * ratio)
    lines = [head, "-" * len(head)]
    for n in a.n:
        recs = {t: flat(results[t]["by_n"].get(n, {})) for t in cols}
        if not any(recs.values()):
            continue
        lines.append(f"N = {n}")
        for key, label, fmt in ROWS:
            vals = {t: recs[t].get(key) for t in cols}
            if all(v is None for v in vals.values()):
                continue
            cells = "".join(
                (format(v, fmt) if isinstance(v, int | float) else "-").rjust(12)
                for v in vals.values()
            )
            r = ""
            if ratio:
                x, y = vals["ours"], vals["jkg"]
                if isinstance(x, int | float) and isinstance(y, int | float) and y:
                    r = f"{x / y:.2f}x"
            lines.append("  " + label.format(c=a.clients).ljust(w - 2) + cells + r.rjust(10))
    for t in cols:
        if results[t].get("stopped"):
            lines.append(f"{t} stopped {results[t]['stopped']}")
    return "\n".join(lines)


def goals(results: dict[str, dict[str, Any]], a: argparse.Namespace) -> list[str]:
    ours = results.get("ours")
    if not ours:
        return []
    lines = []
    for key, label, limit, at in GOALS:
        for n in a.n if at is None else [at]:
            v = ours["by_n"].get(n, {}).get(key)
            if isinstance(v, int | float):
                lines.append(f"  {'met ' if v < limit else 'MISS'}  {label}: {v:.2f} at N={n}")
            elif at is not None or n == max(a.n):
                lines.append(f"  ?     {label}: not measured at N={n}")
    return lines


def environment(a: argparse.Namespace) -> dict[str, Any]:
    """bench.py's machine(), and what a scale run also depends on."""
    try:
        dirty = bool(
            subprocess.run(
                ["git", "-C", str(ROOT), "status", "--porcelain", "--", "gateway"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
        )
    except OSError:
        dirty = False
    mem = next(
        (
            ln.split()[1]
            for ln in Path("/proc/meminfo").read_text().splitlines()
            if "MemTotal" in ln
        ),
        "0",
    )
    return {
        **machine(),
        "gateway_uncommitted_changes": dirty,
        "memory_GB": round(int(mem) / 1024 / 1024, 1),
        "kernel": platform.release(),
        "nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
        "args": {k: v for k, v in vars(a).items() if k != "out"},
    }


def raise_nofile() -> tuple[int, int]:
    """The soft limit up to the hard one (and the hard one up, when allowed): the kernels,
    their ZMQ connections and the clients' sockets must not be capped by the default 1024.
    Children inherit it."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(hard, 65536), max(hard, 65536)))
        return resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def zmq_max_sockets_shim(tmp: Path, limit: int) -> Path:
    """Diagnostic only (--zmq-max-sockets): a sitecustomize that sets ZMQ_MAX_SOCKETS on every
    pyzmq context the gateway process creates, before its first socket (libzmq's default is
    1023 sockets per context). Measures past that cap without changing either gateway."""
    d = tmp / "zmq-shim"
    d.mkdir()
    (d / "sitecustomize.py").write_text(
        "import zmq\n"
        "_init = zmq.Context.__init__\n"
        "def _patched(self, *a, **kw):\n"
        "    _init(self, *a, **kw)\n"
        f"    self.set(zmq.MAX_SOCKETS, {limit})\n"
        "zmq.Context.__init__ = _patched\n"
    )
    return d


async def run(a: argparse.Namespace, reaper: Reaper) -> dict[str, dict[str, Any]]:
    from tornado.httpclient import AsyncHTTPClient

    AsyncHTTPClient.configure(None, max_clients=max(64, 2 * a.start_concurrency))
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="rkg-scale-") as tmp_name:
        tmp = Path(tmp_name)
        exe = build_standin(tmp)
        data = write_kernelspec(tmp, exe)
        # both gateways find the kernelspec on the Jupyter path (and pass the variable on)
        os.environ["JUPYTER_PATH"] = os.pathsep.join(
            [str(data), *filter(None, [os.environ.get("JUPYTER_PATH")])]
        )
        if a.zmq_max_sockets:
            shim = zmq_max_sockets_shim(tmp, a.zmq_max_sockets)
            os.environ["PYTHONPATH"] = os.pathsep.join(
                [str(shim), *filter(None, [os.environ.get("PYTHONPATH")])]
            )
        for name in a.targets:
            log(f"{name} ...")
            t0 = time.perf_counter()
            try:
                if name == "direct":
                    results[name] = await direct_target(a, tmp, exe)
                else:
                    results[name] = await bench_target(name, a, tmp, reaper)
            except Exception as e:
                log(f"  {name}: failed: {type(e).__name__}: {e}")
                if a.verbose:
                    traceback.print_exc()
                results[name] = {"by_n": {}, "stopped": f"{type(e).__name__}: {e}"}
            results[name]["bench_seconds"] = round(time.perf_counter() - t0, 1)
    return results


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--quick", action="store_true", help="N=20,50, short windows: a smoke run")
    p.add_argument(
        "--targets",
        default="ours,jkg",
        help="comma-separated: ours, jkg, direct (no gateway: clients on ZMQ to the stand-ins)",
    )
    p.add_argument("--n", help="comma-separated kernel counts, ascending (100,300,1000)")
    p.add_argument("--idle-seconds", type=float, help="idle CPU window (60; quick 10)")
    p.add_argument("--settle", type=float, default=5, help="seconds after the starts (5)")
    p.add_argument("--busy-seconds", type=float, help="busy and paced windows (10; quick 4)")
    p.add_argument("--single-seconds", type=float, help="single-client window (5; quick 2)")
    p.add_argument("--clients", type=int, help="concurrent clients (100; quick 20)")
    p.add_argument(
        "--paced-rate", type=float, default=2.0, help="paced executes/s per client (2; 0: off)"
    )
    p.add_argument("--starts", type=int, default=5, help="start latency samples (5)")
    p.add_argument("--list-requests", type=int, default=20, help="GET samples per list (20)")
    p.add_argument("--start-concurrency", type=int, default=20, help="starts at once (20)")
    p.add_argument("--protocol", choices=("v1", "legacy"), default="v1", help="websocket (v1)")
    p.add_argument(
        "--client",
        choices=("aiohttp", "websockets", "node"),
        default="aiohttp",
        help="clients rounds' websocket client (aiohttp: frames parsed in C; node: Node's ws "
        "in its own process, bench/scaleclient.js, the lightest)",
    )
    p.add_argument(
        "--zmq-max-sockets",
        type=int,
        default=0,
        help="diagnostic: raise ZMQ_MAX_SOCKETS (default 1023) in both gateway processes",
    )
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("-v", "--verbose", action="store_true", help="tracebacks of failures")
    a = p.parse_args()
    q = a.quick
    for attr, full, quick in (
        ("n", "100,300,1000", "20,50"),
        ("idle_seconds", 60.0, 10.0),
        ("busy_seconds", 10.0, 4.0),
        ("single_seconds", 5.0, 2.0),
        ("clients", 100, 20),
    ):
        if getattr(a, attr) is None:
            setattr(a, attr, quick if q else full)
    a.n = sorted({int(x) for x in str(a.n).split(",") if x.strip()})
    a.targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    for t in a.targets:
        if t not in ("ours", "jkg", "direct"):
            p.error(f"unknown target {t!r} (ours, jkg, direct)")
    if a.client == "node" and not shutil.which("node"):
        p.error("--client node needs node on the PATH (and tests/js/node_modules: ./dev test)")

    nofile = raise_nofile()
    reaper = Reaper()

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    t0 = time.perf_counter()
    try:
        results = asyncio.run(run(a, reaper))
    except KeyboardInterrupt:
        log("interrupted: stopping everything")
        return 130
    finally:
        killed = reaper.kill_all()
        if killed:
            log(f"killed {len(killed)} leftover process(es)")
    env = environment(a)
    env["run_seconds"] = round(time.perf_counter() - t0, 1)

    print()
    print(
        f"remote-kernel-gateway scale bench: {os.cpu_count()} CPUs, {env['memory_GB']} GB, "
        f"Linux {env['kernel']}; stand-in kernels (bench/standin, one process each); "
        f"nofile {nofile[0]}; {a.protocol} websockets with {a.client}, no session_id"
    )
    print(
        f"idle CPU over {a.idle_seconds:g} s; lists: median of {a.list_requests}; start: median "
        f"of {a.starts}; {a.clients} clients for {a.busy_seconds:g} s (busy: back to back; "
        f"paced: {a.paced_rate:g}/s each); single client {a.single_seconds:g} s"
        + (f"; DIAGNOSTIC ZMQ_MAX_SOCKETS={a.zmq_max_sockets}" if a.zmq_max_sockets else "")
    )
    print()
    print(table(results, a))
    met = goals(results, a)
    if met:
        print("\nthe issue's targets, ours:")
        print("\n".join(met))
    problems = [
        (t, n, m)
        for t, r in results.items()
        for n, rec in r.get("by_n", {}).items()
        for m in rec.get("problems", [])
    ]
    if problems:
        print("\nproblems:")
        for t, n, m in problems:
            print(f"  {t} N={n}: {m}")
    print(f"\nwhole run: {env['run_seconds']:.0f} s")
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / time.strftime("scale-%Y%m%d-%H%M%S.json")
    path.write_text(json.dumps({"environment": env, "results": results}, indent=1, default=str))
    print(f"written to {path}")
    # JKG falling over is a finding, not a failure of the run
    ours = results.get("ours", {})
    failed = any(t == "ours" for t, _, _ in problems) or any(
        rec.get("left_after_stop") for rec in ours.get("by_n", {}).values()
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
