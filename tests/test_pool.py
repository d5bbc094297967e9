"""The worker pool: spawned decoder workers on real rings, supervision, exactly-once delivery,
shutdown by signal. Every frame pushed is accounted for as a decoded row or a counted drop."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fastfeed import shm
from fastfeed._ring import Ring
from fastfeed.pool import WorkerPool

ROOT = Path(__file__).resolve().parent.parent
JOIN_S = 60


@pytest.fixture(autouse=True)
def no_segment_left() -> Iterator[None]:
    """Fail the test if it leaves a fastfeed segment (ours or a dead child's) in /dev/shm."""
    before = set(shm.list_segments())
    yield
    leaks = []
    for name in set(shm.list_segments()) - before:
        owner = shm.owner_of(name)
        assert owner is not None
        if owner[0] == os.getpid() or shm.process_start_ticks(owner[0]) != owner[1]:
            leaks.append(name)
            try:
                os.unlink(os.path.join(shm.SHM_DIR, name))
            except FileNotFoundError:
                pass
    assert not leaks, f"segments left in /dev/shm: {leaks}"


SYMBOLS = [f"NASDAQ:S{k:03d}" for k in range(40)]


def tick(i: int, sym: str) -> bytes:
    """A tick whose volume is its frame number: every decoded row names the frame it came from."""
    return b'{"c":"%s","t":1749462520.%06d,"p":242.89,"v":%d.0}' % (sym.encode(), i % 10**6, i)


def route_of(sym: str) -> int:
    return zlib.crc32(sym.encode()) & 0x7FFFFFFF


def push(pool: WorkerPool, start: int, n: int) -> None:
    """Write frames start..start+n-1 into the pool's rings, routed by symbol."""
    for i in range(start, start + n):
        sym = SYMBOLS[i % len(SYMBOLS)]
        r = route_of(sym)
        assert pool.rings[pool.ring_for(r)].write(tick(i, sym), route=r)


def collect(pool: WorkerPool, into: list[tuple[int, np.ndarray]], timeout: float = 0.0) -> None:
    """Move every output row available now into ``into`` as (worker, ticks copy)."""
    for w in range(pool.workers):
        while (ob := pool.read_output(w, timeout=timeout)) is not None:
            into.append((w, ob.ticks.copy()))
            ob.release()


def run_until(pool: WorkerPool, n: int, rows: list[tuple[int, np.ndarray]]) -> None:
    """Read output until the workers report n frames handled (or fail after JOIN_S)."""
    deadline = time.monotonic() + JOIN_S
    while sum(s.frames for s in pool.stats()) < n:
        assert time.monotonic() < deadline, pool.stats()
        collect(pool, rows, timeout=0.01)
    # A worker counts a range before it publishes it: read until every input ring is
    # released (all published) and every output ring read.
    collect(pool, rows)
    while not pool.idle():
        assert time.monotonic() < deadline, pool.stats()
        collect(pool, rows, timeout=0.01)


def check_exactly_once(pool: WorkerPool, rows: list[tuple[int, np.ndarray]], n: int) -> None:
    """Every frame 0..n-1 decoded to exactly one row, on the worker its symbol routes to, with
    each symbol's rows in the order they were written."""
    ticks = np.concatenate([t for _, t in rows]) if rows else np.empty(0)
    vols = np.sort(ticks["volume"].astype(np.int64))
    assert len(vols) == n, f"{len(vols)} rows for {n} frames"
    assert np.array_equal(vols, np.arange(n)), "lost or duplicated rows"
    codes = [pool.symbols[int(s)] for s in ticks["sym"]]
    for (_, t), code_block in zip(rows, _split(codes, rows), strict=True):
        assert all(SYMBOLS[int(v) % len(SYMBOLS)] == c for v, c in zip(t["volume"], code_block,
                                                                       strict=True))
    for w, t in rows:
        for s in np.unique(t["sym"]):
            assert pool.ring_for(route_of(pool.symbols[int(s)])) == w
    for s in np.unique(ticks["sym"]):
        order = np.concatenate([t["volume"][t["sym"] == s] for _, t in rows])
        assert (np.diff(order) > 0).all(), "a symbol's frames were reordered"


def _split(items: list, rows: list[tuple[int, np.ndarray]]) -> list[list]:
    out, i = [], 0
    for _, t in rows:
        out.append(items[i : i + len(t)])
        i += len(t)
    return out


# ---------------------------------------------------------------------------------------------


def test_pool_decodes_every_frame_once_and_outputs_rows() -> None:
    n = 30_000
    with WorkerPool(2, full_policy="block", output_policy="block", batch_size=512) as pool:
        rows: list[tuple[int, np.ndarray]] = []
        for start in range(0, n, 5000):
            push(pool, start, 5000)
            collect(pool, rows)
        run_until(pool, n, rows)
        assert pool.stop() is True
        collect(pool, rows)
        check_exactly_once(pool, rows, n)
        stats = pool.stats()
        assert sum(s.frames for s in stats) == sum(s.ticks for s in stats) == n
        assert all(s.errors == 0 and s.restarts == 0 and s.skipped == 0 for s in stats)
        assert all(s.pid not in (0, os.getpid()) for s in stats)
        assert sum(r.dropped for r in pool.rings) == 0
        assert len(pool.symbols) == len(SYMBOLS)


def record_batches(directory: str, worker: int, batch: object) -> None:
    """Handler run in the workers: append '<pid> <ticks>' to a per-worker file."""
    with open(os.path.join(directory, f"w{worker}"), "a") as f:
        f.write(f"{os.getpid()} {len(batch.ticks)}\n")  # type: ignore[attr-defined]


def failing_handler(worker: int, batch: object) -> None:
    raise RuntimeError("handler bug")


def gated_handler(gate: str, worker: int, batch: object) -> None:
    """Holds every worker inside its first batch until ``gate`` exists (announcing it with a
    ``<gate>.w<worker>`` file), so a signal or a kill always lands mid-batch."""
    if not os.path.exists(gate):
        Path(f"{gate}.w{worker}").touch()
        while not os.path.exists(gate):
            time.sleep(0.001)


def test_handler_runs_inside_each_worker(tmp_path: Path) -> None:
    n = 4000
    handler = functools.partial(record_batches, str(tmp_path))
    with WorkerPool(2, handler=handler, output=False, full_policy="block") as pool:
        push(pool, 0, n)
        deadline = time.monotonic() + JOIN_S
        while sum(s.frames for s in pool.stats()) < n:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        pids = pool.pids()
        assert pool.stop()
    total = 0
    for w in range(2):
        lines = (tmp_path / f"w{w}").read_text().split()
        assert {int(p) for p in lines[0::2]} == {pids[w]}  # ran in that worker, not here
        total += sum(int(k) for k in lines[1::2])
    assert total == n


def test_handler_exception_is_counted_and_the_worker_keeps_going(capfd: pytest.CaptureFixture) -> None:
    with WorkerPool(1, handler=failing_handler, full_policy="block") as pool:
        push(pool, 0, 100)
        rows: list[tuple[int, np.ndarray]] = []
        run_until(pool, 100, rows)
        st = pool.stats()[0]
        assert st.handler_errors >= 1 and st.restarts == 0
        assert sum(len(t) for _, t in rows) == 100  # output still published
    assert "handler bug" in capfd.readouterr().err


def test_same_symbol_ids_in_every_worker() -> None:
    """Both workers see the same codes (written to both rings on purpose): the shared table
    gives them the same ids."""
    with WorkerPool(2, full_policy="block", output_policy="block") as pool:
        for ring in pool.rings:
            for i, sym in enumerate(reversed(SYMBOLS)):
                ring.write(tick(i, sym))
        rows: list[tuple[int, np.ndarray]] = []
        run_until(pool, 2 * len(SYMBOLS), rows)
        ids: dict[int, dict[str, int]] = {0: {}, 1: {}}
        for w, t in rows:
            for s in t["sym"]:
                ids[w][pool.symbols[int(s)]] = int(s)
        assert ids[0] == ids[1] and len(ids[0]) == len(SYMBOLS)
        assert len(pool.symbols) == len(SYMBOLS)


def test_worker_sigkilled_mid_batch_is_restarted_nothing_lost_nothing_twice(tmp_path: Path) -> None:
    """SIGKILL a worker while it holds a decoded, unreleased batch with thousands more frames
    queued behind it, and keep writing: the supervisor restarts it, it resumes at the ring's
    consumer position, and every frame comes out exactly once."""
    n = 60_000
    gate = str(tmp_path / "gate")
    handler = functools.partial(gated_handler, gate)
    with WorkerPool(2, handler=handler, full_policy="block", output_policy="block",
                    batch_size=256) as pool:
        rows: list[tuple[int, np.ndarray]] = []
        push(pool, 0, 20_000)
        deadline = time.monotonic() + JOIN_S
        while not os.path.exists(gate + ".w0"):  # worker 0 is inside its first batch
            assert time.monotonic() < deadline
            time.sleep(0.001)
        victim = pool.pids()[0]
        assert victim is not None
        assert pool.stats()[0].frames == 0 and pool.rings[0].used > 0
        os.kill(victim, signal.SIGKILL)
        open(gate, "w").close()
        push(pool, 20_000, n - 20_000)
        run_until(pool, n, rows)
        assert pool.stop()
        collect(pool, rows)
        st = pool.stats()
        assert st[0].restarts == 1 and st[0].pid != victim and st[1].restarts == 0
        check_exactly_once(pool, rows, n)
        assert sum(r.dropped for r in pool.rings) == 0


@pytest.mark.parametrize("point", ["after_publish", "before_release"])
def test_worker_killed_between_publish_and_commit_is_not_duplicated(point: str,
                                                                    tmp_path: Path) -> None:
    """The worst moments: a batch's output is published but its watermark is not stored
    (after_publish), or the watermark is stored but the ring position is not released
    (before_release). The restarted worker re-publishes exactly the crashed range (the parent
    drops the repeat), resp. skips what was handled; every frame comes out once."""
    n = 10_000
    pool = WorkerPool(1, full_policy="block", output_policy="block", batch_size=100)
    pool._fault = (point, str(tmp_path / "crashed"))
    with pool:
        push(pool, 0, 50)  # the batch that crashes is 50 frames, half a batch_size
        deadline = time.monotonic() + JOIN_S
        while not (tmp_path / "crashed").exists():
            assert time.monotonic() < deadline
            time.sleep(0.001)
        # While the worker restarts, queue more: its first read now returns a longer batch
        # than the one that crashed, which it must not decode from its start.
        push(pool, 50, n - 50)
        rows: list[tuple[int, np.ndarray]] = []
        run_until(pool, n, rows)
        assert pool.stop()
        collect(pool, rows)
        st = pool.stats()[0]
        assert st.restarts == 1
        check_exactly_once(pool, rows, n)
        if point == "after_publish":
            assert pool.outputs[0].written == st.batches + 1  # published twice, kept once
            assert st.skipped == 0
        else:
            assert pool.outputs[0].written == st.batches
            assert st.skipped == 50  # handled before the crash, not decoded again
        assert st.frames == n


def test_stop_drains_the_rings() -> None:
    """Frames still queued when stop() is called are all handled before the workers exit."""
    n = 20_000
    pool = WorkerPool(2, full_policy="block", output=False, batch_size=64)
    with pool:
        push(pool, 0, n)  # workers have barely started: most of this is queued
        assert pool.stop(drain=True)
        assert sum(s.frames for s in pool.stats()) == n
        assert all(r.used == 0 for r in pool.rings)


_SIGNAL_SCRIPT = r"""
import functools, json, sys, time
sys.path.insert(0, {tests!r})
from test_pool import push, WorkerPool
n = int(sys.argv[1])
gate = sys.argv[2]
pool = WorkerPool(2, full_policy="block", output=False, batch_size=32,
                  handler=functools.partial(__import__("test_pool").gated_handler, gate))
pool.start()
pool.install_signal_handlers()
push(pool, 0, n)
print("ready", flush=True)
pool.wait()
queued = sum(r.used for r in pool.rings)
open(gate, "w").close()  # let the workers go on: everything queued must now be drained
ok = pool.stop(drain=True)
stats = pool.stats()
pool.close()
print(json.dumps({{"ok": ok, "queued": queued, "frames": sum(s.frames for s in stats),
                  "names": pool.ring_names}}), flush=True)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_the_parent_drains_then_stops(sig: signal.Signals, tmp_path: Path) -> None:
    n = 5000
    script = _SIGNAL_SCRIPT.format(tests=str(ROOT / "tests"))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", script, str(n), str(tmp_path / "gate")],
                            stdout=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=JOIN_S)
    assert proc.returncode == 0
    res = json.loads(out.strip().splitlines()[-1])
    assert res["ok"] is True and res["frames"] == n
    assert res["queued"] > 0  # the signal really arrived before the rings were empty
    for name in res["names"]:
        assert not os.path.exists(os.path.join(shm.SHM_DIR, name))


def test_parent_killed_its_orphaned_worker_removes_the_segments() -> None:
    script = (f"import sys, os, signal; sys.path.insert(0, {str(ROOT)!r})\n"
              "from fastfeed.pool import WorkerPool\n"
              "pool = WorkerPool(1).start()\n"
              "print(' '.join(pool.ring_names + [o.name for o in pool.outputs]), flush=True)\n"
              "os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=JOIN_S)
    assert proc.returncode == -signal.SIGKILL
    names = out.split()
    assert names
    # The orphaned worker notices its parent is gone, removes the dead parent's segments and
    # exits, without waiting for another fastfeed to start.
    deadline = time.monotonic() + 5

    def left() -> list[str]:  # every segment of the dead parent: rings, state, symbols
        return [n for n in shm.list_segments()
                if n in names or (shm.owner_of(n) or (0,))[0] == proc.pid]

    while left():
        assert time.monotonic() < deadline, left()
        time.sleep(0.05)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        WorkerPool(0)
    with pytest.raises(ValueError):
        WorkerPool(1, batch_size=0)
    with pytest.raises(ValueError):
        WorkerPool(1, handler="not callable")  # type: ignore[arg-type]
    pool = WorkerPool(1, output=False).start()
    try:
        with pytest.raises(RuntimeError):
            pool.start()
        with pytest.raises(RuntimeError):
            pool.read_output(0)
    finally:
        pool.close()


def test_producer_in_a_thread_while_reading_output() -> None:
    """Producer and parent reader run concurrently with small rings that fill up: "block" on
    both sides means backpressure, never loss."""
    n = 40_000
    with WorkerPool(2, full_policy="block", output_policy="block", ring_capacity=1 << 14,
                    output_capacity=1 << 16, batch_size=128) as pool:
        t = threading.Thread(target=push, args=(pool, 0, n))
        t.start()
        rows: list[tuple[int, np.ndarray]] = []
        run_until(pool, n, rows)
        t.join(JOIN_S)
        assert pool.stop()
        collect(pool, rows)
        check_exactly_once(pool, rows, n)


def test_stop_right_after_a_worker_died_still_drains_its_ring(tmp_path: Path) -> None:
    """A worker killed mid-batch just before stop(): whether or not the supervisor restarted it
    yet, stop(drain=True) gets its queued frames handled."""
    n = 5000
    gate = str(tmp_path / "gate")
    with WorkerPool(1, handler=functools.partial(gated_handler, gate), full_policy="block",
                    output=False, batch_size=100) as pool:
        push(pool, 0, n)
        deadline = time.monotonic() + JOIN_S
        while not os.path.exists(gate + ".w0"):
            assert time.monotonic() < deadline
            time.sleep(0.001)
        victim = pool.pids()[0]
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        open(gate, "w").close()
        assert pool.stop(drain=True)
        st = pool.stats()[0]
        assert st.frames == n and st.restarts == 1 and pool.rings[0].used == 0


def test_busy_poll_workers() -> None:
    n = 2000
    with WorkerPool(1, busy_poll=True, full_policy="block", output_policy="block") as pool:
        push(pool, 0, n)
        rows: list[tuple[int, np.ndarray]] = []
        run_until(pool, n, rows)
        assert pool.stop()
        collect(pool, rows)
        check_exactly_once(pool, rows, n)
        assert not pool.rings[0]._consumer_waiting  # it never went to sleep


def test_wait_output_sleeps_until_any_worker_publishes() -> None:
    with WorkerPool(3, full_policy="block", output_policy="block") as pool:
        assert pool.wait_output(timeout=0.05) is False  # nothing yet
        sym = SYMBOLS[0]
        target = pool.ring_for(route_of(sym))
        t = threading.Timer(0.2, lambda: pool.rings[target].write(tick(7, sym)))
        t.start()
        assert pool.wait_output(timeout=JOIN_S) is True
        t.join()
        assert [pool.outputs[w].used > 0 for w in range(3)] == [w == target for w in range(3)]
        ob = pool.read_output(target)
        assert ob is not None and ob.ticks["volume"].tolist() == [7.0]
        ob.release()
        assert pool.wait_output(timeout=0) is False


def test_inline_pool_has_one_ring_and_no_process():
    with pytest.raises(ValueError, match="exactly one ring"):
        WorkerPool(2, inline=True)
    with WorkerPool(1, inline=True) as pool:
        assert pool.pids() == [None]
        w = Ring.attach(pool.ring_names[0])
        try:
            assert w.write(b'{"c":"X:Y","t":1.5,"p":2.0,"v":3.0}', route=1)
            assert w.write(b'{"c":"X:Y","t":oops}', route=1)
        finally:
            w.close()
        b = pool.read_inline(timeout=5)
        assert b.frames == 2 and len(b.ticks) == 1 and len(b.errors) == 1
        assert pool.symbols[int(b.ticks["sym"][0])] == "X:Y"
        assert pool.read_inline(timeout=0) is None
        with pytest.raises(RuntimeError, match="output"):
            pool.read_output(0)
        s = pool.stats()[0]
        assert (s.frames, s.ticks, s.errors, s.pid) == (2, 1, 1, os.getpid())
    with pytest.raises(RuntimeError, match="inline=True"):
        WorkerPool(1).read_inline()


def die_on_volume(volume: float, worker: int, batch: object) -> None:
    """Handler: the worker dies (SIGKILL, as a crash in C code would) on one frame."""
    ticks = batch.ticks  # type: ignore[attr-defined]
    if len(ticks) and (ticks["volume"] == volume).any():
        os.kill(os.getpid(), signal.SIGKILL)


def test_a_frame_that_kills_the_worker_every_time_is_set_aside(capfd: pytest.CaptureFixture) -> None:
    n, bad = 3000, 1234
    with WorkerPool(1, handler=functools.partial(die_on_volume, float(bad)), full_policy="block",
                    output_policy="block", batch_size=256) as pool:
        rows: list[tuple[int, np.ndarray]] = []
        push(pool, 0, n)
        deadline = time.monotonic() + JOIN_S
        while (st := pool.stats()[0]).frames + st.poisoned < n:
            assert time.monotonic() < deadline, st
            collect(pool, rows, timeout=0.01)
        assert pool.stop() is True
        collect(pool, rows)
        st = pool.stats()[0]
    vols = np.sort(np.concatenate([t for _, t in rows])["volume"].astype(np.int64))
    # every other frame exactly once, in spite of the deaths around the bad one
    assert np.array_equal(vols, np.delete(np.arange(n), bad))
    assert st.poisoned == 1 and st.restarts >= 3 and st.frames == n - 1
    err = capfd.readouterr().err
    assert "killed the worker 3 times; set aside" in err and b'"v":1234.0' in err.encode()


def test_workers_give_absent_status_and_bar_type_the_empty_code() -> None:
    """A quote without "ss" and a bar without "bt" decode through the workers' shared tables
    to code "" (id 0), as through a standalone Decoder: id 0 of the shared statuses and bar
    types tables is reserved for "absent"."""
    from fastfeed import Decoder

    frames = [b'{"c":"A:X","ss":"OPEN","b":1.0,"a":1.5,"t":1}',
              b'{"c":"A:X","b":1.0,"a":1.5,"t":2}',
              b'{"c":"A:Y","s":[{"t":1,"o":1,"h":1,"l":1,"c":1,"v":1}],"bt":"1m"}',
              b'{"c":"A:Y","s":[{"t":2,"o":1,"h":1,"l":1,"c":1,"v":1}]}']
    dec = Decoder()
    r = dec.decode(frames)
    want_status = [dec.statuses[int(i)] for i in r.quotes["status"]]
    want_bt = [dec.bar_types[int(i)] for i in r.bars["bar_type"]]
    assert want_status == ["OPEN", ""] and want_bt == ["1m", ""]
    with WorkerPool(1, batch_size=16) as pool:
        for f in frames:  # one worker: every frame goes to ring 0
            assert pool.rings[0].write(f)
        quotes, bars = [], []
        deadline = time.monotonic() + JOIN_S
        while len(quotes) < 2 or len(bars) < 2:
            assert time.monotonic() < deadline, pool.stats()
            ob = pool.read_output(0, timeout=0.05)
            if ob is not None:
                quotes += [pool.statuses[int(i)] for i in ob.quotes["status"]]
                bars += [pool.bar_types[int(i)] for i in ob.bars["bar_type"]]
                ob.release()
        assert pool.statuses[0] == "" and pool.bar_types[0] == ""
    assert quotes == want_status and bars == want_bt
