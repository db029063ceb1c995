"""Files in sync (issue #14): how fast a folder moves between the gateway's machine and an SSH
host, against rsync over the same sshd, in one run.

The host is a loopback OpenSSH server (bench/sshloop.py), so both sides are on this machine's
disk and the figures are the cost of the protocol and of the two programs, not of a network.
Ours is the gateway's sync engine (gateway/backends/sync.py) on the gateway's shared SSH
connection, exactly as a kernel with `--sync` uses it; the peer is `rsync -a` over `ssh` with
the same key. Workloads, each on fresh folders, median of `--rounds`:

- small, push: 1,000 files of 4 KiB in 10 folders, here -> an empty host folder (the first
  sync of a notebook folder before its kernel starts)
- small, nothing changed: the same pass again (what every `--sync-interval` costs at rest)
- small, pull: 1,000 new files written on the host -> here (a kernel's output coming back)
- large, push / pull: one 200 MB file each way

    .venv/bin/python bench/syncbench.py [--rounds 3] [--small 1000] [--large-mb 200]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sshloop import LoopbackSSH

from gateway.backends import sshpool
from gateway.backends import sync as fsync
from gateway.backends.ssh import SSHProvisioner

SMALL_SIZE = 4096


def small_tree(root: Path, count: int) -> None:
    for i in range(count):
        d = root / f"d{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}.txt").write_bytes(os.urandom(SMALL_SIZE // 2).hex().encode())


def large_file(root: Path, mb: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "big.bin", "wb") as f:
        for _ in range(mb):
            f.write(os.urandom(2**20))


class Bench:
    def __init__(self, tmp: Path, loop: LoopbackSSH) -> None:
        self.tmp, self.loop = tmp, loop
        user = os.environ.get("USER", "root")
        self.config = {
            "host": f"{user}@127.0.0.1:{loop.port}",
            "identity_file": str(loop.dir / "client_key"),
            "known_hosts": str(loop.dir / "known_hosts"),
        }
        self.ssh_cmd = (
            f"ssh -i {loop.dir / 'client_key'} -p {loop.port} "
            f"-o UserKnownHostsFile={loop.dir / 'known_hosts'} -o BatchMode=yes"
        )
        self.dest = f"{user}@127.0.0.1"
        self.n = 0

    def fresh(self) -> tuple[Path, Path]:
        self.n += 1
        here, there = self.tmp / f"here{self.n}", self.tmp / f"there{self.n}"
        here.mkdir()
        there.mkdir()
        return here, there

    async def ours(self, here: Path, there: Path) -> fsync.Mirror:
        ssh = await sshpool.acquire(SSHProvisioner.from_config(self.config).target())
        options = fsync.Options(max_file_bytes=2**40, max_total_bytes=2**40)
        return fsync.acquire(ssh, str(here), str(there), options)

    def rsync(self, src: str, dst: str) -> None:
        subprocess.run(["rsync", "-a", "-e", self.ssh_cmd, src, dst], check=True)


async def timed(step: Callable[[], Awaitable[object]]) -> float:
    began = time.perf_counter()
    await step()
    return time.perf_counter() - began


async def round_small(b: Bench, count: int) -> dict[str, tuple[float, float]]:
    out = {}
    # ours
    here, there = b.fresh()
    small_tree(here, count)
    mirror = await b.ours(here, there)
    push = await timed(lambda: mirror.sync(first=True))
    same = await timed(mirror.sync)
    small_tree(there / "out", count)
    pull = await timed(mirror.sync)
    assert len(list((here / "out").rglob("*.txt"))) == count
    await fsync.release(mirror, final=False)
    # rsync, the same steps
    r_here, r_there = b.fresh()
    small_tree(r_here, count)
    remote = f"{b.dest}:{r_there}/"
    r_push = await timed(lambda: asyncio.to_thread(b.rsync, f"{r_here}/", remote))
    r_same = await timed(lambda: asyncio.to_thread(b.rsync, f"{r_here}/", remote))
    small_tree(r_there / "out", count)
    r_pull = await timed(lambda: asyncio.to_thread(b.rsync, f"{remote}out", f"{r_here}/"))
    assert len(list((r_here / "out").rglob("*.txt"))) == count
    out["small, push"] = (push, r_push)
    out["small, nothing changed"] = (same, r_same)
    out["small, pull"] = (pull, r_pull)
    for d in (here, there, r_here, r_there):
        shutil.rmtree(d)
    return out


async def round_large(b: Bench, mb: int) -> dict[str, tuple[float, float]]:
    here, there = b.fresh()
    large_file(here, mb)
    mirror = await b.ours(here, there)
    push = await timed(lambda: mirror.sync(first=True))
    large_file(there / "out", mb)
    pull = await timed(mirror.sync)
    assert (here / "out" / "big.bin").stat().st_size == mb * 2**20
    await fsync.release(mirror, final=False)
    r_here, r_there = b.fresh()
    large_file(r_here, mb)
    remote = f"{b.dest}:{r_there}/"
    r_push = await timed(lambda: asyncio.to_thread(b.rsync, f"{r_here}/", remote))
    large_file(r_there / "out", mb)
    r_pull = await timed(lambda: asyncio.to_thread(b.rsync, f"{remote}out", f"{r_here}/"))
    for d in (here, there, r_here, r_there):
        shutil.rmtree(d)
    return {"large, push": (push, r_push), "large, pull": (pull, r_pull)}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--small", type=int, default=1000)
    ap.add_argument("--large-mb", type=int, default=200)
    args = ap.parse_args()
    if not shutil.which("rsync"):
        sys.exit("the peer is rsync: apt-get install rsync")
    with tempfile.TemporaryDirectory(prefix="rkg-syncbench-") as t:
        tmp = Path(t)
        os.environ["JUPYTER_DATA_DIR"] = str(tmp / "data")  # the engine's baselines
        loop = LoopbackSSH(tmp)
        try:
            b = Bench(tmp, loop)
            runs: dict[str, list[tuple[float, float]]] = {}
            for _ in range(args.rounds):
                for k, v in (await round_small(b, args.small)).items():
                    runs.setdefault(k, []).append(v)
                for k, v in (await round_large(b, args.large_mb)).items():
                    runs.setdefault(k, []).append(v)
        finally:
            loop.stop()
    small_mb = args.small * SMALL_SIZE / 1e6
    print(f"{'workload':<24}{'ours s':>9}{'rsync s':>9}{'ours/rsync':>11}{'ours rate':>16}")
    for name, pairs in runs.items():
        ours = statistics.median(p[0] for p in pairs)
        peer = statistics.median(p[1] for p in pairs)
        if name.startswith("large"):
            rate = f"{args.large_mb * 2**20 / 1e6 / ours:.0f} MB/s"
        elif "nothing" in name:
            rate = f"{args.small / ours:.0f} files/s"
        else:
            rate = f"{args.small / ours:.0f} files/s"
        print(f"{name:<24}{ours:>9.3f}{peer:>9.3f}{ours / peer:>10.2f}x{rate:>16}")
    print(
        f"(median of {args.rounds}; small: {args.small} files of {SMALL_SIZE} B = "
        f"{small_mb:.1f} MB; large: {args.large_mb} MiB; loopback sshd, {os.cpu_count()} CPUs)"
    )


if __name__ == "__main__":
    asyncio.run(main())
