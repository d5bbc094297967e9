"""Prometheus metrics for a running :class:`fastfeed.Feed` (optional: prometheus-client).

``serve_metrics(feed, port)`` starts prometheus-client's HTTP server in this process with a
collector that reads the feed at every scrape. Names and units follow Prometheus'
conventions (base units, ``_total`` for counters, a histogram for latency), so that they sum
across instances and rate over any window:

- ``fastfeed_frames_{received,decoded,delivered,dropped}_total``: frames written into the
  rings, handled by a decoder (rows, an error or a control message each), whose batch reached
  the consumer, dropped on a full ring (only with a dropping ``full_policy``);
- ``fastfeed_rows_{received,delivered}_total{kind}`` (rows decoded, rows handed over),
  ``fastfeed_rows_dropped_total`` (refused by a full output ring, dropping policies only) and
  ``fastfeed_rows_undelivered_total`` (read at stop, handed to nobody);
- ``fastfeed_latency_seconds`` (histogram, buckets from 1 µs to 1 s): frame receipt to rows
  handed over, per row; ``phase="run"`` while the feed runs, ``phase="drain"`` for rows handed
  over after a stop was asked for;
- ``fastfeed_staleness_seconds{source}``: seconds since the last frame arrived;
- ``fastfeed_handler_errors_total``, ``fastfeed_restarts_total{process}``, and the rest of the
  feed's counters (decode errors, control messages, gaps, backpressure, reconnects...).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from . import __version__

if TYPE_CHECKING:
    from .feed import Feed

__all__ = ["LATENCY_BOUNDS_S", "serve_metrics"]

#: Upper bounds of the latency histogram's buckets, in seconds: 1, 1.5, 2, 3, 5 and 7 of every
#: decade from 1 µs to 1 s (a latency-sensitive consumer lives in the µs, a slow one in the ms).
LATENCY_BOUNDS_S = [round(m * 10.0 ** e, 12) for e in range(-6, 0) for m in (1, 1.5, 2, 3, 5, 7)]
LATENCY_BOUNDS_S.append(1.0)

# (metric, key in feed.stats(), help): plain counters.
_COUNTERS = [
    ("frames_received", "received", "Data frames written into the rings."),
    ("frames_decoded", "frames", "Frames a decoder handled (rows, an error or control each)."),
    ("frames_dropped", "dropped",
     "Frames dropped on a full ring (only with a dropping full_policy)."),
    ("rows_dropped", "dropped_rows",
     "Decoded rows a full output ring refused (only with a dropping full_policy)."),
    ("decode_errors", "errors", "Frames that failed to decode."),
    ("control_messages", "control", "Non-market messages (status and error objects)."),
    ("control_messages_dropped", "control_dropped",
     "Control messages not handed over because nobody read them in time."),
    ("gaps", "gaps", "Frames the decoders found missing in the sequence (dropped)."),
    ("backpressure_pauses", "pauses",
     "Times the source was paused because a ring was full (lossless backpressure)."),
    ("backpressure_seconds", "backpressure_s", "Seconds the source spent paused for room."),
    ("handler_errors", "handler_errors", "Exceptions raised by the handler."),
    ("symbols_full", "symbols_full", "Frames refused because an intern table was full."),
    ("reconnects", "reconnects", "Reconnections of the network process."),
    ("auth_renewals", "auth_renewals", "Feed token renewals."),
    ("poisoned_frames", "poisoned", "Frames set aside after killing a worker repeatedly."),
]
_KINDS = ("ticks", "quotes", "bars")


class _Collector:
    def __init__(self, feed: Feed) -> None:
        self.feed = feed

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        feed = self.feed
        s = feed.stats()
        for name, key, doc in _COUNTERS:
            yield CounterMetricFamily(f"fastfeed_{name}", doc, value=s.get(key, 0))
        d = s.get("delivered", {})
        yield CounterMetricFamily("fastfeed_frames_delivered",
                                  "Frames whose batch was handed to the consumer.",
                                  value=d.get("frames", 0))
        rows_in = CounterMetricFamily("fastfeed_rows_received", "Rows decoded, by kind.",
                                      labels=["kind"])
        rows_out = CounterMetricFamily("fastfeed_rows_delivered",
                                       "Rows handed to the consumer, by kind.", labels=["kind"])
        for k in _KINDS:
            rows_in.add_metric([k], s.get(k, 0))
            rows_out.add_metric([k], d.get(k, 0))
        yield rows_in
        yield rows_out
        yield CounterMetricFamily("fastfeed_rows_undelivered",
                                  "Rows read at stop and handed to nobody.",
                                  value=s.get("undelivered", {}).get("rows", 0))
        restarts = CounterMetricFamily("fastfeed_restarts",
                                       "Processes started again after they died.",
                                       labels=["process"])
        restarts.add_metric(["network"], s.get("network_restarts", 0))
        restarts.add_metric(["worker"], s.get("worker_restarts", 0))
        yield restarts

        hist = HistogramMetricFamily(
            "fastfeed_latency_seconds",
            "Frame receipt to rows handed to the consumer, per row (phase drain: rows handed "
            "over after a stop was asked for).", labels=["phase"], unit="seconds")
        bounds_us = [b * 1e6 for b in LATENCY_BOUNDS_S]
        for phase, h in (("run", feed._latency), ("drain", feed._latency_drain)):
            cum = h.cumulative(bounds_us)
            buckets = [(_le(b), c) for b, c in zip(LATENCY_BOUNDS_S, cum, strict=True)]
            buckets.append(("+Inf", h.total))
            hist.add_metric([phase], buckets, sum_value=h.sum_us() / 1e6)
        yield hist

        stale = GaugeMetricFamily("fastfeed_staleness_seconds",
                                  "Seconds since the last frame arrived (NaN: none yet).",
                                  labels=["source"], unit="seconds")
        stale.add_metric([feed.source_label], feed.staleness())
        yield stale
        info = GaugeMetricFamily("fastfeed_info", "fastfeed's version (always 1).",
                                 labels=["version", "workers"])
        info.add_metric([__version__, str(0 if feed.inline else feed.workers)], 1)
        yield info


def _le(bound_s: float) -> str:
    # Prometheus' own rendering of a float bound ("1e-06", "0.0015", "1.0")
    from prometheus_client.utils import floatToGoString

    return str(floatToGoString(bound_s))  # type: ignore[no-untyped-call]


def serve_metrics(feed: Feed, port: int, addr: str = "127.0.0.1") -> Any:
    """Expose ``feed``'s metrics on http://addr:port/metrics (``port`` 0: any free port, see
    ``server.server_port``); returns the server (``server.shutdown()`` then
    ``server.server_close()`` stop it)."""
    try:
        from prometheus_client import CollectorRegistry, start_http_server
    except ImportError:
        raise RuntimeError("metrics need prometheus-client: pip install 'fastfeed[metrics]'") from None
    registry = CollectorRegistry()  # one per feed: several feeds may serve in one process
    registry.register(_Collector(feed))
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return server

