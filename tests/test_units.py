"""Pure functions, no infrastructure and no subprocess (`./dev test -m unit`): the layers'
imports, the frame codecs (round trips, and random and mutated bytes that must give BadFrame
or a message, never another exception), the client env filter, the SSH launch script and the
Docker container body. Each of them also runs for real in the backend and channel tests; these
say why one broke."""

from __future__ import annotations

import ast
import base64
import hashlib
import hmac
import json
import os
import random
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from jupyter_client.kernelspec import KernelSpec

from gateway import wire
from gateway.backends.docker import CONTAINER_PORTS, DockerProvisioner
from gateway.backends.ssh import SSHProvisioner, launch_script, shell_path
from gateway.bridge import codec
from gateway.errors import BadFrame, BadRequest, Forbidden, KernelStartError
from gateway.kernels import env as kenv

pytestmark = pytest.mark.unit

SEED = 12  # fixed: a failure reproduces


def _message(rng: random.Random, buffers: int = 0) -> list[bytes]:
    header = {
        "msg_id": f"m{rng.randrange(10**6)}",
        "msg_type": "execute_request",
        "session": "s",
        "username": "u",
        "date": "2024-01-01T00:00:00Z",
        "version": "5.3",
    }
    content = {"code": "".join(rng.choice('aé😀"\\\n{}') for _ in range(rng.randrange(40)))}
    parts = [json.dumps(d, ensure_ascii=False).encode() for d in (header, {}, {"m": 1}, content)]
    return parts + [rng.randbytes(rng.randrange(200)) for _ in range(buffers)]


def _decoded(parts: list[bytes]) -> list[object]:
    return [json.loads(p) for p in parts[:4]] + [bytes(b) for b in parts[4:]]


# -- layers: handlers/ and bridge/ -> kernels/ -> state, errors, wire ----------------------

GATEWAY = Path(__file__).resolve().parent.parent / "gateway"


def _gateway_imports(path: Path) -> set[str]:
    """The gateway modules `path` imports (relative imports resolved), at any depth."""
    package = ["gateway", *path.parent.relative_to(GATEWAY).parts]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.update(f"{module}.{a.name}" for a in node.names)
    return {m for m in found if m.startswith("gateway.")}


@pytest.mark.parametrize(
    ("layer", "above"),
    [
        ("kernels", ("gateway.bridge", "gateway.handlers", "gateway.app")),
        ("wire.py", ("gateway.bridge", "gateway.handlers", "gateway.app", "gateway.kernels")),
    ],
)
def test_layers_depend_one_way(layer, above):
    paths = sorted((GATEWAY / layer).glob("*.py")) if layer != "wire.py" else [GATEWAY / layer]
    assert paths
    wrong = {
        f"{p.name} imports {m}" for p in paths for m in _gateway_imports(p) if m.startswith(above)
    }
    assert not wrong


# -- codec round trips -----------------------------------------------------------------


@pytest.mark.parametrize("buffers", [0, 1, 3])
def test_v1_round_trip(buffers):
    rng = random.Random(SEED)
    for channel in ("shell", "iopub", "stdin", "control"):
        parts = _message(rng, buffers)
        frame = codec.v1_from_parts(channel.encode(), parts)
        assert frame == b"".join(codec.v1_pieces(channel.encode(), parts))
        assert codec.parts_from_v1(frame) == (channel, parts)


def test_legacy_text_round_trip_copies_the_ids():
    parts = _message(random.Random(SEED))
    frame, binary = codec.legacy_from_parts(b"iopub", parts)
    assert not binary
    msg = json.loads(frame)
    header = json.loads(parts[0])
    assert (msg["msg_id"], msg["msg_type"]) == (header["msg_id"], header["msg_type"])
    assert msg["channel"] == "iopub" and msg["buffers"] == []
    channel, back = codec.parts_from_legacy_text(frame)
    assert channel == "iopub" and _decoded(back) == _decoded(parts)


@pytest.mark.parametrize("binary_ok", [True, False])
def test_legacy_buffers_round_trip(binary_ok):
    parts = _message(random.Random(SEED), buffers=3)
    frame, binary = codec.legacy_from_parts(b"shell", parts, binary_ok=binary_ok)
    assert binary is binary_ok
    if binary_ok:
        channel, back = codec.parts_from_legacy_binary(frame)
    else:
        assert json.loads(frame)["buffers"] == [base64.b64encode(b).decode() for b in parts[4:]]
        channel, back = codec.parts_from_legacy_text(frame)
    assert channel == "shell" and _decoded(back) == _decoded(parts)


def test_legacy_without_channel_goes_to_shell():
    frame = json.dumps({"header": {"msg_type": "kernel_info_request"}})
    channel, parts = codec.parts_from_legacy_text(frame)
    assert channel == "shell" and [json.loads(p) for p in parts[1:]] == [{}, {}, {}]


def test_zmq_round_trip_and_signature():
    parts = _message(random.Random(SEED), buffers=2)
    key = b"secret"
    frames: list[wire.Part] = [b"ident", *wire.zmq_from_parts(key, parts)]
    assert wire.parts_from_zmq(frames) == parts
    expected = hmac.new(key, b"".join(parts[:4]), hashlib.sha256).hexdigest().encode()
    assert frames[2] == expected
    assert wire.zmq_from_parts(b"", parts)[1] == b""  # no key, no signature


def test_status_parts():
    header, parent, metadata, content = wire.status_parts("restarting", session="s1")
    assert json.loads(header)["msg_type"] == "status" and json.loads(header)["session"] == "s1"
    assert json.loads(content) == {"execution_state": "restarting"}
    assert json.loads(parent) == json.loads(metadata) == {}


# -- codec fuzz: anything a client sends is a message or a BadFrame ----------------------


def _mutations(rng: random.Random, frame: bytes, count: int) -> list[bytes]:
    """Random bytes, truncations, flipped bytes and spliced garbage around a valid frame."""
    out = [b"", rng.randbytes(3), rng.randbytes(9)]
    for _ in range(count):
        kind = rng.randrange(4)
        if kind == 0:
            out.append(rng.randbytes(rng.randrange(64)))
        elif kind == 1:
            out.append(frame[: rng.randrange(len(frame))])
        elif kind == 2:
            b = bytearray(frame)
            for _ in range(rng.randrange(1, 4)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            out.append(bytes(b))
        else:
            i = rng.randrange(len(frame))
            out.append(frame[:i] + rng.randbytes(rng.randrange(16)) + frame[i:])
    return out


def _parses_or_refuses(parse, frame) -> None:
    try:
        channel, parts = parse(frame)
    except codec.BadFrame:
        return
    assert isinstance(channel, str) and len(parts) >= 4


def test_fuzz_v1():
    rng = random.Random(SEED)
    valid = codec.v1_from_parts(b"shell", _message(rng, buffers=2))
    for frame in _mutations(rng, valid, 3000):
        _parses_or_refuses(codec.parts_from_v1, frame)


def test_fuzz_legacy_binary():
    rng = random.Random(SEED)
    valid, _ = codec.legacy_from_parts(b"shell", _message(rng, buffers=2))
    for frame in _mutations(rng, valid, 3000):
        _parses_or_refuses(codec.parts_from_legacy_binary, frame)


def test_fuzz_legacy_text():
    rng = random.Random(SEED)
    valid, _ = codec.legacy_from_parts(b"shell", _message(rng, buffers=2), binary_ok=False)
    for frame in _mutations(rng, valid, 3000):
        _parses_or_refuses(codec.parts_from_legacy_text, frame)
        try:
            text = frame.decode()
        except UnicodeDecodeError:
            continue
        _parses_or_refuses(codec.parts_from_legacy_text, text)


def test_fuzz_zmq():
    rng = random.Random(SEED)
    parts = _message(rng)
    for _ in range(2000):
        frames: list[wire.Part] = [rng.randbytes(rng.randrange(8)) for _ in range(rng.randrange(8))]
        if rng.random() < 0.5:
            frames.insert(rng.randrange(len(frames) + 1), wire.DELIMITER)
        try:
            out = wire.parts_from_zmq(frames)
        except BadFrame:
            continue
        assert len(out) >= 4
    assert wire.parts_from_zmq([wire.DELIMITER, b"sig", *parts]) == parts


# -- the client's env (gateway/kernels/env.py) -------------------------------------------


def test_client_env_keeps_kernel_and_allowed_names_only():
    asked = {
        "KERNEL_USERNAME": "al",
        "ALLOWED": "1",
        "OTHER": "2",
        "PATH": "/evil",
        "LD_PRELOAD": "x.so",
    }
    assert kenv.client_env(asked, ["ALLOWED", "PATH"]) == {"KERNEL_USERNAME": "al", "ALLOWED": "1"}
    assert kenv.client_env(None, ["ALLOWED"]) == {}


@pytest.mark.parametrize(
    "bad", [["KERNEL_X"], "KERNEL_X=1", {"KERNEL_X": 1}, {"KERNEL_X": None}, {1: "x"}]
)
def test_client_env_refuses_what_is_not_strings(bad):
    with pytest.raises(BadRequest):
        kenv.client_env(bad, [])


def test_launch_timeout():
    assert kenv.launch_timeout({}, 60.0) == 60.0
    assert kenv.launch_timeout({"KERNEL_LAUNCH_TIMEOUT": "2.5"}, 60.0) == 2.5
    for raw in ("soon", "0", "-1", "86401", "nan"):
        with pytest.raises(BadRequest, match="KERNEL_LAUNCH_TIMEOUT"):
            kenv.launch_timeout({"KERNEL_LAUNCH_TIMEOUT": raw}, 60.0)


def test_working_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "w").mkdir()
    root = kenv.working_dir_root("")  # HOME's
    assert kenv.working_dir({"KERNEL_WORKING_DIR": str(tmp_path / "w")}, root) == root + "/w"
    assert kenv.working_dir({"KERNEL_WORKING_DIR": "~/w"}, root) == root + "/w"
    assert kenv.working_dir({"KERNEL_WORKING_DIR": str(tmp_path / "absent")}, root) is None
    assert kenv.working_dir({}, root) is None


def test_launch_request(tmp_path):
    asked = {"KERNEL_LAUNCH_TIMEOUT": "5", "KERNEL_WORKING_DIR": str(tmp_path), "OTHER": "x"}
    request = kenv.LaunchRequest.from_client(asked, [], 60.0, str(tmp_path))
    assert request.env == {k: v for k, v in asked.items() if k.startswith("KERNEL_")}
    assert (request.timeout, request.cwd) == (5.0, str(tmp_path))
    assert kenv.LaunchRequest.from_client(None, [], 60.0) == kenv.LaunchRequest({}, 60.0, None)


# -- the SSH launch script (gateway/backends/ssh.py) -------------------------------------


def test_shell_path():
    assert shell_path("~") == '"$HOME"'
    assert shell_path("~/my dir/k.json") == '"$HOME"/' + shlex.quote("my dir/k.json")
    assert shell_path("/tmp/a b") == "'/tmp/a b'"
    assert shell_path("~user/x") == "'~user/x'"  # only our own home is expanded


def _remote_provisioner(parent: object) -> SSHProvisioner:
    from jupyter_client.kernelspec import KernelSpec

    spec = KernelSpec(
        argv=["python3"], display_name="x", language="python", env={"FROM_SPEC": "{resource_dir}"}
    )
    return SSHProvisioner(
        kernel_id="k1", kernel_spec=spec, parent=parent, host="h", env={"FROM_CONFIG": "2"}
    )


def test_remote_kernel_env_is_what_the_client_spec_and_config_set(monkeypatch):
    """The launch env is this process's whole environment (jupyter_client's contract): a
    remote kernel gets only what the client set (handed over by the kernel manager), the
    kernelspec's names and the config's env, never the gateway's own (its token)."""
    from gateway.backends.contract import GatewayKernelManager

    monkeypatch.setenv("RKG_TOKEN", "secret")
    monkeypatch.setenv("KERNEL_OF_THE_GATEWAY", "not the client's")
    km = GatewayKernelManager(
        client_env={"KERNEL_USERNAME": "ada", "ALLOWED": "1", "KERNEL_ID": "k1", "BAD-NAME": "x"},
        launch_timeout=7,
    )
    prov = _remote_provisioner(km)
    launch = {**os.environ, "FROM_SPEC": "/res", "KERNEL_USERNAME": "ada", "ALLOWED": "1"}
    assert prov._env(launch) == {
        "KERNEL_USERNAME": "ada",
        "ALLOWED": "1",
        "KERNEL_ID": "k1",
        "FROM_SPEC": "/res",
        "FROM_CONFIG": "2",
    }
    assert prov.gateway_timeout({"KERNEL_LAUNCH_TIMEOUT": "99"}, 60) == 7


def test_remote_kernel_env_under_a_plain_kernel_manager():
    """The same kernelspec in a plain JupyterLab: KERNEL_* of the launch env are the
    client's, and its KERNEL_LAUNCH_TIMEOUT counts."""
    from jupyter_client.manager import AsyncKernelManager

    prov = _remote_provisioner(AsyncKernelManager())
    launch = {
        "PATH": "/bin",
        "RKG_TOKEN": "secret",
        "KERNEL_USERNAME": "ada",
        "FROM_SPEC": "/res",
        "KERNEL_LAUNCH_TIMEOUT": "40",
    }
    assert prov._env(launch) == {
        "KERNEL_USERNAME": "ada",
        "KERNEL_LAUNCH_TIMEOUT": "40",
        "FROM_SPEC": "/res",
        "FROM_CONFIG": "2",
    }
    assert prov.gateway_timeout(launch, 60) == 40
    assert prov.gateway_timeout({}, 60) == 60


def _script(**kw: object) -> list[str]:
    args: dict = {
        "cmd": ["python3", "-m", "ipykernel_launcher", "-f", "/rt/k 1.json"],
        "ports": [16384, 16385, 20000, 20001, 32767],
        "log_file": "~/rt/k.log",
        "env": {},
        "workdir": "",
        "kernel_workdir": "",
        "pre_command": "",
        "steps": 40,
    }
    return launch_script(**args | kw).splitlines()


def test_launch_script_runs_the_kernel_detached_and_waits():
    lines = _script(env={"B": "2", "A": "x y'z"})
    assert lines[0] == "umask 077"
    assert lines[1:3] == ["export A=" + shlex.quote("x y'z"), "export B=2"]
    launch = next(line for line in lines if line.startswith("pid="))
    assert "setsid python3 -m ipykernel_launcher -f '/rt/k 1.json'" in launch
    assert '>>"$HOME"/rt/k.log 2>&1 &' in launch
    assert "while [ $i -lt 40 ]; do" in lines and lines[-1] == "echo TIMEOUT"
    assert not any(line.startswith("cd ") for line in lines)


def test_launch_script_working_directories():
    assert _script(workdir="~/work dir")[1] == (
        """cd "$HOME"/'work dir' || { echo 'NOWORKDIR'; exit 0; }"""
    )
    lines = _script(workdir="/w", kernel_workdir="/k d")
    assert lines[1:4] == [
        "if [ -d '/k d' ]; then cd '/k d'",
        "elif [ -n /w ]; then cd /w || exit 3",
        "fi",
    ]


def test_launch_script_pre_command():
    lines = _script(pre_command="module load cuda")
    assert lines[1] == "{ module load cuda"
    assert lines[2].endswith("|| { echo PREFAILED; exit 0; }")


# -- the Docker container body (gateway/backends/docker.py) ------------------------------


def _docker(**config: object) -> DockerProvisioner:
    """A provisioner as the kernel manager makes one, before launch: no engine is touched."""
    prov = DockerProvisioner(
        kernel_id="k1", kernel_spec=KernelSpec(display_name="dk"), **{"image": "img:1"} | config
    )
    prov.connection_info = {
        # bytes, as jupyter_client's KernelManager gives it (its TypedDict says str)
        "key": b"abc",  # type: ignore[typeddict-item]
        "ip": "127.0.0.1",
        "transport": "tcp",
        "signature_scheme": "hmac-sha256",
        "shell_port": 1,
    }
    return prov


def test_container_config():
    body = _docker(
        env={"FROM_CONFIG": "1"},
        memory="512m",
        cpus=1.5,
        pids_limit=64,
        volumes=["/d:/d:ro"],
        mirror_working_dir=True,
        labels={"team": "ml"},
    ).container_config({"KERNEL_USERNAME": "al", "KERNEL_WORKING_DIR": "/w", "KERNEL_UID": "1001"})
    env = dict(e.split("=", 1) for e in body["Env"])
    info = json.loads(env.pop("RKG_CONNECTION_INFO"))
    assert info["key"] == "abc" and info["ip"] == "0.0.0.0"  # the container's own namespace
    assert {info[f"{ch}_port"] for ch in CONTAINER_PORTS} == set(CONTAINER_PORTS.values())
    assert env == {
        "FROM_CONFIG": "1",
        "KERNEL_ID": "k1",
        "KERNEL_UID": "1001",
        "KERNEL_USERNAME": "al",
        "KERNEL_WORKING_DIR": "/w",
        "RKG_CONNECTION_FILE": "/tmp/rkg-kernel-k1.json",
    }
    assert body["Cmd"][-2:] == ["-f", "/tmp/rkg-kernel-k1.json"]
    assert body["User"] == "1001:100" and body["WorkingDir"] == "/w"
    assert body["Labels"]["team"] == "ml" and body["Labels"]["kernel_id"] == "k1"
    host = body["HostConfig"]
    assert host["Binds"] == ["/d:/d:ro"]  # the operator's; the client's dir is a structured mount
    assert host["Mounts"] == [{"Type": "bind", "Source": "/w", "Target": "/w", "ReadOnly": True}]
    assert (host["NanoCpus"], host["Memory"], host["PidsLimit"]) == (1_500_000_000, 2**29, 64)
    assert all(
        b == [{"HostIp": "127.0.0.1", "HostPort": ""}] for b in host["PortBindings"].values()
    )


def test_container_config_refusals():
    with pytest.raises(KernelStartError, match="names no image"):
        _docker(image="").container_config({})
    with pytest.raises(KernelStartError, match="reach"):
        _docker(reach="nowhere").container_config({})
    with pytest.raises(Forbidden, match="uid 0"):
        _docker().container_config({"KERNEL_UID": "0"})
    with pytest.raises(Forbidden, match="numbers"):
        _docker().container_config({"KERNEL_UID": "root"})


def test_container_network_reach():
    body = _docker(reach="network", network="kernels").container_config({})
    assert body["HostConfig"]["NetworkMode"] == "kernels"
    assert "PortBindings" not in body["HostConfig"]
    assert "KERNEL_ID=k1" in body["Env"] and not os.path.isabs(body["Cmd"][0])


@pytest.mark.parametrize(("keep_mb", "kept"), [(64, True), (0, False)])
def test_freed_large_blocks_are_kept_for_reuse(keep_mb, kept):
    """--malloc-keep-mb: a freed 40 MiB block stays in the process (glibc reuses it for the
    next large message) instead of being unmapped; 0 leaves glibc's default."""
    code = (
        "import ctypes, gateway.app as app\n"
        f"app.keep_large_blocks({keep_mb})\n"
        "libc = ctypes.CDLL(None); libc.malloc.restype = ctypes.c_void_p\n"
        "def rss(): return int(open('/proc/self/statm').read().split()[1]) * 4096\n"
        "before = rss(); p = libc.malloc(40 << 20); ctypes.memset(p, 1, 40 << 20)\n"
        "libc.free(ctypes.c_void_p(p)); print(rss() - before)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    grown = int(out.stdout)
    assert (grown > 30 << 20) == kept, grown
