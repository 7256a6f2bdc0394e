"""Prometheus metrics over HTTP for both daemons (``net.metrics_port``; 0 turns them off).

Each daemon describes its metrics with a collector that reads its live state when scraped
(``coordinator/metrics.py``, ``node/metrics.py``), so nothing on the training path updates
counters. The endpoint is plain HTTP at ``/metrics`` on ``net.bind``'s host, served by a
daemon thread; it is read-only.
"""

from __future__ import annotations

import logging
import threading

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.registry import Collector

from pipeguard.config import NetConfig, parse_hostport

log = logging.getLogger(__name__)


class MetricsServer:
    """A running /metrics endpoint; ``close`` stops it."""

    def __init__(self, httpd, thread: threading.Thread, host: str):
        self._httpd, self._thread = httpd, thread
        port = httpd.server_address[1]
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def serve_metrics(net: NetConfig, collector: Collector) -> MetricsServer | None:
    """Serve ``collector`` at http://BIND_HOST:net.metrics_port/metrics, or nothing if the port is 0."""
    if not net.metrics_port:
        return None
    host, _ = parse_hostport(net.bind, "net.bind")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    httpd, thread = start_http_server(net.metrics_port, addr=host, registry=registry)
    server = MetricsServer(httpd, thread, host)
    log.info("Prometheus metrics at http://%s/metrics", server.address)
    return server
