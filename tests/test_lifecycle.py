"""The feed's life and death with real processes and real signals.

Every wait has a deadline; every test asserts something that could fail:

- ``fastfeed stream`` in its own process group: ``kill -9`` of the parent alone, SIGINT and
  SIGTERM to the group or to the parent, two SIGTERMs in a row; after each, no descendant of
  the command is alive and none of its shared-memory segments is left;
- a replay consumed more slowly than it is produced ends by itself with every row delivered;
- ``kill -9`` of the network process mid-stream: one restart, and every frame the simulator
  sent after the reconnect is received;
- a handler that raises: counted, one traceback in the log; under "raise", a FeedError;
- idle timeout, from the API and from the command;
- the "drop" full policy with a tiny ring and a slow handler: every frame decoded or counted
  as dropped, and the run returns.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fastfeed import shm
from fastfeed.capture import frames_array
from fastfeed.feed import Feed, FeedError, FeedIdleError
from fastfeed.sim.process import SimulatorProcess
from tests.feedcheck import settings_for

ROOT = Path(__file__).resolve().parent.parent
ROWS = ("ticks", "quotes", "bars")


# -- helpers ------------------------------------------------------------------------------------


def wait_until(cond: Callable[[], object], timeout: float, what: str | Callable[[], str],
               interval: float = 0.02) -> None:
    """Poll ``cond`` until it is true; fail naming ``what`` (a text, or a function that
    describes the state at the deadline) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() >= deadline:
            text = what() if callable(what) else what
            pytest.fail(f"timed out after {timeout:g} s waiting for {text}")
        time.sleep(interval)


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a process from /proc/<pid>/stat, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    rest = raw[raw.rfind(b")") + 2:].split()  # comm may hold spaces and parentheses
    return rest[0].decode(), int(rest[1])


def descendants(root: int) -> set[int]:
    """Every live descendant of ``root`` (children, grandchildren, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                children.setdefault(st[1], []).append(int(name))
    out: set[int] = set()
    todo = [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def alive(pid: int) -> bool:
    """A zombie (state Z) counts as dead: it runs no code and holds no memory."""
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def segments_of(pid: int) -> list[str]:
    """Shared-memory segments owned by process ``pid`` (fastfeed.<pid>.<start>.<tag>)."""
    return sorted(n for n in os.listdir(shm.SHM_DIR) if n.startswith(f"fastfeed.{pid}."))


def sim_sent(sim: SimulatorProcess) -> int:
    return sim.stats()["frames_sent"]


def _stream_cmd(sim: SimulatorProcess, tmp_path: Path, *extra: str) -> tuple[list[str], dict]:
    args = sim.settings_args(token_cache=str(tmp_path / "t.json"))
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["FASTFEED_CLIENT_SECRET"] = args["client_secret"]
    cmd = [sys.executable, "-m", "fastfeed", "stream", "--host", args["host"], "--authority",
           args["authority"], "--tenant", args["tenant_id"], "--client-id", args["client_id"],
           "--scope", args["scope"], "--token-cache", args["token_cache"], "--email",
           "ops@example.com", *extra]
    return cmd, env


@pytest.fixture
def reap():
    """Processes a test starts: killed (SIGKILL to their group) if still running at the end."""
    procs: list[subprocess.Popen] = []
    yield procs.append
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass
        for f in (p.stdout, p.stderr):
            if f is not None:
                f.close()
    shm.cleanup_stale()  # segments a failed test left behind, once their owner is reaped


def _communicate(p: subprocess.Popen, timeout: float) -> tuple[str, str]:
    try:
        return p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate(timeout=10)
        pytest.fail(f"{p.args[:3]} did not exit within {timeout:g} s; stderr: {err[-3000:]}")


# -- 1. fastfeed stream and signals -----------------------------------------------------------


def _start_streaming(sim: SimulatorProcess, tmp_path: Path, reap) -> tuple[subprocess.Popen, set[int]]:
    """``fastfeed stream --workers 2 --json`` in its own session (its own process group),
    once it streams; returns it and every descendant pid recorded at that moment."""
    cmd, env = _stream_cmd(sim, tmp_path, "--workers", "2", "--json")
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         cwd=ROOT, start_new_session=True)
    reap(p)
    deadline = time.monotonic() + 60
    while sim_sent(sim) <= 5000:
        if p.poll() is not None:
            pytest.fail(f"fastfeed stream exited early ({p.returncode}): {p.stderr.read()[-3000:]}")
        if time.monotonic() >= deadline:
            pytest.fail("fastfeed stream did not start streaming within 60 s")
        time.sleep(0.05)
    kids = descendants(p.pid)
    # the network process and two workers at least (multiprocessing may add its resource
    # tracker)
    assert len(kids) >= 3, kids
    return p, kids


def _nothing_left(p: subprocess.Popen, kids: set[int], timeout: float) -> None:
    wait_until(lambda: not any(alive(k) for k in kids), timeout,
               lambda: f"the descendants of {p.pid} to die: "
                       f"{sorted(k for k in kids if alive(k))} still alive")
    wait_until(lambda: not segments_of(p.pid), timeout,
               lambda: f"the segments of {p.pid} to go: {segments_of(p.pid)} still there")


def test_kill_9_of_the_stream_parent_takes_every_child_and_segment_with_it(tmp_path, reap):
    """A parent killed with SIGKILL cannot clean up: its children notice (the
    multiprocessing sentinel, or their parent pid changing), remove its segments and exit.

    The parent is reaped at once, as a shell would. The children race that reaping: a child
    that sweeps the segments while the parent is still a zombie leaves them all behind (see
    the next test, which makes that deterministic), so until that is fixed in the library
    this test fails now and then, more often on a loaded machine."""
    with SimulatorProcess("--rate", "20000") as sim:
        p, kids = _start_streaming(sim, tmp_path, reap)
        assert segments_of(p.pid), "a streaming feed has segments"
        os.kill(p.pid, signal.SIGKILL)
        p.wait(5)  # reaped at once, as a shell or a service manager would
        t0 = time.monotonic()
        _nothing_left(p, kids, 5.0)
        took = time.monotonic() - t0
    assert p.returncode == -signal.SIGKILL
    assert took < 5.0


def test_kill_9_of_the_stream_parent_while_it_is_still_a_zombie(tmp_path, reap):
    """The same kill, but the parent of ``fastfeed stream`` reaps it only after the
    children are gone (a busy supervisor, a shell in the middle of another command, a
    container's init that reaps late). Until it is reaped the dead parent is a zombie: its
    /proc entry, pid and start time are still there, yet it will never remove its segments.
    The children's cleanup must count a zombie owner as dead, or nothing ever removes the
    segments (until some later fastfeed start happens to sweep them)."""
    with SimulatorProcess("--rate", "20000") as sim:
        p, kids = _start_streaming(sim, tmp_path, reap)
        os.kill(p.pid, signal.SIGKILL)
        wait_until(lambda: not any(alive(k) for k in kids), 5.0,
                   "the descendants of the killed parent to die")
        assert _stat(p.pid) is not None and _stat(p.pid)[0] == "Z"  # not reaped yet
        p.wait(5)
        left = segments_of(p.pid)
        shm.cleanup_stale()  # the owner is reaped now: do not leave them on the machine
    assert not left, f"segments of the dead parent left behind: {left}"


def _summary(out: str) -> dict:
    lines = out.strip().splitlines()
    assert lines, "no output at all"
    return json.loads(lines[-1])


@pytest.mark.parametrize(
    ("signals", "to_group", "code"),
    [
        pytest.param([signal.SIGINT], True, 130, id="sigint-group"),
        pytest.param([signal.SIGTERM], True, 0, id="sigterm-group"),
        pytest.param([signal.SIGTERM], False, 0, id="sigterm-parent"),
        pytest.param([signal.SIGTERM, signal.SIGTERM], True, 0, id="two-sigterms-group"),
    ],
)
def test_stream_stops_in_order_on_signals(tmp_path, reap, signals, to_group, code):
    """First signal: an orderly drain, everything decoded is handed over, then the summary.
    A second one 50 ms later hurries the stop (rows in flight are counted as undelivered,
    not handed over), but the summary is still printed and nothing is left behind."""
    with SimulatorProcess("--rate", "20000") as sim:
        p, kids = _start_streaming(sim, tmp_path, reap)
        time.sleep(0.2)
        t0 = time.monotonic()
        for i, sig in enumerate(signals):
            if i:
                time.sleep(0.05)
            if to_group:
                os.killpg(p.pid, sig)
            else:
                os.kill(p.pid, sig)
        out, err = _communicate(p, 10.0)
        took = time.monotonic() - t0
        _nothing_left(p, kids, 5.0)
    assert took < 10.0
    assert p.returncode == code, err[-3000:]
    s = _summary(out)
    assert s["stop_reason"] == signals[0].name
    assert s["frames"] > 0
    assert s["dropped"] == 0 and s["dropped_rows"] == 0
    decoded = sum(s[k] for k in ROWS)
    if len(signals) == 1:
        # an orderly stop: every row decoded was handed over, none left undelivered
        assert sum(s["delivered"][k] for k in ROWS) == decoded, s
        assert {k: s["delivered"][k] for k in ROWS} == {k: s[k] for k in ROWS}, s
        assert s["undelivered"]["rows"] == 0, s
        assert s["frames"] == s["received"], s
    else:
        # hurried: what was decoded was either handed over or counted as undelivered
        assert sum(s["delivered"][k] for k in ROWS) + s["undelivered"]["rows"] <= decoded, s
    assert "Traceback" not in err, err[-3000:]


# A script that leaves a Feed (or a WorkerPool) running and ends, normally or by an uncaught
# exception: exit must not wait forever on children that leave SIGTERM to their parent.
_LEFT_RUNNING = """
import json, sys, time
from fastfeed import Feed, WorkerPool
if __name__ == "__main__":
    how, settings = sys.argv[1], json.loads(sys.argv[2])
    if how == "pool":
        pool = WorkerPool(2).start()
        time.sleep(1.0)  # the workers are up
    else:
        feed = Feed(workers=2, **settings)
        rows = 0
        for b in feed:  # starts the feed; no `with`, no stop()
            rows += b.rows
            if rows > 100:
                break
        if how == "raise":
            raise RuntimeError("a bug in the user's script")
    print("leaving", flush=True)
"""


@pytest.mark.parametrize("how, code", [("end", 0), ("raise", 1), ("pool", 0)])
def test_a_script_that_never_stops_its_feed_still_exits(tmp_path, reap, how, code):
    with SimulatorProcess("--rate", "2000") as sim:
        settings = sim.settings_args(token_cache=str(tmp_path / "t.json"))
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        p = subprocess.Popen([sys.executable, "-c", _LEFT_RUNNING, how, json.dumps(settings)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             cwd=tmp_path, start_new_session=True)
        reap(p)
        out, err = _communicate(p, 60.0)
    assert p.returncode == code, err[-3000:]
    assert "leaving" in out or how == "raise", (out, err[-3000:])
    what = "WorkerPool was still open" if how == "pool" else "Feed was still running"
    assert f"a {what} at interpreter exit" in err, err[-3000:]
    # nothing of it is left: no process in its group, no segment of its pid
    wait_until(lambda: not _group_alive(p.pid), 10.0, f"the children of {p.pid} to go")
    assert not segments_of(p.pid)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_stopped_worker_cannot_hold_the_drain_forever(tmp_path, caplog):
    """SIGSTOP one worker, then ask the feed to stop: its ring fills, the source waits on it,
    nothing moves. The loop ends drain_timeout seconds after the last progress, with a
    warning, and stop() leaves nothing behind."""
    caplog.set_level(logging.WARNING, logger="fastfeed")
    with SimulatorProcess("--rate", "20000") as sim:
        feed = Feed(workers=2, drain_timeout=2.0, ring_capacity=1 << 16,
                    **sim.settings_args(token_cache=str(tmp_path / "t.json")))
        victim = None
        try:
            rows, give_up, t_stop = 0, time.monotonic() + 60, float("inf")
            while time.monotonic() < t_stop:
                assert time.monotonic() < give_up, f"only {rows} rows in 60 s"
                b = feed.poll(timeout=0.05)
                rows += b.rows if b is not None else 0
                if rows > 2000 and victim is None:
                    victim = next(p for p in feed._pool.pids() if p)
                    os.kill(victim, signal.SIGSTOP)
                    t_stop = time.monotonic() + 1.0  # let its ring fill
            feed.request_stop()
            t0 = time.monotonic()
            guard = _deadline_guard(feed, 30.0)  # the test fails on `took`, not by hanging
            for _ in feed:
                pass
            guard.cancel()
            took = time.monotonic() - t0
            pid = os.getpid()
        finally:
            feed.stop()
            if victim is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(victim, signal.SIGCONT)
    assert 1.5 < took < 15, took
    assert any("made no progress for 2 s" in r.getMessage() for r in caplog.records)
    assert victim is not None and not alive(victim)
    assert not segments_of(pid)


# -- 2. replay with a consumer slower than the source -------------------------------------------


@pytest.fixture(scope="module")
def capture_200k(tmp_path_factory) -> tuple[Path, dict]:
    """A 200 000-frame capture recorded from the simulator by two workers, and the rows
    the decoder alone makes of it."""
    from fastfeed import Decoder

    n = 200_000
    tmp = tmp_path_factory.mktemp("capture")
    cap = tmp / "cap"
    with SimulatorProcess("--rate", "0", "--count", str(n)) as sim:
        feed = Feed(settings_for(sim, tmp), workers=2, capture=str(cap), output=False)
        stats = feed.run(frames=n, duration=90)
        sent = sim.stop()
    assert stats["frames"] == n == sent["frames_sent"]
    frames, ts = frames_array(cap)
    assert len(frames) == n
    want = Decoder().decode(frames, recv_ts=ts)
    rows = {k: len(getattr(want, k)) for k in ROWS}
    assert rows == {k: sent[k] for k in ROWS}
    return cap, rows


def _deadline_guard(feed: Feed, seconds: float) -> threading.Timer:
    """Stop a feed's iteration the hard way if it has not ended by itself in time (the test
    then fails on the flag instead of hanging until the per-test timeout)."""
    t = threading.Timer(seconds, feed.hurry)
    t.daemon = True
    t.start()
    return t


@pytest.mark.parametrize("workers", [2, 0], ids=["workers", "inline"])
def test_replay_iteration_with_a_slow_consumer_ends_by_itself_with_every_row(
        capture_200k, workers):
    """The consumer sleeps 20 ms after every batch. Batches grow while it sleeps (a batch is
    whatever is ready), so this is some tens of batches and about a second of sleeping: fast
    enough for a test, and still slower than the replay, which writes the whole capture
    before the consumer is done (checked: the source is seen finished while batches are
    still coming). The loop must end by itself, after the last row, with nothing dropped
    or left undelivered."""
    cap, want = capture_200k
    rows = dict.fromkeys(ROWS, 0)
    batches = 0
    behind = False  # the source had finished while the consumer still had batches to take
    t0 = time.monotonic()
    with Feed(replay=str(cap), workers=workers) as feed:
        guard = _deadline_guard(feed, 60.0)
        try:
            for b in feed:
                for k in ROWS:
                    rows[k] += len(getattr(b, k))
                batches += 1
                behind = behind or bool(feed._session.done)
                time.sleep(0.02)
        finally:
            guard.cancel()
        hurried = feed.hurried
    took = time.monotonic() - t0
    s = feed.stats()
    assert not hurried, f"the loop did not end by itself within 60 s: {s}"
    assert took < 60
    # (a replay is now about as fast as decoding: the batches it leaves ready are large,
    # and fewer; what matters is that the source was done while batches were still coming)
    assert batches > 1 and behind, (batches, behind)
    assert rows == want
    assert {k: s[k] for k in ROWS} == want
    assert {k: s["delivered"][k] for k in ROWS} == want
    assert s["frames"] == 200_000 and s["errors"] == 0
    assert s["dropped"] == 0 and s["dropped_rows"] == 0
    assert s["undelivered"] == {"batches": 0, "rows": 0}


# -- 3. kill -9 of the network process ------------------------------------------------------------


class _SimWatch(threading.Thread):
    """Samples the simulator's /stats every few ms: (connections, open_connections,
    frames_sent), read atomically in the simulator's one thread."""

    def __init__(self, sim: SimulatorProcess) -> None:
        super().__init__(daemon=True)
        self.sim = sim
        self.samples: list[tuple[int, int, int]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                st = self.sim.stats()
            except OSError:
                time.sleep(0.01)
                continue
            self.samples.append((st["connections"], st["open_connections"], st["frames_sent"]))
            time.sleep(0.003)


@pytest.fixture(scope="module")
def network_kill_run(tmp_path_factory) -> dict:
    """N frames at a fixed rate; the network process is SIGKILLed once a fifth of them have
    been decoded; the feed runs until the simulator has sent all N and the pipeline is idle.

    The first connection's total is read from the simulator in the window between its end
    (``open_connections`` drops to 0) and the second connection (``connections`` becomes 2):
    in one /stats answer, so exact. The new network process's own ``frames`` counter is
    exactly what the second connection delivered into the rings."""
    n, rate = 100_000, 20_000
    tmp = tmp_path_factory.mktemp("netkill")
    out: dict = {"n": n, "rate": rate}
    with SimulatorProcess("--rate", str(rate), "--count", str(n)) as sim:
        watch = _SimWatch(sim)
        feed = Feed(settings_for(sim, tmp), workers=2)
        rows = 0
        with feed:
            watch.start()
            deadline = time.monotonic() + 60
            killed_pid = None
            first = None
            try:
                while True:
                    b = feed.poll(0.05)
                    if b is not None:
                        rows += len(b.ticks) + len(b.quotes) + len(b.bars)
                    if killed_pid is None and feed.frames_decoded() > n // 5:
                        killed_pid = feed._session.pid
                        os.kill(killed_pid, signal.SIGKILL)
                        out["decoded_at_kill"] = feed.frames_decoded()
                    if killed_pid is not None and first is None:
                        first = next((s for s in watch.samples if s[0] == 1 and s[1] == 0), None)
                        if first is None and any(s[0] >= 2 for s in watch.samples):
                            pytest.fail("missed the window between the two connections: "
                                        f"{watch.samples[-20:]}")
                    if (first is not None and feed._session.pid != killed_pid
                            and watch.samples and watch.samples[-1][2] == n
                            and feed._session.counters()["frames"] >= n - first[2]
                            and feed._pool.idle()):
                        break
                    assert time.monotonic() < deadline, (feed.stats(), watch.samples[-5:])
                # hand over what is still in the pipeline, then stop
                feed.request_stop()
                for b in feed:
                    rows += len(b.ticks) + len(b.quotes) + len(b.bars)
            finally:
                watch.stop.set()
                watch.join(5)
            out["second_life_frames"] = feed._session.counters()["frames"]
            out["second_pid"] = feed._session.pid
        out["stats"] = feed.stats()
        out["sent"] = sim.stop()
    out["rows"] = rows
    out["first_conn_sent"] = first[2]
    out["killed_pid"] = killed_pid
    return out


def test_kill_9_of_the_network_process_mid_stream(network_kill_run):
    """One restart; the stream goes on; every frame the simulator sent on the second
    connection arrives (exactly); frames lost on the first connection — taken off the socket
    by the killed process but not yet in a ring, or still in the socket buffers when it died
    — are bounded by half a second of the stream (in practice a few dozen)."""
    r = network_kill_run
    s, sent, n = r["stats"], r["sent"], r["n"]
    assert s["network_restarts"] == 1
    assert r["second_pid"] != r["killed_pid"]
    assert sent["frames_sent"] == n and sent["connections"] == 2
    second = n - r["first_conn_sent"]  # frames the simulator sent on the second connection
    assert second > n // 2
    assert r["second_life_frames"] == second, "frames sent after the reconnect were lost"
    # frames after the kill kept arriving and were decoded
    assert s["frames"] > r["decoded_at_kill"] + second // 2
    from_first = s["frames"] - second  # frames of the first connection that reached a ring
    lost = r["first_conn_sent"] - from_first
    assert 0 <= lost <= r["rate"] // 2, lost
    assert (s["dropped"], s["errors"], s["dropped_rows"]) == (0, 0, 0)
    rows = sum(s[k] for k in ROWS)
    assert r["rows"] == rows == sum(s["delivered"][k] for k in ROWS)


def test_received_counter_after_a_network_kill(network_kill_run):
    """``received`` is documented as the frames the network process wrote into the rings.
    Every frame a worker decoded was written into a ring by some life of the network
    process, so ``received`` can never be below ``frames``."""
    s = network_kill_run["stats"]
    assert s["received"] >= s["frames"], (
        f"received {s['received']} < frames decoded {s['frames']}: the killed network "
        f"process's last counts were never published")


# -- 4. handler errors -------------------------------------------------------------------------------


class HandlerBroke(Exception):
    pass


def raising_handler(worker: int, batch) -> None:
    """Module level: workers are spawned, the handler is pickled by reference."""
    raise HandlerBroke(f"worker {worker} refuses a batch of {batch.frames} frames")


def test_a_raising_handler_is_counted_and_logged_once(tmp_path, caplog):
    n = 60_000
    caplog.set_level(logging.WARNING)
    with SimulatorProcess("--rate", "0", "--count", str(n)) as sim:
        feed = Feed(settings_for(sim, tmp_path), workers=1, output=False,
                    handler=raising_handler)
        t0 = time.monotonic()
        s = feed.run(frames=n, duration=60)
        took = time.monotonic() - t0
        sim.stop()
    assert took < 60 and s["frames"] == n  # it went on to the end: errors do not stop it
    batches = s["workers"][0]["batches"]
    assert batches > 0 and s["handler_errors"] == batches, (s["handler_errors"], batches)
    tracebacks = [r for r in caplog.records
                  if r.exc_info or "Traceback (most recent call last)" in r.getMessage()]
    assert len(tracebacks) == 1, [r.getMessage()[:300] for r in tracebacks]
    text = tracebacks[0].getMessage() + (tracebacks[0].exc_text or "")
    if tracebacks[0].exc_info:
        text += logging.Formatter().formatException(tracebacks[0].exc_info)
    assert "HandlerBroke" in text and "raising_handler" in text
    assert tracebacks[0].name == "fastfeed.worker"


def test_a_raising_handler_under_raise_stops_the_feed_with_feed_error(tmp_path):
    """At 5000 frames/s the first batch comes within a second; the run must end with a
    FeedError soon after, long before the 100 000 frames have been sent."""
    n = 100_000
    with SimulatorProcess("--rate", "5000", "--count", str(n)) as sim:
        feed = Feed(settings_for(sim, tmp_path), workers=1, output=False,
                    handler=raising_handler, on_handler_error="raise")
        t0 = time.monotonic()
        with pytest.raises(FeedError, match="handler raised"):
            feed.run(frames=n, duration=60)
        took = time.monotonic() - t0
        sent = sim.stop()
    s = feed.stats()
    assert took < 10, took
    assert s["handler_errors"] >= 1
    assert sent["frames_sent"] < n // 2, sent["frames_sent"]
    assert not feed.started


# -- 5. idle timeout -------------------------------------------------------------------------------


def test_idle_timeout_raises_feed_idle_error(tmp_path):
    """``--count 0``: the simulator accepts the connection, answers pings, sends no data."""
    with SimulatorProcess("--rate", "1000", "--count", "0") as sim:
        feed = Feed(settings_for(sim, tmp_path), workers=1, idle_timeout=1)
        t0 = time.monotonic()
        with feed, pytest.raises(FeedIdleError, match="nothing received for 1 s"):
            guard = _deadline_guard(feed, 30.0)
            try:
                for _ in feed:
                    pass
            finally:
                guard.cancel()
        took = time.monotonic() - t0
        st = sim.stats()
    assert not feed.hurried
    assert 1.0 <= took < 5.0, took
    assert st["connections"] == 1 and st["frames_sent"] == 0  # it was connected: idle, not down


def test_stream_idle_timeout_exits_with_one_error_line(tmp_path):
    with SimulatorProcess("--rate", "1000", "--count", "0") as sim:
        cmd, env = _stream_cmd(sim, tmp_path, "--workers", "1", "--idle-timeout", "1", "--json")
        t0 = time.monotonic()
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
        took = time.monotonic() - t0
    assert r.returncode not in (0, 130, 3), r.returncode
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastfeed: error:"), r.stderr[-3000:]
    assert "idle" in lines[0] or "nothing received" in lines[0]
    assert "Traceback" not in r.stderr
    assert _summary(r.stdout)["stop_reason"] == "error"
    assert took < 30


# -- 6. the "drop" full policy ------------------------------------------------------------------------


def slow_handler(worker: int, batch) -> None:
    time.sleep(0.02)


def test_drop_policy_with_a_tiny_ring_accounts_for_every_frame(tmp_path):
    """A 16 KiB ring (about 150 frames) and a handler that takes 20 ms per batch (at most
    some 7000 frames/s) against 20 000 frames/s: most frames are dropped, and drops and
    decoded frames alternate. The run returns, and every frame the simulator sent is either
    decoded or counted as dropped; the worker sees the drops between the frames it got as
    sequence gaps (drops after its last frame cannot show as gaps)."""
    n = 40_000
    with SimulatorProcess("--rate", "20000", "--count", str(n)) as sim:
        feed = Feed(settings_for(sim, tmp_path), full_policy="drop", ring_capacity=1 << 14,
                    workers=1, handler=slow_handler, output=False)
        t0 = time.monotonic()
        s = feed.run(frames=n, duration=60)
        took = time.monotonic() - t0
        sent = sim.stop()
    assert took < 55, f"run() did not return on its own: {s}"
    assert sent["frames_sent"] == n
    assert s["dropped"] > n // 4 and s["frames"] > 1000, (s["frames"], s["dropped"])
    assert s["frames"] + s["dropped"] == n, (s["frames"], s["dropped"])
    assert s["received"] == s["frames"]
    assert 0 < s["gaps"] <= s["dropped"]
    assert s["pauses"] == 0 and s["network_restarts"] == 0
