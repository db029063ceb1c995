"""Deployment as an operator does it: `docker build` through `docker-compose up -d` with the
repository's Dockerfile and docker-compose.yml on a real dockerd, wait for the HEALTHCHECK, then
the real clients (jupyter_server's gateway client, @jupyterlab/services 7 and 0.52) against the
container; and the same again through nginx with deploy/nginx.conf and a base URL.

The Node flows are tests/js/*, as in test_node_clients, run here against the container; the
jupyter_server flows are test_jupyter_server_client's own tests, collected here again: their
`upstream` fixture takes `gateway`, which this module overrides with the deployment.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from dockerinfra import Docker
from test_jupyter_server_client import (  # noqa: F401  (collected again, against the container)
    jupyter_server,
    test_binary_comm_buffers_keep_the_connection,
    test_notebook_flow,
    upstream,
)

from conftest import ROOT, eventually_sync, free_port, require_infra
from gwclient import KernelSocket, api

pytestmark = pytest.mark.deploy


@dataclass
class Deployed:
    """The compose deployment, with what the shared client tests use of a gateway."""

    docker: Docker
    ctx: Path
    env: dict[str, str]
    url: str
    token: str
    container: str = ""
    building: dict[str, subprocess.Popen[str]] = field(default_factory=dict)  # by command

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://", 1)

    def compose(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        return self.docker.run("docker-compose", *args, env=self.env, cwd=self.ctx, timeout=timeout)

    def build_meanwhile(self, *args: str) -> None:
        """`docker-compose ARGS` (a build) started in the background (see `built`)."""
        self.building[" ".join(("docker-compose", *args))] = subprocess.Popen(
            ["docker-compose", *args],
            env={**self.docker.env, **self.env},
            cwd=self.ctx,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def built(self, timeout: float = 900) -> None:
        """Wait for the background builds; one that failed fails the test."""
        while self.building:
            command, proc = self.building.popitem()
            try:
                out, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
            assert proc.returncode == 0, f"{command}:\n{out}"

    def kernel_pids(self) -> list[int]:
        """ipykernel processes inside the gateway's container."""
        out = self.docker.run("docker", "top", self.container, "-eo", "pid,args").stdout
        return [int(line.split()[0]) for line in out.splitlines()[1:] if "ipykernel" in line]

    def log(self) -> str:
        return self.docker.run("docker", "logs", self.container, check=False).stdout


def run_node_flow(node: str, gw: Deployed, script: str, kernel: str = "python3") -> list[str]:
    """One of the real-client flows in tests/js, on `kernel`; returns the steps it passed."""
    proc = subprocess.run(
        [node, script],
        cwd=ROOT / "tests" / "js",
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "BASE_URL": gw.url, "TOKEN": gw.token, "KERNEL_NAME": kernel},
    )
    assert proc.returncode == 0, f"{script}:\n{proc.stdout}\n{proc.stderr}\n{gw.log()}"
    steps = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert steps and all(s["ok"] for s in steps)
    return [s["step"] for s in steps]


def compose_up(
    docker: Docker,
    ctx: Path,
    base_image: str,
    base_url: str = "/",
    *,
    profile: str = "",
    service: str = "gateway",
    **extra_env: str,
) -> Deployed:
    """`docker-compose [--profile P] up -d --build`, then wait for `service` to be healthy;
    the Deployed is that service (its port: RKG_HOST_PORT, or the profile's own)."""
    port, token = free_port(), secrets.token_hex(16)
    env = {
        "RKG_TOKEN": token,
        "RKG_HOST_PORT": str(port),
        "RKG_BASE_IMAGE": base_image,
        "RKG_BASE_URL": base_url,
        "COMPOSE_PROJECT_NAME": f"rkgtest{os.getpid()}{profile}",
        **extra_env,
    }
    if service == "gateway-docker":
        port = int(env.setdefault("RKG_DOCKER_HOST_PORT", str(free_port())))
    dep = Deployed(docker, ctx, env, f"http://127.0.0.1:{port}{base_url}", token)
    dep.compose(*(["--profile", profile] if profile else []), "up", "-d", "--build")
    dep.container = dep.compose("ps", "-q", service).stdout.strip()
    try:
        eventually_sync(
            lambda: docker.run(
                "docker", "inspect", "--format", "{{.State.Health.Status}}", dep.container
            ).stdout.strip(),
            until=lambda health: health == "healthy",
            timeout=60,
            interval=0.5,
            what="the container healthy",
        )
    except AssertionError as e:
        pytest.fail(f"{e}\n{dep.log()}")
    return dep


def compose_down(dep: Deployed, profile: str = "") -> None:
    dep.compose(
        *(["--profile", profile] if profile else []),
        "down",
        "--volumes",
        "--remove-orphans",
        timeout=120,
    )
    left = dep.docker.run(
        "docker",
        "ps",
        "-aq",
        "--filter",
        f"label=com.docker.compose.project={dep.env['COMPOSE_PROJECT_NAME']}",
    ).stdout.split()
    assert left == [], f"containers left behind: {left}"


@pytest.fixture(scope="module")
def gateway(docker, base_image, build_context) -> Iterator[Deployed]:
    dep = compose_up(docker, build_context, base_image)
    # The docker profile's own image (deploy/kernel-image: ~25 s of pip) is built by compose
    # while the tests use this deployment, which mostly wait on kernels and leave a core idle;
    # the profile's `up --build` (docker_profile) then finds every layer already built.
    dep.build_meanwhile("--profile", "docker", "build", "kernel-image")
    try:
        yield dep
    finally:
        dep.built()
        compose_down(dep)


def test_image_runs_as_non_root_with_init_and_state_volume(gateway):
    uid = gateway.docker.run("docker", "exec", gateway.container, "id", "-u").stdout.strip()
    assert uid == "1000"
    top = gateway.docker.run("docker", "top", gateway.container, "-eo", "pid,args").stdout
    assert "rkg serve" in top
    first = top.splitlines()[1].split(None, 1)[1]  # the container's PID 1 reaps kernels
    assert re.match(r"(/sbin/docker-init|/usr/bin/tini|tini)\b", first), top
    mounts = gateway.docker.run(
        "docker",
        "inspect",
        "--format",
        "{{range .Mounts}}{{.Destination}} {{end}}",
        gateway.container,
    ).stdout
    assert "/data" in mounts.split()


async def test_token_is_required(gateway):
    assert (await api(gateway, "GET", "api/kernels", token=""))[0] == 401
    assert (await api(gateway, "GET", "api/kernels"))[0] == 200


async def test_remote_kernel_on_the_ssh_host(gateway):
    """The compose demo: kernelspec remote-python runs on the sshhost container over SSH."""
    status, model = await api(gateway, "POST", "api/kernels", {"name": "remote-python"})
    assert status == 201, (model, gateway.log())
    ks = await KernelSocket.open(gateway, model["id"], v1=True)
    out, reply = await ks.execute("import socket, os; print(socket.gethostname(), os.getuid())")
    assert reply["status"] == "ok" and out == "sshhost 1001\n"
    await ks.close()
    assert (await api(gateway, "DELETE", f"api/kernels/{model['id']}"))[0] == 204
    assert "ipykernel" not in (ps := sshhost_processes(gateway)), ps


def sshhost_processes(gateway: Deployed) -> str:
    """The command lines running in the compose deployment's SSH host container."""
    args = ["docker-compose", "exec", "-T", "sshhost", "ps", "-eo", "args"]
    return gateway.docker.run(*args, env=gateway.env, cwd=gateway.ctx).stdout


@pytest.mark.parametrize("kernel", ["python3", "remote-python"])
@pytest.mark.parametrize("script", ["services7_flow.mjs", "hydrogen_flow.js"])
def test_js_clients_against_the_container(node, gateway, script, kernel):
    """Both JS clients, on the gateway container's own kernel and on the SSH host's."""
    assert "shutdown" in run_node_flow(node, gateway, script, kernel)
    assert gateway.kernel_pids() == []
    assert "ipykernel" not in (ps := sshhost_processes(gateway)), ps


# -- the opt-in docker profile: kernels as sibling containers through the engine socket -----


@pytest.fixture
def docker_profile(docker, base_image, build_context, gateway) -> Iterator[Deployed]:
    """Up and down around its one test: the profile's fixed-name network rkg-kernels is
    shared with the module's other project, which must not be torn down while in use."""
    gateway.built()  # its kernel image, started by the module's deployment
    sock = docker.host.removeprefix("unix://")
    dep = compose_up(
        docker,
        build_context,
        base_image,
        profile="docker",
        service="gateway-docker",
        DOCKER_SOCKET=sock,
        DOCKER_GID=str(os.stat(sock).st_gid),
    )
    yield dep
    compose_down(dep, profile="docker")
    assert docker.ours() == [], "kernel containers left behind"
    networks = docker.run("docker", "network", "ls", "--format", "{{.Name}}").stdout.split()
    assert "rkg-kernels" not in networks


async def test_docker_profile_runs_kernels_in_sibling_containers(docker_profile):
    dep = docker_profile
    # no kernel in the gateway's own container: it would share the engine socket's group
    status, specs = await api(dep, "GET", "api/kernelspecs")
    assert status == 200 and list(specs["kernelspecs"]) == ["docker-python"], specs
    assert specs["default"] == "docker-python"
    assert (await api(dep, "POST", "api/kernels", {"name": "python3"}))[0] == 404
    status, model = await api(dep, "POST", "api/kernels", {"name": "docker-python"})
    assert status == 201, (model, dep.log())
    kid = model["id"]
    assert dep.docker.ours() == [f"kernel-{kid}"]
    nets = json.loads(
        dep.docker.run(
            "docker", "inspect", "--format", "{{json .NetworkSettings.Networks}}", f"kernel-{kid}"
        ).stdout
    )
    assert list(nets) == ["rkg-kernels"]
    ks = await KernelSocket.open(dep, kid, v1=True)
    out, reply = await ks.execute(
        "import os, socket; print(os.path.exists('/.dockerenv'), os.getuid(), socket.gethostname())"
    )
    assert reply["status"] == "ok"
    dockerenv, uid, hostname = out.split()
    assert (dockerenv, uid) == ("True", "1000") and hostname != dep.container[:12]
    await ks.close()
    assert (await api(dep, "DELETE", f"api/kernels/{kid}"))[0] == 204
    assert dep.docker.ours() == []
    # one left running: the profile's `down` must stop the gateway, which removes it
    status, model = await api(dep, "POST", "api/kernels", {"name": "docker-python"})
    assert status == 201, (model, dep.log())


# -- the same through nginx with the shipped config and a base URL ---------------------------


def nginx_conf(upstream_port: int, listen_port: int, prefix: Path) -> str:
    """deploy/nginx.conf inside a minimal main config, on plain HTTP on loopback (the TLS
    lines are the one part not exercised here)."""
    snippet = (ROOT / "deploy" / "nginx.conf").read_text()
    snippet = snippet.replace("server 127.0.0.1:8888;", f"server 127.0.0.1:{upstream_port};")
    snippet = snippet.replace("listen 443 ssl;", f"listen 127.0.0.1:{listen_port};")
    snippet = re.sub(r"\n\s*ssl_certificate\S* [^\n]*", "", snippet)
    snippet = snippet[: snippet.rindex("server {")]  # the port-80 redirect
    return (
        f"worker_processes 1;\npid {prefix}/nginx.pid;\nerror_log {prefix}/error.log;\n"
        f"events {{}}\nhttp {{\n access_log {prefix}/access.log;\n"
        f" client_body_temp_path {prefix}/body;\n proxy_temp_path {prefix}/proxy;\n"
        f"{snippet}\n}}\n"
    )


@pytest.fixture(scope="module")
def nginx_gateway(docker, base_image, build_context, tmp_path_factory) -> Iterator[Deployed]:
    if not Path("/usr/sbin/nginx").exists():
        require_infra("nginx is not installed (apt-get install nginx-light)")
    dep = compose_up(docker, build_context, base_image, base_url="/gw/")
    prefix = tmp_path_factory.mktemp("nginx")
    port = free_port()
    gateway_port = int(dep.env["RKG_HOST_PORT"])
    (prefix / "nginx.conf").write_text(nginx_conf(gateway_port, port, prefix))
    proc = subprocess.Popen(
        [
            "/usr/sbin/nginx",
            "-c",
            str(prefix / "nginx.conf"),
            "-p",
            str(prefix),
            "-g",
            "daemon off;",
        ]
    )

    def listening() -> bool:
        assert proc.poll() is None, (prefix / "error.log").read_text()
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True

    eventually_sync(listening, ignore=(OSError,), what="nginx listening")
    dep.url = f"http://127.0.0.1:{port}/gw/"
    try:
        yield dep
    finally:
        proc.send_signal(signal.SIGQUIT)
        proc.wait(20)
        compose_down(dep)


async def test_through_nginx_with_base_url(nginx_gateway, node):
    """REST and both JS clients' websockets through the proxy's upgrade handling."""
    status, specs = await api(nginx_gateway, "GET", "api/kernelspecs")
    assert status == 200
    assert specs["kernelspecs"]["python3"]["resources"]["logo-64x64"].startswith("/gw/")
    for script in ("services7_flow.mjs", "hydrogen_flow.js"):
        assert "shutdown" in run_node_flow(node, nginx_gateway, script)
    assert nginx_gateway.kernel_pids() == []
