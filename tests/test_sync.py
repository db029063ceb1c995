"""Files in sync (`sync` in an rkg-ssh kernelspec): the notebook's folder is mirrored to a real
OpenSSH host in a network namespace (tests/sshd.py), the kernel starts in the mirror, and what
it writes comes back while it runs, at restart and at shutdown; conflicts keep both copies,
nothing is deleted, and the kernel's side cannot write outside the folder."""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sshd import SSHLab

from conftest import GatewayProcess, eventually, rkg, serving
from gateway.backends.sync import Excludes, Stat, conflict_name, plan, remote_folder
from gwclient import KernelSocket, api, start_kernel

FAST = 0.5  # sync_interval of sync-fast, seconds
CAP_MB = 1  # sync_max_file_mb of both specs


# -- what a pass decides ----------------------------------------------------------------


def s(size: int, mtime: int) -> Stat:
    return Stat(size, mtime)


@pytest.mark.parametrize(
    ("here", "there", "base", "expect"),
    [
        ({"a": s(1, 10)}, {}, {}, "push"),  # new here
        ({}, {"a": s(1, 10)}, {}, "pull"),  # new there
        ({"a": s(1, 10)}, {"a": s(1, 10)}, {}, "settled"),
        ({"a": s(2, 20)}, {"a": s(1, 10)}, {"a": (s(1, 10), s(1, 10))}, "push"),
        ({"a": s(1, 10)}, {"a": s(2, 20)}, {"a": (s(1, 10), s(1, 10))}, "pull"),
        ({"a": s(2, 20)}, {"a": s(3, 30)}, {"a": (s(1, 10), s(1, 10))}, "conflicts"),
        ({"a": s(2, 20)}, {"a": s(3, 30)}, {}, "conflicts"),  # differ, no baseline
        # removed there after a sync, unchanged here: neither removed here nor sent back
        ({"a": s(1, 10)}, {}, {"a": (s(1, 10), s(1, 10))}, None),
        ({}, {"a": s(1, 10)}, {"a": (s(1, 10), s(1, 10))}, None),
        # removed there, then changed here: the new content goes
        ({"a": s(2, 20)}, {}, {"a": (s(1, 10), s(1, 10))}, "push"),
        # same size, other mtime: a change
        ({"a": s(1, 11)}, {"a": s(1, 10)}, {"a": (s(1, 10), s(1, 10))}, "push"),
    ],
)
def test_plan(here, there, base, expect):
    p = plan(here, there, base)
    got = {k: getattr(p, k) for k in ("push", "pull", "conflicts") if getattr(p, k)}
    if p.settled:
        got["settled"] = list(p.settled)
    assert got == ({expect: ["a"]} if expect else {})


def test_conflict_names_and_excludes():
    when = time.mktime((2026, 12, 2, 10, 15, 0, 0, 0, -1))
    assert conflict_name("d/model.ckpt", when, "gpu1") == (
        "d/model.sync-conflict-20261202-101500-gpu1.ckpt"
    )
    assert conflict_name(".env", when, "a b/c") == ".env.sync-conflict-20261202-101500-a_b_c"
    ex = Excludes([".git", "__pycache__", "data/*.tmp"])
    assert ex(".git", ".git") and ex("x/__pycache__", "__pycache__") and ex("data/a.tmp", "a.tmp")
    assert ex(".ssh", ".ssh") and ex("d/.rkg-sync-1234", ".rkg-sync-1234")  # never synced
    assert not ex("a.tmp", "a.tmp") and not ex("git", "git")
    assert remote_folder("/home/u/nb", "~/work").startswith("work/rkg-sync/nb-")
    assert remote_folder("/home/u/nb", "/scratch").startswith("/scratch/rkg-sync/nb-")
    assert remote_folder("/home/u/nb", "") != remote_folder("/home/v/nb", "")


def test_spec_add_sync_options(tmp_path):
    rkg("spec", "add", "ssh", "s", "--host", "me@h", "--sync", "--sync-exclude", "*.tmp",
        "--sync-interval", "2", "--dir", str(tmp_path))  # fmt: skip
    config = json.loads((tmp_path / "s" / "kernel.json").read_text())["metadata"][
        "kernel_provisioner"
    ]["config"]
    assert config["sync"] is True and config["sync_interval"] == 2
    assert config["sync_excludes"] == [".git", ".ipynb_checkpoints", "__pycache__", "*.tmp"]
    assert "files in sync every 2 s" in rkg("spec", "show", "s", "--dir", str(tmp_path)).stdout
    for bad in (["--sync-exclude", "x"], ["--sync", "--sync-interval", "0"]):
        done = rkg("spec", "add", "ssh", "t", "--host", "h", *bad, "--dir", str(tmp_path),
                   check=False)  # fmt: skip
        assert done.returncode != 0 and "--sync" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


# -- against a real host ------------------------------------------------------------------


@pytest.fixture(scope="module")
def places(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sync")
    out = {k: root / k for k in ("notebooks", "remote", "outside", "data", "specs")}
    for p in out.values():
        p.mkdir()
    return out


@pytest.fixture(scope="module")
def specs(ssh_lab: SSHLab, places: dict[str, Path]) -> Path:
    common = {"sync": True, "workdir": str(places["remote"]), "sync_max_file_mb": CAP_MB}
    ssh_lab.write_spec(places["specs"], "sync-fast", "rhost1", **common, sync_interval=FAST)
    ssh_lab.write_spec(places["specs"], "sync-slow", "rhost1", **common, sync_interval=3600)
    ssh_lab.write_spec(places["specs"], "sync-capped", "rhost1", **common, sync_max_total_mb=0.001)
    return places["specs"]


@pytest.fixture(scope="module")
def sync_gateway(
    ssh_lab: SSHLab,
    places: dict[str, Path],
    specs: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[GatewayProcess]:
    yield from serving(
        tmp_path_factory.mktemp("gateway-sync"),
        "--kernelspec-dir",
        str(places["specs"]),
        "--working-dir-root",
        str(places["notebooks"]),
        env={"JUPYTER_DATA_DIR": str(places["data"])},  # the baselines
    )
    assert not ssh_lab.leftovers(), f"remote kernels left behind: {ssh_lab.leftovers()}"


def _folder(places: dict[str, Path], name: str) -> Path:
    d = places["notebooks"] / name
    d.mkdir()
    return d


async def _run(gw: GatewayProcess, kernel_id: str, code: str) -> str:
    ks = await KernelSocket.open(gw, kernel_id, v1=True)
    try:
        out, reply = await ks.execute(code)
    finally:
        await ks.close()
    assert reply["status"] == "ok", reply
    return out.strip()


async def _delete(gw: GatewayProcess, lab: SSHLab, kernel_id: str) -> None:
    assert (await api(gw, "DELETE", f"api/kernels/{kernel_id}"))[0] == 204
    await eventually(lab.leftovers, until=lambda k: k == [], what="no kernel left on the host")


async def test_folder_mirrored_and_kernel_files_come_back(sync_gateway, ssh_lab, places):
    nb = _folder(places, "project")
    (nb / "data.csv").write_text("a,b\n1,2\n")
    (nb / "sub").mkdir()
    (nb / "sub" / "notes.txt").write_text("deep")
    (nb / ".git").mkdir()
    (nb / ".git" / "config").write_text("[core]")
    (nb / "huge.bin").write_bytes(b"\0" * (CAP_MB * 2**20 + 1))
    (nb / "link").symlink_to(places["outside"])
    (places["outside"] / "secret.txt").write_text("not for the host")
    old = time.time() - 3600
    os.utime(nb / "data.csv", (old, old))

    model = await start_kernel(sync_gateway, "sync-fast", env={"KERNEL_WORKING_DIR": str(nb)})
    kid = model["id"]
    cwd = await _run(sync_gateway, kid, "import os; print(os.getcwd())")
    mirror = Path(cwd)
    assert mirror.parent == places["remote"] / "rkg-sync" and mirror.name.startswith("project-")
    seen = json.loads(
        await _run(
            sync_gateway,
            kid,
            "import os, json; print(json.dumps({'csv': open('data.csv').read(), "
            "'deep': open('sub/notes.txt').read(), 'mtime': int(os.stat('data.csv').st_mtime), "
            "'names': sorted(os.listdir('.'))}))",
        )
    )
    assert seen["csv"] == "a,b\n1,2\n" and seen["deep"] == "deep"
    assert seen["mtime"] == int(old)  # kept: the next pass sees nothing to do
    assert seen["names"] == ["data.csv", "sub"], seen  # no .git, no file over the cap, no link

    # the kernel writes a checkpoint; it is next to the notebook within a few passes
    await _run(
        sync_gateway,
        kid,
        "import os; os.makedirs('ckpt', exist_ok=True); open('ckpt/model.txt', 'w').write('w1')",
    )
    back = nb / "ckpt" / "model.txt"
    await eventually(lambda: back.is_file() and back.read_text() == "w1", timeout=15)

    # an edit here reaches the kernel
    (nb / "data.csv").write_text("a,b\n3,4\n")
    await eventually(
        lambda: _run(sync_gateway, kid, "print(open('data.csv').read())"),
        until=lambda out: out == "a,b\n3,4",
        timeout=15,
    )

    # the kernel cannot write outside the folder, nor hand out setuid files
    await _run(
        sync_gateway,
        kid,
        "import os; os.makedirs('link', exist_ok=True); open('link/evil.txt', 'w').write('x');"
        "open('suid', 'w').write('x'); os.chmod('suid', 0o4755);"
        f"os.symlink({str(places['outside'] / 'secret.txt')!r}, 'pointer')",
    )
    await eventually(lambda: (nb / "suid").is_file(), timeout=15)
    assert stat.S_IMODE((nb / "suid").stat().st_mode) == 0o755
    assert not (places["outside"] / "evil.txt").exists()
    assert not (nb / "pointer").exists()

    # nothing is deleted: a file removed here stays there, and is not brought back
    (nb / "sub" / "notes.txt").unlink()
    await _run(sync_gateway, kid, f"import time; time.sleep({3 * FAST})")
    assert not (nb / "sub" / "notes.txt").exists()
    assert (mirror / "sub" / "notes.txt").read_text() == "deep"

    # written just before shutdown: back once DELETE answered
    await _run(sync_gateway, kid, "open('last.txt', 'w').write('bye')")
    await _delete(sync_gateway, ssh_lab, kid)
    assert (nb / "last.txt").read_text() == "bye"
    assert (nb / "huge.bin").stat().st_size == CAP_MB * 2**20 + 1  # left where it was
    assert not list(places["data"].glob("rkg-sync/*.tmp*"))
    assert not [p for p in nb.rglob(".rkg-sync-*")], "an unfinished copy was left"


async def test_conflict_at_restart_keeps_both(sync_gateway, ssh_lab, places):
    """sync-slow passes only at start, restart and shutdown: a file changed on both sides
    between two passes is a conflict; the newer keeps the name, both copies end on both
    sides."""
    nb = _folder(places, "conflicted")
    (nb / "model.txt").write_text("v0")
    model = await start_kernel(sync_gateway, "sync-slow", env={"KERNEL_WORKING_DIR": str(nb)})
    kid = model["id"]
    mirror = Path(await _run(sync_gateway, kid, "import os; print(os.getcwd())"))
    await _run(sync_gateway, kid, "open('model.txt', 'w').write('remote, older')")
    (nb / "model.txt").write_text("local, newer")
    later = time.time() + 5
    os.utime(nb / "model.txt", (later, later))
    status, _ = await api(sync_gateway, "POST", f"api/kernels/{kid}/restart", {})
    assert status == 200
    for side in (nb, mirror):
        names = sorted(p.name for p in side.iterdir())
        assert len(names) == 2 and names[0].startswith("model.sync-conflict-"), names
        assert (side / "model.txt").read_text() == "local, newer"
        assert (side / names[0]).read_text() == "remote, older"
        assert names[0].endswith(f"-{ssh_lab.hosts['rhost1'].addr}.txt"), names
    # the restarted kernel runs in the mirror still
    assert await _run(sync_gateway, kid, "print(open('model.txt').read())") == "local, newer"
    await _delete(sync_gateway, ssh_lab, kid)


async def test_folder_over_the_cap_is_a_clear_start_error(sync_gateway, places):
    nb = _folder(places, "big")
    (nb / "a.bin").write_bytes(b"x" * 4096)
    status, body = await api(
        sync_gateway,
        "POST",
        "api/kernels",
        {"name": "sync-capped", "env": {"KERNEL_WORKING_DIR": str(nb)}},
    )
    assert status >= 400 and set(body) == {"reason", "message"}, body
    assert "sync_max_total_mb" in body["message"] and "Traceback" not in body["message"]
    status, listed = await api(sync_gateway, "GET", "api/kernels")
    assert status == 200 and listed == []


async def test_no_working_dir_no_sync(sync_gateway, ssh_lab, places):
    model = await start_kernel(sync_gateway, "sync-fast")
    cwd = await _run(sync_gateway, model["id"], "import os; print(os.getcwd())")
    assert "rkg-sync" not in cwd
    await _delete(sync_gateway, ssh_lab, model["id"])


async def test_a_restarted_gateway_resumes_the_sync(gateway_factory, ssh_lab, places, specs):
    """--keep-kernels: the next gateway re-attaches and syncs again, from the kept baseline
    (an unchanged file is not a conflict)."""
    nb = _folder(places, "kept")
    (nb / "a.txt").write_text("a")
    args = [
        "--kernelspec-dir",
        str(places["specs"]),
        "--working-dir-root",
        str(places["notebooks"]),
    ]
    env = {"JUPYTER_DATA_DIR": str(places["data"])}
    gw = gateway_factory(extra_args=[*args, "--keep-kernels"], env=env)
    model = await start_kernel(gw, "sync-fast", env={"KERNEL_WORKING_DIR": str(nb)})
    assert gw.stop() == 0
    gw.extra_args = args  # the next one stops its kernels
    gw.start()
    await _run(gw, model["id"], "open('after.txt', 'w').write('resumed')")
    await eventually(lambda: (nb / "after.txt").is_file(), timeout=15)
    assert sorted(p.name for p in nb.iterdir()) == ["a.txt", "after.txt"]
    await _delete(gw, ssh_lab, model["id"])
    assert gw.stop() == 0


async def test_many_files_each_way_and_the_log(sync_gateway, ssh_lab, places):
    """250 new files go to the host, and the 102 the kernel writes come back, as tar streams
    (sync.py, BULK_FILES): mtimes kept, and the host's stream held to the same rules as
    single copies (no writing through a symlink here, no setuid bit)."""
    nb = _folder(places, "many")
    for i in range(250):
        (nb / f"f{i:03}.txt").write_text(str(i))
    os.utime(nb / "f007.txt", (1_000_000_000, 1_000_000_000))
    (nb / "link").symlink_to(places["outside"])
    model = await start_kernel(sync_gateway, "sync-slow", env={"KERNEL_WORKING_DIR": str(nb)})
    kid = model["id"]
    listed = await _run(
        sync_gateway,
        kid,
        "import os; print(len(os.listdir()), int(os.stat('f007.txt').st_mtime),"
        " oct(os.stat('f001.txt').st_mode & 0o7777))",
    )
    mode = oct(stat.S_IMODE((nb / "f001.txt").stat().st_mode) | 0o600)
    assert listed == f"250 1000000000 {mode}"
    await _run(
        sync_gateway,
        kid,
        "import os; os.makedirs('out'); os.makedirs('link')\n"
        "for i in range(100): open(f'out/{i}.txt', 'w').write(str(i))\n"
        "open('link/evil2.txt', 'w').write('x'); open('suid2', 'w').write('x')\n"
        "os.chmod('suid2', 0o4755)",
    )
    # sync-slow: the restart's pass brings all 102 at once
    assert (await api(sync_gateway, "POST", f"api/kernels/{kid}/restart", {}))[0] == 200
    assert len(list((nb / "out").glob("*.txt"))) == 100
    assert stat.S_IMODE((nb / "suid2").stat().st_mode) == 0o755
    assert (nb / "out" / "42.txt").read_text() == "42"
    assert not (places["outside"] / "evil2.txt").exists()
    await _delete(sync_gateway, ssh_lab, kid)
    assert sync_gateway.log_path is not None
    log = sync_gateway.log_path.read_text()
    assert f"sync {nb} <-> " in log and ": 250 files, 0.0 MB to copy" in log, log[-2000:]
    assert ": 250 up, 0 down, 0 conflicts kept both" in log
    assert ": 0 up, 102 down, 0 conflicts kept both" in log  # out/*, suid2 and link/evil2


def test_one_range_rule_for_the_cli_and_the_backend():
    """fsync.options is what both `rkg spec add` and the SSH backend check."""
    from gateway.backends import sync as fsync

    assert fsync.options([], 1, 1, 0.5).max_file_bytes == 2**20
    for bad in ((0, 1, 5), (1, -1, 5), (1, 1e8, 5), (1, 1, 0.2), (1, 1, 3601)):
        with pytest.raises(fsync.OutOfRange):
            fsync.options([], *bad)
