"""Backend targets for the contract suite (tests/test_contract.py).

Each backend contributes a fixture named `backend_<name>` that returns a `Backend`: a running
gateway that can start that backend's kernels, the kernelspec to ask for, what the kernel
should see as its hostname, and how to list kernel processes left behind wherever it ran.
Add a backend by adding its fixture (in its own module, listed in conftest's pytest_plugins)
and its name to BACKENDS.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from conftest import GatewayProcess

BACKENDS = ["local"]


@dataclass
class Backend:
    name: str
    gateway: GatewayProcess
    kernel_name: str
    hostname: str
    leftovers: Callable[[], list[str]]


@pytest.fixture(scope="module")
def backend_local(gateway: GatewayProcess) -> Backend:
    return Backend("local", gateway, "python3", socket.gethostname(),
                   lambda: [str(p) for p in gateway.kernel_pids()])


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Backend:
    return request.getfixturevalue(f"backend_{request.param}")
