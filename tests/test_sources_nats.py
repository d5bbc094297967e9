"""NATS sources (core subjects, queue groups, JetStream durable consumers) against a real
``nats-server -js`` on a loopback port, through real Feeds."""

from __future__ import annotations

import time

import numpy as np

from fastfeed import Feed
from fastfeed.sim.publish import publish
from tests import brokers, lossless
from tests.brokers import (
    BrokerProcess,
    assert_rows_match,
    collect_ticks,
    feed_connected,
    wait_for,
)

brokers.need_module("nats", "nats")

nats_server = brokers.nats_server
no_segment_left = brokers.no_segment_left


def url(port: int, **params: str | int) -> str:
    return f"nats://127.0.0.1:{port}?" + "&".join(f"{k}={v}" for k, v in params.items())


def test_core_subjects_with_wildcards(nats_server: BrokerProcess) -> None:
    port = nats_server.port
    with Feed(source=url(port, subject="feed.>"), workers=2) as feed:
        wait_for(lambda: feed_connected(feed), what="subscription")
        sent = publish(url(port, subject="feed.{shard}"), count=20000, shards=4,
                       malformed=0.01, arrays=0.05, status_every=1000)
        stats = feed.run(frames=sent["frames_sent"], duration=60)
    assert_rows_match(stats, sent)
    assert stats["session"]["control"] == sent["control_sent"] == 20
    assert stats["session"]["slow_consumer"] == 0


def test_jetstream_durable_consumer(nats_server: BrokerProcess) -> None:
    port = nats_server.port
    src = url(port, subject="feed.>", stream="FEED", durable="ff")
    with Feed(source=src, workers=2) as feed:
        sent = publish(url(port, subject="feed.{shard}", stream="FEED"), count=10000,
                       shards=4, malformed=0.01, status_every=1000)
        stats = feed.run(frames=sent["frames_sent"], duration=60)
    assert_rows_match(stats, sent)
    s = stats["session"]
    assert s["acked"] == sent["frames_sent"] + sent["control_sent"], s
    assert s["duplicates"] == 0 and s["nacked"] == 0


def test_two_instances_share_a_queue_group(nats_server: BrokerProcess) -> None:
    port = nats_server.port
    src = url(port, subject="feed.>", queue="workers")
    with Feed(source=src, workers=1) as fa, Feed(source=src, workers=1) as fb:
        wait_for(lambda: feed_connected(fa) and feed_connected(fb), what="subscriptions")
        sent = publish(url(port, subject="feed.x"), count=20000)
        a, b = collect_ticks([fa, fb], 20000)
    both = np.concatenate([a, b])
    assert len(a) > 0 and len(b) > 0, "both members of the queue group must get a share"
    assert len(both) == sent["ticks"]
    assert len(np.unique(both)) == len(both), "a message was decoded twice"


def test_two_instances_share_a_jetstream_durable(nats_server: BrokerProcess) -> None:
    port = nats_server.port
    src = url(port, subject="feed.>", stream="FEED", durable="shared", batch=100)
    with Feed(source=src, workers=1) as fa, Feed(source=src, workers=1) as fb:
        wait_for(lambda: feed_connected(fa) and feed_connected(fb), what="consumers")
        sent = publish(url(port, subject="feed.x", stream="FEED"), count=10000)
        a, b = collect_ticks([fa, fb], 10000)
    both = np.concatenate([a, b])
    assert len(a) > 0 and len(b) > 0
    assert len(both) == sent["ticks"]
    assert len(np.unique(both)) == len(both)


def test_restart_mid_stream(nats_server: BrokerProcess) -> None:
    """Core NATS resumes by itself; JetStream (file store) loses nothing published."""
    port = nats_server.port
    core = url(port, subject="core.>")
    js = url(port, subject="js.>", stream="JS", durable="ff", ack_wait=2)
    with Feed(source=core, workers=1) as fc, Feed(source=js, workers=1) as fj:
        wait_for(lambda: feed_connected(fc) and feed_connected(fj), what="subscriptions")
        c1 = publish(url(port, subject="core.a"), count=3000)
        j1 = publish(url(port, subject="js.a", stream="JS"), count=3000)
        wait_for(lambda: fc.frames_decoded() >= 3000 and fj.frames_decoded() > 0,
                 what="first half")
        nats_server.restart()
        wait_for(lambda: feed_connected(fc, 2) and feed_connected(fj, 2), what="reconnects")
        c2 = publish(url(port, subject="core.a"), count=3000, seed=1)
        j2 = publish(url(port, subject="js.a", stream="JS"), count=3000, seed=1)
        wait_for(lambda: fc.frames_decoded() >= 6000 and fj.frames_decoded() >= 6000,
                 what="second half")
        time.sleep(0.3)  # anything decoded twice would show up now
        sc, sj = fc.stats(), fj.stats()
    assert sc["ticks"] == c1["ticks"] + c2["ticks"] and sc["session"]["reconnects"] == 1
    assert sj["ticks"] == j1["ticks"] + j2["ticks"], sj["session"]
    assert sj["frames"] == 6000 and sj["session"]["reconnects"] == 1


def test_two_instances_split_the_symbols_by_subject(nats_server: BrokerProcess) -> None:
    """Fan-out scale-out without a queue group: subjects feed.{shard}, one shard each."""
    port = nats_server.port
    with Feed(source=url(port, subject="feed.0"), workers=1) as f0, \
            Feed(source=url(port, subject="feed.1"), workers=1) as f1:
        wait_for(lambda: feed_connected(f0) and feed_connected(f1), what="subscriptions")
        sent = publish(url(port, subject="feed.{shard}"), count=10000, shards=2)
        a, b = collect_ticks([f0, f1], 10000)
        syms0 = set(f0.symbols.to_list()) - {""}
        syms1 = set(f1.symbols.to_list()) - {""}
    both = np.concatenate([a, b])
    assert len(a) > 0 and len(b) > 0
    assert len(both) == sent["ticks"] and len(np.unique(both)) == len(both)
    assert syms0 and syms1 and not (syms0 & syms1), "a symbol went to both instances"


def test_jetstream_refused_messages_are_redelivered_and_decoded_once(
        nats_server: BrokerProcess) -> None:
    port = nats_server.port
    sent = publish(url(port, subject="feed.x", stream="FEED"), count=3000)
    src = url(port, subject="feed.>", stream="FEED", durable="ff")
    with Feed(source=src, workers=1, **brokers.REFUSING_FEED) as feed:
        wait_for(lambda: feed.frames_decoded() >= 3000, what="every message", timeout=90)
        time.sleep(0.3)  # a message decoded twice would show up now
        stats = feed.stats()
    s = stats["session"]
    assert s["nacked"] > 0 and s["redelivered"] > 0, s
    assert stats["ticks"] == sent["ticks"] and stats["frames"] == 3000, s
    assert s["duplicates"] == 0


# -- lossless: backpressure and restarts (numbered frames, rings read by the test) -------------

def test_core_backpressure_pauses_reading_and_loses_nothing(nats_server: BrokerProcess) -> None:
    """Small "pause" rings and a slow reader: the core subscriber stops reading its socket
    while a ring is full (the server buffers for it) and resumes; nothing is dropped, every
    symbol keeps its order, and the heartbeat (0.2 s) does not take the pauses for a dead
    server."""
    port = nats_server.port
    n = 20000
    with lossless.source_on_rings(url(port, subject="feed.>", heartbeat=0.2), pause=0.002,
                                  max_records=32) as (proc, reader):
        lossless.wait_for(lambda: proc.counters()["connects"] == 1, what="subscription")
        lossless.publish_frames(url(port, subject="feed.a"), lossless.frames(0, n))
        lossless.wait_for(lambda: reader.count() >= n, 90, "every frame", proc.counters)
    c = proc.counters()
    assert c["ring_drops"] == 0 and c["pauses"] >= 1 and c["backpressure_us"] > 0, c
    assert c["frames"] == n and c["heartbeat_timeouts"] == 0 and c["disconnects"] == 0, c
    assert sorted(reader.numbers()) == list(range(n)) and reader.gaps == 0
    reader.check_order()


def test_jetstream_backpressure_holds_the_batch(nats_server: BrokerProcess) -> None:
    """Small "pause" rings and a slow reader: JetStream pulls nothing more and acknowledges
    nothing of a batch until the rings took all of it; nothing is dropped or handed back."""
    port = nats_server.port
    n = 10000
    lossless.publish_frames(url(port, subject="feed.a", stream="FEED"), lossless.frames(0, n))
    src = url(port, subject="feed.>", stream="FEED", durable="ff", batch=200, ack_wait=2)
    lossless.check_held_back_then_acked(src, n, pause=0.002, max_records=32)


def test_jetstream_restart_accounting(nats_server: BrokerProcess) -> None:
    """nats-server restarts while the durable consumer is mid-stream (slow rings): every
    message stored is written exactly once; one whose acknowledgement the restart lost comes
    again (after ack_wait) and is counted as a duplicate; the new server_id counts a restart."""
    port = nats_server.port
    n, more = 6000, 2000
    pub = url(port, subject="js.a", stream="JS")
    lossless.publish_frames(pub, lossless.frames(0, n))
    src = url(port, subject="js.>", stream="JS", durable="ff", batch=100, ack_wait=1,
              backoff_cap=0.2)
    with lossless.source_on_rings(src, pause=0.003, max_records=16) as (proc, reader):
        lossless.wait_for(lambda: reader.count() >= n // 2, 60, "half", proc.counters)
        nats_server.restart()
        lossless.wait_for(lambda: proc.counters()["connects"] >= 2, what="reconnect",
                          info=proc.counters)
        lossless.publish_frames(pub, lossless.frames(n, more))
        lossless.wait_for(lambda: reader.count() >= n + more, 90, "every frame",
                          proc.counters)
        time.sleep(1.5)  # a lost acknowledgement is redelivered after ack_wait
    c = proc.counters()
    assert c["broker_restarts"] == 1 and c["reconnects"] == 1, c
    assert sorted(reader.numbers()) == list(range(n + more)), c
    assert c["frames"] == n + more and c["ring_drops"] == 0, c
    assert c["messages"] == c["frames"] + c["duplicates"] + c["nacked"], c


def test_core_restart_accounting(nats_server: BrokerProcess) -> None:
    """Core NATS is at most once: nothing can be published while the server is down, and what
    is published before the source subscribed again reaches nobody (the test publishes
    nothing then: NATS cannot say what was lost). Everything published before and after
    arrives exactly once and in order; the new server_id counts a restart."""
    port = nats_server.port
    src = url(port, subject="core.>", heartbeat=0.5, backoff_cap=0.2)
    pub = url(port, subject="core.a")
    with lossless.source_on_rings(src) as (proc, reader):
        lossless.wait_for(lambda: proc.counters()["connects"] == 1, what="subscription")
        lossless.publish_frames(pub, lossless.frames(0, 3000))
        lossless.wait_for(lambda: reader.count() >= 3000, what="first frames")
        nats_server.restart()
        lossless.wait_for(lambda: proc.counters()["connects"] >= 2, what="reconnect")
        lossless.publish_frames(pub, lossless.frames(3000, 3000))
        lossless.wait_for(lambda: reader.count() >= 6000, what="every frame",
                          info=proc.counters)
    c = proc.counters()
    assert c["broker_restarts"] == 1 and c["reconnects"] == 1 and c["evicted"] == 0, c
    assert sorted(reader.numbers()) == list(range(6000)) and c["ring_drops"] == 0, c
    reader.check_order()


def test_wrong_credentials_are_a_fatal_one_line_error(tmp_path) -> None:
    broker = brokers.start_nats(tmp_path, "--user", "feed", "--pass", "s3cret-pw")
    try:
        for creds in ("feed:wrong-pw@", ""):
            msg = brokers.assert_fails_at_once(f"nats://{creds}127.0.0.1:{broker.port}?subject=x",
                                               broker.port, "NATS at", "refused the credentials")
            assert "wrong-pw" not in msg
        with Feed(source=f"nats://feed:s3cret-pw@127.0.0.1:{broker.port}?subject=x",
                  workers=1) as feed:
            wait_for(lambda: feed_connected(feed), what="authenticated subscription")
    finally:
        broker.stop()
