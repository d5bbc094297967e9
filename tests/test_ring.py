"""The shared-memory ring: layout, wrap-around, policies, wake-ups, lifecycle, two processes.

Every test runs real processes (spawn) over real /dev/shm segments, and the autouse fixture
fails any test that leaves a segment behind.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fastfeed import shm
from fastfeed._ring import HEADER_SIZE, RECORD_HEADER_SIZE, Ring, RingError, cleanup_stale

CTX = mp.get_context("spawn")
# Generous bound for a child to finish; only reached when something is broken.
JOIN_S = 60


def _leaks(before: set[str]) -> list[str]:
    """Segments created since ``before`` that belong to this process or to a dead process."""
    me = os.getpid()
    out = []
    for name in set(shm.list_segments()) - before:
        owner = shm.owner_of(name)
        assert owner is not None
        if owner[0] == me or shm.process_start_ticks(owner[0]) != owner[1]:
            out.append(name)
    return out


@pytest.fixture(autouse=True)
def no_segment_left() -> Iterator[None]:
    """Fail the test if it leaves a fastfeed segment in /dev/shm (ours or a dead child's)."""
    before = set(shm.list_segments())
    yield
    leaks = _leaks(before)
    for name in leaks:  # clean up so one failure does not cascade
        try:
            os.unlink(os.path.join(shm.SHM_DIR, name))
        except FileNotFoundError:
            pass
    assert not leaks, f"segments left in /dev/shm: {leaks}"


def payload(seq: int, size: int) -> bytes:
    """Deterministic payload for record ``seq``: its seq in the first 8 bytes (when it fits),
    then a byte pattern that depends on seq, so a torn or misplaced record is detected."""
    head = struct.pack("<Q", seq)[:size]
    return head + bytes((seq + i) & 0xFF for i in range(len(head), size))


def drain(ring: Ring, max_records: int = 4096) -> list[tuple[int, int, int, int, bytes]]:
    """Read everything available now: (seq, type, recv_ts, route, payload) per record."""
    out = []
    while (b := ring.read_batch(max_records, timeout=0)) is not None:
        out += [(int(b.seqs[i]), int(b.types[i]), int(b.recv_ts[i]), int(b.routes[i]),
                 bytes(b.frame(i))) for i in range(len(b))]
        b.release()
    return out


# ---------------------------------------------------------------------------------------------
# single process: layout and semantics


def test_roundtrip_fields_and_zero_copy_view() -> None:
    with Ring.create("rt", 4096) as ring:
        assert ring.write(b"hello", type=7, recv_ts=1_700_000_000_123_456, route=42)
        assert ring.write(bytearray(b"x" * 9), type=2, recv_ts=-5, route=-1)
        assert ring.write(memoryview(b"abc")[1:], route=3)
        b = ring.read_batch(timeout=0)
        assert b is not None and len(b) == 3
        assert b.seqs.tolist() == [0, 1, 2]
        assert b.types.tolist() == [7, 2, 1]
        assert b.routes.tolist() == [42, -1, 3]
        assert b.recv_ts.tolist() == [1_700_000_000_123_456, -5, 0]
        assert b.lengths.tolist() == [5, 9, 2]
        # Records are 8-aligned and the offsets point into the ring's own data region.
        assert b.offsets.tolist() == [32, 32 + 40, 32 + 40 + 48]
        assert all(int(o) % 8 == 0 for o in b.offsets)
        frames = [bytes(b.buffer[o:o + n]) for o, n in zip(b.offsets, b.lengths, strict=True)]
        assert frames == [b"hello", b"x" * 9, b"bc"]
        assert b.buffer.readonly and b.buffer.nbytes == ring.capacity
        b.release()
        assert ring.consumed == 3 and ring.written == 3 and ring.gaps == 0
        assert ring.head == ring.tail == 40 + 48 + 40


def test_attach_sees_same_records_and_counters() -> None:
    with Ring.create("att", 1 << 16) as ring:
        other = Ring.attach(ring.name)
        try:
            assert other.capacity == ring.capacity and other.max_payload == ring.max_payload
            assert other.full_policy == "wait" and not other.owner
            ring.write(b"abc")
            got = drain(other)
            assert got == [(0, 1, 0, 0, b"abc")]
            assert ring.consumed == 1 and ring.head == other.head
        finally:
            other.close()


@pytest.mark.parametrize("size", [0, 1, 7, 8, 9, "max"])
def test_record_sizes(size: int | str) -> None:
    with Ring.create("sz", 1 << 14) as ring:
        n = ring.max_payload if size == "max" else size
        assert ring.max_payload == (1 << 14) // 8 - RECORD_HEADER_SIZE
        data = payload(5, n)
        for _ in range(20):  # several laps around the ring for the max size
            assert ring.write(data)
            assert drain(ring) == [(ring.next_seq - 1, 1, 0, 0, data)]
        assert ring.dropped == 0


def test_oversize_raises_in_python_and_is_counted_from_the_c_path() -> None:
    with Ring.create("big", 4096) as ring:
        too_big = ring.max_payload + 1
        with pytest.raises(ValueError, match="exceeds max_payload"):
            ring.write(bytes(too_big))
        assert ring.dropped == 0
        # write_many goes through ff_ring_write, as a Cython producer does: counted, seq used.
        data = b"a" * 3 + bytes(too_big) + b"b" * 2
        assert ring.write_many(data, [3, too_big, 2]) == 2
        assert ring.dropped == 1 and ring.dropped_oversize == 1
        got = drain(ring)
        assert [(s, p) for s, _, _, _, p in got] == [(0, b"aaa"), (2, b"bb")]
        assert ring.gaps == 1


def test_invalid_arguments() -> None:
    for cap in (0, 1000, 1536, 512, -4096, 1 << 40):
        with pytest.raises(ValueError, match="capacity"):
            Ring.create("bad", cap)
    with pytest.raises(ValueError, match="full_policy"):
        Ring.create("bad", 4096, full_policy="sometimes")
    with pytest.raises(ValueError, match="tag"):
        Ring.create("no/slash", 4096)
    with Ring.create("args", 4096) as ring:
        with pytest.raises(ValueError, match="padding"):
            ring.write(b"x", type=-1)
        with pytest.raises(ValueError, match="max_records"):
            ring.read_batch(0)
        with pytest.raises(ValueError, match="add up"):
            ring.write_many(b"abc", [2, 2])


def test_wrap_at_every_alignment() -> None:
    """Start an empty ring at every 8-byte offset of the last 512 bytes of the region (and
    beyond 2**32, so no 32-bit truncation hides), then write records of sizes around the
    alignment: each must come back intact, with the padding record skipped."""
    cap = 4096
    sizes = [0, 1, 7, 8, 9, 15, 16, 17, 63, 64, 65, 200, cap // 8 - RECORD_HEADER_SIZE]
    with Ring.create("wrap", cap) as ring:
        seq = 0
        for lap in (0, 1 << 33):
            for back in range(8, 520, 8):
                ring._set_positions(lap + 7 * cap + cap - back)
                for size in sizes:
                    recs = [payload(seq + k, size) for k in range(3)]
                    for r in recs:
                        assert ring.write(r, route=size)
                    got = drain(ring)
                    assert [p for *_, p in got] == recs, (back, size)
                    assert [s for s, *_ in got] == [seq, seq + 1, seq + 2]
                    seq += 3
        assert ring.gaps == 0 and ring.dropped == 0 and ring.consumed == seq


def test_padding_record_is_written_at_the_wrap() -> None:
    cap = 4096
    with Ring.create("pad", cap) as ring:
        ring._set_positions(cap - 16)  # 16 bytes left: too few for a 32-byte header + payload
        assert ring.write(b"z" * 10)
        assert ring.tail == cap + 48  # 16 bytes of padding, then the record at offset 0
        b = ring.read_batch(timeout=0)
        assert b.offsets.tolist() == [RECORD_HEADER_SIZE]
        # The padding's first 8 bytes: length = bytes to skip, type = -1.
        raw = bytes(b.buffer[cap - 16:cap - 8])
        assert struct.unpack("<Ii", raw) == (16, -1)
        b.release()
        assert ring.head == ring.tail


def test_batch_limits_and_release_rules() -> None:
    with Ring.create("bat", 1 << 16) as ring:
        for i in range(10):
            ring.write(payload(i, 16))
        b = ring.read_batch(4, timeout=0)
        assert len(b) == 4 and b.seqs.tolist() == [0, 1, 2, 3]
        with pytest.raises(RingError, match="release"):
            ring.read_batch(timeout=0)
        b.release()
        b.release()  # idempotent
        with pytest.raises(RingError, match="after release"):
            _ = b.offsets
        # An exception inside `with` leaves the batch in the ring for the next read.
        with pytest.raises(KeyError):
            with ring.read_batch(3, timeout=0) as b2:
                assert b2.seqs.tolist() == [4, 5, 6]
                raise KeyError("handler failed")
        with ring.read_batch(100, timeout=0) as b3:
            assert b3.seqs.tolist() == [4, 5, 6, 7, 8, 9]
        assert ring.consumed == 10 and ring.batches == 2
        assert ring.read_batch(timeout=0) is None
        assert ring.read_batch(timeout=0.01) is None


def test_claim_commit_and_abort() -> None:
    with Ring.create("claim", 4096) as ring:
        assert ring._claim_commit(b"abc", 100, type=4, recv_ts=9, route=8)
        assert not ring._claim_commit(b"dropme", 50, commit=False)  # aborted: no seq used
        assert ring._claim_commit(b"", 0)
        assert ring.tail == 40 + 32  # the commit shrank the 100-byte reservation to 3 bytes
        assert drain(ring) == [(0, 4, 9, 8, b"abc"), (1, 1, 0, 0, b"")]
        assert ring.dropped == 0 and ring.gaps == 0
        with pytest.raises(ValueError, match="longer"):
            ring._claim_commit(b"abcd", 3)


# ---------------------------------------------------------------------------------------------
# full-ring policies: every frame is either delivered or counted


def test_policy_drop_counts_exactly() -> None:
    cap, size = 4096, 64
    per_record = RECORD_HEADER_SIZE + size  # 96, already 8-aligned
    with Ring.create("drop", cap, full_policy="drop") as ring:
        results = [ring.write(payload(i, size)) for i in range(100)]
        fits = cap // per_record
        assert results == [True] * fits + [False] * (100 - fits)
        assert ring.written == fits and ring.dropped == 100 - fits
        assert ring.full_waits == 0  # "drop" never waits
        got = drain(ring)
        assert [s for s, *_ in got] == list(range(fits))
        assert ring.gaps == 0  # the dropped tail is not visible until the next record
        assert ring.write(b"after")
        assert drain(ring)[0][0] == 100  # dropped frames consumed sequence numbers
        assert ring.gaps == 100 - fits == ring.dropped
        assert ring.written + ring.dropped == ring.next_seq == 101


def test_policy_wait_gives_up_after_the_bound_and_counts() -> None:
    with Ring.create("waitb", 4096, full_policy="wait", wait_timeout_us=10_000) as ring:
        assert ring.wait_timeout_us == 10_000
        while ring.write(bytes(64)):
            pass
        assert ring.dropped == 1 and ring.full_waits == 1
        assert ring.write_many(bytes(320), [64] * 5) == 0
        assert ring.dropped == 6 and ring.full_waits == 6
        assert ring.written + ring.dropped == ring.next_seq


def test_policy_block_waits_until_shutdown() -> None:
    """A producer blocked on a full ring is released by shutdown(), and the frame it could not
    write is counted as dropped."""
    with Ring.create("block", 4096, full_policy="block") as ring:
        while ring.used + 96 <= ring.capacity:
            assert ring.write(bytes(64))
        result: list[bool] = []
        t = threading.Thread(target=lambda: result.append(ring.write(bytes(64))))
        t.start()
        while not ring._producer_waiting:  # the writer is asleep on the space futex
            time.sleep(0.001)
        assert t.is_alive()
        ring.shutdown()
        t.join(JOIN_S)
        assert result == [False] and ring.dropped == 1


def test_policy_block_resumes_when_the_consumer_frees_space() -> None:
    with Ring.create("block2", 4096, full_policy="block") as ring:
        fits = 4096 // 96
        for i in range(fits):
            assert ring.write(payload(i, 64))
        result: list[bool] = []
        t = threading.Thread(target=lambda: result.append(ring.write(payload(fits, 64))))
        t.start()
        while not ring._producer_waiting:
            time.sleep(0.001)
        b = ring.read_batch(1, timeout=0)  # free one record: the futex wakes the writer
        b.release()
        t.join(JOIN_S)
        assert result == [True] and ring.dropped == 0
        assert [s for s, *_ in drain(ring)] == list(range(1, fits + 1))


# ---------------------------------------------------------------------------------------------
# two processes


def chunk_payloads(seqs: np.ndarray, lens: np.ndarray) -> bytes:
    """Vectorised :func:`payload`-like contents for many records: each record is filled with
    ``seq & 0xFF`` and, when it has 8 bytes or more, starts with its seq (little-endian u64)."""
    data = np.repeat((seqs & 0xFF).astype(np.uint8), lens)
    starts = np.concatenate(([0], np.cumsum(lens)[:-1]))
    big = lens >= 8
    idx = starts[big][:, None] + np.arange(8)
    data[idx] = seqs[big].astype("<u8").view(np.uint8).reshape(-1, 8)
    return data.tobytes()


def _produce(name: str, n: int, sizes: list[int], chunk: int) -> None:
    """Child: write n records cycling through ``sizes``, seq-derived contents, in chunks."""
    ring = Ring.attach(name)
    cycle = np.array(sizes, dtype=np.int64)
    try:
        seq = 0
        while seq < n:
            k = min(chunk, n - seq)
            seqs = np.arange(seq, seq + k, dtype=np.int64)
            lens = cycle[seqs % len(cycle)]
            written = ring.write_many(chunk_payloads(seqs, lens), lens, recv_ts=seqs * 3,
                                      routes=np.full(k, 11, np.int32))
            assert written == k
            seq += k
    finally:
        ring.close()


def test_two_processes_millions_of_records_every_seq_checked() -> None:
    """2 million records of mixed sizes through a 64 KiB ring (it wraps ~1500 times): every
    sequence number, length and timestamp checked, and each payload's first 8 and last byte
    read straight from ring memory; nothing lost, nothing counted as dropped."""
    n = 2_000_000
    sizes = np.array([8, 13, 64, 0, 200, 31, 8, 96, 1], dtype=np.int64)
    with Ring.create("mp", 1 << 16, full_policy="block") as ring:
        p = CTX.Process(target=_produce, args=(ring.name, n, sizes.tolist(), 4096))
        p.start()
        expect = 0
        while expect < n:
            b = ring.read_batch(8192, timeout=JOIN_S)
            assert b is not None, "producer stalled"
            seqs = b.seqs.astype(np.int64)
            k = len(b)
            assert np.array_equal(seqs, np.arange(expect, expect + k))
            assert np.array_equal(b.lengths, sizes[seqs % len(sizes)])
            assert np.array_equal(b.recv_ts, seqs * 3)
            assert (b.routes == 11).all()
            data = np.frombuffer(b.buffer, dtype=np.uint8)
            big = b.lengths >= 8
            idx = b.offsets[big][:, None] + np.arange(8)
            firsts = data[idx].copy().view("<u8").ravel()
            assert np.array_equal(firsts, seqs[big].astype(np.uint64))
            some = b.lengths > 0
            lasts = data[b.offsets[some] + b.lengths[some] - 1]
            tail_ok = np.where(b.lengths[some] > 8, lasts == (seqs[some] & 0xFF), True)
            assert tail_ok.all()
            del data
            expect += k
            b.release()
        p.join(JOIN_S)
        assert p.exitcode == 0
        assert ring.written == n and ring.consumed == n
        assert ring.dropped == 0 and ring.gaps == 0
        assert ring.read_batch(timeout=0) is None


def _flood(name: str, n: int) -> None:
    """Child: write n 64-byte records as fast as possible, then, once the ring is empty, one
    last record (so every drop shows up as a sequence gap)."""
    ring = Ring.attach(name)
    try:
        chunk = 1000
        data = bytes(64 * chunk)
        for start in range(0, n, chunk):
            ring.write_many(data, [64] * min(chunk, n - start))
        while ring.used:
            time.sleep(0.001)
        assert ring.write(b"last")
    finally:
        ring.close()


@pytest.mark.parametrize("policy", ["drop", "wait"])
def test_overrun_between_processes_every_record_delivered_or_counted(policy: str) -> None:
    """A fast producer and a slower consumer on a tiny ring: whatever the timing, the records
    received plus the drops counted equal the records pushed, and the consumer's gap count
    equals the drops."""
    n = 200_000
    with Ring.create("flood", 4096, full_policy=policy, wait_timeout_us=20) as ring:
        p = CTX.Process(target=_flood, args=(ring.name, n))
        p.start()
        received, last, jumps = 0, -1, 0
        while True:
            b = ring.read_batch(16, timeout=JOIN_S)
            assert b is not None
            seqs = b.seqs.astype(np.int64)
            assert (np.diff(seqs) > 0).all() and seqs[0] > last
            jumps += int(seqs[0] - last - 1) + int((np.diff(seqs) - 1).sum())
            last = int(seqs[-1])
            received += len(b)
            final = bytes(b.frame(len(b) - 1)) == b"last"
            b.release()
            if final:
                break
        p.join(JOIN_S)
        assert p.exitcode == 0
        assert received + ring.dropped == n + 1 == ring.next_seq
        assert ring.written == received and ring.consumed == received
        assert ring.gaps == ring.dropped == jumps


@pytest.mark.parametrize("busy", [False, True])
def test_consumer_in_another_process_is_woken(busy: bool) -> None:
    """Sleeping mode: the consumer ends up asleep on the futex (flag raised in the header) and
    one write wakes it. Busy-poll mode: it never sleeps."""
    with Ring.create("wake", 4096, busy_poll=busy) as ring:
        q = CTX.Queue()
        p = CTX.Process(target=_consumer_entry, args=(ring.name, q, busy))
        p.start()
        while ring.consumer_pid != p.pid:
            time.sleep(0.001)
        if not busy:
            while not ring._consumer_waiting:
                time.sleep(0.001)
        else:
            time.sleep(0.05)  # give a (wrong) sleep the chance to happen
            assert not ring._consumer_waiting
        assert ring.write(b"wake up")
        assert q.get(timeout=JOIN_S) == b"wake up"
        p.join(JOIN_S)
        assert p.exitcode == 0
        assert ring.consumed == 1
        assert not ring.consumer_alive


def _consumer_entry(name: str, q: mp.Queue, busy: bool) -> None:
    ring = Ring.attach(name, busy_poll=busy)
    try:
        b = ring.read_batch(timeout=JOIN_S)
        q.put(None if b is None else bytes(b.frame(0)))
        if b is not None:
            b.release()
    finally:
        ring.close()


def _read_and_die(name: str, q: mp.Queue) -> None:
    """Child: read a batch, report it, then die (SIGKILL) without releasing it."""
    ring = Ring.attach(name)
    b = ring.read_batch(3, timeout=JOIN_S)
    q.put(b.seqs.tolist())
    q.close()
    q.join_thread()  # make sure the report left before dying
    os.kill(os.getpid(), signal.SIGKILL)


def test_consumer_killed_mid_batch_leaves_the_batch_for_the_next() -> None:
    with Ring.create("kill", 1 << 14, full_policy="drop") as ring:
        ring.write(b"a")
        ring.write_many(bytes(1 << 14), [1 << 14])  # oversize: dropped, seq 1 skipped
        for c in (b"c", b"d", b"e"):
            ring.write(c)
        q = CTX.Queue()
        p = CTX.Process(target=_read_and_die, args=(ring.name, q))
        p.start()
        assert q.get(timeout=JOIN_S) == [0, 2, 3]
        p.join(JOIN_S)
        assert p.exitcode == -signal.SIGKILL
        assert ring.consumer_pid == p.pid and not ring.consumer_alive
        assert ring.consumed == 0 and ring.head == 0
        got = drain(ring)
        assert [(s, d) for s, _, _, _, d in got] == [(0, b"a"), (2, b"c"), (3, b"d"), (4, b"e")]
        assert ring.gaps == 1 == ring.dropped  # seen once, not once per reader


# ---------------------------------------------------------------------------------------------
# lifecycle


def _create_and_die(q: mp.Queue) -> None:
    ring = Ring.create("orphan", 4096)
    ring.write(b"left behind")
    q.put(ring.name)
    q.close()
    q.join_thread()
    os.kill(os.getpid(), signal.SIGKILL)


def test_segment_of_a_killed_creator_is_removed_at_next_start() -> None:
    q = CTX.Queue()
    p = CTX.Process(target=_create_and_die, args=(q,))
    p.start()
    name = q.get(timeout=JOIN_S)
    p.join(JOIN_S)
    assert p.exitcode == -signal.SIGKILL
    path = os.path.join(shm.SHM_DIR, name)
    assert os.path.exists(path)  # SIGKILL left it
    # Still attachable (the data survive their writer) ...
    with Ring.attach(name) as orphan:
        assert drain(orphan)[0][4] == b"left behind"
        assert not orphan.producer_alive
    # ... and the next start removes it.
    with Ring.create("next", 4096):
        assert not os.path.exists(path)


def test_cleanup_tells_a_reused_pid_apart() -> None:
    me = os.getpid()
    ticks = shm.process_start_ticks(me)
    live = f"fastfeed.{me}.{ticks}.mine"
    reused = f"fastfeed.{me}.{ticks + 1}.previous-life"
    foreign = "fastfeed-not-ours"
    for n in (live, reused, foreign):
        with open(os.path.join(shm.SHM_DIR, n), "wb"):
            pass
    try:
        removed = cleanup_stale()
        assert reused in removed and live not in removed
        assert os.path.exists(os.path.join(shm.SHM_DIR, live))
        assert os.path.exists(os.path.join(shm.SHM_DIR, foreign))  # not a fastfeed name
    finally:
        for n in (live, reused, foreign):
            try:
                os.unlink(os.path.join(shm.SHM_DIR, n))
            except FileNotFoundError:
                pass


def test_attach_checks_magic_version_and_size() -> None:
    with pytest.raises(FileNotFoundError):
        Ring.attach("fastfeed.1.1.does-not-exist")
    with shm.Segment.create("notaring", HEADER_SIZE + 4096) as seg:
        with pytest.raises(RingError, match="magic"):
            Ring.attach(seg.name)
        seg.buf[:8] = struct.pack("<Q", 0x31474E4952464646)  # right magic ...
        with pytest.raises(RingError, match="version"):
            Ring.attach(seg.name)  # ... but version 0
    with Ring.create("trunc", 4096) as ring:
        os.truncate(os.path.join(shm.SHM_DIR, ring.name), HEADER_SIZE + 2048)
        with pytest.raises(RingError, match="capacity"):
            Ring.attach(ring.name)
    with shm.Segment.create("tiny", 16) as seg:
        with pytest.raises(RingError, match="too small"):
            Ring.attach(seg.name)


def test_close_unlink_and_views_outliving_the_handle() -> None:
    ring = Ring.create("life", 4096)
    name = ring.name
    ring.write(b"still here")
    b = ring.read_batch(timeout=0)
    view = b.frame(0)
    reader = Ring.attach(name)
    ring.close()
    ring.close()  # idempotent
    assert ring.closed and reader.closed  # the owner's close shut the ring down
    assert bytes(view) == b"still here"  # the mapping lives as long as a view does
    with pytest.raises(ValueError, match="closed"):
        ring.write(b"x")
    reader.close()
    ring.unlink()
    assert not os.path.exists(os.path.join(shm.SHM_DIR, name))
    assert repr(ring).endswith("closed>")


def test_liveness_fields() -> None:
    with Ring.create("live", 4096) as ring:
        assert ring.producer_pid == 0 and not ring.producer_alive
        ring.write(b"x")
        assert ring.producer_pid == os.getpid() and ring.producer_alive
        assert ring.owner_pid == os.getpid()
        before = ring.consumer_heartbeat_ns
        ring.read_batch(timeout=0).release()
        assert ring.consumer_pid == os.getpid() and ring.consumer_heartbeat_ns > before
        assert ring.stats()["written"] == 1


_CYTHON_PRODUCER = """
from libc.stdint cimport uint32_t
from ff_ring cimport ff_ring_write, ff_ring_claim, ff_ring_commit
from libc.string cimport memcpy

def produce(size_t address, bytes data, Py_ssize_t n):
    cdef void *base = <void *>address
    cdef const char *p = data
    cdef uint32_t ln = len(data)
    cdef Py_ssize_t i, w = 0
    cdef void *slot
    with nogil:
        for i in range(n):
            if i % 2:
                w += ff_ring_write(base, p, ln, 5, i, 7)
            else:
                slot = ff_ring_claim(base, ln + 16)  # reserve more than needed ...
                if slot != NULL:
                    memcpy(slot, p, ln)
                    w += ff_ring_commit(base, ln, 6, i, 8)  # ... commit the real length
    return w
"""


def test_a_separate_cython_module_produces_knowing_only_the_address(tmp_path) -> None:
    """The contract the network process relies on: `from ff_ring cimport ff_ring_write` in
    another extension, the ring's base address, no GIL, no Python call per frame."""
    import subprocess
    import sys

    pytest.importorskip("Cython")
    ext = Path(__file__).resolve().parent.parent / "ext"
    (tmp_path / "ffprod.pyx").write_text(_CYTHON_PRODUCER)
    (tmp_path / "setup.py").write_text(
        "from setuptools import setup, Extension\n"
        "from Cython.Build import cythonize\n"
        f"setup(ext_modules=cythonize([Extension('ffprod', ['ffprod.pyx'], include_dirs=[{str(ext)!r}])],"
        f" include_path=[{str(ext)!r}], language_level=3), script_args=['build_ext', '--inplace', '-q'])\n")
    subprocess.run([sys.executable, "setup.py"], cwd=tmp_path, check=True, capture_output=True)
    sys.path.insert(0, str(tmp_path))
    try:
        import ffprod  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(tmp_path))
    with Ring.create("cyprod", 1 << 16) as ring:
        assert ffprod.produce(ring.address, b"frame", 100) == 100
        got = drain(ring)
        assert [g[0] for g in got] == list(range(100))
        assert all(g[4] == b"frame" for g in got)
        assert [(g[1], g[2], g[3]) for g in got[:2]] == [(6, 0, 8), (5, 1, 7)]
        assert ring.tail == 100 * 40  # commits shrank the claims to 5 bytes


def test_a_corrupted_record_header_is_reported_not_followed() -> None:
    with Ring.create("corrupt", 4096) as ring, shm.Segment.attach(ring.name) as raw:
        assert raw.buf is not None
        ring.write(b"good")
        ring.write(b"bad")
        # Second record's length field -> 1 GiB, as a stray write in another process could.
        raw.buf[HEADER_SIZE + 40 : HEADER_SIZE + 44] = struct.pack("<I", 1 << 30)
        b = ring.read_batch(timeout=0)
        assert [bytes(b.frame(i)) for i in range(len(b))] == [b"good"]
        b.release()
        with pytest.raises(RingError, match="corrupted"):
            ring.read_batch(timeout=0)


def test_batch_pack_lays_out_capture_records():
    with Ring.create("pk", 1 << 16) as r:
        frames = [b"alpha", b"", b"gamma-gamma"]
        for k, f in enumerate(frames):
            assert r.write(f, recv_ts=1000 + k, route=k)
        b = r.read_batch(16, timeout=1)
        packed = b.pack(1, 3, tag=7)
        recs, pos = [], 0
        while pos < len(packed):
            n, tag, ts, seq = struct.unpack_from("<IIqQ", packed, pos)
            recs.append((tag, ts, seq, packed[pos + 24:pos + 24 + n]))
            pos += 24 + n
        seqs = b.seqs.tolist()
        assert recs == [(7, 1001, seqs[1], b""), (7, 1002, seqs[2], b"gamma-gamma")]
        assert b.pack() == b.pack(0, len(b), 0) and len(b.pack(2, 2)) == 0
        with pytest.raises(IndexError):
            b.pack(2, 5)
        b.release()
        with pytest.raises(RingError):
            b.pack()
