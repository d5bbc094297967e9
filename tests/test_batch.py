"""One Batch for every mode, and its lifetime: against the real simulator and real rings."""

from __future__ import annotations

import functools
import json
import shutil
import time

import numpy as np
import pytest

import fastfeed
from fastfeed import BAR_DTYPE, QUOTE_DTYPE, TICK_DTYPE, Batch, BatchReleasedError, Decoder
from fastfeed.feed import Feed
from fastfeed.output import pack_events, unpack_events
from fastfeed.sim.process import SimulatorProcess
from tests.feedcheck import no_segments_left, settings_for  # noqa: F401  (autouse)


def _content(b: Batch) -> bytes:
    """Every field of every row, bit for bit (the padding between fields is no content)."""
    return b"".join(np.ascontiguousarray(arr[f]).tobytes() for _k, arr in b.items()
                    for f in arr.dtype.names)


def consume(feed: Feed, frames: int, deadline_s: float = 90) -> dict:
    """What a user writes once: the same code for every mode. Takes every batch until
    ``frames`` frames were delivered, then stops the feed and drains it."""
    seen = {"ticks": 0, "quotes": 0, "bars": 0, "rows": 0, "frames": 0, "errors": [],
            "control": [], "gaps": 0, "workers": set(), "seq": {}}
    deadline = time.monotonic() + deadline_s
    for b in feed:
        assert isinstance(b, Batch) and not b.released
        # views are stable: the same object at every access
        assert b.ticks is b.ticks and b.quotes is b.quotes and b.bars is b.bars
        assert (b.ticks.dtype, b.quotes.dtype, b.bars.dtype) == (TICK_DTYPE, QUOTE_DTYPE,
                                                                  BAR_DTYPE)
        assert b.rows == len(b.ticks) + len(b.quotes) + len(b.bars)
        assert b  # a batch is never falsy, even with no rows (no __len__ to mislead `if b:`)
        for kind, arr in b.items():
            seen[kind] += len(arr)
            assert (arr["recv_ts"] > 0).all()
        seen["rows"] += b.rows
        seen["frames"] += b.frames
        seen["gaps"] += b.gaps
        seen["workers"].add(b.worker)
        first, end = b.seq
        if not b.frames:  # only control messages of the network process
            assert b.rows == 0 and b.control and not b.errors, b
        else:
            assert first < end and b.frames == end - first  # lossless: no hole inside
            # batches of one worker follow each other with no gap and no overlap
            assert seen["seq"].get(b.worker, first) == first, (b, seen["seq"])
            seen["seq"][b.worker] = end
        for seq, reason in b.errors:
            assert first <= seq < end and isinstance(reason, str) and reason
        seen["errors"] += b.errors
        seen["control"] += b.control
        if seen["frames"] >= frames:
            feed.request_stop()
        assert time.monotonic() < deadline, feed.stats()
    return seen


@pytest.mark.parametrize("workers", [0, 2])
def test_the_same_consumer_code_runs_inline_and_with_workers(tmp_path, workers):
    n = 20_000
    with SimulatorProcess("--rate", "0", "--count", str(n), "--symbols", "50",
                          "--fault", "malformed=0.01", "--fault", "status-every=500") as sim:
        with Feed(settings_for(sim, tmp_path), workers=workers) as feed:
            seen = consume(feed, n)
            stats = feed.stats()
        sent = sim.stop()
    assert seen["frames"] == stats["frames"] == stats["delivered"]["frames"]
    assert stats["received"] == n
    for k in ("ticks", "quotes", "bars"):
        assert seen[k] == stats[k] == stats["delivered"][k] == sent[k], k
    assert len(seen["errors"]) == stats["errors"] == sent["malformed"] > 0
    # every control message the server sent reaches the consumer, in either mode
    assert sent["control_sent"] > 0
    assert len(seen["control"]) == stats["control"] == sent["control_sent"], stats
    assert all(json.loads(c) for c in seen["control"])
    assert seen["workers"] == set(range(max(workers, 1)))
    assert seen["gaps"] == 0


@pytest.mark.parametrize("workers", [0, 1])
def test_a_released_batch_refuses_its_arrays_and_a_copy_stays_valid(tmp_path, workers):
    n = 30_000
    with SimulatorProcess("--rate", "0", "--count", str(n), "--symbols", "20") as sim:
        with Feed(settings_for(sim, tmp_path), workers=workers,
                  ring_capacity=1 << 16) as feed:
            held: list[tuple[Batch, Batch, bytes]] = []
            got = 0
            deadline = time.monotonic() + 60
            while got < n and time.monotonic() < deadline:
                b = feed.poll(0.5)
                if b is None:
                    continue
                got += b.frames
                if len(held) < 200:
                    # the rows as they were, byte for byte, and a copy
                    snap = _content(b)
                    held.append((b, b.copy(), snap))
            feed.poll(0)  # releases the last one
            assert got == n
        for b, kept, snap in held:
            assert b.released and not kept.released and kept.owned
            # nothing of a released batch is readable through it
            for read in (lambda x: x.ticks, lambda x: x.quotes, lambda x: x.bars,
                         lambda x: x["ticks"], lambda x: list(x.items()), Batch.copy,
                         Batch.to_pandas, Batch.to_arrow):
                with pytest.raises(BatchReleasedError, match="released"):
                    read(b)
            assert "released" in repr(b)
            b.release()  # idempotent
            assert _content(kept) == snap
            assert (kept.rows, kept.frames, kept.seq, kept.worker) == (b.rows, b.frames, b.seq,
                                                                       b.worker)
        # the copies still know their codes after the feed stopped
        codes = held[0][1].to_pandas()
        assert codes.ticks["sym"].notna().all() or codes.quotes["sym"].notna().all()


def test_views_from_workers_are_read_only_and_copies_are_not(tmp_path):
    with SimulatorProcess("--rate", "0", "--count", "5000") as sim:
        with Feed(settings_for(sim, tmp_path), workers=1) as feed:
            b = None
            while b is None or not len(b.ticks):
                b = feed.poll(1.0)
            assert not b.owned and not b.ticks.flags.writeable
            with pytest.raises(ValueError):
                b.ticks["price"][0] = 0.0  # the ring memory is the workers'
            c = b.copy()
            c.ticks["price"][0] = 1.0
            assert c.owned and c.ticks.flags.writeable
            with b:  # a batch released early gives the space back at once
                pass
            assert b.released


def _record(path: str, worker: int, batch: object) -> None:
    b = batch
    assert isinstance(b, fastfeed.Batch)
    with open(path, "a") as f:
        f.write(json.dumps({"worker": worker, "seq": list(b.seq), "frames": b.frames,
                            "rows": b.rows, "errors": len(b.errors),
                            "type": type(b).__module__ + "." + type(b).__name__}) + "\n")


def test_a_handler_gets_the_same_batch(tmp_path):
    n = 4000
    out = tmp_path / "handled.jsonl"
    with SimulatorProcess("--rate", "0", "--count", str(n), "--fault", "malformed=0.02") as sim:
        feed = Feed(settings_for(sim, tmp_path), workers=2, output=False,
                    handler=functools.partial(_record, str(out)))
        stats = feed.run(frames=n, duration=60)
        sim.stop()
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert {x["type"] for x in lines} == {"fastfeed.batch.Batch"}
    assert sum(x["frames"] for x in lines) == n == stats["frames"]
    assert sum(x["errors"] for x in lines) == stats["errors"] > 0
    for w in (0, 1):
        seqs = sorted(tuple(x["seq"]) for x in lines if x["worker"] == w)
        assert all(a[1] == b[0] for a, b in zip(seqs, seqs[1:], strict=False))


def test_a_standalone_decoder_returns_the_same_batch():
    dec = Decoder()
    b = dec.decode([b'{"c":"NASDAQ:AAPL","t":1749462520.177003,"p":242.89,"v":200.0}',
                    b'{"status":"ok"}', b"not json"], recv_ts=1)
    assert isinstance(b, Batch) and b.owned and not b.released
    assert (b.frames, b.seq, b.worker, b.rows) == (3, (0, 3), 0, 1)
    assert b.control == [b'{"status":"ok"}'] and [i for i, _ in b.errors] == [2]
    assert b.to_pandas("ticks")["sym"].tolist() == ["NASDAQ:AAPL"]
    b.release()  # owned arrays: released all the same, so that code behaves the same
    with pytest.raises(BatchReleasedError):
        b.ticks  # noqa: B018


def test_events_round_trip_in_records_of_bounded_size():
    events = [(10 + i, 1 + i % 2, (b"x" * (i * 4)) if i % 2 else f"bad {i}".encode())
              for i in range(200)]
    bodies = pack_events(events, 1000)
    assert len(bodies) > 1 and all(len(x) <= 1000 for x in bodies)
    errors: list[tuple[int, str]] = []
    control: list[bytes] = []
    for body in bodies:
        unpack_events(body, 0, len(body), errors, control)
    assert errors == [(s, d.decode()) for s, k, d in events if k == 1]
    assert control == [d for s, k, d in events if k == 2]
    # one message longer than a record is cut to fit, not lost with the rest
    (body,) = pack_events([(1, 2, b"y" * 5000)], 1000)
    assert len(body) == 1000
    assert pack_events([], 1000) == [b""]


def test_a_range_too_big_for_one_output_record_still_arrives_whole_once():
    """Small output ring: a decoded range is larger than a record, so the worker publishes it
    per kind, chunked, with its events after; every row, error and control message still
    reaches the parent once, and the frames add up."""
    from fastfeed._listener import route_of
    from fastfeed.pool import WorkerPool

    n, sym = 3000, "NASDAQ:AAPL"
    r = route_of(sym)
    frames = []
    for i in range(n):
        if i % 100 == 7:
            frames.append(b'{"c":"NASDAQ:AAPL","p":"bad"}')  # an error
        elif i % 100 == 9:
            frames.append(b'{"c":"NASDAQ:AAPL","status":"ok","p":null}')  # a tick (null price)
        else:
            frames.append(b'{"c":"NASDAQ:AAPL","t":%d,"p":1.5,"v":%d}' % (1_700_000_000 + i, i))
    with WorkerPool(1, full_policy="block", output_policy="block", ring_capacity=1 << 20,
                    output_capacity=1 << 14, batch_size=1024) as pool:
        assert pool.outputs[0].max_payload < 1024 * TICK_DTYPE.itemsize  # ranges must split
        for f in frames:
            assert pool.rings[0].write(f, route=r)
        got_rows, got_frames, errors = [], 0, []
        deadline = time.monotonic() + 60
        # (the frame count comes with a range's first part: read until the worker is done)
        while time.monotonic() < deadline:
            b = pool.read_output(0, timeout=0.05)
            if b is None:
                if pool.stats()[0].done_seq >= n and not pool.outputs[0].used:
                    break
                continue
            with b:
                got_rows.append(b.ticks["volume"].copy())
                got_frames += b.frames
                errors += b.errors
        assert pool.stop()
    vols = np.concatenate(got_rows)
    assert got_frames == n
    assert len(errors) == n // 100 and all(seq % 100 == 7 for seq, _ in errors)
    ok = sorted(int(v) for v in vols if not np.isnan(v))
    assert ok == [i for i in range(n) if i % 100 not in (7, 9)]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_pub_sub_source_hands_its_control_messages_over_too(tmp_path, workers):
    """A Redis Pub/Sub source in front of the same pipeline: the status objects published
    between the data reach batch.control, with the same consumer code."""
    from fastfeed.sim.publish import publish
    from tests import brokers

    if shutil.which("redis-server") is None:
        brokers.missing("redis-server", "redis-server")
    broker = brokers.start_redis(tmp_path)
    try:
        url = f"redis://127.0.0.1:{broker.port}/0?channel=feed"
        with Feed(source=url, workers=workers) as feed:
            brokers.wait_for(lambda: brokers.feed_connected(feed), what="subscription")
            sent = publish(url, count=5000, malformed=0.01, status_every=500)
            seen = consume(feed, sent["frames_sent"])
            stats = feed.stats()
    finally:
        broker.stop()
    assert sent["control_sent"] == 10 and sent["malformed"] > 0
    assert len(seen["control"]) == stats["control"] == sent["control_sent"]
    assert len(seen["errors"]) == stats["errors"] == sent["malformed"]
    assert seen["frames"] == sent["frames_sent"] == stats["delivered"]["frames"]


def test_large_batches_keep_their_rows_while_later_decodes_reuse_memory():
    """A large batch's arrays sit on the memory they were decoded into (no copy); it goes
    back to the decoder only when the last array over it is gone.  Rows of a batch still
    held, or of a view of it, never change under later decodes."""
    import hashlib

    from fastfeed import Decoder

    def frames(seed: int, n: int) -> list[bytes]:
        return [b'{"c":"S%d","t":%d.%06d,"p":%d.5,"v":%d.0}' % (i % 97, 1_700_000_000 + seed, i, seed + i, i)
                for i in range(n)]

    dec = Decoder()
    first = dec.decode(frames(1, 20_000), recv_ts=0)
    view = first.ticks[5_000:6_000]
    digest = hashlib.sha256(first.ticks.tobytes()).hexdigest()
    view_digest = hashlib.sha256(view.tobytes()).hexdigest()
    for seed in range(2, 8):  # more large batches, each dropped at once: their memory is reused
        b = dec.decode(frames(seed, 20_000), recv_ts=0)
        assert len(b.ticks) == 20_000 and b.ticks["price"][0] == seed + 0.5
        del b
    assert hashlib.sha256(first.ticks.tobytes()).hexdigest() == digest
    del first
    for seed in range(8, 12):
        dec.decode(frames(seed, 20_000), recv_ts=0)
    assert hashlib.sha256(view.tobytes()).hexdigest() == view_digest
    assert view["price"][0] == 1 + 5_000 + 0.5
