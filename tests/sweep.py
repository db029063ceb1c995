"""Leftovers of earlier test runs, found and removed when the infrastructure fixtures start.

A run killed part-way (kill -9, a CI timeout, a lost terminal) skips its teardowns: the
daemons it started live on in their own sessions, and kept state (the test dockerd's data
root, network namespaces, routes) still holds what that run made. Later runs must not fail on
it, nor remove what a run that is still going holds: the machine is shared.

Whose a thing is: everything a test run makes lives under its pytest temporary directory,
/tmp/pytest-of-USER/pytest-N, where pytest keeps a `.lock` with its pid until it exits. A
process whose command line or environment names such a directory belongs to that run, and is
a leftover only once that run is over (no `.lock`, or its pid is gone). What names no
directory (namespaces, routes) is claimed in a registry file under REGISTRY by the run's pid.

Every removal is reported on the terminal at once and again in the summary at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conftest import pid_alive

# a pytest numbered temporary directory (not --basetemp: that one has no lock to go by)
BASETEMP = r"/tmp/pytest-of-[^/\s]+/pytest-\d+"
REGISTRY = Path("/run/rkg-test")

swept: list[str] = []


def report(what: str, items: Iterable[str]) -> None:
    items = list(items)
    if not items:
        return
    line = f"rkg tests: removed leftovers of an earlier run ({what}): {', '.join(items)}"
    swept.append(line)
    # captured output would hide it until the end, and only for a failing test
    print(line, file=sys.__stderr__, flush=True)


def run_over(basetemp: str) -> bool:
    """Whether the pytest run that made this numbered temporary directory has ended."""
    try:
        text = (Path(basetemp) / ".lock").read_text().strip()
    except FileNotFoundError:
        return True  # removed at a clean exit, or the whole directory rotated away
    except OSError:
        return False
    if not text.isdigit():
        return False  # being written by a run starting right now
    return not pid_alive(int(text))


def owner_over(pid: int) -> bool:
    return not pid_alive(pid)


@dataclass
class Proc:
    pid: int
    ppid: int
    comm: str
    cmdline: str
    environ: str

    def describe(self) -> str:
        return f"{self.comm} {self.pid}"


def processes() -> list[Proc]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                head, _, tail = f.read().rpartition(")")
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read().replace(b"\0", b"\n").decode(errors="replace")
        except OSError:
            continue
        fields = tail.split()
        if fields[0] == "Z":
            continue
        out.append(Proc(int(entry), int(fields[1]), head.partition("(")[2], cmdline, environ))
    return out


def of_ended_runs(cmd: str = "", comms: Iterable[str] = (), env: str = "") -> list[Proc]:
    """Live processes of runs that are over: named in `comms` with a command line matching
    `cmd`, or with an environment matching `env` (multiline: one variable a line); in both
    patterns the first group is BASETEMP. And all their descendants: a killed parent's
    children would otherwise be left with no trace of whose they are. (Matching only named
    daemons, or a variable the fixtures set, spares e.g. a shell reading an old log.)"""
    cmd_re = re.compile(cmd) if cmd else None
    env_re = re.compile(env, re.MULTILINE) if env else None
    names = set(comms)
    procs = processes()
    hits: dict[int, Proc] = {}
    for p in procs:
        m = None
        if cmd_re and p.comm in names:
            m = cmd_re.search(p.cmdline)
        if not m and env_re:
            m = env_re.search(p.environ)
        if m and run_over(m.group(1)):
            hits[p.pid] = p
    children: dict[int, list[Proc]] = {}
    for p in procs:
        children.setdefault(p.ppid, []).append(p)
    todo = list(hits)
    while todo:
        for child in children.get(todo.pop(), []):
            if child.pid not in hits:
                hits[child.pid] = child
                todo.append(child.pid)
    hits.pop(os.getpid(), None)
    return sorted(hits.values(), key=lambda p: p.pid)


def kill(procs: list[Proc], grace: float = 10) -> None:
    """SIGTERM (daemons then clean up after themselves: dockerd stops its containers), then
    SIGKILL whatever is still there after `grace` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
        alive = [p for p in procs if pid_alive(p.pid)]
        for p in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, sig)
        deadline = time.monotonic() + wait
        while any(pid_alive(p.pid) for p in alive) and time.monotonic() < deadline:
            time.sleep(0.05)
    stuck = [p.describe() for p in procs if pid_alive(p.pid)]
    if stuck:
        raise RuntimeError(f"leftover processes of an earlier run do not die: {stuck}")


def claim(name: str, **record: object) -> Path:
    """Record that this run (its pid) owns what `record` lists, before making it."""
    REGISTRY.mkdir(parents=True, exist_ok=True)
    path = REGISTRY / f"{name}.json"
    path.write_text(json.dumps({"pid": os.getpid(), **record}))
    return path


def claims(prefix: str) -> dict[Path, dict[str, Any]]:
    out: dict[Path, dict[str, Any]] = {}
    for path in sorted(REGISTRY.glob(f"{prefix}*.json")):
        with contextlib.suppress(OSError, ValueError):
            out[path] = json.loads(path.read_text())
    return out
