"""What a client may choose for its kernel, attacked: KERNEL_WORKING_DIR outside
--working-dir-root (directly, through a symlink, with '..', with a ':' for a mount spec),
KERNEL_UID / KERNEL_GID of root, outside the kernelspec's ranges, or not numbers. Each is
refused with a 403 that says why, before anything is created (no kernel, no container, no
service, no directory); what is allowed still works. Local kernels, and the real dockerd
(tests/dockerinfra.py) for the mounts."""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from jupyter_client.kernelspec import KernelSpec

from backends import docker_spec
from conftest import ROOT
from gateway.backends.docker import DockerProvisioner, chosen_id
from gateway.backends.swarm import task_template
from gateway.errors import Forbidden, KernelStartError
from gwclient import KernelSocket, api, start_kernel

CWD = "import os; print(os.getcwd())"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """The directory kernels may work in (--working-dir-root), and one outside it."""
    (tmp_path / "home" / "work").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    return tmp_path / "home"


async def refused(gw, name: str, env: dict[str, str], status: int = 403) -> str:
    """A start that must be refused with `status` and leave no kernel: its message."""
    code, body = await api(gw, "POST", "api/kernels", {"name": name, "env": env})
    assert code == status, body
    assert set(body) == {"reason", "message"} and "Traceback" not in body["message"], body
    assert (await api(gw, "GET", "api/kernels"))[1] == []
    return str(body["message"])


async def cwd_of(gw, kernel_id: str) -> str:
    ks = await KernelSocket.open(gw, kernel_id, v1=True)
    try:
        out, reply = await ks.execute(CWD, timeout=60)
    finally:
        await ks.close()
    assert reply["status"] == "ok", reply
    return out.strip()


# -- KERNEL_WORKING_DIR, local kernels -------------------------------------------------


@pytest.fixture
def local_gw(gateway_factory, root):
    return gateway_factory(extra_args=["--working-dir-root", str(root)])


def escapes(root: Path) -> dict[str, str]:
    (root / "to-var-run").symlink_to("/var/run")
    (root / "to-outside").symlink_to(root.parent / "outside")
    return {
        "/var/run": "/var/run",
        "/": "/",
        "/etc": "/etc",
        "symlink to /var/run": str(root / "to-var-run"),
        "symlink out of the root": str(root / "to-outside" / "."),
        "dot-dot": f"{root}/work/../../outside",
        "dot-dot to /": f"{root}/" + "../" * 20,
        "the root's parent": str(root.parent),
    }


async def test_working_dirs_outside_the_root_are_refused(local_gw, root):
    for what, path in escapes(root).items():
        message = await refused(local_gw, "python3", {"KERNEL_WORKING_DIR": path})
        assert path in message and str(root) in message, (what, message)
        assert "--working-dir-root" in message, message
    assert local_gw.kernel_pids() == []


@pytest.mark.parametrize(
    ("value", "status", "words"),
    [
        ("{root}/work\n/etc", 400, "line breaks"),
        ("{root}/work\0", 400, "NUL"),
        ("{root}/a:b", 403, "':'"),  # exists, under the root: still no mount-spec separator
        ("{root}/a:b/c:/var/run", 403, "':'"),
    ],
)
async def test_working_dirs_that_would_split_are_refused(local_gw, root, value, status, words):
    (root / "a:b" / "c:" / "var" / "run").mkdir(parents=True)
    env = {"KERNEL_WORKING_DIR": value.format(root=root)}
    message = await refused(local_gw, "python3", env, status)
    assert words in message, message


async def test_a_working_dir_under_the_root_is_the_kernels_cwd(local_gw, root):
    (root / "link").symlink_to(root / "work")  # inside the root: used, as its real path
    for given in (str(root / "work"), str(root / "link"), f"{root}/work/../work"):
        model = await start_kernel(local_gw, env={"KERNEL_WORKING_DIR": given})
        assert await cwd_of(local_gw, model["id"]) == str(root / "work"), given
        assert (await api(local_gw, "DELETE", f"api/kernels/{model['id']}"))[0] == 204


async def test_a_working_dir_that_is_not_here_is_ignored(local_gw, root):
    """jupyter lab --gateway-url sends its own root, from another machine (maybe Windows)."""
    for given in (str(root / "absent"), "/no/such/dir/anywhere", "C:\\Users\\ada\\notebooks"):
        model = await start_kernel(local_gw, env={"KERNEL_WORKING_DIR": given})
        assert await cwd_of(local_gw, model["id"]) != given
        assert (await api(local_gw, "DELETE", f"api/kernels/{model['id']}"))[0] == 204
    assert not (root / "absent").exists()


async def test_the_default_root_is_the_gateway_users_home(gateway_factory, root):
    gw = gateway_factory(env={"HOME": str(root)})
    message = await refused(gw, "python3", {"KERNEL_WORKING_DIR": str(root.parent / "outside")})
    assert str(root) in message, message
    model = await start_kernel(gw, env={"KERNEL_WORKING_DIR": "~/work"})
    assert await cwd_of(gw, model["id"]) == str(root / "work")
    assert (await api(gw, "DELETE", f"api/kernels/{model['id']}"))[0] == 204


# -- the Docker backend: mounts, uid, gid ----------------------------------------------


@pytest.fixture
def docker_gw(gateway_factory, tmp_path, root, docker, kernel_image):
    specs = tmp_path / "kernelspecs"
    base = {"image": kernel_image, "docker_host": docker.host}
    docker_spec(specs, "mirror", **base, mirror_working_dir=True)
    docker_spec(specs, "mirror-rw", **base, mirror_working_dir=True, working_dir_mode="rw")
    docker_spec(specs, "ids", **base, uid_range="1000-1999", gid_range="1000-1999,3000")
    gw = gateway_factory(
        extra_args=["--kernelspec-dir", str(specs), "--working-dir-root", str(root)]
    )
    yield gw
    gw.stop()
    assert docker.ours() == [], "containers left behind"


def container(docker, kernel_id: str) -> dict:
    (name,) = [n for n in docker.ours() if n.endswith(kernel_id)]
    return json.loads(docker.run("docker", "inspect", name).stdout)[0]


async def test_no_host_directory_is_mounted_outside_the_root(docker_gw, docker, root):
    """/var/run would give the kernel the engine's socket: root on the host."""
    for what, path in escapes(root).items():
        message = await refused(docker_gw, "mirror", {"KERNEL_WORKING_DIR": path})
        assert path in message, (what, message)
        assert docker.ours() == []


async def test_an_absent_working_dir_is_neither_mounted_nor_created(docker_gw, docker, root):
    """A bind of a missing source would make it on the host, as root, wherever it names."""
    absent = root.parent / "outside" / "made-by-docker"
    model = await start_kernel(docker_gw, "mirror", env={"KERNEL_WORKING_DIR": str(absent)})
    info = container(docker, model["id"])
    assert info["Mounts"] == [] and not info["HostConfig"]["Binds"], info["Mounts"]
    assert await cwd_of(docker_gw, model["id"]) == "/home/jovyan"  # the image's
    assert not absent.exists()
    assert (await api(docker_gw, "DELETE", f"api/kernels/{model['id']}"))[0] == 204


WRITE = "open('written', 'w').write('x'); print('wrote')"


@pytest.mark.parametrize(("spec", "writable"), [("mirror", False), ("mirror-rw", True)])
async def test_the_mirrored_dir_is_read_only_unless_the_spec_says_rw(
    docker_gw, docker, root, spec, writable
):
    work = root / "work"
    work.chmod(0o777)  # the kernel runs as uid 1000
    (work / "data.txt").write_text("from the host\n")
    model = await start_kernel(docker_gw, spec, env={"KERNEL_WORKING_DIR": str(work)})
    (mount,) = container(docker, model["id"])["Mounts"]
    assert (mount["Source"], mount["Destination"], mount["RW"]) == (str(work), str(work), writable)
    ks = await KernelSocket.open(docker_gw, model["id"], v1=True)
    out, _ = await ks.execute(f"{CWD}; print(open('data.txt').read(), end='')", timeout=60)
    assert out.splitlines() == [str(work), "from the host"]
    out, reply = await ks.execute(WRITE, timeout=60)
    await ks.close()
    if writable:
        assert out == "wrote\n" and (work / "written").exists()
    else:
        assert reply["status"] == "error" and "Read-only file system" in reply["evalue"]
        assert not (work / "written").exists()
    assert (await api(docker_gw, "DELETE", f"api/kernels/{model['id']}"))[0] == 204


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"KERNEL_UID": "0"}, ["uid 0", "prohibited_uids"]),
        ({"KERNEL_GID": "0"}, ["gid 0", "prohibited_gids"]),
        ({"KERNEL_UID": "999"}, ["KERNEL_UID 999", "1000-1999"]),
        ({"KERNEL_UID": "2000"}, ["KERNEL_UID 2000", "1000-1999"]),
        ({"KERNEL_GID": "2999"}, ["KERNEL_GID 2999", "1000-1999, 3000"]),
        ({"KERNEL_UID": "root"}, ["'root'", "whole numbers"]),
        ({"KERNEL_UID": "-1"}, ["'-1'", "whole numbers"]),
        ({"KERNEL_GID": "1e3"}, ["'1e3'", "whole numbers"]),
        ({"KERNEL_UID": "9" * 30}, ["outside", "1000-1999"]),
    ],
    ids=lambda v: json.dumps(v)[:40] if isinstance(v, dict) else None,
)
async def test_ids_a_client_may_not_choose(docker_gw, docker, env, words):
    message = await refused(docker_gw, "ids", env)
    for word in words:
        assert word in message, message
    assert docker.ours() == []


async def test_ids_a_client_may_choose(docker_gw, docker):
    env = {"KERNEL_UID": "1999", "KERNEL_GID": "3000"}
    model = await start_kernel(docker_gw, "ids", env=env)
    assert container(docker, model["id"])["Config"]["User"] == "1999:3000"
    ks = await KernelSocket.open(docker_gw, model["id"], v1=True)
    out, _ = await ks.execute("import os; print(os.getuid(), os.getgid())", timeout=60)
    await ks.close()
    assert out == "1999 3000\n"
    assert (await api(docker_gw, "DELETE", f"api/kernels/{model['id']}"))[0] == 204


# -- Swarm: the mount is structured, never "src:dst" --------------------------------------


@pytest.mark.unit
def test_a_working_dir_is_never_split_into_a_mount_spec():
    """Under another kernel manager (a plain JupyterLab) nothing checked the path: even then
    a ':' in it cannot pick the target, on Docker nor on Swarm."""
    prov = DockerProvisioner(
        kernel_id="k1",
        kernel_spec=KernelSpec(display_name="dk"),
        image="img:1",
        mirror_working_dir=True,
    )
    prov.connection_info = {"key": b"k", "ip": "127.0.0.1", "transport": "tcp"}  # type: ignore[typeddict-item]
    wd = "/home/ada/w:/var/run"
    body = prov.container_config({"KERNEL_WORKING_DIR": wd})
    mount = {"Type": "bind", "Source": wd, "Target": wd, "ReadOnly": True}
    assert body["HostConfig"]["Mounts"] == [mount] and body["HostConfig"]["Binds"] == []
    assert task_template(body, "", [], "")["ContainerSpec"]["Mounts"] == [mount]


async def test_swarm_mounts_the_working_dir_as_given(
    gateway_factory, tmp_path, root, swarm, kernel_image
):
    """The service's mount has the checked path as both source and target, read-only: no
    client text is split into a mount spec (and a ':' never gets that far)."""
    specs = tmp_path / "kernelspecs"
    docker_spec(
        specs,
        "sw",
        provisioner="rkg-swarm",
        image=kernel_image,
        docker_host=swarm.host,
        mirror_working_dir=True,
    )
    gw = gateway_factory(
        extra_args=["--kernelspec-dir", str(specs), "--working-dir-root", str(root)]
    )
    (root / "w:" / "var" / "run").mkdir(parents=True)
    message = await refused(gw, "sw", {"KERNEL_WORKING_DIR": f"{root}/w:/var/run"})
    assert "':'" in message, message
    assert swarm.ours("service") == []
    work = root / "work"
    model = await start_kernel(
        gw, "sw", env={"KERNEL_WORKING_DIR": str(work), "KERNEL_LAUNCH_TIMEOUT": "120"}
    )
    (service,) = swarm.ours("service")
    spec = json.loads(swarm.run("docker", "service", "inspect", service).stdout)[0]["Spec"]
    mounts = spec["TaskTemplate"]["ContainerSpec"]["Mounts"]
    assert mounts == [{"Type": "bind", "Source": str(work), "Target": str(work), "ReadOnly": True}]
    assert (await api(gw, "DELETE", f"api/kernels/{model['id']}"))[0] == 204
    gw.stop()
    assert swarm.ours("service") == []
    assert os.listdir(root / "w:" / "var" / "run") == []


def test_spec_add_writes_the_choices(tmp_path):
    """`rkg spec add docker|swarm` sets what a client may choose and the mount's mode."""
    argv = [sys.executable, "-m", "gateway", "spec", "add", "docker", "d", "--image", "i:1"]
    extra = ["--mirror-working-dir", "--working-dir-rw", "--uid-range", "1000-1999"]
    extra += ["--gid-range", "100,1000-1999", "--dir", str(tmp_path)]
    subprocess.run([*argv, *extra], check=True, capture_output=True, timeout=60)
    spec = json.loads((tmp_path / "d" / "kernel.json").read_text())
    config = spec["metadata"]["kernel_provisioner"]["config"]
    assert config == {
        "image": "i:1",
        "mirror_working_dir": True,
        "working_dir_mode": "rw",
        "uid_range": "1000-1999",
        "gid_range": "100,1000-1999",
    }
    shipped = json.loads((ROOT / "deploy/kernelspecs/docker-python/kernel.json").read_text())
    assert shipped["metadata"]["kernel_provisioner"]["config"]["working_dir_mode"] == "rw"


@pytest.mark.unit
def test_id_choices():
    """docker.chosen_id, the rule the Docker and Swarm backends apply to KERNEL_UID/GID."""
    pick = functools.partial(chosen_id, "uid", own=1000, ranges="1000-1999,3000", spec="s")
    assert [pick(raw, prohibited=[0]) for raw in ("", "1000", "1999", "3000")] == [
        1000,
        1000,
        1999,
        3000,
    ]
    for raw, words in [
        ("0", "prohibited_uids"),
        ("999", "1000-1999, 3000 (its uid_range)"),
        ("2999", "outside"),
        ("-1", "whole numbers"),
        (" 1001", "whole numbers"),
        ("1e3", "whole numbers"),
        ("\u0661\u0660\u0660\u0660", "whole numbers"),  # int() would read these digits
        ("9" * 5000, "outside"),  # past int()'s digit limit
    ]:
        with pytest.raises(Forbidden, match=re.escape(words)):
            pick(raw, prohibited=[0])
    with pytest.raises(Forbidden, match="prohibited_uids"):  # the spec's own uid too
        pick("", prohibited=[1000])
    for bad in ("1000-", "a-b", "2000-1000"):
        with pytest.raises(KernelStartError, match="uid_range"):
            chosen_id("uid", "1001", 1000, bad, [0], "s")
