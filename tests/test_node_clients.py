"""The JavaScript clients, for real, in Node: @jupyterlab/services 7 (JupyterLab 4) and 0.52
driven the way the Hydrogen editor plugin drives it. The flows are in tests/js/."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

JS = Path(__file__).resolve().parent / "js"
pytestmark = pytest.mark.node


def run_flow(node: str, gateway, script: str, *args: str) -> list[dict]:
    env = {**os.environ, "BASE_URL": gateway.url, "TOKEN": gateway.token}
    proc = subprocess.run([node, script, *args], cwd=JS, env=env, capture_output=True,
                          text=True, timeout=180)
    steps = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}\n{gateway.log()}"
    assert all(s["ok"] for s in steps)
    return steps


def test_services7_flow(node, gateway):
    steps = {s["step"]: s for s in run_flow(node, gateway, "services7_flow.mjs")}
    assert list(steps) == ["kernelspecs", "startNew", "execute", "complete", "interrupt",
                           "restart-then-execute", "rename", "shutdown"]
    assert steps["execute"]["protocol"] == "v1.kernel.websocket.jupyter.org"
    assert gateway.kernel_pids() == []


def test_hydrogen_services052_flow(node, gateway):
    steps = [s["step"] for s in run_flow(node, gateway, "hydrogen_flow.js")]
    assert steps == ["getSpecs", "startNew", "execute", "interrupt", "restart-then-execute",
                     "setPath", "shutdown"]
    assert gateway.kernel_pids() == []


def test_hydrogen_wrong_token_is_a_clear_403(node, gateway):
    (step,) = run_flow(node, gateway, "hydrogen_flow.js", "bad-token")
    assert step["status"] == 403
    assert json.loads(step["body"])["message"]  # non-empty: Hydrogen then asks for a token
