"""Pub/sub sources: a broker in the WebSocket's place, in front of the same rings and workers.

Selected by URL (see each module for its parameters)::

    redis://[user:pass@]HOST:PORT[/DB]?channel=feed            Redis Pub/Sub (also pattern=, schannel=)
    redis+stream://HOST:PORT/0?stream=feed&group=g&consumer=c  Redis Streams consumer group
    nats://HOST:PORT?subject=feed.>&queue=q                    core NATS (queue group optional)
    nats://HOST:PORT?subject=feed.>&stream=FEED&durable=d      NATS JetStream durable consumer
    amqp://USER:PASS@HOST:PORT/VHOST?queue=q&exchange=x        RabbitMQ (AMQP 0-9-1)
    kafka://HOST:PORT?topic=feed&group=g                       Kafka consumer group

:class:`SourceProcess` runs one in its own spawned process with the interface of
:class:`fastfeed.session.SessionProcess` (``start``/``stop``/``join``/``counters``/``error``)::

    proc = SourceProcess("redis://127.0.0.1:6379/0?channel=feed", pool.ring_names).start()
    proc.counters()["frames"]
    proc.stop()

Passwords in URLs are never logged: everything shown uses :attr:`SourceURL.redacted`.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import Sequence
from typing import Any

from ..child import ChildProcess, serve
from .url import SourceURL, SourceURLError

__all__ = ["COUNTERS", "SOURCES", "SourceProcess", "SourceURL", "SourceURLError",
           "parse_source", "run_source", "source_class"]

log = logging.getLogger("fastfeed.sources")

#: Scheme -> "module:Class" of the source serving it (imported only when used, so that a
#: missing optional client library only matters to the source that needs it).
SOURCES = {
    "redis": "redis_pubsub:RedisPubSubSource",
    "rediss": "redis_pubsub:RedisPubSubSource",
    "redis+stream": "redis_stream:RedisStreamSource",
    "rediss+stream": "redis_stream:RedisStreamSource",
    "nats": "nats:NatsSource",
    "tls": "nats:NatsSource",
    "amqp": "rabbitmq:RabbitMQSource",
    "amqps": "rabbitmq:RabbitMQSource",
    "kafka": "kafka:KafkaSource",
}

#: Counter names, in the order of :class:`SourceProcess`'s shared array. The first four mean
#: what they mean for the WebSocket session (:data:`fastfeed.session.COUNTERS`). Defined here,
#: not in .base, so that the parent reads counters without importing any client library.
COUNTERS = (
    "frames",           # data frames written into a ring
    "bytes",            # their payload bytes
    "ring_drops",       # data frames a ring dropped (at-least-once sources: not acked, redelivered)
    "control",          # messages without a symbol (status/error objects): counted, not decoded
    "messages",         # messages taken from the broker (data, control, duplicates, drops)
    "connects",         # connections established
    "reconnects",       # connections re-established after one was lost
    "disconnects",      # connections lost while not stopping
    "connect_errors",   # connection attempts that failed
    "evicted",          # connection closed by a broker that stayed up (e.g. a slow subscriber)
    "broker_restarts",  # reconnected to a broker that restarted in between (see docs/pubsub.md)
    "heartbeat_timeouts",  # connections declared dead for an unanswered PING
    "slow_consumer",    # messages the client library dropped (NATS pending limits)
    "acked",            # messages acknowledged to the broker (at-least-once sources)
    "nacked",           # messages handed back for redelivery (a ring refused them)
    "duplicates",       # messages already committed to a ring, seen again: acked, not rewritten
    "redelivered",      # messages the broker marked as delivered before
    "reclaimed",        # Redis Streams entries taken over from an idle consumer (XAUTOCLAIM)
    "too_big",          # messages larger than a ring record: dropped (and acked: never deliverable)
    "pauses",           # times reading stopped because a ring was full ("pause" policy: lossless)
    "backpressure_us",  # total microseconds reading stayed paused (a pause in progress included)
    # the "control" messages as the decoder counts them (fastfeed.control): status/error
    # objects, frames it rejects, frames with data the router could not place
    "control_msgs", "control_errors", "unroutable",
)


def source_class(scheme: str) -> Any:
    """The :class:`~fastfeed.sources.base.Source` subclass for a URL scheme."""
    try:
        target = SOURCES[scheme]
    except KeyError:
        raise SourceURLError(f"unknown source scheme {scheme!r}: use one of "
                             f"{', '.join(s + '://' for s in SOURCES)}") from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def parse_source(url: str | SourceURL) -> SourceURL:
    """Parse and check a source URL; raises :class:`SourceURLError` with what is wrong."""
    u = url if isinstance(url, SourceURL) else SourceURL.parse(url)
    cls = source_class(u.scheme)
    u.check(cls.params + cls.COMMON_PARAMS)
    first, cap = u.float("backoff_first", 0.05), u.float("backoff_cap", 2.0)
    if first < 0 or cap < first:
        raise SourceURLError("back-off needs 0 <= backoff_first <= backoff_cap")
    if u.int("dedup_window", 1 << 18) < 1:
        raise SourceURLError("dedup_window= must be at least 1")
    from .base import check_tls_params

    check_tls_params(u)
    cls.validate(u)
    return u


# -- the source in its own process --------------------------------------------------------------

def run_source(url: str | SourceURL, ring_names: Sequence[str], *, counters: Any | None = None,
               stop_event: Any | None = None) -> None:
    """Attach the rings by name and run the URL's source until stopped (blocking).

    The body of :class:`SourceProcess`. ``counters``: a shared int64 array of
    ``len(COUNTERS)``, refreshed every 50 ms and at the end; ``stop_event``: a
    ``multiprocessing.Event``. SIGTERM and SIGINT stop the source too.
    """
    from .._ring import Ring

    u = parse_source(url)
    rings = [Ring.attach(name) for name in ring_names]
    try:
        source = source_class(u.scheme)(u, rings)
        def values() -> Any:
            counts = source.counters()
            return (counts[n] for n in COUNTERS)

        try:
            import uvloop
            uvloop.run(serve(source, values, counters, stop_event))
        except ImportError:  # pragma: no cover - uvloop is a dependency
            asyncio.run(serve(source, values, counters, stop_event))
    finally:
        for r in rings:
            r.close()


def _process_main(url: str, ring_names: list[str], counters: Any, stop_event: Any, conn: Any,
                  log_level: int) -> None:
    logging.basicConfig(level=log_level,
                        format="%(asctime)s %(processName)s %(name)s %(levelname)s %(message)s")
    from .base import FatalSourceError

    u = SourceURL.parse(url)
    try:
        run_source(u, ring_names, counters=counters, stop_event=stop_event)
    except (FatalSourceError, SourceURLError) as exc:
        conn.send(("error", u.scrub(" ".join(str(exc).split()))))
        raise SystemExit(1) from None
    except BaseException as exc:
        conn.send(("error", u.scrub(f"{type(exc).__name__}: {' '.join(str(exc).split())}")))
        raise
    conn.send(("ok", None))


class SourceProcess(ChildProcess):
    """A pub/sub source in its own spawned process, writing into rings named by the parent.

    The interface of :class:`fastfeed.session.SessionProcess` (both are
    :class:`fastfeed.child.ChildProcess`): ``counters()`` reads the live counters
    (:data:`COUNTERS`) from shared memory; ``error`` holds the one-line reason when the
    process stopped on a fatal error (refused credentials, missing client library). The URL
    is checked here, in the caller's process: a bad one raises :class:`SourceURLError` at
    once.
    """

    def __init__(self, url: str, ring_names: Sequence[str], *,
                 log_level: int = logging.WARNING, log: Any = None) -> None:
        self.url = parse_source(url)
        super().__init__(_process_main, (url, list(ring_names)), COUNTERS,
                         name="fastfeed-source", log_level=log_level, log=log)

    def __repr__(self) -> str:
        return f"SourceProcess({self.url.redacted!r}, pid={self.pid})"
