"""Prometheus metrics for a running :class:`fastfeed.Feed` (optional: prometheus-client).

``serve_metrics(feed, port)`` starts prometheus-client's HTTP server in this process with
a collector that reads ``feed.stats()`` at every scrape: counters for frames received and
decoded, rows per kind, rows delivered, errors, control messages, drops (frames and rows),
gaps, backpressure (pauses and seconds paused), handler errors, full symbol tables,
reconnects, auth renewals and restarts, and the wire-to-array latency as gauges of its
percentiles.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["serve_metrics"]

_COUNTERS = {
    "received": "data frames the network process wrote into the rings",
    "frames": "data frames decoded (rows or an error each)",
    "ticks": "tick rows decoded",
    "quotes": "quote rows decoded",
    "bars": "bar rows decoded",
    "errors": "frames that failed to decode",
    "control": "non-market messages",
    "dropped": "frames dropped on a full ring (only with a dropping full policy)",
    "dropped_rows": "decoded rows dropped on a full output ring (only with a dropping policy)",
    "pauses": "times the source was paused because a ring was full (lossless backpressure)",
    "backpressure_s": "seconds the source spent paused for room in a ring",
    "handler_errors": "exceptions raised by the handler",
    "symbols_full": "frames refused because a symbol table was full (raise max_symbols)",
    "gaps": "sequence gaps seen by the workers",
    "reconnects": "reconnections of the network process",
    "auth_renewals": "feed token renewals",
    "network_restarts": "network (or source) process restarts after it died",
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
        d = s.get("delivered", {})
        yield CounterMetricFamily("fastfeed_delivered_rows", "rows handed to the consumer",
                                  value=sum(d.get(k, 0) for k in ("ticks", "quotes", "bars")))
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
        raise RuntimeError("metrics need prometheus-client: pip install 'fastfeed[metrics]'") from None
    registry = CollectorRegistry()  # one per feed: several feeds may serve in one process
    registry.register(_Collector(feed))
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return server
