"""Start progress (issue #15): while a kernel starts, GET /api/kernels/ID names the stage its
backend has reached (`gateway.stage`); the log line of a failed start tells every stage; and
each backend's reachable() says whether what a kernelspec depends on answers, without
starting anything. Against the real sshd, SLURM and dockerd of the other backend tests."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from backends import docker_spec
from conftest import GatewayProcess, _cleanup, eventually, eventually_sync, free_port
from gwclient import api

# -- helpers -----------------------------------------------------------------------------


def _gateway(
    workdir: Path, specs: Path, env: dict[str, str] | None = None, *args: str
) -> GatewayProcess:
    gw = GatewayProcess(
        port=free_port(),
        token=secrets.token_hex(16),
        env=env or {},
        extra_args=["--kernelspec-dir", str(specs), *args],
        workdir=workdir,
    )
    gw.start()
    return gw


async def _starting(gw: GatewayProcess, name: str, env: dict[str, str] | None = None) -> Any:
    """POST a start in the background; (the POST's future, the starting kernel's id)."""
    post = asyncio.ensure_future(api(gw, "POST", "api/kernels", {"name": name, "env": env or {}}))
    _, listed = await eventually(
        lambda: api(gw, "GET", "api/kernels"),
        until=lambda r: r[0] == 200 and r[1],
        timeout=10,
        what="the starting kernel listed",
    )
    return post, listed[0]["id"]


async def _stages(
    gw: GatewayProcess,
    kernel_id: str,
    post: asyncio.Future[Any],
    *,
    until: Callable[[str], object] = lambda stage: False,
    timeout: float = 20,
) -> list[str]:
    """The distinct stages GET /api/kernels/ID shows while the kernel starts, in order, read
    every 10 ms until one satisfies `until` or the POST has been answered."""
    seen: list[str] = []
    deadline = asyncio.get_running_loop().time() + timeout
    while not post.done():
        status, model = await api(gw, "GET", f"api/kernels/{kernel_id}")
        stage = model["gateway"]["stage"] if status == 200 else ""
        if stage and (not seen or seen[-1] != stage):
            seen.append(stage)
        if stage and until(stage):
            return seen
        assert asyncio.get_running_loop().time() < deadline, f"stages seen: {seen}"
        await asyncio.sleep(0.01)
    return seen


def _in_order(seen: list[str], expected: list[str]) -> bool:
    """Whether `seen` is `expected` with some stages missed (read too late to see them)."""
    rest = iter(expected)
    return all(any(stage == e for e in rest) for stage in seen)


def _logged_stages(gw: GatewayProcess, kernel_id: str) -> list[str]:
    """Every stage of the kernel's start, from the gateway's DEBUG log (contract.py logs
    each as `kernel ID: words`)."""
    found = re.findall(
        rf"gateway\.backends\.contract\] kernel {re.escape(kernel_id)}: (.*)$", gw.log(), re.M
    )
    return [str(words) for words in found]


def _failed_start_line(gw: GatewayProcess, spec: str) -> tuple[str, str]:
    """(outcome, stages) of the log line of spec's failed start."""
    pattern = re.compile(
        rf"kernel \S+ \({re.escape(spec)}\) did not start \((\w+) after [\d.]+ s\): "
        r".*? \[stages: (.*?)\]$",
        re.S | re.M,
    )
    m = eventually_sync(
        lambda: pattern.search(gw.log()), timeout=5, what=f"the log line of {spec}'s failed start"
    )
    return m.group(1), m.group(2)


async def _delete_while_starting(gw: GatewayProcess, kernel_id: str, post: Any) -> None:
    assert (await api(gw, "DELETE", f"api/kernels/{kernel_id}"))[0] == 204
    status, body = await post
    assert status == 409 and "deleted while it was starting" in body["message"], body


# -- local -------------------------------------------------------------------------------


async def test_failed_local_start_logs_its_stages(gateway_factory, tmp_path):
    """A kernel command that exits at once: the log line names the command it launched."""
    specs = tmp_path / "specs"
    (specs / "exits").mkdir(parents=True)
    (specs / "exits" / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-c", "raise SystemExit(3)", "{connection_file}"],
                "display_name": "exits at once",
                "language": "python",
            }
        )
    )
    gw = gateway_factory(extra_args=["--kernelspec-dir", str(specs)])
    status, body = await api(gw, "POST", "api/kernels", {"name": "exits"})
    assert status == 500, body
    outcome, stages = _failed_start_line(gw, "exits")
    assert outcome == "error"
    names = [s.rpartition(" (at ")[0] for s in stages.split("; ")]
    assert names == [
        "launching",
        f"launching {Path(sys.executable).name}",
        "waiting for the kernel to answer kernel_info",
    ], stages


async def test_local_reachable():
    from gateway.backends.local import DurableLocalProvisioner

    assert await DurableLocalProvisioner.reachable({}) == [("this machine", "")]


# -- SSH ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ssh_gw(ssh_lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    specs = tmp_path_factory.mktemp("progress-ssh-specs")
    ssh_lab.write_spec(specs, "ssh-slow", "rhost1", pre_command="sleep 2")
    ssh_lab.write_spec(specs, "ssh-down", "rdown")
    gw = _gateway(tmp_path_factory.mktemp("progress-ssh"), specs)
    yield gw
    leftovers = _cleanup(gw)
    assert not leftovers, f"kernel processes left behind: {leftovers}"
    assert not ssh_lab.leftovers(), f"remote kernels left behind: {ssh_lab.leftovers()}"


async def test_ssh_start_shows_its_stages(ssh_lab, ssh_gw):
    """The pre_command sleeps 2 s while the stage says the kernel is being launched there."""
    host = f"root@{ssh_lab.hosts['rhost1'].addr}:22"
    post, kid = await _starting(ssh_gw, "ssh-slow")
    seen = await _stages(ssh_gw, kid, post)
    status, model = await post
    assert status == 201, model
    expected = [
        "launching",
        f"connecting to {host}",
        f"uploading the connection file to {host}",
        f"launching the kernel on {host}",
        f"waiting for the kernel's ports on {host}",
        f"forwarding the kernel's ports from {host}",
        "waiting for the kernel to answer kernel_info",
    ]
    assert f"launching the kernel on {host}" in seen and _in_order(seen, expected), seen
    assert model["gateway"]["stage"] == ""  # it runs: no stage
    assert (await api(ssh_gw, "DELETE", f"api/kernels/{kid}"))[0] == 204


async def test_failed_ssh_start_logs_its_stages(ssh_lab, ssh_gw):
    status, body = await api(ssh_gw, "POST", "api/kernels", {"name": "ssh-down"})
    assert status == 503, body
    outcome, stages = _failed_start_line(ssh_gw, "ssh-down")
    assert outcome == "error"
    down = f"root@{ssh_lab.hosts['rdown'].addr}:22"
    assert re.fullmatch(rf"launching \(at [\d.]+ s\); connecting to {down} \(at [\d.]+ s\)", stages)
    assert str(ssh_lab.client_key) not in stages


async def test_ssh_reachable(ssh_lab):
    """Up, refused, through a jump host (to a port where nothing listens, too), and behind a
    jump host that does not answer; the check's own connections are closed (the pool is left
    as it was: empty here)."""
    from gateway.backends import sshpool
    from gateway.backends.ssh import SSHProvisioner

    def label(name: str) -> str:
        return f"root@{ssh_lab.hosts[name].addr}:22"

    assert await SSHProvisioner.reachable(ssh_lab.config("rhost2")) == [(label("rhost2"), "")]
    await eventually(  # no gateway of this module uses rhost2
        ssh_lab.hosts["rhost2"].established,
        until=lambda n: n == 0,
        timeout=5,
        what="the check's connection to rhost2 closed",
    )
    [(where, why)] = await SSHProvisioner.reachable(ssh_lab.config("rdown"))
    assert where == label("rdown") and why, why
    assert ssh_lab.hosts["rdown"].addr in why and "cannot reach" in why, why
    assert await SSHProvisioner.reachable(ssh_lab.config("rinner")) == [
        (label("rjump"), ""),
        (label("rinner"), ""),
    ]
    (jump, jump_why), (inner, inner_why) = await SSHProvisioner.reachable(
        ssh_lab.config("rinner", port=2222)  # nothing listens there
    )
    assert (jump, jump_why) == (label("rjump"), ""), jump_why
    assert inner == f"root@{ssh_lab.hosts['rinner'].addr}:2222" and "refused" in inner_why
    behind_down = ssh_lab.config("rinner", jump_hosts=[label("rdown")])
    (jump, jump_why), (inner, inner_why) = await SSHProvisioner.reachable(behind_down)
    assert jump == label("rdown") and "cannot reach" in jump_why, jump_why
    assert inner == label("rinner") and inner_why == f"not tried: {label('rdown')} failed"
    assert sshpool._POOL == {}


# -- SLURM -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm_gw(slurm, slurm_login, tmp_path_factory) -> Iterator[GatewayProcess]:
    specs = tmp_path_factory.mktemp("progress-slurm-specs")
    slurm.write_spec(specs, "slurm-huge", cpus=slurm.cpus + 1)  # more than the node has
    slurm.write_spec(specs, "slurm-slow", pre="sleep 3")
    slurm.write_spec(specs, "login-huge", config=slurm_login.config, cpus=slurm.cpus + 1)
    gw = _gateway(tmp_path_factory.mktemp("progress-slurm"), specs, slurm.env)
    yield gw
    _cleanup(gw)
    assert not slurm.wait_no_jobs(), f"jobs left behind: {slurm.jobs()}"
    assert not slurm.leftovers(gw), f"kernels left behind: {slurm.leftovers(gw)}"


async def test_queued_slurm_job_shows_pending(slurm, slurm_gw):
    post, kid = await _starting(slurm_gw, "slurm-huge")
    pending = re.compile(r"SLURM job (\d+) PENDING \(\w+\)")
    seen = await _stages(slurm_gw, kid, post, until=pending.fullmatch)
    m = pending.fullmatch(seen[-1])
    assert m, seen
    assert f"{m.group(1)} PENDING rkg-{kid}" in slurm.jobs(), slurm.jobs()
    assert _in_order(seen, ["launching", "submitting the job to SLURM", seen[-1]]), seen
    await _delete_while_starting(slurm_gw, kid, post)
    assert slurm.wait_no_jobs() == []


async def test_running_slurm_job_shows_its_node(slurm, slurm_gw):
    """The job script's pre-command sleeps 3 s, with the job running, before the kernel."""
    post, kid = await _starting(slurm_gw, "slurm-slow")
    running = re.compile(rf"SLURM job \d+ RUNNING on {slurm.node}; waiting for the kernel's ports")
    seen = await _stages(slurm_gw, kid, post, until=running.fullmatch)
    assert running.fullmatch(seen[-1]), seen
    status, model = await post
    assert status == 201, model
    assert (await api(slurm_gw, "DELETE", f"api/kernels/{kid}"))[0] == 204
    assert slurm.wait_no_jobs() == []


async def test_timed_out_login_job_logs_its_stages(slurm, slurm_login, slurm_gw):
    """Through a login node, queued past the launch timeout: every step is in the log."""
    status, body = await api(
        slurm_gw,
        "POST",
        "api/kernels",
        {"name": "login-huge", "env": {"KERNEL_LAUNCH_TIMEOUT": "3"}},
    )
    assert status == 504, body
    outcome, stages = _failed_start_line(slurm_gw, "login-huge")
    login = slurm_login.config["login"]
    names = [s.rpartition(" (at ")[0] for s in stages.split("; ")]
    assert outcome == "timeout"
    assert names[:4] == [
        "launching",
        f"connecting to the login node {login}",
        f"uploading the connection file to {login}",
        f"submitting the job to SLURM via {login}",
    ], stages
    assert re.fullmatch(r"SLURM job \d+ PENDING \(\w+\)", names[4]) and len(names) == 5, stages
    assert slurm_login.config["identity_file"] not in stages
    assert slurm.wait_no_jobs() == []


async def test_batch_reachable(slurm, slurm_login):
    from gateway.backends import sshpool
    from gateway.backends.batch import BatchProvisioner

    local = {"scheduler": "slurm", "scheduler_env": slurm.env}
    assert await BatchProvisioner.reachable(local) == [("slurm (local)", "")]
    [(label, why)] = await BatchProvisioner.reachable({"scheduler": "lsf"})  # no LSF here
    assert label == "lsf (local)" and why.startswith("cannot run lsid on this machine"), why
    login = {"scheduler": "slurm", **slurm_login.config}
    assert await BatchProvisioner.reachable(login) == [
        (f"slurm via {slurm_login.config['login']}", "")
    ]
    closed = {**login, "login": f"root@127.0.0.1:{free_port()}"}
    [(label, why)] = await BatchProvisioner.reachable(closed)
    assert label == f"slurm via {closed['login']}" and "cannot reach" in why, why
    assert sshpool._POOL == {}  # the login node's connection was made for the check alone


# -- Docker and Swarm --------------------------------------------------------------------


@pytest.fixture(scope="module")
def docker_gw(docker, kernel_image, tmp_path_factory) -> Iterator[GatewayProcess]:
    specs = tmp_path_factory.mktemp("progress-docker-specs")
    docker_spec(specs, "dk-python", image=kernel_image, docker_host=docker.host)
    docker_spec(specs, "dk-missing", image="rkg-test-missing:none", docker_host=docker.host)
    workdir = tmp_path_factory.mktemp("progress-docker")
    gw = _gateway(workdir, specs, None, "--log-level", "DEBUG")  # every stage is logged
    yield gw
    _cleanup(gw)
    assert not docker.ours(), f"containers left behind: {docker.ours()}"


async def test_docker_start_shows_its_stages(docker, kernel_image, docker_gw):
    """Creating and starting a container take the engine some 0.1-0.5 s each: read every
    10 ms, at least one of the two is seen; the log has them all."""
    post, kid = await _starting(docker_gw, "dk-python")
    seen = await _stages(docker_gw, kid, post)
    status, model = await post
    assert status == 201, model
    ours = [f"creating a container from {kernel_image}", "starting the container"]
    assert set(ours) & set(seen), seen
    expected = ["launching", *ours, "waiting for the kernel to answer kernel_info"]
    assert _in_order(seen, expected), seen
    assert _logged_stages(docker_gw, kid) == expected
    assert (await api(docker_gw, "DELETE", f"api/kernels/{kid}"))[0] == 204
    await eventually(docker.ours, until=lambda left: left == [], timeout=5, what="no container")


async def test_failed_docker_start_logs_its_stages(docker_gw):
    status, body = await api(docker_gw, "POST", "api/kernels", {"name": "dk-missing"})
    assert status == 500 and "is not on the Docker engine" in body["message"], body
    outcome, stages = _failed_start_line(docker_gw, "dk-missing")
    assert outcome == "error"
    names = [s.rpartition(" (at ")[0] for s in stages.split("; ")]
    assert names == ["launching", "creating a container from rkg-test-missing:none"], stages


async def test_docker_reachable(docker, tmp_path):
    """The engine answers; a socket nobody serves does not; a Swarm manager or not."""
    from gateway.backends import dockerengine
    from gateway.backends.docker import DockerProvisioner
    from gateway.backends.swarm import SwarmProvisioner

    config = {"docker_host": docker.host}
    assert await DockerProvisioner.reachable(config) == [(f"docker engine {docker.host}", "")]
    nobody = f"unix://{tmp_path}/docker.sock"
    [(label, why)] = await DockerProvisioner.reachable({"docker_host": nobody})
    assert label == f"docker engine {nobody}" and "unreachable" in why, why
    manager = docker.run("docker", "info", "--format", "{{.Swarm.ControlAvailable}}").stdout
    [(label, why)] = await SwarmProvisioner.reachable(config)
    assert label == f"swarm manager {docker.host}"
    if manager.strip() == "true":  # the swarm fixture ran earlier in this session
        assert why == "", why
    else:
        assert why.startswith("not a Swarm manager (its swarm state: inactive)"), why
    assert dockerengine._engines == {}


@pytest.fixture(scope="module")
def swarm_gw(swarm, kernel_image, tmp_path_factory) -> Iterator[GatewayProcess]:
    specs = tmp_path_factory.mktemp("progress-swarm-specs")
    docker_spec(
        specs,
        "sw-nowhere",
        provisioner="rkg-swarm",
        image=kernel_image,
        docker_host=swarm.host,
        constraints=["node.labels.rkg-nowhere==true"],  # no node has it
    )
    gw = _gateway(tmp_path_factory.mktemp("progress-swarm"), specs)
    yield gw
    _cleanup(gw)
    eventually_sync(
        lambda: swarm.ours("service") + swarm.ours(),
        until=lambda left: not left,
        timeout=10,
        interval=0.25,
        what="no service or container left behind",
    )


async def test_swarm_task_pending_shows_why(swarm, kernel_image, swarm_gw):
    """A constraint no node meets: the task stays pending, and the stage says why."""
    post, kid = await _starting(swarm_gw, "sw-nowhere")
    pending = "Swarm task pending: no suitable node"
    seen = await _stages(swarm_gw, kid, post, until=lambda s: s.startswith(pending))
    assert seen[-1].startswith(pending), seen
    ours = [s for s in seen if not s.startswith("Swarm task ")]
    assert _in_order(ours, ["launching", f"creating a service from {kernel_image}"]), seen
    await _delete_while_starting(swarm_gw, kid, post)


async def test_swarm_reachable(swarm):
    from gateway.backends import dockerengine
    from gateway.backends.swarm import SwarmProvisioner

    config = {"docker_host": swarm.host}
    assert await SwarmProvisioner.reachable(config) == [(f"swarm manager {swarm.host}", "")]
    assert dockerengine._engines == {}
