"""The contract every backend keeps, run through the gateway with the same client for each:
execute where the backend says, interrupt, restart, crash and auto-restart, delete with
nothing left behind."""

from __future__ import annotations

import signal

from conftest import eventually
from gwclient import KernelSocket, api, input_first, start_kernel


async def _open(backend):
    model = await start_kernel(backend.gateway, backend.kernel_name)
    return model["id"], await KernelSocket.open(backend.gateway, model["id"], v1=True)


async def nothing_left(backend) -> None:
    """Wherever the kernel ran, nothing of it remains (within 5 s: containers, jobs and
    services go a moment after the delete)."""
    await eventually(
        backend.leftovers,
        until=lambda left: left == [],
        timeout=5,
        what="nothing of the kernel left",
    )


BACKEND_LABELS = {"slurm": "batch", "slurm_login": "batch"}  # else the fixture's own name


async def test_runs_where_the_backend_says(backend):
    kid, ks = await _open(backend)
    out, reply = await ks.execute("import socket; print(socket.gethostname())")
    assert reply["status"] == "ok" and out.strip() == backend.hostname
    # and the gateway says so too: its own part of the kernel model (status page, rkg kernels)
    ours = (await api(backend.gateway, "GET", f"api/kernels/{kid}"))[1]["gateway"]
    assert ours["backend"] == BACKEND_LABELS.get(backend.name, backend.name)
    assert ours["state"] == "running" and ours["stage"] == ""
    assert bool(ours["host"]) == (backend.name != "local"), ours
    await ks.close()
    assert (await api(backend.gateway, "DELETE", f"api/kernels/{kid}"))[0] == 204


async def test_interrupt_restart_crash_delete(backend):
    gw = backend.gateway
    kid, ks = await _open(backend)
    await ks.execute("x = 1")
    msg_id = await ks.start_long_cell()
    assert (await api(gw, "POST", f"api/kernels/{kid}/interrupt", {}))[0] == 204
    reply = next(
        m
        for m in await ks.reply_and_idle(msg_id, timeout=15)
        if m["header"]["msg_type"] == "execute_reply"
    )["content"]
    assert reply["ename"] == "KeyboardInterrupt"
    assert (await ks.execute("print(x)"))[0] == "1\n"

    assert (await api(gw, "POST", f"api/kernels/{kid}/restart", {}))[0] == 200
    assert (await ks.execute("print('x' in globals())", timeout=30))[0] == "False\n"

    await ks.execute("y = 2")
    await ks.send("execute_request", {"code": "import os; os._exit(1)"})
    await ks.until_status("restarting", timeout=30)
    assert (await ks.execute("print('y' in globals())", timeout=60))[0] == "False\n"

    await ks.close()
    assert (await api(gw, "DELETE", f"api/kernels/{kid}"))[0] == 204
    await nothing_left(backend)


async def test_kernel_survives_a_gateway_crash(backend):
    """kill -9 the gateway; the next one re-attaches to the kernel, state intact."""
    gw = backend.gateway
    kid, ks = await _open(backend)
    await ks.execute("kept = 'yes'")
    await ks.close()
    where = (await api(gw, "GET", f"api/kernels/{kid}"))[1]["gateway"]
    gw.stop(signal.SIGKILL)
    gw.start()
    status, model = await api(gw, "GET", f"api/kernels/{kid}")
    assert status == 200, (model, gw.log()[-3000:])
    assert model["gateway"]["host"] == where["host"], (model, where)
    assert model["gateway"]["started"] == where["started"], (model, where)
    ks = await KernelSocket.open(gw, kid, v1=True)
    out, reply = await ks.execute("print(kept)", timeout=30)
    assert out == "yes\n" and reply["status"] == "ok"
    await ks.close()
    assert (await api(gw, "DELETE", f"api/kernels/{kid}"))[0] == 204
    await nothing_left(backend)


async def test_input_as_the_first_message(backend):
    """input() as the very first message on fresh websockets, both protocols: the stdin
    connection through this backend's path (tunnel, port proxy, node) is up before the cell
    runs (tests/test_stdin.py has the why, and the same under load)."""
    model = await start_kernel(backend.gateway, backend.kernel_name)
    for v1 in (False, True, False, True):
        await input_first(backend.gateway, model["id"], v1=v1, timeout=20)
    assert (await api(backend.gateway, "DELETE", f"api/kernels/{model['id']}"))[0] == 204
    await nothing_left(backend)
