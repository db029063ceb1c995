"""No lost stdin: a cell that calls input() as the very first message on a fresh websocket
gets its input_request. The kernel's stdin is a ROUTER, which drops a message for a peer whose
connection it has not seen yet, so the gateway must not forward shell before its stdin
connection to the kernel is complete (gateway/kernels/session.py, stdin_connected).

The same check runs on every backend in test_contract.py; here it is made certain to fail
without that wait (a kernel whose stdin link is slow to connect) and run many times on a
machine kept busy."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from gwclient import api, input_first, start_kernel


@pytest.fixture
def cpu_hogs() -> Iterator[None]:
    """Two busy processes: the machine as loaded as a busy CI runner (2 cores)."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    yield
    for hog in hogs:
        hog.kill()
        hog.wait()


@pytest.mark.parametrize("v1", [False, True], ids=["legacy", "v1"])
async def test_input_first_over_a_stdin_link_slow_to_connect(gateway, v1):
    """Stdin connects 0.5 s after shell (tests/kernelspecs/slowstdin): without the wait, the
    kernel runs input() while its stdin ROUTER does not know us, and the cell hangs."""
    kid = (await start_kernel(gateway, "slowstdin"))["id"]
    try:
        for _ in range(2):
            await input_first(gateway, kid, v1=v1)
        # after a restart every connection to the kernel is new again
        assert (await api(gateway, "POST", f"api/kernels/{kid}/restart", {}))[0] == 200
        await input_first(gateway, kid, v1=v1)
    finally:
        await api(gateway, "DELETE", f"api/kernels/{kid}")


@pytest.mark.timeout(300)
async def test_input_first_many_times_on_a_busy_machine(gateway, cpu_hogs):
    kid = (await start_kernel(gateway))["id"]
    try:
        for i in range(40):
            await input_first(gateway, kid, v1=bool(i % 2))
    finally:
        await api(gateway, "DELETE", f"api/kernels/{kid}")
