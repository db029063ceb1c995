"""The JavaScript clients, for real, in Node: @jupyterlab/services 7 (JupyterLab 4) and 0.52
driven the way the Hydrogen editor plugin drives it. The flows are in tests/js/ (installed with
`npm ci --prefix tests/js`); each prints one JSON line per step and exits non-zero on a failure,
after deleting what it started. Every flow must leave no kernel process behind."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import eventually_sync

JS = Path(__file__).resolve().parent / "js"
V1 = "v1.kernel.websocket.jupyter.org"
pytestmark = pytest.mark.node


def _tail(text: str, lines: int = 80) -> str:
    return "\n".join(text.splitlines()[-lines:])


def run_flow(
    node: str, gateway, script: str, *args: str, token: str | None = None, timeout: float = 110
) -> list[dict]:
    """Run a flow script against `gateway`; returns its steps, all of which must have passed."""
    env = {
        **os.environ,
        "BASE_URL": gateway.url,
        "TOKEN": gateway.token if token is None else token,
    }
    try:
        proc = subprocess.run(
            [node, script, *args], cwd=JS, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as e:
        stdout = (e.stdout or b"").decode(errors="replace")  # bytes, even with text=True
        pytest.fail(
            f"{script} {' '.join(args)} hung for {timeout}s\nstdout:\n{stdout}\n"
            f"gateway log:\n{_tail(gateway.log())}"
        )
    report = (
        f"{script} {' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\n"
        f"stderr:\n{_tail(proc.stderr, 40)}\ngateway log:\n{_tail(gateway.log())}"
    )
    try:  # stdout is nothing but the flow's JSON lines
        steps = [json.loads(line) for line in proc.stdout.splitlines()]
    except json.JSONDecodeError:
        pytest.fail(f"non-JSON output\n{report}")
    assert proc.returncode == 0, report
    assert steps and all(s["ok"] for s in steps), report
    return steps


def assert_no_kernel_left(gateway, grace: float = 5) -> None:
    try:
        eventually_sync(
            gateway.kernel_pids,
            until=lambda pids: pids == [],
            timeout=grace,
            what="no kernel process left after the flow",
        )
    except AssertionError as e:
        raise AssertionError(f"{e}\n{_tail(gateway.log())}") from None


def test_services7_flow(node, gateway):
    steps = {s["step"]: s for s in run_flow(node, gateway, "services7_flow.mjs")}
    assert list(steps) == [
        "kernelspecs",
        "kernel-manager",
        "startNew",
        "execute",
        "large-output",
        "complete",
        "interrupt",
        "restart-then-execute",
        "rename",
        "shutdown",
    ]
    assert steps["kernelspecs"]["logoStatus"] == 200
    # v1 negotiated on every socket, the one after the restart's reconnection included
    for name in ("kernel-manager", "startNew", "restart-then-execute"):
        assert steps[name]["connectionStatus"] == "connected", steps[name]
        assert steps[name]["protocol"] == V1, steps[name]
        # browsers and `ws` offer permessage-deflate; the gateway accepts it
        assert "permessage-deflate" in steps[name]["extensions"], steps[name]
    assert steps["execute"] == {"step": "execute", "ok": True, "out": "42\n", "protocol": V1}
    assert steps["interrupt"]["ename"] == "KeyboardInterrupt"
    assert steps["interrupt"]["ms"] < 5000  # the sleep was 30 s
    assert steps["restart-then-execute"]["out"] == "False\n"
    assert steps["rename"]["path"].startswith("renamed-")
    assert steps["shutdown"]["sockets"] == 2  # the first one and the restart's: no drop
    assert_no_kernel_left(gateway)


def test_hydrogen_services052_flow(node, gateway):
    steps = {s["step"]: s for s in run_flow(node, gateway, "hydrogen_flow.js")}
    assert list(steps) == [
        "getSpecs",
        "listSessions",
        "startNew",
        "execute",
        "large-output",
        "interrupt",
        "restart-then-execute",
        "setPath",
        "shutdown",
    ]
    assert steps["startNew"]["path"].startswith("file.py-")
    assert steps["execute"]["out"] == "42\n"
    assert steps["large-output"]["sizes"] == [1_600_001, 1_600_002, 1_600_003]
    assert steps["interrupt"]["ename"] == "KeyboardInterrupt"
    assert steps["interrupt"]["ms"] < 5000
    # output of the restarted kernel arrived on the socket opened before the restart
    assert steps["restart-then-execute"] == {
        "step": "restart-then-execute",
        "ok": True,
        "out": "False\n",
        "sockets": 1,
    }
    assert steps["setPath"]["path"].startswith("renamed.py-")
    assert_no_kernel_left(gateway)


def test_hydrogen_wrong_token_is_a_clear_auth_error(node, gateway):
    started = time.monotonic()
    steps = {
        s["step"]: s for s in run_flow(node, gateway, "hydrogen_flow.js", "bad-token", timeout=90)
    }
    assert list(steps) == ["bad-token-rest", "bad-token-websocket"]
    rest = steps["bad-token-rest"]
    assert rest["status"] in (401, 403)
    # a non-empty JSON body with a message: only then does Hydrogen prompt for a token
    assert json.loads(rest["body"])["message"]
    assert rest["ms"] < 5000  # an answer, not a hang
    assert steps["bad-token-websocket"]["status"] in (401, 403)
    assert time.monotonic() - started < 60
    assert_no_kernel_left(gateway)
