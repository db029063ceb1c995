"""The status page and what it reads.

    GET /                 the page: static HTML, no token (it holds no data; its script asks
                          /api/status with the token the user gives it)
    GET /static/FILE      the page's script and style, bundled (no CDN)
    GET /api/status       JSON, token-protected: the gateway's own figures, every kernel, the
                          hosts and engines the kernelspecs depend on and whether they answer,
                          the last failed starts (newest first), the warm pools

The hosts are checked by `HostChecks`: each distinct provisioner config's `reachable()`, all
at once, each bounded in time, in a background task started by a read of /api/status at most
every `interval` seconds (no checks while nobody looks). /api/status never waits for them: it
answers with the last results, `checked: null` before the first.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tornado import web

from .. import __version__, wire
from ..kernels.registry import KernelRegistry
from .base import APIHandler

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent.parent / "static"
_LOADED = time.monotonic()  # the uptime's origin: imported by app.py as the gateway starts


class SpecSource(Protocol):
    """What the checks need of the registry (KernelRegistry.spec_provisioners)."""

    def spec_provisioners(self) -> tuple[tuple[str, type[Any], dict[str, Any]], ...]: ...


@dataclass
class _Host:
    """One distinct (provisioner class, config), the kernelspecs naming it, and its last check."""

    cls: type[Any]
    config: dict[str, Any]
    kernelspecs: list[str] = field(default_factory=list)

    @property
    def backend(self) -> str:
        own = getattr(self.cls, "backend", "")
        return own if isinstance(own, str) and own else self.cls.__name__


class HostChecks:
    """The reachability of what the kernelspecs depend on, as last checked. Made by serve(),
    which calls `close()` at shutdown."""

    def __init__(self, registry: SpecSource, *, interval: float = 15, timeout: float = 5):
        self.registry = registry
        self.interval = interval
        self.timeout = timeout
        self._hosts: dict[str, _Host] = {}
        self._results: dict[str, tuple[float, list[dict[str, str]]]] = {}  # key -> (when, checks)
        self._round: asyncio.Task[None] | None = None
        self._round_began = -float(interval)

    def hosts(self) -> list[dict[str, Any]]:
        """Called by /api/status: the hosts with their last results; starts a round of checks
        in the background when the last began `interval` seconds ago or more."""
        self._refresh()
        out = []
        for key, host in self._hosts.items():
            when, checks = self._results.get(key, (None, None))
            out.append(
                {
                    "backend": host.backend,
                    "provisioner": host.cls.__name__,
                    "kernelspecs": host.kernelspecs,
                    "checked": wire.iso(when) if when is not None else None,
                    "checks": checks,  # [{label, error ('' when it answers)}]; None: not yet
                }
            )
        return out

    async def close(self) -> None:
        if self._round is not None:
            self._round.cancel()
            with suppress(asyncio.CancelledError):
                await self._round

    def _refresh(self) -> None:
        now = time.monotonic()
        if self._round is not None and not self._round.done():
            return
        if now - self._round_began < self.interval:
            return
        self._round_began = now
        # the kernelspecs are read from disk here too, so at most once per interval
        self._hosts = self._find_hosts()
        self._results = {k: v for k, v in self._results.items() if k in self._hosts}
        self._round = asyncio.get_running_loop().create_task(
            self._check_all(), name="status page host checks"
        )

    def _find_hosts(self) -> dict[str, _Host]:
        try:
            found = self.registry.spec_provisioners()
        except Exception as e:  # a kernelspec directory that cannot be read: keep what we had
            log.warning("status page: the kernelspecs could not be read: %s", e)
            return self._hosts
        hosts: dict[str, _Host] = {}
        for name, cls, config in found:
            same = json.dumps(config, sort_keys=True, default=str)
            key = f"{cls.__module__}.{cls.__qualname__} {same}"
            hosts.setdefault(key, _Host(cls, config)).kernelspecs.append(name)
        return hosts

    async def _check_all(self) -> None:
        await asyncio.gather(*(self._check(key, host) for key, host in self._hosts.items()))

    async def _check(self, key: str, host: _Host) -> None:
        """One host's `reachable()`, bounded; whatever it does, a result (never an exception)."""
        try:
            async with asyncio.timeout(self.timeout):
                found = await host.cls.reachable(dict(host.config))
            checks = [{"label": str(label), "error": str(error)} for label, error in found]
        except TimeoutError:
            checks = self._all_failed(key, host, f"no answer within {self.timeout:g} s")
        except Exception as e:  # a backend's bug must not break the page
            log.warning("status page: %s.reachable failed", host.cls.__name__, exc_info=True)
            checks = self._all_failed(key, host, f"the check failed: {type(e).__name__}: {e}")
        self._results[key] = (time.time(), checks)

    def _all_failed(self, key: str, host: _Host, error: str) -> list[dict[str, str]]:
        """The labels of the last result (else the backend's name), each with `error`."""
        _, last = self._results.get(key, (None, None))
        labels = [c["label"] for c in last or []] or [host.backend]
        return [{"label": label, "error": error} for label in labels]


def rss_bytes() -> int:
    """The gateway's resident memory now (Linux), else its peak."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class StatusHandler(APIHandler):
    """GET /api/status: what the page shows."""

    registry: KernelRegistry
    host_checks: HostChecks

    def get(self) -> None:
        # a non-admin (users.py) sees their own kernels and failed starts, and no hosts
        user = self.user
        kernels = [k for k in list(self.registry.kernels.values()) if user.sees(k.owner)]
        models = [k.model() for k in kernels]
        self.write_json(
            {
                "gateway": self._figures(models),
                # the page hides its buttons when this is false
                "admin": user.admin,
                "kernels": [_kernel(m) for m in models],
                "hosts": self.host_checks.hosts() if user.admin else [],
                "failures": [
                    {**f, "at": wire.iso(f["at"])}
                    for f in reversed(self.registry.failures)
                    if user.admin or f["user"] == user.name
                ],
                # [{spec, size, ready, launching, stage, failing}]: kernels no one has yet
                "pools": self.registry.pool.status(),
            }
        )

    def _figures(self, models: list[dict[str, Any]]) -> dict[str, Any]:
        by_state: dict[str, int] = {}
        for m in models:
            by_state[m["gateway"]["state"]] = by_state.get(m["gateway"]["state"], 0) + 1
        if self.registry.pool.ready():
            by_state["pooled"] = self.registry.pool.ready()
        return {
            "version": __version__,
            "pid": os.getpid(),
            "time": wire.iso(time.time()),
            "uptime": round(time.monotonic() - _LOADED, 1),
            "rss_bytes": rss_bytes(),
            "kernels": by_state,
            "connections": sum(m["connections"] for m in models),
            "base_url": self.config.base_url,
        }


def _kernel(model: dict[str, Any]) -> dict[str, Any]:
    ours = model["gateway"]
    return {
        "id": model["id"],
        "spec": model["name"],
        "backend": ours["backend"],
        "host": ours["host"],
        "user": ours["user"],
        "state": ours["state"],
        "execution_state": model["execution_state"],
        "stage": ours["stage"],
        "connections": model["connections"],
        "started": ours["started"],
        "last_activity": model["last_activity"],
    }


class StaticHandler(web.StaticFileHandler):
    """The page's files, without a token: there is nothing secret in them."""

    def initialize(  # type: ignore[override]
        self, path: str = str(STATIC), default_filename: str | None = None, **collaborators: Any
    ) -> None:
        super().initialize(path=str(STATIC))
        self.route = collaborators.get("route", "other")  # the metrics' label

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """A missing file (404) as JSON {"reason", "message"}, as every route's errors
        (tornado's would be HTML); the message names no path of this machine."""
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(json.dumps({"reason": self._reason, "message": self._reason}))

    def set_extra_headers(self, path: str) -> None:
        # revalidate (ETag) every time, so an upgraded gateway never runs an old script
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Content-Type-Options", "nosniff")


class PageHandler(StaticHandler):
    """GET / (under the base URL): index.html. Its script reads the token from `?token=`
    (then drops it from the address bar) or from a form."""

    async def get(self, path: str = "", include_body: bool = True) -> None:
        if not self.request.path.endswith("/"):
            # /gw -> /gw/, relative to where the client is (a proxy may add a prefix): the
            # page's URLs are relative, and need the slash
            last = self.request.path.rsplit("/", 1)[-1]
            self.redirect(f"{last}/" + (f"?{self.request.query}" if self.request.query else ""))
            return
        await super().get("index.html", include_body)

    def head(self, path: str = "") -> Any:
        return self.get(path, include_body=False)

    def set_extra_headers(self, path: str) -> None:
        super().set_extra_headers(path)
        # only the page's own files: an injected script or style has nowhere to come from
        self.set_header(
            "Content-Security-Policy",
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'",
        )
        self.set_header("Referrer-Policy", "no-referrer")  # the URL may still hold ?token=


routes: list[tuple[str, type[web.RequestHandler]]] = [
    (r"?", PageHandler),
    (r"static/(?P<path>[\w.-]+)", StaticHandler),
    (r"api/status/?", StatusHandler),
]
