"""Kafka: ``kafka://[user:password@]HOST:PORT[,HOST:PORT...]?topic=feed&group=g``.

A consumer in consumer group ``group=`` (default ``fastfeed``) over ``topic=`` (repeat or
comma-separate for several), through ``confluent-kafka`` (librdkafka). At-least-once: offsets
are committed (asynchronously, once per batch) only up to the frames committed to a ring; when a
ring refuses a frame, its partition is rewound to that offset (``seek``) and read again; an
offset at or below the highest this instance already committed on that partition is a
``duplicate``. The instances of one group share the partitions, so per-symbol order holds
when the provider keys messages by symbol (``fastfeed sim --publish`` does).

``offset_reset=`` (``earliest``, the default, or ``latest``): where a group without committed
offsets starts. ``batch=`` messages per poll (default 1000). With a user and password the
connection uses SASL (``sasl_mechanism=``, default ``PLAIN``) over ``security_protocol=``
(default ``SASL_SSL``).

librdkafka reconnects by itself; ``disconnects`` counts its "all brokers down" reports. A
broker restart is not detected (``broker_restarts`` stays 0): librdkafka hides it, and in a
cluster partitions move to other brokers; the consumer group's committed offsets are what
make a restart harmless.

Under the rings' "pause" policy a message a ring has no room for waits, with every one after
it, in order (see :class:`~fastfeed.sources.base.RingWriter`): the poller pauses every
assigned partition (``Consumer.pause``: nothing more is fetched, and the group membership is
kept by polling), writes the backlog as the workers make room, then resumes the partitions
and commits the batch's offsets.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from .._decoder import now_us
from .base import FatalSourceError, Source
from .url import SourceURL, SourceURLError

__all__ = ["KafkaSource", "kafka_config"]

log = logging.getLogger("fastfeed.sources.kafka")


def kafka_config(u: SourceURL) -> dict[str, Any]:
    """librdkafka settings for the URL's brokers and credentials."""
    servers = ",".join(h if ":" in h else f"{h}:9092" for h in u.hosts) if u.hosts else \
        f"{u.host}:{u.port or 9092}"
    conf: dict[str, Any] = {"bootstrap.servers": servers}
    if u.username is not None:
        conf.update({"security.protocol": u.str("security_protocol") or "SASL_SSL",
                     "sasl.mechanisms": u.str("sasl_mechanism") or "PLAIN",
                     "sasl.username": u.username, "sasl.password": u.password or ""})
    elif u.str("security_protocol"):
        conf["security.protocol"] = u.str("security_protocol")
    return conf


class KafkaSource(Source):
    """Kafka consumer-group source; see the module docstring."""

    schemes = ("kafka",)
    params = ("topic", "group", "offset_reset", "batch", "security_protocol", "sasl_mechanism")
    at_least_once = True

    def __init__(self, url: SourceURL, rings: Any) -> None:
        super().__init__(url, rings)
        self.topics = url.list("topic")
        self.group = url.str("group") or "fastfeed"
        self.batch = url.int("batch", 1000)
        self._high: dict[tuple[str, int], int] = {}
        self._consumer: Any = None

    @classmethod
    def validate(cls, url: SourceURL) -> None:
        if not url.list("topic"):
            raise SourceURLError(f"kafka:// needs topic= ({url.redacted})")
        if (url.str("offset_reset") or "earliest") not in ("earliest", "latest"):
            raise SourceURLError("offset_reset= must be earliest or latest")

    async def consume(self) -> None:
        try:
            from confluent_kafka import Consumer
        except ImportError:
            raise FatalSourceError("the Kafka source needs confluent-kafka: "
                                   "pip install 'fastfeed[kafka]'") from None
        conf = kafka_config(self.url)
        conf.update({"group.id": self.group, "enable.auto.commit": False,
                     "auto.offset.reset": self.url.str("offset_reset") or "earliest",
                     "client.id": self.url.str("name", "fastfeed"),
                     "error_cb": self._on_error,
                     "logger": logging.getLogger("fastfeed.sources.kafka.librdkafka")})
        self._consumer = consumer = Consumer(conf)
        consumer.subscribe(self.topics, on_assign=self._on_assign)
        # librdkafka's calls block: the poll loop runs in a thread, the event loop stays free
        # for the counters and the stop signal.
        await asyncio.get_running_loop().run_in_executor(None, self._poll_loop, consumer)

    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        if self.counts["connects"] == 0 or self._connected_at is None:
            self.connected()
        log.info("assigned %d partitions", len(partitions))
        if self.out.backlog:
            consumer.pause(partitions)  # waiting for room: fetch nothing new meanwhile

    def _on_error(self, err: Any) -> None:
        from confluent_kafka import KafkaError
        if err.code() == KafkaError._ALL_BROKERS_DOWN:
            self.counts["disconnects"] += 1
            log.warning("Kafka: %s", self.url.scrub(str(err)))
        else:
            # Transient errors librdkafka retries by itself (one per failed connect attempt).
            log.debug("Kafka: %s", self.url.scrub(str(err)))

    def _poll_loop(self, consumer: Any) -> None:
        from confluent_kafka import KafkaException, TopicPartition
        counts = self.counts
        while not self.stopping:
            msgs = consumer.consume(num_messages=self.batch, timeout=0.5)
            if not msgs:
                continue
            commit: dict[tuple[str, int], int] = {}
            done = self._take(consumer, msgs, now_us(), commit)
            if self.out.backlog:
                # "pause": part of the batch waits for room; commit nothing until written.
                more = self._wait_room(consumer, commit)
                if more is None:
                    break  # stopping with frames unwritten: their offsets stay uncommitted
                done += more
            if commit:
                try:
                    consumer.commit(offsets=[TopicPartition(t, p, o)
                                             for (t, p), o in commit.items()],
                                    asynchronous=True)
                except KafkaException as exc:
                    log.warning("Kafka commit failed (will be redone): %s", exc)
                    continue
                counts["acked"] += done

    def _take(self, consumer: Any, msgs: list[Any], ts: int,
              commit: dict[tuple[str, int], int]) -> int:
        """Write one poll's messages; fills ``commit`` (next offset per partition); returns
        how many are done with."""
        from confluent_kafka import TopicPartition
        write = self.out.write
        counts = self.counts
        high = self._high
        done = 0
        rewound: set[tuple[str, int]] = set()
        for m in msgs:
            err = m.error()
            if err is not None:
                if err.fatal():
                    raise FatalSourceError(f"Kafka: {self.url.scrub(str(err))}")
                log.warning("Kafka: %s", self.url.scrub(str(err)))
                continue
            tp = (m.topic(), m.partition())
            if tp in rewound:
                continue  # read again after the seek, in order
            off = m.offset()
            if off <= high.get(tp, -1):
                counts["messages"] += 1
                counts["duplicates"] += 1
                commit[tp] = off + 1
                done += 1
                continue
            if write(m.value() or b"", ts):
                # Written, or waiting in the backlog (then committed once written).
                high[tp] = off
                commit[tp] = off + 1
                done += 1
            else:
                counts["nacked"] += 1
                rewound.add(tp)
                consumer.seek(TopicPartition(tp[0], tp[1], off))
        return done

    def _wait_room(self, consumer: Any, commit: dict[tuple[str, int], int]) -> int | None:
        """Pause every assigned partition and write the backlog as the workers make room
        (this thread has no event loop: it retries itself); resume. Returns how many more
        messages are done with (polled meanwhile), None when stopped first."""
        out = self.out
        parts = consumer.assignment()
        if parts:
            consumer.pause(parts)
        last_poll = time.monotonic()
        done = 0
        try:
            while out.flush():
                if self.stopping:
                    return None
                time.sleep(0.0005)
                if time.monotonic() - last_poll > 1.0:
                    # Poll now and then: the group keeps this member (max.poll.interval.ms)
                    # and rebalances are served. Paused partitions return nothing; a new
                    # assignment is paused by _on_assign, but take what comes, in order.
                    last_poll = time.monotonic()
                    more = consumer.consume(num_messages=self.batch, timeout=0)
                    if more:
                        done += self._take(consumer, more, now_us(), commit)
            return done
        finally:
            parts = consumer.assignment()
            if parts:
                consumer.resume(parts)

    async def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            # close() commits nothing (auto-commit is off) and leaves the group at once.
            await asyncio.get_running_loop().run_in_executor(None, consumer.close)
