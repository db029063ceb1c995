"""The gateway's log (gateway/logs.py): `--log-format json` read back line by line from a real
gateway after real kernel work (a start, a failed start, a websocket with ?token=, a REST
restart, a restart after the kernel died, a delete), the client address of the access log
with and without --trusted-proxy, and the pure parts (address walk, redaction, format)."""

from __future__ import annotations

import asyncio
import contextvars
import io
import json
import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pytest

from conftest import eventually, free_port, processes_matching
from gateway import logs
from gwclient import KernelSocket, api, start_kernel


def records(gw: Any) -> list[dict[str, Any]]:
    """Every line of the gateway's log, each of which must be one JSON object."""
    found = []
    for number, line in enumerate(gw.log().splitlines(), 1):
        try:
            record = json.loads(line)
        except ValueError:
            raise AssertionError(f"log line {number} is not JSON: {line!r}") from None
        assert isinstance(record, dict), line
        assert {"time", "level", "logger", "message"} <= set(record), line
        datetime.fromisoformat(record["time"])
        found.append(record)
    return found


def one(lines: list[dict[str, Any]], what: str, **fields: Any) -> dict[str, Any]:
    """The first line with `fields`; an AssertionError naming `what` if there is none."""
    for line in lines:
        if all(line.get(k) == v for k, v in fields.items()):
            return line
    raise AssertionError(f"no log line {what} ({fields})")


def containing(lines: list[dict[str, Any]], words: str) -> dict[str, Any]:
    for line in lines:
        if words in line["message"]:
            return line
    raise AssertionError(f"no log line says {words!r}")


def access(lines: list[dict[str, Any]], method: str, path: str, status: int) -> dict[str, Any]:
    return one(
        lines, f"for {method} {path}", logger="gateway", method=method, path=path, status=status
    )


def about(kernel_id: str, user: str) -> dict[str, str]:
    return {"kernel_id": kernel_id, "user": user, "backend": "local", "host": ""}


def fields_of(line: dict[str, Any]) -> dict[str, Any]:
    return {k: line.get(k) for k in logs.KERNEL_FIELDS}


async def test_json_lines_name_their_kernel_and_never_the_token(gateway_factory):
    gw = gateway_factory(extra_args=["--log-format", "json", "--log-level", "DEBUG"])
    wrong = "not-the-token-" + gw.token[:6]
    kid = (await start_kernel(gw, env={"KERNEL_USERNAME": "ada"}))["id"]
    # left running: the gateway's own shutdown stops it
    left = (await start_kernel(gw, env={"KERNEL_USERNAME": "carol"}))["id"]
    # a failed start: the registry has let go of the kernel when it logs the failure
    status, _ = await api(
        gw, "POST", "api/kernels", {"name": "broken", "env": {"KERNEL_USERNAME": "bob"}}
    )
    assert status == 500

    ks = await KernelSocket.open(gw, kid, query_token=True)  # the token in the URL
    try:
        await ks.execute("1 + 1")
        await ks.ws.send("not a kernel message")  # a line logged while the socket is open
    finally:
        await ks.close()
    with pytest.raises(Exception, match="403"):
        await KernelSocket.open(gw, kid, token=wrong, query_token=True)

    assert (await api(gw, "POST", f"api/kernels/{kid}/restart"))[0] == 200
    # the kernel dies: its monitor, a task the start created, restarts it
    [pid] = processes_matching(f"kernel-{kid}")
    os.kill(pid, signal.SIGKILL)
    await eventually(
        lambda: [p for p in processes_matching(f"kernel-{kid}") if p != pid],
        what="the kernel restarted after it died",
        timeout=30,
    )
    await eventually(
        lambda: api(gw, "GET", f"api/kernels/{kid}"),
        until=lambda answer: answer[1]["gateway"]["state"] == "running",
        timeout=30,
    )
    assert (await api(gw, "GET", "api/kernels"))[0] == 200  # about no kernel
    assert (await api(gw, "DELETE", f"api/kernels/{kid}"))[0] == 204
    assert gw.stop() == 0

    text = gw.log()
    assert gw.token not in text and wrong not in text
    lines = records(gw)
    failed = containing(lines, "did not start")
    fid = failed["kernel_id"]
    assert fid != kid and fid in failed["message"] and "broken" in failed["message"], failed

    # every line that names a kernel carries its fields (its backend is "none" until the
    # provisioner exists: the first stage of a launch)
    for line in lines:
        for kernel_id, user in ((kid, "ada"), (fid, "bob"), (left, "carol")):
            if kernel_id in line["message"]:
                fields = fields_of(line)
                if fields["backend"] == "none":
                    fields["backend"] = "local"
                assert fields == about(kernel_id, user), line

    ada, bob, carol = about(kid, "ada"), about(fid, "bob"), about(left, "carol")
    expected = [
        (one(lines, "of the start", message=f"kernel {kid} (python3) started"), ada),
        (access(lines, "POST", "/api/kernels", 201), ada),
        (failed, bob),
        (access(lines, "POST", "/api/kernels", 500), bob),
        (access(lines, "GET", f"/api/kernels/{kid}/channels", 101), ada),
        (containing(lines, "dropped a bad frame from a client"), ada),
        (access(lines, "GET", f"/api/kernels/{kid}/channels", 403), ada),
        (access(lines, "POST", f"/api/kernels/{kid}/restart", 200), ada),
        (one(lines, "of the death", message=f"kernel {kid} died; restarting it"), ada),
        (access(lines, "DELETE", f"/api/kernels/{kid}", 204), ada),
        (one(lines, "of the stop", message=f"kernel {kid} (python3) stopped"), ada),
        (one(lines, "of the last stop", message=f"kernel {left} (python3) stopped"), carol),
    ]
    for line, kernel in expected:
        assert fields_of(line) == kernel, line
    # and the lines about no kernel carry none: nothing leaks from one request to the next
    for line in lines:
        if line.get("path") == "/api/kernels" and line.get("method") == "GET":
            assert "kernel_id" not in line, line
    assert "kernel_id" not in one(lines, "of the stop", message="gateway stopped")


async def test_forwarded_for_is_believed_only_from_a_trusted_proxy(gateway_factory):
    plain = gateway_factory()  # text format
    proxied = gateway_factory(extra_args=["--log-format", "json", "--trusted-proxy", "127.0.0.1"])
    chains = ["198.51.100.1, 203.0.113.7", "203.0.113.7, 127.0.0.1"]  # client, proxies
    for gw in (plain, proxied):
        for n, chain in enumerate(chains):
            status, _ = await api(  # a 404 is logged at INFO
                gw, "GET", f"api/kernels/nope-{n}", headers={"X-Forwarded-For": chain}
            )
            assert status == 404
        gw.stop()

    text = [line for line in plain.log().splitlines() if "GET /api/kernels/nope-" in line]
    assert len(text) == 4, text  # the handler's line and the access line, twice
    access_lines = [line for line in text if "ms" in line.rsplit(" ", 1)[-1]]
    assert len(access_lines) == 2 and all("(127.0.0.1)" in line for line in access_lines), text
    assert "203.0.113.7" not in plain.log() and "198.51.100.1" not in plain.log()

    for n in range(2):
        line = access(records(proxied), "GET", f"/api/kernels/nope-{n}", 404)
        assert line["client"] == "203.0.113.7", line
        assert "(203.0.113.7)" in line["message"], line


def test_a_trusted_proxy_that_is_no_address_stops_the_gateway(tmp_path):
    run = subprocess.run(
        [
            *(sys.executable, "-m", "gateway", "serve", "--port", str(free_port())),
            *("--state-db", ":memory:", "--no-auth", "--trusted-proxy", "proxy.example.org"),
        ],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=tmp_path,
    )
    assert run.returncode == 2, run
    assert run.stderr.strip() == (
        "BadRequest: --trusted-proxy 'proxy.example.org' is not an IP address or network "
        "(RKG_TRUSTED_PROXIES)"
    ), run.stderr


# -- the pure parts ---------------------------------------------------------------------------

PROXIES = logs.trusted_networks(["127.0.0.1", "10.0.0.0/8", "::1"])


@pytest.mark.unit
@pytest.mark.parametrize(
    ("peer", "forwarded", "client"),
    [
        ("192.0.2.1", ["203.0.113.7"], "192.0.2.1"),  # not a proxy: its header is ignored
        ("127.0.0.1", [], "127.0.0.1"),  # a proxy that says nothing
        ("127.0.0.1", ["203.0.113.7"], "203.0.113.7"),
        ("127.0.0.1", ["198.51.100.1, 203.0.113.7"], "203.0.113.7"),  # the left is the client's
        ("127.0.0.1", ["203.0.113.7, 10.1.2.3"], "203.0.113.7"),  # past a chain of proxies
        ("127.0.0.1", ["203.0.113.7", "10.1.2.3"], "203.0.113.7"),  # over several headers
        ("127.0.0.1", ["10.9.9.9, 10.1.2.3"], "10.9.9.9"),  # all proxies: the farthest
        ("127.0.0.1", ["203.0.113.7, junk, 10.1.2.3"], "10.1.2.3"),  # stops at what is no address
        ("::1", ["2001:db8::7"], "2001:db8::7"),
    ],
)
def test_client_address(peer, forwarded, client):
    assert logs.client_address(peer, forwarded, PROXIES) == client


@pytest.mark.unit
@pytest.mark.parametrize(
    ("text", "clean"),
    [
        (
            "GET /api/kernels/k/channels?token=s3cret",
            "GET /api/kernels/k/channels?token=[redacted]",
        ),
        ("/x?session_id=1&token=s3cret&y=2", "/x?session_id=1&token=[redacted]&y=2"),
        ("{'Authorization': 'token s3cret'}", "{'Authorization': 'token [redacted]'}"),
        ("Authorization: Bearer s3cret", "Authorization: Bearer [redacted]"),
        ("add ?token=<token> to the URL", "add ?token=<token> to the URL"),  # a help text
        ("kernel 5 started", "kernel 5 started"),
    ],
)
def test_redact(text, clean):
    assert logs.redact(text) == clean


@dataclass
class Kernel:
    id: str
    user: str
    backend: str
    location: str


@pytest.mark.unit
def test_json_format_and_the_kernel_of_a_task():
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(logs.KernelFilter())
    handler.setFormatter(logs.JsonFormatter())
    log = logging.getLogger("test_logs.json")
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.INFO)
    kernel = Kernel("k1", "ada", "ssh", "gpu1")

    async def work() -> None:
        log.info("in a task made inside")

    async def main() -> None:
        with logs.about(kernel):
            log.info("GET /x?token=s3cret", extra={"status": 200})
            inside = asyncio.create_task(work())
        outside = asyncio.create_task(work())
        await asyncio.gather(inside, outside)
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")

    asyncio.run(main())
    first, inside, outside, failed = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["message"] == "GET /x?token=[redacted]" and first["status"] == 200
    assert first["logger"] == "test_logs.json" and first["level"] == "INFO"
    assert (
        fields_of(first)
        == fields_of(inside)
        == {
            "kernel_id": "k1",
            "user": "ada",
            "backend": "ssh",
            "host": "gpu1",
        }
    )
    assert "kernel_id" not in outside and "kernel_id" not in failed
    assert failed["exc_info"].endswith("ValueError: boom")

    # a task that outlives its kernel does not keep it: the id stays, the rest is blank
    context = contextvars.copy_context()
    gone = Kernel("k2", "bob", "local", "")
    context.run(logs.concerning, gone)
    del gone
    context.run(log.info, "later")
    assert fields_of(json.loads(out.getvalue().splitlines()[-1])) == {
        "kernel_id": "k2",
        "user": "",
        "backend": "",
        "host": "",
    }
