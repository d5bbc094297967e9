"""Prometheus metrics for a running :class:`fastfeed.Feed` (optional: prometheus-client).

``serve_metrics(feed, port)`` starts prometheus-client's HTTP server in this process with
a collector that reads ``feed.stats()`` at every scrape: counters for frames, rows per
kind, errors, control messages, drops, gaps, reconnects, auth renewals and worker
restarts, and the wire-to-array latency as gauges of its percentiles.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["serve_metrics"]

_COUNTERS = {
    "frames": "data frames decoded",
    "ticks": "tick rows decoded",
    "quotes": "quote rows decoded",
    "bars": "bar rows decoded",
    "errors": "frames that failed to decode",
    "control": "non-market messages",
    "dropped": "frames or outputs dropped on a full ring",
    "gaps": "sequence gaps seen by the workers",
    "reconnects": "reconnections of the network process",
    "auth_renewals": "feed token renewals",
    "worker_restarts": "decoder workers restarted",
    "poisoned": "frames set aside after killing a worker repeatedly",
}


class _Collector:
    def __init__(self, feed: Any) -> None:
        self.feed = feed

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self.feed.stats()
        for name, doc in _COUNTERS.items():
            yield CounterMetricFamily(f"fastfeed_{name}", doc, value=s.get(name, 0))
        g = GaugeMetricFamily("fastfeed_latency_microseconds",
                              "frame receipt to rows handed over, by quantile", labels=["quantile"])
        for q, key in (("0.5", "p50"), ("0.99", "p99"), ("0.999", "p999"), ("1", "max")):
            v = s["latency_us"][key]
            if v is not None and not (isinstance(v, float) and math.isnan(v)):
                g.add_metric([q], v)
        yield g


def serve_metrics(feed: Any, port: int, addr: str = "127.0.0.1") -> Any:
    """Expose ``feed``'s counters on http://addr:port/metrics; returns the server."""
    try:
        from prometheus_client import CollectorRegistry, start_http_server
    except ImportError:
        raise RuntimeError("metrics need prometheus-client: pip install prometheus-client") from None
    registry = CollectorRegistry()  # one per feed: several feeds may serve in one process
    registry.register(_Collector(feed))
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return server
