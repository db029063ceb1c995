"""The batch backend against a real one-node SLURM (tests/slurm.py), beyond the contract suite:
the kernel runs inside its job, a job held in the queue past KERNEL_LAUNCH_TIMEOUT is cancelled
with a message that says so, delete and gateway shutdown cancel jobs, submit errors are clear."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import signal
import sqlite3
from collections.abc import Iterator

import pytest

from conftest import GatewayProcess, _cleanup, eventually, free_port, rkg
from gwclient import KernelSocket, api, metric, scrape, start_kernel


def _gateway(slurm, specs, workdir) -> GatewayProcess:
    gw = GatewayProcess(
        port=free_port(),
        token=secrets.token_hex(16),
        env=slurm.env,
        extra_args=["--kernelspec-dir", str(specs)],
        workdir=workdir,
    )
    gw.start()
    return gw


@pytest.fixture(scope="module")
def specs(slurm, tmp_path_factory: pytest.TempPathFactory):
    specs = tmp_path_factory.mktemp("slurm-specs")
    slurm.write_spec(specs, "slurm-debug")
    slurm.write_spec(specs, "slurm-closed", partition="closed")  # State=DOWN: stays queued
    slurm.write_spec(specs, "slurm-huge", cpus=slurm.cpus + 1)  # more than the node has
    slurm.write_spec(specs, "slurm-nosuch", partition="nosuch")
    (specs / "wd").mkdir()
    slurm.write_spec(
        specs,
        "slurm-wd",
        workdir=str(specs / "wd"),
        pre="export PRE=done",
        config={"env": {"FROM_SPEC": "yes"}},
    )
    slurm.write_spec(specs, "slurm-nopython", python="/nonexistent/python3")
    return specs


@pytest.fixture(scope="module")
def slurm_gateway(slurm, specs, tmp_path_factory) -> Iterator[GatewayProcess]:
    gw = _gateway(slurm, specs, tmp_path_factory.mktemp("gateway-slurm"))
    yield gw
    _cleanup(gw)
    assert not slurm.wait_no_jobs(), f"jobs left behind: {slurm.jobs()}"
    assert not slurm.leftovers(gw), f"kernels left behind: {slurm.leftovers(gw)}"


@pytest.fixture(autouse=True)
async def _no_kernel_outlives_its_test(request: pytest.FixtureRequest):
    """A test that fails half way leaves its kernel (and job) on the shared gateway; delete
    it so the next tests start from an empty queue instead of failing on this one's job."""
    yield
    if "slurm_gateway" not in request.fixturenames:
        return
    gw, slurm = request.getfixturevalue("slurm_gateway"), request.getfixturevalue("slurm")
    for kernel in (await api(gw, "GET", "api/kernels"))[1]:
        await api(gw, "DELETE", f"api/kernels/{kernel['id']}")
    await asyncio.to_thread(slurm.wait_no_jobs)


def _record(gw: GatewayProcess, kernel_id: str) -> dict:
    """The provisioner info the gateway recorded for re-attaching to the kernel."""
    assert gw.workdir is not None
    with contextlib.closing(sqlite3.connect(gw.workdir / f"state-{gw.port}.sqlite")) as db:
        (row,) = db.execute("SELECT provisioner_info FROM kernels WHERE id = ?", (kernel_id,))
    return json.loads(row[0])


def _job_of(slurm, kernel_id: str) -> list[str]:
    return [j for j in slurm.jobs() if j.endswith(f"rkg-{kernel_id}")]


async def _gone(slurm, kernel_id: str, timeout: float = 15) -> None:
    await eventually(
        lambda: _job_of(slurm, kernel_id),
        until=lambda jobs: jobs == [],
        timeout=timeout,
        interval=0.2,
        what=f"no job of kernel {kernel_id}",
    )


async def test_kernel_runs_inside_its_job_and_delete_cancels_it(slurm, slurm_gateway):
    model = await start_kernel(slurm_gateway, "slurm-debug")
    (job,) = _job_of(slurm, model["id"])
    job_id, state, _ = job.split()
    assert state == "RUNNING"
    ks = await KernelSocket.open(slurm_gateway, model["id"], v1=True)
    out, reply = await ks.execute("import os; print(os.environ.get('SLURM_JOB_ID'))")
    assert reply["status"] == "ok" and out.strip() == job_id
    info = _record(slurm_gateway, model["id"])
    assert info["job_id"] == job_id and info["node"] == slurm.node
    assert sorted(info["ports"]) == ["control", "hb", "iopub", "shell", "stdin"]
    assert info["key"] and info["scheduler"] == "slurm"
    await eventually(
        lambda: scrape(slurm_gateway),
        until=lambda s: metric(s, "rkg_batch_jobs", scheduler="slurm", state="RUNNING") == 1,
        what="the running job in /metrics",
    )

    # restart submits a new job; the old one is gone and the client goes on as before
    assert (await api(slurm_gateway, "POST", f"api/kernels/{model['id']}/restart", {}))[0] == 200
    (job,) = _job_of(slurm, model["id"])
    assert job.split()[0] != job_id
    out, _ = await ks.execute("import os; print(os.environ.get('SLURM_JOB_ID'))")
    assert out.strip() == job.split()[0]
    assert _record(slurm_gateway, model["id"])["job_id"] == job.split()[0]
    await ks.close()
    assert (await api(slurm_gateway, "DELETE", f"api/kernels/{model['id']}"))[0] == 204
    await _gone(slurm, model["id"])
    assert not slurm.leftovers(slurm_gateway)


async def test_workdir_pre_command_and_env(slurm, slurm_gateway, specs):
    model = await start_kernel(slurm_gateway, "slurm-wd")
    ks = await KernelSocket.open(slurm_gateway, model["id"], v1=True)
    out, _ = await ks.execute(
        "import os; print(os.getcwd(), os.environ.get('PRE'), "
        "os.environ.get('FROM_SPEC'), os.environ.get('KERNEL_ID'))"
    )
    assert out.split() == [str(specs / "wd"), "done", "yes", model["id"]]
    await ks.close()
    assert (await api(slurm_gateway, "DELETE", f"api/kernels/{model['id']}"))[0] == 204
    await _gone(slurm, model["id"])


async def test_queued_job_is_cancelled_after_the_launch_timeout(slurm, slurm_gateway):
    """The partition is DOWN, so the job stays PENDING; the kernel is `starting` meanwhile."""
    post = asyncio.ensure_future(
        api(
            slurm_gateway,
            "POST",
            "api/kernels",
            {"name": "slurm-closed", "env": {"KERNEL_LAUNCH_TIMEOUT": "4"}},
        )
    )
    _, listed = await eventually(
        lambda: api(slurm_gateway, "GET", "api/kernels"),
        until=lambda r: r[1] and any(j.split()[1] == "PENDING" for j in slurm.jobs()),
        timeout=3,
        what="the kernel listed and its job pending",
    )
    assert [k["execution_state"] for k in listed] == ["starting"]
    assert any("PENDING" in j for j in slurm.jobs())
    status, body = await post
    assert status == 504, body
    assert set(body) == {"reason", "message"}
    message = body["message"]
    assert "within 4 s (KERNEL_LAUNCH_TIMEOUT)" in message, message
    assert "still queued" in message and "PENDING" in message, message
    assert "PartitionDown" in message and "cancelled" in message, message
    await _gone(slurm, listed[0]["id"])
    assert (await api(slurm_gateway, "GET", "api/kernels"))[1] == []


async def test_job_wanting_more_cpus_than_there_are_times_out(slurm, slurm_gateway):
    status, body = await api(
        slurm_gateway,
        "POST",
        "api/kernels",
        {"name": "slurm-huge", "env": {"KERNEL_LAUNCH_TIMEOUT": "3"}},
    )
    assert status == 504, body
    assert "still queued: PENDING" in body["message"], body
    assert "the job has been cancelled" in body["message"], body
    assert slurm.wait_no_jobs() == []


async def test_submit_refused_is_a_clear_error(slurm, slurm_gateway):
    status, body = await api(slurm_gateway, "POST", "api/kernels", {"name": "slurm-nosuch"})
    assert status == 500, body
    assert "sbatch refused the kernel's job" in body["message"], body
    assert "invalid partition" in body["message"].lower(), body
    assert slurm.jobs() == []


async def test_job_that_fails_reports_its_output(slurm, slurm_gateway):
    status, body = await api(slurm_gateway, "POST", "api/kernels", {"name": "slurm-nopython"})
    assert status == 500, body
    # the job script wrote the kernel's ports before its exec failed
    assert "exited during start-up" in body["message"], body
    assert "/nonexistent/python3" in body["message"], body
    assert slurm.wait_no_jobs() == []


async def test_gateway_shutdown_cancels_running_and_queued_jobs(slurm, specs, tmp_path):
    gw = _gateway(slurm, specs, tmp_path)
    try:
        model = await start_kernel(gw, "slurm-debug")
        pending = asyncio.ensure_future(api(gw, "POST", "api/kernels", {"name": "slurm-closed"}))
        await eventually(
            slurm.jobs,
            until=lambda jobs: any("PENDING" in j for j in jobs),
            timeout=5,
            what="the second job pending",
        )
        assert len(slurm.jobs()) == 2, slurm.jobs()
        assert await asyncio.to_thread(gw.stop, signal.SIGTERM) == 0
        await asyncio.gather(pending, return_exceptions=True)
        assert slurm.wait_no_jobs() == [], slurm.jobs()
        assert not _job_of(slurm, model["id"])
        assert not slurm.leftovers(gw)
    finally:
        _cleanup(gw)
        assert slurm.wait_no_jobs() == []


def test_spec_cli(tmp_path):
    rkg(
        *("spec", "add", "slurm", "gpu-a100", "--partition", "gpu", "--cpus", "8"),
        *("--memory", "32G", "--gpus", "1", "--walltime", "04:00:00", "--account", "proj42"),
        *("--submit-arg=--qos=short", "--pre", "module load cuda", "--login", "me@login1"),
        *("--jump", "me@bastion", "--dir", str(tmp_path)),
    )
    spec = json.loads((tmp_path / "gpu-a100" / "kernel.json").read_text())
    prov = spec["metadata"]["kernel_provisioner"]
    assert prov["provisioner_name"] == "rkg-batch"
    assert prov["config"] == {
        "scheduler": "slurm",
        "python": "python3",
        "partition": "gpu",
        "cpus": 8,
        "memory": "32G",
        "gpus": 1,
        "walltime": "04:00:00",
        "account": "proj42",
        "submit_args": ["--qos=short"],
        "pre_command": "module load cuda",
        "login": "me@login1",
        "jump_hosts": ["me@bastion"],
    }
    rkg("spec", "add", "sge", "sge-all", "--queue", "all.q", "--dir", str(tmp_path))
    sge = json.loads((tmp_path / "sge-all" / "kernel.json").read_text())
    assert sge["interrupt_mode"] == "message"
    listed = rkg("spec", "list", "--dir", str(tmp_path)).stdout
    assert "gpu-a100\trkg-batch slurm me@login1" in listed


async def test_through_a_login_node_the_ports_are_forwarded(slurm, slurm_login, tmp_path):
    """The gateway has no SLURM_CONF: every command goes through the login node."""
    specs = tmp_path / "specs"
    slurm.write_spec(specs, "slurm-login", config=slurm_login.config)
    gw = GatewayProcess(
        port=free_port(),
        token=secrets.token_hex(16),
        extra_args=["--kernelspec-dir", str(specs)],
        workdir=tmp_path,
    )
    gw.start()
    try:
        model = await start_kernel(gw, "slurm-login")
        (job,) = _job_of(slurm, model["id"])
        info = _record(gw, model["id"])
        assert info["job_id"] == job.split()[0] and info["login"].startswith("root@127.0.0.1")
        assert info["local_ports"] and info["local_ports"] != info["ports"]
        assert (slurm_login.runtime_dir / f"batch-kernel-{model['id']}.json").exists()
        ks = await KernelSocket.open(gw, model["id"], v1=True)
        out, _ = await ks.execute("import os; print(os.environ.get('SLURM_JOB_ID'))")
        assert out.strip() == job.split()[0]
        await ks.close()
        assert (await api(gw, "DELETE", f"api/kernels/{model['id']}"))[0] == 204
        await _gone(slurm, model["id"])
        assert not (slurm_login.runtime_dir / f"batch-kernel-{model['id']}.json").exists()
    finally:
        _cleanup(gw)
        assert slurm.wait_no_jobs() == []


async def test_login_node_in_its_own_network_namespace(slurm, ssh_lab, tmp_path):
    """rhost1 (tests/sshd.py) is the login node: it reaches slurmctld and the kernel only
    over its own link, and the kernel binds only this machine's end of that link, so the
    gateway reaches the kernel through the forwards over rhost1 or not at all."""
    host = ssh_lab.hosts["rhost1"]
    outer = host.addr.rsplit(".", 1)[0] + ".1"  # this machine's end of rhost1's link
    conf = tmp_path / "slurm-rhost1.conf"  # the same cluster, its controller at `outer`
    conf.write_text(
        slurm.conf.read_text().replace(
            f"SlurmctldHost={slurm.node}(127.0.0.1)", f"SlurmctldHost={slurm.node}({outer})"
        )
    )
    ssh = ssh_lab.config("rhost1")
    runtime = tmp_path / "runtime"
    specs = tmp_path / "specs"
    slurm.write_spec(
        specs,
        "slurm-rhost1",
        config={
            "login": ssh["host"],
            "identity_file": ssh["identity_file"],
            "known_hosts": ssh["known_hosts"],
            "runtime_dir": str(runtime),
            "ip": outer,
            "scheduler_env": {"SLURM_CONF": str(conf)},
        },
    )
    gw = GatewayProcess(
        port=free_port(),
        token=secrets.token_hex(16),
        extra_args=["--kernelspec-dir", str(specs)],
        workdir=tmp_path,
    )
    gw.start()
    try:
        model = await start_kernel(gw, "slurm-rhost1")
        (job,) = _job_of(slurm, model["id"])
        info = _record(gw, model["id"])
        assert info["login"] == ssh["host"] and info["local_ports"] != info["ports"]
        ks = await KernelSocket.open(gw, model["id"], v1=True)
        out, _ = await ks.execute("import os; print(os.environ.get('SLURM_JOB_ID'))")
        assert out.strip() == job.split()[0]
        assert (await api(gw, "POST", f"api/kernels/{model['id']}/restart", {}))[0] == 200
        out, _ = await ks.execute("print('restarted')", timeout=30)
        assert out == "restarted\n"
        await ks.close()
        assert (await api(gw, "DELETE", f"api/kernels/{model['id']}"))[0] == 204
        await _gone(slurm, model["id"])
        assert not slurm.leftovers(gw, runtime)
    finally:
        _cleanup(gw)
        assert slurm.wait_no_jobs() == []
