"""The Docker backend against a real dockerd (tests/dockerinfra.py) with a kernel image built
here: what the contract suite does not cover. Where the kernel runs (a container of ours,
named and labelled), limits that bite, the working directory mirrored, the container
network, clear errors for every way a start fails, and orphans swept at gateway start."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from types import SimpleNamespace
from typing import cast

import pytest
from dockerinfra import running_dockerd

from backends import docker_spec
from conftest import eventually, eventually_sync, free_port
from gwclient import KernelSocket, api, start_kernel


@pytest.fixture
def specs(tmp_path, docker, kernel_image):
    d = tmp_path / "kernelspecs"
    base = {"image": kernel_image, "docker_host": docker.host}
    docker_spec(d, "dk", **base)
    docker_spec(d, "dk-limited", **base, memory="256m", pids_limit=64, cpus=0.5)
    docker_spec(d, "dk-mirror", **base, mirror_working_dir=True)
    docker_spec(d, "dk-network", **base, reach="network")
    docker_spec(d, "dk-root", **base, uid=0)
    docker_spec(d, "dk-gpu", **base, gpus="all")
    docker_spec(d, "dk-noimage", **base | {"image": "rkg-test-absent:nope"})
    docker_spec(d, "dk-nodaemon", **base | {"docker_host": f"unix://{tmp_path}/none.sock"})
    docker_spec(
        d,
        "dk-crash",
        **base,
        kernel_cmd=[
            "python3",
            "-c",
            "import sys; print('no kernel today', flush=True); sys.exit(3)",
        ],
    )
    docker_spec(d, "dk-hang", **base, kernel_cmd=["sh", "-c", "sleep 600", "{connection_file}"])
    return d


@pytest.fixture
def gw(gateway_factory, specs, docker, tmp_path):
    gw = gateway_factory(
        extra_args=["--kernelspec-dir", str(specs), "--working-dir-root", str(tmp_path)]
    )
    yield gw
    gw.stop()
    assert docker.ours() == [], "containers left behind"


# the container's limits as its kernel sees them, cgroup v2 or v1 (this machine: v1)
CGROUP_LIMITS = """
import os
def first(*paths):
    for p in paths:
        if os.path.exists(p):
            return open(p).read().split()[0]
cg = '/sys/fs/cgroup/'
print(first(cg + 'memory.max', cg + 'memory/memory.limit_in_bytes'),
      first(cg + 'pids.max', cg + 'pids/pids.max'),
      first(cg + 'cpu.max', cg + 'cpu/cpu.cfs_quota_us'))
"""


async def until(check, timeout: float = 15) -> None:
    await eventually(check, timeout=timeout, interval=0.1)


def crash_before_recording(gw, kernel_id: str) -> None:
    """As if the gateway died between creating the kernel's container (or service) and
    recording it: kill -9, forget its record, start again."""
    gw.stop(signal.SIGKILL)
    db = sqlite3.connect(gw.workdir / f"state-{gw.port}.sqlite")
    with db:
        db.execute("DELETE FROM kernels WHERE id = ?", (kernel_id,))
    db.close()
    gw.start()


def inspect(docker, name: str) -> dict:
    return json.loads(docker.run("docker", "inspect", name).stdout)[0]


async def test_kernel_runs_in_a_named_labelled_container(gw, docker):
    model = await start_kernel(gw, "dk", env={"KERNEL_USERNAME": "ada@example.org"})
    kid = model["id"]
    name = f"ada-example.org-{kid}"
    assert docker.ours() == [name]
    labels = inspect(docker, name)["Config"]["Labels"]
    assert labels["kernel_id"] == kid and labels["component"] == "kernel"
    assert labels["app"] == "remote-kernel-gateway"
    ks = await KernelSocket.open(gw, kid, v1=True)
    out, _ = await ks.execute(
        "import os, socket; print(os.path.exists('/.dockerenv'), "
        "os.getuid(), os.environ.get('KERNEL_USERNAME'), "
        "'RKG_CONNECTION_INFO' in os.environ, socket.gethostname())"
    )
    assert out.split() == [
        "True",
        "1000",
        "ada@example.org",
        "False",
        inspect(docker, name)["Config"]["Hostname"],
    ]
    await ks.close()
    assert (await api(gw, "DELETE", f"api/kernels/{kid}"))[0] == 204
    assert docker.ours() == []


async def test_engine_from_docker_host_and_kept_across_restart(
    gateway_factory, tmp_path, docker, kernel_image
):
    """A kernelspec without docker_host uses the gateway's DOCKER_HOST; --keep-kernels leaves
    the container running and the next gateway re-attaches to it."""
    d = tmp_path / "env-kernelspecs"
    docker_spec(d, "dk-env", image=kernel_image)
    gw = gateway_factory(
        extra_args=["--kernelspec-dir", str(d), "--keep-kernels"], env={"DOCKER_HOST": docker.host}
    )
    kid = (await start_kernel(gw, "dk-env"))["id"]
    ks = await KernelSocket.open(gw, kid, v1=True)
    await ks.execute("kept = 42")
    await ks.close()
    assert gw.stop() == 0
    assert docker.ours() == [f"kernel-{kid}"]
    gw.start()
    ks = await KernelSocket.open(gw, kid, v1=True)
    assert (await ks.execute("print(kept)"))[0] == "42\n"
    await ks.close()
    assert (await api(gw, "DELETE", f"api/kernels/{kid}"))[0] == 204
    assert docker.ours() == []


async def test_limits_are_enforced(gw, docker):
    model = await start_kernel(gw, "dk-limited")
    ks = await KernelSocket.open(gw, model["id"], v1=True)
    out, reply = await ks.execute(CGROUP_LIMITS)
    assert reply["status"] == "ok", reply
    assert out.split() == [str(256 * 1024 * 1024), "64", "50000"]
    # more memory than the limit: the kernel is killed, the gateway says so and restarts it
    await ks.send(
        "execute_request",
        {"code": "x = bytearray(600 * 1024 * 1024); x[::4096] = b'1' * len(x[::4096])"},
    )
    await ks.until_status("restarting", timeout=60)
    assert (await ks.execute("print('x' in globals())", timeout=60))[0] == "False\n"
    await ks.close()
    assert (await api(gw, "DELETE", f"api/kernels/{model['id']}"))[0] == 204


async def test_working_dir_is_mirrored(gw, tmp_path):
    work = tmp_path / "project"
    work.mkdir()
    work.chmod(0o777)
    (work / "data.txt").write_text("from the host\n")
    model = await start_kernel(gw, "dk-mirror", env={"KERNEL_WORKING_DIR": str(work)})
    ks = await KernelSocket.open(gw, model["id"], v1=True)
    out, _ = await ks.execute("import os; print(os.getcwd()); print(open('data.txt').read())")
    assert out.splitlines()[:2] == [str(work), "from the host"]
    await ks.close()
    assert (await api(gw, "DELETE", f"api/kernels/{model['id']}"))[0] == 204


async def test_reached_on_the_container_network(gw, docker):
    """reach "network": the gateway connects to the container's own address, no ports
    published (here the bridge is routable from the host; in compose, a shared network)."""
    model = await start_kernel(gw, "dk-network")
    info = inspect(docker, f"kernel-{model['id']}")
    assert not info["NetworkSettings"]["Ports"] or not any(
        info["NetworkSettings"]["Ports"].values()
    )
    ks = await KernelSocket.open(gw, model["id"], v1=True)
    assert (await ks.execute("print(6 * 7)"))[0] == "42\n"
    await ks.close()
    assert (await api(gw, "DELETE", f"api/kernels/{model['id']}"))[0] == 204


@pytest.mark.parametrize(
    ("spec", "env", "status", "words"),
    [
        ("dk-noimage", {}, 500, ["rkg-test-absent:nope", "build it there or pull it"]),
        ("dk-nodaemon", {}, 503, ["unreachable", "none.sock"]),
        ("dk-crash", {}, 500, ["exit", "no kernel today"]),
        ("dk-hang", {"KERNEL_LAUNCH_TIMEOUT": "4"}, 504, ["within 4 s"]),
        ("dk-root", {}, 403, ["uid 0"]),
        ("dk", {"KERNEL_UID": "0"}, 403, ["uid 0"]),
        ("dk-gpu", {}, 500, ["GPU"]),
    ],
)
async def test_failed_starts_say_why_and_leave_nothing(gw, docker, spec, env, status, words):
    code, body = await api(gw, "POST", "api/kernels", {"name": spec, "env": env})
    assert code == status, body
    assert set(body) == {"reason", "message"} and "Traceback" not in body["message"]
    for word in words:
        assert word in body["message"], body["message"]
    assert docker.ours() == []
    assert (await api(gw, "GET", "api/kernels"))[1] == []
    # the gateway is fine and the next start works
    model = await start_kernel(gw, "dk")
    assert (await api(gw, "DELETE", f"api/kernels/{model['id']}"))[0] == 204


async def test_orphans_are_swept_at_start_and_others_kept(
    gateway_factory, specs, docker, kernel_image, tmp_path
):
    """A gateway killed between creating a container and recording it leaves an orphan: the
    next start of that gateway removes it, and leaves alone containers of other gateways and
    the kernels it re-attaches to."""
    gw = gateway_factory(extra_args=["--kernelspec-dir", str(specs)])
    kept = (await start_kernel(gw, "dk"))["id"]
    lost = (await start_kernel(gw, "dk"))["id"]
    other = "rkg-test-other-gateway"
    docker.run(
        "docker",
        "run",
        "-d",
        "--name",
        other,
        "--label",
        "app=remote-kernel-gateway",
        "--label",
        "rkg.gateway=someone-else",
        "--label",
        "kernel_id=x",
        "--entrypoint",
        "sleep",
        kernel_image,
        "600",
    )
    try:
        crash_before_recording(gw, lost)
        await until(lambda: f"kernel-{lost}" not in docker.ours())  # swept while serving
        assert sorted(docker.ours()) == sorted([f"kernel-{kept}", other])
        assert "orphaned" in gw.log()
        ks = await KernelSocket.open(gw, kept, v1=True)
        assert (await ks.execute("print('still here')"))[0] == "still here\n"
        await ks.close()
        assert (await api(gw, "DELETE", f"api/kernels/{kept}"))[0] == 204
    finally:
        docker.run("docker", "rm", "-f", other, check=False)
    gw.stop()
    assert docker.ours() == []


async def test_gateway_shutdown_removes_every_container(gateway_factory, specs, docker):
    gw = gateway_factory(extra_args=["--kernelspec-dir", str(specs)])
    models = await asyncio.gather(*[start_kernel(gw, "dk") for _ in range(4)])
    assert len(docker.ours()) == 4
    assert gw.stop() == 0
    assert docker.ours() == [], [m["id"] for m in models]


# -- Swarm: a service per kernel on a one-node swarm of the same dockerd --------------------


@pytest.fixture
def swarm_gw(gateway_factory, tmp_path, swarm, kernel_image):
    d = tmp_path / "swarm-kernelspecs"
    base = {"provisioner": "rkg-swarm", "image": kernel_image, "docker_host": swarm.host}
    docker_spec(d, "sw", **base, memory="256m", pids_limit=64)
    docker_spec(d, "sw-noimage", **base | {"image": "rkg-test-absent:nope"})
    docker_spec(d, "sw-nowhere", **base, constraints=["node.labels.rkg-test-nowhere==true"])
    docker_spec(d, "sw-hang", **base, kernel_cmd=["sh", "-c", "sleep 600", "{connection_file}"])
    # the same engine, some of its answers held back (HeldAnswers)
    slow = base | {"docker_host": f"unix://{tmp_path / 'held.sock'}"}
    docker_spec(d, "sw-slow", **slow)
    docker_spec(
        d, "sw-slow-hang", **slow, kernel_cmd=["sh", "-c", "sleep 600", "{connection_file}"]
    )
    gw = gateway_factory(extra_args=["--kernelspec-dir", str(d)])
    yield gw
    gw.stop()
    wait_none_left(swarm)


def wait_none_left(swarm) -> None:
    # a service's task container goes a moment after the service
    eventually_sync(
        lambda: swarm.ours("service") + swarm.ours(),
        until=lambda left: left == [],
        timeout=10,
        interval=0.25,
        what="no service or container left behind",
    )


async def test_swarm_kernel_is_a_service_task_with_limits(swarm_gw, swarm):
    kid = (await start_kernel(swarm_gw, "sw"))["id"]
    assert swarm.ours("service") == [f"kernel-{kid}"]
    service = json.loads(swarm.run("docker", "service", "inspect", f"kernel-{kid}").stdout)[0]
    assert service["Spec"]["Labels"]["kernel_id"] == kid
    assert service["Spec"]["TaskTemplate"]["RestartPolicy"]["Condition"] == "none"
    ks = await KernelSocket.open(swarm_gw, kid, v1=True)
    out, _ = await ks.execute("import os; print(os.path.exists('/.dockerenv'), os.getuid())")
    assert out.split() == ["True", "1000"]
    out, _ = await ks.execute(CGROUP_LIMITS)
    assert out.split()[:2] == [str(256 * 1024 * 1024), "64"]
    await ks.close()
    assert (await api(swarm_gw, "DELETE", f"api/kernels/{kid}"))[0] == 204
    wait_none_left(swarm)


@pytest.mark.parametrize(
    ("spec", "env", "status", "words"),
    [
        ("sw-noimage", {}, 500, ["rkg-test-absent:nope", "does not pull"]),
        (
            "sw-nowhere",
            {"KERNEL_LAUNCH_TIMEOUT": "4"},
            504,
            ["within 4 s", "pending", "no suitable node"],
        ),
    ],
)
async def test_swarm_failed_starts_say_why(swarm_gw, swarm, spec, env, status, words):
    code, body = await api(swarm_gw, "POST", "api/kernels", {"name": spec, "env": env})
    assert code == status, body
    for word in words:
        assert word in body["message"], body["message"]
    wait_none_left(swarm)


class HeldAnswers:
    """A Docker socket in front of the test dockerd that holds back the engine's answer to
    each request whose path has `held` in it for `hold` seconds, as a busy engine would: a
    service create done but its id not yet known to the gateway (as when a first creation
    on a fresh data root takes a minute), a signal sent but not yet confirmed."""

    def __init__(self, upstream: str, path: str, held: bytes, hold: float) -> None:
        self.upstream, self.path = upstream.removeprefix("unix://"), path
        self.held, self.hold = held, hold
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.serving: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> HeldAnswers:
        self.server = await asyncio.start_unix_server(self._serve, self.path)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:  # the gateway's pooled connections: their pumps end
            w.close()
        await asyncio.gather(*self.serving, return_exceptions=True)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.serving.add(cast(asyncio.Task[None], asyncio.current_task()))
        up_r, up_w = await asyncio.open_unix_connection(self.upstream)
        self.writers |= {client_w, up_w}
        holding = False  # such a request went up on this connection (HTTP/1.1: the next answer)

        async def up() -> None:
            nonlocal holding
            while data := await client_r.read(65536):
                holding = holding or self.held in data.split(b"\r\n", 1)[0]
                up_w.write(data)
                await up_w.drain()
            up_w.write_eof()

        async def down() -> None:
            nonlocal holding
            while data := await up_r.read(65536):
                if holding:
                    holding = False
                    await asyncio.sleep(self.hold)
                client_w.write(data)
                await client_w.drain()

        await asyncio.gather(up(), down(), return_exceptions=True)
        for w in (client_w, up_w):
            w.close()


async def _stage_of(gw, kid: str) -> str:
    code, model = await api(gw, "GET", f"api/kernels/{kid}")
    return model["gateway"]["stage"] if code == 200 else f"gone ({code})"


@pytest.mark.parametrize(
    ("spec", "timeout", "moment", "held"),
    [
        # the engine made the service, its answer is still on the way
        ("sw-slow", 60, "created", b"/services/create"),
        ("sw-slow", 2, "created", b"/services/create"),  # and the launch timed out first
        ("sw-nowhere", 60, "Swarm task pending", b""),
        ("sw-hang", 60, "waiting for the kernel to answer", b""),
        # the launch timed out, and its undo waits for the engine to signal the kernel
        ("sw-slow-hang", 3, "waiting for the kernel to answer", b"/kill"),
    ],
)
async def test_swarm_start_deleted_while_starting_leaves_nothing(
    swarm_gw, swarm, tmp_path, spec, timeout, moment, held
):
    """DELETE of a Swarm kernel still starting, at each moment of its start, alone or
    after the launch timed out (two cancellations of one start): its service goes."""
    async with HeldAnswers(swarm.host, str(tmp_path / "held.sock"), held or b"\0", hold=5):
        began = time.monotonic()
        body = {"name": spec, "env": {"KERNEL_LAUNCH_TIMEOUT": str(timeout)}}
        post = asyncio.create_task(api(swarm_gw, "POST", "api/kernels", body))
        _, listed = await eventually(
            lambda: api(swarm_gw, "GET", "api/kernels"),
            until=lambda r: r[1],
            timeout=30,
            what="the kernel listed",
        )
        kid = listed[0]["id"]
        if moment == "created":
            await until(lambda: swarm.ours("service") == [f"kernel-{kid}"], timeout=30)
        else:
            await eventually(
                lambda: _stage_of(swarm_gw, kid),
                until=lambda stage: moment in stage,
                timeout=30,
                what=f"stage {moment!r}",
            )
        if timeout < 60:  # DELETE within the undo, which the held answers make last
            await asyncio.sleep(max(0.0, began + timeout + 1.5 - time.monotonic()))
        assert (await api(swarm_gw, "DELETE", f"api/kernels/{kid}"))[0] == 204  # still starting
        status, answer = await asyncio.wait_for(post, 60)
        assert status == 409 and "deleted while it was starting" in answer["message"], answer
    wait_none_left(swarm)


async def test_swarm_published_ports_are_the_ipv4_ones(swarm_gw, swarm, kernel_image):
    """A dual-stack engine publishes each port on 0.0.0.0 and on :: from two allocators; once
    they are out of step (here: one IPv4-only port first, in production: many starts at
    once) the task lists two different ports per target port, and only the IPv4 one
    reaches the kernel at the node's IPv4 address."""
    name = f"rkg-test-v4only-{secrets.token_hex(4)}"
    swarm.run(
        "docker", "run", "-d", "--name", name, "-p", "127.0.0.1::9", kernel_image, "sleep", "120"
    )
    try:
        model = await start_kernel(swarm_gw, "sw", env={"KERNEL_LAUNCH_TIMEOUT": "30"})
        ks = await KernelSocket.open(swarm_gw, model["id"], v1=True)
        assert (await ks.execute("print(6 * 7)"))[0] == "42\n"
        await ks.close()
        assert (await api(swarm_gw, "DELETE", f"api/kernels/{model['id']}"))[0] == 204
    finally:
        swarm.run("docker", "rm", "-f", name, check=False)


async def test_swarm_orphans_are_swept_at_start(swarm_gw, swarm):
    kept = (await start_kernel(swarm_gw, "sw"))["id"]
    lost = (await start_kernel(swarm_gw, "sw"))["id"]
    crash_before_recording(swarm_gw, lost)
    await until(lambda: swarm.ours("service") == [f"kernel-{kept}"])
    ks = await KernelSocket.open(swarm_gw, kept, v1=True)
    assert (await ks.execute("print('still here')"))[0] == "still here\n"
    await ks.close()
    assert (await api(swarm_gw, "DELETE", f"api/kernels/{kept}"))[0] == 204


# -- a remote engine over SSH: dockerd inside an SSH lab host's network namespace -----------

REMOTE_DATA_ROOT = "/var/lib/rkg-test-docker-remote"


@pytest.fixture(scope="module")
def remote_engine(ssh_lab, docker, kernel_image, tmp_path_factory):
    """A second dockerd, in rhost2's network namespace (tests/sshd.py): what it publishes
    on 127.0.0.1 is rhost2's loopback, which this machine cannot reach, so only the
    gateway's SSH forwards (socket and kernel ports) make a kernel there work."""
    host = ssh_lab.hosts["rhost2"]
    tmp = tmp_path_factory.mktemp("remote-dockerd")
    with running_dockerd(tmp, REMOTE_DATA_ROOT, netns=host.ns) as remote:
        if not remote.has_image(kernel_image):
            with subprocess.Popen(
                ["docker", "save", kernel_image], env=docker.env, stdout=subprocess.PIPE
            ) as save:
                subprocess.run(
                    ["docker", "load"],
                    stdin=save.stdout,
                    env=remote.env,
                    check=True,
                    capture_output=True,
                    timeout=600,
                )
        yield host, remote, f"ssh://root@{host.addr}{tmp / 'docker.sock'}"


async def test_remote_engine_over_ssh(
    gateway_factory, ssh_lab, remote_engine, docker, kernel_image, tmp_path
):
    host, remote, url = remote_engine
    d = tmp_path / "remote-kernelspecs"
    docker_spec(
        d,
        "dk-remote",
        image=kernel_image,
        docker_host=url,
        hostname="rkg-remote",
        ssh_identity_file=str(ssh_lab.client_key),
        ssh_known_hosts=str(ssh_lab.known_hosts),
    )
    gw = gateway_factory(extra_args=["--kernelspec-dir", str(d)])
    kids = [(await start_kernel(gw, "dk-remote"))["id"] for _ in range(2)]
    assert sorted(remote.ours()) == sorted(f"kernel-{k}" for k in kids)
    assert docker.ours() == []  # not on the local engine
    # the API (the orphan sweep at start included) and both kernels' ports share one SSH
    # connection to the host
    assert host.established() == 1
    ks = await KernelSocket.open(gw, kids[0], v1=True)
    out, _ = await ks.execute(
        "import socket, os; print(socket.gethostname(), os.path.exists('/.dockerenv'))"
    )
    assert out.split() == ["rkg-remote", "True"]
    msg_id = await ks.start_long_cell()
    assert (await api(gw, "POST", f"api/kernels/{kids[0]}/interrupt", {}))[0] == 204
    reply = next(
        m
        for m in await ks.reply_and_idle(msg_id, timeout=15)
        if m["header"]["msg_type"] == "execute_reply"
    )["content"]
    assert reply["ename"] == "KeyboardInterrupt"
    await ks.close()
    assert (await api(gw, "DELETE", f"api/kernels/{kids[0]}"))[0] == 204
    assert remote.ours() == [f"kernel-{kids[1]}"]
    assert gw.stop() == 0
    assert remote.ours() == []


async def test_rkg_spec_add_docker_and_swarm(
    gateway_factory, tmp_path, docker, swarm, kernel_image
):
    """`rkg spec add docker|swarm` write kernelspecs the gateway runs as they are; bad
    input is a one-line error."""
    d = tmp_path / "cli-kernelspecs"

    def rkg(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "gateway", "spec", *args, "--dir", str(d)],
            capture_output=True,
            text=True,
            timeout=30,
        )

    assert (
        rkg(
            "add",
            "docker",
            "cli-docker",
            "--image",
            kernel_image,
            "--docker-host",
            docker.host,
            "--memory",
            "300m",
            "--env",
            "GREETING=hello",
            "--label",
            "team=ml",
        ).returncode
        == 0
    )
    assert (
        rkg(
            "add",
            "swarm",
            "cli-swarm",
            "--image",
            kernel_image,
            "--docker-host",
            swarm.host,
            "--constraint",
            "node.role==manager",
        ).returncode
        == 0
    )
    bad = rkg("add", "docker", "bad", "--image", kernel_image, "--env", "NOEQUALS")
    assert bad.returncode != 0 and "KEY=VALUE" in bad.stderr and "Traceback" not in bad.stderr
    listed = rkg("list").stdout
    assert "cli-docker\trkg-docker" in listed and "cli-swarm\trkg-swarm" in listed

    gw = gateway_factory(extra_args=["--kernelspec-dir", str(d)])
    for name in ("cli-docker", "cli-swarm"):
        kid = (await start_kernel(gw, name))["id"]
        ks = await KernelSocket.open(gw, kid, v1=True)
        out, _ = await ks.execute(
            "import os; print(os.path.exists('/.dockerenv'), os.environ.get('GREETING'))"
        )
        assert out.split() == ["True", "hello" if name == "cli-docker" else "None"]
        if name == "cli-docker":
            labels = inspect(docker, f"kernel-{kid}")["Config"]["Labels"]
            assert labels["team"] == "ml" and labels["kernel_id"] == kid
        await ks.close()
        assert (await api(gw, "DELETE", f"api/kernels/{kid}"))[0] == 204
    gw.stop()
    wait_none_left(swarm)


async def test_an_engine_that_never_answers_holds_nothing_up(
    gateway_factory, tmp_path, kernel_image
):
    """A socket that accepts connections and never answers: the gateway serves at once (the
    orphan sweep runs in the background), a start there ends with KERNEL_LAUNCH_TIMEOUT, and
    SIGTERM still stops the gateway promptly."""
    hung = socket.socket(socket.AF_UNIX)
    hung.bind(str(tmp_path / "hung.sock"))
    hung.listen(64)
    try:
        d = tmp_path / "hung-kernelspecs"
        docker_spec(d, "dk-hung", image=kernel_image, docker_host=f"unix://{tmp_path}/hung.sock")
        t0 = time.monotonic()
        gw = gateway_factory(extra_args=["--kernelspec-dir", str(d)])
        assert time.monotonic() - t0 < 10
        code, body = await api(
            gw, "POST", "api/kernels", {"name": "dk-hung", "env": {"KERNEL_LAUNCH_TIMEOUT": "3"}}
        )
        assert code == 504 and "within 3 s" in body["message"], body
        assert (await api(gw, "GET", "api/kernels"))[1] == []
        t0 = time.monotonic()
        assert gw.stop() == 0 and time.monotonic() - t0 < 15
    finally:
        hung.close()


async def test_swarm_reached_on_an_attachable_overlay(swarm, kernel_image, gateway_image, tmp_path):
    """reach "network" on Swarm: the gateway runs in a container on an attachable overlay,
    kernels are dnsrr services on it without published ports, reached at their task's
    address there (the routing mesh and VIPs are not used: no IPVS here)."""
    net, name = "rkg-test-overlay", "rkg-test-overlay-gateway"
    d = tmp_path / "overlay-kernelspecs"
    docker_spec(
        d,
        "sw-overlay",
        provisioner="rkg-swarm",
        image=kernel_image,
        docker_host="unix:///var/run/docker.sock",
        network=net,
        reach="network",
    )
    d.chmod(0o755)
    port, token = free_port(), secrets.token_hex(16)
    swarm.run("docker", "network", "create", "--driver", "overlay", "--attachable", net)
    try:
        swarm.run(
            "docker",
            "run",
            "-d",
            "--name",
            name,
            "--network",
            net,
            "--user",
            "root",
            "-p",
            f"127.0.0.1:{port}:8888",
            "-e",
            f"RKG_TOKEN={token}",
            "-e",
            "RKG_KERNELSPEC_DIRS=/kernelspecs",
            "-v",
            f"{d}:/kernelspecs:ro",
            "-v",
            f"{swarm.host.removeprefix('unix://')}:/var/run/docker.sock",
            gateway_image,
        )
        gw = SimpleNamespace(
            url=f"http://127.0.0.1:{port}/", ws_url=f"ws://127.0.0.1:{port}/", token=token
        )
        try:  # refused, or closed by the port proxy, until it serves
            await eventually(
                lambda: api(gw, "GET", "api"),
                until=lambda r: r[0] == 200,
                timeout=20,
                interval=0.2,
                ignore=(Exception,),
            )
        except AssertionError as e:
            raise AssertionError(
                f"{e}\n{swarm.run('docker', 'logs', name, check=False).stderr}"
            ) from None
        kid = (await start_kernel(gw, "sw-overlay"))["id"]
        service = json.loads(swarm.run("docker", "service", "inspect", f"kernel-{kid}").stdout)[0]
        assert service["Spec"]["EndpointSpec"]["Mode"] == "dnsrr"
        assert not service["Spec"]["EndpointSpec"].get("Ports")
        ks = await KernelSocket.open(gw, kid, v1=True)
        out, _ = await ks.execute("import os; print(os.path.exists('/.dockerenv'))")
        assert out == "True\n"
        await ks.close()
        assert (await api(gw, "DELETE", f"api/kernels/{kid}"))[0] == 204
        wait_none_left(swarm)
    finally:
        swarm.run("docker", "rm", "-f", name, check=False)
        # the service's task may still hold the network a moment; a network left here
        # must not hide why the test failed
        with contextlib.suppress(AssertionError):
            eventually_sync(
                lambda: swarm.run("docker", "network", "rm", net, check=False).returncode == 0,
                timeout=10,
                interval=0.25,
            )
    wait_none_left(swarm)
