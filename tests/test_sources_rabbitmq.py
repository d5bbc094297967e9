"""RabbitMQ source against the RabbitMQ server on 127.0.0.1:5672 (guest/guest), through real
Feeds. Every test uses queues and exchanges of its own and deletes them at the end."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Iterator

import numpy as np
import pytest

from fastfeed import Feed
from fastfeed.sim.publish import publish
from fastfeed.sources.url import SourceURL
from tests import brokers
from tests.brokers import assert_rows_match, collect_ticks, feed_connected, unique, wait_for

brokers.need_module("aio_pika", "rabbitmq")

rabbitmq = brokers.rabbitmq
no_segment_left = brokers.no_segment_left


@pytest.fixture
def names(rabbitmq: str) -> Iterator[tuple[str, str]]:
    """A fresh (queue, exchange) pair, deleted after the test."""
    queue, exchange = unique("ff-q"), unique("ff-x")
    yield queue, exchange

    async def cleanup() -> None:
        import aio_pika
        conn = await aio_pika.connect(rabbitmq, timeout=10)
        async with conn:
            ch = await conn.channel()
            await ch.queue_delete(queue)
            await ch.exchange_delete(exchange)

    try:
        asyncio.run(cleanup())
    except Exception:  # noqa: BLE001 - a test that never declared them leaves nothing to delete
        pass


def url(base: str, **params: str | int) -> str:
    return base + "?" + "&".join(f"{k}={v}" for k, v in params.items())


def queue_depth(base: str, queue: str) -> int:
    async def depth() -> int:
        import aio_pika
        conn = await aio_pika.connect(base, timeout=10)
        async with conn:
            ch = await conn.channel()
            q = await ch.declare_queue(queue, passive=True)
            return int(q.declaration_result.message_count or 0)
    return asyncio.run(depth())


def test_queue_bound_to_exchange_streams_the_market(rabbitmq: str,
                                                    names: tuple[str, str]) -> None:
    queue, exchange = names
    src = url(rabbitmq, queue=queue, exchange=exchange, prefetch=500)
    with Feed(source=src, workers=2) as feed:
        wait_for(lambda: feed_connected(feed), what="consumer")  # queue declared and bound
        sent = publish(url(rabbitmq, exchange=exchange), count=10000, malformed=0.01,
                       arrays=0.05, status_every=1000)
        stats = feed.run(frames=sent["frames_sent"], duration=60)
    assert_rows_match(stats, sent)
    s = stats["session"]
    assert s["control"] == sent["control_sent"] == 10
    assert s["acked"] == sent["frames_sent"] + sent["control_sent"], s
    assert queue_depth(rabbitmq, queue) == 0


def test_competing_consumers_share_a_queue(rabbitmq: str, names: tuple[str, str]) -> None:
    queue, exchange = names
    src = url(rabbitmq, queue=queue, exchange=exchange, prefetch=100)
    with Feed(source=src, workers=1) as fa, Feed(source=src, workers=1) as fb:
        wait_for(lambda: feed_connected(fa) and feed_connected(fb), what="consumers")
        sent = publish(url(rabbitmq, exchange=exchange), count=6000)
        a, b = collect_ticks([fa, fb], 6000)
    both = np.concatenate([a, b])
    assert len(a) > 0 and len(b) > 0, "both consumers must get a share"
    assert len(both) == sent["ticks"]
    assert len(np.unique(both)) == len(both), "a message was decoded twice"


def declare_queue(base: str, queue: str, exchange: str) -> None:
    """Declare and bind the queue as the source would (so messages wait for it)."""
    async def run() -> None:
        from fastfeed.sources.rabbitmq import connect_amqp, declare
        conn = await connect_amqp(SourceURL.parse(url(base, queue=queue, exchange=exchange)))
        async with conn:
            await declare(await conn.channel(), SourceURL.parse(
                url(base, queue=queue, exchange=exchange)))
    asyncio.run(run())


@pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="rabbitmqctl not available")
def test_broker_restart_loses_nothing(rabbitmq: str, names: tuple[str, str]) -> None:
    """stop_app/start_app while the source is draining a backlog: it reconnects, and every
    confirmed message arrives (unacknowledged ones come back redelivered; any already
    committed is recognised by its message id and not decoded twice)."""
    queue, exchange = names
    declare_queue(rabbitmq, queue, exchange)
    first = publish(url(rabbitmq, exchange=exchange), count=5000)
    # prefetch=1: one message in flight, acknowledged one by one: a slow, steady drain.
    src = url(rabbitmq, queue=queue, exchange=exchange, prefetch=1)
    with Feed(source=src, workers=1) as feed:
        wait_for(lambda: feed.frames_decoded() > 100, what="streaming")
        subprocess.run(["rabbitmqctl", "stop_app"], check=True, capture_output=True, timeout=60)
        at_restart = feed.frames_decoded()
        subprocess.run(["rabbitmqctl", "start_app"], check=True, capture_output=True, timeout=60)
        wait_for(lambda: feed_connected(feed, 2), what="reconnect", timeout=60)
        second = publish(url(rabbitmq, exchange=exchange), count=1000, seed=2)
        wait_for(lambda: feed.frames_decoded() >= 6000, what="every message", timeout=90)
        time.sleep(0.3)
        stats = feed.stats()
    s = stats["session"]
    assert at_restart < 5000, "the restart must come while messages were still queued"
    assert s["reconnects"] >= 1 and s["disconnects"] >= 1, s
    assert stats["ticks"] == first["ticks"] + second["ticks"], s
    assert stats["frames"] == 6000 and stats["errors"] == 0
    assert queue_depth(rabbitmq, queue) == 0


def test_refused_frames_are_handed_back_and_decoded_once(rabbitmq: str,
                                                         names: tuple[str, str]) -> None:
    queue, exchange = names
    declare_queue(rabbitmq, queue, exchange)
    sent = publish(url(rabbitmq, exchange=exchange), count=3000)
    src = url(rabbitmq, queue=queue, exchange=exchange)
    with Feed(source=src, workers=1, **brokers.REFUSING_FEED) as feed:
        wait_for(lambda: feed.stats()["ticks"] >= sent["ticks"], what="every message",
                 timeout=90)
        time.sleep(0.3)
        stats = feed.stats()
    s = stats["session"]
    assert s["nacked"] > 0 and s["redelivered"] > 0, s
    assert stats["ticks"] == sent["ticks"] and stats["frames"] == 3000, s
    assert s["duplicates"] == 0 and s["acked"] == 3000
    assert queue_depth(rabbitmq, queue) == 0


def test_url_redacts_the_password(rabbitmq: str) -> None:
    u = SourceURL.parse("amqp://guest:p%40ss@127.0.0.1:5672/vh?queue=q")
    assert u.password == "p@ss" and "p%40ss" not in u.redacted and "p@ss" not in u.redacted
    assert u.redacted == "amqp://guest:***@127.0.0.1:5672/vh?queue=q"
