"""Durability: kernels survive a gateway crash or a --keep-kernels restart with their state,
nothing is orphaned, and kernel limits hold under concurrent starts."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest
import websockets

from conftest import eventually, pid_alive
from gwclient import KernelSocket, api, start_kernel


async def _kernels_with_state(gw, n):
    ids = []
    for i in range(n):
        kid = (await start_kernel(gw))["id"]
        ks = await KernelSocket.open(gw, kid)
        await ks.execute(f"value = {i} * 7")
        await ks.close()
        ids.append(kid)
    return ids


async def _assert_state(gw, ids):
    status, listed = await api(gw, "GET", "api/kernels")
    assert status == 200 and sorted(k["id"] for k in listed) == sorted(ids)
    for i, kid in enumerate(ids):
        ks = await KernelSocket.open(gw, kid)
        out, reply = await ks.execute("print(value)")
        assert reply["status"] == "ok" and out == f"{i * 7}\n"
        await ks.close()


async def test_kill_9_then_restart_reattaches_every_kernel(gateway_factory):
    gw = gateway_factory()
    ids = await _kernels_with_state(gw, 5)
    status, session = await api(
        gw,
        "POST",
        "api/sessions",
        {"path": "n.ipynb", "type": "notebook", "kernel": {"id": ids[0]}},
    )
    assert status == 201
    pids = gw.kernel_pids()
    assert len(pids) == 5
    gw.stop(signal.SIGKILL)
    assert all(pid_alive(p) for p in pids), "kernels must outlive a gateway crash"
    gw.start()
    await _assert_state(gw, ids)
    assert sorted(gw.kernel_pids()) == sorted(pids)  # the same processes, not new ones
    status, sessions = await api(gw, "GET", "api/sessions")
    assert status == 200 and [s["id"] for s in sessions] == [session["id"]]
    # and they are fully managed again: restart, interrupt, delete
    assert (await api(gw, "POST", f"api/kernels/{ids[1]}/restart", {}))[0] == 200
    assert (await api(gw, "POST", f"api/kernels/{ids[2]}/interrupt", {}))[0] == 204
    assert (await api(gw, "DELETE", f"api/kernels/{ids[3]}"))[0] == 204
    assert gw.stop() == 0
    assert gw.kernel_pids() == []


async def test_keep_kernels_restart(gateway_factory):
    gw = gateway_factory(extra_args=["--keep-kernels"])
    ids = await _kernels_with_state(gw, 2)
    ks = await KernelSocket.open(gw, ids[0])
    pids = gw.kernel_pids()
    assert gw.stop() == 0
    with pytest.raises(websockets.ConnectionClosed):
        while True:
            await ks.recv(timeout=10)
    assert ks.ws.close_code == 1001  # going away: clients reconnect
    assert all(pid_alive(p) for p in pids)
    gw.extra_args = []  # the next one stops its kernels when it stops
    gw.start()
    await _assert_state(gw, ids)
    assert gw.stop() == 0
    assert gw.kernel_pids() == []


async def test_kernel_gone_while_gateway_down_is_forgotten(gateway_factory):
    gw = gateway_factory()
    ids = await _kernels_with_state(gw, 2)
    pids = gw.kernel_pids()
    gw.stop(signal.SIGKILL)
    os.kill(pids[0], signal.SIGKILL)  # one kernel dies while no gateway watches
    await eventually(lambda: not pid_alive(pids[0]), what="the killed kernel gone")
    gw.start()
    status, listed = await api(gw, "GET", "api/kernels")
    assert status == 200 and len(listed) == 1
    alive = listed[0]["id"]
    assert alive in ids
    assert not (gw.runtime_dir / f"kernel-{({*ids} - {alive}).pop()}.json").exists()
    assert "could not be re-attached" in gw.log()


async def test_concurrent_starts_respect_the_global_limit(gateway_factory):
    gw = gateway_factory(extra_args=["--max-kernels", "10"])
    results = await asyncio.gather(
        *[api(gw, "POST", "api/kernels", {"name": "python3"}) for _ in range(50)]
    )
    codes = [status for status, _ in results]
    assert codes.count(201) == 10 and codes.count(429) == 40, codes
    assert {body["reason"] for status, body in results if status == 429} == {"Too Many Kernels"}
    assert len(gw.kernel_pids()) == 10


async def test_per_user_limit(gateway_factory):
    gw = gateway_factory(extra_args=["--max-kernels-per-user", "2"])

    async def start(user):
        return await api(
            gw, "POST", "api/kernels", {"name": "python3", "env": {"KERNEL_USERNAME": user}}
        )

    assert [(await start("alice"))[0] for _ in range(3)] == [201, 201, 429]
    assert (await start("bob"))[0] == 201


async def test_kernel_killed_from_outside_is_restarted(gateway):
    kid = (await start_kernel(gateway))["id"]
    ks = await KernelSocket.open(gateway, kid)
    await ks.execute("z = 1")
    (pid,) = [p for p in gateway.kernel_pids() if kid in Path(f"/proc/{p}/cmdline").read_text()]
    os.kill(pid, signal.SIGKILL)
    await ks.until_status("restarting", timeout=20)
    out, reply = await ks.execute("print('z' in globals())", timeout=30)
    assert out == "False\n" and reply["status"] == "ok"
    assert not pid_alive(pid)
    await ks.close()
    assert (await api(gateway, "DELETE", f"api/kernels/{kid}"))[0] == 204
