"""The product surface: one object that runs the whole pipeline.

::

    with Feed(host="http://127.0.0.1:8080", tenant_id=..., client_id=..., client_secret=...,
              email="ops@example.com", workers=2) as feed:
        for batch in feed:                 # a fastfeed.Batch, valid until the next one
            act(batch.ticks, batch.quotes, batch.bars)

``Feed`` starts a network process (the WebSocket session, or a pub/sub source) that
writes every data frame into the shared-memory ring of its symbol, and a pool of decoder
workers, one per ring; it supervises both and stops them cleanly (context manager,
``start()``/``stop()``, SIGINT/SIGTERM through :meth:`run`).

Ways to consume:

- ``for batch in feed`` / ``async for batch in feed``: one :class:`fastfeed.Batch` at a time,
  the same in every mode; with workers its arrays are NumPy views into shared memory, valid
  until the next batch is taken (the batch then refuses them; ``batch.copy()`` keeps rows);
- ``feed.run(handler)``: ``handler(worker_index, batch)`` runs inside every worker on each
  decoded batch (a :class:`fastfeed.Batch` too); it must be picklable;
- ``Feed(workers=0)``: no worker process; :meth:`poll` decodes the ring in this process
  (one process hop fewer: the lowest latency, with ``busy_poll`` and pinning);
- ``feed.stats()`` at any time: every counter of every process.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import math
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import asdict
from types import FrameType, TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt

from ._decoder import SymbolTable, now_us
from .batch import Batch
from .config import Settings, load_settings
from .control import ControlReader
from .latency import LatencyHistogram
from .logs import LogRelay
from .pool import HANDLER_ERROR_POLICIES, WorkerPool
from .session import SessionProcess
from .supervisor import Supervisor, set_affinity

__all__ = ["Feed", "FeedError", "FeedIdleError"]

log = logging.getLogger("fastfeed.feed")


def _cpu_set(cpus: Iterable[int] | None, what: str) -> set[int] | None:
    if cpus is None:
        return None
    out = {int(c) for c in cpus}
    if not out or min(out) < 0:
        raise ValueError(f"{what} must name at least one CPU number >= 0, got {sorted(out)}")
    return out


def _check_options(options: dict[str, Any]) -> None:
    """Every keyword option must be a Settings field: a misspelt one is an error that names
    it (and the closest field), not an option silently ignored."""
    import dataclasses
    import difflib
    import inspect

    fields = {f.name for f in dataclasses.fields(Settings)} | {"tenant"}
    known = fields | set(inspect.signature(Feed.__init__).parameters) - {"self", "options"}
    for name in options:
        if name not in fields:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(f"Feed() got an unexpected keyword argument {name!r}{hint}")


def _check_picklable(handler: Any) -> None:
    """Workers are spawned: the handler travels to them pickled. A lambda or a closure
    cannot: say so now, in one line, rather than with a PicklingError from inside
    multiprocessing."""
    import pickle

    if not callable(handler):
        raise TypeError(f"handler must be callable, got {type(handler).__name__}")
    try:
        pickle.dumps(handler)
    except Exception as exc:  # PicklingError, AttributeError, TypeError: all the same here
        name = getattr(handler, "__qualname__", None) or repr(handler)
        raise TypeError(f"handler {name} cannot be sent to the worker processes (they are "
                        f"spawned, so it is pickled: {type(exc).__name__}: {exc}); use a "
                        f"module-level function or a functools.partial of one, not a lambda "
                        f"or a nested function (or workers=0 to run it in this process)"
                        ) from None


def _check_main_guard() -> None:
    """Refuse to start a feed from the top level of a script without
    ``if __name__ == "__main__":``. Its children are spawned: each imports the script again
    to find the handler, and without the guard each would run the script (and start a feed)
    again. Checked here, in the parent, before any child exists: nothing of the script runs
    twice. A spawned child that gets here anyway (the script could not be read) stops at
    once with the same one line."""
    import multiprocessing as mp
    import sys

    msg = ('a script that starts a Feed needs `if __name__ == "__main__":` around the code '
           'that runs it: its worker processes are spawned and import the script again')
    if getattr(mp.current_process(), "_inheriting", False):
        # in a spawned child, importing the parent's script: say it once, run nothing more
        sys.stderr.write(f"fastfeed: error: {msg}\n")
        sys.stderr.flush()
        os._exit(1)
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or not path or getattr(main, "__spec__", None) is not None:
        return  # interactive, -c, or -m: spawn does not run it again by path
    frame: Any = sys._getframe(1)
    outer = None
    while frame is not None:
        if frame.f_globals is main.__dict__ and frame.f_code.co_name == "<module>":
            outer = frame
        frame = frame.f_back
    if outer is None:
        return
    import ast

    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, ValueError):
        return
    line = outer.f_lineno
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_main_test(node.test) and node.body:
            if node.body[0].lineno <= line <= (node.body[-1].end_lineno or line):
                return
    raise RuntimeError(f"{msg} ({path}, line {line})")


def _is_main_test(test: Any) -> bool:
    import ast

    if not (isinstance(test, ast.Compare) and len(test.ops) == 1
            and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = [test.left, test.comparators[0]]
    names = [s for s in sides if isinstance(s, ast.Name) and s.id == "__name__"]
    consts = [s for s in sides if isinstance(s, ast.Constant) and s.value == "__main__"]
    return len(names) == 1 and len(consts) == 1


class FeedError(RuntimeError):
    """The feed cannot go on (the network process stopped on a fatal error, or a handler
    raised under ``on_handler_error="raise"``)."""


class FeedIdleError(FeedError):
    """Nothing was received for ``idle_timeout`` seconds."""


#: Full-ring policies a Feed takes: "pause" (lossless), "drop", and the ring's own "wait"
#: (wait up to wait_timeout_us, then drop) and "block" (lossless, but the network process
#: blocks in the write: no heartbeat while it waits; kept for benchmarks).
FULL_POLICIES = ("pause", "drop", "wait", "block")
_STOPPED = "the feed has stopped: a Feed runs once; make a new Feed to run again"
# Counters of the network process that are levels, not totals: not summed over its lives.
_GAUGES = frozenset({"backlog"})


class Feed:
    """The whole pipeline: network process, rings, decoder workers.

    source: a pub/sub URL (``redis://...?channel=``, ``redis+stream://``, ``nats://``,
        ``amqp://``, ``kafka://``; see :mod:`fastfeed.sources`) to read instead of the
        WebSocket; None (default) for the WebSocket session that ``settings`` describe.
    replay: a capture (file or directory, see :mod:`fastfeed.capture`) to feed through the
        pipeline instead of a live source, at ``speed`` (0: as fast as possible, 1.0: the
        recorded pace); the decoded output is the live run's. Its codes are interned in
        order of first appearance before any worker starts, so ids and rows are the same
        with any number of workers. This process moves the frames into the rings between
        batches (in C; no replay process), so a replay runs about as fast as decoding;
        ``network_cpus`` does not apply. A path that is not a capture raises
        :class:`~fastfeed.capture.CaptureError` (or FileNotFoundError) here.
    capture: a directory to write a raw capture of every frame to (for replay); a previous
        run's files there are set aside (renamed), never overwritten or mixed up.
    settings: a :class:`fastfeed.config.Settings`; or give its fields as keyword options
        (``host``, ``tenant_id``, ``client_id``, ``client_secret``, ``scope``, ``email``,
        ...), with ``config_file`` and ``FASTFEED_*`` environment variables filling the rest;
        for the network, ``ca_file``, ``client_cert``, ``client_key``, ``proxy`` and
        ``connect_timeout`` (see docs/network.md).
    workers: decoder processes (and rings); symbols are spread over them by hash, so each
        symbol's order is kept. ``0``: no decoder process; this process decodes the ring
        itself in :meth:`poll` (inline mode: one process hop fewer, the lowest latency).
    handler: ``handler(worker_index, batch)`` run in the workers (see :meth:`run`); in
        inline mode, in this process, inside :meth:`poll`. With workers it must pickle (a
        module-level function or a ``functools.partial`` of one): a lambda is a TypeError.
    output: deliver batches to this process for iteration (turn off when a handler does
        all the work: the workers then skip publishing). Always on inline.
    ring_capacity: bytes per input ring (a power of two).
    full_policy: what happens when a ring is full. "pause" (default): nothing is lost; the
        network process stops reading (TCP pushes back to the sender; a broker source stops
        fetching and does not ack) until the workers make room, and a slow consumer makes
        the workers wait in turn; the time paused is counted (``backpressure_s``,
        ``pauses``). "drop": fresh data over complete data; every dropped frame is counted
        (``dropped``) and the sequence gap is visible to the workers (``gaps``). "wait":
        wait up to ``wait_timeout_us``, then drop.
    idle_timeout: end iteration, :meth:`poll` and :meth:`run` with :class:`FeedIdleError`
        when nothing is received for this many seconds (None: wait for data forever).
    drain_timeout: after :meth:`request_stop`, how many seconds the pipeline may go
        without handing over a batch while it drains; past that (a worker stopped or
        wedged, a source that does not end) the loop ends anyway, as after :meth:`hurry`,
        with a warning, and what is still in flight is counted as undelivered.
    on_handler_error: a handler's exception is counted (``handler_errors``) and logged
        once with its traceback, then by count ("log", default); "raise" stops the feed
        with :class:`FeedError` on the first.
    max_symbols: capacity of the shared symbol table (distinct symbol codes).
    busy_poll: workers (inline: :meth:`poll`) spin instead of sleeping when idle (lowest
        latency, a core each).
    network_cpus, worker_cpus, consumer_cpus: pin the network process, the workers and the
        thread that calls :meth:`start` (the consumer; its CPUs are given back at
        :meth:`stop`) to these CPUs; None leaves each to the scheduler. A busy-polling
        consumer wants a core of its own.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        source: str | None = None,
        replay: str | None = None,
        speed: float = 0.0,
        capture: str | None = None,
        workers: int = 1,
        handler: Callable[[int, Batch], None] | None = None,
        output: bool = True,
        ring_capacity: int = 1 << 22,
        full_policy: str = "pause",
        wait_timeout_us: int = 5000,
        busy_poll: bool = False,
        idle_timeout: float | None = None,
        drain_timeout: float = 30.0,
        on_handler_error: str = "log",
        max_symbols: int = 65536,
        network_cpus: Iterable[int] | None = None,
        worker_cpus: Iterable[int] | None = None,
        consumer_cpus: Iterable[int] | None = None,
        config_file: str | None = None,
        log_level: int | None = None,
        **options: Any,
    ) -> None:
        if source is not None and replay is not None:
            raise ValueError("give either source or replay, not both")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ValueError(f"workers must be an int >= 0 (0: decode inline in this process), "
                             f"got {workers!r}")
        if full_policy not in FULL_POLICIES:
            raise ValueError(f"full_policy must be one of {FULL_POLICIES}, got {full_policy!r}")
        if on_handler_error not in HANDLER_ERROR_POLICIES:
            raise ValueError(f"on_handler_error must be one of {HANDLER_ERROR_POLICIES}, "
                             f"got {on_handler_error!r}")
        if idle_timeout is not None and not idle_timeout > 0:
            raise ValueError(f"idle_timeout must be > 0 seconds (or None), got {idle_timeout!r}")
        if not drain_timeout > 0:
            raise ValueError(f"drain_timeout must be > 0 seconds, got {drain_timeout!r}")
        if capture is not None:
            os.makedirs(capture, exist_ok=True)
        if handler is not None and workers > 0:
            _check_picklable(handler)
        if options:
            _check_options(options)
        if settings is None and source is None and replay is None:
            settings = load_settings(options, config_file=config_file)
        elif options:
            raise TypeError(f"{', '.join(sorted(options))}: login settings are for the "
                            f"WebSocket feed; give them as keywords or as settings=, and "
                            f"neither with source= or replay=")
        if (isinstance(ring_capacity, bool) or not isinstance(ring_capacity, int)
                or ring_capacity < 1024 or ring_capacity & (ring_capacity - 1)):
            raise ValueError(f"ring_capacity must be a power of two of at least 1024 bytes, "
                             f"got {ring_capacity!r}")
        if isinstance(max_symbols, bool) or not isinstance(max_symbols, int) or max_symbols < 1:
            raise ValueError(f"max_symbols must be an int >= 1, got {max_symbols!r}")
        self.settings = settings
        self.source = source
        self.replay = replay
        self.speed = speed
        self.inline = workers == 0
        # An inline pool has one ring and no worker process; its "worker 0" is this process.
        self.workers = max(workers, 1)
        self.handler = handler
        # Inline, batches are decoded where they are consumed: there is no output to turn off.
        self.output = output or self.inline
        self.log_level = log_level
        self.full_policy = full_policy
        self.idle_timeout = idle_timeout
        self.drain_timeout = drain_timeout
        self._drain_by = 0.0  # while draining: when no progress since ends it
        self._drain_mark: tuple[int, int] = (-1, -1)  # the progress it was set at
        self._pool_options: dict[str, Any]
        self._pool_options = dict(ring_capacity=ring_capacity, full_policy=full_policy,
                                  wait_timeout_us=wait_timeout_us, busy_poll=busy_poll,
                                  capture_dir=capture, inline=self.inline,
                                  cpus=_cpu_set(worker_cpus, "worker_cpus"),
                                  on_handler_error=on_handler_error,
                                  symbol_capacity=max_symbols)
        self._capture = capture
        self.network_cpus = _cpu_set(network_cpus, "network_cpus")
        self.consumer_cpus = _cpu_set(consumer_cpus, "consumer_cpus")
        self._pool: WorkerPool | None = None
        self._control: ControlReader | None = None  # control messages of the network process
        self._session: Any = None  # SessionProcess, or a pub/sub SourceProcess
        # Latency of the rows handed over while the feed runs, and apart from it, of those
        # handed over after a stop was asked for (the drain: they waited for the stop).
        self._latency = LatencyHistogram()
        self._latency_drain = LatencyHistogram()
        self._delivered = {"batches": 0, "frames": 0, "ticks": 0, "quotes": 0, "bars": 0}
        self._current: Batch | None = None
        self._polls = 0
        self._stop_event = threading.Event()
        self._started_at = 0.0
        self._stopped = False
        self._final: dict[str, Any] | None = None
        self._tables_after: tuple[Any, ...] | None = None
        self._unpin: tuple[int, set[int]] | None = None  # (thread id, its CPUs before start)
        # (batch handed over, its arrays, whether they are views, when), not counted yet
        self._pending: tuple[Batch, tuple[Any, Any, Any], bool, int] | None = None
        self._consumer: int | None = None  # the thread that polls
        self._sup: Supervisor | None = None
        self._relay: LogRelay | None = None
        self._net_base: dict[str, int] = {}  # the network process's counters of past lives
        self._network_restarts = 0
        self._fatal: str | None = None
        self._source_ending = False  # the source was asked to stop: drain, then finish
        self._hurry = False  # a second stop request: skip the draining
        self._undelivered = {"batches": 0, "rows": 0}
        self._redelivers = False
        if source is not None:
            from .sources import SourceURL, source_class

            self._redelivers = bool(source_class(SourceURL.parse(source).scheme).at_least_once)
        self._last_rx = (0, 0.0)  # (frames received, when that count last moved)
        self._newest_rx_us = 0  # the latest receive time among the rows handed over
        if replay is not None:
            from .capture import capture_files

            if self.network_cpus is not None:
                raise ValueError("network_cpus: a replay has no network process (this "
                                 "process moves the frames; pin it with consumer_cpus)")
            capture_files(replay)  # FileNotFoundError / CaptureError: not a capture, here
        self._replay_clock: tuple[int, int] | None = None  # (replay start µs, first recv_ts)
        self._replay_control: dict[str, int] = {}  # a replay's symbol-less frames, classified

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Feed:
        """Create the rings, start the workers, then the network process. Returns self."""
        if self._stopped:
            raise RuntimeError(_STOPPED)
        if self._pool is not None:
            raise RuntimeError("feed already started")
        _check_main_guard()
        import multiprocessing as mp

        if self._capture is not None:
            from .capture import set_aside_previous_run

            set_aside_previous_run(self._capture)

        self._relay = LogRelay(mp.get_context("spawn"), self.log_level)
        self._sup = Supervisor("fastfeed")
        try:
            self._pool = WorkerPool(self.workers, handler=self.handler,
                                    output=self.output and not self.inline,
                                    supervisor=self._sup, log=self._relay,
                                    **self._pool_options).start()
            if self.replay is not None:
                # Ids by first appearance in the capture, before any worker decodes: the
                # same with any number of workers, replay after replay.
                from .capture import intern_codes

                self._replay_control = intern_codes(self.replay, self._pool.symbols,
                                                    self._pool.statuses, self._pool.bar_types)
        except BaseException:
            if self._pool is not None:
                self._pool.close()
                self._pool = None
            self._sup.close()
            self._relay.close()
            raise
        try:
            if self.output:
                self._control = ControlReader(f"{self._pool.name}.ctl")
            if self.replay is not None:
                # The frames go from the mapped capture into the rings from this process,
                # between batches (no replay process, no hop; see LocalReplay).
                from .capture import LocalReplay

                self._session = LocalReplay(
                    self.replay, self._pool.rings, speed=self.speed,
                    control=self._control.ring if self._control is not None else None)
            else:
                self._sup.add("network process", self._spawn_network, self._network_exited)
            if self.consumer_cpus is not None:
                # Last: processes started from this thread would inherit the pinning. The
                # thread gets its CPUs back at stop().
                tid = threading.get_native_id()
                self._unpin = (tid, os.sched_getaffinity(0))
                set_affinity(tid, self.consumer_cpus, "consumer_cpus")
        except BaseException:
            self._sup.hold()
            if self._session is not None:
                self._session.stop()
                self._session = None
            self._pool.stop(drain=False)
            self._pool.close()
            self._pool = None
            if self._control is not None:
                self._control.close()
                self._control = None
            self._sup.close()
            self._relay.close()
            raise
        self._started_at = time.monotonic()
        self._last_rx = (0, self._started_at)
        atexit.register(self._stop_at_exit)
        return self

    def _stop_at_exit(self) -> None:
        """The interpreter is exiting with this feed still running (no ``with``, no
        :meth:`stop`): stop it now, without draining. Otherwise exit waits forever: the
        children leave SIGTERM to their parent, and multiprocessing joins them at exit."""
        log.warning("a Feed was still running at interpreter exit: stopping it now (use "
                    "`with Feed(...)` or call feed.stop())")
        self.hurry()
        self.stop(timeout=5.0)

    def _spawn_network(self) -> Any:
        """Start the network process (or the pub/sub source); the supervisor calls it
        again after a crash."""
        assert self._pool is not None and self._relay is not None
        names, log_cfg = self._pool.ring_names, self._relay.config()
        try:
            if self.source is not None:
                from .sources import SourceProcess

                child: Any = SourceProcess(self.source, names, log=log_cfg)
            else:
                assert self.settings is not None
                child = SessionProcess(self.settings, names, log=log_cfg)
            if self._control is not None:
                child.send_control_to(self._control.name)
            child.start()
        except BaseException:
            self._relay.discard(log_cfg)
            raise
        self._session = child
        if self.network_cpus is not None:
            set_affinity(child.pid, self.network_cpus, "network_cpus")
        return child

    def _network_exited(self, child: Any) -> bool:
        """The supervisor's verdict on a network process that ended: True to start it again."""
        child.join(0)  # collects its last message (a fatal error, or "finished")
        if child.error is not None:
            self._fatal = child.error
            return False
        if child.finished or self._source_ending or self._stopped:
            return False
        code = child.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        for k, v in child.counters().items():
            if k not in _GAUGES:
                self._net_base[k] = self._net_base.get(k, 0) + v
        self._network_restarts += 1
        log.warning("the network process died (%s); starting it again (restart %d)", how,
                    self._network_restarts)
        return True

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the network process, let the workers drain the rings, free every segment.

        Rows still in flight are read here but not handed to anyone: they are counted as
        ``undelivered`` (to hand them over, end the iteration with :meth:`request_stop` and
        keep iterating: the loop ends by itself once everything is delivered). After
        :meth:`hurry` (a second Ctrl-C or SIGTERM), the draining is skipped.
        """
        if self._stopped or self._pool is None:
            return
        self._stopped = True
        atexit.unregister(self._stop_at_exit)
        self._stop_event.set()
        self._flush()
        self._release_current()
        pool = self._pool
        deadline = time.monotonic() + (1.0 if self._hurry else timeout)
        try:
            if self._sup is not None:
                self._sup.hold()
            self._end_source()
            # While the source finishes (it writes what it holds into the rings first), keep
            # the pipeline moving: a worker waiting on a full output ring would hold it up.
            s = self._session
            while s is not None and s.is_alive() and time.monotonic() < deadline:
                if not self._discard(0.01):
                    s.join(0.01)
            if s is not None:
                s.stop(timeout=max(0.1, min(2.0, deadline - time.monotonic())))
            if not self._hurry:
                while not pool.idle() and time.monotonic() < deadline:
                    if not self._discard(0.01):
                        time.sleep(0.001)
            pool.stop(drain=not self._hurry, timeout=max(0.1, deadline - time.monotonic()))
            self._discard(0)
            self._final = self._collect()  # the segments the counters live in go away next
            # keep the codes readable after the shared tables are gone
            self._tables_after = tuple(list(t) if t is not None else None for t in
                                       (pool.symbols, pool.statuses, pool.bar_types))
        finally:
            pool.close()
            if self._control is not None:
                self._control.close()
                self._control = None
            if self._sup is not None:
                self._sup.close()
            if self._relay is not None:
                self._relay.close()
            if self._unpin is not None:
                tid, cpus = self._unpin
                self._unpin = None
                with contextlib.suppress(OSError):  # the thread may be gone
                    os.sched_setaffinity(tid, cpus)

    def _discard(self, timeout: float) -> bool:
        """Read what the workers published and hand it to nobody (counted as undelivered).
        True if there was something."""
        pool = self._pool
        assert pool is not None
        got = False
        if self.inline:
            while (r := pool.read_inline(timeout)) is not None:
                self._count_undelivered(r)
                r.release()
                got, timeout = True, 0
        elif self.output:
            while (b := pool.take_output()) is not None:
                self._count_undelivered(b)
                b.release()
                got = True
            if not got and timeout and pool.wait_output(timeout):
                return self._discard(0)
        return got

    def _count_undelivered(self, b: Batch) -> None:
        self._undelivered["batches"] += 1
        self._undelivered["rows"] += b.rows

    def _end_source(self) -> None:
        """Ask the source to stop (once); the pipeline then drains, within drain_timeout."""
        if not self._source_ending:
            self._source_ending = True
            if self._session is not None:
                self._session.request_stop()

    def __enter__(self) -> Feed:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def request_stop(self) -> None:
        """End iteration and :meth:`run` in order (thread- and signal-safe): the source stops,
        what is already in the pipeline is still delivered, then the loop ends. Called again
        while stopping, it is :meth:`hurry`."""
        if self._stop_event.is_set():
            self._hurry = True
        self._stop_event.set()

    def hurry(self) -> None:
        """Stop as soon as possible: what is still in the pipeline is read and counted as
        undelivered, not handed over. Nothing is left behind either way."""
        self._hurry = True
        self._stop_event.set()

    @property
    def started(self) -> bool:
        """True between :meth:`start` and :meth:`stop`."""
        return self._pool is not None and not self._stopped

    @property
    def stopping(self) -> bool:
        return self._stop_event.is_set()

    def check(self) -> None:
        """Raise :class:`FeedError` if the feed cannot go on: the network process stopped on
        a fatal error (its one-line reason), or a handler raised under
        ``on_handler_error="raise"``."""
        if self._fatal is not None:
            raise FeedError(self._fatal)
        if self._sup is not None and self._sup.gave_up is not None:
            raise FeedError(self._sup.gave_up)
        pool = self._pool
        if pool is not None and pool.handler_failed():
            raise FeedError("the handler raised (its traceback is in the log) and "
                            "on_handler_error='raise' stops the feed")

    def _note_received(self) -> tuple[int, float]:
        """(frames received, when that count was first seen where it is)."""
        n = self._received()
        if n != self._last_rx[0]:
            self._last_rx = (n, time.monotonic())
        return self._last_rx

    def staleness(self) -> float:
        """Seconds since the last frame arrived (NaN before the first): from the receive
        time of the newest row handed over, or, when that is older (frames with no rows, a
        feed without output), from when the count of frames received last moved, as seen
        by this call or by :meth:`poll` waiting for data."""
        n, seen = self._note_received()
        if n == 0:
            return math.nan
        by_count = time.monotonic() - seen
        if self._newest_rx_us:
            return max(0.0, min(by_count, (now_us() - self._newest_rx_us) / 1e6))
        return by_count

    @property
    def source_label(self) -> str:
        """Where the frames come from, without credentials (a metrics label)."""
        if self.replay is not None:
            return f"replay:{self.replay}"
        if self.source is not None:
            from urllib.parse import urlsplit

            u = urlsplit(self.source)
            host = u.hostname or ""
            port = f":{u.port}" if u.port else ""
            return f"{u.scheme}://{host}{port}{u.path}"
        return str(self.settings.ws_url) if self.settings is not None else "websocket"

    def _check_idle(self) -> None:
        if self.idle_timeout is None or self._source_ending:
            return
        n, seen = self._note_received()
        now = time.monotonic()
        if now - seen >= self.idle_timeout:
            raise FeedIdleError(f"nothing received for {self.idle_timeout:g} s "
                                f"(idle_timeout={self.idle_timeout:g}); "
                                f"{n} frames received in all")

    def _received(self) -> int:
        pool = self._pool
        return sum(r.written for r in pool.rings) if pool is not None else 0

    def finished(self) -> bool:
        """True once the source has ended (a finite source wrote everything, or the feed was
        asked to stop) and every frame in the pipeline has been delivered."""
        s, pool = self._session, self._pool
        if pool is None:
            return self._stopped
        if self._source_ending and not self._hurry and self._drain_stuck(pool):
            log.warning("draining after the stop request made no progress for %g s (a worker "
                        "or the source is stopped or stuck): ending without it; what is still "
                        "in flight is counted as undelivered", self.drain_timeout)
            self._hurry = True
            return True
        if s is not None:
            done = getattr(s, "done", False)  # a finite source that wrote everything
            if not done and (not self._source_ending or s.is_alive()):
                return False
        ctl = self._control
        return pool.idle() and (ctl is None or not ctl.pending())

    def _drain_stuck(self, pool: WorkerPool) -> bool:
        """Draining after a stop request, and nothing moved (no frame decoded, no batch
        handed over) for drain_timeout seconds."""
        mark = (pool.frames_handled(), self._delivered["batches"])
        now = time.monotonic()
        if mark != self._drain_mark:
            self._drain_mark = mark
            self._drain_by = now + self.drain_timeout
            return False
        return now > self._drain_by

    # -- consuming --------------------------------------------------------------------------

    def _flush(self) -> None:
        """Count the batch last handed over. It is counted after the hand-over, not
        before: the consumer gets its rows a few µs sooner, and the latency stamp is the
        moment it got them."""
        p = self._pending
        if p is not None:
            self._pending = None
            self._account(*p)

    def _account(self, b: Batch, arrays: tuple[Any, Any, Any], views: bool, now: int) -> None:
        d = self._delivered
        d["batches"] += 1
        d["frames"] += b.frames
        # Rows handed over once a stop was asked for waited for it: reported apart.
        if self.replay is not None:
            rec = self._replay_lag  # the lag behind the recorded pace
        else:
            rec = (self._latency_drain if self._source_ending else self._latency).record_rows
        # A batch of views the consumer released early may show newer rows: counted, but
        # its times are not read.
        stamps = not (views and b.released)
        newest = None
        for kind, arr in zip(("ticks", "quotes", "bars"), arrays, strict=True):
            if len(arr):
                d[kind] += len(arr)
                if stamps:
                    rec(now, arr)
                    if newest is None:
                        newest = arr  # one kind is enough for the staleness (seconds)
        if newest is not None:
            last = int(newest["recv_ts"][-1])  # rows are in receive order
            if last > self._newest_rx_us:
                self._newest_rx_us = last

    def _release_current(self) -> None:
        b = self._current
        if b is not None:
            self._current = None
            b.release()

    def _replay_lag(self, now: int, arr: Any) -> None:
        """A replay's latency: how late each row is handed over against the recorded pace
        (when its frame was due: the replay's start plus its offset in the capture, at
        ``speed``), never the time since the recording was made. At speed 0 nothing is due
        at any particular time: no latency is recorded (see ``stats()["replay"]``)."""
        if self.speed <= 0:
            return
        if self._replay_clock is None:
            c = self._session.counters() if self._session is not None else {}
            if not c.get("started_us"):
                return
            self._replay_clock = (int(c["started_us"]), int(c["first_ts"]))
        started, first = self._replay_clock
        if self.speed == 1.0:
            self._latency.record_rows(now - (started - first), arr)
        else:
            lag = now - started - (arr["recv_ts"] - first) / self.speed
            self._latency.record(lag.astype("int64"))

    def poll(self, timeout: float = 0.05) -> Batch | None:
        """The next decoded :class:`fastfeed.Batch`, or None if none arrived within
        ``timeout`` seconds. The batch handed over before is released first: with workers
        its arrays are views into shared memory that newer rows now use, so it refuses to
        give them out; ``batch.copy()`` what you keep. The same in every mode.
        """
        if self._stopped:
            raise RuntimeError(_STOPPED)
        if self._pool is None:
            self.start()
        assert self._pool is not None
        if not self.output:
            raise RuntimeError("this feed was made with output=False")
        self._consumer = threading.get_ident()
        self._flush()  # before the release below: its arrays may be views into the ring
        self._release_current()
        if self._stop_event.is_set():
            self._end_source()
        self._polls += 1
        if not self._polls & 255:
            self.check()  # now and then even while data flows: a handler may have failed
        pool = self._pool
        if self.replay is not None and not self._source_ending:
            timeout = self._pump_replay(timeout)
        if self.inline:
            b = pool.read_inline(timeout)
        else:
            b = pool.take_output()
            if b is None:
                # Nothing ready: sleep on the one worker's ring, or on the pool's doorbell
                # that every worker rings after publishing, so none waits on another.
                if self.workers == 1:
                    b = pool.read_output(0, timeout=timeout)
                elif pool.wait_output(timeout):
                    b = pool.take_output()
        ctl = self._control
        if ctl is not None and ctl.pending():
            # What the network process took as control (status and error objects): handed
            # over with the rows, or on a batch of its own when there are none.
            if b is None:
                b = Batch(control=ctl.take(), worker=0)
            else:
                b.control.extend(ctl.take())
        if b is None:
            self.check()
            self._check_idle()
            return None
        b._tables = self  # codes through the feed: still readable after it stops
        self._current = b
        self._pending = (b, (b._ticks, b._quotes, b._bars), not b.owned, now_us())
        return b

    def _pump_replay(self, timeout: float) -> float:
        """Move the replay's due frames into the rings; return how long the caller may
        wait for output before it should pump again."""
        again = self._session.pump()
        if again is None:  # all written: wait for the decoders as for any source
            return 0.0 if self.inline and self._pool.idle() else timeout
        return min(timeout, again)

    def __iter__(self) -> Iterator[Batch]:
        """Decoded batches until the feed is stopped (:meth:`request_stop`, a signal in
        :meth:`run`) or a finite source (a replay) is exhausted; either way everything
        already in the pipeline is delivered first, then the loop ends by itself."""
        while True:
            b = self.poll()
            if b is not None:
                yield b
            elif self._hurry or self.finished():
                return

    async def __aiter__(self) -> AsyncIterator[Batch]:
        while True:
            b = self.poll(timeout=0)
            if b is not None:
                yield b
            elif self._hurry or self.finished():
                return
            else:
                # Ring reads do not integrate with the event loop; a short sleep keeps an
                # idle feed cheap while other tasks run.
                await asyncio.sleep(0.0005)

    def wait(self, timeout: float) -> bool:
        """For a feed without output (``output=False``: handlers do the work): wait up to
        ``timeout`` seconds, as :meth:`poll` would, raising what it would raise. Returns
        True while the feed runs, False once it is stopping."""
        if self.replay is not None:
            deadline = time.monotonic() + timeout
            while not self._stop_event.is_set() and not self._session.done:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._stop_event.wait(self._pump_replay(left) or 0.0)
            else:
                self._stop_event.wait(max(0.0, deadline - time.monotonic()))
        else:
            self._stop_event.wait(timeout)
        if self._stop_event.is_set():
            self._end_source()
        self.check()
        self._check_idle()
        return not self._stop_event.is_set()

    @property
    def hurried(self) -> bool:
        """True after :meth:`hurry` (or a second stop request)."""
        return self._hurry

    def frames_accounted(self) -> int:
        """Frames the feed is done with: decoded by a worker (rows or an error), set aside
        as poisoned, or dropped."""
        pool = self._pool
        handled = pool.frames_handled() if pool is not None else 0
        # An at-least-once broker delivers again what a ring refused: not lost, not done.
        lost = 0 if self._redelivers else self._session_counters().get("ring_drops", 0)
        return handled + lost

    def run(self, handler: Callable[[int, Batch], None] | None = None, *,
            duration: float | None = None, frames: int | None = None,
            on_stats: Callable[[dict[str, Any]], None] | None = None,
            stats_interval: float = 1.0) -> dict[str, Any]:
        """Run until SIGINT/SIGTERM, :meth:`request_stop`, ``duration`` seconds, ``frames``
        data frames accounted for (decoded, refused as errors, or dropped) or the end of a
        finite source; then stop cleanly and return the final :meth:`stats`. A second
        signal makes the stop quick. Raises :class:`FeedError` when the feed cannot go on
        and :class:`FeedIdleError` after ``idle_timeout`` without data.

        ``handler(worker_index, batch)`` (if given, or the one passed to the constructor)
        runs inside each worker on every decoded :class:`fastfeed.Batch`; its arrays are
        valid during the call. ``on_stats`` is called in this process every
        ``stats_interval`` seconds with :meth:`stats`.
        """
        if self._stopped:
            raise RuntimeError(_STOPPED)
        if handler is not None:
            if self._pool is not None:
                raise RuntimeError("give the handler before the feed starts")
            if not self.inline:
                _check_picklable(handler)
            self.handler = handler
        if self._pool is None:
            self.start()
        old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                old[sig] = signal.signal(sig, self._on_signal)
        try:
            deadline = None if duration is None else time.monotonic() + duration
            next_stats = time.monotonic() + stats_interval
            while not self._hurry:
                if deadline is not None and time.monotonic() >= deadline:
                    break
                if self.output:
                    if self.poll(timeout=0.02) is None and self.finished():
                        break
                else:
                    self.wait(0.02)
                    if self.finished():  # a finite source (a replay) ended, or a stop
                        break
                if frames is not None and self.frames_accounted() >= frames:
                    break
                if on_stats is not None and time.monotonic() >= next_stats:
                    next_stats += stats_interval
                    on_stats(self.stats())
        finally:
            try:
                self.stop()
            finally:
                for sig, h in old.items():
                    signal.signal(sig, h)
        return self.stats()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.request_stop()

    # -- state ------------------------------------------------------------------------------

    def _table(self, i: int) -> SymbolTable | list[str]:
        if self._tables_after is not None:
            return self._tables_after[i]  # type: ignore[no-any-return]
        if self._pool is None or self._pool.symbols is None:
            return []
        return (self._pool.symbols, self._pool.statuses, self._pool.bar_types)[i]  # type: ignore[no-any-return]

    @property
    def symbols(self) -> SymbolTable | list[str]:
        """The symbol table (``feed.symbols[id]`` is the code), the same in every process;
        a plain list of the codes once the feed has stopped (empty before it starts)."""
        return self._table(0)

    @property
    def statuses(self) -> SymbolTable | list[str]:
        """``ss`` codes by id (id 0 is "", absent)."""
        return self._table(1)

    @property
    def bar_types(self) -> SymbolTable | list[str]:
        """``bt`` codes by id (id 0 is "", absent)."""
        return self._table(2)

    # -- conversions --------------------------------------------------------------------------

    def to_pandas(self, rows: npt.NDArray[np.void], *, tz: str | None = "UTC") -> Any:
        """A pandas DataFrame of rows kept from this feed's batches (ticks, quotes or bars,
        e.g. joined copies), with this feed's codes. For a batch: ``batch.to_pandas()``."""
        from .convert import to_pandas

        return to_pandas(rows, self.symbols, self.statuses, self.bar_types, tz=tz)

    def to_arrow(self, rows: npt.NDArray[np.void], *, tz: str | None = "UTC") -> Any:
        """A pyarrow Table of rows kept from this feed's batches (see :meth:`to_pandas`)."""
        from .convert import to_arrow

        return to_arrow(rows, self.symbols, self.statuses, self.bar_types, tz=tz)

    def to_polars(self, rows: npt.NDArray[np.void], *, tz: str | None = "UTC") -> Any:
        """A polars DataFrame of rows kept from this feed's batches (see :meth:`to_pandas`)."""
        from .convert import to_polars

        return to_polars(rows, self.symbols, self.statuses, self.bar_types, tz=tz)

    def source_done(self) -> bool:
        """True when a finite source (a replay) has written everything and all of it has
        been delivered; always False for live sources."""
        s = self._session
        return s is not None and bool(getattr(s, "done", False)) and self.finished()

    def frames_decoded(self) -> int:
        """Frames the workers have handled (rows or an error each)."""
        return sum(w.frames for w in self._pool.stats()) if self._pool is not None else 0

    def _session_counters(self) -> dict[str, int]:
        """The network process's counters, summed over its lives (restarts)."""
        cur = self._session.counters() if self._session is not None else {}
        out = dict(cur)
        for k, v in self._net_base.items():
            out[k] = out.get(k, 0) + v
        return out

    def stats(self) -> dict[str, Any]:
        """Every counter of every process, summed where that makes sense.

        Frames: ``received`` (written into the rings by the network process), ``frames``
        (handled by the workers: each gives rows or an ``error``), ``dropped`` (frames lost
        on a full ring, only under ``full_policy="drop"``/``"wait"``), ``gaps`` (sequence
        numbers the workers found missing). Rows: ``ticks``/``quotes``/``bars`` decoded,
        ``delivered`` (handed to the consumer), ``dropped_rows`` (decoded rows an output
        ring refused, only with a dropping policy), ``undelivered`` (read at :meth:`stop`
        but handed to nobody). Backpressure: ``pauses`` and ``backpressure_s``, the time
        the source was paused for room. ``handler_errors``, ``network_restarts``,
        ``worker_restarts``, ``symbols_full``; ``latency_us`` is frame receipt to rows
        handed over while the feed ran, ``latency_drain_us`` the same for the rows handed
        over after a stop was asked for (they waited for it: the drain is reported apart).
        ``delivered`` (``frames`` among them) and ``latency_us`` count a batch once it has been
        handed over: in the polling thread, at once; from another thread, from the next
        poll on.
        """
        if threading.get_ident() == self._consumer:
            self._flush()  # the consumer's own call: count what it holds (another thread
            # must not: the batch may be released under it)
        if self._final is not None:
            out = dict(self._final)
            out["delivered"] = dict(self._delivered)
            out["undelivered"] = dict(self._undelivered)
            out["latency_us"] = self._latency.summary()
            out["latency_drain_us"] = self._latency_drain.summary()
            return out
        return self._collect()

    def _collect(self) -> dict[str, Any]:
        pool = self._pool
        session = self._session_counters()
        workers = pool.stats() if pool is not None else []
        rings = pool.rings if pool is not None else []
        total = {k: sum(getattr(w, k) for w in workers)
                 for k in ("frames", "ticks", "quotes", "bars", "errors", "control")}
        out: dict[str, Any] = dict(total)
        # Frames without a symbol go to no ring: the network process (or, for a replay, the
        # index built at start) counts what they hold as the decoder would (see
        # fastfeed.control): control messages, errors, and data it could not route.
        ctl = self._replay_control if self.replay is not None else session
        if "control_msgs" in ctl:
            out["control"] += ctl["control_msgs"]
            out["errors"] += ctl.get("control_errors", 0)
        else:
            out["control"] += session.get("control", 0)
        out["unroutable"] = ctl.get("unroutable", 0)
        # The rings count what was written into them themselves: exact across network
        # process restarts (its own counters are published every 50 ms, and a kill -9
        # loses the last ones).
        out["received"] = self._received() if rings else session.get("frames", 0)
        out["dropped"] = session.get("ring_drops", 0)
        out["dropped_rows"] = sum(w.output_dropped for w in workers)
        out["control_dropped"] = self._control.dropped if self._control is not None else 0
        out["gaps"] = sum(r.gaps for r in rings)
        out["pauses"] = session.get("pauses", 0)
        out["backpressure_s"] = round(session.get("backpressure_us", 0) / 1e6, 6)
        out["handler_errors"] = sum(w.handler_errors for w in workers)
        out["symbols_full"] = sum(w.symbols_full for w in workers)
        out["reconnects"] = session.get("reconnects", 0)
        out["auth_renewals"] = session.get("auth_renewals", 0)
        out["network_restarts"] = self._network_restarts
        out["worker_restarts"] = sum(w.restarts for w in workers)
        out["poisoned"] = sum(w.poisoned for w in workers)
        out["delivered"] = dict(self._delivered)
        out["undelivered"] = dict(self._undelivered)
        out["latency_us"] = self._latency.summary()
        out["latency_drain_us"] = self._latency_drain.summary()
        out["elapsed_s"] = round(time.monotonic() - self._started_at, 3) if self._started_at else 0.0
        out["session"] = session
        out["workers"] = [asdict(w) for w in workers]
        if self.replay is not None:
            out["replay"] = self._replay_summary(out)
        return out

    def _replay_summary(self, out: dict[str, Any]) -> dict[str, Any]:
        """What ``latency_us`` means in a replay, and the replay's own throughput."""
        c = self._session_counters()
        span = out["elapsed_s"]
        return {
            "speed": self.speed,
            "frames_per_s": round(out["frames"] / span) if span else 0,
            "latency": ("none: at speed 0 no frame is due at a particular time"
                        if self.speed <= 0 else
                        f"lag behind the recorded pace (x{self.speed:g}), frame due to rows "
                        f"handed over; not the time since the recording"),
            "repeats": c.get("repeats", 0),
            "torn": c.get("torn", 0),
        }
