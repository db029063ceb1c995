"""The Tornado application, and `serve()`: run until SIGTERM/SIGINT, then shut down in order."""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import os
import re
import signal
import ssl
from contextlib import suppress
from typing import Any

from tornado import httpserver, web, websocket

from . import __version__, auth, edge, logs, metrics
from .backends import local
from .bridge import connection
from .config import Config, is_loopback
from .handlers import base, kernels, kernelspecs, sessions, spec, status
from .handlers import metrics as metrics_handlers
from .kernels import discovery, pool
from .kernels.registry import KernelRegistry
from .sessions import SessionStore
from .state import StateStore
from .users import Tokens

log = logging.getLogger("gateway")


class ApiHandler(base.APIHandler):
    """GET /api: the version, without a token (it is the health check)."""

    def prepare(self) -> None:
        pass

    def get(self) -> None:
        self.write_json({"version": __version__, "gateway": "remote-kernel-gateway"})


def make_app(
    config: Config,
    registry: KernelRegistry,
    store: SessionStore,
    checks: status.HostChecks,
    tokens: Tokens,
) -> web.Application:
    collaborators: dict[str, Any] = {
        "config": config,
        "registry": registry,
        "sessions": store,
        "specs": registry.specs,
        "host_checks": checks,
        "tokens": tokens,
    }
    table = [
        (r"api/?", ApiHandler),
        *spec.routes,
        *kernels.routes,
        *kernelspecs.routes,
        *sessions.routes,
        *connection.routes,
        *metrics_handlers.routes,
        *status.routes,
    ]
    handlers = [
        (config.base_url + pattern, cls, {**collaborators, "route": route_label(pattern)})
        for pattern, cls in table
    ]
    return web.Application(
        handlers,
        default_handler_class=base.NotFoundHandler,
        default_handler_args={**collaborators, "route": "other"},
        websocket_ping_interval=30,
        websocket_ping_timeout=30,
        websocket_max_message_size=256 * 1024 * 1024,
        log_function=functools.partial(_log_request, logs.trusted_networks(config.trusted_proxies)),
    )


def route_label(pattern: str) -> str:
    """A route's pattern as a bounded metrics label: api/kernels/(?P<kernel_id>...)/? ->
    /api/kernels/{kernel_id}."""
    label = re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", pattern)
    label = re.sub(r"\(([\w|]+)\)", r"{\1}", label)  # (interrupt|restart)
    return "/" + label.removesuffix("?").removesuffix("/")


def _log_request(trusted: tuple[logs.Network, ...], handler: web.RequestHandler) -> None:
    """The access log: the path without its query (a websocket's ?token= is there), the
    client as logs.client_address() finds it."""
    status = handler.get_status()
    if not isinstance(handler, websocket.WebSocketHandler):  # its duration is its lifetime
        metrics.request_done(
            getattr(handler, "route", "other"),
            handler.request.method or "",
            status,
            handler.request.request_time(),
        )
    level = logging.DEBUG if status < 400 else logging.INFO
    request = handler.request
    client = logs.client_address(
        request.remote_ip or "", request.headers.get_list("X-Forwarded-For"), trusted
    )
    millis = 1000 * request.request_time()
    log.log(
        level,
        "%d %s %s (%s) %.1fms",
        status,
        request.method,
        request.path,
        client,
        millis,
        extra={
            "status": status,
            "method": request.method,
            "path": request.path,
            "client": client,
            "duration_ms": round(millis, 1),
        },
    )


def kernel_spec_manager(config: Config) -> discovery.SpecManager:
    ksm = discovery.SpecManager()  # also lists the kernelspecs found on SSH hosts
    ksm.kernel_dirs = [*config.kernelspec_dirs, *ksm.kernel_dirs]
    return ksm


def tls_context(config: Config) -> ssl.SSLContext | None:
    """--certfile/--keyfile as a server context (TLS 1.2 at least), or None for plain HTTP."""
    if not config.certfile:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.certfile, config.keyfile or None)
    return context


def announce(config: Config, server_url: str) -> None:
    if config.no_auth and not is_loopback(config.ip):
        log.warning(
            "serving WITHOUT authentication (--no-auth) on a non-loopback address at %s: "
            "ANYONE WHO CAN REACH IT CAN RUN CODE AS THIS USER (--no-auth-i-know-this-is-open)",
            server_url,
        )
    elif config.no_auth:
        log.warning("serving WITHOUT authentication (--no-auth) at %s", server_url)
    elif config.token_generated:
        log.info("gateway at %s?token=%s", server_url, config.token, extra=logs.SHOWS_TOKEN)
        log.info(
            "use it with: jupyter lab --gateway-url=%s --GatewayClient.auth_token=%s",
            server_url.rstrip("/"),
            config.token,
            extra=logs.SHOWS_TOKEN,
        )
    else:
        log.info("gateway at %s (token as configured)", server_url)


def dump_tasks() -> None:
    """SIGUSR1: log where every task is waiting (for a gateway that seems stuck)."""
    import io

    for task in asyncio.all_tasks():
        out = io.StringIO()
        task.print_stack(file=out)
        log.warning("task %s:\n%s", task.get_name(), out.getvalue())


def raise_fd_limit() -> None:
    """Each idle kernel holds about three file descriptors (its iopub socket, libzmq's
    eventfd, a pidfd), each client session three sockets more: the usual soft limit of 1,024
    would cap a gateway at a few hundred kernels. Raised to the hard limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def keep_large_blocks(mb: int) -> None:
    """A message over 32 MiB is received by libzmq into a fresh mmap that glibc unmaps when
    it is freed, so the next one page-faults its way in again (12,000 faults for 50 MB, half
    of the gateway's extra hop on a large print: bench/README.md, "The hop's page faults").
    Blocks up to `mb` come from the heap instead, and freed heap up to `mb` stays for reuse:
    at most that much more RSS after a large message. glibc only; elsewhere nothing."""
    if mb <= 0:
        return
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        return  # not glibc
    if mallopt is not None:
        mallopt(-3, mb * 2**20)  # M_MMAP_THRESHOLD
        mallopt(-1, mb * 2**20)  # M_TRIM_THRESHOLD


def drop_secrets(config: Config) -> None:
    """Nothing this process starts inherits the token or the operator's --secret-env
    variables: not a local kernel (whose env the registry filters too), not a scheduler's
    sbatch (whose job gets its submitter's environment). The config has been read."""
    keep = local.inherited_env(os.environ, config.secret_env)
    for name in set(os.environ) - keep.keys():
        del os.environ[name]


async def serve(config: Config) -> None:
    raise_fd_limit()
    keep_large_blocks(config.malloc_keep_mb)
    drop_secrets(config)
    specs = kernel_spec_manager(config)
    # in the background: the kernelspecs of `discover` templates, read from their hosts; the
    # first read (bounded) comes before re-attaching kernels and sizing pools, which need them
    finder = discovery.Discovery(specs)
    finding = asyncio.create_task(finder.run())
    await finder.settled()
    pools = pool.sizes(config.pools, specs)  # a --pool of no kernelspec: refused, here
    state = StateStore(config.state_db)
    registry = KernelRegistry(config, specs, state, pools)
    # What start-up made so far (modules, classes, config: ~40,000 objects) lives as long as
    # the process; out of the cyclic collector's sight, every full collection, a pause of the
    # whole relay, no longer walks it. Kernels are not frozen: a deleted one's cycles must
    # still be collected.
    gc.collect()
    gc.freeze()
    await registry.restore()
    registry.pool.start()  # after restore: the pooled kernels it re-attached count
    metrics.install(registry)
    store = SessionStore(state, registry.kernels)
    checks = status.HostChecks(registry)
    tokens = Tokens(config.token, state)
    app = make_app(config, registry, store, checks, tokens)
    # no xheaders: Tornado would believe anyone's X-Forwarded-For; the access log asks
    # logs.client_address(), which believes only --trusted-proxy
    server = httpserver.HTTPServer(
        edge.Edge(
            app,
            config,
            functools.partial(auth.authenticate, tokens=tokens, no_auth=not config.token),
        ),
        xheaders=False,
        ssl_options=tls_context(config),
        idle_connection_timeout=config.idle_timeout,  # also the time to send the headers
        body_timeout=config.body_timeout,
        max_body_size=edge.MAX_BODY_BYTES,  # a chunked body (a sized one is refused earlier)
    )
    server.listen(config.port, config.ip)
    host = f"[{config.ip}]" if ":" in config.ip else config.ip
    scheme = "https" if config.certfile else "http"
    announce(config, f"{scheme}://{host}:{config.port}{config.base_url}")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, dump_tasks)
    culler = asyncio.create_task(registry.cull_forever()) if config.cull_idle_timeout > 0 else None
    # in the background: an engine that does not answer must not hold up serving
    reaper = asyncio.create_task(registry.reap_orphans())
    await stop.wait()

    # 1. stop accepting; 2. stop culling, the orphan sweep and the status page's host checks;
    # 3. stop kernels (their sockets get `dead` and a close 1000), or with --keep-kernels leave
    # them running and recorded (their sockets get 1001, so clients reconnect to the next
    # gateway); 4. close what connections remain, bounded; 5. release ZMQ and the state store.
    server.stop()
    for task in (culler, reaper, finding):
        if task:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
    await checks.close()
    held = f"{len(registry.kernels)} kernel(s) and {registry.pool.ready()} pooled"
    if config.keep_kernels:
        log.info("shutting down: leaving %s running", held)
        await registry.leave_all()
    else:
        log.info("shutting down: stopping %s", held)
        await registry.shutdown_all(config.shutdown_timeout)
    with suppress(TimeoutError):
        await asyncio.wait_for(server.close_all_connections(), 5)
    registry.close()
    state.close()
    log.info("gateway stopped")
