"""Any kernel, anywhere: IRkernel (Debian's r-cran-irkernel) and xeus-python (its PyPI wheel)
over SSH (tests/sshd.py) and as SLURM jobs (tests/slurm.py). Neither writes its ports back:
they bind the ports the gateway chose on the host (gateway/backends/ports.py). Also
`--port-range`, and `rkg spec add --kernel-cmd/--language`; the port choice itself, in Python
and in the job script's sh, is unit-tested here against this machine's real /proc."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import (
    GatewayProcess,
    eventually,
    processes_matching,
    rkg,
    serving,
)
from gateway.backends import ports as kports
from gateway.specs import any_kernel
from gwclient import KernelSocket, api, start_kernel

pytestmark = pytest.mark.anykernel

IR_CMD = "R --slave -e IRkernel::main() --args {connection_file}"
XPY_CMD = f"{sys.executable} -m xpython_launcher -f {{connection_file}}"
RKG_SPEC = [sys.executable, "-m", "gateway", "spec"]
CHANNELS = ("shell", "iopub", "stdin", "control", "hb")
# kernel: (command and more `rkg spec add` arguments, language, code printing 42, a cell that
# says "sleeping" and then runs 30 s, whether an interrupt ends that cell). xeus-python 0.19
# from PyPI dies of SIGINT and acknowledges an interrupt_request but lets the cell run on,
# also under plain jupyter_client with no gateway involved: its spec says
# --interrupt-mode message, its cell is 3 s, and the test checks that the interrupt leaves the
# kernel alive and the cell's reply comes.
KERNELS = {
    "ir": (
        [IR_CMD],
        "R",
        'cat(6 * 7, "\\n")',
        'cat("sleeping\\n")\nSys.sleep(30)',
        True,
    ),
    "xpy": (
        [XPY_CMD, "--interrupt-mode", "message"],
        "python",
        "print(6 * 7)",
        "import time\nprint('sleeping', flush=True)\nfor _ in range(30): time.sleep(0.1)",
        False,
    ),
}
# --port-range of the *-range specs: ten ports, five used; like every range in these tests, below
# the ephemeral range (32768-60999 here), where no outgoing connection can take a port
RANGE = (24100, 24109)


def _need_kernels() -> None:
    if not shutil.which("R") or not Path("/usr/share/jupyter/kernels/ir").is_dir():
        pytest.fail("IRkernel is missing: apt-get install -y r-base-core r-cran-irkernel")
    try:
        import xpython_launcher  # noqa: F401
    except ImportError:
        pytest.fail("xeus-python is missing: pip install xeus-python (the test extra)")


def _cli_spec(directory: Path, backend: str, name: str, *args: str) -> dict:
    """`rkg spec add BACKEND NAME ARGS`, read back."""
    rkg("spec", "add", backend, name, *args, "--dir", str(directory))
    return json.loads((directory / name / "kernel.json").read_text())


def _save(directory: Path, name: str, spec: dict) -> None:
    (directory / name / "kernel.json").write_text(json.dumps(spec, indent=2))


SQUAT = (24200, 24205)  # six ports: after one is taken, five are left for the relaunch


def _squatter(ssh_lab) -> dict:
    """Config of an ipykernel spec whose first launch loses its shell port: its pre_command,
    run after the gateway chose the ports and before the kernel starts, binds that port on
    the host for 4 s (once: a marker file), as another program could."""
    runtime = ssh_lab.workdir / "remote-runtime"
    marker = ssh_lab.workdir / "squatted"
    grab = (
        "import json, socket, sys, time; "
        "port = json.load(open(sys.argv[1]))['shell_port']; "
        "s = socket.socket(); s.bind(('127.0.0.1', port)); s.listen(); "
        "print('squatting on', port, flush=True); time.sleep(4)"
    )
    pre = (
        f"if [ ! -e {marker} ]; then touch {marker}; "
        f"f=$(ls -t {runtime}/kernel-*.json | head -1); "
        f'{sys.executable} -c "{grab}" "$f" & sleep 0.5; fi'
    )
    return {"port_range": f"{SQUAT[0]}-{SQUAT[1]}", "pre_command": pre}


@pytest.fixture(scope="module")
def ssh_gw(ssh_lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    _need_kernels()
    specs = tmp_path_factory.mktemp("any-ssh-specs")
    for kernel, (cmd, lang, *_) in KERNELS.items():
        for suffix, extra in (("", []), ("-range", ["--port-range", f"{RANGE[0]}-{RANGE[1]}"])):
            name = f"ssh-{kernel}{suffix}"
            spec = _cli_spec(
                specs, "ssh", name, "--host", "x", "--kernel-cmd", *cmd, "--language", lang, *extra
            )
            config = spec["metadata"]["kernel_provisioner"]["config"]
            config.update(ssh_lab.config("rhost1"), kernel_cmd=config["kernel_cmd"])
            _save(specs, name, spec)
    ssh_lab.write_spec(specs, "ssh-squatted", "rhost1", **_squatter(ssh_lab))
    yield from serving(tmp_path_factory.mktemp("gateway-any-ssh"), "--kernelspec-dir", str(specs))
    assert not _kernel_procs(""), f"kernels left behind: {_kernel_procs('')}"


@pytest.fixture(scope="module")
def slurm_gw(slurm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    _need_kernels()
    specs = tmp_path_factory.mktemp("any-slurm-specs")
    for kernel, (cmd, lang, *_) in KERNELS.items():
        for suffix, extra in (("", []), ("-range", ["--port-range", f"{RANGE[0]}-{RANGE[1]}"])):
            args = ["--partition", "debug", "--cpus", "1", "--kernel-cmd", *cmd, "--language", lang]
            _cli_spec(specs, "slurm", f"slurm-{kernel}{suffix}", *args, *extra)
    workdir = tmp_path_factory.mktemp("gateway-any-slurm")
    for gw in serving(workdir, "--kernelspec-dir", str(specs), env=slurm.env):
        yield gw  # serving() stops it when the loop goes on
    assert not slurm.wait_no_jobs(), f"jobs left behind: {slurm.jobs()}"
    assert not slurm.leftovers(gw), f"kernels left behind: {slurm.leftovers(gw)}"


def _kernel_procs(kernel_id: str) -> list[int]:
    """Processes of IRkernel or xeus-python kernels (of one kernel id, if given)."""
    return [
        p
        for needle in ("IRkernel::main", "xpython_launcher")
        for p in processes_matching(needle)
        if kernel_id in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")
    ]


def _listening(pid: int, ns: str | None) -> set[int]:
    """TCP ports the process listens on (in namespace `ns`, or this one)."""
    pre = ["ip", "netns", "exec", ns] if ns else []
    out = subprocess.run(
        [*pre, "ss", "-ltnpH"], capture_output=True, text=True, check=True, timeout=10
    ).stdout
    return {
        int(line.split()[3].rpartition(":")[2])
        for line in out.splitlines()
        if f"pid={pid}," in line
    }


async def _lifecycle(gw: GatewayProcess, spec: str, kernel: str) -> str:
    """Start, execute, interrupt a long cell, restart, execute again; the kernel's id."""
    _, _, code, long_cell, interruptible = KERNELS[kernel]
    model = await start_kernel(gw, spec)
    kid = model["id"]
    ks = await KernelSocket.open(gw, kid, v1=True)
    out, reply = await ks.execute(code, timeout=60)
    assert reply["status"] == "ok" and out.strip() == "42", (out, reply)

    msg_id = await ks.send("execute_request", {"code": long_cell, "silent": False})
    await ks.until(
        lambda m: m["header"]["msg_type"] == "stream" and m["parent_header"].get("msg_id") == msg_id
    )
    await asyncio.sleep(0.5)
    loop = asyncio.get_running_loop()
    asked = loop.time()
    assert (await api(gw, "POST", f"api/kernels/{kid}/interrupt"))[0] == 204
    msgs = await ks.until(  # the cell runs 30 s if not interrupted
        lambda m: (
            m["header"]["msg_type"] == "execute_reply"
            and (m["parent_header"] or {}).get("msg_id") == msg_id
        ),
        timeout=15,
    )
    assert loop.time() - asked < 15
    if interruptible:
        assert msgs[-1]["content"]["status"] != "ok", msgs
    out, reply = await ks.execute(code, timeout=30)
    assert out.strip() == "42", (out, reply)
    await ks.close()

    status, _ = await api(gw, "POST", f"api/kernels/{kid}/restart")
    assert status == 200
    ks = await KernelSocket.open(gw, kid, v1=True)
    out, reply = await ks.execute(code, timeout=60)
    assert reply["status"] == "ok" and out.strip() == "42", (out, reply)
    await ks.close()
    return str(kid)


async def _nothing_left(kid: str, files: Path, pattern: str) -> None:
    await eventually(
        lambda: _kernel_procs(kid),
        until=lambda procs: procs == [],
        timeout=15,
        what=f"no process of kernel {kid}",
    )
    assert not [p.name for p in files.glob(pattern)], list(files.iterdir())


@pytest.mark.parametrize("kernel", list(KERNELS))
async def test_kernel_over_ssh(ssh_gw, ssh_lab, kernel):
    kid = await _lifecycle(ssh_gw, f"ssh-{kernel}", kernel)
    assert (await api(ssh_gw, "DELETE", f"api/kernels/{kid}"))[0] == 204
    await _nothing_left(kid, ssh_lab.workdir / "remote-runtime", f"kernel-{kid}*")


@pytest.mark.parametrize("kernel", list(KERNELS))
async def test_kernel_as_a_slurm_job(slurm_gw, slurm, kernel):
    kid = await _lifecycle(slurm_gw, f"slurm-{kernel}", kernel)
    assert (await api(slurm_gw, "DELETE", f"api/kernels/{kid}"))[0] == 204
    await eventually(
        lambda: [j for j in slurm.jobs() if j.endswith(f"rkg-{kid}")],
        until=lambda jobs: jobs == [],
        timeout=15,
        what=f"no job of kernel {kid}",
    )
    await _nothing_left(kid, slurm_gw.runtime_dir, f"batch-kernel-{kid}*")


@pytest.mark.parametrize("where", ["ssh", "slurm"])
async def test_port_range(request, where):
    """Both kernels on one host at once, each on five ports of a ten-port range."""
    gw = request.getfixturevalue(f"{where}_gw")
    ns = request.getfixturevalue("ssh_lab").hosts["rhost1"].ns if where == "ssh" else None
    models = [await start_kernel(gw, f"{where}-{k}-range") for k in KERNELS]
    seen: set[int] = set()
    for model in models:
        (pid,) = [p for p in _kernel_procs(model["id"]) if _listening(p, ns)] or [0]
        ports = _listening(pid, ns)
        assert len(ports) == 5 and all(RANGE[0] <= p <= RANGE[1] for p in ports), ports
        seen |= ports
    assert len(seen) == 10  # no port given twice
    for model in models:
        assert (await api(gw, "DELETE", f"api/kernels/{model['id']}"))[0] == 204


async def test_a_port_taken_before_the_kernel_binds_it(ssh_gw, ssh_lab):
    """The kernel meets "Address already in use" and is launched again on other ports."""
    model = await start_kernel(ssh_gw, "ssh-squatted")
    ks = await KernelSocket.open(ssh_gw, model["id"], v1=True)
    out, reply = await ks.execute("print(6 * 7)")
    assert reply["status"] == "ok" and out == "42\n"
    await ks.close()
    log = ssh_gw.log_path.read_text()
    assert "a port was taken" in log and "launching it again on other ports" in log
    ns = ssh_lab.hosts["rhost1"].ns
    (pid,) = [p for p in processes_matching(f"ipykernel_launcher -f {ssh_lab.workdir}")]
    ports = _listening(pid, ns)  # ipykernel 7 also listens on a port of its own
    assert len({p for p in ports if SQUAT[0] <= p <= SQUAT[1]}) == 5, ports
    assert (await api(ssh_gw, "DELETE", f"api/kernels/{model['id']}"))[0] == 204
    await eventually(lambda: processes_matching(model["id"]), until=lambda p: p == [], timeout=15)


async def test_port_range_of_a_docker_kernel(gateway_factory, docker, kernel_image, tmp_path):
    """The engine publishes the container's ports on host ports inside the range."""
    from backends import docker_spec

    span = (24300, 24319)
    config = {"image": kernel_image, "docker_host": docker.host}
    docker_spec(tmp_path, "dk-range", **config, port_range=f"{span[0]}-{span[1]}")
    gw = gateway_factory(extra_args=["--kernelspec-dir", str(tmp_path)])
    kid = (await start_kernel(gw, "dk-range"))["id"]
    ks = await KernelSocket.open(gw, kid, v1=True)
    assert (await ks.execute("print(6 * 7)"))[0] == "42\n"
    await ks.close()
    (name,) = docker.ours()
    ports = json.loads(docker.run("docker", "inspect", name).stdout)[0]["NetworkSettings"]["Ports"]
    published = {int(b["HostPort"]) for binds in ports.values() for b in binds or []}
    assert len(published) == 5 and all(span[0] <= p <= span[1] for p in published), published
    assert (await api(gw, "DELETE", f"api/kernels/{kid}"))[0] == 204
    assert docker.ours() == []


# -- the spec command ----------------------------------------------------------------------


@pytest.mark.unit
def test_kernel_cmd_needs_its_connection_file(tmp_path):
    run = subprocess.run(
        [*RKG_SPEC, "add", "slurm", "r", "--dir", str(tmp_path), "--kernel-cmd", "R --slave"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 2 and "has no {connection_file}" in run.stderr, run.stderr
    assert not (tmp_path / "r").exists()
    spec = any_kernel(
        {"argv": [], "display_name": "Python (gpu1)", "metadata": {"kernel_provisioner": {}}},
        "R --slave -e 'IRkernel::main()' --args {connection_file}",
        "R",
        "40000-40999",
    )
    argv = ["R", "--slave", "-e", "IRkernel::main()", "--args", "{connection_file}"]
    assert spec["argv"] == argv and spec["language"] == "R" and spec["display_name"] == "R (gpu1)"
    assert spec["metadata"]["kernel_provisioner"]["config"] == {
        "kernel_cmd": argv,
        "port_range": "40000-40999",
    }


@pytest.mark.unit
def test_a_kernel_cmd_without_its_connection_file_does_not_start():
    """A kernelspec written by hand is checked at launch too."""
    from jupyter_client.kernelspec import KernelSpec

    from gateway.backends.batch import BatchProvisioner
    from gateway.errors import KernelStartError

    spec = KernelSpec(display_name="R here")
    prov = BatchProvisioner(kernel_id="k", kernel_spec=spec, kernel_cmd=["R", "--slave"])
    with pytest.raises(KernelStartError, match=r"has no \{connection_file\}"):
        prov._command("/rt/k.json")
    prov.kernel_cmd = ["R", "--args", "{connection_file}"]
    assert prov._command("/rt/k.json") == ["R", "--args", "/rt/k.json"]


# -- the port choice -----------------------------------------------------------------------


@pytest.mark.unit
def test_port_ranges():
    assert kports.parse_range("") is None
    assert kports.parse_range("40000-40004") == (40000, 40004)
    for bad in ("40000", "x-y", "40000-40003", "80-90", "50000-40000", "1-70000"):
        with pytest.raises(ValueError):
            kports.parse_range(bad)
    assert kports.default_range((32768, 60999)) == (16384, 32767)
    assert kports.default_range((1500, 40000)) == (40001, 56384)
    assert kports.default_range((1024, 65000)) == (1024, 65535)
    assert kports.parse_ephemeral("32768\t60999\n") == (32768, 60999)
    assert kports.parse_ephemeral(None) == kports.LINUX_EPHEMERAL


@pytest.mark.unit
def test_choose_avoids_used_and_reserved_ports():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        bound = s.getsockname()[1]
        with open("/proc/net/tcp") as f:
            used = kports.used_ports(f.read(), None)
    assert bound in used
    span = (bound - 3, bound + 3)  # seven ports, one bound
    kports.RESERVED.take("h", [bound - 3])
    avoid = used | kports.RESERVED.of("h")
    for seed in range(50):
        got = kports.choose(5, span, avoid, random.Random(seed))
        assert len(set(got)) == 5 and bound not in got and bound - 3 not in got, got
    with pytest.raises(ValueError, match="only 5 free ports"):
        kports.choose(6, span, avoid)
    kports.RESERVED.give_back("h", [bound - 3])
    assert kports.RESERVED.of("h") == set()
    wide = kports.choose(5, (20000, 29999), used, random.Random(1))
    assert len(set(wide)) == 5 and all(20000 <= p <= 29999 for p in wide)


def _listeners(ports: list[int]) -> list[socket.socket]:
    socks = []
    try:
        for port in ports:
            s = socket.socket()
            socks.append(s)
            s.bind(("0.0.0.0", port))
            s.listen()
    except OSError:
        for s in socks:
            s.close()
        raise
    return socks


def _half_taken_range() -> tuple[tuple[int, int], list[socket.socket]]:
    """Ten ports of which five (every other one) listen here."""
    for _ in range(50):
        base = random.randrange(24400, 24990)
        try:
            return (base, base + 9), _listeners(list(range(base, base + 10, 2)))
        except OSError:
            continue
    raise RuntimeError("no free block of ten ports")


@pytest.mark.parametrize("tight", [False, True])
def test_job_script_chooses_ports_in_sh(tmp_path, tight):
    """The job script's port choice (sh, awk, sed) on this machine: five distinct free ports,
    the bound ones avoided, written over the zeros of the connection file; in a ten-port
    range half taken, exactly the free half, every time."""
    conn = tmp_path / "k 1.json"
    span, socks = _half_taken_range()
    try:
        for _ in range(10 if tight else 2):
            zeros = {f"{ch}_port": 0 for ch in CHANNELS}
            conn.write_text(json.dumps(zeros | {"key": "k"}, indent=2))
            script = kports.choose_script(str(conn), span if tight else None, CHANNELS)
            run = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=10)
            assert run.returncode == 0, run.stderr
            info = json.loads(conn.read_text())
            got = [info[f"{ch}_port"] for ch in CHANNELS]
            assert len(set(got)) == 5 and info["key"] == "k", got
            if tight:
                assert sorted(got) == list(range(span[0] + 1, span[1] + 1, 2))
            else:
                ephemeral = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
                lo, hi = kports.default_range(kports.parse_ephemeral(ephemeral))
                assert all(lo <= p <= hi for p in got), (got, lo, hi)
    finally:
        for s in socks:
            s.close()
