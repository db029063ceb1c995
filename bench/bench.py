"""Speed, side by side in one run on the same workload: a direct jupyter_client connection (no
gateway: the baseline), remote-kernel-gateway, and Jupyter Kernel Gateway 3 (its defaults, and
with its IOPub rate limit off). Local python3 kernels; everything on 127.0.0.1.

    .venv/bin/python bench/bench.py            # full run, ~5 minutes on 2 cores
    .venv/bin/python bench/bench.py --quick    # smoke run, ~1 minute
    .venv/bin/python bench/bench.py --targets direct,ours --only roundtrip

Prints a table of medians and ratios (target / direct, ours / JKG) and writes the figures to
bench/results/<time>.json. JKG needs `pip install -e .[bench]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from jupyter_client.manager import AsyncKernelManager

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from conftest import free_port  # noqa: E402
from gwclient import KernelSocket, api  # noqa: E402

PRINT_50MB = ("import sys\nfor _ in range(50):\n"
              "    sys.stdout.write('x' * 999_999 + '\\n'); sys.stdout.flush()")
DISPLAY_20MB = ("from IPython.display import display\n"
                "display({'text/plain': 'y' * 20_000_000}, raw=True)")
MB = 1_000_000


# -- targets ---------------------------------------------------------------------------------


class Server:
    """A gateway process: ours or JKG. Has what gwclient needs (.url, .ws_url, .token)."""

    def __init__(self, name: str, args: list[str], port: int, token: str, tmp: Path) -> None:
        self.name, self.port, self.token = name, port, token
        self.url = f"http://127.0.0.1:{port}/"
        self.ws_url = f"ws://127.0.0.1:{port}/"
        env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp / f"runtime-{port}")}
        self.log = open(tmp / f"{name}.log", "wb")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    async def wait(self) -> None:
        for _ in range(300):
            try:
                if (await api(self, "GET", "api/kernels"))[0] == 200:
                    return
            except OSError:
                pass
            await asyncio.sleep(0.1)
        raise RuntimeError(f"{self.name} did not start")

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
        return kb / 1024

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.log.close()


def make_server(name: str, tmp: Path) -> Server:
    port, token = free_port(), secrets.token_hex(16)
    if name == "ours":
        args = [sys.executable, "-m", "gateway", "serve", "--ip", "127.0.0.1", "--port",
                str(port), "--token", token, "--state-db", str(tmp / "state.sqlite"),
                "--log-level", "WARNING"]
    else:
        jkg = shutil.which("jupyter-kernelgateway", path=str(Path(sys.executable).parent))
        if not jkg:
            raise RuntimeError("Jupyter Kernel Gateway is not installed: pip install -e .[bench]")
        args = [jkg, "--KernelGatewayApp.ip=127.0.0.1", f"--KernelGatewayApp.port={port}",
                f"--KernelGatewayApp.auth_token={token}", "--KernelGatewayApp.log_level=WARN",
                "--JupyterWebsocketPersonality.list_kernels=True"]
        if name == "jkg-nolimit":
            args.append("--ZMQChannelsWebsocketConnection.limit_rate=False")
    return Server(name, args, port, token, tmp)


class Direct:
    """The baseline: jupyter_client talking ZMQ to the kernel, no gateway in between."""

    name = "direct"

    async def start(self) -> tuple[AsyncKernelManager, Any]:
        km = AsyncKernelManager(kernel_name="python3")
        await km.start_kernel()
        kc = km.client()
        kc.start_channels()
        await kc.wait_for_ready(timeout=60)
        return km, kc

    @staticmethod
    async def stop(handle: tuple[AsyncKernelManager, Any]) -> None:
        km, kc = handle
        kc.stop_channels()
        await km.shutdown_kernel(now=True)

    @staticmethod
    async def execute(handle: tuple[AsyncKernelManager, Any], code: str) -> dict[str, int]:
        _, kc = handle
        msg_id = kc.execute(code)
        got = {"stream": 0, "display": 0}
        idle = reply = False
        while not (idle and reply):
            if not reply:
                r = await kc.get_shell_msg(timeout=120)
                reply = r["parent_header"].get("msg_id") == msg_id
            while not idle:
                m = await kc.get_iopub_msg(timeout=120)
                if m["parent_header"].get("msg_id") != msg_id:
                    continue
                t = m["header"]["msg_type"]
                if t == "stream":
                    got["stream"] += len(m["content"]["text"])
                elif t == "display_data":
                    got["display"] += len(m["content"]["data"].get("text/plain", ""))
                idle = t == "status" and m["content"]["execution_state"] == "idle"
        return got


class ViaGateway:
    def __init__(self, server: Server, v1: bool) -> None:
        self.server, self.v1 = server, v1
        self.name = server.name

    async def start(self) -> tuple[str, KernelSocket]:
        status, model = await api(self.server, "POST", "api/kernels", {"name": "python3"})
        if status != 201:
            raise RuntimeError(f"{self.name}: start failed {status} {model}")
        ks = await KernelSocket.open(self.server, model["id"], v1=self.v1)
        await ks.reply_and_idle(await ks.send("kernel_info_request", {}), timeout=60)
        return model["id"], ks

    async def stop(self, handle: tuple[str, KernelSocket]) -> None:
        kid, ks = handle
        await ks.close()
        await api(self.server, "DELETE", f"api/kernels/{kid}")

    @staticmethod
    async def execute(handle: tuple[str, KernelSocket], code: str) -> dict[str, int]:
        _, ks = handle
        msg_id = await ks.send("execute_request", {"code": code, "silent": False})
        got = {"stream": 0, "display": 0}
        reply = idle = False
        while not (reply and idle):
            m = await ks.recv(timeout=120)
            if m["parent_header"].get("msg_id") != msg_id:
                continue
            t = m["header"]["msg_type"]
            if t == "stream":
                got["stream"] += len(m["content"]["text"])
            elif t == "display_data":
                got["display"] += len(m["content"]["data"].get("text/plain", ""))
            reply = reply or t == "execute_reply"
            idle = idle or (t == "status" and m["content"]["execution_state"] == "idle")
        return got


# -- workloads -------------------------------------------------------------------------------


async def timed(fn: Callable[[], Awaitable[Any]]) -> float:
    t0 = time.perf_counter()
    await fn()
    return time.perf_counter() - t0


async def start_latency(target: Any, n: int) -> dict[str, float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        handle = await target.start()
        times.append(time.perf_counter() - t0)
        await target.stop(handle)
    return {"start_s": statistics.median(times)}


async def roundtrip(target: Any, n: int) -> dict[str, float]:
    handle = await target.start()
    try:
        for _ in range(20):  # warm up
            await target.execute(handle, "1")
        times = [await timed(lambda: target.execute(handle, "1")) for _ in range(n)]
    finally:
        await target.stop(handle)
    return {"roundtrip_ms": statistics.median(times) * 1000,
            "roundtrip_p95_ms": sorted(times)[int(0.95 * len(times))] * 1000}


async def throughput(target: Any) -> dict[str, float]:
    handle = await target.start()
    try:
        t0 = time.perf_counter()
        got = await target.execute(handle, PRINT_50MB)
        t_print = time.perf_counter() - t0
        t0 = time.perf_counter()
        shown = await target.execute(handle, DISPLAY_20MB)
        t_display = time.perf_counter() - t0
    finally:
        await target.stop(handle)
    return {"print_MBps": got["stream"] / MB / t_print,
            "print_delivered": got["stream"] / (50 * 1_000_000),
            "display_MBps": shown["display"] / MB / t_display,
            "display_delivered": shown["display"] / 20_000_000}


async def concurrent_starts(target: Any, n: int) -> dict[str, float]:
    t0 = time.perf_counter()
    handles = await asyncio.gather(*[target.start() for _ in range(n)])
    wall = time.perf_counter() - t0
    rss = target.server.rss_mb() if hasattr(target, "server") else float("nan")
    await asyncio.gather(*[target.stop(h) for h in handles])
    return {f"starts{n}_s": wall, f"rss{n}_MB": rss}


# -- the run ---------------------------------------------------------------------------------


async def bench_target(target: Any, args: argparse.Namespace) -> dict[str, float]:
    out: dict[str, float] = {}
    only = set(args.only.split(",")) if args.only else None
    if hasattr(target, "server"):
        out["rss_idle_MB"] = target.server.rss_mb()
    if not only or "start" in only:
        out |= await start_latency(target, args.starts)
    if not only or "roundtrip" in only:
        out |= await roundtrip(target, args.executes)
    if not only or "throughput" in only:
        out |= await throughput(target)
    if not only or "concurrent" in only:
        out |= await concurrent_starts(target, args.concurrent)
    return out


def table(results: dict[str, dict[str, float]]) -> str:
    rows = sorted({k for r in results.values() for k in r}, key=list(
        dict.fromkeys(k for r in results.values() for k in r)).index)
    names = list(results)
    lines = ["metric".ljust(22) + "".join(n.rjust(16) for n in names)
             + "  ours/direct  ours/jkg(v1)"]
    for row in rows:
        cells = "".join((f"{results[n][row]:16.3f}" if row in results[n] else " " * 16)
                        for n in names)
        ratios = []
        base = results.get("direct", {}).get(row)
        ours = results.get("ours-v1", {}).get(row)
        jkg = results.get("jkg-nolimit-v1", {}).get(row) or results.get("jkg-v1", {}).get(row)
        ratios.append(f"{ours / base:11.2f}" if ours and base else " " * 11)
        ratios.append(f"{ours / jkg:14.2f}" if ours and jkg else " " * 14)
        lines.append(row.ljust(22) + cells + "  " + "  ".join(ratios))
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    parser.add_argument("--targets", default="direct,ours,jkg,jkg-nolimit")
    parser.add_argument("--only", default="", help="start,roundtrip,throughput,concurrent")
    args = parser.parse_args()
    args.starts, args.executes, args.concurrent = (3, 200, 10) if args.quick else (5, 1000, 20)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="rkg-bench-") as tmp:
        for name in args.targets.split(","):
            if name == "direct":
                print("direct ...", flush=True)
                results["direct"] = await bench_target(Direct(), args)
                continue
            server = make_server(name, Path(tmp))
            try:
                await server.wait()
                for v1 in (False, True):
                    label = f"{name}-{'v1' if v1 else 'legacy'}"
                    print(f"{label} ...", flush=True)
                    results[label] = await bench_target(ViaGateway(server, v1), args)
            finally:
                server.stop()
    print()
    print(table(results))
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    path = out / time.strftime("%Y%m%d-%H%M%S.json")
    path.write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    print(f"\nwritten to {path.relative_to(ROOT)}")


if __name__ == "__main__":
    asyncio.run(main())
