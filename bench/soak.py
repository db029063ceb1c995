"""Soak: kernels started, used and deleted continuously for a bounded time while the gateway is
restarted (twice by default: once with SIGTERM and --keep-kernels, once with kill -9).

Reports, and exits non-zero unless all are zero:
- lost: an execute_reply whose output is not exactly what the code printed, or a kernel that
  existed before a gateway restart and is gone after it;
- server_errors: any 5xx answer to any REST call (each is printed with its body);
- start_failed: a POST /api/kernels answered with anything but 201;
- leftover: kernel processes still running after the final shutdown.
Executes cut by a restart (the socket closed before their reply) are counted as `interrupted`
and retried: the client sees them fail, nothing is dropped silently. A refused or cut
connection (the gateway is down) is retried too; an HTTP answer never is.

When the run fails, the gateway's log (all its restarts append to one file) and the kernels'
logs are copied out of the temporary folder to --keep-logs (default bench/out/soak-<time>/,
gitignored) and the path is printed.

    .venv/bin/python bench/soak.py --seconds 180 --workers 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

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
        self.t0 = time.monotonic()

    def note(self, text: str) -> None:
        """A problem, printed at once with the run's clock so it can be matched to the log."""
        text = f"[{time.monotonic() - self.t0:7.1f}s] {text}"
        self.problems.append(text)
        print("problem:", text, flush=True)

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        """REST with retries while the gateway restarts."""
        for _ in range(200):
            await self.up.wait()
            try:
                status, body_ = await api(self.gw, method, path, body)
            except (OSError, HTTPClientError):  # refused, or cut by a restart
                await asyncio.sleep(0.1)
                continue
            if status >= 500 and status != 599:  # 599: tornado's "no answer", i.e. not up
                self.stats["server_errors"] += 1
                self.note(f"{method} {path} -> {status} {json.dumps(body_)}")
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
                self.note(f"start failed: {status} {json.dumps(model)}")
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
                            self.note(f"kernel {kid} vanished across a restart")
                            return
                        ks = await self.open(kid, session)
                        # the cut execute may or may not have run: resynchronise the count
                        await ks.execute(f"acc[:] = range({i})")
                self.stats["executes"] += 1
                if reply.get("status") != "ok" or out != f"w{n}-{i} {i + 1}\n":
                    self.stats["lost"] += 1
                    self.note(f"kernel {kid} exec {i}: {out!r} {reply.get('status')}")
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
            # a start in flight may not survive (kill -9 before it was recorded): not counted
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
            print(
                f"[{time.monotonic() - self.t0:7.1f}s] restart {k + 1} ({how}): {len(ids)} "
                f"kernels before, {len(after)} after, {len(missing)} lost",
                flush=True,
            )
            self.stats["not_back"] += len(missing)
            for kid in missing:
                self.note(f"kernel {kid} not back after restart")


def keep_logs(workdir: Path, dest: Path) -> Path:
    """Copy what explains a failed run out of the folder about to be deleted."""
    dest.mkdir(parents=True, exist_ok=True)
    for log in [*workdir.glob("gateway-*.log"), *workdir.glob("runtime-*/kernel-*.log")]:
        shutil.copy2(log, dest / log.name)
    return dest


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--restarts", type=int, default=2)
    parser.add_argument(
        "--keep-logs",
        type=Path,
        default=None,
        metavar="DIR",
        help="where the logs of a failed run go (default bench/out/soak-TIME/); "
        "given explicitly, they are kept whatever the outcome",
    )
    args = parser.parse_args()
    failed = True  # until the run got to its verdict: an exception keeps the logs too
    tmp = Path(tempfile.mkdtemp(prefix="rkg-soak-"))
    try:
        gw = GatewayProcess(
            port=free_port(),
            token=secrets.token_hex(16),
            workdir=tmp,
            extra_args=["--keep-kernels"],
        )
        gw.start()
        soak = Soak(gw, time.monotonic() + args.seconds)
        t0 = soak.t0
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
        errors = soak.stats["server_errors"]
        failed_starts = soak.stats["start_failed"]
        print(json.dumps(stats, indent=1))
        for p in soak.problems[:20]:
            print("problem:", p)
        print(
            f"soak: lost {lost}, 5xx answers {errors}, failed starts {failed_starts}, "
            f"leftover processes {len(leftover)}"
        )
        failed = bool(lost or errors or failed_starts or leftover)
    finally:
        if failed or args.keep_logs:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            dest = keep_logs(tmp, args.keep_logs or ROOT / "bench" / "out" / f"soak-{stamp}")
            print(f"soak: logs kept in {dest}", flush=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
