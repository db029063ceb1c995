"""Kernels found on their own (gateway/kernels/discovery.py): a `--discover` SSH kernelspec
makes the gateway list the kernelspecs installed on a real OpenSSH host (tests/sshd.py), read
over SFTP. The host's kernels directory is one of this test's own (`--discover-path`): the
namespaces share this machine's files, not its network."""

from __future__ import annotations

import json
import secrets
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tornado.httpclient import AsyncHTTPClient

from conftest import GatewayProcess, _cleanup, eventually, free_port, rkg
from gwclient import KernelSocket, api, start_kernel

INTERVAL = 2  # the template's discover_interval, seconds
# its discover_timeout: a host that is down is given up after this (a read here takes well
# under a second) instead of the default 10 s, which the tests below would otherwise wait out
TIMEOUT = 4
HIDDEN_WITHIN = TIMEOUT + INTERVAL + 3  # past the default 10 s: the option must be honoured
IR = Path("/usr/share/jupyter/kernels/ir")
PY_SPEC = Path(sys.prefix) / "share" / "jupyter" / "kernels" / "python3"


def _install(remote: Path, name: str, spec: dict, logos_from: Path | None = None) -> None:
    (remote / name).mkdir(parents=True)
    (remote / name / "kernel.json").write_text(json.dumps(spec))
    for logo in logos_from.glob("logo-*") if logos_from else []:
        shutil.copy(logo, remote / name / logo.name)


def _python_spec(display: str) -> dict:
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    return {"argv": argv, "display_name": display, "language": "python"}


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The host's kernels directory: a Python kernel, IRkernel's spec and a spec whose argv
    has no {connection_file}."""
    if not IR.is_dir():
        pytest.fail(f"{IR} is missing (apt-get install r-cran-irkernel)")
    remote = tmp_path_factory.mktemp("remote-kernels")
    _install(remote, "mypy", _python_spec("Python here"), PY_SPEC)
    shutil.copytree(IR, remote / "myr")
    spec = json.loads((IR / "kernel.json").read_text())
    (remote / "myr" / "kernel.json").write_text(json.dumps({**spec, "display_name": "R here"}))
    _install(remote, "nocf", {**_python_spec("no file"), "argv": ["python3", "-c", "1"]})
    return remote


@pytest.fixture(scope="module")
def gw(ssh_lab, remote, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    specs = tmp_path_factory.mktemp("discovery-specs")
    rkg("spec", "add", "ssh", "pc", "--host", "x", "--discover", "--discover-path", str(remote),
        "--dir", str(specs))  # fmt: skip
    rkg("spec", "add", "ssh", "srv", "--host", "x", "--discover", "--discover-path", str(remote),
        "--dir", str(specs))  # fmt: skip
    rkg("spec", "add", "failover", "any", "pc", "srv", "--dir", str(specs))
    for name, host in (("pc", "rhost1"), ("srv", "rhost2")):
        path = specs / name / "kernel.json"
        spec = json.loads(path.read_text())
        config = spec["metadata"]["kernel_provisioner"]["config"]
        assert config["discover"] is True and config["discover_paths"] == [str(remote)]
        config.update(ssh_lab.config(host), discover_interval=INTERVAL, discover_timeout=TIMEOUT)
        path.write_text(json.dumps(spec))
    gw = GatewayProcess(
        port=free_port(),
        token=secrets.token_hex(16),
        extra_args=["--kernelspec-dir", str(specs), "--log-level", "DEBUG"],
        workdir=tmp_path_factory.mktemp("gateway-discovery"),
    )
    gw.start()
    yield gw
    leftovers = _cleanup(gw)
    assert not leftovers, f"kernel processes left behind: {leftovers}"


async def _specs(gw: GatewayProcess) -> dict:
    status, body = await api(gw, "GET", "api/kernelspecs")
    assert status == 200, body
    return dict(body["kernelspecs"])


async def _found(gw: GatewayProcess, *names: str, timeout: float = 20) -> dict:
    return dict(
        await eventually(
            lambda: _specs(gw),
            until=lambda specs: all(n in specs for n in names),
            timeout=timeout,
            interval=0.2,
            what=f"kernelspecs {names} listed",
        )
    )


async def test_the_host_kernelspecs_are_listed_with_their_logos(gw, ssh_lab):
    specs = await _found(gw, "pc-mypy", "pc-myr")
    py, r = specs["pc-mypy"], specs["pc-myr"]
    assert py["spec"]["display_name"] == "Python here (pc)"
    assert py["spec"]["language"] == "python"
    assert r["spec"]["display_name"] == "R here (pc)"
    assert r["spec"]["language"] == "R"
    assert r["spec"]["metadata"]["rkg"] == {"backend": "ssh", "host": ssh_lab.hosts["rhost1"].addr}
    assert "kernel_provisioner" not in r["spec"]["metadata"]  # no host config for clients
    # the template is not a kernel; a remote argv without {connection_file} is skipped
    assert "pc" not in specs and "pc-nocf" not in specs
    # the default Jupyter paths are read too: IRkernel's own spec in /usr/share
    assert specs["pc-ir"]["spec"]["display_name"] == "R (pc)"
    client = AsyncHTTPClient()
    for name, src in (("pc-mypy", PY_SPEC), ("pc-myr", IR)):
        logos = {k: v for k, v in specs[name]["resources"].items() if k.startswith("logo-")}
        assert set(logos) == {p.stem for p in src.glob("logo-*")}, logos
        for stem, url in logos.items():
            ext = Path(url).suffix
            got = await client.fetch(
                gw.url + url.lstrip("/"), headers={"Authorization": f"token {gw.token}"}
            )
            assert got.body == (src / f"{stem}{ext}").read_bytes()
    status, one = await api(gw, "GET", "api/kernelspecs/pc-myr")
    assert status == 200 and one["spec"]["display_name"] == "R here (pc)"
    assert (await api(gw, "GET", "api/kernelspecs/pc"))[0] == 404


@pytest.mark.parametrize(("name", "code"), [("pc-mypy", "print(6 * 7)"), ("pc-myr", "cat(6 * 7)")])
async def test_a_found_kernel_runs_on_the_host(gw, ssh_lab, name, code):
    await _found(gw, name)
    kid = (await start_kernel(gw, name))["id"]
    ks = await KernelSocket.open(gw, kid, v1=True)
    out, reply = await ks.execute(code, timeout=60)
    assert reply["status"] == "ok" and out.strip() == "42", (out, reply)
    await ks.close()
    assert (await api(gw, "DELETE", f"api/kernels/{kid}"))[0] == 204


async def test_a_kernelspec_installed_or_removed_there_appears_or_disappears(gw, remote):
    await _found(gw, "pc-mypy")
    _install(remote, "late", _python_spec("Late"), PY_SPEC)
    try:
        added = time.monotonic()
        specs = await _found(gw, "pc-late", timeout=3 * INTERVAL + 10)
        print(f"installed kernelspec listed after {time.monotonic() - added:.1f} s")
        assert specs["pc-late"]["spec"]["display_name"] == "Late (pc)"
    finally:
        shutil.rmtree(remote / "late")
    await eventually(
        lambda: _specs(gw),
        until=lambda specs: "pc-late" not in specs and "pc-mypy" in specs,
        timeout=3 * INTERVAL + 10,
        interval=0.2,
        what="pc-late gone",
    )


async def test_a_host_that_is_down_has_its_kernels_hidden_and_the_list_stays_fast(gw, ssh_lab):
    await _found(gw, "pc-mypy", "pc-myr")
    host = ssh_lab.hosts["rhost1"]
    host.stop_sshd()  # the listener and every connection's sshd: the shared connection drops
    try:
        await eventually(
            lambda: _specs(gw),
            until=lambda specs: not any(n.startswith("pc-") for n in specs),
            timeout=HIDDEN_WITHIN,
            interval=0.2,
            what="pc-* hidden while rhost1 is down",
        )
        worst = 0.0
        for _ in range(20):
            started = time.monotonic()
            specs = await _specs(gw)
            worst = max(worst, time.monotonic() - started)
        print(f"/api/kernelspecs with the host down: worst of 20 {1000 * worst:.1f} ms")
        assert "python3" in specs  # the local kernelspecs are still listed
    finally:
        host.start_sshd()
    await _found(gw, "pc-mypy", "pc-myr", timeout=3 * INTERVAL + 30)


async def _runs_on(gw: GatewayProcess, name: str) -> str:
    """Start a kernel of `name`, check it executes, shut it down: the host it ran on."""
    kid = (await start_kernel(gw, name))["id"]
    ks = await KernelSocket.open(gw, kid, v1=True)
    out, reply = await ks.execute("print(6 * 7)", timeout=60)
    assert reply["status"] == "ok" and out.strip() == "42", (out, reply)
    await ks.close()
    status, model = await api(gw, "GET", f"api/kernels/{kid}")
    assert status == 200, model
    assert (await api(gw, "DELETE", f"api/kernels/{kid}"))[0] == 204
    return str(model["gateway"]["host"])


async def test_the_same_kernelspec_on_two_hosts_is_one_entry_preferring_the_first(gw, ssh_lab):
    specs = await _found(gw, "any-mypy", "any-myr", "pc-mypy", "srv-mypy")
    assert specs["any-mypy"]["spec"]["display_name"] == "Python here (any)"
    assert specs["any-myr"]["spec"]["language"] == "R"
    assert "logo-64x64" in specs["any-mypy"]["resources"]
    assert "any" not in specs and "srv" not in specs
    pc, srv = ssh_lab.hosts["rhost1"], ssh_lab.hosts["rhost2"]
    assert pc.addr in await _runs_on(gw, "any-mypy")
    pc.stop_sshd()
    try:
        specs = await eventually(
            lambda: _specs(gw),
            until=lambda specs: "pc-mypy" not in specs,
            timeout=HIDDEN_WITHIN,
            interval=0.2,
            what="pc-mypy hidden while rhost1 is down",
        )
        assert "any-mypy" in specs  # still found on the server
        assert srv.addr in await _runs_on(gw, "any-mypy")
    finally:
        pc.start_sshd()
    await _found(gw, "pc-mypy", timeout=3 * INTERVAL + 30)
    assert pc.addr in await _runs_on(gw, "any-mypy")  # the PC again, once it is back


async def test_a_found_kernel_is_reattached_after_a_keep_kernels_restart(gw):
    """The first read of the hosts comes before the restored kernels are re-attached."""
    plain = list(gw.extra_args)
    assert gw.stop() == 0
    gw.extra_args = [*plain, "--keep-kernels"]
    gw.start()
    await _found(gw, "pc-mypy")
    kid = (await start_kernel(gw, "pc-mypy"))["id"]
    ks = await KernelSocket.open(gw, kid, v1=True)
    assert (await ks.execute("x = 41", timeout=60))[1]["status"] == "ok"
    await ks.close()
    assert gw.stop() == 0
    gw.extra_args = plain
    gw.start()
    status, model = await api(gw, "GET", f"api/kernels/{kid}")
    assert status == 200, model
    ks = await KernelSocket.open(gw, kid, v1=True)
    out, reply = await ks.execute("print(x + 1)", timeout=60)
    assert out.strip() == "42", (out, reply)
    await ks.close()
    assert (await api(gw, "DELETE", f"api/kernels/{kid}"))[0] == 204
