"""Races around a kernel start in flight, found by bench/soak.py, provoked deterministically.

A kernel start in flight when the gateway is told to stop: the gateway cancels it, and the
POST used to answer 500 "unexpected error in the gateway" (the CancelledError reached
Tornado, which turns it into a bare 500). Kernels here are made slow to become ready, so the
start is provably in flight (listed as `starting`) when SIGTERM arrives.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

from conftest import eventually
from gwclient import KernelSocket, api

# ipykernel, after a pause long enough to be sure the SIGTERM lands during the start
_SLOW_READY = (
    "import runpy, sys, time; time.sleep(3); "
    "sys.argv = ['ipykernel_launcher', '-f', sys.argv[1]]; "
    "runpy.run_module('ipykernel_launcher', run_name='__main__', alter_sys=True)"
)


def _slow_ready_spec(root: Path) -> Path:
    spec = root / "specs" / "slowready"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-c", _SLOW_READY, "{connection_file}"],
                "display_name": "Python, ready after 3 s",
                "language": "python",
            }
        )
    )
    return spec.parent


async def _sigterm_during_start(gw, body):
    post = asyncio.create_task(api(gw, "POST", "api/kernels", body))

    async def starting():
        return [
            k
            for k in (await api(gw, "GET", "api/kernels"))[1]
            if k["execution_state"] == "starting"
        ]

    await eventually(starting, timeout=30, what="the kernel listed as starting")
    assert not post.done()
    gw.proc.send_signal(signal.SIGTERM)
    status, model = await post
    assert await asyncio.to_thread(gw.proc.wait, 30) == 0
    return status, model


async def test_start_in_flight_at_keep_kernels_restart_completes(gateway_factory, tmp_path):
    """--keep-kernels: the start is let finish (bounded), so its client gets its kernel, and
    the next gateway re-attaches to it like to any other."""
    gw = gateway_factory(
        extra_args=["--keep-kernels", "--kernelspec-dir", str(_slow_ready_spec(tmp_path))]
    )
    status, model = await _sigterm_during_start(gw, {"name": "slowready"})
    assert status == 201, model
    gw.start()
    listed = (await api(gw, "GET", "api/kernels"))[1]
    assert [k["id"] for k in listed] == [model["id"]]
    ks = await KernelSocket.open(gw, model["id"])
    out, reply = await ks.execute("print(6 * 7)")
    await ks.close()
    assert reply["status"] == "ok" and out == "42\n"
    assert (await api(gw, "DELETE", f"api/kernels/{model['id']}"))[0] == 204


async def test_start_undone_by_shutdown_is_503_not_unexpected(gateway_factory):
    """Without --keep-kernels the start is undone: a 503 that says why, and nothing is left."""
    gw = gateway_factory()
    status, body = await _sigterm_during_start(
        gw, {"name": "slowstart", "env": {"KERNEL_LAUNCH_TIMEOUT": "120"}}
    )
    assert status == 503, body
    assert body["reason"] == "Service Unavailable" and "shutting down" in body["message"], body
    assert gw.kernel_pids() == []


async def test_delete_during_start_undoes_it(gateway):
    """DELETE of a kernel still starting cancels the start (a queued job is not waited for):
    204 to the DELETE, a JSON 409 to the POST instead of a 500, and nothing left."""
    post = asyncio.create_task(
        api(
            gateway,
            "POST",
            "api/kernels",
            {"name": "slowstart", "env": {"KERNEL_LAUNCH_TIMEOUT": "120"}},
        )
    )

    async def starting():
        return [
            k["id"]
            for k in (await api(gateway, "GET", "api/kernels"))[1]
            if k["execution_state"] == "starting"
        ]

    (kid,) = await eventually(starting, timeout=30, what="the kernel listed as starting")
    await eventually(gateway.kernel_pids, timeout=30, what="its process running")
    assert (await api(gateway, "DELETE", f"api/kernels/{kid}"))[0] == 204
    status, body = await asyncio.wait_for(post, 30)
    assert status == 409 and body["reason"] == "Conflict" and "deleted" in body["message"], body
    assert (await api(gateway, "GET", f"api/kernels/{kid}"))[0] == 404
    await eventually(lambda: gateway.kernel_pids() == [], timeout=10, what="no kernel process")
