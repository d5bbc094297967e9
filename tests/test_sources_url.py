"""Source URLs, routing and the Kafka source (whose broker cannot run here: its end-to-end test
runs only when FASTFEED_TEST_KAFKA names one, host:port)."""

from __future__ import annotations

import logging
import os

import pytest

from fastfeed import Feed
from fastfeed._listener import route_of
from fastfeed._ring import Ring
from fastfeed.sources import SourceProcess, SourceURLError, parse_source
from fastfeed.sources.base import RingWriter, SeenIds
from fastfeed.sources.kafka import kafka_config
from tests import brokers
from tests.brokers import assert_rows_match, unique

no_segment_left = brokers.no_segment_left


@pytest.mark.parametrize("url", [
    "redis://127.0.0.1:6379/0?channel=feed",
    "redis://127.0.0.1?pattern=feed.*&schannel=s1,s2&heartbeat=1",
    "rediss://u:p@h:6380/2?channel=a&channel=b",
    "redis+stream://h:1/0?stream=s&group=g&consumer=c&claim_idle=0&count=10&block=5",
    "nats://h:4222?subject=feed.>&queue=q",
    "nats://tok@h?subject=a.*,b.>&stream=S&durable=d&batch=5&ack_wait=2",
    "amqp://guest:guest@h:5672/vh?queue=q&exchange=x&exchange_type=topic&routing_key=a.#",
    "kafka://h1:9092,h2:9092?topic=feed&group=g&offset_reset=latest",
])
def test_valid_urls_parse(url: str) -> None:
    u = parse_source(url)
    assert u.scheme == url.split("://")[0]


@pytest.mark.parametrize(("url", "message"), [
    ("ftp://h/x", "unknown source scheme"),
    ("redis://h:6379/0", "channel="),
    ("redis://h/0?chanel=feed", "does not take chanel"),
    ("redis+stream://h/0?group=g", "stream="),
    ("redis+stream://h/0?stream=s&count=0", "positive"),
    ("nats://h?queue=q", "subject="),
    ("nats://h?subject=a&queue=q&stream=S", "not both"),
    ("amqp://h/?exchange=x", "queue="),
    ("amqp://h/?queue=q&exchange_type=weird", "exchange_type="),
    ("kafka://h?group=g", "topic="),
    ("redis://h:notaport/0?channel=a", "port"),
    ("redis+stream://h/0?stream=s&block=soon", "integer"),
    ("redis://h/0?channel=a&backoff_first=3&backoff_cap=1", "back-off"),
    ("nats://h?subject=a&dedup_window=0", "dedup_window"),
])
def test_bad_urls_say_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(SourceURLError, match=message):
        parse_source(url)


def test_password_never_shown() -> None:
    u = parse_source("redis+stream://alice:hunter2%21@h:1/0?stream=s")
    assert u.password == "hunter2!"
    for text in (u.redacted, repr(u), str(u)):
        assert "hunter2" not in text
    assert u.redacted == "redis+stream://alice:***@h:1/0?stream=s"
    assert u.scrub("failed for hunter2! and hunter2%21") == "failed for *** and ***"
    with pytest.raises(SourceURLError) as exc:
        parse_source("redis://alice:hunter2@h:1/0?bogus=1")
    assert "hunter2" not in str(exc.value)
    with pytest.raises(SourceURLError) as exc:
        SourceProcess("redis://alice:hunter2@h:1/0", ["x"])
    assert "hunter2" not in str(exc.value)


def test_kafka_config_takes_every_broker_and_sasl() -> None:
    u = parse_source("kafka://bob:pw@k1:9092,k2:9093?topic=t&sasl_mechanism=SCRAM-SHA-512")
    conf = kafka_config(u)
    assert conf["bootstrap.servers"] == "k1:9092,k2:9093"
    assert conf["sasl.username"] == "bob" and conf["sasl.mechanisms"] == "SCRAM-SHA-512"
    assert conf["security.protocol"] == "SASL_SSL"


@pytest.mark.parametrize(("frame", "symbol"), [
    (b'{"c":"NASDAQ:AAPL","p":1.0}', b"NASDAQ:AAPL"),
    (b'{ "p": 1.0, "c" : "NYSE:IBM" }', b"NYSE:IBM"),
    (b'{"s":[{"t":1,"c":243.08}],"c":"ARCA:SPY","bt":"1m"}', b"ARCA:SPY"),
    (b'[{"c":"BATS:X","p":1},{"c":"BATS:X","p":2}]', b"BATS:X"),
    (b'\n {"c":"NYSE:WS","p":1}', b"NYSE:WS"),
    (b'garbage "c":"NYSE:GB"', b"NYSE:GB"),
    (b'{"c":"NASDAQ:TRUNC', None),
    (b'{"status":"ok"}', None),
    (b"pong", None),
])
def test_routing_matches_the_websocket_listener(frame: bytes, symbol: bytes | None) -> None:
    ring = Ring.create(unique("route"), 1 << 16)
    try:
        counts = dict.fromkeys(("messages", "frames", "bytes", "control", "ring_drops",
                                "too_big"), 0)
        w = RingWriter([ring], counts)
        assert w.route(frame) == (route_of(symbol) if symbol is not None else -1)
        assert w.write(frame, 123)
        if symbol is None:
            assert counts["control"] == 1 and ring.written == 0
        else:
            b = ring.read_batch(timeout=1)
            assert b is not None and b.count == 1
            assert int(b.routes[0]) == route_of(symbol) and int(b.recv_ts[0]) == 123
            assert bytes(b.frame(0)) == frame
            b.release()
    finally:
        ring.close()
        ring.unlink()


def test_seen_ids_window_is_bounded() -> None:
    s = SeenIds(window=3)
    for i in range(5):
        s.add(i)
    assert 0 not in s and 1 not in s and all(i in s for i in (2, 3, 4))
    s.add_many([5, 6])
    assert len(s) == 3 and 4 in s and 5 in s and 6 in s and 3 not in s


def test_ring_writer_keeps_what_a_pausing_ring_refuses() -> None:
    """Under "pause" a full ring's frame and every later one wait, in order, without a drop
    (the control message among them is only counted); the connection is paused once and
    resumed when the backlog is written; a message id reaches the window once written."""
    import asyncio

    from fastfeed.sources import COUNTERS
    ring = Ring.create(unique("pause"), 1 << 10, full_policy="pause")
    try:
        counts = dict.fromkeys(COUNTERS, 0)
        w = RingWriter([ring], counts)
        w.seen = SeenIds()
        calls: list[str] = []
        w.attach(lambda: calls.append("pause"), lambda: calls.append("resume"))
        frames = [b'{"c":"X:%d","n":%d}' % (i % 3, i) for i in range(100)]
        frames.insert(50, b'{"status":"ok"}')
        assert w.write_batch(frames, 7) == []
        kept = len(w.backlog)
        assert kept > 0 and w.paused and calls == ["pause"]
        assert counts["ring_drops"] == 0 and ring.dropped == 0 and counts["pauses"] == 1
        assert counts["frames"] + kept == 100 and counts["control"] == 1
        assert counts["messages"] == 101
        assert w.write(b'{"c":"X:0","n":100}', 8, key="id-100")  # behind the others
        assert "id-100" not in w.seen
        got: list[bytes] = []

        async def drain() -> bool:
            async def read() -> None:
                while len(got) < 101:
                    b = ring.read_batch(1000, timeout=0)
                    if b is not None:
                        got.extend(bytes(b.frame(i)) for i in range(b.count))
                        b.release()
                    await asyncio.sleep(0.001)
            reader = asyncio.ensure_future(read())
            ok = await asyncio.wait_for(w.drain(), 10)
            await asyncio.wait_for(reader, 10)
            return ok

        assert asyncio.run(drain())
        assert not w.backlog and not w.paused and calls == ["pause", "resume"]
        assert got == [f for f in frames if b"status" not in f] + [b'{"c":"X:0","n":100}']
        assert "id-100" in w.seen and counts["frames"] == 101 and counts["ring_drops"] == 0
        assert w.backpressure_us() > 0 and counts["backpressure_us"] == w.backpressure_us()
        # What a discarded backlog held is reported as not written.
        for i in range(200):
            w.write(b'{"c":"X:1","n":%d}' % i, 9)
        ticket = w.kept
        assert w.discard() > 0 and not w.paused
        assert asyncio.run(w.written(ticket)) is False
    finally:
        ring.close()
        ring.unlink()


@pytest.mark.skipif(not os.environ.get("FASTFEED_TEST_KAFKA"),
                    reason="no Kafka broker here: set FASTFEED_TEST_KAFKA=host:port to run")
def test_kafka_consumer_group_streams_the_market() -> None:
    pytest.importorskip("confluent_kafka")
    from fastfeed.sim.publish import publish
    broker = os.environ["FASTFEED_TEST_KAFKA"]
    topic = unique("fastfeed-test")
    sent = publish(f"kafka://{broker}?topic={topic}", count=5000, malformed=0.01)
    with Feed(source=f"kafka://{broker}?topic={topic}&group={unique('g')}", workers=2,
              log_level=logging.INFO) as feed:
        stats = feed.run(frames=5000, duration=120)
    assert_rows_match(stats, sent)
    assert stats["session"]["acked"] == 5000


def test_kafka_source_without_a_broker_retries_and_stops_cleanly() -> None:
    """No broker here: the Kafka source must keep trying (librdkafka reconnects), write
    nothing, and stop on request with exit code 0."""
    pytest.importorskip("confluent_kafka")
    import time

    from fastfeed.pool import WorkerPool
    with WorkerPool(1) as pool:
        proc = SourceProcess(f"kafka://127.0.0.1:{brokers.free_port()}?topic=t",
                             pool.ring_names, log_level=logging.CRITICAL).start()
        time.sleep(1.5)
        assert proc.is_alive()
        assert proc.stop() == 0 and proc.error is None
        c = proc.counters()
    assert c["frames"] == 0 and c["connects"] == 0


@pytest.mark.parametrize("scheme_and_query", [
    ("redis", "/0?channel=feed"),
    ("redis+stream", "/0?stream=s"),
    ("nats", "?subject=feed.>"),
    ("nats", "?subject=feed.>&stream=S"),
    ("amqp", "/?queue=q"),
    ("kafka", "?topic=t"),
])
def test_no_log_line_shows_the_password(scheme_and_query: tuple[str, str],
                                        capfd: pytest.CaptureFixture[str]) -> None:
    """Every source, logging at DEBUG, failing to connect (nothing listens on the port) and
    retrying: its log lines name the broker but never the password."""
    import time

    from fastfeed.pool import WorkerPool
    scheme, query = scheme_and_query
    if scheme == "amqp":
        pytest.importorskip("aio_pika")
    if scheme == "nats":
        pytest.importorskip("nats")
    if scheme == "kafka":
        pytest.importorskip("confluent_kafka")
    secret = "Zq9-sekrit-pw"
    port = brokers.free_port()
    with WorkerPool(1) as pool:
        proc = SourceProcess(f"{scheme}://user:{secret}@127.0.0.1:{port}{query}",
                             pool.ring_names, log_level=logging.DEBUG).start()
        time.sleep(1.5)
        assert proc.stop() == 0, proc.error
        assert proc.counters()["connect_errors"] > 0 or scheme == "kafka"
    err = capfd.readouterr().err
    assert f"127.0.0.1:{port}" in err, err[-2000:]  # it did log about this broker
    assert secret not in err


def test_nats_protocol_parser_any_split() -> None:
    """The core NATS parser (fast path and general path) against one byte stream cut at every
    kind of place: MSG with and without reply subjects, HMSG, PING, INFO, a payload holding a
    CRLF, an empty payload."""
    import asyncio
    import random
    from types import SimpleNamespace

    from fastfeed.sources.nats import _CoreProtocol

    payloads = [b'{"c":"A:%d","p":1}' % i for i in range(300)]
    payloads[17] = b'{"c":"A:17",\r\n "p":1}'
    payloads[40] = b""
    wire = []
    for i, p in enumerate(payloads):
        if i % 50 == 7:
            wire.append(b"PING\r\n")
        if i % 97 == 3:
            wire.append(b'INFO {"server_id":"x"}\r\n')
        if i % 31 == 5:
            hdr = b"NATS/1.0\r\nX: y\r\n\r\n"
            wire.append(b"HMSG feed.a 1 %d %d\r\n%s%s\r\n" % (len(hdr), len(hdr) + len(p),
                                                              hdr, p))
        elif i % 2:
            wire.append(b"MSG feed.a 1 _INBOX.r %d\r\n%s\r\n" % (len(p), p))
        else:
            wire.append(b"MSG feed.a 1 %d\r\n%s\r\n" % (len(p), p))
    data = b"".join(wire)

    async def run(seed: int) -> tuple[list[bytes], list[bytes]]:
        got: list[bytes] = []
        sent: list[bytes] = []
        src = SimpleNamespace(out=SimpleNamespace(
            write_batch=lambda ps, ts: got.extend(ps) or []))
        proto = _CoreProtocol(src)  # type: ignore[arg-type]
        proto.send = sent.append  # type: ignore[method-assign]
        rng = random.Random(seed)
        pos = 0
        while pos < len(data):
            step = rng.choice((1, 2, 3, 7, 50, 400, 5000, 100000))
            proto.data_received(data[pos:pos + step])
            pos += step
        return got, sent

    for seed in range(30):
        got, sent = asyncio.run(run(seed))
        assert got == payloads, seed
        assert sent.count(b"PONG\r\n") == sum(1 for i in range(300) if i % 50 == 7)
