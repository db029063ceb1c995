"""The kernel websocket: both protocols, auth before upgrade, fan-out, replay on reconnect,
restart and crash statuses, stdin, buffers, large output, and frames that must not hurt."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid

import pytest
import websockets
from websockets.typing import Subprotocol

from conftest import eventually
from gwclient import V1, KernelSocket, api, legacy_decode, start_kernel

PROTOCOLS = [pytest.param(False, id="legacy"), pytest.param(True, id="v1")]


@pytest.fixture
async def kernel(gateway):
    model = await start_kernel(gateway)
    yield model["id"]
    await api(gateway, "DELETE", f"api/kernels/{model['id']}")


def of_type(msgs, msg_type):
    return [m for m in msgs if m["header"]["msg_type"] == msg_type]


def idle_after(msg_id):
    return lambda m: (
        m["header"]["msg_type"] == "status"
        and m["parent_header"].get("msg_id") == msg_id
        and m["content"]["execution_state"] == "idle"
    )


def gated(flag, code):
    """`code` run once the test creates `flag`: output the test decides the timing of, e.g.
    only after the gateway saw a socket go, which no delay in the kernel can promise."""
    return (
        f"import os, time\nwhile not os.path.exists({str(flag)!r}):\n    time.sleep(0.01)\n{code}"
    )


async def connections(gw, kernel_id, n):
    """Until the gateway counts `n` attached sockets (a closed one is detached by then)."""
    await eventually(
        lambda: api(gw, "GET", f"api/kernels/{kernel_id}"),
        until=lambda r: r[0] == 200 and r[1]["connections"] == n,
        what=f"kernel {kernel_id} with {n} connection(s)",
    )


@pytest.mark.parametrize("v1", PROTOCOLS)
async def test_execute_and_protocol_negotiation(gateway, kernel, v1):
    ks = await KernelSocket.open(gateway, kernel, v1=v1)
    assert ks.ws.subprotocol == (V1 if v1 else None)
    # a new socket asks for kernel_info and needs the reply AND an iopub status for it
    msgs = await ks.reply_and_idle(await ks.send("kernel_info_request", {}))
    assert of_type(msgs, "kernel_info_reply")[0]["channel"] == "shell"
    assert of_type(msgs, "status")[0]["channel"] == "iopub"
    out, reply = await ks.execute("x = 41\nprint(x + 1)")
    assert out == "42\n" and reply["status"] == "ok"
    await ks.close()


async def test_no_subprotocol_header_unless_offered(gateway, kernel):
    async with websockets.connect(
        f"{gateway.ws_url}api/kernels/{kernel}/channels",
        additional_headers={"Authorization": f"token {gateway.token}"},
        subprotocols=[Subprotocol("something.else")],
    ) as ws:
        assert ws.subprotocol is None
        assert ws.response is not None
        assert "Sec-WebSocket-Protocol" not in ws.response.headers


async def test_token_in_query_string(gateway, kernel):
    ks = await KernelSocket.open(gateway, kernel, query_token=True)
    assert (await ks.execute("print('q')"))[0] == "q\n"
    await ks.close()


@pytest.mark.parametrize(("token", "code"), [("", 401), ("wrong", 403)])
async def test_bad_token_rejected_before_upgrade(gateway, kernel, token, code):
    with pytest.raises(websockets.InvalidStatus) as err:
        await KernelSocket.open(gateway, kernel, token=token)
    assert err.value.response.status_code == code
    assert json.loads(err.value.response.body)["reason"]


async def test_unknown_kernel_is_404_before_upgrade(gateway):
    with pytest.raises(websockets.InvalidStatus) as err:
        await KernelSocket.open(gateway, "no-such-kernel")
    assert err.value.response.status_code == 404


async def test_iopub_reaches_every_socket(gateway, kernel):
    a = await KernelSocket.open(gateway, kernel)
    b = await KernelSocket.open(gateway, kernel, v1=True)
    await a.execute("print('to all')")
    seen = await b.until(lambda m: m["header"]["msg_type"] == "stream")
    assert seen[-1]["content"]["text"] == "to all\n"
    status, model = await api(gateway, "GET", f"api/kernels/{kernel}")
    assert status == 200 and model["connections"] == 2
    await a.close()
    await b.close()


async def test_reconnect_with_same_session_replays_missed_output(gateway, kernel, tmp_path):
    watcher = await KernelSocket.open(gateway, kernel, session="watcher")
    a = await KernelSocket.open(gateway, kernel, session="replay-me")
    flag = tmp_path / "a-is-gone"
    msg_id = await a.send(
        "execute_request",
        {
            "code": gated(flag, "for i in range(3):\n    print('tick', i, flush=True)"),
            "silent": False,
        },
    )
    await a.close()
    await connections(gateway, kernel, 1)
    flag.touch()  # every tick is printed after the gateway detached A's socket
    # iopub goes to every session in one pass, so once the watcher has the cell's idle,
    # A's session holds all of the cell's output
    await watcher.until(idle_after(msg_id))
    b = await KernelSocket.open(gateway, kernel, session="replay-me")
    msgs = await b.reply_and_idle(msg_id)
    text = "".join(m["content"]["text"] for m in of_type(msgs, "stream"))
    assert text == "tick 0\ntick 1\ntick 2\n"
    assert of_type(msgs, "execute_reply")[0]["content"]["status"] == "ok"
    await b.close()
    await watcher.close()


async def test_other_session_does_not_get_replay(gateway, kernel, tmp_path):
    """What a detached session kept is replayed to that session only. A socket of another
    session gets, from the moment it attaches, live iopub (whoever caused it) and its own
    replies; every raw frame it receives is checked, so a leak cannot hide in a filter."""
    watcher = await KernelSocket.open(gateway, kernel, session="watcher")
    a = await KernelSocket.open(gateway, kernel, session="first")
    missed, live = f"missed-{uuid.uuid4().hex}", f"live-{uuid.uuid4().hex}"
    flag = tmp_path / "a-is-gone"
    a_req = await a.send(
        "execute_request", {"code": gated(flag, f"print({missed!r})"), "silent": False}
    )
    await a.close()
    await connections(gateway, kernel, 1)
    flag.touch()
    await watcher.until(idle_after(a_req))  # A's session now holds the output and the reply

    b = await KernelSocket.open(gateway, kernel, session="second")
    b_req = await b.send("kernel_info_request", {})
    w_req = await watcher.send("execute_request", {"code": f"print({live!r})", "silent": False})
    frames, msgs = [], []
    got_live = got_reply = got_idle = False
    async with asyncio.timeout(30):
        while not (got_live and got_reply and got_idle):
            frame = await b.ws.recv()
            frames.append(frame if isinstance(frame, bytes) else frame.encode())
            msg = legacy_decode(frame)
            msgs.append(msg)
            parent = msg["parent_header"].get("msg_id")
            got_live = got_live or (
                msg["header"]["msg_type"] == "stream" and msg["content"]["text"] == live + "\n"
            )
            got_reply = got_reply or (
                msg["header"]["msg_type"] == "kernel_info_reply" and parent == b_req
            )
            got_idle = got_idle or idle_after(w_req)(msg)
    leaked = [f for f in frames if missed.encode() in f or a_req.encode() in f]
    assert not leaked, (
        f"{len(leaked)} frame(s) of session A's replay reached session B, "
        f"the first: {leaked[0][:400]!r}"
    )
    # B saw another session's cell live, and no one else's reply
    assert of_type(msgs, "execute_reply") == []
    assert {m["channel"] for m in msgs if m["parent_header"].get("msg_id") == w_req} == {"iopub"}

    # and the replay existed: A, back, gets what B must not have had
    a = await KernelSocket.open(gateway, kernel, session="first")
    msgs = await a.reply_and_idle(a_req)
    assert "".join(m["content"]["text"] for m in of_type(msgs, "stream")) == missed + "\n", msgs
    assert of_type(msgs, "execute_reply")[0]["content"]["status"] == "ok"
    for ks in (a, b, watcher):
        await ks.close()


@pytest.mark.parametrize("v1", PROTOCOLS)
async def test_interrupt_a_running_cell(gateway, kernel, v1):
    ks = await KernelSocket.open(gateway, kernel, v1=v1)
    msg_id = await ks.start_long_cell()
    assert (await api(gateway, "POST", f"api/kernels/{kernel}/interrupt", {}))[0] == 204
    msgs = await ks.reply_and_idle(msg_id, timeout=10)
    reply = of_type(msgs, "execute_reply")[0]["content"]
    assert reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt"
    await ks.close()


async def test_rest_restart_then_execute_at_once_on_same_socket(gateway, kernel):
    """Hydrogen keeps its socket across a REST restart; iopub must flow at once."""
    ks = await KernelSocket.open(gateway, kernel)
    await ks.execute("x = 1")
    for _ in range(3):
        assert (await api(gateway, "POST", f"api/kernels/{kernel}/restart", {}))[0] == 200
        out, reply = await ks.execute("print('x' in globals())", timeout=20)
        assert out == "False\n" and reply["status"] == "ok"
    await ks.close()


@pytest.mark.parametrize("v1", PROTOCOLS)
async def test_crash_is_reported_and_kernel_restarted(gateway, kernel, v1):
    ks = await KernelSocket.open(gateway, kernel, v1=v1)
    await ks.execute("x = 1")
    crash = await ks.send("execute_request", {"code": "import os; os._exit(1)", "silent": False})
    seen = await ks.until_status("restarting", timeout=20)
    # the gateway says so on iopub, as jupyter_server does, and the dead cell never answered
    assert seen[-1]["channel"] == "iopub"
    assert seen[-1]["content"] == {"execution_state": "restarting"}
    assert [
        m for m in of_type(seen, "execute_reply") if m["parent_header"].get("msg_id") == crash
    ] == []
    out, reply = await ks.execute("print('x' in globals())", timeout=30)
    assert out == "False\n" and reply["status"] == "ok"
    status, model = await api(gateway, "GET", f"api/kernels/{kernel}")
    assert status == 200 and model["execution_state"] in ("idle", "busy")
    await ks.close()


async def test_delete_sends_dead_then_closes_1000(gateway):
    kid = (await start_kernel(gateway))["id"]
    ks = await KernelSocket.open(gateway, kid)
    delete = asyncio.create_task(api(gateway, "DELETE", f"api/kernels/{kid}"))
    seen = []
    with pytest.raises(websockets.ConnectionClosedOK):
        while True:
            seen.append(await ks.recv(timeout=20))
    assert (await delete)[0] == 204
    assert seen[-1]["header"]["msg_type"] == "status"
    assert seen[-1]["content"]["execution_state"] == "dead"
    assert ks.ws.close_code == 1000


async def test_stdin_round_trip(gateway, kernel):
    ks = await KernelSocket.open(gateway, kernel)
    msg_id = await ks.send(
        "execute_request",
        {"code": "print('got', input('name? '))", "silent": False, "allow_stdin": True},
    )
    req = (await ks.until(lambda m: m["header"]["msg_type"] == "input_request"))[-1]
    assert req["channel"] == "stdin" and req["content"]["prompt"] == "name? "
    await ks.send("input_reply", {"value": "ada"}, channel="stdin")
    msgs = await ks.reply_and_idle(msg_id)
    assert "".join(m["content"]["text"] for m in of_type(msgs, "stream")) == "got ada\n", msgs
    await ks.close()


SEND_BUFFERS = (
    "from ipykernel.comm import Comm\n"
    "c = Comm(target_name='t', data={})\n"
    "c.send(data={'a': 1}, buffers=[b'\\xff\\xfe\\x00binary'])\n"
)


def comm_with_buffers(msgs):
    return next(m for m in msgs if m["header"]["msg_type"] == "comm_msg")


@pytest.mark.parametrize("v1", PROTOCOLS)
async def test_buffers_arrive_binary(gateway, kernel, v1):
    ks = await KernelSocket.open(gateway, kernel, v1=v1)
    msgs = await ks.reply_and_idle(await ks.send("execute_request", {"code": SEND_BUFFERS}))
    comm = comm_with_buffers(msgs)
    assert comm["content"]["data"] == {"a": 1}
    assert comm["buffers"] == [b"\xff\xfe\x00binary"]
    await ks.close()


async def test_buffers_as_base64_text_for_jupyter_server_client(gateway, kernel):
    """jupyter_server's gateway client (User-Agent Tornado/...) dies on binary frames."""
    async with websockets.connect(
        f"{gateway.ws_url}api/kernels/{kernel}/channels",
        additional_headers={"Authorization": f"token {gateway.token}"},
        user_agent_header="Tornado/6.5",
    ) as ws:
        ks = KernelSocket(ws, False, "s")
        msg_id = await ks.send("execute_request", {"code": SEND_BUFFERS})
        while True:
            frame = await asyncio.wait_for(ws.recv(), 20)
            assert isinstance(frame, str)
            msg = json.loads(frame)
            if msg["header"]["msg_type"] == "comm_msg":
                assert [base64.b64decode(b) for b in msg["buffers"]] == [b"\xff\xfe\x00binary"]
            if (
                msg["parent_header"].get("msg_id") == msg_id
                and msg["header"]["msg_type"] == "execute_reply"
            ):
                break


@pytest.mark.parametrize("v1", PROTOCOLS)
async def test_large_output_arrives_whole(gateway, kernel, v1):
    ks = await KernelSocket.open(gateway, kernel, v1=v1)
    out, reply = await ks.execute(
        "import sys\nfor i in range(20):\n    sys.stdout.write(str(i % 10) * 1_000_000)", timeout=60
    )
    assert reply["status"] == "ok"
    assert len(out) == 20_000_000
    assert out == "".join(str(i % 10) * 1_000_000 for i in range(20))
    msgs = await ks.reply_and_idle(
        await ks.send(
            "execute_request",
            {
                "code": "from IPython.display import display\n"
                "display({'text/plain': 'y' * 10_000_000}, raw=True)"
            },
        ),
        timeout=60,
    )
    data = of_type(msgs, "display_data")[0]["content"]["data"]["text/plain"]
    assert len(data) == 10_000_000
    await ks.close()


@pytest.mark.parametrize("v1", PROTOCOLS)
async def test_large_multibyte_output_arrives_whole(gateway, kernel, v1):
    """4.8 MB outputs of 3-byte characters, with three paddings so that no size or offset
    the bridge computes lines up by chance: every character arrives."""
    ks = await KernelSocket.open(gateway, kernel, v1=v1)
    for pad in range(3):
        text = "a" * pad + "\u20ac" * 1_600_000  # 4.8 MB of UTF-8
        out, reply = await ks.execute(f"print({text[:pad]!r} + '\\u20ac' * 1_600_000)", timeout=60)
        assert reply["status"] == "ok"
        assert out == text + "\n", f"pad {pad}: {len(out)} characters"
    await ks.close()


@pytest.mark.parametrize("v1", PROTOCOLS)
async def test_garbage_frames_hurt_nothing(gateway, kernel, v1):
    other = (await start_kernel(gateway))["id"]
    ks = await KernelSocket.open(gateway, kernel, v1=v1)
    for frame in [
        "not json",
        "[]",
        '{"channel": "shell"}',
        '{"header": {}, "channel": 1}',
        '{"header": {"msg_type": "execute_request"}, "channel": "iopub"}',
        b"",
        b"\x00",
        b"\xff" * 64,
        (3).to_bytes(8, "little") + b"\x00" * 7,
        (2**40).to_bytes(8, "little") + b"\x00" * 100,
        (1).to_bytes(4, "big") + (2**31).to_bytes(4, "big"),
    ]:
        await ks.ws.send(frame)
    out, reply = await ks.execute("print('still here')")
    assert out == "still here\n" and reply["status"] == "ok"
    ko = await KernelSocket.open(gateway, other)
    assert (await ko.execute("print(1)"))[0] == "1\n"
    await ks.close()
    await ko.close()
    await api(gateway, "DELETE", f"api/kernels/{other}")
