"""Log records from the children (network process, workers) reach the parent's handlers; one
child killed or stopped in the middle of writing a record costs nothing but that child's unsent
lines, and a parent that does not read costs a child counted records, not memory.

The hazard: children that share one log channel share its write lock. A child SIGKILLed while
it holds that lock (mid-record: a record larger than a pipe's buffer is written in pieces)
would leave every other child unable to send a line, and the parent's reader waiting forever
for the rest of the record. The test makes that moment certain: the parent's handler holds the
first record it gets from a worker, so every child's channel fills up and stays full; the
worker that sent it is killed while blocked in the middle of its next, 1 MB record.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import re
import signal
import threading
import time

from fastfeed.feed import Feed
from fastfeed.logs import MAX_QUEUED, LogRelay, configure_child_logging
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


class Hold(logging.Handler):
    """Holds the first record it takes until let go (the parent's reader waits in it), and
    keeps ``key(message)`` of each record it takes, with when; a record whose key is None is
    passed by."""

    def __init__(self, key) -> None:
        super().__init__()
        self.key = key
        self.held = threading.Event()
        self.let_go = threading.Event()
        self.seen: list[tuple[int, float]] = []  # (key, when)

    def emit(self, record: logging.LogRecord) -> None:
        k = self.key(record.getMessage())
        if k is None:
            return
        self.seen.append((k, time.monotonic()))
        if not self.held.is_set():
            self.held.set()
            self.let_go.wait(30)


def worker_pid(message: str) -> int | None:
    m = re.match(r"worker \d+ pid (\d+)", message)
    return int(m.group(1)) if m else None


def start_child(relay: LogRelay, target, *args, **kwargs) -> mp.process.BaseProcess:
    """A spawned process that logs through a pipe of its own from ``relay``."""
    cfg = relay.config()
    p = mp.get_context("spawn").Process(target=target, args=(cfg, *args), **kwargs)
    p.start()
    cfg.started()
    return p


def child_logger(cfg, name: str) -> logging.Logger:
    """In a spawned child: its logging sent to the parent; the logger ``name``."""
    configure_child_logging(cfg)
    return logging.getLogger(name)


def test_a_child_killed_mid_record_does_not_silence_the_others(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    hold = Hold(worker_pid)
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
                victim = hold.seen[0][0]
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
    lg = child_logger(cfg, "tests.child")
    lg.warning("plain line from %d", os.getpid())
    lg.warning("line with a lock in it", extra={"lock": threading.Lock()})


def test_records_reach_the_parent_even_when_they_do_not_pickle(caplog):
    caplog.set_level(logging.WARNING)
    relay = LogRelay(mp.get_context("spawn"), logging.WARNING)
    try:
        p = start_child(relay, _log_then_exit, name="fastfeed-test-child")
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


def _big_records(cfg) -> None:
    """In a spawned child: 1 MB records without end, one after the other."""
    lg = child_logger(cfg, "tests.big")
    while True:
        lg.warning("big %s", PAD)


def _small_records(cfg) -> None:
    """In a spawned child: a short numbered record every 20 ms, without end."""
    lg = child_logger(cfg, "tests.small")
    for i in range(10**9):
        lg.warning("small %d", i)
        time.sleep(0.02)


class Count(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.n += 1


def test_a_child_stopped_mid_record_holds_no_one_back(caplog):
    """SIGSTOP a child while a record of it is half in its pipe: the other child's records
    go on arriving (the parent never waits for the rest of a record); SIGKILL it then: one
    warning, with how much of the record came."""
    caplog.set_level(logging.WARNING)
    big, small = Count(), Count()
    loggers = [(logging.getLogger("tests.big"), big), (logging.getLogger("tests.small"), small)]
    for lg, h in loggers:
        lg.addHandler(h)
        lg.propagate = False  # 1 MB records stay out of caplog
    relay = LogRelay(mp.get_context("spawn"), logging.WARNING)
    procs = []
    try:
        for target in (_big_records, _small_records):
            procs.append(start_child(relay, target, daemon=True))
        stopper, other = procs
        wait_until(lambda: big.n >= 2 and small.n >= 2, 30, "records from both children")

        def half_read() -> bool:
            return any(buf for r, buf in relay._pending.items()
                       if relay._readers.get(r, "").endswith(f"(pid {stopper.pid})"))

        for _ in range(50):  # stop it with a record half sent (not between two records)
            os.kill(stopper.pid, signal.SIGSTOP)
            time.sleep(0.2)  # the parent reads what is in the pipe
            if half_read():
                break
            os.kill(stopper.pid, signal.SIGCONT)
            time.sleep(0.01)
        assert half_read(), "never caught the child in the middle of a record"
        before = small.n
        wait_until(lambda: small.n >= before + 20, 10,
                   lambda: f"the other child's records (got {small.n - before})")
        os.kill(stopper.pid, signal.SIGKILL)
        stopper.join(10)
        wait_until(lambda: relay.cut == 1, 10, "the cut record to be noticed")
        before = small.n
        wait_until(lambda: small.n >= before + 10, 10, "the other child's records after it")
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
            p.join(10)
        relay.close()
        for lg, h in loggers:
            lg.removeHandler(h)
            lg.propagate = True
    cut = [r.getMessage() for r in caplog.records
           if r.name == "fastfeed.logs" and "broke off" in r.getMessage()]
    assert len(cut) == 1 and f"pid {stopper.pid}" in cut[0] and "bytes of it came" in cut[0], cut


def _many_records(cfg, n) -> None:
    """In a spawned child: n short records as fast as it can, then a normal exit."""
    lg = child_logger(cfg, "tests.many")
    for i in range(n):
        lg.warning("many %d", i)


@contextlib.contextmanager
def holding_many():
    """A relay, and a Hold on "tests.many" that holds its first record (kept out of caplog);
    the hold is let go and the relay closed on the way out."""
    hold = Hold(lambda message: int(message.split()[1]))
    lg = logging.getLogger("tests.many")
    lg.addHandler(hold)
    lg.propagate = False
    relay = LogRelay(mp.get_context("spawn"), logging.WARNING)
    try:
        yield hold, relay
    finally:
        hold.let_go.set()
        relay.close()
        lg.removeHandler(hold)
        lg.propagate = True


def test_a_parent_that_does_not_read_costs_counted_records_not_memory(caplog):
    """The parent's handler holds the first record; the child logs MAX_QUEUED + 5000 more:
    what does not fit its queue is dropped, and once the parent reads again a warning says
    how many; every record that was kept arrives, in order."""
    caplog.set_level(logging.WARNING)
    n = MAX_QUEUED + 5000
    with holding_many() as (hold, relay):
        p = start_child(relay, _many_records, n, daemon=True)
        wait_until(hold.held.is_set, 30, "the first record")
        time.sleep(1.0)  # the child logs everything meanwhile (in ~0.3 s), then waits to exit
        hold.let_go.set()
        p.join(30)
        assert p.exitcode == 0
        wait_until(lambda: [r for r in caplog.records if "were dropped" in r.getMessage()], 10,
                   "the warning with the count")
        wait_until(lambda: not relay._readers, 10, "the child's pipe to end")
    dropped = [r.getMessage() for r in caplog.records if "were dropped" in r.getMessage()]
    assert len(dropped) == 1, dropped
    lost = int(dropped[0].split()[0])
    got = [k for k, _ in hold.seen]
    assert 0 < lost < n and len(got) + lost == n, (len(got), lost)
    assert got == sorted(got) and got[0] == 0



def _one_then_sleep(cfg) -> None:
    """In a spawned child: one record, then nothing until it is killed."""
    child_logger(cfg, "tests.one").warning("one from %d", os.getpid())
    time.sleep(60)


def test_a_child_killed_between_records_is_told(caplog):
    """A pipe that ends between two records but without the end mark a child writes last at
    exit: the child was killed (what it had queued and not sent is lost): one warning."""
    caplog.set_level(logging.WARNING)
    relay = LogRelay(mp.get_context("spawn"), logging.WARNING)
    try:
        p = start_child(relay, _one_then_sleep, daemon=True)
        wait_until(lambda: [r for r in caplog.records if r.name == "tests.one"], 30, "its record")
        os.kill(p.pid, signal.SIGKILL)
        p.join(10)
        wait_until(lambda: relay.unended == 1, 10, "the end without a mark to be noticed")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGKILL)
        relay.close()
    told = [r.getMessage() for r in caplog.records if r.name == "fastfeed.logs"]
    assert len(told) == 1 and f"pid {p.pid}" in told[0] and "without the mark" in told[0], told
    assert relay.cut == 0


def test_records_a_child_could_not_send_before_its_exit_are_told(caplog):
    """The parent's handler holds the first record, so the child's pipe fills; the child logs
    on and exits normally, and its exit waits FLUSH_AT_EXIT_S for the parent, in vain. Once
    the parent reads again, the records that did reach the pipe arrive, and one warning says
    that the rest were lost (before, that loss was silent)."""
    caplog.set_level(logging.WARNING)
    n = 5000  # small records: far more than a pipe holds, far fewer than MAX_QUEUED
    with holding_many() as (hold, relay):
        p = start_child(relay, _many_records, n, daemon=True)
        wait_until(hold.held.is_set, 30, "the first record")
        p.join(30)  # its exit gives up on the queued records after FLUSH_AT_EXIT_S
        assert p.exitcode == 0
        hold.let_go.set()
        wait_until(lambda: relay.unended == 1, 10, "the end without a mark to be noticed")
    got = [k for k, _ in hold.seen]
    assert 0 < len(got) < n and got == list(range(len(got))), (len(got), got[:3], got[-3:])
    told = [r.getMessage() for r in caplog.records if r.name == "fastfeed.logs"]
    assert len(told) == 1 and f"pid {p.pid}" in told[0] and "without the mark" in told[0], told


def test_a_child_still_running_when_the_relay_stops_is_told(caplog):
    """close() waits for the children's pipes to end for at most its timeout: a child still
    running then (past the stop) has its pipe abandoned, with one warning that what it logs
    from then on is lost (before, silently). Its records sent before the stop arrive."""
    caplog.set_level(logging.WARNING)
    relay = LogRelay(mp.get_context("spawn"), logging.WARNING)
    p = start_child(relay, _one_then_sleep, daemon=True)
    try:
        wait_until(lambda: [r for r in caplog.records if r.name == "tests.one"], 30, "its record")
        t0 = time.monotonic()
        relay.close(timeout=0.5)
        assert time.monotonic() - t0 < 5
        assert relay.abandoned == 1 and relay.unended == 0 and relay.cut == 0
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.join(10)
    told = [r.getMessage() for r in caplog.records if r.name == "fastfeed.logs"]
    assert len(told) == 1 and f"pid {p.pid}" in told[0] and "still running" in told[0], told


def test_children_that_exited_before_the_stop_are_not_told_abandoned(caplog):
    caplog.set_level(logging.WARNING)
    relay = LogRelay(mp.get_context("spawn"), logging.WARNING)
    p = start_child(relay, _log_then_exit, daemon=True)
    p.join(30)
    assert p.exitcode == 0
    relay.close(timeout=5)
    assert relay.abandoned == 0 and relay.unended == 0
    assert not [r for r in caplog.records if r.name == "fastfeed.logs"]


def test_a_pipe_whose_process_never_started_is_dropped_quietly_at_once(caplog):
    """A child configured but never started (its start failed, or a command stopped on a
    missing setting first): close() neither waits for its pipe nor warns about it."""
    caplog.set_level(logging.WARNING)
    relay = LogRelay(mp.get_context("spawn"), logging.WARNING)
    cfg = relay.config()
    t0 = time.monotonic()
    relay.close(timeout=5)
    assert time.monotonic() - t0 < 2
    assert relay.abandoned == 0 and relay.unended == 0
    assert cfg.conn.closed
    assert not [r for r in caplog.records if r.name == "fastfeed.logs"]


def _never_runs(cfg, fn) -> None:
    raise AssertionError("this child was not to start")


def test_a_failed_start_closes_its_pipe_at_once_and_quietly(caplog):
    """A start that raises (here a real one: a spawned child's arguments do not pickle) hands
    its pipe back with ``discard``: the parent's write end is closed at once, the relay drops
    the pipe without a word and before any stop (before, both ends stayed open until close():
    two descriptors a failed start, a supervisor's retries included)."""
    caplog.set_level(logging.WARNING)
    relay = LogRelay(mp.get_context("spawn"), logging.WARNING)
    try:
        cfgs = [relay.config() for _ in range(3)]
        for cfg in cfgs:
            p = mp.get_context("spawn").Process(target=_never_runs, args=(cfg, lambda: 0), daemon=True)
            with contextlib.suppress(Exception):
                p.start()
            assert p.pid is None, "the start was to fail"
            relay.discard(cfg)
            assert cfg.conn.closed
        wait_until(lambda: relay.open_pipes == 0, 10, "the pipes of the failed starts dropped")
    finally:
        relay.close(timeout=5)
    assert relay.abandoned == 0 and relay.unended == 0 and relay.cut == 0
    assert not [r for r in caplog.records if r.name == "fastfeed.logs"]


def test_a_child_that_started_is_still_told_when_another_start_failed(caplog):
    """discard() quiets only the pipe of the start that failed: a child killed beside it is
    still told."""
    caplog.set_level(logging.WARNING)
    relay = LogRelay(mp.get_context("spawn"), logging.WARNING)
    try:
        failed = relay.config()
        relay.discard(failed)
        p = start_child(relay, _one_then_sleep, daemon=True)
        wait_until(lambda: [r for r in caplog.records if r.name == "tests.one"], 30, "its record")
        os.kill(p.pid, signal.SIGKILL)
        p.join(10)
        wait_until(lambda: relay.unended == 1, 10, "the killed child told")
        assert relay.open_pipes == 0
    finally:
        relay.close(timeout=5)
    told = [r.getMessage() for r in caplog.records if r.name == "fastfeed.logs"]
    assert len(told) == 1 and f"pid {p.pid}" in told[0], told
