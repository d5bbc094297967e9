"""Redis Pub/Sub and Redis Streams sources against a real redis-server on a loopback port.

Every test streams the simulator's market (fastfeed.sim.publish) through a real Feed (source
process, rings, decoder workers) and checks the decoded rows against what was published.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from fastfeed import Feed
from fastfeed.sim.publish import publish
from fastfeed.sources import SourceProcess, SourceURLError
from fastfeed.sources.resp import resp_command
from tests import brokers, lossless
from tests.brokers import (
    BrokerProcess,
    assert_rows_match,
    collect_ticks,
    feed_connected,
    wait_for,
)

# The fixtures this module uses (pytest finds fixtures by module attribute).
redis_server = brokers.redis_server
no_segment_left = brokers.no_segment_left

brokers.need_module("redis", "redis")
brokers.need_module("hiredis", "redis")


def redis_cmd(port: int, *args: str | int) -> bytes:
    """One command on a fresh connection; the raw reply (tests only, small replies)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(resp_command(*args))
        return s.recv(1 << 20)


def run_until_frames(feed: Feed, frames: int, timeout: float = 60.0) -> dict:
    return feed.run(frames=frames, duration=timeout)


# -- Pub/Sub ------------------------------------------------------------------------------------

@pytest.mark.parametrize("workers", [2, 0], ids=["workers", "inline"])
def test_pubsub_streams_the_published_market(redis_server: BrokerProcess, workers: int) -> None:
    port = redis_server.port
    with Feed(source=f"redis://127.0.0.1:{port}/0?channel=feed", workers=workers) as feed:
        wait_for(lambda: feed_connected(feed), what="subscription")
        sent = publish(f"redis://127.0.0.1:{port}/0?channel=feed", count=20000,
                       malformed=0.01, arrays=0.05, status_every=1000)
        stats = run_until_frames(feed, sent["frames_sent"])
    assert sent["malformed"] > 0 and sent["control_sent"] == 20
    assert_rows_match(stats, sent)
    s = stats["session"]
    assert s["frames"] == sent["frames_sent"]
    assert s["control"] == sent["control_sent"] == stats["control"]
    assert s["disconnects"] == 0 and s["ring_drops"] == 0


def test_pubsub_patterns_and_sharded_channels(redis_server: BrokerProcess) -> None:
    """PSUBSCRIBE and SSUBSCRIBE: a pattern over per-shard channels sees every frame."""
    port = redis_server.port
    base = f"redis://127.0.0.1:{port}/0"
    with Feed(source=f"{base}?pattern=feed.*&schannel=sfeed", workers=2) as feed:
        wait_for(lambda: feed_connected(feed), what="subscriptions")
        sent = publish(f"{base}?channel=feed.{{shard}}", count=4000, shards=3)
        ssent = publish(f"{base}?schannel=sfeed", count=3000, seed=7)
        stats = feed.run(frames=7000, duration=60)
    assert stats["ticks"] == sent["ticks"] + ssent["ticks"]
    assert stats["quotes"] == sent["quotes"] + ssent["quotes"]
    assert stats["frames"] == 7000 and stats["errors"] == 0


def test_two_instances_split_the_symbols_by_channel(redis_server: BrokerProcess) -> None:
    """Fan-out scale-out: the publisher shards by symbol (channel feed.{shard}), each instance
    subscribes to its shard; together they decode every message once, and every symbol is
    decoded by one instance only (its order kept)."""
    port = redis_server.port
    base = f"redis://127.0.0.1:{port}/0"
    with Feed(source=f"{base}?channel=feed.0", workers=1) as f0, \
            Feed(source=f"{base}?channel=feed.1", workers=1) as f1:
        wait_for(lambda: feed_connected(f0) and feed_connected(f1), what="subscriptions")
        sent = publish(f"{base}?channel=feed.{{shard}}", count=10000, shards=2)
        a, b = collect_ticks([f0, f1], 10000)
        syms0, syms1 = set(f0.symbols.to_list()), set(f1.symbols.to_list())
        syms0.discard("")  # the table's reserved empty entry, if any
        syms1.discard("")
    both = np.concatenate([a, b])
    assert len(a) > 0 and len(b) > 0
    assert len(both) == sent["ticks"] and len(np.unique(both)) == len(both)
    assert syms0 and syms1 and not (syms0 & syms1), "a symbol went to both instances"


def test_pubsub_survives_restart_and_counts_evictions(redis_server: BrokerProcess) -> None:
    port = redis_server.port
    url = f"redis://127.0.0.1:{port}/0?channel=feed&heartbeat=0.5"
    with Feed(source=url, workers=2) as feed:
        wait_for(lambda: feed_connected(feed), what="subscription")
        first = publish(url, count=5000)
        wait_for(lambda: feed.frames_decoded() >= 5000, what="first half")
        redis_server.restart()
        wait_for(lambda: feed_connected(feed, 2), what="reconnect after restart")
        # A server that stays up but closes the subscriber (as for a slow one): "evicted".
        assert b"1" in redis_cmd(port, "CLIENT", "KILL", "TYPE", "pubsub")
        wait_for(lambda: feed_connected(feed, 3), what="reconnect after eviction")
        second = publish(url, count=5000, seed=1)
        stats = feed.run(frames=10000, duration=60)
    s = stats["session"]
    assert s["broker_restarts"] == 1 and s["evicted"] == 1, s
    assert s["reconnects"] == 2 and s["disconnects"] == 2, s
    assert stats["ticks"] == first["ticks"] + second["ticks"]
    assert stats["frames"] == 10000 and stats["errors"] == 0


def test_bad_password_is_a_fatal_one_line_error(redis_server: BrokerProcess) -> None:
    port = redis_server.port
    redis_cmd(port, "CONFIG", "SET", "requirepass", "s3cret-pw")
    from fastfeed.pool import WorkerPool
    with WorkerPool(1) as pool:
        proc = SourceProcess(f"redis://u:wrong-pw@127.0.0.1:{port}/0?channel=feed",
                             pool.ring_names).start()
        assert proc.join(30) == 1
        assert proc.error is not None and "credentials" in proc.error
        assert "wrong-pw" not in proc.error and "wrong-pw" not in repr(proc)
        ok = SourceProcess(f"redis://default:s3cret-pw@127.0.0.1:{port}/0?channel=feed",
                           pool.ring_names).start()
        try:
            wait_for(lambda: ok.counters()["connects"] == 1, what="authenticated connect")
        finally:
            assert ok.stop() == 0


# -- Streams ------------------------------------------------------------------------------------

def stream_url(port: int, **params: str | int) -> str:
    q = {"stream": "feed", "group": "g", "start": "0", **params}
    return f"redis+stream://127.0.0.1:{port}/0?" + "&".join(f"{k}={v}" for k, v in q.items())


def test_stream_consumer_group_streams_the_market(redis_server: BrokerProcess) -> None:
    port = redis_server.port
    with Feed(source=stream_url(port, consumer="c1"), workers=2) as feed:
        sent = publish(stream_url(port), count=20000, malformed=0.01, arrays=0.05,
                       status_every=1000)
        stats = run_until_frames(feed, sent["frames_sent"])
    assert_rows_match(stats, sent)
    s = stats["session"]
    assert s["acked"] == sent["frames_sent"] + sent["control_sent"]
    assert s["duplicates"] == 0 and s["ring_drops"] == 0
    # Nothing left pending in the group: every entry was acknowledged after its commit.
    assert redis_cmd(port, "XPENDING", "feed", "g").startswith(b"*4\r\n:0\r\n")


def test_stream_restart_loses_nothing(redis_server: BrokerProcess) -> None:
    port = redis_server.port
    with Feed(source=stream_url(port, consumer="c1", block=100), workers=2) as feed:
        first = publish(stream_url(port), count=8000)
        wait_for(lambda: feed.frames_decoded() > 1000, what="streaming")
        redis_server.restart()  # possibly mid-batch: unacknowledged entries stay pending
        second = publish(stream_url(port), count=8000, seed=3)
        wait_for(lambda: feed.frames_decoded() >= 16000, what="every entry", timeout=60)
        # Give a duplicate (an acknowledgement lost in the restart) time to show up.
        time.sleep(0.3)
        stats = feed.stats()
    s = stats["session"]
    assert s["reconnects"] >= 1 and s["disconnects"] >= 1, s
    assert stats["ticks"] == first["ticks"] + second["ticks"]
    assert stats["quotes"] == first["quotes"] + second["quotes"]
    assert stats["bars"] == first["bars"] + second["bars"]
    assert stats["frames"] == 16000 and stats["errors"] == 0


def test_stream_reclaims_a_dead_consumers_pending_entries(redis_server: BrokerProcess) -> None:
    port = redis_server.port
    sent = publish(stream_url(port), count=3000)
    # A consumer that read 500 entries and died before acknowledging them.
    redis_cmd(port, "XGROUP", "CREATE", "feed", "g", "0")
    redis_cmd(port, "XREADGROUP", "GROUP", "g", "dead", "COUNT", 500, "STREAMS", "feed", ">")
    time.sleep(0.25)
    with Feed(source=stream_url(port, consumer="alive", claim_idle=200), workers=2) as feed:
        stats = feed.run(frames=3000, duration=60)
    s = stats["session"]
    assert s["reclaimed"] == 500, s
    assert_rows_match(stats, sent)
    assert redis_cmd(port, "XPENDING", "feed", "g").startswith(b"*4\r\n:0\r\n")


def test_stream_killed_consumer_is_reclaimed_by_another(redis_server: BrokerProcess) -> None:
    """A source SIGKILLed while holding unacknowledged entries: a second instance gets them."""
    import redis

    from fastfeed._ring import Ring
    port = redis_server.port
    sent = publish(stream_url(port), count=4000)
    # Nobody reads this tiny ring and it drops at once when full: the first source commits
    # (and acknowledges) what fits, keeps the rest of its batch pending, and is killed.
    ring = Ring.create("victim", 1 << 14, full_policy="drop")
    try:
        victim = SourceProcess(stream_url(port, consumer="victim", count=500),
                               [ring.name]).start()
        wait_for(lambda: victim.counters()["ring_drops"] > 0, what="victim's ring full")
        victim.kill()
    finally:
        ring.close()
        ring.unlink()
    r = redis.Redis(port=port)
    pending = r.xpending("feed", "g")["pending"]
    acked = r.xinfo_groups("feed")[0]["entries-read"] - pending
    assert pending > 0 and acked > 0
    time.sleep(0.25)  # the victim's entries must be idle longer than claim_idle
    with Feed(source=stream_url(port, consumer="heir", claim_idle=200), workers=2) as feed:
        stats = feed.run(frames=4000 - acked, duration=60)
    s = stats["session"]
    assert s["reclaimed"] == pending, (pending, s)
    assert stats["frames"] == 4000 - acked and stats["errors"] == 0
    assert stats["ticks"] < sent["ticks"]  # what the victim's ring held died with it
    assert r.xpending("feed", "g")["pending"] == 0


def test_two_instances_share_one_consumer_group(redis_server: BrokerProcess) -> None:
    port = redis_server.port
    with Feed(source=stream_url(port, consumer="a", count=200), workers=1) as fa, \
            Feed(source=stream_url(port, consumer="b", count=200), workers=1) as fb:
        # Both must be reading before the first entry, or one may take them all (a busy
        # machine can start one process seconds after the other).
        deadline = time.monotonic() + 30
        while not all(f.stats()["session"].get("connects", 0) for f in (fa, fb)):
            assert time.monotonic() < deadline, [f.stats()["session"] for f in (fa, fb)]
            time.sleep(0.02)
        sent = publish(stream_url(port), count=20000, rate=40000)
        a, b = collect_ticks([fa, fb], 20000)
    both = np.concatenate([a, b])
    assert len(a) > 0 and len(b) > 0, "both instances must get a share"
    assert len(both) == sent["ticks"]
    assert len(np.unique(both)) == len(both), "a message was decoded twice"


def test_stream_refused_entries_are_read_again_and_decoded_once(
        redis_server: BrokerProcess) -> None:
    port = redis_server.port
    sent = publish(stream_url(port), count=3000)
    with Feed(source=stream_url(port, consumer="c1"), workers=1,
              **brokers.REFUSING_FEED) as feed:
        stats = feed.run(frames=3000, duration=90)
    s = stats["session"]
    assert s["ring_drops"] > 0 and s["redelivered"] > 0, s
    assert stats["ticks"] == sent["ticks"] and stats["frames"] == 3000, s
    assert s["duplicates"] == 0 and s["acked"] == 3000
    assert redis_cmd(port, "XPENDING", "feed", "g").startswith(b"*4\r\n:0\r\n")


def test_pubsub_slow_subscriber_is_evicted_and_counted(redis_server: BrokerProcess,
                                                        tmp_path: Path) -> None:
    """A real slow subscriber: the workers hold their batches and the ring blocks the source,
    so Redis's output buffer for it passes client-output-buffer-limit and Redis drops it. The
    source counts the eviction (same run_id), reconnects and streams again."""
    port = redis_server.port
    redis_cmd(port, "CONFIG", "SET", "client-output-buffer-limit", "pubsub 64kb 0 0")
    url = f"redis://127.0.0.1:{port}/0?channel=feed"
    gate = tmp_path / "gate"
    with Feed(source=url, workers=1, ring_capacity=1 << 14, full_policy="block",
              handler=functools.partial(brokers.gated_handler, str(gate))) as feed:
        wait_for(lambda: feed_connected(feed), what="subscription")
        # Publish until Redis has dropped the stalled subscriber (its socket buffers absorb
        # the first megabytes), then let the workers go.
        for _ in range(40):
            publish(url, count=10000)
            if b"name=fastfeed" not in redis_cmd(port, "CLIENT", "LIST", "TYPE", "pubsub"):
                break
        gate.touch()
        wait_for(lambda: feed_connected(feed, 2), what="reconnect after eviction", timeout=60)
        s = feed.stats()["session"]
        assert s["evicted"] == 1 and s["broker_restarts"] == 0, s
        before = s["frames"]
        publish(url, count=500, seed=5)
        wait_for(lambda: feed.stats()["session"]["frames"] >= before + 500,
                 what="streaming after the eviction", timeout=60)


def test_sim_publish_command_prints_the_simulator_counts(
        redis_server: BrokerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    """What `fastfeed sim --publish URL --json` runs: its JSON line is what the Feed decodes."""
    import argparse
    import json

    from fastfeed.sim.publish import publish_command
    from fastfeed.sim.server import parse_faults
    port = redis_server.port
    url = f"redis+stream://127.0.0.1:{port}/0?stream=cli&maxlen=100000"
    args = argparse.Namespace(publish=url, count=3000, rate=0.0, symbols=50, seed=4,
                              mix=(0.6, 0.3, 0.1), start_time=None, shards=1, duration=None,
                              json=True)
    counts = publish_command(args, parse_faults(["malformed=0.02", "status-every=500"]))
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == counts and counts["control_sent"] == 6 and counts["malformed"] > 0
    with Feed(source=f"redis+stream://127.0.0.1:{port}/0?stream=cli&start=0", workers=2) as feed:
        stats = feed.run(frames=3000, duration=60)
    assert_rows_match(stats, counts)
    with pytest.raises(SourceURLError):
        publish_command(argparse.Namespace(**{**vars(args), "publish": "redis://h/0"}),
                        parse_faults([]))


# -- lossless: backpressure and restarts (numbered frames, rings read by the test) -------------

redis_everysec = brokers.redis_everysec


def redis_publish(port: int, payloads: list[bytes]) -> list[int]:
    """PUBLISH each payload on channel "feed" (one pipeline); the number of subscribers each
    reached, as Redis reports it (0: nobody was subscribed, the message is gone)."""
    import redis
    r = redis.Redis(port=port, socket_timeout=10, socket_connect_timeout=2)
    try:
        pipe = r.pipeline(transaction=False)
        for p in payloads:
            pipe.publish("feed", p)
        return [int(x) for x in pipe.execute()]
    finally:
        r.close()


def test_pubsub_backpressure_pauses_reading_and_loses_nothing(
        redis_server: BrokerProcess) -> None:
    """Small "pause" rings and a slow reader: the source stops reading the socket while a
    ring is full (Redis buffers for it) and resumes; nothing is dropped, every symbol keeps
    its order, and the heartbeat (0.2 s) does not take the pauses for a dead server."""
    port = redis_server.port
    n = 20000
    url = f"redis://127.0.0.1:{port}/0?channel=feed&heartbeat=0.2"
    with lossless.source_on_rings(url, pause=0.002, max_records=32) as (proc, reader):
        lossless.wait_for(lambda: proc.counters()["connects"] == 1, what="subscription")
        assert redis_publish(port, lossless.frames(0, n)) == [1] * n
        lossless.wait_for(lambda: reader.count() >= n, 90, "every frame", proc.counters)
    c = proc.counters()
    assert c["ring_drops"] == 0 and c["pauses"] >= 1 and c["backpressure_us"] > 0, c
    assert c["frames"] == n and c["messages"] == n, c
    assert c["heartbeat_timeouts"] == 0 and c["disconnects"] == 0, c
    assert sorted(reader.numbers()) == list(range(n)) and reader.gaps == 0
    reader.check_order()


def test_pubsub_restart_accounting(redis_server: BrokerProcess) -> None:
    """A Redis restart: at most once by design. Nothing can be published while the server is
    down; what is published after it is back but before the source subscribed again reaches
    nobody (PUBLISH says 0 subscribers) and is lost; everything that reached the subscriber
    arrives, once and in order, and the restart is told from an eviction by the run_id."""
    port = redis_server.port
    url = f"redis://127.0.0.1:{port}/0?channel=feed&heartbeat=0.5&backoff_cap=0.2"
    delivered: list[int] = []
    lost: list[int] = []
    with lossless.source_on_rings(url) as (proc, reader):
        lossless.wait_for(lambda: proc.counters()["connects"] == 1, what="subscription")
        assert redis_publish(port, lossless.frames(0, 3000)) == [1] * 3000
        delivered += range(3000)
        lossless.wait_for(lambda: reader.count() >= 3000, what="first frames")
        redis_server.stop()
        time.sleep(0.3)
        redis_server.start()
        # Publish one frame at a time until the source is back.
        n = 3000
        deadline = time.monotonic() + 30
        while proc.counters()["connects"] < 2:
            assert time.monotonic() < deadline, proc.counters()
            (delivered if redis_publish(port, lossless.frames(n, 1)) == [1] else lost).append(n)
            n += 1
            time.sleep(0.002)
        reached = redis_publish(port, lossless.frames(n, 3000))
        assert reached == [1] * 3000
        delivered += range(n, n + 3000)
        lossless.wait_for(lambda: reader.count() >= len(delivered), what="every frame",
                          info=proc.counters)
    c = proc.counters()
    assert c["broker_restarts"] == 1 and c["evicted"] == 0, c
    assert c["reconnects"] == 1 and c["disconnects"] == 1 and c["ring_drops"] == 0, c
    assert sorted(reader.numbers()) == delivered, (len(lost), c)
    reader.check_order()


def test_stream_backpressure_waits_for_the_rings(redis_server: BrokerProcess) -> None:
    """Small "pause" rings and a slow reader: the source reads nothing more and acknowledges
    nothing of a batch until the rings took all of it; nothing is dropped, handed back or
    read again, and every symbol keeps its order."""
    port = redis_server.port
    n = 20000
    lossless.publish_frames(stream_url(port), lossless.frames(0, n))
    src = stream_url(port, consumer="c1", count=500)
    lossless.check_held_back_then_acked(src, n, pause=0.002, max_records=32)
    assert redis_cmd(port, "XPENDING", "feed", "g").startswith(b"*4\r\n:0\r\n")


def test_stream_crash_with_everysec_redelivers_only_duplicates(
        redis_everysec: BrokerProcess, tmp_path: Path) -> None:
    """Redis (appendfsync everysec) crashes mid-stream and comes back without its last
    acknowledgements and reads. A kill alone rarely loses acknowledged writes (Redis writes
    its file before replying; a host crash loses what was not fsynced yet), so the test
    restores the append-only file as it was a moment before the kill: the entries the source
    read and acknowledged since come back, pending or as new. Each is recognised by its id
    (counted as a duplicate, acknowledged) and none is written twice; none is lost."""
    b = redis_everysec
    port = b.port
    n, more = 9000, 2000
    lossless.publish_frames(stream_url(port), lossless.frames(0, n))
    time.sleep(1.2)  # everysec: the entries are in the file
    aof, snap = b.workdir / "appendonlydir", tmp_path / "aof-snapshot"
    src = stream_url(port, consumer="c1", count=100, block=100, backoff_cap=0.2)
    with lossless.source_on_rings(src, pause=0.003, max_records=16) as (proc, reader):
        lossless.wait_for(lambda: reader.count() >= n // 3, 60, "a third", proc.counters)
        shutil.copytree(aof, snap)
        acked_at_copy = proc.counters()["acked"]
        lossless.wait_for(lambda: reader.count() >= 2 * n // 3, 60, "two thirds",
                          proc.counters)
        assert proc.counters()["acked"] > acked_at_copy + 1000
        b.crash()
        shutil.rmtree(aof)
        shutil.copytree(snap, aof)
        b.start()
        lossless.wait_for(lambda: proc.counters()["connects"] >= 2, what="reconnect")
        lossless.publish_frames(stream_url(port), lossless.frames(n, more))
        lossless.wait_for(lambda: reader.count() >= n + more, 90, "every frame",
                          proc.counters)
        lossless.wait_for(lambda: redis_cmd(port, "XPENDING", "feed", "g").startswith(
            b"*4\r\n:0\r\n"), what="nothing pending")
    c = proc.counters()
    assert c["broker_restarts"] == 1 and c["reconnects"] == 1, c
    assert sorted(reader.numbers()) == list(range(n + more)), c
    assert c["frames"] == n + more and c["ring_drops"] == 0, c
    assert c["duplicates"] >= 1000 and c["nacked"] == 0, c
    assert c["messages"] == c["frames"] + c["duplicates"], c
    reader.check_order()


def test_pubsub_feed_with_pause_policy_decodes_everything(redis_server: BrokerProcess) -> None:
    """Through a real Feed: "pause" rings of 16 KiB and workers slowed down by their handler;
    every published frame is decoded, none dropped, and the pauses show in the stats."""
    port = redis_server.port
    url = f"redis://127.0.0.1:{port}/0?channel=feed"
    with Feed(source=url, workers=1, ring_capacity=1 << 14, full_policy="pause",
              handler=brokers.slow_handler) as feed:
        wait_for(lambda: feed_connected(feed), what="subscription")
        sent = publish(url, count=5000, malformed=0.01, status_every=1000)
        stats = run_until_frames(feed, sent["frames_sent"])
    assert_rows_match(stats, sent)
    s = stats["session"]
    assert s["ring_drops"] == 0 and s["pauses"] >= 1 and s["backpressure_us"] > 0, s


def test_publisher_gives_up_on_a_frozen_redis(redis_server: BrokerProcess) -> None:
    """A Redis that takes the connection and then answers nothing (SIGSTOP): the publisher
    ends with TimeoutError after send_timeout, instead of waiting forever."""
    os.kill(redis_server.proc.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="did not finish sending a batch within 2 s"):
            publish(f"redis://127.0.0.1:{redis_server.port}/0?channel=feed", count=1000,
                    send_timeout=2.0)
        assert time.monotonic() - t0 < 10
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
