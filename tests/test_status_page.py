"""The status page (/) in a real headless Chromium, driven by Selenium through chromedriver, and
the JSON it reads (/api/status) without a browser.

The browser may talk to loopback only: every host name but 127.0.0.1 fails to resolve, and
every other address goes to a proxy on 127.0.0.1:9 that does not exist; its background
services (updates, sync, safe browsing...) are off. Each browser test gets a tab of its own
(so a sessionStorage of its own) and leaves a screenshot in $RKG_TEST_ARTIFACTS, else
tests/artifacts/.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from conftest import (
    KERNELSPECS,
    ROOT,
    eventually,
    eventually_sync,
    free_port,
    require_infra,
    rkg,
    stop_process,
)
from gateway import __version__
from gateway.backends.contract import GatewayHooks
from gateway.handlers.status import HostChecks
from gwclient import KernelSocket, api, start_kernel

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(os.environ.get("RKG_TEST_ARTIFACTS") or ROOT / "tests" / "artifacts")


# -- the browser ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        require_infra("chromium is not installed (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",  # as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1000",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
        # loopback only (see the module's docstring)
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--proxy-server=http://127.0.0.1:9",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--disable-domain-reliability",
        "--disable-client-side-phishing-detection",
        "--no-first-run",
        "--no-default-browser-check",
        "--no-pings",
    ):
        options.add_argument(arg)
    log = tmp_path_factory.mktemp("chromedriver") / "chromedriver.log"
    try:
        driver = webdriver.Chrome(
            service=Service(str(CHROMEDRIVER), log_output=str(log)), options=options
        )
    except WebDriverException as e:
        pytest.fail(f"chromium did not start: {e.msg}\n{log.read_text(errors='replace')}")
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture
def page(browser: WebDriver, request: pytest.FixtureRequest) -> Iterator[WebDriver]:
    """A fresh tab (its own sessionStorage); a screenshot of it is kept after the test."""
    first = browser.current_window_handle
    browser.switch_to.new_window("tab")
    try:
        yield browser
    finally:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        name = re.sub(r"[^\w.-]+", "_", request.node.name)
        dismiss_alert(browser)
        browser.save_screenshot(str(ARTIFACTS / f"status_page-{name}.png"))
        browser.close()
        browser.switch_to.window(first)


def dismiss_alert(driver: WebDriver) -> None:
    try:
        driver.switch_to.alert.dismiss()
    except NoAlertPresentException:
        pass


def wait(
    driver: WebDriver, what: str, cond: Callable[[WebDriver], Any], timeout: float = 15
) -> Any:
    """Until `cond(driver)` is truthy; the message says what was awaited, and what the page
    showed."""
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(cond)
    except Exception as e:
        shown = driver.execute_script("return document.body ? document.body.innerText : ''")
        raise AssertionError(
            f"{what}: not so within {timeout} s ({e!r}); the page:\n{shown}"
        ) from None


def visible(driver: WebDriver, element_id: str) -> bool:
    return bool(driver.execute_script(f"return !document.getElementById('{element_id}').hidden"))


def text_of(driver: WebDriver, element_id: str) -> str:
    return str(driver.execute_script(f"return document.getElementById('{element_id}').innerText"))


def logged_in(driver: WebDriver) -> bool:
    """The board is up and shows the gateway's figures."""
    return visible(driver, "board") and __version__ in text_of(driver, "figures")


ROWS = """
return Array.from(document.querySelectorAll(arguments[0] + ' tbody tr')).map(tr => {
  const row = {id: tr.dataset.kernelId || '', text: tr.innerText};
  for (const td of tr.querySelectorAll('td[data-field]')) row[td.dataset.field] = td.innerText;
  const buttons = tr.querySelector('td.actions');
  row.buttons = buttons ? !buttons.hidden : false;
  return row;
});
"""


def rows(driver: WebDriver, table: str = "#kernels") -> list[dict[str, Any]]:
    """The rows of a table as the page shows them: {field: text} (read in one go, so a row
    replaced meanwhile is never half-read)."""
    found: list[dict[str, Any]] = driver.execute_script(ROWS, table)
    return found


def kernel_row(driver: WebDriver, kernel_id: str) -> dict[str, Any] | None:
    return next((r for r in rows(driver) if r["id"] == kernel_id), None)


def click(driver: WebDriver, kernel_id: str, action: str) -> None:
    driver.find_element(
        By.CSS_SELECTOR, f'#kernels tr[data-kernel-id="{kernel_id}"] button[data-action="{action}"]'
    ).click()


def login(driver: WebDriver, url: str, token: str) -> None:
    driver.get(f"{url}?token={token}")
    wait(driver, "the page logged in", logged_in)


# -- /api/status without a browser ------------------------------------------------------------


async def test_api_status_needs_the_token_and_the_page_does_not(gateway):
    status, body = await api(gateway, "GET", "api/status", token="")
    assert status == 401 and body["reason"] == "Unauthorized" and "token" in body["message"]
    status, body = await api(gateway, "GET", "api/status", token="wrong")
    assert status == 403 and body["reason"] == "Forbidden"
    # the page and its files hold no data: no token, and a policy that lets nothing else in
    status, html = await api(gateway, "GET", "", token="")
    assert status == 200 and b"static/status.js" in html
    status, js = await api(gateway, "GET", "static/status.js", token="")
    assert status == 200 and b"api/status" in js
    status, _ = await api(gateway, "GET", "static/nothing.js", token="")
    assert status == 404


async def test_api_status_shape(gateway):
    kernel = await start_kernel(gateway)
    # two failed starts: the newest is listed first
    status, _ = await api(gateway, "POST", "api/kernels", {"name": "broken"})
    assert status == 500
    status, _ = await api(
        gateway,
        "POST",
        "api/kernels",
        {"name": "slowstart", "env": {"KERNEL_LAUNCH_TIMEOUT": "1", "KERNEL_USERNAME": "ada"}},
    )
    assert status == 504
    status, body = await api(gateway, "GET", "api/status")
    assert status == 200
    assert set(body) == {"gateway", "admin", "kernels", "hosts", "failures", "pools"}
    assert body["pools"] == []  # no --pool (tests/test_pool.py has them)
    g = body["gateway"]
    assert g["version"] == __version__ and g["pid"] == gateway.proc.pid
    assert 0 < g["uptime"] < 3600 and g["rss_bytes"] > 10 * 2**20
    assert g["kernels"] == {"running": 1} and g["connections"] == 0
    assert g["base_url"] == "/" and re.fullmatch(r"\d{4}-\d\d-\d\dT[\d:.]+Z", g["time"])
    assert body["admin"] is True
    (k,) = body["kernels"]
    assert k == {
        "id": kernel["id"],
        "spec": "python3",
        "backend": "local",
        "host": "",
        "user": "",
        "state": "running",
        "execution_state": k["execution_state"],
        "stage": "",
        "connections": 0,
        "started": kernel["gateway"]["started"],
        "last_activity": k["last_activity"],
    }
    assert k["execution_state"] in ("idle", "starting")
    newest, older = body["failures"][:2]
    assert (newest["name"], newest["outcome"], newest["user"]) == ("slowstart", "timeout", "ada")
    assert (older["name"], older["outcome"], older["backend"]) == ("broken", "error", "local")
    assert older["reason"] and newest["seconds"] >= 1
    assert newest["at"] >= older["at"]  # ISO times compare as text
    # the first answer never waits for the checks
    local = next(h for h in body["hosts"] if h["backend"] == "local")
    assert {"python3", "broken", "slowstart"} <= set(local["kernelspecs"])
    assert local["checks"] is None and local["checked"] is None
    hosts = await eventually(
        lambda: api(gateway, "GET", "api/status"),
        until=lambda r: all(h["checked"] for h in r[1]["hosts"]),
        what="every host checked",
    )
    local = next(h for h in hosts[1]["hosts"] if h["backend"] == "local")
    assert all(c["error"] == "" for c in local["checks"]), local  # this machine answers
    assert (await api(gateway, "DELETE", f"api/kernels/{kernel['id']}"))[0] == 204


# -- the host checks, on their own ------------------------------------------------------------
# The real backends bound their own checks and never raise; these stand-ins do what a foreign
# or broken provisioner might, which no real component here does.


class _Answers(GatewayHooks):
    backend = "answers"
    calls = 0

    @classmethod
    async def reachable(cls, config: dict[str, Any]) -> list[tuple[str, str]]:
        cls.calls += 1
        return [(config["host"], "")]


class _Hangs(GatewayHooks):
    backend = "hangs"
    cancelled = False

    @classmethod
    async def reachable(cls, config: dict[str, Any]) -> list[tuple[str, str]]:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cls.cancelled = True
            raise
        return []


class _Raises(GatewayHooks):
    backend = "raises"

    @classmethod
    async def reachable(cls, config: dict[str, Any]) -> list[tuple[str, str]]:
        raise RuntimeError("boom")


class _Garbage(GatewayHooks):
    backend = "garbage"

    @classmethod
    async def reachable(cls, config: dict[str, Any]) -> list[tuple[str, str]]:
        return ["not a pair"]  # type: ignore[list-item]


class _Specs:
    def __init__(self, *found: tuple[str, type[Any], dict[str, Any]]) -> None:
        self.found = found

    def spec_provisioners(self) -> tuple[tuple[str, type[Any], dict[str, Any]], ...]:
        return self.found


@pytest.mark.unit
async def test_host_checks_are_grouped_bounded_cached_and_never_raise():
    specs = _Specs(
        ("a", _Answers, {"host": "h1"}),
        ("b", _Answers, {"host": "h1"}),  # the same host: checked once, for both
        ("c", _Answers, {"host": "h2"}),
        ("d", _Hangs, {}),
        ("e", _Raises, {}),
        ("f", _Garbage, {}),
    )
    checks = HostChecks(specs, interval=60, timeout=0.2)
    first = checks.hosts()  # answers at once: the checks run in the background
    assert [h["kernelspecs"] for h in first] == [["a", "b"], ["c"], ["d"], ["e"], ["f"]]
    assert [h["backend"] for h in first] == ["answers", "answers", "hangs", "raises", "garbage"]
    assert all(h["checks"] is None and h["checked"] is None for h in first)
    hosts = await eventually(
        checks.hosts, until=lambda hs: all(h["checks"] is not None for h in hs), timeout=5
    )
    by = {h["kernelspecs"][0]: h["checks"] for h in hosts}
    assert by["a"] == [{"label": "h1", "error": ""}]
    assert by["c"] == [{"label": "h2", "error": ""}]
    assert by["d"] == [{"label": "hangs", "error": "no answer within 0.2 s"}]
    assert by["e"] == [{"label": "raises", "error": "the check failed: RuntimeError: boom"}]
    assert by["f"][0]["error"].startswith("the check failed: ValueError")
    assert all(h["checked"] for h in hosts)
    assert _Answers.calls == 2  # one round within the interval, however often asked
    # past the interval, the next read starts a round; close() ends one in flight
    checks.interval, checks.timeout = 0, 60
    _Hangs.cancelled = False
    checks.hosts()
    await eventually(lambda: _Answers.calls == 4, timeout=5)
    await asyncio.wait_for(checks.close(), 5)
    assert _Hangs.cancelled


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never says a word (a host that hangs)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s.getsockname()[1]


def ssh_spec(specs: Path, name: str, port: int) -> None:
    rkg("spec", "add", "ssh", name, "--host", f"nobody@127.0.0.1:{port}", "--dir", str(specs))


async def test_hosts_that_are_down_show_their_errors(gateway_factory, tmp_path, silent_port, page):
    """An SSH host whose port is closed, and one that accepts and never answers (bounded by
    the check's time limit): /api/status answers at once, then with each one's error, which
    the page shows."""
    specs = tmp_path / "specs"
    ssh_spec(specs, "ssh-closed", free_port())
    ssh_spec(specs, "ssh-silent", silent_port)
    gw = gateway_factory(extra_args=["--kernelspec-dir", str(specs)])

    def ssh_hosts(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return {h["kernelspecs"][0]: h for h in body["hosts"] if h["backend"] == "ssh"}

    status, body = await api(gw, "GET", "api/status")
    assert status == 200
    first = ssh_hosts(body)
    assert set(first) == {"ssh-closed", "ssh-silent"}
    assert all(h["checks"] is None for h in first.values())
    began = time.monotonic()
    _, body = await eventually(
        lambda: api(gw, "GET", "api/status"),
        until=lambda r: all(h["checks"] for h in ssh_hosts(r[1]).values()),
        timeout=20,
        interval=0.2,
        what="both SSH hosts checked",
    )
    assert time.monotonic() - began < 10  # the silent one was given up on
    checked = ssh_hosts(body)
    for name, port in (("ssh-closed", None), ("ssh-silent", silent_port)):
        (check,) = checked[name]["checks"]
        assert check["error"], checked
        if port:
            assert str(port) in check["label"]
    login(page, gw.url, gw.token)

    def shown(name: str) -> Callable[[WebDriver], bool]:
        error = checked[name]["checks"][0]["error"]
        return lambda d: any(
            name in r["text"] and error in r["reachable"] for r in rows(d, "#hosts")
        )

    for name in ("ssh-closed", "ssh-silent"):
        wait(page, f"{name}'s error on the page", shown(name))


# -- the page ------------------------------------------------------------------------------


def test_page_logs_in_from_the_url_and_drops_the_token(gateway, page):
    page.get(f"{gateway.url}?token={gateway.token}")
    wait(page, "the page logged in", logged_in)
    assert page.current_url == gateway.url  # the token is gone from the address bar
    assert "token" not in page.execute_script("return location.href")
    assert page.execute_script("return Object.values(sessionStorage)") == [gateway.token]
    page.refresh()  # kept for the tab
    wait(page, "still logged in after a reload", logged_in)
    page.find_element(By.ID, "logout").click()
    wait(page, "the login form", lambda d: visible(d, "login") and not visible(d, "board"))
    assert page.execute_script("return sessionStorage.length") == 0


def test_page_says_when_the_token_is_missing_or_wrong(gateway, page):
    page.get(gateway.url)
    wait(page, "the login form", lambda d: visible(d, "login"))
    assert "needs a token" in text_of(page, "login-why")
    assert not visible(page, "board")
    page.get(f"{gateway.url}?token=wrong-{gateway.token}")
    wait(page, "the wrong token's message", lambda d: "not valid" in text_of(d, "banner"))
    assert visible(page, "login") and not visible(page, "board")
    assert page.current_url == gateway.url
    page.find_element(By.ID, "token").send_keys(gateway.token)
    page.find_element(By.CSS_SELECTOR, "#login button[type=submit]").click()
    wait(page, "logged in with the form", logged_in)
    assert not visible(page, "banner")


def test_page_without_auth_needs_no_token(gateway_factory, page):
    gw = gateway_factory(token="")  # --no-auth
    page.get(gw.url)
    wait(page, "the page showing the gateway", logged_in)
    assert not visible(page, "login") and not visible(page, "logout")


async def test_page_lists_a_kernel_and_follows_its_shutdown(gateway, page):
    login(page, gateway.url, gateway.token)
    kernel = await start_kernel(gateway)
    row = wait(
        page,
        "the kernel listed, running",
        lambda d: (r := kernel_row(d, kernel["id"])) and r["state"] == "running" and r,
    )
    assert (row["spec"], row["backend"]) == ("python3", "local")
    assert row["execution"] in ("idle", "starting")
    assert row["buttons"]  # admin
    assert "1 running" in text_of(page, "figures")
    assert (await api(gateway, "DELETE", f"api/kernels/{kernel['id']}"))[0] == 204
    wait(page, "the kernel gone from the page", lambda d: kernel_row(d, kernel["id"]) is None)
    assert visible(page, "no-kernels")


async def test_shut_down_button_stops_the_kernel(gateway, page):
    kernel = await start_kernel(gateway)
    pids = gateway.kernel_pids()
    assert pids
    login(page, gateway.url, gateway.token)
    wait(page, "the kernel listed", lambda d: kernel_row(d, kernel["id"]))
    click(page, kernel["id"], "shutdown")
    alert = wait(page, "the confirmation", lambda d: d.switch_to.alert)
    assert kernel["id"] in alert.text
    alert.accept()
    await eventually(
        lambda: api(gateway, "GET", f"api/kernels/{kernel['id']}"),
        until=lambda r: r[0] == 404,
        what="the kernel gone from the API",
    )
    await eventually(lambda: not set(pids) & set(gateway.kernel_pids()), what="its process gone")
    wait(page, "the kernel gone from the page", lambda d: kernel_row(d, kernel["id"]) is None)
    assert not visible(page, "banner")


async def test_interrupt_button_interrupts_a_running_cell(gateway, page):
    kernel = await start_kernel(gateway)
    ks = await KernelSocket.open(gateway, kernel["id"])
    try:
        login(page, gateway.url, gateway.token)
        wait(page, "the kernel listed", lambda d: kernel_row(d, kernel["id"]))
        msg_id = await ks.start_long_cell(60)
        click(page, kernel["id"], "interrupt")
        msgs = await ks.reply_and_idle(msg_id, timeout=20)
        reply = next(m for m in msgs if m["header"]["msg_type"] == "execute_reply")
        assert reply["content"]["status"] == "error"
        assert reply["content"]["ename"] == "KeyboardInterrupt"
    finally:
        await ks.close()
        assert (await api(gateway, "DELETE", f"api/kernels/{kernel['id']}"))[0] == 204


async def test_page_shows_failed_starts_and_hosts(gateway, page):
    status, _ = await api(gateway, "POST", "api/kernels", {"name": "broken"})
    assert status == 500
    failure = (await api(gateway, "GET", "api/status"))[1]["failures"][0]
    login(page, gateway.url, gateway.token)
    row = wait(
        page,
        "the failed start listed",
        lambda d: next((r for r in rows(d, "#failures") if r["id"] == failure["id"]), None),
    )
    assert "broken" in row["text"] and "error" in row["text"]
    assert row["reason"].startswith(failure["reason"].split("\n")[0].strip())
    local = wait(
        page,
        "the local backend's kernelspecs, checked",
        lambda d: next(
            (
                r
                for r in rows(d, "#hosts")
                if "python3" in r["text"] and r["reachable"] != "not checked yet"
            ),
            None,
        ),
    )
    assert local["text"].startswith("local")
    assert local["reachable"] == "nothing to check" or local["reachable"].endswith(": answers")


async def test_page_shows_strings_as_text(gateway, page):
    """What clients choose (here KERNEL_USERNAME, in a kernel's row and a failed start's) is
    shown as it is, never run as HTML."""
    user = '<b id="injected">x</b><img src="nowhere" onerror="document.title=\'hit\'">'
    kernel = await start_kernel(gateway, env={"KERNEL_USERNAME": user})
    status, _ = await api(
        gateway, "POST", "api/kernels", {"name": "broken", "env": {"KERNEL_USERNAME": user}}
    )
    assert status == 500
    try:
        login(page, gateway.url, gateway.token)
        row = wait(page, "the kernel listed", lambda d: kernel_row(d, kernel["id"]))
        assert row["user"] == user
        wait(page, "the failed start listed", lambda d: user in text_of(d, "failures"))
        assert page.find_elements(By.ID, "injected") == []
        assert page.title == "remote-kernel-gateway"
    finally:
        assert (await api(gateway, "DELETE", f"api/kernels/{kernel['id']}"))[0] == 204


async def test_page_under_a_base_url(gateway_factory, page):
    gw = gateway_factory(base_url="/gw/")
    # without the trailing slash: redirected to it, for the page's relative URLs
    page.get(f"http://127.0.0.1:{gw.port}/gw?token={gw.token}")
    wait(page, "the page logged in", logged_in)
    assert page.current_url == gw.url
    assert "/gw/" in text_of(page, "figures")
    await shut_down_from_the_page(gw, page)


async def shut_down_from_the_page(gw: Any, page: WebDriver) -> None:
    """Start a kernel through the API, see it listed, shut it down with the page's button."""
    kernel = await start_kernel(gw)
    wait(page, "the kernel listed", lambda d: kernel_row(d, kernel["id"]))
    click(page, kernel["id"], "shutdown")
    wait(page, "the confirmation", lambda d: d.switch_to.alert).accept()
    wait(page, "the kernel gone from the page", lambda d: kernel_row(d, kernel["id"]) is None)
    assert (await api(gw, "GET", f"api/kernels/{kernel['id']}"))[0] == 404
    assert not visible(page, "banner")


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Callable[[int], str]]:
    """nginx with deploy/nginx.conf (as tests/test_deploy.py runs it) in front of a gateway
    port; returns the proxied base URL."""
    if not Path("/usr/sbin/nginx").exists():
        require_infra("nginx is not installed (apt-get install nginx-light)")
    from test_deploy import nginx_conf

    procs: list[subprocess.Popen[bytes]] = []

    def start(upstream: int) -> str:
        port = free_port()
        (tmp_path / "nginx.conf").write_text(nginx_conf(upstream, port, tmp_path))
        args = ["/usr/sbin/nginx", "-c", str(tmp_path / "nginx.conf"), "-p", str(tmp_path)]
        proc = subprocess.Popen([*args, "-g", "daemon off;"])
        procs.append(proc)

        def listening() -> bool:
            assert proc.poll() is None, (tmp_path / "error.log").read_text()
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True

        eventually_sync(listening, ignore=(OSError,), what="nginx listening")
        return f"http://127.0.0.1:{port}/gw/"

    yield start
    for proc in procs:
        proc.send_signal(signal.SIGQUIT)
        proc.wait(20)


async def test_page_behind_nginx_at_a_sub_path(gateway_factory, nginx, page, tmp_path):
    gw = gateway_factory(base_url="/gw/")
    proxied = nginx(gw.port)
    login(page, proxied, gw.token)
    assert page.current_url == proxied

    through_proxy = SimpleNamespace(url=proxied, token=gw.token)  # what gwclient uses
    await shut_down_from_the_page(through_proxy, page)
    log = (tmp_path / "access.log").read_text()
    assert "GET /gw/api/status HTTP" in log and "DELETE /gw/api/kernels/" in log


def test_the_url_rkg_serve_prints_opens_the_page(tmp_path, page):
    """`rkg serve` with a generated token prints http://127.0.0.1:PORT/?token=...: the page,
    logged in."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RKG_")}
    env["JUPYTER_RUNTIME_DIR"] = str(tmp_path / "runtime")
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "gateway", "serve", "--port", str(port)),
                *("--state-db", ":memory:", "--kernelspec-dir", str(KERNELSPECS)),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
            start_new_session=True,
        )
    try:
        printed = eventually_sync(
            lambda: re.search(r"gateway at (http://\S+\?token=\S+)", log_path.read_text()),
            timeout=30,
            what="the URL printed",
        ).group(1)
        assert printed.startswith(f"http://127.0.0.1:{port}/?token=")
        page.get(printed)
        wait(page, "the page logged in", logged_in)
        assert page.current_url == f"http://127.0.0.1:{port}/"
    finally:
        stop_process(proc)
    assert proc.returncode == 0, log_path.read_text()
