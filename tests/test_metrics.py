"""/metrics: the Prometheus exposition, read with prometheus_client's own parser, against a
real gateway and real kernels. The figures must move with what the gateway does, stay
behind the token, and never carry an unbounded label (a kernel id)."""

from __future__ import annotations

import pytest

from conftest import eventually
from gwclient import KernelSocket, api, scrape, start_kernel
from gwclient import metric as value


async def test_metrics_need_the_token(gateway):
    status, body = await api(gateway, "GET", "metrics", token="")
    assert status == 401 and set(body) == {"reason", "message"}
    status, _ = await api(gateway, "GET", "metrics", token="not-the-token")
    assert status == 403


async def test_open_on_loopback_lets_a_local_scraper_in(gateway_factory):
    gw = gateway_factory(extra_args=["--metrics-open-on-loopback"])
    samples = await scrape(gw, token="")
    assert ("rkg_websocket_connections", ()) in samples
    # only /metrics is opened
    status, _ = await api(gw, "GET", "api/kernels", token="")
    assert status == 401


async def test_kernels_starts_and_traffic_are_counted(gateway):
    before = await scrape(gateway)
    model = await start_kernel(gateway)
    kid = model["id"]
    ks = await KernelSocket.open(gateway, kid, v1=True)
    try:
        await ks.execute("print('x' * 1000)")
        during = await scrape(gateway)
        assert value(during, "rkg_websocket_connections") >= 1
        assert value(during, "rkg_kernels", state="running", backend="local", spec="python3") >= 1
        ok = value(during, "rkg_kernel_starts_total", backend="local", outcome="ok")
        assert ok == value(before, "rkg_kernel_starts_total", backend="local", outcome="ok") + 1
        started = value(during, "rkg_kernel_start_seconds_count", backend="local")
        assert started == value(before, "rkg_kernel_start_seconds_count", backend="local") + 1
        assert value(during, "rkg_kernel_start_seconds_sum", backend="local") > 0

        # one execute_request in on shell; its reply out on shell; busy, input, stream, idle out
        # on iopub, whose bytes include the 1000 printed characters
        def moved(name: str, **labels: str) -> float:
            return value(during, name, **labels) - value(before, name, **labels)

        assert moved("rkg_messages_total", channel="shell", direction="in") == 1
        assert moved("rkg_messages_total", channel="shell", direction="out") == 1
        assert moved("rkg_messages_total", channel="iopub", direction="out") >= 4
        assert moved("rkg_message_bytes_total", channel="iopub", direction="out") > 1000
        assert moved("rkg_message_bytes_total", channel="shell", direction="in") > 100
    finally:
        await ks.close()
        assert (await api(gateway, "DELETE", f"api/kernels/{kid}"))[0] == 204

    after = await eventually(
        lambda: scrape(gateway),
        until=lambda s: value(s, "rkg_websocket_connections") == 0,
        what="the closed socket to be uncounted",
    )
    assert value(after, "rkg_kernels", state="running", backend="local", spec="python3") == 0


async def test_a_failed_start_is_counted_as_an_error(gateway):
    before = await scrape(gateway)
    status, _ = await api(gateway, "POST", "api/kernels", {"name": "broken"})
    assert status >= 500
    after = await scrape(gateway)
    for outcome, change in (("error", 1), ("ok", 0)):
        was = value(before, "rkg_kernel_starts_total", backend="local", outcome=outcome)
        assert value(after, "rkg_kernel_starts_total", backend="local", outcome=outcome) == (
            was + change
        )


async def test_output_held_for_a_disconnected_session_is_replay_bytes(gateway):
    model = await start_kernel(gateway)
    kid = model["id"]
    try:
        ks = await KernelSocket.open(gateway, kid, session="held-session")
        await ks.send(
            "execute_request",
            {"code": "import time; time.sleep(1); print('y' * 5000)", "silent": False},
        )
        await ks.close()
        samples = await eventually(
            lambda: scrape(gateway),
            until=lambda s: value(s, "rkg_replay_bytes") > 5000,
            what="the printed output held for the session",
        )
        assert value(samples, "rkg_websocket_connections") == 0
        again = await KernelSocket.open(gateway, kid, session="held-session")
        await again.until(lambda m: m["header"]["msg_type"] == "stream")
        await again.close()
        await eventually(
            lambda: scrape(gateway),
            until=lambda s: value(s, "rkg_replay_bytes") == 0,
            what="the replayed output to be released",
        )
    finally:
        await api(gateway, "DELETE", f"api/kernels/{kid}")


async def test_labels_are_bounded_route_patterns_never_ids(gateway):
    model = await start_kernel(gateway)
    kid = model["id"]
    await api(gateway, "GET", f"api/kernels/{kid}")
    await api(gateway, "POST", f"api/kernels/{kid}/interrupt")
    await api(gateway, "GET", "api/kernels/no-such-kernel")
    await api(gateway, "DELETE", f"api/kernels/{kid}")
    status, body = await api(gateway, "GET", "metrics")
    assert status == 200
    text = body.decode()
    assert kid not in text and "no-such-kernel" not in text
    samples = await scrape(gateway)

    def requests(route: str, method: str, status: str) -> float:
        return value(
            samples,
            "rkg_http_request_duration_seconds_count",
            route=route,
            method=method,
            status=status,
        )

    assert requests("/api/kernels/{kernel_id}", "GET", "200") >= 1
    assert requests("/api/kernels/{kernel_id}", "GET", "404") >= 1
    assert requests("/api/kernels/{kernel_id}/{action}", "POST", "204") >= 1
    assert requests("/api/kernels", "POST", "201") >= 1


@pytest.mark.unit
def test_loopback_is_the_peer_address_only():
    from gateway.handlers.metrics import _is_loopback

    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and _is_loopback("127.3.4.5")
    assert not _is_loopback("10.0.0.1") and not _is_loopback("") and not _is_loopback("x")
