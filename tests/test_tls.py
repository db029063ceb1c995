"""TLS in the gateway's own process (--certfile/--keyfile), with a CA and a certificate for
127.0.0.1 made at test time (trustme): the real clients over https and wss, jupyter_server's
gateway client trusting the CA through GatewayClient.ca_certs and @jupyterlab/services 7 in
Node through NODE_EXTRA_CA_CERTS; and plain http to the TLS port refused without harm."""

from __future__ import annotations

import json
import secrets
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from jsserver import Served, jupyter_server_args
from test_node_clients import assert_no_kernel_left, run_flow

from conftest import GatewayProcess, _cleanup, free_port
from gwclient import KernelSocket, api


@dataclass
class TLSGateway(GatewayProcess):
    ca_path: Path | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/"

    @property
    def ws_url(self) -> str:
        return f"wss://127.0.0.1:{self.port}/"

    def get(self, path: str) -> tuple[int, object]:
        """GET over https, trusting only the test CA."""
        context = ssl.create_default_context(cafile=str(self.ca_path))
        req = urllib.request.Request(
            self.url + path, headers={"Authorization": f"token {self.token}"}
        )
        with urllib.request.urlopen(req, timeout=10, context=context) as r:
            return r.status, json.loads(r.read())


@pytest.fixture(scope="module")
def tls_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSGateway]:
    tmp = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    cert.private_key_pem.write_to_path(str(tmp / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp / "cert.pem"))
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(str(tmp / "cert.pem"), append=True)
    gw = TLSGateway(
        port=free_port(),
        token=secrets.token_hex(16),
        extra_args=[
            *("--certfile", str(tmp / "cert.pem"), "--keyfile", str(tmp / "key.pem")),
            *("--working-dir-root", str(tmp_path_factory.getbasetemp())),  # jupyter_server's
        ],
        workdir=tmp,
        ca_path=tmp / "ca.pem",
    )
    # start() waits for GET /api with urllib, whose default context reads SSL_CERT_FILE
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SSL_CERT_FILE", str(gw.ca_path))
        gw.start()
    yield gw
    leftovers = _cleanup(gw)
    assert not leftovers, f"kernel processes left behind: {leftovers}"


def test_announces_https(tls_gateway):
    assert f"gateway at https://127.0.0.1:{tls_gateway.port}/" in tls_gateway.log()
    assert tls_gateway.get("api/kernels") == (200, [])


def test_plain_http_to_the_tls_port_fails_cleanly(tls_gateway):
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"http://127.0.0.1:{tls_gateway.port}/api", timeout=10)
    assert tls_gateway.proc.poll() is None
    assert tls_gateway.get("api")[0] == 200
    assert "Traceback" not in tls_gateway.log()


async def test_jupyter_server_over_https(tls_gateway, tmp_path, monkeypatch):
    gw = tls_gateway
    # jupyter_server 2 passes GatewayClient.ca_certs to its websocket, but to its REST
    # requests only beside a client_cert: those trust the CA through SSL_CERT_FILE
    monkeypatch.setenv("SSL_CERT_FILE", str(gw.ca_path))
    js = Served(free_port(), secrets.token_hex(16), tmp_path)
    js.start(
        jupyter_server_args(
            js,
            f"--gateway-url={gw.url.rstrip('/')}",
            f"--GatewayClient.auth_token={gw.token}",
            f"--GatewayClient.ca_certs={gw.ca_path}",
            "--GatewayClient.request_timeout=60",
        ),
        "api/status",
    )
    ks = None
    try:
        body = {"path": "tls.ipynb", "type": "notebook", "name": "", "kernel": {"name": "python3"}}
        status, session = await api(js, "POST", "api/sessions", body)
        assert status == 201, (session, js.log()[-3000:])
        kid = session["kernel"]["id"]
        assert [k["id"] for k in gw.get("api/kernels")[1]] == [kid]  # the gateway's kernel
        ks = await KernelSocket.open(js, kid)  # jupyter_server -> wss -> the gateway
        out, reply = await ks.execute("print(6 * 7)")
        assert (out, reply["status"]) == ("42\n", "ok")
        await ks.close()
        ks = None
        status, _ = await api(js, "DELETE", f"api/sessions/{session['id']}")
        assert status == 204
        assert gw.get("api/kernels") == (200, [])
    finally:
        if ks is not None:
            await ks.close()
        js.stop()


@pytest.mark.node
def test_services7_over_https_and_wss(node, tls_gateway, monkeypatch):
    monkeypatch.setenv("NODE_EXTRA_CA_CERTS", str(tls_gateway.ca_path))
    steps = {s["step"]: s for s in run_flow(node, tls_gateway, "services7_flow.mjs")}
    assert steps["execute"]["out"] == "42\n"
    assert "shutdown" in steps
    assert_no_kernel_left(tls_gateway)
