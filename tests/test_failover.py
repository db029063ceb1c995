"""Failover between SSH hosts (`hosts` in an rkg-ssh kernelspec) against real OpenSSH hosts in
network namespaces (tests/sshd.py): dead hosts are skipped, whether they refuse connections or
drop packets without a word; all dead is one error naming each; a host that comes back is
preferred again; a restart and a re-attach stay on the kernel's host."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sshd import SSHLab, _cmdline, sh

from conftest import GatewayProcess, eventually, rkg, serving
from gateway.kernels import failover
from gateway.specs import ssh_spec, write_spec
from gwclient import KernelSocket, api, start_kernel

DROP_PORT = 2222  # on rdown: dropped by an iptables rule in its namespace (rdown's 22 refuses)
CONNECT_TIMEOUT = 2.0  # per host, in these specs
ATTEMPT_TIMEOUT = 3.0  # per kernelspec, in slow-else-local
NEVER_READY = 4321  # `sleep 4321`: the kernel command of ssh-never-ready


def _hosts(lab: SSHLab) -> dict[str, str]:
    down, h1, h2 = (lab.hosts[n].addr for n in ("rdown", "rhost1", "rhost2"))
    return {
        "refused": f"root@{down}",
        "dropped": f"root@{down}:{DROP_PORT}",
        "rhost1": f"root@{h1}",
        "rhost2": f"root@{h2}",
        "badauth": f"nobody@{h2}",  # nobody has no authorized key there
    }


@pytest.fixture(scope="module")
def dropping(ssh_lab: SSHLab) -> Iterator[None]:
    """rdown silently drops TCP to DROP_PORT (inside its own namespace: nothing leaves)."""
    rule = ["INPUT", "-p", "tcp", "--dport", str(DROP_PORT), "-j", "DROP"]
    ns = ssh_lab.hosts["rdown"].ns
    sh("ip", "netns", "exec", ns, "iptables", "-I", *rule)
    yield
    sh("ip", "netns", "exec", ns, "iptables", "-D", *rule, check=False)


@pytest.fixture(scope="module")
def specs(ssh_lab: SSHLab, dropping: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("failover-specs")
    h = _hosts(ssh_lab)

    def spec(name: str, *keys: str) -> None:
        hosts = [h[k] for k in keys]
        spec = ssh_spec(hosts, display_name=f"Failover {name}")
        config = ssh_lab.config("rhost1", hosts=hosts, connect_timeout=CONNECT_TIMEOUT)
        spec["metadata"]["kernel_provisioner"]["config"] = {**config, "host": hosts[0]}
        write_spec(name, spec, str(d))

    spec("fo-refused", "refused", "rhost1")
    spec("fo-dropped", "dropped", "rhost1")
    spec("fo-dead", "refused", "dropped", "badauth")
    spec("fo-comeback", "rhost2", "rhost1")
    gone = ssh_lab.config(
        "rhost1", hosts=[h["rhost2"], h["rhost1"]], reconnect_timeout=3, keepalive_interval=1
    )
    write_spec(
        "fo-gone",
        {
            **ssh_spec([h["rhost2"], h["rhost1"]]),
            "metadata": {
                "kernel_provisioner": {
                    "provisioner_name": "rkg-ssh",
                    "config": {**gone, "host": h["rhost2"]},
                }
            },
        },
        str(d),
    )
    # whole kernelspecs: a dead SSH host, one whose kernel never gets ready, then local
    spec("ssh-dead", "refused")
    never_ready = ["sh", "-c", f"sleep {NEVER_READY}", "{connection_file}"]
    ssh_lab.write_spec(d, "ssh-never-ready", "rhost1", kernel_cmd=never_ready)
    write_spec("pc-else-local", failover_spec(["ssh-dead", "python3"]), str(d))
    write_spec(
        "slow-else-local",
        failover_spec(["ssh-never-ready", "python3"], attempt_timeout=ATTEMPT_TIMEOUT),
        str(d),
    )
    write_spec("nothing-works", failover_spec(["ssh-dead", "no-such-spec"]), str(d))
    return d


def failover_spec(members: list[str], attempt_timeout: float = 0) -> dict:
    return failover.spec(
        members, attempt_timeout=attempt_timeout, display_name="", language="python"
    )


@pytest.fixture(scope="module")
def fo_gateway(ssh_lab, specs: Path, tmp_path_factory) -> Iterator[GatewayProcess]:
    yield from serving(tmp_path_factory.mktemp("gateway-failover"), "--kernelspec-dir", str(specs))
    assert not ssh_lab.leftovers(), f"remote kernels left behind: {ssh_lab.leftovers()}"


async def _hostname(gw: GatewayProcess, kernel_id: str) -> str:
    ks = await KernelSocket.open(gw, kernel_id, v1=True)
    try:
        out, _ = await ks.execute("import socket; print(socket.gethostname())")
    finally:
        await ks.close()
    return out.strip()


async def _model(gw: GatewayProcess, kernel_id: str) -> dict:
    status, model = await api(gw, "GET", f"api/kernels/{kernel_id}")
    assert status == 200, model
    return model


async def _delete(gw: GatewayProcess, lab: SSHLab, *kernel_ids: str) -> None:
    for kernel_id in kernel_ids:
        assert (await api(gw, "DELETE", f"api/kernels/{kernel_id}"))[0] == 204
    await eventually(lab.leftovers, until=lambda k: k == [], what="no kernel left on the hosts")


async def _timed_start(gw: GatewayProcess, name: str) -> tuple[dict, float]:
    began = time.monotonic()
    model = await start_kernel(gw, name)
    return model, time.monotonic() - began


async def test_refused_host_is_skipped_and_restart_stays(fo_gateway, ssh_lab):
    model, took = await _timed_start(fo_gateway, "fo-refused")
    assert model["gateway"]["host"] == f"root@{ssh_lab.hosts['rhost1'].addr}:22", model
    assert await _hostname(fo_gateway, model["id"]) == "rhost1"
    assert took < 10, took  # a refused connection costs next to nothing
    status, _ = await api(fo_gateway, "POST", f"api/kernels/{model['id']}/restart", {})
    assert status == 200
    assert await _hostname(fo_gateway, model["id"]) == "rhost1"
    assert (await _model(fo_gateway, model["id"]))["gateway"]["host"] == model["gateway"]["host"]
    await _delete(fo_gateway, ssh_lab, model["id"])


async def test_host_that_drops_packets_is_skipped_after_the_connect_timeout(fo_gateway, ssh_lab):
    model, took = await _timed_start(fo_gateway, "fo-dropped")
    assert await _hostname(fo_gateway, model["id"]) == "rhost1"
    assert CONNECT_TIMEOUT <= took < CONNECT_TIMEOUT + 10, took
    await _delete(fo_gateway, ssh_lab, model["id"])


async def test_all_hosts_dead_is_one_error_naming_each(fo_gateway, ssh_lab):
    h = _hosts(ssh_lab)
    began = time.monotonic()
    status, body = await api(fo_gateway, "POST", "api/kernels", {"name": "fo-dead"})
    took = time.monotonic() - began
    assert status == 500 and set(body) == {"reason", "message"}, body
    message = body["message"]
    assert "any of its 3 hosts" in message, message
    assert f"{h['refused']}: " in message and "refused" in message.lower(), message
    assert f"{h['dropped']}: " in message and "did not answer in time" in message, message
    assert f"{h['badauth']}: " in message and "authentication" in message, message
    assert took < 3 * CONNECT_TIMEOUT + 10, took
    assert "Traceback" not in message
    status, listed = await api(fo_gateway, "GET", "api/kernels")
    assert status == 200 and listed == []


async def test_host_that_comes_back_is_preferred_again(fo_gateway, ssh_lab):
    preferred = ssh_lab.hosts["rhost2"]
    preferred.stop_sshd()
    try:
        first = await start_kernel(fo_gateway, "fo-comeback")
        assert await _hostname(fo_gateway, first["id"]) == "rhost1"
    finally:
        preferred.start_sshd()
    second = await start_kernel(fo_gateway, "fo-comeback")
    assert second["gateway"]["host"] == f"root@{preferred.addr}:22", second
    assert await _hostname(fo_gateway, second["id"]) == "rhost2"
    assert await _hostname(fo_gateway, first["id"]) == "rhost1"  # stays where it started
    await _delete(fo_gateway, ssh_lab, first["id"], second["id"])


async def test_restart_moves_only_when_its_host_is_gone(fo_gateway, ssh_lab):
    """rhost2's sshd stops for good: after reconnect_timeout (3 s) the kernel is restarted
    (autorestart) on the next host of its list."""
    gone, other = ssh_lab.hosts["rhost2"], ssh_lab.hosts["rhost1"]
    model = await start_kernel(fo_gateway, "fo-gone")
    assert model["gateway"]["host"] == f"root@{gone.addr}:22", model
    gone.stop_sshd()
    try:
        moved = await eventually(
            lambda: _model(fo_gateway, model["id"]),
            until=lambda m: (
                m["gateway"]["host"] == f"root@{other.addr}:22" and m["execution_state"] == "idle"
            ),
            timeout=60,
            interval=0.5,
            what="the kernel restarted on rhost1",
        )
        assert moved["gateway"]["host"] == f"root@{other.addr}:22"
        assert await _hostname(fo_gateway, model["id"]) == "rhost1"
    finally:
        for entry in gone.kernels():  # the kernel outlived its host's sshd: reap it here
            os.kill(int(entry.split(":")[1]), 9)
        gone.start_sshd()
    await _delete(fo_gateway, ssh_lab, model["id"])


async def _kept_across_a_restart(
    gateway_factory, specs: Path, name: str, between: Callable[[], None] = lambda: None
) -> tuple[GatewayProcess, dict, dict]:
    """A kernel of `name` started by a --keep-kernels gateway, a variable set in it, the
    gateway stopped (then `between`) and started again without --keep-kernels (so that it
    stops its kernels at the end): the gateway, the kernel's model before and after, once
    the variable has been read back from the kernel."""
    gw = gateway_factory(extra_args=["--kernelspec-dir", str(specs), "--keep-kernels"])
    model = await start_kernel(gw, name)
    ks = await KernelSocket.open(gw, model["id"], v1=True)
    await ks.execute("x = 'kept'")
    await ks.close()
    assert gw.stop() == 0
    between()
    gw.extra_args = ["--kernelspec-dir", str(specs)]
    gw.start()
    again = await _model(gw, model["id"])
    ks = await KernelSocket.open(gw, model["id"], v1=True)
    assert (await ks.execute("print(x)"))[0] == "kept\n"
    await ks.close()
    return gw, model, again


async def test_reattach_after_gateway_restart_goes_to_the_chosen_host(
    gateway_factory, ssh_lab, specs
):
    def one_kernel_on_rhost1() -> None:
        assert len(ssh_lab.hosts["rhost1"].kernels()) == 1

    gw, model, again = await _kept_across_a_restart(
        gateway_factory, specs, "fo-refused", one_kernel_on_rhost1
    )
    assert again["gateway"]["host"] == f"root@{ssh_lab.hosts['rhost1'].addr}:22", again
    await _delete(gw, ssh_lab, model["id"])
    assert gw.stop() == 0


def test_spec_add_with_several_hosts(tmp_path):
    added = subprocess.run(
        [
            *(sys.executable, "-m", "gateway", "spec", "add", "ssh", "pc-or-server"),
            *("--host", "me@pc", "--host", "me@server:2222", "--dir", str(tmp_path)),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert added.returncode == 0, added.stderr
    spec = json.loads((tmp_path / "pc-or-server" / "kernel.json").read_text())
    config = spec["metadata"]["kernel_provisioner"]["config"]
    assert config["host"] == "me@pc"
    assert config["hosts"] == ["me@pc", "me@server:2222"]


# -- failover kernelspecs (whole kernelspecs of any backend, in order) ----------------------


async def test_failover_spec_moves_on_to_local(fo_gateway, ssh_lab):
    status, listed = await api(fo_gateway, "GET", "api/kernelspecs")
    assert status == 200 and "pc-else-local" in listed["kernelspecs"]
    model = await start_kernel(fo_gateway, "pc-else-local")
    assert model["name"] == "pc-else-local"  # what the client asked for
    assert model["gateway"]["spec"] == "python3", model
    assert model["gateway"]["backend"] == "local", model
    assert await _hostname(fo_gateway, model["id"]) == os.uname().nodename
    status, _ = await api(fo_gateway, "POST", f"api/kernels/{model['id']}/restart", {})
    assert status == 200
    again = await _model(fo_gateway, model["id"])
    assert again["name"] == "pc-else-local" and again["gateway"]["spec"] == "python3"
    await _delete(fo_gateway, ssh_lab, model["id"])


async def test_failover_spec_moves_on_after_the_attempt_timeout(fo_gateway, ssh_lab):
    model, took = await _timed_start(fo_gateway, "slow-else-local")
    assert model["gateway"]["spec"] == "python3", model
    assert ATTEMPT_TIMEOUT <= took < ATTEMPT_TIMEOUT + 10, took
    host = ssh_lab.hosts["rhost1"]
    # the attempt that timed out left nothing on its host
    await eventually(
        lambda: [p for p in host.pids() if f"sleep {NEVER_READY}" in _cmdline(p)],
        until=lambda left: left == [],
        what="the never-ready kernel gone from rhost1",
    )
    await _delete(fo_gateway, ssh_lab, model["id"])


async def test_failover_spec_with_no_member_starting_names_each(fo_gateway, ssh_lab):
    status, body = await api(fo_gateway, "POST", "api/kernels", {"name": "nothing-works"})
    assert status == 500 and set(body) == {"reason", "message"}, body
    assert "ssh-dead: " in body["message"] and "Connect call failed" in body["message"], body
    assert "no-such-spec: no kernelspec named" in body["message"], body
    assert (await api(fo_gateway, "GET", "api/kernels"))[1] == []


async def test_failover_spec_reattaches_as_its_member(gateway_factory, ssh_lab, specs):
    gw, model, again = await _kept_across_a_restart(gateway_factory, specs, "pc-else-local")
    assert again["name"] == "pc-else-local" and again["gateway"]["spec"] == "python3", again
    assert (await api(gw, "DELETE", f"api/kernels/{model['id']}"))[0] == 204
    assert gw.stop() == 0


def test_spec_add_failover(tmp_path):
    d = ("--dir", str(tmp_path))
    rkg("spec", "add", "ssh", "pc", "--host", "me@pc", "--language", "R", *d)
    rkg("spec", "add", "failover", "pc-else-server", "pc", "server", "--attempt-timeout", "20", *d)
    spec = json.loads((tmp_path / "pc-else-server" / "kernel.json").read_text())
    assert spec["metadata"]["rkg_failover"] == {"specs": ["pc", "server"], "attempt_timeout": 20}
    assert spec["language"] == "R"
    assert "pc-else-server\tfailover pc server" in rkg("spec", "list", *d).stdout


async def test_failover_spec_in_a_warm_pool(gateway_factory, ssh_lab, specs):
    """A pooled kernel of a failover spec starts as its member and is handed over as the
    failover spec's."""
    gw = gateway_factory(extra_args=["--kernelspec-dir", str(specs), "--pool", "pc-else-local=1"])
    await eventually(
        lambda: api(gw, "GET", "api/status"),
        until=lambda r: any(
            p["spec"] == "pc-else-local" and p["ready"] == 1 for p in r[1]["pools"]
        ),
        timeout=30,
        interval=0.2,
        what="one kernel ready in the pool of pc-else-local",
    )
    model = await start_kernel(gw, "pc-else-local")
    assert f"kernel {model['id']} (pc-else-local) handed over from its warm pool" in gw.log()
    assert model["name"] == "pc-else-local" and model["gateway"]["spec"] == "python3", model
    assert await _hostname(gw, model["id"]) == os.uname().nodename
    assert (await api(gw, "DELETE", f"api/kernels/{model['id']}"))[0] == 204
    assert gw.stop() == 0
