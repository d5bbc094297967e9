"""Log records from the children (network process, workers) reach the parent's handlers, and
one child killed in the middle of writing a record costs nothing but that child's unsent lines.

The hazard: children that share one log channel share its write lock. A child SIGKILLed while
it holds that lock (mid-record: a record larger than a pipe's buffer is written in pieces)
would leave every other child unable to send a line, and the parent's reader waiting forever
for the rest of the record. The test makes that moment certain: the parent's handler holds the
first record it gets from a worker, so every child's channel fills up and stays full; the
worker that sent it is killed while blocked in the middle of its next, 1 MB record.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time

from fastfeed.feed import Feed
from fastfeed.sim.process import SimulatorProcess
from tests.feedcheck import settings_for
from tests.test_lifecycle import alive, segments_of, wait_until

PAD = "x" * (1 << 20)  # larger than a pipe's buffer: the record is written in pieces
_last = [0.0]


def chatty_handler(worker: int, batch) -> None:
    """Module level (workers are spawned; the handler is pickled by reference). At most 20
    records a second per worker, each 1 MB."""
    now = time.monotonic()
    if now - _last[0] >= 0.05:
        _last[0] = now
        logging.getLogger("tests.chatty").warning("worker %d pid %d %s", worker, os.getpid(), PAD)


class HoldFirst(logging.Handler):
    """Holds the first record it sees until released (the parent's reader waits in it)."""

    def __init__(self) -> None:
        super().__init__()
        self.held = threading.Event()
        self.let_go = threading.Event()
        self.pid: int | None = None
        self.seen: list[tuple[int, float]] = []  # (pid, when)

    def emit(self, record: logging.LogRecord) -> None:
        m = re.match(r"worker \d+ pid (\d+)", record.getMessage())
        if m is None:
            return
        self.seen.append((int(m.group(1)), time.monotonic()))
        if not self.held.is_set():
            self.pid = int(m.group(1))
            self.held.set()
            self.let_go.wait(30)


def test_a_child_killed_mid_record_does_not_silence_the_others(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    hold = HoldFirst()
    chatty = logging.getLogger("tests.chatty")
    chatty.addHandler(hold)
    try:
        with SimulatorProcess("--rate", "2000") as sim:
            feed = Feed(settings_for(sim, tmp_path), workers=2, output=False,
                        handler=chatty_handler)
            feed.start()
            try:
                wait_until(hold.held.is_set, 30, "a first record from a worker")
                time.sleep(1.0)  # every channel fills; the victim blocks mid-record
                victim = hold.pid
                assert victim in feed._pool.pids()
                os.kill(victim, signal.SIGKILL)
                wait_until(lambda: not alive(victim), 10, f"worker {victim} to die")
                t_kill = time.monotonic()
                hold.let_go.set()
                others = [p for p in feed._pool.pids() if p not in (None, victim)]
                assert others, feed._pool.pids()

                def fresh() -> set[int]:
                    return {pid for pid, when in hold.seen if when > t_kill}

                # the other worker's lines keep coming, and so do the restarted victim's
                wait_until(lambda: set(others) <= fresh(), 15,
                           lambda: f"records from {others} after the kill (got {fresh()})")
                pid = os.getpid()
            finally:
                t0 = time.monotonic()
                feed.stop()
                took = time.monotonic() - t0
    finally:
        hold.let_go.set()
        chatty.removeHandler(hold)
    assert took < 15, took
    cut = [r.getMessage() for r in caplog.records
           if r.name == "fastfeed.logs" and "broke off in the middle" in r.getMessage()]
    assert len(cut) == 1 and f"pid {victim}" in cut[0], [r.getMessage()[:200] for r in caplog.records]
    assert not segments_of(pid)


def _log_then_exit(cfg) -> None:
    """In a spawned child: one plain record, one whose `extra=` value does not pickle, then
    a normal exit (the queued records are flushed at exit)."""
    from fastfeed.logs import configure_child_logging

    configure_child_logging(cfg)
    lg = logging.getLogger("tests.child")
    lg.warning("plain line from %d", os.getpid())
    lg.warning("line with a lock in it", extra={"lock": threading.Lock()})


def test_records_reach_the_parent_even_when_they_do_not_pickle(caplog):
    import multiprocessing as mp

    from fastfeed.logs import LogRelay

    caplog.set_level(logging.WARNING)
    ctx = mp.get_context("spawn")
    relay = LogRelay(ctx, logging.WARNING)
    try:
        cfg = relay.config()
        p = ctx.Process(target=_log_then_exit, args=(cfg,), name="fastfeed-test-child")
        p.start()
        cfg.started()
        p.join(30)
        assert p.exitcode == 0
        wait_until(lambda: len([r for r in caplog.records if r.name == "tests.child"]) == 2, 10,
                   lambda: f"two records (got {[r.getMessage() for r in caplog.records]})")
        # the child's pipe ended cleanly: no warning, and the relay let go of it
        wait_until(lambda: not relay._readers, 5, "the relay to drop the ended pipe")
    finally:
        relay.close()
    got = [r for r in caplog.records if r.name == "tests.child"]
    assert got[0].getMessage() == f"plain line from {p.pid}"
    assert got[1].getMessage() == "line with a lock in it"
    assert {r.processName for r in got} == {"fastfeed-test-child"}
    assert not [r for r in caplog.records if r.name == "fastfeed.logs"]
    assert relay.cut == 0
