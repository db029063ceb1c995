"""Backend targets for the contract suite (tests/test_contract.py).

Each backend contributes a fixture named `backend_<name>` that returns a `Backend`: a running
gateway that can start that backend's kernels, the kernelspec to ask for, what the kernel
should see as its hostname, and how to list kernel processes left behind wherever it ran.
Add a backend by adding its fixture (in its own module, listed in conftest's pytest_plugins)
and its name to BACKENDS.
"""

from __future__ import annotations

import json
import secrets
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from conftest import GatewayProcess, _cleanup, eventually_sync, free_port

if TYPE_CHECKING:
    from dockerinfra import Docker
    from slurm import LoginNode, SlurmCluster
    from sshd import SSHLab

BACKENDS = ["local", "ssh", "slurm", "slurm_login", "docker", "swarm"]


@dataclass
class Backend:
    name: str
    gateway: GatewayProcess
    kernel_name: str
    hostname: str
    leftovers: Callable[[], list[str]]


@pytest.fixture(scope="module")
def backend_local(gateway: GatewayProcess) -> Backend:
    return Backend(
        "local",
        gateway,
        "python3",
        socket.gethostname(),
        lambda: [str(p) for p in gateway.kernel_pids()],
    )


@pytest.fixture(scope="module")
def backend_ssh(ssh_lab: SSHLab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    """Kernels on rhost1, an OpenSSH host in its own network namespace (tests/sshd.py)."""
    specs = tmp_path_factory.mktemp("ssh-kernelspecs")
    ssh_lab.write_spec(specs, "ssh-rhost1", "rhost1")
    gw = GatewayProcess(
        port=free_port(),
        token=secrets.token_hex(16),
        extra_args=["--kernelspec-dir", str(specs)],
        workdir=tmp_path_factory.mktemp("gateway-ssh"),
    )
    gw.start()
    host = ssh_lab.hosts["rhost1"]
    yield Backend("ssh", gw, "ssh-rhost1", "rhost1", host.kernels)
    leftovers = _cleanup(gw)
    assert not leftovers, f"kernel processes left behind: {leftovers}"
    assert not host.kernels(), f"remote kernels left behind: {host.kernels()}"


@pytest.fixture(scope="module")
def backend_slurm(
    slurm: SlurmCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Backend]:
    """Kernels as jobs of a real one-node SLURM (tests/slurm.py) that runs them on this
    machine; a job left in the queue after the gateway stopped is a leftover."""
    specs = tmp_path_factory.mktemp("slurm-kernelspecs")
    slurm.write_spec(specs, "slurm-debug")
    gw = GatewayProcess(
        port=free_port(),
        token=secrets.token_hex(16),
        env=slurm.env,
        extra_args=["--kernelspec-dir", str(specs)],
        workdir=tmp_path_factory.mktemp("gateway-slurm"),
    )
    gw.start()
    yield Backend("slurm", gw, "slurm-debug", slurm.node, lambda: slurm.leftovers(gw))
    _cleanup(gw)
    assert not slurm.wait_no_jobs(), f"jobs left behind: {slurm.jobs()}"
    assert not slurm.leftovers(gw), f"kernels left behind: {slurm.leftovers(gw)}"


@pytest.fixture(scope="module")
def backend_slurm_login(
    slurm: SlurmCluster, slurm_login: LoginNode, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Backend]:
    """The same SLURM, submitted to from a login node over SSH (sshd on 127.0.0.1): commands
    run there, files go over SFTP, the kernel's ports are forwarded through it."""
    specs = tmp_path_factory.mktemp("slurm-login-kernelspecs")
    slurm.write_spec(specs, "slurm-login", config=slurm_login.config)
    gw = GatewayProcess(
        port=free_port(),
        token=secrets.token_hex(16),
        extra_args=["--kernelspec-dir", str(specs)],
        workdir=tmp_path_factory.mktemp("gateway-slurm-login"),
    )
    gw.start()

    def leftovers() -> list[str]:
        return slurm.leftovers(gw, slurm_login.runtime_dir)

    yield Backend("slurm_login", gw, "slurm-login", slurm.node, leftovers)
    _cleanup(gw)
    assert not slurm.wait_no_jobs(), f"jobs left behind: {slurm.jobs()}"
    assert not leftovers(), f"kernels left behind: {leftovers()}"


def docker_spec(directory: Path, name: str, **config: Any) -> None:
    """A kernelspec for the Docker (or, with provisioner=, Swarm) backend."""
    provisioner = config.pop("provisioner", "rkg-docker")
    (directory / name).mkdir(parents=True, exist_ok=True)
    (directory / name / "kernel.json").write_text(
        json.dumps(
            {
                "argv": ["python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": name,
                "language": "python",
                "metadata": {
                    "kernel_provisioner": {"provisioner_name": provisioner, "config": config}
                },
            }
        )
    )


@pytest.fixture(scope="module")
def backend_docker(
    docker: Docker, kernel_image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Backend]:
    """Kernels in containers of a real dockerd (tests/dockerinfra.py), ports published on
    127.0.0.1; a labelled container left after the gateway stopped is a leftover."""
    specs = tmp_path_factory.mktemp("docker-kernelspecs")
    docker_spec(
        specs,
        "docker-python",
        image=kernel_image,
        docker_host=docker.host,
        hostname="rkg-docker",
        memory="512m",
    )
    gw = GatewayProcess(
        port=free_port(),
        token=secrets.token_hex(16),
        extra_args=["--kernelspec-dir", str(specs)],
        workdir=tmp_path_factory.mktemp("gateway-docker"),
    )
    gw.start()
    yield Backend("docker", gw, "docker-python", "rkg-docker", docker.ours)
    _cleanup(gw)
    assert not docker.ours(), f"containers left behind: {docker.ours()}"


@pytest.fixture(scope="module")
def backend_swarm(
    swarm: Docker, kernel_image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Backend]:
    """Kernels as services of a one-node Swarm on the test dockerd, ports published in host
    mode; a labelled service or task container left after the gateway stopped is a leftover."""
    specs = tmp_path_factory.mktemp("swarm-kernelspecs")
    docker_spec(
        specs,
        "swarm-python",
        provisioner="rkg-swarm",
        image=kernel_image,
        docker_host=swarm.host,
        hostname="rkg-swarm",
        memory="512m",
    )
    gw = GatewayProcess(
        port=free_port(),
        token=secrets.token_hex(16),
        extra_args=["--kernelspec-dir", str(specs)],
        workdir=tmp_path_factory.mktemp("gateway-swarm"),
    )
    gw.start()
    leftovers = lambda: swarm.ours("service") + swarm.ours()  # noqa: E731
    yield Backend("swarm", gw, "swarm-python", "rkg-swarm", leftovers)
    _cleanup(gw)
    # task containers go a moment after their service
    eventually_sync(
        leftovers,
        until=lambda left: not left,
        timeout=10,
        interval=0.25,
        what="no service or container left behind",
    )


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Backend:
    b: Backend = request.getfixturevalue(f"backend_{request.param}")
    return b
