"""Prometheus metrics (/metrics). What changes with every relayed message is counted in plain
integers (`relayed`), and what can be read off the gateway's objects (kernels, connections,
replay, SSH connections, batch jobs) is read at scrape time: the relay pays a dict lookup and
two additions per message, nothing else. Label values are bounded: backends, kernelspec
names (the operator's), channel names, route patterns, SSH hosts from kernelspecs; never a
kernel id or a client-chosen string."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .kernels.registry import KernelRegistry

# no *_created series: noise for a scraper, and one more series per label set
disable_created_metrics()  # type: ignore[no-untyped-call]
REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

_START_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900)
_HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60)

KERNEL_STARTS = Counter(
    "rkg_kernel_starts",
    "Kernel starts that ended, by backend and outcome (ok, error, timeout, cancelled).",
    ["backend", "outcome"],
    registry=REGISTRY,
)
KERNEL_START_SECONDS = Histogram(
    "rkg_kernel_start_seconds",
    "Seconds from a start request to a kernel that answers, successful starts only.",
    ["backend"],
    buckets=_START_BUCKETS,
    registry=REGISTRY,
)
HTTP_SECONDS = Histogram(
    "rkg_http_request_duration_seconds",
    "REST request durations, by route pattern, method and status (websockets excluded).",
    ["route", "method", "status"],
    buckets=_HTTP_BUCKETS,
    registry=REGISTRY,
)

# (channel, direction) -> [messages, bytes]; direction "in" is client -> kernel
relayed: dict[tuple[str, str], list[int]] = {}


def count(channel: str, direction: str, size: int) -> None:
    """One relayed message. On the hot path: keep it this small."""
    c = relayed.get((channel, direction))
    if c is None:
        c = relayed[(channel, direction)] = [0, 0]
    c[0] += 1
    c[1] += size


def started(backend: str, outcome: str, seconds: float) -> None:
    KERNEL_STARTS.labels(backend, outcome).inc()
    if outcome == "ok":
        KERNEL_START_SECONDS.labels(backend).observe(seconds)


def request_done(route: str, method: str, status: int, seconds: float) -> None:
    HTTP_SECONDS.labels(route, method, str(status)).observe(seconds)


class GatewayCollector(Collector):
    """What is read off the gateway at scrape time."""

    def __init__(self, registry: KernelRegistry, sources: list[Callable[[], Iterator[Any]]]):
        self.registry = registry
        self.sources = sources  # more families, from backends (SSH pool, batch jobs)

    def collect(self) -> Iterator[Any]:
        kernels = GaugeMetricFamily(
            "rkg_kernels",
            "Kernels by lifecycle state, backend and kernelspec.",
            labels=["state", "backend", "spec"],
        )
        by: dict[tuple[str, str, str], int] = {}
        connections = replay = 0
        for k in list(self.registry.kernels.values()):
            key = (k.state, k.backend, k.name)
            by[key] = by.get(key, 0) + 1
            for s in list(k.fanout.sessions.values()):
                connections += s.attached
                replay += s.replay_bytes
        for key, n in sorted(by.items()):
            kernels.add_metric(list(key), n)
        yield kernels
        yield GaugeMetricFamily(
            "rkg_websocket_connections", "Open kernel websockets.", value=connections
        )
        yield GaugeMetricFamily(
            "rkg_replay_bytes",
            "Bytes of output held for disconnected sessions (replayed when they reconnect).",
            value=replay,
        )
        messages = CounterMetricFamily(
            "rkg_messages",
            "Kernel messages relayed, by channel and direction (in: to the kernel).",
            labels=["channel", "direction"],
        )
        sizes = CounterMetricFamily(
            "rkg_message_bytes",
            "Bytes of kernel messages relayed (as framed for the client), by channel, direction.",
            labels=["channel", "direction"],
        )
        for (channel, direction), (n, size) in sorted(relayed.items()):
            messages.add_metric([channel, direction], n)
            sizes.add_metric([channel, direction], size)
        yield messages
        yield sizes
        for source in self.sources:
            yield from source()


_installed: GatewayCollector | None = None


def install(registry: KernelRegistry) -> None:
    """Read `registry` at every scrape (once per process: `rkg serve` runs one)."""
    from .backends import batch, sshpool

    global _installed
    if _installed is not None:
        REGISTRY.unregister(_installed)
    _installed = GatewayCollector(
        registry, [sshpool.metric_families, lambda: batch.metric_families(registry)]
    )
    REGISTRY.register(_installed)


def exposition() -> bytes:
    return generate_latest(REGISTRY)
