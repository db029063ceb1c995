"""The real jupyter_server gateway client (`jupyter server --gateway-url=<ours>`) in front of the
gateway, driven the way a notebook in JupyterLab drives it: through jupyter_server's own REST
API and kernel websocket. Every request jupyter_server makes to us is its own code's."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import GatewayProcess, free_port
from gwclient import KernelSocket, api


@dataclass
class JupyterServer:
    """Has what gwclient needs: .url, .ws_url, .token."""

    port: int
    token: str
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"


@pytest.fixture(scope="module")
def jupyter_server(gateway: GatewayProcess, tmp_path_factory) -> Iterator[JupyterServer]:
    root = tmp_path_factory.mktemp("jupyter-server")
    js = JupyterServer(free_port(), secrets.token_hex(16), log_path=root / "server.log")
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(root / "config"),
           "JUPYTER_RUNTIME_DIR": str(root / "runtime"), "JUPYTER_DATA_DIR": str(root / "data")}
    args = [sys.executable, "-m", "jupyter_server", "--no-browser",
            "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={js.port}",
            "--ServerApp.port_retries=0", f"--ServerApp.root_dir={root}", "--allow-root",
            f"--IdentityProvider.token={js.token}",
            f"--gateway-url={gateway.url.rstrip('/')}",
            f"--GatewayClient.auth_token={gateway.token}",
            "--GatewayClient.request_timeout=60"]
    with open(js.log_path, "wb") as log:
        js.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert js.proc.poll() is None, js.log_path.read_text()
        try:
            with urllib.request.urlopen(f"{js.url}api/status?token={js.token}", timeout=1):
                break
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    else:
        pytest.fail(f"jupyter server did not start:\n{js.log_path.read_text()}")
    yield js
    js.proc.send_signal(signal.SIGTERM)
    try:
        js.proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(js.proc.pid, signal.SIGKILL)
        js.proc.wait()


def of_type(msgs, msg_type):
    return [m for m in msgs if m["header"]["msg_type"] == msg_type]


async def test_kernelspecs_with_logos(jupyter_server, gateway):
    status, specs = await api(jupyter_server, "GET", "api/kernelspecs")
    assert status == 200, specs
    assert "python3" in specs["kernelspecs"]
    logo = specs["kernelspecs"]["python3"]["resources"]["logo-64x64"]
    status, png = await api(jupyter_server, "GET", logo.lstrip("/"))
    assert status == 200 and png[:4] == b"\x89PNG"


@pytest.mark.parametrize("v1", [False, True], ids=["legacy", "offers-v1"])
async def test_notebook_flow(jupyter_server, gateway, v1):
    """`offers-v1` is JupyterLab 4: jupyter_server in gateway mode answers it with legacy."""
    js = jupyter_server
    status, session = await api(js, "POST", "api/sessions",
                                {"path": f"nb-{v1}.ipynb", "type": "notebook", "name": "",
                                 "kernel": {"name": "python3"}})
    assert status == 201, session
    kid = session["kernel"]["id"]
    assert (await api(gateway, "GET", f"api/kernels/{kid}"))[0] == 200  # it is ours

    ks = await KernelSocket.open(js, kid, v1=v1)
    msgs = await ks.reply_and_idle(await ks.send("kernel_info_request", {}))
    assert of_type(msgs, "kernel_info_reply")
    out, reply = await ks.execute("x = 41\nprint(x + 1)")
    assert out == "42\n" and reply["status"] == "ok"

    # interrupt, through jupyter_server's REST
    msg_id = await ks.send("execute_request", {
        "code": "import time; print('sleeping', flush=True); time.sleep(30)", "silent": False})
    await ks.until(lambda m: m["header"]["msg_type"] == "stream"
                   and m["parent_header"].get("msg_id") == msg_id)
    assert (await api(js, "POST", f"api/kernels/{kid}/interrupt", {}))[0] == 204
    reply = of_type(await ks.reply_and_idle(msg_id, timeout=15), "execute_reply")[0]
    assert reply["content"]["ename"] == "KeyboardInterrupt"

    # restart: state gone, the same socket keeps working
    status, _ = await api(js, "POST", f"api/kernels/{kid}/restart", {})
    assert status == 200
    out, _ = await ks.execute("print('x' in globals())", timeout=30)
    assert out == "False\n"

    # crash: 'restarting' reaches the notebook, then the kernel runs again
    await ks.execute("y = 1")
    await ks.send("execute_request", {"code": "import os; os._exit(1)", "silent": False})
    await ks.until(lambda m: m["header"]["msg_type"] == "status"
                   and m["content"]["execution_state"] == "restarting", timeout=30)
    out, reply = await ks.execute("print('y' in globals())", timeout=60)
    assert out == "False\n" and reply["status"] == "ok"
    await ks.close()

    assert (await api(js, "DELETE", f"api/sessions/{session['id']}"))[0] == 204
    for _ in range(40):
        if (await api(gateway, "GET", "api/kernels"))[1] == []:
            break
        await asyncio.sleep(0.25)
    assert (await api(gateway, "GET", "api/kernels"))[1] == []
    assert gateway.kernel_pids() == []


async def test_large_output_and_binary_buffers_through_jupyter_server(jupyter_server, gateway):
    js = jupyter_server
    status, model = await api(js, "POST", "api/kernels", {"name": "python3"})
    assert status == 201, model
    ks = await KernelSocket.open(js, model["id"])
    msgs = await ks.reply_and_idle(await ks.send("execute_request", {
        "code": "from IPython.display import display\n"
                "display({'text/plain': 'z' * 5_000_000}, raw=True)"}), timeout=60)
    assert len(of_type(msgs, "display_data")[0]["content"]["data"]["text/plain"]) == 5_000_000
    # jupyter_server's reader decodes every frame as UTF-8: a comm message with binary
    # buffers must not cost it the connection
    await ks.execute("from ipykernel.comm import Comm\nc = Comm(target_name='t', data={})\n"
                     "c.send(data={'a': 1}, buffers=[b'\\xff\\xfe\\x00binary'])")
    out, reply = await ks.execute("print('still connected')")
    assert out == "still connected\n" and reply["status"] == "ok"
    await ks.close()
    assert (await api(js, "DELETE", f"api/kernels/{model['id']}"))[0] == 204
