"""Soak: kernels started, used and deleted continuously for a bounded time while the gateway is
restarted (twice by default: once with SIGTERM and --keep-kernels, once with kill -9).

Reports, and exits non-zero unless both are zero:
- lost: an execute_reply whose output is not exactly what the code printed, or a kernel that
  existed before a gateway restart and is gone after it;
- leftover: kernel processes still running after the final shutdown.
Executes cut by a restart (the socket closed before their reply) are counted as `interrupted`
and retried: the client sees them fail, nothing is dropped silently.

    .venv/bin/python bench/soak.py --seconds 180 --workers 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import websockets
from tornado.httpclient import HTTPClientError

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from conftest import GatewayProcess, free_port  # noqa: E402
from gwclient import KernelSocket, api  # noqa: E402


class Soak:
    def __init__(self, gw: GatewayProcess, deadline: float) -> None:
        self.gw = gw
        self.deadline = deadline
        self.stats: Counter[str] = Counter()
        self.up = asyncio.Event()
        self.up.set()
        self.problems: list[str] = []
        self.deleting: set[str] = set()

    async def call(self, method: str, path: str, body=None):
        """REST with retries while the gateway restarts."""
        for _ in range(200):
            await self.up.wait()
            try:
                status, body_ = await api(self.gw, method, path, body)
            except (OSError, HTTPClientError):  # refused, or cut by a restart
                await asyncio.sleep(0.1)
                continue
            if status != 599:
                return status, body_
            await asyncio.sleep(0.1)
        raise RuntimeError(f"{method} {path}: gateway unreachable")

    async def open(self, kid: str, session: str) -> KernelSocket:
        for _ in range(200):
            await self.up.wait()
            try:
                return await KernelSocket.open(self.gw, kid, session=session, v1=True)
            except (OSError, websockets.InvalidStatus, websockets.InvalidHandshake):
                await asyncio.sleep(0.1)
        raise RuntimeError(f"cannot reconnect to kernel {kid}")

    async def worker(self, n: int) -> None:
        while time.monotonic() < self.deadline:
            status, model = await self.call("POST", "api/kernels", {"name": "python3"})
            if status != 201:
                self.problems.append(f"start failed: {status} {model}")
                self.stats["start_failed"] += 1
                await asyncio.sleep(1)
                continue
            kid, session = model["id"], f"soak-{n}-{time.monotonic_ns()}"
            self.stats["kernels"] += 1
            ks = await self.open(kid, session)
            await ks.execute("acc = []")
            for i in range(40):
                if time.monotonic() > self.deadline:
                    break
                code = f"acc.append({i}); print('w{n}-{i}', len(acc))"
                while True:
                    try:
                        out, reply = await ks.execute(code, timeout=30)
                        break
                    except (websockets.ConnectionClosed, TimeoutError):
                        self.stats["interrupted"] += 1
                        status, _ = await self.call("GET", f"api/kernels/{kid}")
                        if status == 404:
                            self.stats["lost"] += 1
                            self.problems.append(f"kernel {kid} vanished across a restart")
                            return
                        ks = await self.open(kid, session)
                        # the cut execute may or may not have run: resynchronise the count
                        await ks.execute(f"acc[:] = range({i})")
                self.stats["executes"] += 1
                if reply.get("status") != "ok" or out != f"w{n}-{i} {i + 1}\n":
                    self.stats["lost"] += 1
                    self.problems.append(f"kernel {kid} exec {i}: {out!r} {reply.get('status')}")
            try:
                await ks.close()
            except Exception:
                pass
            self.deleting.add(kid)
            status, _ = await self.call("DELETE", f"api/kernels/{kid}")
            self.stats["deleted"] += status == 204

    async def restarter(self, times: int, seconds: float) -> None:
        for k in range(times):
            await asyncio.sleep(seconds / (times + 1))
            _, before = await self.call("GET", "api/kernels")
            # a start in flight at shutdown is undone (its client gets an error and retries)
            ids = {m["id"] for m in before if m["execution_state"] != "starting"}
            self.up.clear()
            how = "SIGTERM with --keep-kernels" if k % 2 == 0 else "kill -9"
            # synchronous on purpose: no thread can still be starting a gateway when the
            # run ends (an early version of this script orphaned one that way)
            self.gw.stop(signal.SIGTERM if k % 2 == 0 else signal.SIGKILL)
            self.gw.start()
            self.up.set()
            _, after = await self.call("GET", "api/kernels")
            # kernels their worker deleted since the first listing are not lost
            missing = ids - {m["id"] for m in after} - self.deleting
            self.stats["restarts"] += 1
            print(f"restart {k + 1} ({how}): {len(ids)} kernels before, {len(after)} after, "
                  f"{len(missing)} lost", flush=True)
            self.stats["not_back"] += len(missing)
            self.problems += [f"kernel {k} not back after restart" for k in missing]


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--restarts", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rkg-soak-") as tmp:
        gw = GatewayProcess(port=free_port(), token="soak", workdir=Path(tmp),
                            extra_args=["--keep-kernels"])
        gw.start()
        soak = Soak(gw, time.monotonic() + args.seconds)
        t0 = time.monotonic()
        try:
            async with asyncio.TaskGroup() as tasks:  # one failing cancels and awaits the rest
                for n in range(args.workers):
                    tasks.create_task(soak.worker(n))
                tasks.create_task(soak.restarter(args.restarts, args.seconds))
        finally:  # a final gateway without --keep-kernels stops what is left
            if gw.proc and gw.proc.poll() is None:
                gw.stop()
            gw.extra_args = []
            gw.start()
            gw.stop()
            await asyncio.sleep(0.5)
            leftover = gw.kernel_pids()
    stats = dict(soak.stats, leftover=len(leftover), seconds=round(time.monotonic() - t0, 1))
    lost = soak.stats["lost"] + soak.stats["not_back"]
    print(json.dumps(stats, indent=1))
    for p in soak.problems[:20]:
        print("problem:", p)
    print(f"soak: lost {lost}, leftover processes {len(leftover)}")
    return 0 if lost == 0 and not leftover else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
