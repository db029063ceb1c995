"""Kernel and gateway lifecycle: signals, kernel environment, culling, tokens, concurrency."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import websockets

from conftest import GatewayProcess, eventually, free_port, pid_alive
from gwclient import KernelSocket, api, start_kernel


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_signal_stops_kernels_and_closes_sockets(gateway_factory, sig):
    gw = gateway_factory()
    ids = [(await start_kernel(gw))["id"] for _ in range(3)]
    ks = await KernelSocket.open(gw, ids[0])
    await ks.send("execute_request", {"code": "import time; time.sleep(60)", "silent": False})
    pids = gw.kernel_pids()
    assert len(pids) == 3
    stopping = asyncio.get_running_loop().run_in_executor(None, gw.stop, sig)
    seen = []
    with pytest.raises(websockets.ConnectionClosed):
        while True:
            seen.append(await ks.recv(timeout=30))
    assert await stopping == 0
    assert [m["content"]["execution_state"] for m in seen if m["header"]["msg_type"] == "status"][
        -1
    ] == "dead"
    assert not [p for p in pids if pid_alive(p)]
    assert "gateway stopped" in gw.log()


async def test_kernel_env_is_filtered(gateway_factory, tmp_path):
    gw = gateway_factory(
        extra_args=[
            *("--env-allow", "ALLOWED_VAR", "--env-allow", "PATH"),
            *("--working-dir-root", str(tmp_path)),
        ]
    )
    env = {
        "KERNEL_USERNAME": "ada",
        "ALLOWED_VAR": "yes",
        "LD_PRELOAD": "/tmp/evil.so",
        "PATH": "/nowhere",
        "OTHER_SECRET": "no",
        "KERNEL_WORKING_DIR": str(tmp_path),
    }
    model = await start_kernel(gw, "envdump", env=env)
    ks = await KernelSocket.open(gw, model["id"])
    out, _ = await ks.execute(
        "import os, json\nprint(json.dumps({k: os.environ.get(k) for k in "
        "['KERNEL_USERNAME', 'ALLOWED_VAR', 'LD_PRELOAD', 'OTHER_SECRET', 'KERNEL_ID', "
        "'SPEC_VAR']} | {'cwd': os.getcwd(), 'path_ok': '/nowhere' not in os.environ['PATH']}))"
    )
    seen = json.loads(out)
    assert seen == {
        "KERNEL_USERNAME": "ada",
        "ALLOWED_VAR": "yes",
        "LD_PRELOAD": None,
        "OTHER_SECRET": None,
        "KERNEL_ID": model["id"],
        "SPEC_VAR": "from-spec",
        "cwd": str(tmp_path),
        "path_ok": True,
    }
    await ks.close()


async def test_missing_working_dir_falls_back(gateway):
    model = await start_kernel(gateway, env={"KERNEL_WORKING_DIR": "/does/not/exist"})
    ks = await KernelSocket.open(gateway, model["id"])
    out, reply = await ks.execute("import os; print(os.path.isdir(os.getcwd()))")
    assert out == "True\n" and reply["status"] == "ok"
    await ks.close()
    await api(gateway, "DELETE", f"api/kernels/{model['id']}")


async def test_kernel_outlives_client_disconnect(gateway):
    kid = (await start_kernel(gateway))["id"]
    ks = await KernelSocket.open(gateway, kid)
    await ks.execute("state = 'kept'")
    await ks.close()
    await eventually(
        lambda: api(gateway, "GET", f"api/kernels/{kid}"),
        until=lambda r: r[1]["connections"] == 0,
        what="the gateway saw it close",
    )
    ks = await KernelSocket.open(gateway, kid)  # a new client session
    assert (await ks.execute("print(state)"))[0] == "kept\n"
    await ks.close()
    await api(gateway, "DELETE", f"api/kernels/{kid}")


async def test_idle_kernels_are_culled_connected_and_busy_spared(gateway_factory):
    # each socket opened as soon as its kernel is up: on a loaded machine the next start
    # alone can outlast a short idle timeout
    gw = gateway_factory(extra_args=["--cull-idle-timeout", "4", "--cull-interval", "0.5"])
    connected = (await start_kernel(gw))["id"]
    kc = await KernelSocket.open(gw, connected)
    busy = (await start_kernel(gw))["id"]
    kb = await KernelSocket.open(gw, busy)
    cell = await kb.send(
        "execute_request", {"code": "import time; time.sleep(60)", "silent": False}
    )
    await kb.until(
        lambda m: (
            m["header"]["msg_type"] == "status"  # the gateway saw it busy
            and m["parent_header"].get("msg_id") == cell
        )
    )
    await kb.close()
    # Started last, so idle no shorter than the other two and after them in the culler's
    # pass: by the time the culler has stopped it, it has judged the other two as well.
    idle = (await start_kernel(gw))["id"]
    await eventually(
        lambda: api(gw, "GET", f"api/kernels/{idle}"),
        until=lambda r: r[0] == 404,
        timeout=30,
        what="the idle kernel culled",
    )
    assert (await api(gw, "GET", f"api/kernels/{connected}"))[0] == 200
    assert (await api(gw, "GET", f"api/kernels/{busy}"))[0] == 200
    await kc.close()


async def test_a_slow_start_is_not_culled(gateway_factory):
    """A start (e.g. a job queued for long) is not idleness: the culler leaves it alone, so
    it ends as its launch timeout says, not as a kernel deleted while starting."""
    gw = gateway_factory(extra_args=["--cull-idle-timeout", "1", "--cull-interval", "0.2"])
    status, body = await api(
        gw, "POST", "api/kernels", {"name": "slowstart", "env": {"KERNEL_LAUNCH_TIMEOUT": "4"}}
    )
    assert status == 504, body


async def test_generated_token_is_printed_and_works(tmp_path):
    """Without --token (and without --no-auth) the gateway makes one up and prints it."""
    gw = GatewayProcess(port=free_port(), token="", workdir=tmp_path)
    with subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--port", str(gw.port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as proc:
        try:
            line = ""
            assert proc.stdout is not None
            for _ in range(50):
                line = proc.stdout.readline()
                if "token=" in line:
                    break
            match = re.search(r"\?token=(\w+)", line)
            assert match, line
            gw.token = match.group(1)
            assert len(gw.token) >= 32
            assert (await api(gw, "GET", "api/kernels"))[0] == 200
            assert (await api(gw, "GET", "api/kernels", token="x"))[0] == 403
        finally:
            proc.terminate()
            assert proc.wait(20) == 0


def test_port_in_use_is_a_clear_error(gateway):
    serve = [sys.executable, "-m", "gateway", "serve", "--port", str(gateway.port)]
    proc = subprocess.run(
        [*serve, "--token", gateway.token],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 1
    assert "Address already in use" in proc.stderr
    assert "Traceback" not in proc.stderr


async def test_concurrent_starts_all_succeed(gateway):
    models = await asyncio.gather(*[start_kernel(gateway) for _ in range(8)])
    assert len({m["id"] for m in models}) == 8
    status, listed = await api(gateway, "GET", "api/kernels")
    assert status == 200
    assert {m["id"] for m in models} <= {k["id"] for k in listed}
    await asyncio.gather(*[api(gateway, "DELETE", f"api/kernels/{m['id']}") for m in models])
    assert gateway.kernel_pids() == []


HOLD_EXIT = """import atexit, os, time
def hold():
    open({holding!r}, "w").close()
    while not os.path.exists({release!r}):
        time.sleep(0.01)
atexit.register(hold)
"""


async def test_delete_during_restart(gateway, tmp_path):
    """A DELETE that lands while a restart is in progress waits for it, then stops the
    kernel: the restart answers 200, the DELETE 204. The old kernel, asked to shut down for
    the restart, cannot exit until the test lets it (jupyter_client waits 5 s before it
    kills), so the restart provably cannot finish before the DELETE is in."""
    kid = (await start_kernel(gateway))["id"]
    holding, release = tmp_path / "old-kernel-exiting", tmp_path / "let-it-exit"
    ks = await KernelSocket.open(gateway, kid)
    code = HOLD_EXIT.format(holding=str(holding), release=str(release))
    assert (await ks.execute(code))[1]["status"] == "ok"
    await ks.close()
    restart = asyncio.create_task(api(gateway, "POST", f"api/kernels/{kid}/restart", {}))
    await eventually(holding.exists, timeout=20, what="the old kernel exiting for the restart")
    # by hand, to know the request is in the gateway's socket before the release
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(
        f"DELETE /api/kernels/{kid} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: token {gateway.token}\r\nConnection: close\r\n\r\n".encode()
    )
    await writer.drain()
    # a request sent after the DELETE, and answered: the gateway (one event loop) has read
    # the DELETE as well, while the restart is still held (and says so: the old kernel's
    # last statuses must not make it look idle)
    status, model = await api(gateway, "GET", f"api/kernels/{kid}")
    assert status == 200 and model["execution_state"] == "restarting", model
    assert not restart.done()
    release.touch()
    restarted = await restart
    deleted = await asyncio.wait_for(reader.read(), 60)
    writer.close()
    assert restarted[0] == 200, restarted
    assert deleted.startswith(b"HTTP/1.1 204 "), deleted
    assert (await api(gateway, "GET", f"api/kernels/{kid}"))[0] == 404
    assert gateway.kernel_pids() == []


async def test_delete_during_auto_restart(gateway):
    kid = (await start_kernel(gateway))["id"]
    ks = await KernelSocket.open(gateway, kid)
    await ks.send("execute_request", {"code": "import os; os._exit(1)", "silent": False})
    await ks.until_status("restarting", timeout=20)
    status, body = await api(gateway, "DELETE", f"api/kernels/{kid}")
    assert status == 204, body
    assert gateway.kernel_pids() == []


async def test_local_kernel_ports_are_outside_the_ephemeral_range(gateway):
    """Ports from the ephemeral range can be taken as the source port of any outgoing
    connection before the kernel binds them (the gateway's own connects to starting kernels
    did: 20 concurrent starts failed now and then with "Address already in use")."""
    lo, _hi = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    kid = (await start_kernel(gateway))["id"]
    info = json.loads((gateway.runtime_dir / f"kernel-{kid}.json").read_text())
    ports = [info[k] for k in ("shell_port", "iopub_port", "stdin_port", "hb_port", "control_port")]
    assert len(set(ports)) == 5 and all(1024 <= p < lo for p in ports), (ports, lo)
    assert (await api(gateway, "DELETE", f"api/kernels/{kid}"))[0] == 204


async def test_starting_kernels_get_few_readiness_requests(gateway):
    """The gateway asks a starting kernel for kernel_info until it answers, but only over a
    completed connection and, once its iopub subscription is live, only again after 2 s:
    kernels started together on a busy machine must not find a pile of requests waiting,
    each costing them a reply and two statuses (that made 20 concurrent starts 18% slower
    than without a gateway)."""
    kids = [
        m["id"]
        for m in await asyncio.gather(*(start_kernel(gateway, "debuglog") for _ in range(8)))
    ]
    for kid in kids:
        # a kernel handles shell requests in turn: once it answered one sent now, it has
        # handled (and logged) every request the gateway sent it during the start
        ks = await KernelSocket.open(gateway, kid)
        out, reply = await ks.execute("print(6 * 7)")
        assert out == "42\n" and reply["status"] == "ok"
        await ks.close()
    handled = [
        (gateway.runtime_dir / f"kernel-{kid}.log")
        .read_text()
        .count("MESSAGE TYPE:kernel_info_request")
        for kid in kids
    ]
    assert all(1 <= n <= 3 for n in handled), f"kernel_info requests handled: {handled}"
    for kid in kids:
        assert (await api(gateway, "DELETE", f"api/kernels/{kid}"))[0] == 204


async def test_kernel_that_keeps_dying_is_declared_dead(gateway_factory):
    gw = gateway_factory(extra_args=["--no-autorestart"])
    kid = (await start_kernel(gw))["id"]
    ks = await KernelSocket.open(gw, kid)
    await ks.send("execute_request", {"code": "import os; os._exit(1)", "silent": False})
    await ks.until_status("dead", timeout=20)
    status, model = await api(gw, "GET", f"api/kernels/{kid}")
    assert status == 200 and model["execution_state"] == "dead"
    assert (await api(gw, "DELETE", f"api/kernels/{kid}"))[0] == 204


async def test_configured_by_environment(tmp_path):
    """docker-compose passes RKG_* variables, not flags."""
    gw = GatewayProcess(
        port=free_port(), token=secrets.token_hex(16), base_url="/env/", workdir=tmp_path
    )
    env = {
        **os.environ,
        "RKG_PORT": str(gw.port),
        "RKG_TOKEN": gw.token,
        "RKG_BASE_URL": "/env/",
        "RKG_STATE_DB": ":memory:",
    }
    with subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    ) as proc:
        try:
            await eventually(
                lambda: api(gw, "GET", "api/kernels"),
                until=lambda r: r[0] == 200,
                ignore=(OSError,),
                timeout=20,
            )
            assert (await api(gw, "GET", "api/kernels", token="other"))[0] == 403
        finally:
            proc.terminate()
            assert proc.wait(20) == 0


async def test_local_kernels_are_watched_through_pidfds(gateway_factory):
    """A running local kernel costs the gateway no polling: its monitor waits on a pidfd of
    the kernel's process (one per kernel), and a kill is still noticed and restarted."""
    gw = gateway_factory()
    assert gw.proc is not None

    def pidfds() -> int:
        fds = f"/proc/{gw.proc.pid}/fd"
        found = 0
        for fd in os.listdir(fds):
            try:
                found += os.readlink(f"{fds}/{fd}") == "anon_inode:[pidfd]"
            except OSError:  # closed meanwhile
                pass
        return found

    first, second = (await start_kernel(gw))["id"], (await start_kernel(gw))["id"]
    await eventually(pidfds, until=lambda n: n == 2, what="a pidfd per running kernel")
    assert (await api(gw, "DELETE", f"api/kernels/{first}"))[0] == 204
    await eventually(pidfds, until=lambda n: n == 1, what="the deleted kernel's pidfd closed")

    ks = await KernelSocket.open(gw, second)
    (pid,) = gw.kernel_pids()
    os.kill(pid, signal.SIGKILL)
    await ks.until_status("restarting", timeout=10)
    await eventually(pidfds, until=lambda n: n == 1, what="the restarted kernel watched")
    assert (await ks.execute("print('back')", timeout=30))[0] == "back\n"
    await ks.close()


def _connected_ports(pid: int) -> list[int]:
    """The remote ports of the established TCP connections process `pid` holds."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = []
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "01" and fields[9] in inodes:  # ESTABLISHED, ours
                    ports.append(int(fields[2].rsplit(":", 1)[1], 16))
    return ports


async def test_an_idle_kernel_holds_only_its_iopub_connection(gateway_factory):
    """Without clients the gateway keeps one connection per kernel (iopub, for activity and
    replay); control is opened for an interrupt, restart or shutdown, then closed again."""
    gw = gateway_factory()
    assert gw.proc is not None
    kid = (await start_kernel(gw))["id"]
    info = json.loads((gw.runtime_dir / f"kernel-{kid}.json").read_text())
    ports = {info[f"{c}_port"]: c for c in ("shell", "iopub", "stdin", "control", "hb")}

    def channels() -> list[str]:
        return sorted(ports[p] for p in _connected_ports(gw.proc.pid) if p in ports)

    await eventually(channels, until=lambda c: c == ["iopub"], what="iopub alone")
    assert (await api(gw, "POST", f"api/kernels/{kid}/restart", {}))[0] == 200
    await eventually(channels, until=lambda c: c == ["iopub"], what="iopub alone again")
    assert (await api(gw, "DELETE", f"api/kernels/{kid}"))[0] == 204
    assert gw.kernel_pids() == []
