"""`rkg kernels` (gateway/kernels_cli.py): the real command, run as a user runs it, against real
gateways and real kernels, and against Jupyter Kernel Gateway, which reports none of this
gateway's own fields. Every failure must be one line on stderr and a non-zero exit."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import http.server
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from conftest import (
    eventually,
    eventually_sync,
    free_port,
    processes_matching,
    require_infra,
    stop_process,
)
from gateway.kernels_cli import COLUMNS, table
from gwclient import KernelSocket, api, start_kernel


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


async def rkg(*args: str, env: dict[str, str] | None = None) -> Run:
    """`rkg kernels ARGS` in a subprocess, with no RKG_* variable but those of `env`."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RKG_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "kernels",
        *args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**clean, **(env or {})},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


def at(gw: Any) -> list[str]:
    return ["--url", gw.url, "--token", gw.token]


def fails(run: Run, *words: str) -> str:
    """The run failed with one line on stderr, no traceback, holding every word."""
    assert run.returncode != 0, run
    assert run.stdout == "", run
    assert "Traceback" not in run.stderr, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def rows(text: str) -> list[dict[str, str]]:
    """The table as one dict per row, cut at the header's column positions (so blank cells
    and misaligned columns show)."""
    header, *lines = text.splitlines()
    starts = [header.index(name) for name in COLUMNS]
    assert starts == sorted(starts), header
    bounds = [*starts[1:], None]
    return [
        {name: line[a:b].strip() for name, a, b in zip(COLUMNS, starts, bounds, strict=True)}
        for line in lines
    ]


def row_of(text: str, kernel_id: str) -> dict[str, str]:
    found = [r for r in rows(text) if kernel_id.startswith(r["ID"]) and len(r["ID"]) >= 8]
    assert len(found) == 1, text
    return found[0]


AGE = re.compile(r"^\d+[smhd] ago$")


async def delete(gw: Any, kernel_id: str) -> None:
    await api(gw, "DELETE", f"api/kernels/{kernel_id}")


# -- listing, interrupt, stop ----------------------------------------------------------------


async def test_lists_a_kernel_started_through_the_api(gateway):
    kid = (await start_kernel(gateway, env={"KERNEL_USERNAME": "ada"}))["id"]
    try:
        run = await rkg(*at(gateway))
        assert run.returncode == 0, run
        row = row_of(run.stdout, kid)
        assert {k: row[k] for k in ("SPEC", "BACKEND", "HOST", "USER", "STATE", "CONN")} == {
            "SPEC": "python3",
            "BACKEND": "local",
            "HOST": "",
            "USER": "ada",
            "STATE": "idle",
            "CONN": "0",
        }
        assert AGE.match(row["STARTED"]) and AGE.match(row["LAST ACTIVITY"]), row

        # for scripts: the models as the gateway gave them, full ids included
        run = await rkg("list", "--json", *at(gateway))
        assert run.returncode == 0, run
        models = {m["id"]: m for m in json.loads(run.stdout)}
        assert models[kid]["gateway"]["user"] == "ada"
    finally:
        await delete(gateway, kid)


async def test_interrupt_reaches_the_kernel(gateway):
    kid = (await start_kernel(gateway))["id"]
    ks = await KernelSocket.open(gateway, kid)
    try:
        msg_id = await ks.start_long_cell(60)
        row = row_of((await rkg(*at(gateway))).stdout, kid)
        assert (row["STATE"], row["CONN"]) == ("busy", "1"), row

        run = await rkg("interrupt", kid[:6], *at(gateway))
        assert (run.returncode, run.stdout, run.stderr) == (0, f"interrupted {kid}\n", "")
        msgs = await ks.reply_and_idle(msg_id, timeout=20)  # long before the 60 s sleep ends
        reply = next(m for m in msgs if m["header"]["msg_type"] == "execute_reply")
        assert reply["content"]["status"] == "error", reply["content"]
        assert reply["content"]["ename"] == "KeyboardInterrupt", reply["content"]
    finally:
        await ks.close()
        await delete(gateway, kid)


async def test_stop_removes_the_kernel(gateway):
    kid = (await start_kernel(gateway))["id"]
    try:
        assert processes_matching(f"kernel-{kid}")
        run = await rkg("stop", kid, *at(gateway))
        assert (run.returncode, run.stdout, run.stderr) == (0, f"stopped {kid}\n", "")
        assert (await api(gateway, "GET", f"api/kernels/{kid}"))[0] == 404
        assert kid[:8] not in (await rkg(*at(gateway))).stdout
        await eventually(lambda: not processes_matching(f"kernel-{kid}"), what="kernel gone")
    finally:
        await delete(gateway, kid)


async def test_an_ambiguous_prefix_stops_nothing(gateway):
    """Two kernels whose ids start alike are needed: kernels that never become ready are
    listed while they start, and cost a sleeping process each, so they are added until two
    ids share their first character (17 at most)."""

    def post() -> int:
        body = json.dumps({"name": "slowstart", "env": {"KERNEL_LAUNCH_TIMEOUT": "100"}})
        req = urllib.request.Request(
            gateway.url + "api/kernels",
            data=body.encode(),
            headers={"Authorization": f"token {gateway.token}"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=120) as answer:
                return int(answer.status)
        except urllib.error.HTTPError as e:
            return e.code

    async def listed() -> list[str]:
        return [k["id"] for k in (await api(gateway, "GET", "api/kernels"))[1]]

    # threads of its own: the loop's default executor, which a few held POSTs would fill,
    # is where Tornado's client resolves host names
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=17)
    posts: list[asyncio.Future[int]] = []
    ids: list[str] = []
    before = set(await listed())
    try:
        while True:
            posts.append(asyncio.get_running_loop().run_in_executor(pool, post))
            ids = await eventually(listed, until=lambda ids: len(set(ids) - before) == len(posts))
            firsts = collections.Counter(i[0] for i in ids)
            shared = [c for c, n in firsts.items() if n > 1]
            if shared:
                break
        line = fails(await rkg("stop", shared[0], *at(gateway)), "BadRequest:", "give more")
        assert f"'{shared[0]}' is the start of {firsts[shared[0]]} kernel ids" in line
        assert sorted(await listed()) == sorted(ids)  # nothing was stopped
    finally:
        for model in (await api(gateway, "GET", "api/kernels"))[1]:
            if model["name"] == "slowstart":
                await delete(gateway, model["id"])
        # each start was undone by its delete: its POST answers 409
        assert set(await asyncio.gather(*posts)) <= {409}
        pool.shutdown()
    await eventually(
        lambda: [k for k in ids if processes_matching(f"kernel-{k}")] == [], what="all gone"
    )


async def test_a_base_url_and_the_variables(gateway_factory, tmp_path):
    """--url with a base path (with or without its slash) and RKG_URL, RKG_TOKEN_FILE, and
    the ?token= of the URL `rkg serve` prints."""
    gw = gateway_factory(base_url="/gw/")
    token_file = tmp_path / "token"
    token_file.write_text(gw.token + "\n")
    bare = gw.url.rstrip("/")  # http://127.0.0.1:PORT/gw
    run = await rkg(env={"RKG_URL": bare, "RKG_TOKEN_FILE": str(token_file)})
    assert (run.returncode, run.stdout) == (0, f"no kernels at {gw.url}\n"), run

    kid = (await start_kernel(gw))["id"]
    try:
        run = await rkg("list", env={"RKG_URL": bare, "RKG_TOKEN": gw.token})
        assert row_of(run.stdout, kid)["SPEC"] == "python3"
        run = await rkg("stop", kid[:8], "--url", f"{gw.url}?token={gw.token}")
        assert (run.returncode, run.stdout) == (0, f"stopped {kid}\n"), run
        assert (await api(gw, "GET", f"api/kernels/{kid}"))[0] == 404
    finally:
        await delete(gw, kid)

    # the gateway's own 404 for a path outside its base URL, with a hint
    root = f"http://127.0.0.1:{gw.port}/"
    fails(await rkg("--url", root, "--token", gw.token), "NotFound:", "is the base URL right?")


# -- errors: one line, non-zero, no traceback --------------------------------------------------


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def web_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A web server that is not a gateway: /html/api/kernels is a page, the rest 404 in HTML."""
    root = tmp_path_factory.mktemp("web")
    (root / "html" / "api").mkdir(parents=True)
    (root / "html" / "api" / "kernels").write_text("<html><body>hello</body></html>")
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture(scope="module")
def silent() -> Iterator[str]:
    """A port that accepts connections (the kernel's backlog does) and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield f"http://127.0.0.1:{s.getsockname()[1]}/"


# each case: (gateway, web server, silent URL) -> (arguments, words its error line holds)
ERRORS: dict[str, Any] = {
    "refused": lambda gw, web, silent: (
        ["--url", f"http://127.0.0.1:{free_port()}/"],
        ["Unavailable: cannot reach the gateway at http://127.0.0.1:", "connection refused"],
    ),
    "unresolved": lambda gw, web, silent: (
        ["--url", "http://no-such-host.invalid:8888/gw"],
        ["Unavailable:", "http://no-such-host.invalid:8888/gw/", "cannot resolve"],
    ),
    "timeout": lambda gw, web, silent: (
        ["--url", silent, "--timeout", "1"],
        ["Unavailable:", silent, "no answer within 1 s"],
    ),
    "wrong token": lambda gw, web, silent: (
        ["--url", gw.url, "--token", "not-the-token"],
        ["Forbidden:", gw.url, "the token is not valid"],
    ),
    "no token": lambda gw, web, silent: (
        ["--url", gw.url],
        ["Unauthorized:", "needs a token", "--token, RKG_TOKEN or RKG_TOKEN_FILE"],
    ),
    "unknown id": lambda gw, web, silent: (
        ["stop", "zz-not-an-id", *at(gw)],
        ["NotFound:", "no kernel at", "starting with 'zz-not-an-id'"],
    ),
    "unknown id, interrupt": lambda gw, web, silent: (
        ["interrupt", "zz-not-an-id", *at(gw)],
        ["NotFound:", "starting with 'zz-not-an-id'"],
    ),
    "404 page, not a gateway": lambda gw, web, silent: (
        ["--url", web],
        ["NotFound:", "404", "is a Jupyter gateway there"],
    ),
    "200 page, not a gateway": lambda gw, web, silent: (
        ["--url", web + "html/"],
        ["NotFound:", "something other than JSON", "is a Jupyter gateway there"],
    ),
    "not an http URL": lambda gw, web, silent: (
        ["--url", "ftp://example.org/"],
        ["BadRequest:", "http:// or https://"],
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
async def test_errors_are_one_line(case, gateway, web_server, silent):
    args, words = ERRORS[case](gateway, web_server, silent)
    fails(await rkg(*args), *words)


async def test_a_token_file_that_cannot_be_read(tmp_path):
    run = await rkg(env={"RKG_TOKEN_FILE": str(tmp_path / "missing")})
    fails(run, "FileNotFoundError:", str(tmp_path / "missing"))


# -- another gateway: Jupyter Kernel Gateway reports no `gateway` object --------------------


@pytest.fixture
def jkg(tmp_path: Path) -> Iterator[Any]:
    exe = shutil.which("jupyter-kernelgateway", path=str(Path(sys.executable).parent))
    if not exe:
        require_infra("jupyter-kernelgateway is not installed (pip install -e .[test])")

    @dataclass
    class JKG:
        url: str
        token: str

    gw = JKG(f"http://127.0.0.1:{free_port()}/", secrets.token_hex(8))
    runtime = tmp_path / "jkg-runtime"
    port = gw.url.rsplit(":", 1)[1].strip("/")
    with open(tmp_path / "jkg.log", "wb") as log:
        proc = subprocess.Popen(
            [
                exe,
                "--KernelGatewayApp.ip=127.0.0.1",
                f"--KernelGatewayApp.port={port}",
                f"--KernelGatewayApp.auth_token={gw.token}",
                "--JupyterWebsocketPersonality.list_kernels=True",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            env={**os.environ, "JUPYTER_RUNTIME_DIR": str(runtime)},
            start_new_session=True,
        )

    def answers() -> bool:
        assert proc.poll() is None, (tmp_path / "jkg.log").read_text()
        req = urllib.request.Request(gw.url + "api", headers={"Authorization": f"token {gw.token}"})
        with urllib.request.urlopen(req, timeout=1) as r:
            return bool(r.status == 200)

    try:
        eventually_sync(answers, timeout=60, ignore=(OSError,), what="JKG answering")
        yield gw
    finally:
        stop_process(proc)
        left = processes_matching(str(runtime))
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"JKG left kernel processes: {left}"


async def test_jupyter_kernel_gateway_lists_with_blanks(jkg):
    kid = (await start_kernel(jkg))["id"]
    run = await rkg(*at(jkg))
    assert run.returncode == 0, run
    row = row_of(run.stdout, kid)
    # JKG says "starting" until a client connects: the state is whatever it says
    assert row["SPEC"] == "python3" and row["STATE"] and row["CONN"] == "0", row
    assert row["BACKEND"] == row["HOST"] == row["USER"] == row["STARTED"] == "", row
    assert AGE.match(row["LAST ACTIVITY"]), row
    run = await rkg("stop", kid[:8], *at(jkg))
    assert (run.returncode, run.stdout) == (0, f"stopped {kid}\n"), run
    assert (await api(jkg, "GET", f"api/kernels/{kid}"))[0] == 404


# -- the table, from models -------------------------------------------------------------------


@pytest.mark.unit
def test_table_cells():
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)

    def iso(delta: timedelta) -> str:
        return (now - delta).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    ours = {
        "id": "abcdef12-0000-4000-8000-000000000001",
        "name": "gpu",
        "execution_state": "starting",
        "connections": 2,
        "last_activity": iso(timedelta(seconds=5)),
        "gateway": {
            "backend": "batch",
            "host": "node7",
            "user": "ada",
            "state": "starting",
            "stage": "SLURM job 12 queued",
            "started": iso(timedelta(hours=3, minutes=1)),
        },
    }
    twin = {**ours, "id": "abcdef12-9000-4000-8000-000000000002", "gateway": None}
    got = rows(table([twin, ours], now))
    assert got[0] == {
        "ID": "abcdef12-0",  # as long as it takes to tell the two apart
        "SPEC": "gpu",
        "BACKEND": "batch",
        "HOST": "node7",
        "USER": "ada",
        "STATE": "starting (SLURM job 12 queued)",
        "CONN": "2",
        "STARTED": "3h ago",
        "LAST ACTIVITY": "5s ago",
    }
    assert got[1]["ID"] == "abcdef12-9" and got[1]["STATE"] == "starting"
    assert got[1]["BACKEND"] == got[1]["STARTED"] == ""
