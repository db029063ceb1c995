"""The SSH backend against real OpenSSH hosts (tests/sshd.py), beyond the contract suite: jump
hosts, one connection per host, surviving a dropped connection, errors a user can act on, and
`rkg spec`."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from conftest import GatewayProcess, eventually, serving
from gwclient import KernelSocket, api, metric, scrape, start_kernel


@pytest.fixture(scope="module")
def ssh_gateway(ssh_lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    specs = tmp_path_factory.mktemp("ssh-specs")
    empty_known_hosts = ssh_lab.workdir / "known_hosts.empty"
    empty_known_hosts.write_text("")
    ssh_lab.write_spec(specs, "ssh-rhost1", "rhost1")
    ssh_lab.write_spec(specs, "ssh-rhost2", "rhost2")
    ssh_lab.write_spec(specs, "ssh-rinner", "rinner")
    ssh_lab.write_spec(specs, "ssh-badkey", "rhost2", known_hosts=str(empty_known_hosts))
    ssh_lab.write_spec(specs, "ssh-down", "rdown")
    ssh_lab.write_spec(specs, "ssh-gone", "rhost2", reconnect_timeout=3, keepalive_interval=1)
    ssh_lab.write_spec(
        specs,
        "ssh-nopython",
        "rhost1",
        kernel_cmd=["/nonexistent/python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
    )
    yield from serving(tmp_path_factory.mktemp("gateway-ssh"), "--kernelspec-dir", str(specs))
    assert not ssh_lab.leftovers(), f"remote kernels left behind: {ssh_lab.leftovers()}"


async def _delete_all(gw: GatewayProcess, ids: list[str]) -> None:
    codes = await asyncio.gather(*[api(gw, "DELETE", f"api/kernels/{k}") for k in ids])
    assert [c for c, _ in codes] == [204] * len(ids)


async def _no_kernels_on(host, timeout: float = 10) -> None:
    await eventually(
        host.kernels,
        until=lambda kernels: kernels == [],
        timeout=timeout,
        what="no kernel left on the host",
    )


async def test_kernel_behind_a_jump_host(ssh_gateway, ssh_lab):
    model = await start_kernel(ssh_gateway, "ssh-rinner")
    ks = await KernelSocket.open(ssh_gateway, model["id"], v1=True)
    out, _ = await ks.execute("import socket; print(socket.gethostname())")
    assert out.strip() == "rinner"
    await ks.close()
    await _delete_all(ssh_gateway, [model["id"]])
    await _no_kernels_on(ssh_lab.hosts["rinner"])


async def test_ten_kernels_share_one_connection(ssh_gateway, ssh_lab):
    host = ssh_lab.hosts["rhost2"]
    models = await asyncio.gather(*[start_kernel(ssh_gateway, "ssh-rhost2") for _ in range(10)])
    assert len(host.kernels()) == 10
    assert host.established() == 1
    ks = await KernelSocket.open(ssh_gateway, models[-1]["id"], v1=True)
    assert (await ks.execute("print(6 * 7)"))[0] == "42\n"
    await ks.close()
    await _delete_all(ssh_gateway, [m["id"] for m in models])
    await _no_kernels_on(host)


async def test_kernel_survives_a_dropped_connection(ssh_gateway, ssh_lab):
    host = ssh_lab.hosts["rhost1"]
    model = await start_kernel(ssh_gateway, "ssh-rhost1")
    ks = await KernelSocket.open(ssh_gateway, model["id"], v1=True)
    await ks.execute("x = 'still here'")
    children = host.sshd_children()
    assert children
    for pid in children:  # the connection's sshd processes: the link drops, the kernel stays
        os.kill(pid, 9)
    # a request sent while the tunnels are down may be lost: ask again
    await eventually(
        lambda: ks.execute("print(x)", timeout=3),
        until=lambda r: r[0] == "still here\n",
        timeout=30,
        interval=0,
        ignore=(TimeoutError,),
        what="the kernel answering through new tunnels",
    )
    assert host.established() == 1
    status, kernel = await api(ssh_gateway, "GET", f"api/kernels/{model['id']}")
    assert status == 200 and kernel["execution_state"] != "dead"
    samples = await scrape(ssh_gateway)
    label = f"root@{host.addr}:22"
    assert metric(samples, "rkg_ssh_connections", host=label) == 1
    assert metric(samples, "rkg_ssh_reconnects_total", host=label) >= 1
    await ks.close()
    await _delete_all(ssh_gateway, [model["id"]])
    await _no_kernels_on(host)


async def _start_error(gw: GatewayProcess, name: str) -> tuple[int, dict, float]:
    started = time.monotonic()
    status, body = await api(gw, "POST", "api/kernels", {"name": name})
    return status, body, time.monotonic() - started


async def test_unknown_host_key_says_how_to_accept_it(ssh_gateway, ssh_lab):
    status, body, _ = await _start_error(ssh_gateway, "ssh-badkey")
    assert status >= 400 and set(body) >= {"reason", "message"}
    assert "ssh-keyscan" in body["message"] and ssh_lab.hosts["rhost2"].addr in body["message"]


async def test_unreachable_host_fails_fast(ssh_gateway):
    status, body, took = await _start_error(ssh_gateway, "ssh-down")
    assert status == 503 and "cannot reach" in body["message"], body
    assert took < 5


async def test_missing_remote_python(ssh_gateway, ssh_lab):
    status, body, _ = await _start_error(ssh_gateway, "ssh-nopython")
    assert status >= 500 and "/nonexistent/python3" in body["message"], body
    assert "not found" in body["message"]
    assert ssh_lab.hosts["rhost1"].kernels() == []


def test_spec_add_list_remove(tmp_path):
    rkg = [sys.executable, "-m", "gateway", "spec"]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*rkg, *args, "--dir", str(tmp_path)], capture_output=True, text=True, timeout=30
        )

    added = run(
        "add",
        "ssh",
        "gpu",
        "--host",
        "me@gpu1:2222",
        "--jump",
        "me@bastion",
        "--python",
        "/opt/py/bin/python",
        "--workdir",
        "~/work",
        "--pre",
        "module load cuda",
        "--display-name",
        "GPU box",
    )
    assert added.returncode == 0, added.stderr
    spec = json.loads((tmp_path / "gpu" / "kernel.json").read_text())
    prov = spec["metadata"]["kernel_provisioner"]
    assert prov["provisioner_name"] == "rkg-ssh"
    assert prov["config"] == {
        "host": "me@gpu1:2222",
        "python": "/opt/py/bin/python",
        "jump_hosts": ["me@bastion"],
        "workdir": "~/work",
        "pre_command": "module load cuda",
    }
    assert spec["display_name"] == "GPU box"
    listed = run("list")
    assert listed.stdout.split("\t")[:2] == ["gpu", "rkg-ssh me@gpu1:2222"]
    assert run("remove", "gpu").returncode == 0
    assert run("list").stdout == ""
    gone = run("remove", "gpu")
    assert gone.returncode == 2 and gone.stderr.startswith("NotFound:")


def test_old_provisioner_names_still_work():
    """Kernelspecs written before the rkg- prefix name the same classes."""
    from jupyter_client.provisioning.factory import KernelProvisionerFactory

    eps = KernelProvisionerFactory.instance().provisioners
    for old, new in [
        ("rkg-local-provisioner", "rkg-local"),
        ("ssh-provisioner", "rkg-ssh"),
        ("slurm-provisioner", "rkg-batch"),
        ("docker-provisioner", "rkg-docker"),
        ("swarm-provisioner", "rkg-swarm"),
    ]:
        if not eps[old].value.startswith("gateway."):
            continue  # gateway_provisioners, installed too, took docker-provisioner
        assert eps[old].value == eps[new].value, (old, new)


async def test_host_gone_for_good_is_reported_dead(ssh_gateway, ssh_lab):
    """sshd stops and the link drops for good: after the reconnect limit (3 s here) the
    kernel is dead, its clients are told, and the gateway says why. (Last in the module: it
    takes rhost2's sshd down and brings it back.)"""
    host = ssh_lab.hosts["rhost2"]
    model = await start_kernel(ssh_gateway, "ssh-gone")
    ks = await KernelSocket.open(ssh_gateway, model["id"], v1=True)
    await ks.execute("x = 1")
    t0 = time.monotonic()
    host.stop_sshd()  # the listener and every connection's sshd
    try:
        await ks.until_status("dead", timeout=60)
        took = time.monotonic() - t0
        assert took < 30, took
        status, kernel = await api(ssh_gateway, "GET", f"api/kernels/{model['id']}")
        assert status == 200 and kernel["execution_state"] == "dead"
        assert "could not be restarted" in ssh_gateway.log()
        await ks.close()
        assert (await api(ssh_gateway, "DELETE", f"api/kernels/{model['id']}"))[0] == 204
    finally:
        for entry in host.kernels():  # the kernel outlived its host's sshd: reap it here
            os.kill(int(entry.split(":")[1]), 9)
        host.start_sshd()
