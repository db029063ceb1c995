"""The real jupyter_server gateway client (`jupyter server --gateway-url=<ours>`) in front of the
gateway, driven the way a notebook in JupyterLab drives it: through jupyter_server's own REST
API and kernel websocket. Every request jupyter_server makes to us is its own code's.

`RKG_JS_UPSTREAM=jkg` puts Jupyter Kernel Gateway 3.0.1 behind jupyter_server instead of ours:
the same tests then show where the peer falls short (see the notes in PROTOCOL.md).
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
from jsserver import BIN, Served, jupyter_server_args

from conftest import eventually, free_port, processes_matching
from gwclient import KernelSocket, api


class KernelGatewayPeer(Served):
    """Jupyter Kernel Gateway 3.0.1, for comparison (RKG_JS_UPSTREAM=jkg)."""

    def kernel_pids(self) -> list[int]:
        return processes_matching(f"{self.root / 'runtime'}/kernel-")


@pytest.fixture(scope="module")
def upstream(request: pytest.FixtureRequest, tmp_path_factory) -> Iterator[Any]:
    """The kernel gateway behind jupyter_server: ours (default) or the peer."""
    if os.environ.get("RKG_JS_UPSTREAM", "ours") != "jkg":
        yield request.getfixturevalue("gateway")
        return
    jkg = KernelGatewayPeer(free_port(), secrets.token_hex(16), tmp_path_factory.mktemp("jkg"))
    jkg.start(
        [
            str(BIN / "jupyter-kernelgateway"),
            "--KernelGatewayApp.ip=127.0.0.1",
            f"--KernelGatewayApp.port={jkg.port}",
            "--KernelGatewayApp.port_retries=0",
            f"--KernelGatewayApp.auth_token={jkg.token}",
            "--JupyterWebsocketPersonality.list_kernels=True",
        ],
        "api/kernelspecs",
    )
    try:
        yield jkg
    finally:
        left = jkg.kernel_pids()
        jkg.stop()
        for pid in jkg.kernel_pids():
            os.kill(pid, signal.SIGKILL)
        assert not left, f"kernel processes left behind by the peer: {left}"


@pytest.fixture(scope="module")
def jupyter_server(upstream, tmp_path_factory) -> Iterator[Served]:
    js = Served(free_port(), secrets.token_hex(16), tmp_path_factory.mktemp("jupyter-server"))
    js.start(
        jupyter_server_args(
            js,
            f"--gateway-url={upstream.url.rstrip('/')}",
            f"--GatewayClient.auth_token={upstream.token}",
            "--GatewayClient.request_timeout=60",
        ),
        "api/status",
    )
    try:
        yield js
    finally:
        js.stop()


@contextlib.contextmanager
def step(name: str, js: Served, upstream: Any) -> Iterator[None]:
    """Name the failing step of a flow and attach both servers' recent log lines."""
    try:
        yield
    except (AssertionError, TimeoutError, StopIteration, KeyError, ValueError) as e:
        tail = "\n".join
        raise AssertionError(
            f"step {name!r} failed: {type(e).__name__}: {e}\n"
            f"--- jupyter_server log (tail)\n{tail(js.log().splitlines()[-25:])}\n"
            f"--- gateway log (tail)\n{tail(upstream.log().splitlines()[-25:])}"
        ) from e


def of_type(msgs: list[dict[str, Any]], msg_type: str) -> list[dict[str, Any]]:
    return [m for m in msgs if m["header"]["msg_type"] == msg_type]


async def test_kernelspecs_with_logos(jupyter_server, upstream):
    status, specs = await api(jupyter_server, "GET", "api/kernelspecs")
    assert status == 200, specs
    assert specs["default"] in specs["kernelspecs"]
    python3 = specs["kernelspecs"]["python3"]
    assert python3["spec"]["language"] == "python"
    logo = python3["resources"]["logo-64x64"]
    assert logo.startswith("/kernelspecs/python3/"), logo  # jupyter_server's own URL
    status, png = await api(jupyter_server, "GET", logo.lstrip("/"))
    assert status == 200 and png[:8] == b"\x89PNG\r\n\x1a\n", (status, png[:40])


@pytest.mark.parametrize("v1", [False, True], ids=["legacy", "offers-v1"])
async def test_notebook_flow(jupyter_server, upstream, v1):
    """`offers-v1` is JupyterLab 4: jupyter_server in gateway mode answers it with legacy."""
    js = jupyter_server

    with step("POST /api/sessions", js, upstream):
        status, session = await api(
            js,
            "POST",
            "api/sessions",
            {
                "path": f"nb-{v1}.ipynb",
                "type": "notebook",
                "name": "",
                "kernel": {"name": "python3"},
            },
        )
        assert status == 201, session
        kid = session["kernel"]["id"]
        status, model = await api(upstream, "GET", f"api/kernels/{kid}")
        assert status == 200, model  # the kernel is the gateway's, not a local one

    ks: KernelSocket | None = None
    try:
        with step("websocket + kernel_info", js, upstream):
            ks = await KernelSocket.open(js, kid, v1=v1)
            assert not ks.v1  # jupyter_server speaks legacy to the gateway, so to us too
            msg_id = await ks.send("kernel_info_request", {})
            msgs = await ks.reply_and_idle(msg_id, timeout=30)
            (info,) = of_type(msgs, "kernel_info_reply")
            assert info["channel"] == "shell" and info["content"]["status"] == "ok"
            assert info["content"]["language_info"]["name"] == "python"
            statuses = [
                m["content"]["execution_state"]
                for m in of_type(msgs, "status")
                if m["channel"] == "iopub"
            ]
            assert statuses[-1] == "idle", statuses

        with step("execute", js, upstream):
            out, reply = await ks.execute("x = 41; print(x + 1)")
            assert out == "42\n" and reply["status"] == "ok", (out, reply)

        with step("interrupt", js, upstream):
            msg_id = await ks.start_long_cell()
            t0 = time.monotonic()
            status, body = await api(js, "POST", f"api/kernels/{kid}/interrupt", {})
            assert status == 204, (status, body)
            (reply,) = of_type(await ks.reply_and_idle(msg_id, timeout=10), "execute_reply")
            assert reply["content"]["status"] == "error", reply["content"]
            assert reply["content"]["ename"] == "KeyboardInterrupt", reply["content"]
            assert time.monotonic() - t0 < 5

        with step("restart", js, upstream):
            status, body = await api(js, "POST", f"api/kernels/{kid}/restart", {})
            assert status == 200 and body["id"] == kid, (status, body)
            out, reply = await ks.execute("print('x' in globals())", timeout=30)
            assert out == "False\n" and reply["status"] == "ok", (out, reply)

        with step("crash -> restarting -> runs again", js, upstream):
            await ks.execute("y = 1")
            await ks.send("execute_request", {"code": "import os; os._exit(1)", "silent": False})
            await ks.until_status("restarting", timeout=30)
            out, reply = await ks.execute("print('y' in globals())", timeout=60)
            assert out == "False\n" and reply["status"] == "ok", (out, reply)

        with step("DELETE /api/sessions/ID", js, upstream):
            status, body = await api(js, "DELETE", f"api/sessions/{session['id']}")
            assert status == 204, (status, body)
            await eventually(
                lambda: api(upstream, "GET", "api/kernels"),
                until=lambda r: r == (200, []),
                what="the gateway lists no kernel",
            )
            status, sessions = await api(js, "GET", "api/sessions")
            assert status == 200 and sessions == [], sessions
            await eventually(
                upstream.kernel_pids, until=lambda pids: pids == [], what="no kernel process alive"
            )
    finally:  # a failed flow must not leave its kernel to the next test
        if ks is not None:
            await ks.close()
        await api(js, "DELETE", f"api/sessions/{session['id']}")


LARGE = {  # 5 MB of output in one piece; jupyter_server-based gateways rate-limit streams
    "display_data": "from IPython.display import display\n"
    "display({'text/plain': 'z' * 5_000_000}, raw=True)",
    "stream": "print('z' * 5_000_000)",
}


@pytest.mark.parametrize("kind", list(LARGE))
async def test_large_output_arrives_complete(jupyter_server, upstream, kind):
    js = jupyter_server
    status, model = await api(js, "POST", "api/kernels", {"name": "python3"})
    assert status == 201, model
    ks = await KernelSocket.open(js, model["id"])
    try:
        with step(f"5 MB {kind}", js, upstream):
            msgs = await ks.reply_and_idle(
                await ks.send("execute_request", {"code": LARGE[kind], "silent": False}), timeout=60
            )
            assert of_type(msgs, "execute_reply")[0]["content"]["status"] == "ok"
            if kind == "display_data":
                (display,) = of_type(msgs, "display_data")
                text = display["content"]["data"]["text/plain"]
                assert text == "z" * 5_000_000, f"got {len(text)} characters"
            else:
                streams = of_type(msgs, "stream")
                assert {m["content"]["name"] for m in streams} == {"stdout"}, [
                    m["content"]["text"][:300] for m in streams if m["content"]["name"] != "stdout"
                ]
                text = "".join(m["content"]["text"] for m in streams)
                assert text == "z" * 5_000_000 + "\n", f"got {len(text)} characters"
    finally:
        await ks.close()
        assert (await api(js, "DELETE", f"api/kernels/{model['id']}"))[0] == 204


async def test_binary_comm_buffers_keep_the_connection(jupyter_server, upstream):
    """jupyter_server's reader decodes every frame from the gateway as UTF-8 (gateway/
    connections.py `_read_messages`): a binary frame would end its connection for good."""
    js = jupyter_server
    status, model = await api(js, "POST", "api/kernels", {"name": "python3"})
    assert status == 201, model
    ks = await KernelSocket.open(js, model["id"])
    payload = b"\xff\xfe\x00binary"
    try:
        with step("comm_msg with buffers", js, upstream):
            msg_id = await ks.send(
                "execute_request",
                {
                    "code": "from ipykernel.comm import Comm\nc = Comm(target_name='t', data={})\n"
                    f"c.send(data={{'a': 1}}, buffers=[{payload!r}])",
                    "silent": False,
                },
            )
            msgs = await ks.reply_and_idle(msg_id, timeout=30)
            assert of_type(msgs, "execute_reply")[0]["content"]["status"] == "ok"
            (comm,) = of_type(msgs, "comm_msg")
            assert comm["content"]["data"] == {"a": 1}
            # through a text-only path the bytes can only survive as base64
            assert [base64.b64decode(b) for b in comm["buffers"]] == [payload], comm["buffers"]
        with step("execute after the binary message, same websocket", js, upstream):
            out, reply = await ks.execute("print('still connected')", timeout=15)
            assert out == "still connected\n" and reply["status"] == "ok", (out, reply)
    finally:
        await ks.close()
        assert (await api(js, "DELETE", f"api/kernels/{model['id']}"))[0] == 204
