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
from tests import brokers, lossless
from tests.brokers import assert_rows_match, collect_ticks, feed_connected, unique, wait_for

brokers.need_module("aio_pika", "rabbitmq")

rabbitmq = brokers.rabbitmq
no_segment_left = brokers.no_segment_left


@pytest.fixture
def names(rabbitmq: str) -> Iterator[tuple[str, str]]:
    """A fresh (queue, exchange) pair, deleted after the test."""
    queue, exchange = unique("ff-q"), unique("ff-x")
    yield queue, exchange
    delete_queue(rabbitmq, queue, exchange)


def delete_queue(base: str, queue: str, exchange: str) -> None:
    async def cleanup() -> None:
        import aio_pika
        conn = await aio_pika.connect(base, timeout=10)
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


BACKLOGS = (12_000, 48_000)


@pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="rabbitmqctl not available")
def test_broker_restart_loses_nothing(rabbitmq: str, names: tuple[str, str]) -> None:
    """stop_app/start_app while the source is draining a backlog: it reconnects, and every
    confirmed message arrives (unacknowledged ones come back redelivered; any already
    committed is recognised by its message id and not decoded twice)."""
    # A backlog well beyond what drains while stop_app runs (about 2000 on a quiet box), so
    # that the restart comes with messages still queued. On a busy box rabbitmqctl (an
    # Erlang VM that boots for each command) can take long enough for all of it to drain:
    # then the scenario runs again, on a new queue, with four times the backlog.
    for backlog in BACKLOGS:
        queue, exchange = names if backlog == BACKLOGS[0] else (f"{n}-{backlog}" for n in names)
        try:
            at_restart, stats, second = _restart_while_draining(rabbitmq, queue, exchange, backlog)
        finally:
            if backlog != BACKLOGS[0]:  # (the fixture deletes its own pair)
                delete_queue(rabbitmq, queue, exchange)
        if at_restart < backlog:
            break
    else:
        pytest.fail(f"the restart must come while messages were still queued: all {backlog} "
                    "had drained by the time stop_app returned")
    first_ticks, second_ticks = second
    s = stats["session"]
    assert s["reconnects"] >= 1 and s["disconnects"] >= 1, s
    assert stats["ticks"] == first_ticks + second_ticks, s
    assert stats["frames"] == backlog + 1000 and stats["errors"] == 0
    assert stats["queue_depth_at_end"] == 0


def _restart_while_draining(rabbitmq: str, queue: str, exchange: str,
                            backlog: int) -> tuple[int, dict, tuple[int, int]]:
    """(frames decoded when stop_app returned, the feed's stats at the end, the ticks sent
    before and after the restart)"""
    declare_queue(rabbitmq, queue, exchange)
    first = publish(url(rabbitmq, exchange=exchange), count=backlog)
    # prefetch=1: one message in flight, acknowledged one by one: a slow, steady drain.
    src = url(rabbitmq, queue=queue, exchange=exchange, prefetch=1)
    with Feed(source=src, workers=1) as feed:
        wait_for(lambda: feed.frames_decoded() > 100, what="streaming")
        subprocess.run(["rabbitmqctl", "stop_app"], check=True, capture_output=True, timeout=60)
        at_restart = feed.frames_decoded()
        subprocess.run(["rabbitmqctl", "start_app"], check=True, capture_output=True, timeout=60)
        wait_for(lambda: feed_connected(feed, 2), what="reconnect", timeout=60)
        second = publish(url(rabbitmq, exchange=exchange), count=1000, seed=2)
        wait_for(lambda: feed.frames_decoded() >= backlog + 1000, what="every message",
                 timeout=180)
        time.sleep(0.3)
        stats = feed.stats()
    stats["queue_depth_at_end"] = queue_depth(rabbitmq, queue)
    return at_restart, stats, (first["ticks"], second["ticks"])


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


# -- lossless: backpressure and restarts (numbered frames, rings read by the test) -------------

def test_backpressure_holds_acknowledgements(rabbitmq: str, names: tuple[str, str]) -> None:
    """Small "pause" rings and a slow reader: the source acknowledges nothing that is not in
    a ring yet, so the broker stops at the prefetch window; nothing is dropped or handed
    back, and every symbol keeps its order."""
    queue, exchange = names
    declare_queue(rabbitmq, queue, exchange)
    n = 4000
    lossless.publish_frames(url(rabbitmq, exchange=exchange), lossless.frames(0, n))
    src = url(rabbitmq, queue=queue, exchange=exchange, prefetch=200)
    # The reader is slower than the source (some 1600 frames/s): the rings fill.
    lossless.check_held_back_then_acked(src, n, pause=0.005, max_records=8)
    assert queue_depth(rabbitmq, queue) == 0


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


@pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="rabbitmqctl not available")
def test_broker_restart_accounting(rabbitmq: str, names: tuple[str, str]) -> None:
    """stop_app/start_app while the source is mid-stream (slow rings, frames waiting for
    room): what it held unacknowledged comes back and is either written then (it never was:
    the backlog is given back, counted as nacked) or recognised by its message_id (written
    before the acknowledgement was lost: a duplicate). Every message is written exactly once,
    and the lost sentinel queue counts the restart."""
    queue, exchange = names
    declare_queue(rabbitmq, queue, exchange)
    n, more = 6000, 1000
    lossless.publish_frames(url(rabbitmq, exchange=exchange), lossless.frames(0, n))
    src = url(rabbitmq, queue=queue, exchange=exchange, prefetch=100, backoff_cap=0.2)
    # Some 1600 frames/s: the rest of the queue takes seconds, stop_app well under one.
    with lossless.source_on_rings(src, pause=0.005, max_records=8) as (proc, reader):
        lossless.wait_for(lambda: reader.count() >= 1000, 60, "streaming", proc.counters)
        try:
            rabbitmqctl("stop_app")
            at_stop = reader.count()
        finally:
            rabbitmqctl("start_app")
        lossless.wait_for(lambda: proc.counters()["connects"] >= 2, 60, "reconnect",
                          proc.counters)
        lossless.publish_frames(url(rabbitmq, exchange=exchange), lossless.frames(n, more))
        lossless.wait_for(lambda: reader.count() >= n + more, 90, "every frame",
                          proc.counters)
        time.sleep(0.3)  # anything written twice would show up now
    c = proc.counters()
    assert at_stop < n, "the restart must come while messages were still queued"
    assert c["broker_restarts"] == 1 and c["reconnects"] == 1, c
    assert sorted(reader.numbers()) == list(range(n + more)), c
    assert c["frames"] == n + more and c["ring_drops"] == 0, c
    assert c["messages"] == c["frames"] + c["duplicates"] + c["nacked"], c
    assert queue_depth(rabbitmq, queue) == 0


def test_reconnect_without_restart_is_not_a_restart(rabbitmq: str,
                                                    names: tuple[str, str]) -> None:
    """A connection the broker closes while it keeps running (rabbitmqctl close_connection,
    as an operator or a network cut would) is a reconnect, not a restart."""
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl not available")
    queue, exchange = names
    name = unique("ff-conn")
    src = url(rabbitmq, queue=queue, exchange=exchange, name=name, backoff_cap=0.2)
    with lossless.source_on_rings(src) as (proc, reader):
        lossless.wait_for(lambda: proc.counters()["connects"] == 1, what="consumer")
        out = subprocess.run(["rabbitmqctl", "list_connections", "pid", "client_properties"],
                             check=True, capture_output=True, timeout=60, text=True).stdout
        pids = [line.split()[0] for line in out.splitlines() if name in line]
        assert len(pids) == 1, out
        rabbitmqctl("close_connection", pids[0], "test: closed on purpose")
        lossless.wait_for(lambda: proc.counters()["connects"] >= 2, 60, "reconnect",
                          proc.counters)
        lossless.publish_frames(url(rabbitmq, exchange=exchange), lossless.frames(0, 500))
        lossless.wait_for(lambda: reader.count() >= 500, what="every frame")
    c = proc.counters()
    assert c["reconnects"] == 1 and c["broker_restarts"] == 0, c


def test_wrong_credentials_are_a_fatal_one_line_error(rabbitmq: str) -> None:
    for creds in ("guest:wrong-pw", "nobody:wrong-pw"):
        src = rabbitmq.replace("guest:guest", creds, 1) + f"?queue={unique('ff-q')}"
        msg = brokers.assert_fails_at_once(
            src, None, f"RabbitMQ at {SourceURL.parse(src).endpoint} refused the credentials")
        assert "wrong-pw" not in msg
