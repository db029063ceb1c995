"""What remote_ikernel users expect of `rkg spec` (issue #14, item 5): `show`, no silent
overwrite (`--force`), a launch timeout per kernelspec honoured by every backend, kernels in
other local environments (`add local --python`), and SSH hosts that need a password or a
one-time code (a command's output or a 0600 file on the gateway's machine, never the client's),
against a real OpenSSH sshd on loopback that allows password logins for a user made for it."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import eventually, free_port, require_infra, rkg
from gateway.backends import ssh as ssh_backend
from gateway.backends.contract import GatewayKernelManager
from gateway.kernels.env import LaunchRequest, spec_launch_timeout
from gwclient import KernelSocket, api, start_kernel

SSHD = "/usr/sbin/sshd"
IR_CMD = "R --slave -e IRkernel::main() --args {connection_file}"
HANG_CMD = "sh -c 'sleep 120' {connection_file}"  # never listens on its ports


def _spec(directory: Path, name: str) -> dict:
    return json.loads((directory / name / "kernel.json").read_text())


# -- show, --force ------------------------------------------------------------------------


def test_add_refuses_to_overwrite_without_force_and_show_prints_it(tmp_path):
    d = str(tmp_path)
    rkg("spec", "add", "ssh", "gpu", "--host", "me@gpu1", "--launch-timeout", "90", "--dir", d)
    again = rkg("spec", "add", "ssh", "gpu", "--host", "me@other", "--dir", d, check=False)
    assert again.returncode == 2, again
    err = again.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert str(tmp_path / "gpu") in err and "--force" in err, err
    assert _spec(tmp_path, "gpu")["metadata"]["kernel_provisioner"]["config"]["host"] == "me@gpu1"
    rkg("spec", "add", "ssh", "gpu", "--host", "me@other", "--dir", d, "--force")
    config = _spec(tmp_path, "gpu")["metadata"]["kernel_provisioner"]["config"]
    assert config["host"] == "me@other" and "launch_timeout" not in config

    rkg("spec", "add", "ssh", "ir", "--host", "me@gpu1", "--jump", "me@bastion", "--dir", d,
        "--kernel-cmd", IR_CMD, "--language", "R", "--launch-timeout", "120")  # fmt: skip
    shown = rkg("spec", "show", "ir", "--dir", d).stdout
    summary, rest = shown.split("\n", 1)
    for words in ("rkg-ssh", "me@gpu1", "via me@bastion", "IRkernel::main()", "R,", "120 s"):
        assert words in summary, (words, summary)
    assert rest.startswith(f"{tmp_path / 'ir' / 'kernel.json'}:\n")
    assert json.loads(rest.split("\n", 1)[1]) == _spec(tmp_path, "ir")

    missing = rkg("spec", "show", "nope", "--dir", d, check=False)
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"NotFound: no kernelspec 'nope' in {tmp_path}"


# -- the launch timeout -------------------------------------------------------------------


def test_launch_timeout_is_the_clients_else_the_specs_else_the_gateways():
    meta = {"kernel_provisioner": {"provisioner_name": "rkg-ssh", "config": {"launch_timeout": 3}}}
    assert spec_launch_timeout(meta) == 3.0 and spec_launch_timeout({}) is None
    spec_t = spec_launch_timeout(meta)
    req = LaunchRequest.from_client({}, [], 300.0, spec_timeout=spec_t)
    assert (req.timeout, req.timeout_source) == (3.0, "the kernelspec's launch_timeout")
    req = LaunchRequest.from_client({"KERNEL_LAUNCH_TIMEOUT": "7"}, [], 300.0, spec_timeout=3)
    assert (req.timeout, req.timeout_source) == (7.0, "KERNEL_LAUNCH_TIMEOUT")
    req = LaunchRequest.from_client({}, [], 300.0)
    assert (req.timeout, req.timeout_source) == (300.0, "--kernel-launch-timeout")


def test_the_ssh_backend_has_no_timeout_of_its_own():
    """The SSH launch waits what the gateway gives it (the old code capped it at 60 s without
    a gateway value, and started from 60 with none): 300 s is 300 s; without a gateway, the
    launch env's KERNEL_LAUNCH_TIMEOUT, else the spec's, else PLAIN_LAUNCH_TIMEOUT."""
    from jupyter_client.kernelspec import KernelSpec

    spec = KernelSpec(argv=["x", "{connection_file}"], display_name="t", language="python")
    km = GatewayKernelManager(launch_timeout=300.0)
    prov = ssh_backend.SSHProvisioner(kernel_id="k", kernel_spec=spec, parent=km, host="h")
    assert prov.gateway_timeout({}, ssh_backend.PLAIN_LAUNCH_TIMEOUT) == 300.0
    plain = ssh_backend.SSHProvisioner(kernel_id="k", kernel_spec=spec, host="h")
    assert plain.gateway_timeout({}, ssh_backend.PLAIN_LAUNCH_TIMEOUT) > 60
    assert plain.gateway_timeout({"KERNEL_LAUNCH_TIMEOUT": "200"}, 600) == 200
    own = ssh_backend.SSHProvisioner(kernel_id="k", kernel_spec=spec, host="h", launch_timeout=5)
    assert own.gateway_timeout({}, ssh_backend.PLAIN_LAUNCH_TIMEOUT) == 5


async def test_a_local_kernel_and_its_warm_pool_honour_the_specs_timeout(gateway_factory, tmp_path):
    """The same rule for the local backend, and for the warm pool's spares (started with no
    client): a spec's 2 s end a start that never answers, under --kernel-launch-timeout 300."""
    d = str(tmp_path)
    rkg("spec", "add", "local", "hang", "--python", sys.executable, "--kernel-cmd", HANG_CMD,
        "--launch-timeout", "2", "--dir", d)  # fmt: skip
    gw = gateway_factory(
        extra_args=["--kernelspec-dir", d, "--kernel-launch-timeout", "300", "--pool", "hang=1"]
    )

    async def failures() -> list:  # before any client's start: the spares' own
        return [f for f in (await api(gw, "GET", "api/status"))[1]["failures"]]

    failed = await eventually(failures, timeout=20, what="a spare's timed-out start")
    assert all(f["name"] == "hang" for f in failed), failed
    assert "2 s (the kernelspec's launch_timeout)" in failed[0]["reason"], failed
    began = time.monotonic()
    status, body = await api(gw, "POST", "api/kernels", {"name": "hang"})
    assert status == 504 and "2 s (the kernelspec's launch_timeout)" in body["message"], body
    assert time.monotonic() - began < 12


# -- a kernel in another local environment ---------------------------------------------


def _venv(path: Path, with_ipykernel: bool) -> Path:
    """A venv made from this one's python, with (a .pth to this venv's packages) or without
    ipykernel."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    if with_ipykernel:
        site = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        here = [p for p in sys.path if p.endswith("site-packages")]
        Path(site, "rkg_parent.pth").write_text("\n".join(here) + "\n")
    return python


async def test_add_local_runs_the_kernel_with_that_python(gateway_factory, tmp_path):
    specs = tmp_path / "specs"
    other = _venv(tmp_path / "other", with_ipykernel=True)
    bare = _venv(tmp_path / "bare", with_ipykernel=False)
    d = str(specs)
    no = rkg("spec", "add", "local", "x", "--python", "/etc/passwd", "--dir", d, check=False)
    assert no.returncode == 2 and "not an executable" in no.stderr, no.stderr
    no = rkg("spec", "add", "local", "x", "--python", str(bare), "--dir", d, check=False)
    assert no.returncode == 2 and "has no ipykernel" in no.stderr and "pip install" in no.stderr
    assert not (specs / "x").exists()
    rkg("spec", "add", "local", "other", "--python", str(other), "--env", "MARK=other-env",
        "--display-name", "Other env", "--launch-timeout", "45", "--dir", d)  # fmt: skip
    spec = _spec(specs, "other")
    assert spec["argv"][0] == str(other) and spec["display_name"] == "Other env"
    assert spec["metadata"]["kernel_provisioner"]["provisioner_name"] == "rkg-local"

    gw = gateway_factory(extra_args=["--kernelspec-dir", d])
    model = await start_kernel(gw, "other")
    ks = await KernelSocket.open(gw, model["id"], v1=True)
    out, reply = await ks.execute("import os, sys; print(sys.executable, os.environ['MARK'])")
    assert reply["status"] == "ok" and out.split() == [str(other), "other-env"], out
    await ks.close()
    assert (await api(gw, "DELETE", f"api/kernels/{model['id']}"))[0] == 204


# -- SSH hosts that need a password ----------------------------------------------------


@dataclass
class PasswordHost:
    user: str
    password: str
    addr: str  # user@127.0.0.1:port of the sshd that takes passwords
    kbdint_addr: str  # of the one that asks keyboard-interactive questions only (PAM)
    known_hosts: Path
    log: Path

    def failures(self) -> int:
        return self.log.read_text().count(f"Failed password for {self.user}")

    def processes(self) -> list[int]:
        uid = pwd.getpwnam(self.user).pw_uid
        out = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if os.stat(f"/proc/{pid}").st_uid == uid:
                    out.append(int(pid))
            except OSError:
                pass
        return out


@pytest.fixture(scope="module")
def password_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PasswordHost]:
    """A real OpenSSH sshd on 127.0.0.1 that takes passwords only (no keys), for one user made
    here (useradd) and removed at the end with whatever it still runs."""
    if not os.path.exists(SSHD) or os.geteuid() != 0:
        require_infra("sshd (openssh-server) and root are needed")
    if not shutil.which("R"):
        require_infra("R is missing: apt-get install -y r-base-core r-cran-irkernel")
    work = tmp_path_factory.mktemp("pwhost")
    os.chmod(work, 0o755)
    user, password = f"rkgpw{secrets.token_hex(3)}", secrets.token_urlsafe(12)
    subprocess.run(["useradd", "-m", "-s", "/bin/sh", user], check=True)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        subprocess.run(["chpasswd"], input=f"{user}:{password}\n", text=True, check=True)
        key = work / "hostkey"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        # password auth (UsePAM no: the shadow file), and keyboard-interactive only (PAM's
        # "Password:" prompt, as a one-time-code module would ask), each its own sshd
        procs, known, addrs = [], work / "known_hosts", []
        os.makedirs("/run/sshd", exist_ok=True)
        for kind, auth in (
            ("password", ["PasswordAuthentication yes", "KbdInteractiveAuthentication no"]),
            ("kbdint", ["PasswordAuthentication no", "KbdInteractiveAuthentication yes"]),
        ):
            port = free_port()
            conf, log = work / f"sshd-{kind}.conf", work / f"sshd-{kind}.log"
            conf.write_text(
                "\n".join(
                    [
                        "ListenAddress 127.0.0.1",
                        f"Port {port}",
                        f"HostKey {key}",
                        f"PidFile {work}/sshd-{kind}.pid",
                        "AuthorizedKeysFile none",
                        "PubkeyAuthentication no",
                        *auth,
                        f"UsePAM {'yes' if kind == 'kbdint' else 'no'}",
                        "StrictModes no",
                        f"AllowUsers {user}",
                        "MaxAuthTries 3",
                        "AllowTcpForwarding yes",
                        "LogLevel INFO",
                        "Subsystem sftp /usr/lib/openssh/sftp-server",
                        "",
                    ]
                )
            )
            procs.append(subprocess.Popen([SSHD, "-D", "-e", "-f", str(conf), "-E", str(log)]))
            deadline = time.monotonic() + 10
            while not subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True,
                                     text=True).stdout.strip():  # fmt: skip
                assert procs[-1].poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            with known.open("a") as f:
                f.write(f"[127.0.0.1]:{port} {Path(f'{key}.pub').read_text()}")
            addrs.append(f"{user}@127.0.0.1:{port}")
        yield PasswordHost(user, password, addrs[0], addrs[1], known, work / "sshd-password.log")
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
        # whatever the test's user still runs (its processes only), by pid
        for pid in PasswordHost(user, "", "", "", work, work).processes():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["userdel", "-r", user], capture_output=True, check=False)


def _stat(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""


def _alive(pids: list[int]) -> list[int]:
    """Not zombies (an exited process its parent, the sshd, has not yet reaped)."""
    return [p for p in pids if _stat(p) and _stat(p).rpartition(")")[2].split()[0] not in "ZX"]


def _secret_file(path: Path, text: str, mode: int = 0o600) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    os.write(fd, f"{text}\n".encode())
    os.close(fd)
    os.chmod(path, mode)
    return path


async def test_a_host_check_never_asks_for_the_password(password_host, tmp_path):
    """The status page's check of a host whose login needs a password or a one-time code:
    its sshd answering is enough; the command (which may page a person or use up a code) is
    not run, and no login is tried."""
    h = password_host
    ran = tmp_path / "ran"
    right = _secret_file(tmp_path / "right", h.password)
    for addr in (h.addr, h.kbdint_addr):
        config = {
            "host": addr,
            "known_hosts": str(h.known_hosts),
            "password_command": f"sh -c 'echo ran >> {ran}; cat {right}'",
        }
        assert await ssh_backend.SSHProvisioner.reachable(config) == [(addr, "")]
    assert not ran.exists()
    assert h.failures() == 0
    down = {"host": f"{h.user}@127.0.0.1:{free_port()}", "password_command": f"cat {right}"}
    [(_, why)] = await ssh_backend.SSHProvisioner.reachable(down)
    assert "cannot reach" in why or "refused" in why.lower(), why


async def test_password_from_a_command_or_a_file(gateway_factory, password_host, tmp_path):
    h = password_host
    specs, d = tmp_path / "specs", str(tmp_path / "specs")
    right = _secret_file(tmp_path / "right", h.password)
    wrong = _secret_file(tmp_path / "wrong", "not-" + h.password)
    common = ["--host", h.addr, "--known-hosts", str(h.known_hosts), "--dir", d]
    ir = ["--kernel-cmd", IR_CMD, "--language", "R"]
    rkg("spec", "add", "ssh", "pw-cmd", *common, *ir, "--password-command", f"cat {right}")
    rkg("spec", "add", "ssh", "pw-wrong", *common, *ir, "--password-file", str(wrong))
    kb = ["--host", h.kbdint_addr, "--known-hosts", str(h.known_hosts), "--dir", d, *ir]
    rkg("spec", "add", "ssh", "kb-file", *kb, "--password-file", str(right))
    rkg("spec", "add", "ssh", "kb-wrong", *kb, "--password-command", f"cat {wrong}")
    rkg("spec", "add", "ssh", "pw-slow", *common, "--kernel-cmd", HANG_CMD,
        "--password-file", str(right), "--launch-timeout", "3")  # fmt: skip
    loose = _secret_file(tmp_path / "loose", h.password, 0o644)
    no = rkg("spec", "add", "ssh", "pw-loose", *common, "--password-file", str(loose), check=False)
    assert no.returncode == 2 and "mode 0644" in no.stderr and "chmod 600" in no.stderr, no
    assert not (specs / "pw-loose").exists()
    gw = gateway_factory(extra_args=["--kernelspec-dir", d, "--kernel-launch-timeout", "300"])

    for name in ("pw-cmd", "kb-file"):  # password, keyboard-interactive; IRkernel as the user
        model = await start_kernel(gw, name)
        ks = await KernelSocket.open(gw, model["id"], v1=True)
        out, reply = await ks.execute('cat(Sys.getenv("USER"), 6 * 7, "\\n")', timeout=60)
        assert reply["status"] == "ok" and out.split() == [h.user, "42"], (name, out)
        await ks.close()
        assert (await api(gw, "DELETE", f"api/kernels/{model['id']}"))[0] == 204
    assert h.failures() == 0

    status, body = await api(gw, "POST", "api/kernels", {"name": "kb-wrong"})
    assert status == 500 and h.kbdint_addr in body["message"], (status, body)
    assert "the password (the kernelspec's password_command)" in body["message"], body
    assert f"cat {wrong}" not in body["message"]  # a command may hold a secret

    status, body = await api(gw, "POST", "api/kernels", {"name": "pw-wrong"})
    assert status == 500 and isinstance(body, dict), (status, body)
    assert h.addr in body["message"] and "password" in body["message"], body
    assert str(wrong) in body["message"] and "Traceback" not in body["message"]
    assert h.failures() == 1  # tried once: no retry storm

    os.chmod(right, 0o640)  # a spec's file made readable later: refused at start time
    status, body = await api(gw, "POST", "api/kernels", {"name": "pw-slow"})
    assert status == 500 and "mode 0640" in body["message"], (status, body)
    os.chmod(right, 0o600)

    # a hanging kernel ends at the spec's 3 s, not at the gateway's 300 s
    began = time.monotonic()
    status, body = await api(gw, "POST", "api/kernels", {"name": "pw-slow"})
    took = time.monotonic() - began
    assert status == 504 and "3 s (the kernelspec's launch_timeout)" in body["message"], body
    assert 2.5 < took < 15, took
    began = time.monotonic()
    env = {"KERNEL_LAUNCH_TIMEOUT": "2"}
    status, body = await api(gw, "POST", "api/kernels", {"name": "pw-slow", "env": env})
    assert status == 504 and "2 s (KERNEL_LAUNCH_TIMEOUT)" in body["message"], body
    assert 1.5 < time.monotonic() - began < 3 + 10
    assert gw.stop() == 0  # its SSH connections linger a while otherwise
    deadline = time.monotonic() + 10
    while _alive(h.processes()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(h.processes()), [_stat(p) for p in h.processes()]
