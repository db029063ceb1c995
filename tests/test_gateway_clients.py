"""Real gateway clients that read legacy websocket frames the jupyter_server way, used as their
authors ship them:

- Enterprise Gateway's Python `GatewayClient` (enterprise_gateway.client.gateway_client), which
  sorts every message by its top-level `msg_type` and `msg_id`;
- jupyter_server's `GatewayKernelManager` + `GatewayKernelClient`, what a server extension or an
  nbclient-style executor gets through `--gateway-url`; its `ChannelQueue.get_msg` reads the
  top-level `msg_id` of every message. Here nbclient runs a small notebook through them.

Neither client can put a credential on its kernel websocket: both call
`websocket.create_connection(url)` with no header, and the URL is built by the client (no
`?token=`). EG's client sends none on REST either. Deployments of these clients therefore run
the gateway without a token on a private network, and so do these tests: `--no-auth`, bound to
127.0.0.1. Token auth is covered by test_api.py and by jupyter_server's proxy in
test_jupyter_server_client.py.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
from jupyter_server.gateway.gateway_client import GatewayClient as JSGatewayClient
from jupyter_server.gateway.managers import GatewayKernelManager
from nbclient import NotebookClient

from conftest import GatewayProcess, eventually_sync, require_infra


def kernel_ids(gw: GatewayProcess) -> set[str]:
    with urllib.request.urlopen(gw.url + "api/kernels", timeout=30) as r:
        return {k["id"] for k in json.load(r)}


@pytest.fixture
def open_gateway(gateway_factory) -> GatewayProcess:
    return gateway_factory(token="")


# --- Enterprise Gateway's GatewayClient ------------------------------------------------------


EG_CLIENT = "jupyter-enterprise-gateway==3.3.0"  # keep in step with ./dev


@pytest.fixture
def eg_kernel(open_gateway) -> Iterator[Any]:
    """A python3 kernel started by EG's client; shut down at teardown unless the test did."""
    try:
        # imported here, not at the top: the package is installed apart from the [test] extra
        from enterprise_gateway.client.gateway_client import GatewayClient as EGClient
    except ImportError:
        require_infra(
            f"Enterprise Gateway's client is missing: ./dev installs it "
            f"(pip install --no-deps '{EG_CLIENT}')"
        )
    kc = EGClient(host=f"127.0.0.1:{open_gateway.port}").start_kernel("python3", timeout=30)
    try:
        yield kc
    finally:
        if kc.kernel_id in kernel_ids(open_gateway):
            kc.shutdown()


def test_eg_execute(eg_kernel):
    """execute() returns only what it sorted by top-level msg_type: stream, display_data,
    execute_result and error all have to come through."""
    out, has_error = eg_kernel.execute(
        "from IPython.display import display\nprint('hello', flush=True)\ndisplay('shown')\n6 * 7",
        timeout=30,
    )
    assert (out, has_error) == ("hello\n'shown'42", False)

    out, has_error = eg_kernel.execute("raise ValueError('boom')", timeout=30)
    assert has_error and out.startswith("ValueError:boom:"), (out, has_error)


def test_eg_interrupt(eg_kernel, tmp_path: Path):
    inside = tmp_path / "inside-cell"
    result: dict[str, Any] = {}
    cell = threading.Thread(
        target=lambda: result.update(
            run=eg_kernel.execute(
                f"import pathlib, time\npathlib.Path({str(inside)!r}).touch()\ntime.sleep(60)",
                timeout=30,
            )
        )
    )
    cell.start()
    try:
        # A SIGINT that lands once the cell's own code runs raises KeyboardInterrupt there;
        # before that, ipykernel may swallow it.
        eventually_sync(inside.exists, timeout=30, what="the cell running")
        started = time.monotonic()
        assert eg_kernel.interrupt()
    finally:
        cell.join(60)
    out, has_error = result["run"]
    assert has_error and out.startswith("KeyboardInterrupt:"), (out, has_error)
    assert time.monotonic() - started < 30  # the cell did not simply run out its sleep

    out, has_error = eg_kernel.execute("print('still here')", timeout=30)
    assert (out, has_error) == ("still here\n", False)


def test_eg_restart(eg_kernel):
    assert eg_kernel.execute("x = 41; print(x + 1)", timeout=30) == ("42\n", False)
    assert eg_kernel.restart()
    out, has_error = eg_kernel.execute("print(x)", timeout=30)
    assert has_error and out.startswith("NameError:"), (out, has_error)  # a new interpreter
    assert eg_kernel.execute("print('fresh')", timeout=30) == ("fresh\n", False)


def test_eg_shutdown(open_gateway, eg_kernel):
    assert eg_kernel.kernel_id in kernel_ids(open_gateway)
    pids = open_gateway.kernel_pids()
    assert pids
    assert eg_kernel.shutdown()
    assert eg_kernel.kernel_id not in kernel_ids(open_gateway)
    eventually_sync(
        open_gateway.kernel_pids,
        until=lambda pids: not pids,
        timeout=30,
        what="the kernel process gone",
    )


# --- jupyter_server's GatewayKernelManager + GatewayKernelClient -----------------------------


@pytest.fixture
def js_gateway_client(open_gateway, monkeypatch) -> Iterator[JSGatewayClient]:
    """jupyter_server's GatewayClient singleton pointed at our gateway, as `--gateway-url` sets
    it. It writes KERNEL_LAUNCH_TIMEOUT into os.environ and onto its class: both are put back."""
    monkeypatch.setenv("KERNEL_LAUNCH_TIMEOUT", os.environ.get("KERNEL_LAUNCH_TIMEOUT", "40"))
    monkeypatch.setattr(
        JSGatewayClient, "KERNEL_LAUNCH_TIMEOUT", JSGatewayClient.KERNEL_LAUNCH_TIMEOUT
    )
    JSGatewayClient.clear_instance()
    client = JSGatewayClient.instance(url=open_gateway.url.rstrip("/"), request_timeout=60)
    try:
        yield client
    finally:
        JSGatewayClient.clear_instance()


def outputs_of(cell: Any) -> list[dict[str, Any]]:
    return [dict(o) for o in cell.outputs]


async def test_notebook_through_gateway_kernel_manager(open_gateway, js_gateway_client):
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell("print('hello from a cell')"),
            nbformat.v4.new_code_cell(
                "from IPython.display import HTML, display\ndisplay(HTML('<b>bold</b>'))"
            ),
            nbformat.v4.new_code_cell("6 * 7"),
            nbformat.v4.new_code_cell("raise ValueError('boom')"),
            nbformat.v4.new_code_cell("print('after the error')"),
        ]
    )
    # owns_kernel=False (true: the gateway owns the process) because the client's is_alive()
    # calls the manager's private _async_is_alive, which GatewayKernelManager does not
    # override, and jupyter_client's asserts on a local provisioner (jupyter_client#1047).
    km = GatewayKernelManager(kernel_name="python3", owns_kernel=False)
    runner = NotebookClient(nb, km=km, timeout=60, startup_timeout=30, allow_errors=True)
    try:
        await runner.async_execute()
    except Exception as e:  # nbclient says only "Kernel didn't respond": show the gateway's side
        tail = "\n".join(open_gateway.log().splitlines()[-15:])
        raise AssertionError(f"{type(e).__name__}: {e}\n--- gateway log (tail)\n{tail}") from e
    finally:
        # nbclient leaves these hooks installed when starting the client fails
        atexit.unregister(runner._cleanup_kernel)
        asyncio.get_running_loop().remove_signal_handler(signal.SIGINT)
        asyncio.get_running_loop().remove_signal_handler(signal.SIGTERM)
        if runner.kc is not None:
            runner.kc.stop_channels()
        if km.has_kernel:
            await km.shutdown_kernel()
    assert km.kernel_id is not None

    printed, shown, result, error, after = (outputs_of(c) for c in nb.cells)
    assert printed == [{"output_type": "stream", "name": "stdout", "text": "hello from a cell\n"}]
    assert len(shown) == 1 and shown[0]["output_type"] == "display_data", shown
    assert shown[0]["data"]["text/html"] == "<b>bold</b>"
    assert len(result) == 1 and result[0]["output_type"] == "execute_result", result
    assert result[0]["data"] == {"text/plain": "42"} and result[0]["execution_count"] == 3
    assert len(error) == 1 and error[0]["output_type"] == "error", error
    assert (error[0]["ename"], error[0]["evalue"]) == ("ValueError", "boom")
    assert after == [{"output_type": "stream", "name": "stdout", "text": "after the error\n"}]
    assert nb.metadata["language_info"]["name"] == "python"  # from kernel_info_reply

    assert km.kernel_id not in await asyncio.to_thread(kernel_ids, open_gateway)
