"""REST API: shapes the real clients check, every error path, authentication."""

from __future__ import annotations

import re

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from gwclient import api, start_kernel

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


def assert_error(status: int, body: object, expected: int) -> None:
    assert status == expected, body
    assert isinstance(body, dict) and set(body) == {"reason", "message"}, body
    assert body["reason"] and body["message"]
    assert "Traceback" not in body["message"]


async def test_api_root_needs_no_token(gateway):
    status, body = await api(gateway, "GET", "api", token="")
    assert status == 200 and body["version"]


@pytest.mark.parametrize(
    "path",
    [
        "api/kernels",
        "api/sessions",
        "api/kernelspecs",
        "kernelspecs/python3/logo-64x64.png",
        "api/nope",
    ],
)
async def test_missing_and_wrong_token(gateway, path):
    assert_error(*await api(gateway, "GET", path, token=""), 401)
    assert_error(*await api(gateway, "GET", path, token="wrong"), 403)


async def test_token_in_query_and_bearer(gateway):
    status, _ = await api(gateway, "GET", f"api/kernels?token={gateway.token}", token="")
    assert status == 200
    status, _ = await api(
        gateway,
        "GET",
        "api/kernels",
        token="",
        headers={"Authorization": f"Bearer {gateway.token}"},
    )
    assert status == 200


async def test_kernelspecs_shape_and_resources(gateway):
    status, body = await api(gateway, "GET", "api/kernelspecs?user=alice&123456")
    assert status == 200
    assert body["default"] in body["kernelspecs"]
    spec = body["kernelspecs"]["python3"]
    assert spec["name"] == "python3"
    assert {"argv", "display_name", "language"} <= set(spec["spec"])
    logo = spec["resources"]["logo-64x64"]
    assert logo == "/kernelspecs/python3/logo-64x64.png"
    status, png = await api(gateway, "GET", logo.lstrip("/"))
    assert status == 200 and png[:8] == b"\x89PNG\r\n\x1a\n"
    status, one = await api(gateway, "GET", "api/kernelspecs/python3")
    assert status == 200 and one["name"] == "python3"
    # jupyter_server with KERNEL_USERNAME asks for one spec this way
    status, one = await api(gateway, "GET", "api/kernelspecs?user=alice/python3")
    assert status == 200 and one["name"] == "python3"


@pytest.mark.parametrize(
    "path",
    [
        "kernelspecs/python3/../../../../etc/passwd",
        "kernelspecs/python3/..%2F..%2F..%2Fetc%2Fpasswd",
        "kernelspecs/python3/%2Fetc%2Fpasswd",
        "kernelspecs/python3/nope.png",
        "kernelspecs/nope/logo-64x64.png",
        "api/kernelspecs/nope",
    ],
)
async def test_kernelspec_resource_errors(gateway, path):
    status, body = await api(gateway, "GET", path)
    assert status == 404, body
    assert b"root:" not in (body if isinstance(body, bytes) else str(body).encode())


async def test_kernel_lifecycle_shapes(gateway):
    model = await start_kernel(gateway)
    standard = {"id", "name", "last_activity", "execution_state", "connections"}
    assert set(model) == standard | {"gateway"}  # the gateway's own object beside them
    assert set(model["gateway"]) == {"backend", "spec", "host", "user", "state", "stage", "started"}
    assert model["gateway"]["spec"] == model["name"]
    assert model["gateway"]["state"] == "running" and model["gateway"]["stage"] == ""
    assert ISO.match(model["last_activity"]) and ISO.match(model["gateway"]["started"])
    kid = model["id"]
    status, listed = await api(gateway, "GET", "api/kernels")
    assert status == 200 and kid in [k["id"] for k in listed]
    status, got = await api(gateway, "GET", f"api/kernels/{kid}")
    assert status == 200 and got["id"] == kid
    assert (await api(gateway, "POST", f"api/kernels/{kid}/interrupt", {}))[0] == 204
    status, restarted = await api(gateway, "POST", f"api/kernels/{kid}/restart", {})
    assert status == 200 and restarted["id"] == kid
    assert (await api(gateway, "DELETE", f"api/kernels/{kid}"))[0] == 204
    assert_error(*await api(gateway, "DELETE", f"api/kernels/{kid}"), 404)
    assert_error(*await api(gateway, "GET", f"api/kernels/{kid}"), 404)
    assert gateway.kernel_pids() == []


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"name": "no-such-kernel"}', 404),
        (b"{not json", 400),
        (b"[1, 2]", 400),
        (b'{"name": "python3", "env": "x"}', 400),
        (b'{"name": "python3", "env": {"KERNEL_X": 1}}', 400),
        (b'{"name": "python3", "env": {"KERNEL_LAUNCH_TIMEOUT": "soon"}}', 400),
        (b"\xff\xfe", 400),
    ],
)
async def test_start_kernel_client_errors(gateway, raw, expected):
    assert_error(*await api(gateway, "POST", "api/kernels", raw=raw), expected)


@pytest.mark.parametrize(
    "path",
    [
        "api/kernels/nope",
        "api/kernels/nope/interrupt",
        "api/kernels/nope/restart",
        "api/sessions/nope",
    ],
)
async def test_unknown_ids(gateway, path):
    method = "POST" if path.endswith(("interrupt", "restart")) else "GET"
    assert_error(*await api(gateway, method, path, {}), 404)


async def test_unknown_path_and_method(gateway):
    assert_error(*await api(gateway, "GET", "api/what"), 404)
    status, body = await api(gateway, "PUT", "api/kernels", {})
    assert_error(status, body, 405)


async def test_kernel_that_exits_at_start_is_a_clear_error(gateway):
    status, body = await api(gateway, "POST", "api/kernels", {"name": "broken"})
    assert status == 500 and "exited during start-up" in body["message"], body
    assert "exit code 3" in body["message"]
    assert (await api(gateway, "GET", "api/kernels"))[1] == []


async def test_launch_timeout_is_honoured(gateway):
    status, body = await api(
        gateway, "POST", "api/kernels", {"name": "slowstart", "env": {"KERNEL_LAUNCH_TIMEOUT": "2"}}
    )
    assert status == 504, body
    assert "KERNEL_LAUNCH_TIMEOUT" in body["message"]
    assert (await api(gateway, "GET", "api/kernels"))[1] == []
    assert gateway.kernel_pids() == []


async def test_sessions_both_shapes_patch_delete(gateway):
    status, s = await api(
        gateway,
        "POST",
        "api/sessions",
        {"path": "a.ipynb", "name": "a", "type": "notebook", "kernel": {"name": "python3"}},
    )
    assert status == 201, s
    assert {"id", "path", "name", "type", "kernel"} <= set(s)
    assert s["kernel"]["name"] == "python3"
    # the same path again: the same session
    status, again = await api(
        gateway, "POST", "api/sessions", {"path": "a.ipynb", "kernel": {"name": "python3"}}
    )
    assert status == 201 and again["id"] == s["id"]
    # old shape, attached to the existing kernel
    status, old = await api(
        gateway,
        "POST",
        "api/sessions",
        {"notebook": {"path": "b.ipynb"}, "kernel": {"id": s["kernel"]["id"]}},
    )
    assert status == 201 and old["path"] == "b.ipynb"
    assert old["kernel"]["id"] == s["kernel"]["id"]
    # partial PATCH
    status, renamed = await api(gateway, "PATCH", f"api/sessions/{s['id']}", {"path": "c.ipynb"})
    assert status == 200 and renamed["path"] == "c.ipynb" and renamed["name"] == "a"
    status, listed = await api(gateway, "GET", "api/sessions")
    assert status == 200 and {x["path"] for x in listed} == {"c.ipynb", "b.ipynb"}
    # deleting one session keeps the kernel the other still uses
    assert (await api(gateway, "DELETE", f"api/sessions/{old['id']}"))[0] == 204
    assert (await api(gateway, "GET", f"api/kernels/{s['kernel']['id']}"))[0] == 200
    assert (await api(gateway, "DELETE", f"api/sessions/{s['id']}"))[0] == 204
    assert_error(*await api(gateway, "GET", f"api/kernels/{s['kernel']['id']}"), 404)
    assert gateway.kernel_pids() == []


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"path": 5},
        {"path": "x", "kernel": "python3"},
        {"path": "x", "kernel": {"name": "nope"}},
        {"path": "x", "kernel": {"id": "nope"}},
    ],
)
async def test_session_client_errors(gateway, body):
    status, resp = await api(gateway, "POST", "api/sessions", body)
    assert 400 <= status < 500
    assert_error(status, resp, status)


async def test_session_text_plain_body(gateway):
    """@jupyterlab/services 7 posts JSON as text/plain."""
    status, s = await api(
        gateway,
        "POST",
        "api/sessions",
        raw=b'{"path": "t.py", "type": "file", "name": "", "kernel": {"name": "python3"}}',
        headers={"Content-Type": "text/plain;charset=UTF-8"},
    )
    assert status == 201, s
    assert (await api(gateway, "DELETE", f"api/sessions/{s['id']}"))[0] == 204


async def _headers(gw, method, path, origin, token=""):
    """The response's status and headers (api() decodes only the body)."""
    hdrs = {"Origin": origin}
    if method == "OPTIONS":
        hdrs |= {
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        }
    if token:
        hdrs["Authorization"] = f"token {token}"
    resp = await AsyncHTTPClient().fetch(
        HTTPRequest(gw.url + path, method=method, headers=hdrs, allow_nonstandard_methods=True),
        raise_error=False,
    )
    return resp.code, resp.headers


def _cors(headers):
    return {k: v for k, v in headers.get_all() if k.lower().startswith("access-control-")}


async def test_cors_for_the_allowed_origin_only(gateway_factory):
    lab = "http://lab.example"
    gw = gateway_factory(extra_args=["--allow-origin", lab])
    status, headers = await _headers(gw, "OPTIONS", "api/kernels", lab)
    assert status == 204
    assert headers["Access-Control-Allow-Origin"] == lab
    methods = {m.strip() for m in headers["Access-Control-Allow-Methods"].split(",")}
    assert {"GET", "POST", "PATCH", "DELETE"} <= methods
    allowed = {h.strip().lower() for h in headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type"} <= allowed
    assert "Origin" in headers.get_list("Vary")  # a cache must not serve it to another origin
    # the request itself carries the header too, or the browser hides the response
    status, headers = await _headers(gw, "GET", "api/kernels", lab, token=gw.token)
    assert status == 200 and headers["Access-Control-Allow-Origin"] == lab
    status, headers = await _headers(gw, "GET", "api/kernels", lab)
    assert status == 401 and headers["Access-Control-Allow-Origin"] == lab

    for method, token in (("OPTIONS", ""), ("GET", gw.token)):
        status, headers = await _headers(
            gw, method, "api/kernels", "http://evil.example", token=token
        )
        assert status in (200, 204)
        assert _cors(headers) == {}, f"{method} from another origin: {_cors(headers)}"


async def test_cors_any_origin(gateway_factory):
    gw = gateway_factory(extra_args=["--allow-origin", "*"])
    status, headers = await _headers(gw, "OPTIONS", "api/kernels", "http://any.example")
    assert status == 204 and headers["Access-Control-Allow-Origin"] == "*"


async def test_no_cors_headers_unless_configured(gateway):
    for method, token in (("OPTIONS", ""), ("GET", gateway.token), ("GET", "")):
        status, headers = await _headers(
            gateway, method, "api/kernels", "http://lab.example", token=token
        )
        assert status in (200, 204, 401)
        assert _cors(headers) == {}, f"{method}: {_cors(headers)}"


async def test_base_url(gateway_factory):
    gw = gateway_factory(base_url="/gw/")
    status, body = await api(gw, "GET", "api/kernelspecs")
    assert status == 200
    assert body["kernelspecs"]["python3"]["resources"]["logo-64x64"].startswith("/gw/kernelspecs/")
    model = await start_kernel(gw)
    assert (await api(gw, "DELETE", f"api/kernels/{model['id']}"))[0] == 204
