"""Secrets stay private (issue #13, item 5): what holds a kernel's key is readable by the
gateway's user alone whatever the umask, a local kernel inherits no token or operator-named
secret, a placeholder or short token is refused at start, and `.env` (the token of the compose
deployment) reaches neither git nor an image.

Each test performs what a local user or a kernel could do and sees it fail."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import sqlite3
import stat
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import ROOT, GatewayProcess, eventually, free_port
from gwclient import KernelSocket, api, start_kernel


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    """The gateway started inside inherits `mask` (the files this test makes meanwhile too)."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode) & 0o777


# -- file modes --------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [0o022, 0o000], ids=["umask022", "umask000"])
async def test_kernel_keys_are_private_whatever_the_umask(gateway_factory, tmp_path, mask):
    """State DB (and its -wal, -shm), the folder the gateway makes for it, the runtime dir,
    a kernel's connection file and log: another local user could read a kernel's HMAC key
    and ports from any of them, and sign messages to it."""
    state = tmp_path / f"new-{mask:o}" / "state.sqlite"
    gw = gateway_factory(extra_args=["--state-db", str(state)], start=False)
    with umask(mask):
        gw.start()
    kid = (await start_kernel(gw))["id"]
    try:
        files = {
            state.parent: 0o700,
            state: 0o600,
            Path(f"{state}-wal"): 0o600,
            Path(f"{state}-shm"): 0o600,
            gw.runtime_dir: 0o700,
            gw.runtime_dir / f"kernel-{kid}.json": 0o600,
            gw.runtime_dir / f"kernel-{kid}.log": 0o600,
        }
        found = {str(p): oct(mode(p)) for p in files}
        assert found == {str(p): oct(m) for p, m in files.items()}, gw.log()
    finally:
        assert (await api(gw, "DELETE", f"api/kernels/{kid}"))[0] == 204


async def test_existing_open_files_are_narrowed_at_start(gateway_factory, tmp_path):
    """A state DB and runtime dir an older gateway (or a loose umask) left open to others are
    made private at start, and the log says so."""
    state = tmp_path / "old.sqlite"
    with umask(0o022):
        db = sqlite3.connect(state)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE t (x)")
        leftovers = [state, Path(f"{state}-wal"), Path(f"{state}-shm")]
        gw = gateway_factory(extra_args=["--state-db", str(state)], start=False)
        gw.runtime_dir.mkdir()
        for path in leftovers:
            path.chmod(0o644)
        gw.runtime_dir.chmod(0o755)
        gw.start()
    db.close()
    assert {str(p): oct(mode(p)) for p in leftovers} == {str(p): "0o600" for p in leftovers}
    assert mode(gw.runtime_dir) == 0o700
    assert f"{state} was mode 0644; made it 0600" in gw.log()
    assert f"{gw.runtime_dir} was mode 0755; made it 0700" in gw.log()


# -- what a local kernel inherits --------------------------------------------------------

SECRETS = {
    "RKG_STATE_PASSPHRASE": "rkg-var",  # any RKG_*, not only the token
    "AWS_SECRET_ACCESS_KEY": "aws-glob",  # --secret-env AWS_*
    "DB_PASSWORD": "named",  # RKG_SECRET_ENV=DB_PASSWORD,...
}


async def _environ(gw: GatewayProcess, kid: str) -> dict[str, str]:
    ks = await KernelSocket.open(gw, kid)
    try:
        out, reply = await ks.execute("import os, json; print(json.dumps(dict(os.environ)))")
    finally:
        await ks.close()
    assert reply["status"] == "ok", reply
    environ: dict[str, str] = json.loads(out)
    return environ


async def test_local_kernels_inherit_no_token_and_no_named_secret(gateway_factory):
    """The token in the gateway's environment (RKG_TOKEN, as docker-compose and the systemd
    unit pass it) would let code in any kernel drive the gateway as its admin."""
    token = secrets.token_hex(16)
    gw = gateway_factory(
        token=token,
        extra_args=["--secret-env", "AWS_*", "--pool", "python3=1", "--env-allow", "CLIENT_VAR"],
        env={
            "RKG_TOKEN": token,
            "RKG_SECRET_ENV": "DB_PASSWORD,NOT_SET_ANYWHERE",
            "HARMLESS_SETTING": "kept",
            **SECRETS,
        },
    )
    # one kernel from the warm pool (launched before any request), one launched for its start
    # (a client variable rules the pool out)
    await eventually(
        lambda: api(gw, "GET", "api/status"),
        until=lambda r: r[1]["pools"] and r[1]["pools"][0]["ready"] == 1,
        timeout=30,
    )
    pooled = (await start_kernel(gw))["id"]
    fresh = (await start_kernel(gw, env={"CLIENT_VAR": "from-client"}))["id"]
    try:
        for kid in (pooled, fresh):
            environ = await _environ(gw, kid)
            leaked = {k for k, v in environ.items() if k.startswith("RKG_") or v == token}
            leaked |= SECRETS.keys() & environ.keys()
            assert not leaked, f"kernel {kid} inherited {sorted(leaked)}"
            assert environ["HARMLESS_SETTING"] == "kept"  # the rest of the environment stays
            assert environ["KERNEL_ID"] == kid
        assert environ["CLIENT_VAR"] == "from-client"  # the fresh one's
    finally:
        for kid in (pooled, fresh):
            assert (await api(gw, "DELETE", f"api/kernels/{kid}"))[0] == 204


async def test_batch_jobs_submitted_here_inherit_no_token(gateway_factory, slurm, tmp_path):
    """sbatch hands its job the environment it was run with (--export=ALL): a kernel in a
    batch job submitted on the gateway's machine would otherwise get the token too."""
    token = secrets.token_hex(16)
    specs = tmp_path / "specs"
    slurm.write_spec(specs, "slurm-debug")
    gw = gateway_factory(
        token=token,
        extra_args=["--kernelspec-dir", str(specs), "--secret-env", "AWS_*"],
        env={**slurm.env, "RKG_TOKEN": token, **SECRETS},
    )
    kid = (await start_kernel(gw, "slurm-debug"))["id"]
    try:
        environ = await _environ(gw, kid)
    finally:
        assert (await api(gw, "DELETE", f"api/kernels/{kid}"))[0] == 204
        assert not await asyncio.to_thread(slurm.wait_no_jobs)
    assert environ.get("SLURM_JOB_ID"), "not in a batch job"
    leaked = {k for k, v in environ.items() if k.startswith("RKG_") or v == token}
    leaked |= (SECRETS.keys() - {"DB_PASSWORD"}) & environ.keys()
    assert not leaked, f"the batch kernel inherited {sorted(leaked)}"


# -- tokens ------------------------------------------------------------------------------

HOW = "python3 -c 'import secrets; print(secrets.token_hex(24))'"


@pytest.mark.parametrize(
    ("how", "value", "problem"),
    [
        ("flag", "change-me", "is a placeholder"),
        ("env", "CHANGEME", "is a placeholder"),
        ("file", "change-me-to-a-long-random-string\n", "is a placeholder"),
        ("env", "your-token-goes-here-0123456789", "is a placeholder"),
        ("flag", "password", "is a placeholder"),
        ("flag", "my-token-0123456789abcdef", "is a placeholder"),
        ("env", "abcdef123456789", "has 15 characters, fewer than 16"),
        ("file", "tok-from-file\n", "has 13 characters, fewer than 16"),
    ],
)
def test_placeholder_or_short_token_refused_at_start(tmp_path, how, value, problem):
    argv = [sys.executable, "-m", "gateway", "serve", "--port", str(free_port())]
    argv += ["--state-db", ":memory:"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RKG_")}
    if how == "flag":
        argv += ["--token", value]
    elif how == "env":
        env["RKG_TOKEN"] = value
    else:
        (tmp_path / "token").write_text(value)
        env["RKG_TOKEN_FILE"] = str(tmp_path / "token")
    run = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
    assert run.returncode == 2, run.stderr
    assert problem in run.stderr and HOW in run.stderr and "openssl rand -hex 24" in run.stderr
    assert value.strip() not in run.stderr.replace(HOW, "")  # the refused token is not echoed
    assert "Traceback" not in run.stderr


def test_no_deploy_file_or_test_uses_a_refused_token():
    """What an operator copies (.env.example, compose, the unit) sets no usable-looking
    placeholder: compose then stops with "set RKG_TOKEN in .env"."""
    example = dict(
        line.split("=", 1)
        for line in (ROOT / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert example["RKG_TOKEN"] == ""
    assert "RKG_TOKEN:?" in (ROOT / "docker-compose.yml").read_text()


# -- .env ----------------------------------------------------------------------------------


def test_env_file_is_ignored_by_git():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    for name in (".env", "deploy/.env", ".env.local"):
        run = subprocess.run(["git", "check-ignore", "-q", name], cwd=ROOT, check=False)
        assert run.returncode == 0, f"git would track {name}"


def _layer_names(image_tar: Path) -> set[str]:
    """Every path in every layer of a `docker save`d image (what `rm` in a later layer hides
    from a container but not from whoever pulls the image)."""
    names: set[str] = set()
    with tarfile.open(image_tar) as outer:
        for member in outer.getmembers():
            if not member.isfile():
                continue
            layer = outer.extractfile(member)
            assert layer is not None
            with contextlib.suppress(tarfile.ReadError), tarfile.open(fileobj=layer) as inner:
                names.update(m.name for m in inner.getmembers())
    return names


def test_env_file_never_reaches_an_image(docker, base_image, build_context, tmp_path):
    """The gateway's image built (as compose builds it) from a checkout with a .env beside
    the Dockerfile: no layer holds it, nor anything else the image does not need."""
    ctx = tmp_path / "context"
    shutil.copytree(build_context, ctx, symlinks=True)
    (ctx / ".env").write_text(f"RKG_TOKEN={secrets.token_hex(24)}\n")
    (ctx / "deploy" / ".env").write_text("RKG_TOKEN=another\n")
    (ctx / "id_rsa").write_text("a private key someone left in the checkout\n")
    tag = "rkg-test-secrets:latest"
    docker.run("docker", "build", "-q", "--build-arg", f"BASE={base_image}", "-t", tag, str(ctx))
    try:
        saved = tmp_path / "image.tar"
        docker.run("docker", "save", "-o", str(saved), tag)
        names = _layer_names(saved)
    finally:
        docker.run("docker", "rmi", "-f", tag, check=False)
    leaked = {n for n in names if n.split("/")[-1] in (".env", "id_rsa")}
    assert not leaked, f"in the image's layers: {sorted(leaked)}"
    assert not {n for n in names if n.startswith(("src/tests", "src/deploy", "src/.git"))}
