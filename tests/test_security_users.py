"""Users, ownership and who may start what (gateway/users.py), attacked: user B goes after
user A's kernels, sessions and websocket, claims A's KERNEL_USERNAME, starts kernelspecs B is
not authorized for, and reads provisioner config and kernel.json; each attempt is refused.
Users are made with the real `rkg token` command against the running gateway's database."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets

from conftest import GatewayProcess, _cleanup, eventually, free_port
from gwclient import KernelSocket, api

PYTHON_ARGV = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
SECRETS = ("me@secret-host", "/secret/id_ed25519", "DB_PASSWORD", "EG-SECRET", "hunter2")


def _spec(directory: Path, name: str, metadata: dict[str, Any], files: tuple[str, ...] = ()):
    (directory / name).mkdir(parents=True)
    spec = {"argv": PYTHON_ARGV, "display_name": name, "language": "python", "metadata": metadata}
    (directory / name / "kernel.json").write_text(json.dumps(spec))
    for fname in files:
        (directory / name / fname).write_text(f"{name}/{fname}")


def make_specs(directory: Path) -> Path:
    _spec(
        directory,
        "only-alice",
        {
            "kernel_provisioner": {
                "provisioner_name": "rkg-local",
                "config": {"authorized_users": ["alice"]},
            }
        },
        files=("logo-64x64.png", "logo-svg.svg", "kernel.js", "kernel.css", "notes.txt"),
    )
    # local kernels run as the gateway's user: for non-admins only where the spec names them
    _spec(
        directory,
        "shared-local",
        {
            "kernel_provisioner": {
                "provisioner_name": "rkg-local",
                "config": {"authorized_users": "alice, bob, carol"},
            }
        },
    )
    # written for Enterprise Gateway: the lists (a string) in process_proxy.config
    _spec(
        directory,
        "eg-style",
        {
            "process_proxy": {
                "class_name": "enterprise_gateway.services.processproxies.ProcessProxy",
                "config": {"authorized_users": "alice, carol", "remote_hosts": "EG-SECRET"},
            }
        },
    )
    _spec(
        directory,
        "secret-ssh",
        {
            "kernel_provisioner": {
                "provisioner_name": "rkg-ssh",
                "config": {
                    "host": "me@secret-host:2222",
                    "identity_file": "/secret/id_ed25519",
                    "env": {"DB_PASSWORD": "hunter2"},
                },
            }
        },
    )
    return directory


def rkg_token(gw: GatewayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    assert gw.workdir is not None
    db = gw.workdir / f"state-{gw.port}.sqlite"
    return subprocess.run(
        [sys.executable, "-m", "gateway", "token", *args, "--state-db", str(db)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def add_user(gw: GatewayProcess, name: str, *extra: str) -> str:
    done = rkg_token(gw, "add", name, *extra)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """One gateway, its users added with `rkg token add` while it runs."""
    workdir = tmp_path_factory.mktemp("users")
    specs = make_specs(workdir / "specs")
    gw = GatewayProcess(
        port=free_port(),
        token=secrets.token_hex(16),
        workdir=workdir,
        extra_args=["--kernelspec-dir", str(specs), "--default-kernel", "shared-local"],
        # the user lists must not reach the provisioner: traitlets warns of unknown options
        # now, and will refuse them
        env={"PYTHONWARNINGS": "error:Passing unrecognized arguments:DeprecationWarning"},
    )
    gw.start()
    yield gw
    leftovers = _cleanup(gw)
    assert not leftovers, f"kernel processes left behind: {leftovers}"


@pytest.fixture(scope="module")
def alice(gw: GatewayProcess) -> str:
    return add_user(gw, "alice")


@pytest.fixture(scope="module")
def bob(gw: GatewayProcess) -> str:
    return add_user(gw, "bob")


async def start_as(gw: GatewayProcess, token: str, name: str = "shared-local", **body: Any) -> Any:
    status, model = await api(gw, "POST", "api/kernels", {"name": name, **body}, token=token)
    assert status == 201, model
    return model


def missing(status: int, body: Any, what: str) -> None:
    """The answer a missing id gets: 404, the same message."""
    assert status == 404, body
    assert body["message"] == f"no {what}", body


# -- `rkg token` ----------------------------------------------------------------------------


def test_token_command(gw, alice):
    listed = rkg_token(gw, "list")
    assert listed.returncode == 0, listed.stderr
    assert "alice\tuser\t" in listed.stdout
    assert alice not in listed.stdout and alice not in gw.log()
    again = rkg_token(gw, "add", "alice")
    assert again.returncode == 2 and "exists" in again.stderr
    for bad in ("admin", "Alice", "a b", "../x", "x" * 40):
        refused = rkg_token(gw, "add", bad)
        assert refused.returncode == 2 and "BadRequest" in refused.stderr, (bad, refused)
    gone = rkg_token(gw, "remove", "nobody")
    assert gone.returncode == 2 and "no user named 'nobody'" in gone.stderr


async def test_a_removed_token_stops_working_without_a_restart(gw):
    token = add_user(gw, "carol")
    assert (await api(gw, "GET", "api/kernels", token=token))[0] == 200
    assert rkg_token(gw, "remove", "carol").returncode == 0

    async def refused() -> bool:
        return (await api(gw, "GET", "api/kernels", token=token))[0] == 403

    await eventually(refused, timeout=10)


async def test_an_admin_token_made_by_rkg_token_sees_all(gw, alice):
    root = add_user(gw, "ops", "--admin")
    kernel = await start_as(gw, alice)
    try:
        status, listed = await api(gw, "GET", "api/kernels", token=root)
        assert status == 200 and kernel["id"] in [k["id"] for k in listed]
        assert (await api(gw, "GET", f"api/kernels/{kernel['id']}", token=root))[0] == 200
    finally:
        assert (await api(gw, "DELETE", f"api/kernels/{kernel['id']}", token=root))[0] == 204


# -- ownership -------------------------------------------------------------------------------


async def test_another_users_kernel_is_not_there(gw, alice, bob):
    kernel = await start_as(gw, alice)
    kid = kernel["id"]
    assert kernel["gateway"]["user"] == "alice"  # KERNEL_USERNAME: the user's name
    try:
        status, listed = await api(gw, "GET", "api/kernels", token=bob)
        assert status == 200 and kid not in [k["id"] for k in listed]
        what = f"kernel with id {kid}"
        missing(*await api(gw, "GET", f"api/kernels/{kid}", token=bob), what)
        missing(*await api(gw, "POST", f"api/kernels/{kid}/interrupt", token=bob), what)
        missing(*await api(gw, "POST", f"api/kernels/{kid}/restart", token=bob), what)
        missing(*await api(gw, "DELETE", f"api/kernels/{kid}", token=bob), what)
        with pytest.raises(websockets.InvalidStatus) as refused:
            await KernelSocket.open(gw, kid, token=bob)
        assert refused.value.response.status_code == 404
        # and through the status page: not a kernel of bob's
        status, page = await api(gw, "GET", "api/status", token=bob)
        assert status == 200 and page["admin"] is False and page["hosts"] == []
        assert kid not in [k["id"] for k in page["kernels"]]
        # the owner and the admin still have it, untouched
        status, mine = await api(gw, "GET", f"api/kernels/{kid}", token=alice)
        assert status == 200 and mine["execution_state"] != "dead"
        status, listed = await api(gw, "GET", "api/kernels")
        assert kid in [k["id"] for k in listed]
        status, page = await api(gw, "GET", "api/status")
        assert page["admin"] is True and kid in [k["id"] for k in page["kernels"]]
    finally:
        assert (await api(gw, "DELETE", f"api/kernels/{kid}", token=alice))[0] == 204


async def test_another_users_sessions_are_not_there(gw, alice, bob):
    status, a_session = await api(
        gw, "POST", "api/sessions", {"path": "shared.ipynb", "type": "notebook"}, token=alice
    )
    assert status == 201, a_session
    sid, kid = a_session["id"], a_session["kernel"]["id"]
    try:
        # the same path: bob gets a session (and kernel) of his own, not alice's
        status, b_session = await api(
            gw, "POST", "api/sessions", {"path": "shared.ipynb", "type": "notebook"}, token=bob
        )
        assert status == 201 and b_session["id"] != sid and b_session["kernel"]["id"] != kid
        status, listed = await api(gw, "GET", "api/sessions", token=bob)
        assert [s["id"] for s in listed] == [b_session["id"]]
        what = f"session with id {sid}"
        missing(*await api(gw, "GET", f"api/sessions/{sid}", token=bob), what)
        missing(*await api(gw, "PATCH", f"api/sessions/{sid}", {"path": "x"}, token=bob), what)
        missing(*await api(gw, "DELETE", f"api/sessions/{sid}", token=bob), what)
        # naming alice's kernel: in a new session, or by moving his own onto it
        body = {"path": "other.ipynb", "type": "notebook", "kernel": {"id": kid}}
        missing(*await api(gw, "POST", "api/sessions", body, token=bob), f"kernel with id {kid}")
        patch = {"kernel": {"id": kid}}
        status, body = await api(gw, "PATCH", f"api/sessions/{b_session['id']}", patch, token=bob)
        missing(status, body, f"kernel with id {kid}")
        # alice's session is as it was
        status, still = await api(gw, "GET", f"api/sessions/{sid}", token=alice)
        assert status == 200 and still["path"] == "shared.ipynb" and still["kernel"]["id"] == kid
        status, again = await api(gw, "POST", "api/sessions", {"path": "shared.ipynb"}, token=alice)
        assert status == 201 and again["id"] == sid
        status, listed = await api(gw, "GET", "api/sessions")  # the admin sees both
        assert {sid, b_session["id"]} <= {s["id"] for s in listed}
        # but a path is per user: the admin's POST of it is a session of the admin's own
        body = {"path": "shared.ipynb", "kernel": {"name": "python3"}}
        status, admins = await api(gw, "POST", "api/sessions", body)
        assert status == 201 and admins["id"] not in (sid, b_session["id"])
        assert (await api(gw, "DELETE", f"api/sessions/{admins['id']}"))[0] == 204
        assert (await api(gw, "DELETE", f"api/sessions/{b_session['id']}", token=bob))[0] == 204
    finally:
        assert (await api(gw, "DELETE", f"api/sessions/{sid}", token=alice))[0] == 204


async def test_a_session_id_reused_by_another_user_takes_nothing_over(gw, alice):
    """Only an admin reaches another's kernel; with the owner's session_id it gets a session
    of its own: the owner's socket stays attached and gets its replies, and the admin's
    socket sees none of them."""
    kernel = await start_as(gw, alice)
    owner = await KernelSocket.open(gw, kernel["id"], token=alice, session="shared-sid")
    admin = None
    try:
        await owner.execute("1")  # attached and answering
        admin = await KernelSocket.open(gw, kernel["id"], session="shared-sid")
        out, reply = await owner.execute("print('only-for-alice')")
        assert reply["status"] == "ok" and out == "only-for-alice\n"
        # the admin's socket is a client of its own: it gets iopub (that is broadcast), but
        # not alice's shell reply, and its own request is answered to it alone
        mine = await admin.send("kernel_info_request", {})
        got = await admin.until(
            lambda m: (
                m["parent_header"].get("msg_id") == mine
                and m["header"]["msg_type"] == "kernel_info_reply"
            )
        )
        assert not [m for m in got if m["header"]["msg_type"] == "execute_reply"]
        _, again = await owner.execute("2")  # alice's socket was not displaced
        assert again["status"] == "ok"
    finally:
        for ks in (owner, admin):
            if ks is not None:
                await ks.close()
        assert (await api(gw, "DELETE", f"api/kernels/{kernel['id']}"))[0] == 204


# -- KERNEL_USERNAME and who may start what --------------------------------------------------


async def test_a_user_cannot_claim_another_kernel_username(gw, alice, bob):
    env = {"KERNEL_USERNAME": "alice"}
    body = {"name": "shared-local", "env": env}
    status, body = await api(gw, "POST", "api/kernels", body, token=bob)
    assert status == 403, body
    assert "'bob'" in body["message"] and "'alice'" in body["message"]
    status, body = await api(
        gw,
        "POST",
        "api/sessions",
        {"path": "p", "kernel": {"name": "shared-local"}, "env": env},
        token=bob,
    )
    assert status == 403, body
    status, listed = await api(gw, "GET", "api/kernels")
    assert listed == [] or all(k["gateway"]["user"] != "alice" for k in listed)


@pytest.mark.parametrize("spec", ["only-alice", "eg-style"])
async def test_a_user_not_authorized_for_a_kernelspec_is_refused(gw, alice, bob, spec):
    status, body = await api(gw, "POST", "api/kernels", {"name": spec}, token=bob)
    assert status == 403, body
    assert "'bob'" in body["message"] and repr(spec) in body["message"]
    body = {"path": f"{spec}.ipynb", "kernel": {"name": spec}}
    status, body = await api(gw, "POST", "api/sessions", body, token=bob)
    assert status == 403 and "'bob'" in body["message"], body
    # the admin too, unless it starts the kernel as an authorized user (as EG allows)
    assert (await api(gw, "POST", "api/kernels", {"name": spec}))[0] == 403
    kernel = await start_as(gw, gw.token, spec, env={"KERNEL_USERNAME": "alice"})
    assert (await api(gw, "DELETE", f"api/kernels/{kernel['id']}"))[0] == 204
    kernel = await start_as(gw, alice, spec)
    assert (await api(gw, "DELETE", f"api/kernels/{kernel['id']}", token=alice))[0] == 204


async def test_local_kernels_are_for_admins_unless_the_spec_names_the_user(gw, alice):
    """A local kernel runs as the gateway's system user: it could read the state database and
    the gateway's environment. A non-admin may start one only where the spec names them."""
    for where in ("api/kernels", "api/sessions"):
        body = {"name": "python3", "path": "local.ipynb", "kernel": {"name": "python3"}}
        status, body = await api(gw, "POST", where, body, token=alice)
        assert status == 403, body
        assert "'alice'" in body["message"] and "gateway's own system user" in body["message"]
    kernel = await start_as(gw, gw.token, "python3")  # the admin may
    assert (await api(gw, "DELETE", f"api/kernels/{kernel['id']}"))[0] == 204
    kernel = await start_as(gw, alice, "shared-local")  # and the spec may name users
    assert (await api(gw, "DELETE", f"api/kernels/{kernel['id']}", token=alice))[0] == 204


def test_jobs_submitted_here_run_as_the_gateway_user_and_from_a_login_node_do_not():
    from gateway.backends.batch import BatchProvisioner
    from gateway.backends.ssh import SSHProvisioner

    assert BatchProvisioner.as_gateway_user({"scheduler": "slurm"})
    assert not BatchProvisioner.as_gateway_user({"scheduler": "slurm", "login": "me@login1"})
    assert not SSHProvisioner.as_gateway_user({"host": "me@gpu1"})


async def test_root_is_refused_by_default(gw):
    env = {"KERNEL_USERNAME": "root"}
    status, body = await api(gw, "POST", "api/kernels", {"name": "python3", "env": env})
    assert status == 403 and "'root'" in body["message"], body


# -- what clients may read of kernelspecs ----------------------------------------------------


async def test_kernelspecs_show_no_provisioner_config(gw, bob):
    status, listing = await api(gw, "GET", "api/kernelspecs", token=bob)
    assert status == 200
    text = json.dumps(listing)
    for secret in SECRETS:
        assert secret not in text
    ssh = listing["kernelspecs"]["secret-ssh"]["spec"]["metadata"]
    assert ssh == {"rkg": {"backend": "ssh", "host": "secret-host:2222"}}  # no user name
    eg = listing["kernelspecs"]["eg-style"]["spec"]["metadata"]
    assert eg == {"rkg": {"backend": "local", "host": ""}}
    for name in ("secret-ssh", "eg-style", "only-alice"):
        status, one = await api(gw, "GET", f"api/kernelspecs/{name}", token=bob)
        assert (
            status == 200
            and one["spec"]["metadata"] == listing["kernelspecs"][name]["spec"]["metadata"]
        )
        for secret in SECRETS:
            assert secret not in json.dumps(one)


@pytest.mark.parametrize(
    ("path", "served"),
    [
        ("logo-64x64.png", True),
        ("logo-svg.svg", True),
        ("kernel.js", True),
        ("kernel.css", True),
        ("kernel.json", False),
        ("notes.txt", False),
        ("..%2Feg-style%2Fkernel.json", False),
    ],
)
async def test_the_resource_route_serves_only_logos_and_kernel_js_css(gw, bob, path, served):
    status, body = await api(gw, "GET", f"kernelspecs/only-alice/{path}", token=bob)
    if served:
        assert status == 200 and body == f"only-alice/{path}".encode(), body
    else:
        assert status == 404, body
        assert "authorized_users" not in json.dumps(body)


# -- --allowed-kernelspecs -------------------------------------------------------------------


async def test_allowed_kernelspecs_hide_the_others(gateway_factory, tmp_path):
    specs = make_specs(tmp_path / "specs")
    gw = gateway_factory(
        extra_args=[
            "--kernelspec-dir",
            str(specs),
            "--allowed-kernelspecs",
            "eg-style",
            "--default-kernel",
            "eg-style",
        ]
    )
    status, listing = await api(gw, "GET", "api/kernelspecs")
    assert status == 200 and listing["default"] == "eg-style"
    assert list(listing["kernelspecs"]) == ["eg-style"]
    for name in ("python3", "secret-ssh"):
        assert (await api(gw, "GET", f"api/kernelspecs/{name}"))[0] == 404
        status, body = await api(gw, "POST", "api/kernels", {"name": name})
        assert status == 404 and body["message"] == f"no kernelspec named {name!r}"
    assert (await api(gw, "GET", "kernelspecs/only-alice/kernel.js"))[0] == 404


def test_a_default_kernel_that_is_not_allowed_stops_the_gateway(gateway_factory):
    gw = gateway_factory(extra_args=["--allowed-kernelspecs", "envdump"], start=False)
    with pytest.raises(RuntimeError, match="--default-kernel 'python3' is not among"):
        gw.start()


# -- across a gateway restart ----------------------------------------------------------------


async def test_ownership_survives_a_gateway_restart(gateway_factory, tmp_path):
    specs = make_specs(tmp_path / "specs")
    gw = gateway_factory(
        extra_args=[
            *("--keep-kernels", "--kernelspec-dir", str(specs)),
            *("--default-kernel", "shared-local"),
        ]
    )
    alice, bob = add_user(gw, "alice"), add_user(gw, "bob")
    kernel = await start_as(gw, alice)
    kid = kernel["id"]
    try:
        assert gw.stop() == 0
        gw.start()
        missing(*await api(gw, "GET", f"api/kernels/{kid}", token=bob), f"kernel with id {kid}")
        status, mine = await api(gw, "GET", f"api/kernels/{kid}", token=alice)
        assert status == 200 and mine["gateway"]["user"] == "alice"
    finally:
        assert (await api(gw, "DELETE", f"api/kernels/{kid}", token=alice))[0] == 204


def test_rkg_spec_add_writes_the_user_lists(tmp_path):
    for backend, args in (
        ("ssh", ["--host", "me@gpu1"]),
        ("slurm", []),
        ("docker", ["--image", "python:3.12"]),
    ):
        added = subprocess.run(
            [
                *(sys.executable, "-m", "gateway", "spec", "add", backend, f"k-{backend}"),
                *args,
                *("--authorized-users", "alice, bob", "--unauthorized-users", "eve"),
                *("--dir", str(tmp_path)),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert added.returncode == 0, added.stderr
        spec = json.loads((tmp_path / f"k-{backend}" / "kernel.json").read_text())
        config = spec["metadata"]["kernel_provisioner"]["config"]
        assert config["authorized_users"] == ["alice", "bob"], backend
        assert config["unauthorized_users"] == ["eve"], backend


async def test_a_working_dir_root_per_user(gateway_factory, tmp_path):
    """`--working-dir-root ROOT/{user}`: each user's kernels work (mount, sync) only under
    their own folder; an admin under ROOT."""
    specs = make_specs(tmp_path / "specs")
    root = tmp_path / "homes"
    for who in ("alice", "bob"):
        (root / who / "nb").mkdir(parents=True)
    gw = gateway_factory(
        extra_args=["--kernelspec-dir", str(specs), "--working-dir-root", f"{root}/{{user}}"]
    )
    alice = add_user(gw, "alice")
    own, other = str(root / "alice" / "nb"), str(root / "bob" / "nb")
    model = await start_as(gw, alice, env={"KERNEL_WORKING_DIR": own})
    ks = await KernelSocket.open(gw, model["id"], token=alice)
    try:
        assert (await ks.execute("import os; print(os.getcwd())"))[0].strip() == own
    finally:
        await ks.close()
    status, body = await api(
        gw,
        "POST",
        "api/kernels",
        {"name": "shared-local", "env": {"KERNEL_WORKING_DIR": other}},
        token=alice,
    )
    assert status == 403 and f"outside {root / 'alice'}" in body["message"], body
    admin = await start_as(gw, gw.token, "python3", env={"KERNEL_WORKING_DIR": other})
    for kernel_id in (model["id"], admin["id"]):
        assert (await api(gw, "DELETE", f"api/kernels/{kernel_id}"))[0] == 204
