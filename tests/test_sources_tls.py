"""The pub/sub sources over TLS, against real brokers the tests start with certificates from a
CA they make: ``redis-server`` on a TLS port (``rediss://``, ``rediss+stream://``, and with
client certificates required) and ``nats-server --tls`` (``tls://``). The CA is given in the
URL (``ca_file=``); without it, the certificate is untrusted and the source stops at once with
one line, not a reconnect loop. RabbitMQ over TLS (``amqps://``) runs against a node of its
own that the tests boot with a TLS-only listener (and one that requires client
certificates), beside the machine's node on 5672."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastfeed import Feed
from fastfeed.feed import FeedError
from fastfeed.sim.publish import publish
from fastfeed.sources import SourceURLError, parse_source
from tests.brokers import (
    TLSFiles,
    assert_fails_at_once,
    assert_rows_match,
    feed_connected,
    need_module,
    start_nats_tls,
    start_rabbitmq_tls,
    start_redis_tls,
    wait_for,
)

pytest.importorskip("trustme")


@pytest.fixture
def tls(tmp_path: Path) -> TLSFiles:
    return TLSFiles(tmp_path / "certs")


def run(feed: Feed, frames: int) -> dict:
    return feed.run(frames=frames, duration=60)


def test_rediss_pubsub_and_stream(tmp_path: Path, tls: TLSFiles) -> None:
    need_module("hiredis", "redis")
    broker = start_redis_tls(tmp_path, tls)
    try:
        port = broker.port
        url = f"rediss://127.0.0.1:{port}/0?channel=feed&ca_file={tls.ca}"
        with Feed(source=url, workers=1) as feed:
            wait_for(lambda: feed_connected(feed), what="subscription over TLS")
            sent = publish(url, count=20000, malformed=0.01)
            stats = run(feed, sent["frames_sent"])
        assert_rows_match(stats, sent)
        surl = (f"rediss+stream://127.0.0.1:{port}/0?stream=feed&group=g&start=0"
                f"&ca_file={tls.ca}")
        with Feed(source=surl, workers=1) as feed:
            sent = publish(surl, count=20000)
            stats = run(feed, sent["frames_sent"])
        assert_rows_match(stats, sent)
        assert stats["session"]["acked"] == sent["frames_sent"]
    finally:
        broker.stop()


def test_rediss_untrusted_certificate_is_fatal_and_one_line(tmp_path: Path,
                                                            tls: TLSFiles) -> None:
    need_module("hiredis", "redis")
    broker = start_redis_tls(tmp_path, tls)
    try:
        assert_fails_at_once(f"rediss://127.0.0.1:{broker.port}/0?channel=feed", broker.port,
                             "not trusted", "ca_file=")
    finally:
        broker.stop()


@pytest.mark.parametrize("scheme", ["rediss", "rediss+stream", "tls", "amqps"])
def test_mutual_tls(tmp_path: Path, tls: TLSFiles, scheme: str) -> None:
    """A broker that requires client certificates: with one the rows arrive; without one,
    or with one from a CA it does not know, the run ends at once with one line that says
    what to give."""
    if scheme.startswith("rediss"):
        need_module("hiredis", "redis")
        broker = start_redis_tls(tmp_path, tls, client_certs=True)
        src = f"{scheme}://127.0.0.1:{broker.port}/0?" + (
            "channel=feed" if scheme == "rediss" else "stream=feed&group=g&start=0")
        src += f"&ca_file={tls.ca}"
    elif scheme == "tls":
        need_module("nats", "nats")
        broker = start_nats_tls(tmp_path, tls, client_certs=True)
        src = f"tls://127.0.0.1:{broker.port}?subject=feed&ca_file={tls.ca}"
    else:
        need_module("aio_pika", "rabbitmq")
        broker = start_rabbitmq_tls(tmp_path, tls, client_certs=True)
        src = f"amqps://guest:guest@127.0.0.1:{broker.port}/?queue=ff-mtls&ca_file={tls.ca}"
    try:
        url = f"{src}&client_cert={tls.client}"
        with Feed(source=url, workers=1) as feed:
            wait_for(lambda: feed_connected(feed), what=f"{scheme} consumer over mutual TLS")
            sent = publish(url, count=10000)
            stats = run(feed, sent["frames_sent"])
        assert_rows_match(stats, sent)
        # nats-server may reset the connection before its TLS alert is read, so the alert
        # comes after some tries (up to 8 seen in CI on a busy box): bounded, not at once
        retries = 20 if scheme == "tls" else 1
        assert_fails_at_once(src, broker.port, "requires a client certificate", "client_cert=",
                             retries=retries)
        trustme = pytest.importorskip("trustme")
        stranger = str(tmp_path / "stranger.pem")
        trustme.CA().issue_cert("stranger.fastfeed.test").private_key_and_cert_chain_pem \
            .write_to_path(stranger)
        assert_fails_at_once(f"{src}&client_cert={stranger}", broker.port,
                             "refused the client certificate", stranger, retries=retries)
    finally:
        broker.stop()


def test_nats_tls(tmp_path: Path, tls: TLSFiles) -> None:
    need_module("nats", "nats")
    broker = start_nats_tls(tmp_path, tls)
    try:
        port = broker.port
        with Feed(source=f"tls://127.0.0.1:{port}?subject=feed.>&ca_file={tls.ca}",
                  workers=1) as feed:
            wait_for(lambda: feed_connected(feed), what="NATS subscription over TLS")
            sent = publish(f"tls://127.0.0.1:{port}?subject=feed.{{shard}}&ca_file={tls.ca}",
                           count=20000, shards=2)
            stats = run(feed, sent["frames_sent"])
        assert_rows_match(stats, sent)
        # untrusted: one line, no loop
        with Feed(source=f"tls://127.0.0.1:{port}?subject=feed.>", workers=1) as feed:
            with pytest.raises(FeedError, match="not trusted"):
                feed.run(duration=30)
    finally:
        broker.stop()


def test_amqps_queue_and_untrusted_certificate(tmp_path: Path, tls: TLSFiles) -> None:
    need_module("aio_pika", "rabbitmq")
    broker = start_rabbitmq_tls(tmp_path, tls)
    try:
        base = f"amqps://guest:guest@127.0.0.1:{broker.port}/"
        src = f"{base}?queue=ff-tls&prefetch=500&ca_file={tls.ca}"
        with Feed(source=src, workers=2) as feed:
            wait_for(lambda: feed_connected(feed), what="consumer over TLS")
            sent = publish(src, count=20000, malformed=0.01, status_every=1000)
            stats = run(feed, sent["frames_sent"])
        assert_rows_match(stats, sent)
        s = stats["session"]
        assert s["control"] == sent["control_sent"] == 20
        assert s["acked"] == sent["frames_sent"] + sent["control_sent"], s
        assert_fails_at_once(f"{base}?queue=ff-tls", broker.port, "not trusted", "ca_file=")
    finally:
        broker.stop()


@pytest.mark.parametrize("url, message", [
    ("redis://h/0?channel=a&ca_file=/etc/hostname", "for TLS schemes only"),
    ("rediss://h/0?channel=a&ca_file=/no/such.pem", "no such file"),
    ("amqps://h/?queue=q&client_key=/etc/hostname", "client_key= needs client_cert="),
    ("tls://h?subject=a&ca_file=/etc/hostname", "cannot use ca_file="),
])
def test_tls_url_parameters_are_checked(url: str, message: str) -> None:
    with pytest.raises(SourceURLError, match=message):
        parse_source(url)
