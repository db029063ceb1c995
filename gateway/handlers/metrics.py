"""/metrics: Prometheus text format. Token-protected like the API; with
--metrics-open-on-loopback a scraper on the same machine needs none."""

from __future__ import annotations

import ipaddress

from prometheus_client import CONTENT_TYPE_LATEST

from .. import metrics
from .base import APIHandler


class MetricsHandler(APIHandler):
    def prepare(self) -> None:
        if self.config.metrics_open_on_loopback and _is_loopback(self._peer()):
            return
        super().prepare()

    def _peer(self) -> str:
        """The TCP peer itself, never a forwarded-for header: a proxy on loopback must not
        open the metrics to everyone behind it."""
        address = getattr(self.request.connection, "context", None)
        peer = getattr(address, "address", None)
        if isinstance(peer, tuple) and peer:
            return str(peer[0])
        return ""

    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(metrics.exposition())


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


routes = [(r"metrics/?", MetricsHandler)]
