"""Running a real `jupyter server` (or another Jupyter server process) for the tests: a clean
environment that ignores this machine's Jupyter set-up, and a process on a free port with
token auth that gwclient's `api` and `KernelSocket` talk to like to the gateway.

Used by test_jupyter_server_client.py (jupyter_server in front of the gateway) and by
test_differential.py (jupyter_server beside the gateway, as the reference).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent


def clean_env(root: Path) -> dict[str, str]:
    """Nothing from this machine's Jupyter set-up: own config, data and runtime dirs, and no
    JUPYTER_GATEWAY_* / JUPYTER_TOKEN variables that would override the command line."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("JUPYTER_", "JPY_", "KERNEL_", "KG_"))
    }
    for name in ("config", "data", "runtime"):
        (root / name).mkdir(parents=True, exist_ok=True)
    env.update(
        JUPYTER_CONFIG_DIR=str(root / "config"),
        JUPYTER_DATA_DIR=str(root / "data"),
        JUPYTER_RUNTIME_DIR=str(root / "runtime"),
        PYTHONUNBUFFERED="1",
    )
    return env


@dataclass
class Served:
    """A server subprocess on 127.0.0.1 with token auth (.url, .ws_url, .token for gwclient)."""

    port: int
    token: str
    root: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    @property
    def log_path(self) -> Path:
        return self.root / "server.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, args: list[str], ready_path: str, timeout: float = 60) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=clean_env(self.root),
                cwd=self.root,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{args[0]} exited with {self.proc.returncode}:\n{self.log()}")
            req = urllib.request.Request(
                self.url + ready_path, headers={"Authorization": f"token {self.token}"}
            )
            try:
                with urllib.request.urlopen(req, timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{args} did not answer within {timeout}s:\n{self.log()}")

    def stop(self) -> None:
        """SIGTERM, then whatever is left of its process group gets SIGKILL."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def jupyter_server_args(js: Served, *extra: str) -> list[str]:
    """`jupyter server` on js.port with js.token, serving js.root, no browser."""
    return [
        str(BIN / "jupyter-server"),
        "--no-browser",
        "--allow-root",
        "--ServerApp.open_browser=False",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={js.port}",
        "--ServerApp.port_retries=0",
        f"--ServerApp.root_dir={js.root}",
        f"--IdentityProvider.token={js.token}",
        *extra,
    ]
