"""Warm pools (gateway/kernels/pool.py, README "Warm pools"): `--pool SPEC=N` and a
kernelspec's `metadata.rkg.pool` keep kernels started; a start they can serve is handed one.

That a start was served from the pool is shown by identity, not by timing: the kernel the
POST returns is the one whose process was waiting before the request (local kernels: found
by their connection files), or the gateway's log line for the hand-over (other backends).
How fast that is, is bench/bench.py's figure (`--pool`), next to an unpooled start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import websockets

from backends import BACKENDS
from conftest import (
    GatewayProcess,
    eventually,
    eventually_sync,
    free_port,
    pid_alive,
    processes_matching,
)
from gateway.config import parse_serve_args
from gateway.errors import BadRequest
from gateway.kernels import pool
from gateway.state import StateStore
from gwclient import KernelSocket, api, start_kernel

# -- helpers ---------------------------------------------------------------------------


async def pools(gw: GatewayProcess) -> dict[str, dict[str, Any]]:
    status, body = await api(gw, "GET", "api/status")
    assert status == 200, body
    return {p["spec"]: p for p in body["pools"]}


async def pool_ready(
    gw: GatewayProcess, spec: str = "python3", n: int = 1, timeout: float = 30
) -> dict[str, Any]:
    """Until `n` kernels of `spec` are ready in its pool and none is launching."""
    found: dict[str, Any] = await eventually(
        lambda: pools(gw),
        until=lambda p: p[spec]["ready"] == n and p[spec]["launching"] == 0,
        timeout=timeout,
        interval=0.1,
        what=f"{n} kernel(s) ready in the pool of {spec}",
    )
    return found[spec]


def local_kernels(gw: GatewayProcess) -> dict[str, int]:
    """{kernel id: pid} of the gateway's local kernel processes, by their connection files."""
    found = {}
    pattern = re.compile(rf"{re.escape(str(gw.runtime_dir))}/kernel-([\w-]+)\.json")
    for pid in gw.kernel_pids():
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            if match := pattern.search(cmdline):
                found[match.group(1)] = pid
    return found


async def listed(gw: GatewayProcess) -> set[str]:
    status, models = await api(gw, "GET", "api/kernels")
    assert status == 200, models
    return {m["id"] for m in models}


async def pooled_kernels(gw: GatewayProcess) -> dict[str, int]:
    """The local kernel processes that no client's kernel is: the pool's."""
    mine = await listed(gw)
    return {kid: pid for kid, pid in local_kernels(gw).items() if kid not in mine}


ENV_CODE = "import os; print(os.environ.get('KERNEL_USERNAME'), os.environ['KERNEL_ID'])"


# -- which requests a pooled kernel serves; the flag ---------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    ("env", "served"),
    [
        ({}, True),
        ({"KERNEL_USERNAME": "ada"}, True),
        ({"KERNEL_USERNAME": "ada", "KERNEL_LAUNCH_TIMEOUT": "30", "KERNEL_ID": "x"}, True),
        ({"KERNEL_WORKING_DIR": "/tmp"}, False),
        ({"KERNEL_USERNAME": "ada", "KERNEL_UID": "1001"}, False),
        ({"KERNEL_EXTRA": "1"}, False),
        ({"ALLOWED_VAR": "yes"}, False),  # what --env-allow let through
    ],
)
def test_which_requests_a_pooled_kernel_serves(env, served):
    assert pool.serves(env) is served


@pytest.mark.unit
def test_pool_flag_and_variable():
    given = parse_serve_args(["--pool", "a=0", "--pool", "c=3"], {"RKG_POOLS": "a=1, b=2"})
    assert given.pools == (("a", 0), ("b", 2), ("c", 3))  # the flag wins for `a`
    for bad, says in (
        ("python3", "give SPEC=N, e.g. python3=2"),
        ("=2", "give SPEC=N, e.g. python3=2"),
        ("python3=x", "N must be a whole number from 0 to 32, not 'x'"),
        ("python3=33", "N must be a whole number from 0 to 32, not 33"),
        ("python3=-1", "N must be a whole number from 0 to 32, not '-1'"),
    ):
        with pytest.raises(BadRequest) as err:
            parse_serve_args(["--pool", bad], {})
        assert err.value.message == f"--pool [{bad!r}] has {bad!r}: {says}"
    with pytest.raises(BadRequest) as err:  # both sources named when the list is the two's
        parse_serve_args(["--pool", "b=1"], {"RKG_POOLS": "a"})
    assert (
        err.value.message == "RKG_POOLS='a' and --pool ['b=1'] has 'a': give SPEC=N, e.g. python3=2"
    )


OLD_SCHEMA = """
CREATE TABLE kernels (id TEXT PRIMARY KEY, name TEXT NOT NULL,
    username TEXT NOT NULL DEFAULT '', connection_info TEXT NOT NULL,
    provisioner_info TEXT NOT NULL, launch TEXT NOT NULL, created REAL NOT NULL);
INSERT INTO kernels VALUES ('k1', 'python3', 'ada', '{}', '{}', '{"env": {}}', 1.0);
"""


@pytest.mark.unit
async def test_a_database_from_before_pools_is_migrated(tmp_path):
    path = str(tmp_path / "old.sqlite")
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript(OLD_SCHEMA)
    store = StateStore(path)
    try:
        (old,) = store.kernels()
        assert (old.id, old.username, old.pooled) == ("k1", "ada", False)
        old.id, old.pooled = "k2", True
        await store.put_kernel(old)
        assert [(r.id, r.pooled) for r in store.kernels()] == [("k1", False), ("k2", True)]
    finally:
        store.close()


def _serve(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "serve",
            "--no-auth",
            "--port",
            str(free_port()),
            "--state-db",
            str(tmp_path / "state.sqlite"),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")},
    )


def _spec(directory: Path, name: str, metadata: dict[str, Any]) -> None:
    (directory / name).mkdir(parents=True)
    (directory / name / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": name,
                "language": "python",
                "metadata": metadata,
            }
        )
    )


def test_a_bad_pool_setting_stops_the_gateway_with_one_line(tmp_path):
    run = _serve(tmp_path, "--pool", "nosuch=1")
    assert run.returncode == 2, run.stderr
    assert run.stderr.splitlines() == [
        "BadRequest: --pool nosuch=1: there is no kernelspec named 'nosuch' "
        "(rkg spec list shows them; --kernelspec-dir adds a directory)"
    ]
    assert not (tmp_path / "state.sqlite").exists()  # refused before anything was made
    _spec(tmp_path / "specs", "greedy", {"rkg": {"pool": "lots"}})
    run = _serve(tmp_path, "--kernelspec-dir", str(tmp_path / "specs"))
    assert run.returncode == 2, run.stderr
    assert run.stderr.splitlines() == [
        "BadRequest: kernelspec 'greedy': metadata.rkg.pool must be a whole number "
        "from 0 to 32, not 'lots'"
    ]


async def test_a_kernelspec_asks_for_its_own_pool_and_the_flag_wins(gateway_factory, tmp_path):
    specs = tmp_path / "specs"
    _spec(specs, "warm", {"rkg": {"pool": 1}})
    _spec(specs, "cold", {"rkg": {"pool": 2}})
    gw = gateway_factory(extra_args=["--kernelspec-dir", str(specs), "--pool", "cold=0"])
    await pool_ready(gw, "warm")
    assert [(p["spec"], p["size"]) for p in (await pools(gw)).values()] == [("warm", 1)]
    (waiting,) = await pooled_kernels(gw)
    assert (await start_kernel(gw, "warm"))["id"] == waiting


# -- hand-over -------------------------------------------------------------------------


async def test_a_start_takes_a_pooled_kernel_and_the_pool_refills(gateway_factory):
    gw = gateway_factory(extra_args=["--pool", "python3=1"])
    handed = []
    for _ in range(2):
        await pool_ready(gw)
        ((waiting, pid),) = (await pooled_kernels(gw)).items()
        # before hand-over it is no one's: listed nowhere, not reachable
        assert waiting not in await listed(gw)
        assert (await api(gw, "GET", f"api/kernels/{waiting}"))[0] == 404
        with pytest.raises(websockets.InvalidStatus):
            await KernelSocket.open(gw, waiting)
        env = {"KERNEL_USERNAME": "ada", "KERNEL_LAUNCH_TIMEOUT": "30", "KERNEL_ID": "mine"}
        model = await start_kernel(gw, env=env)
        assert model["id"] == waiting, "the kernel that was waiting in the pool"
        assert local_kernels(gw)[waiting] == pid  # the same process, not a new start
        assert model["gateway"]["user"] == "ada" and model["gateway"]["state"] == "running"
        handed.append(waiting)
    assert handed[0] != handed[1]
    await pool_ready(gw)  # refilled, with a kernel no one has had
    assert (await pooled_kernels(gw)).keys().isdisjoint(handed)
    assert await listed(gw) == set(handed)

    # an ordinary kernel of ada's from now on: it runs code, and a restart relaunches it with
    # ada's env (the process itself was launched before her request)
    ks = await KernelSocket.open(gw, handed[0])
    assert (await ks.execute(ENV_CODE))[0] == f"None {handed[0]}\n"
    assert (await api(gw, "POST", f"api/kernels/{handed[0]}/restart", {}))[0] == 200
    assert (await ks.execute(ENV_CODE, timeout=30))[0] == f"ada {handed[0]}\n"
    await ks.close()


async def test_a_start_that_shapes_the_launch_gets_a_fresh_kernel(gateway_factory, tmp_path):
    gw = gateway_factory(
        extra_args=[
            *("--pool", "python3=1", "--env-allow", "ALLOWED_VAR"),
            *("--working-dir-root", str(tmp_path)),
        ]
    )
    await pool_ready(gw)
    before = await pooled_kernels(gw)
    for env in ({"KERNEL_WORKING_DIR": str(tmp_path)}, {"ALLOWED_VAR": "yes"}):
        model = await start_kernel(gw, env={"KERNEL_USERNAME": "ada", **env})
        assert model["id"] not in before, env
        assert await pooled_kernels(gw) == before  # the pool was left as it was
    ks = await KernelSocket.open(gw, model["id"])
    assert (await ks.execute("import os; print(os.environ['ALLOWED_VAR'])"))[0] == "yes\n"
    await ks.close()


async def test_pooled_kernels_count_against_no_limit(gateway_factory):
    gw = gateway_factory(
        extra_args=["--pool", "python3=2", "--max-kernels", "2", "--max-kernels-per-user", "1"]
    )
    await pool_ready(gw, n=2)
    waiting = await pooled_kernels(gw)
    ada = await start_kernel(gw, env={"KERNEL_USERNAME": "ada"})
    assert ada["id"] in waiting  # two pooled kernels: neither limit counted them
    status, body = await api(gw, "POST", "api/kernels", {"env": {"KERNEL_USERNAME": "ada"}})
    assert status == 429 and "'ada' may run at most 1" in body["message"]
    bob = await start_kernel(gw, env={"KERNEL_USERNAME": "bob"})
    assert bob["id"] in waiting  # ada's refused start did not take the other one
    status, body = await api(gw, "POST", "api/kernels", {"env": {"KERNEL_USERNAME": "cy"}})
    assert status == 429 and "at most 2 kernels" in body["message"]
    await pool_ready(gw, n=2)  # the pool refills beside two kernels at --max-kernels 2


async def test_culling_never_takes_pooled_kernels(gateway_factory):
    gw = gateway_factory(
        extra_args=["--pool", "python3=1", "--cull-idle-timeout", "2", "--cull-interval", "0.1"]
    )
    await pool_ready(gw)
    waiting = await pooled_kernels(gw)
    await asyncio.sleep(3)  # idle past the timeout; the culler looked ~30 times
    assert await pooled_kernels(gw) == waiting
    model = await start_kernel(gw)
    assert model["id"] in waiting
    # idle since its hand-over, not since it joined the pool: not culled at the next look
    await asyncio.sleep(0.5)
    assert (await api(gw, "GET", f"api/kernels/{model['id']}"))[0] == 200
    await eventually(  # but culled as anyone's kernel is, once idle for the timeout
        lambda: api(gw, "GET", f"api/kernels/{model['id']}"),
        until=lambda r: r[0] == 404,
        timeout=10,
        what="the handed-over kernel culled when idle",
    )


async def test_failing_pooled_starts_back_off(gateway_factory):
    """tests/kernelspecs/broken exits at once: its pool tries again after 2 s, then 4 s, ...
    and the gateway goes on serving."""
    gw = gateway_factory(extra_args=["--pool", "broken=1"])
    ks = await KernelSocket.open(gw, (await start_kernel(gw))["id"])
    assert (await ks.execute("print(1)"))[0] == "1\n"
    await ks.close()
    await asyncio.sleep(5)
    tries = gw.log().count("(broken) did not start (error after")
    assert 1 <= tries <= 3, gw.log()
    assert "pool broken: a pooled start failed (1 in a row); the next try is in 2 s" in gw.log()
    (broken,) = (await pools(gw)).values()
    assert broken["ready"] == 0 and broken["failing"]["starts"] == tries
    assert "exited during start-up" in broken["failing"]["error"]
    failures = (await api(gw, "GET", "api/status"))[1]["failures"]
    assert {f["name"] for f in failures} == {"broken"}


# -- restarts and shutdown ---------------------------------------------------------------


async def test_a_restarted_gateway_puts_pooled_kernels_back(gateway_factory):
    gw = gateway_factory(extra_args=["--pool", "python3=2"])
    await pool_ready(gw, n=2)
    owned = (await start_kernel(gw, env={"KERNEL_USERNAME": "ada"}))["id"]
    await pool_ready(gw, n=2)
    waiting = await pooled_kernels(gw)
    gw.stop(signal.SIGKILL)
    gw.start()
    await pool_ready(gw, n=2)
    assert await pooled_kernels(gw) == waiting  # the same processes, back in the pool
    models = (await api(gw, "GET", "api/kernels"))[1]
    assert [(m["id"], m["gateway"]["user"]) for m in models] == [(owned, "ada")]
    assert "re-attached 3 of 3 recorded kernel(s), 2 of them to warm pools" in gw.log()
    assert (await start_kernel(gw))["id"] in waiting


async def test_shutdown_stops_pooled_kernels_unless_keep_kernels(gateway_factory):
    gw = gateway_factory(extra_args=["--pool", "python3=2", "--keep-kernels"])
    await pool_ready(gw, n=2)
    waiting = await pooled_kernels(gw)
    assert gw.stop() == 0
    assert all(pid_alive(pid) for pid in waiting.values())  # left for the next gateway
    # which keeps no kernels, and a pool of one: it stops the pooled kernel beyond that
    gw.extra_args[:] = ["--pool", "python3=1"]
    gw.start()
    await pool_ready(gw)
    assert (await pooled_kernels(gw)).items() < waiting.items()
    assert "is beyond its warm pool's size; stopping it" in gw.log()
    assert gw.stop() == 0
    eventually_sync(
        lambda: [pid for pid in waiting.values() if pid_alive(pid)],
        until=lambda alive: alive == [],
        what="the pooled kernel stopped with the gateway",
    )


async def test_shutdown_undoes_a_pooled_start_in_flight(gateway_factory):
    """tests/kernelspecs/slowstart never answers: its pooled start is still launching."""
    gw = gateway_factory(extra_args=["--pool", "slowstart=1"])
    await eventually(lambda: pools(gw), until=lambda p: p["slowstart"]["launching"] == 1)
    await eventually(gw.kernel_pids, what="the slow kernel's process")
    assert gw.stop(timeout=15) == 0  # not held up for the 60 s launch timeout
    assert "did not start" not in gw.log()  # undone, not reported as a failed start
    # gateway_factory's teardown: no kernel process left


# -- every backend -------------------------------------------------------------------------


@pytest.mark.parametrize("name", [b for b in BACKENDS if b != "local"])  # local: the above
async def test_pools_on_every_backend(name, request, gateway_factory):
    """A pooled kernel on each backend: handed over (runs where the backend says, as its
    requester's), refilled, put back in the pool by a gateway started after a kill -9 (and
    not taken for an orphan by the container backends' sweep), removed at shutdown."""
    b = request.getfixturevalue(f"backend_{name}")
    spec = b.kernel_name
    # a pooled start that hangs is given up after 20 s, and the pool tries again (Swarm's
    # used to, now and then: the gateway connected to a port the engine had published on ::
    # for another target; SwarmProvisioner._published_ports)
    extra = ["--pool", f"{spec}=1", "--kernel-launch-timeout", "20"]
    gw = gateway_factory(extra_args=[*b.gateway.extra_args, *extra], env=b.gateway.env)

    def leftovers() -> list[str]:
        return [*b.leftovers(), *map(str, processes_matching(str(gw.runtime_dir)))]

    await pool_ready(gw, spec, timeout=60)
    model = await start_kernel(gw, spec, env={"KERNEL_USERNAME": "ada"})
    assert f"kernel {model['id']} ({spec}) handed over from its warm pool" in gw.log()
    assert model["gateway"]["user"] == "ada"
    ks = await KernelSocket.open(gw, model["id"], v1=True)
    out, reply = await ks.execute("import socket; print(socket.gethostname())", timeout=30)
    assert reply["status"] == "ok" and out.strip() == b.hostname
    await ks.close()
    assert (await api(gw, "DELETE", f"api/kernels/{model['id']}"))[0] == 204
    await pool_ready(gw, spec, timeout=60)

    gw.stop(signal.SIGKILL)
    gw.start()
    await pool_ready(gw, spec, timeout=30)
    assert "1 of them to warm pools" in gw.log()
    await asyncio.sleep(1)  # the orphan sweep runs after the restore, in the background
    model = await start_kernel(gw, spec)
    assert f"kernel {model['id']} ({spec}) handed over from its warm pool" in gw.log()
    ks = await KernelSocket.open(gw, model["id"], v1=True)
    assert (await ks.execute("print(6 * 7)", timeout=30))[0] == "42\n"
    await ks.close()
    await pool_ready(gw, spec, timeout=60)
    assert "started for its warm pool" in gw.log().rsplit("re-attached", 1)[1]  # a refill

    assert gw.stop() == 0
    await eventually(
        leftovers,
        until=lambda left: left == [],
        timeout=15,
        what="nothing of the pooled and handed-over kernels left",
    )
