"""The product surface: one object that runs the whole pipeline.

::

    with Feed(host="http://127.0.0.1:8080", tenant_id=..., client_id=..., client_secret=...,
              email="ops@example.com", workers=2) as feed:
        for batch in feed:                 # zero-copy views, valid until the next batch
            act(batch.ticks, batch.quotes, batch.bars)

``Feed`` starts a network process (the WebSocket session, or a pub/sub source) that
writes every data frame into the shared-memory ring of its symbol, and a pool of decoder
workers, one per ring; it supervises both and stops them cleanly (context manager,
``start()``/``stop()``, SIGINT/SIGTERM through :meth:`run`).

Ways to consume:

- ``for batch in feed`` / ``async for batch in feed``: decoded batches arrive in this
  process through output rings as NumPy views into shared memory, valid until the next
  batch is taken (``.copy()`` to keep rows);
- ``feed.run(handler)``: ``handler(worker_index, batch)`` runs inside every worker on each
  decoded batch (a :class:`fastfeed.Batch`); it must be picklable;
- ``Feed(workers=0)``: no worker process; :meth:`poll` decodes the ring in this process
  (one process hop fewer: the lowest latency, with ``busy_poll`` and pinning);
- ``feed.stats()`` at any time: every counter of every process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import asdict
from types import FrameType, TracebackType
from typing import Any

from ._decoder import now_us
from .config import Settings, load_settings
from .latency import LatencyHistogram
from .pool import OutputBatch, WorkerPool, set_affinity
from .session import SessionProcess

__all__ = ["Feed", "FeedError"]

log = logging.getLogger("fastfeed.feed")


def _cpu_set(cpus: Iterable[int] | None, what: str) -> set[int] | None:
    if cpus is None:
        return None
    out = {int(c) for c in cpus}
    if not out or min(out) < 0:
        raise ValueError(f"{what} must name at least one CPU number >= 0, got {sorted(out)}")
    return out


class FeedError(RuntimeError):
    """The feed cannot go on (the network process stopped on a fatal error)."""


class Feed:
    """The whole pipeline: network process, rings, decoder workers.

    source: a pub/sub URL (``redis://...?channel=``, ``redis+stream://``, ``nats://``,
        ``amqp://``, ``kafka://``; see :mod:`fastfeed.sources`) to read instead of the
        WebSocket; None (default) for the WebSocket session that ``settings`` describe.
    replay: a capture (file or directory, see :mod:`fastfeed.capture`) to feed through the
        pipeline instead of a live source, at ``speed`` (0: as fast as possible, 1.0: the
        recorded pace); the decoded output is the live run's.
    capture: a directory to write a raw capture of every frame to (for replay).
    settings: a :class:`fastfeed.config.Settings`; or give its fields as keyword options
        (``host``, ``tenant_id``, ``client_id``, ``client_secret``, ``scope``, ``email``,
        ...), with ``config_file`` and ``FASTFEED_*`` environment variables filling the rest.
    workers: decoder processes (and rings); symbols are spread over them by hash, so each
        symbol's order is kept. ``0``: no decoder process; this process decodes the ring
        itself in :meth:`poll` (inline mode: one process hop fewer, the lowest latency).
    handler: ``handler(worker_index, batch)`` run in the workers (see :meth:`run`); in
        inline mode, in this process, inside :meth:`poll`.
    output: deliver batches to this process for iteration (turn off when a handler does
        all the work: the workers then skip publishing). Always on inline.
    ring_capacity: bytes per input ring (a power of two).
    full_policy: what the network process does when a ring is full: "wait" (default: wait
        up to ``wait_timeout_us``, then drop and count), "drop" (at once) or "block".
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
        handler: Callable[[int, Any], None] | None = None,
        output: bool = True,
        ring_capacity: int = 1 << 22,
        full_policy: str = "wait",
        wait_timeout_us: int = 5000,
        busy_poll: bool = False,
        network_cpus: Iterable[int] | None = None,
        worker_cpus: Iterable[int] | None = None,
        consumer_cpus: Iterable[int] | None = None,
        config_file: str | None = None,
        log_level: int = logging.WARNING,
        **options: Any,
    ) -> None:
        if source is not None and replay is not None:
            raise ValueError("give either source or replay, not both")
        if workers < 0:
            raise ValueError("workers must be >= 0 (0: decode inline in this process)")
        if capture is not None:
            os.makedirs(capture, exist_ok=True)
        if settings is None and source is None and replay is None:
            settings = load_settings(options, config_file=config_file)
        elif options:
            raise TypeError("give either settings or keyword options, not both")
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
        self._pool_options = dict(ring_capacity=ring_capacity, full_policy=full_policy,
                                  wait_timeout_us=wait_timeout_us, busy_poll=busy_poll,
                                  capture_dir=capture, inline=self.inline,
                                  cpus=_cpu_set(worker_cpus, "worker_cpus"))
        self.network_cpus = _cpu_set(network_cpus, "network_cpus")
        self.consumer_cpus = _cpu_set(consumer_cpus, "consumer_cpus")
        self._pool: WorkerPool | None = None
        self._session: Any = None  # SessionProcess, or a pub/sub SourceProcess
        self._latency = LatencyHistogram()
        self._delivered = {"batches": 0, "ticks": 0, "quotes": 0, "bars": 0}
        self._current: OutputBatch | None = None
        self._next_worker = 0
        self._stop_event = threading.Event()
        self._started_at = 0.0
        self._stopped = False
        self._final: dict[str, Any] | None = None
        self._tables_after: tuple[Any, ...] | None = None
        self._unpin: tuple[int, set[int]] | None = None  # (thread id, its CPUs before start)
        self._pending: tuple[Any, int] | None = None  # (batch handed over, when), not counted yet
        self._consumer: int | None = None  # the thread that polls

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Feed:
        """Create the rings, start the workers, then the network process. Returns self."""
        if self._pool is not None:
            raise RuntimeError("feed already started")
        self._pool = WorkerPool(self.workers, handler=self.handler,
                                output=self.output and not self.inline,
                                **self._pool_options).start()
        try:
            if self.replay is not None:
                from .capture import ReplayProcess

                self._session = ReplayProcess(self.replay, self._pool.ring_names,
                                              speed=self.speed, log_level=self.log_level).start()
            elif self.source is not None:
                from .sources import SourceProcess

                self._session = SourceProcess(self.source, self._pool.ring_names,
                                              log_level=self.log_level).start()
            else:
                assert self.settings is not None
                self._session = SessionProcess(self.settings, self._pool.ring_names,
                                               log_level=self.log_level).start()
            if self.network_cpus is not None:
                set_affinity(self._session.pid, self.network_cpus, "network_cpus")
            if self.consumer_cpus is not None:
                # Last: processes started from this thread would inherit the pinning. The
                # thread gets its CPUs back at stop().
                tid = threading.get_native_id()
                self._unpin = (tid, os.sched_getaffinity(0))
                set_affinity(tid, self.consumer_cpus, "consumer_cpus")
        except BaseException:
            if self._session is not None:
                self._session.stop()
                self._session = None
            self._pool.stop(drain=False)
            self._pool.close()
            self._pool = None
            raise
        self._started_at = time.monotonic()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the network process, let the workers drain the rings, free every segment."""
        if self._stopped or self._pool is None:
            return
        self._stopped = True
        self._stop_event.set()
        self._flush()
        if self._current is not None:
            self._current.release()
            self._current = None
        if self._session is not None:
            self._session.stop()
        if self.inline:
            # Decode what is left in the ring here, counted as delivered.
            while (r := self._pool.read_inline(0.0)) is not None:
                self._account(r)
        elif self.output:
            # Drain what the workers still publish so that none of them waits on a full
            # output ring while stopping.
            self._drain_outputs()
        self._pool.stop(drain=True, timeout=timeout)
        if self.output and not self.inline:
            self._drain_outputs()
        self._final = self._collect()  # the segments the counters live in go away next
        # keep the codes readable after the shared tables are gone
        self._tables_after = tuple(list(t) if t is not None else None for t in
                                   (self._pool.symbols, self._pool.statuses, self._pool.bar_types))
        self._pool.close()
        if self._unpin is not None:
            tid, cpus = self._unpin
            self._unpin = None
            with contextlib.suppress(OSError):  # the thread may be gone
                os.sched_setaffinity(tid, cpus)

    def _drain_outputs(self) -> None:
        assert self._pool is not None
        for w in range(self.workers):
            while (b := self._pool.read_output(w, timeout=0)) is not None:
                self._account(b)
                b.release()

    def __enter__(self) -> Feed:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def request_stop(self) -> None:
        """Make iteration and :meth:`run` return soon (thread- and signal-safe)."""
        self._stop_event.set()

    @property
    def stopping(self) -> bool:
        return self._stop_event.is_set()

    def check(self) -> None:
        """Raise :class:`FeedError` if the network process stopped on a fatal error."""
        s = self._session
        if s is not None and not s.is_alive():
            s.join(0)
            raise FeedError(s.error or f"network process exited with code {s.exitcode}")

    # -- consuming --------------------------------------------------------------------------

    def _flush(self) -> None:
        """Count the batch last handed over. It is counted after the hand-over, not
        before: the consumer gets its rows a few µs sooner, and the latency stamp is the
        moment it got them."""
        p = self._pending
        if p is not None:
            self._pending = None
            self._account(p[0], p[1])

    def _account(self, b: Any, now: int | None = None) -> None:
        if now is None:
            now = now_us()
        d = self._delivered
        d["batches"] += 1
        if isinstance(b, OutputBatch):
            for kind, arr in b.parts:
                d[kind] += len(arr)
                self._latency.record_rows(now, arr)
        else:
            rec = self._latency.record_rows
            for kind, arr in (("ticks", b.ticks), ("quotes", b.quotes), ("bars", b.bars)):
                if len(arr):
                    d[kind] += len(arr)
                    rec(now, arr)

    def poll(self, timeout: float = 0.05) -> Any:
        """The next decoded batch, or None if none arrived within ``timeout`` seconds.

        With workers, the batch's arrays are views into shared memory, valid until the
        next call (or :meth:`stop`); ``.copy()`` what you keep. Inline (``workers=0``) the
        batch is a :class:`fastfeed.Batch` decoded here, whose arrays it owns (it also
        carries ``errors`` and ``control``).
        """
        if self._stopped:
            raise RuntimeError("the feed has stopped: make a new Feed to read again")
        if self._pool is None:
            self.start()
        assert self._pool is not None
        if not self.output:
            raise RuntimeError("this feed was made with output=False")
        self._consumer = threading.get_ident()
        self._flush()  # before the release below: its arrays may be views into the ring
        if self.inline:
            r = self._pool.read_inline(timeout)
            if r is None:
                self.check()
                return None
            self._pending = (r, now_us())
            return r
        if self._current is not None:
            self._current.release()
            self._current = None
        b = self._take_output()
        if b is None:
            # Nothing ready: sleep on the one worker's ring, or on the pool's doorbell
            # that every worker rings after publishing, so none waits on another.
            if self.workers == 1:
                b = self._pool.read_output(0, timeout=timeout)
            elif self._pool.wait_output(timeout):
                b = self._take_output()
            if b is None:
                self.check()
                return None
        self._current = b
        self._pending = (b, now_us())
        return b

    def _take_output(self) -> OutputBatch | None:
        """The next ready output, taking the workers in turn so that none is starved."""
        assert self._pool is not None
        n = self.workers
        for _ in range(n):
            w = self._next_worker
            self._next_worker = (w + 1) % n
            b = self._pool.read_output(w, timeout=0)
            if b is not None:
                return b
        return None

    def __iter__(self) -> Iterator[OutputBatch]:
        while not self._stop_event.is_set():
            b = self.poll()
            if b is not None:
                yield b

    async def __aiter__(self) -> AsyncIterator[OutputBatch]:
        while not self._stop_event.is_set():
            b = self.poll(timeout=0)
            if b is not None:
                yield b
            else:
                # Ring reads do not integrate with the event loop; a short sleep keeps an
                # idle feed cheap while other tasks run.
                await asyncio.sleep(0.0005)

    def run(self, handler: Callable[[int, Any], None] | None = None, *,
            duration: float | None = None, frames: int | None = None,
            on_stats: Callable[[dict[str, Any]], None] | None = None,
            stats_interval: float = 1.0) -> dict[str, Any]:
        """Run until SIGINT/SIGTERM, :meth:`request_stop`, ``duration`` seconds or ``frames``
        data frames decoded; then stop cleanly and return the final :meth:`stats`.

        ``handler(worker_index, batch)`` (if given, or the one passed to the constructor)
        runs inside each worker on every decoded :class:`fastfeed.Batch`; its arrays are
        valid during the call. ``on_stats`` is called in this process every
        ``stats_interval`` seconds with :meth:`stats`.
        """
        if handler is not None:
            if self._pool is not None:
                raise RuntimeError("give the handler before the feed starts")
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
            while not self._stop_event.is_set():
                if deadline is not None and time.monotonic() >= deadline:
                    break
                if self.output:
                    self.poll(timeout=0.02)
                else:
                    self._stop_event.wait(0.02)
                    self.check()
                if frames is not None and self.frames_decoded() >= frames:
                    break
                if self.source_done():
                    break
                if on_stats is not None and time.monotonic() >= next_stats:
                    next_stats += stats_interval
                    on_stats(self.stats())
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)
            self.stop()
        return self.stats()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stop_event.set()

    # -- state ------------------------------------------------------------------------------

    def _table(self, i: int) -> Any:
        if self._tables_after is not None:
            return self._tables_after[i]
        if self._pool is None:
            return None
        return (self._pool.symbols, self._pool.statuses, self._pool.bar_types)[i]

    @property
    def symbols(self) -> Any:
        """The symbol table (``feed.symbols[id]`` is the code), the same in every process;
        a plain list of the codes once the feed has stopped."""
        return self._table(0)

    @property
    def statuses(self) -> Any:
        """``ss`` codes by id (id 0 is "", absent)."""
        return self._table(1)

    @property
    def bar_types(self) -> Any:
        """``bt`` codes by id (id 0 is "", absent)."""
        return self._table(2)

    def source_done(self) -> bool:
        """True when a finite source (a replay) has written everything and the workers
        have decoded all of it; always False for live sources."""
        s = self._session
        if s is None or not getattr(s, "done", False):
            return False
        return self.frames_decoded() >= s.counters().get("frames", 0)

    def frames_decoded(self) -> int:
        return sum(w.frames for w in self._pool.stats()) if self._pool is not None else 0

    def stats(self) -> dict[str, Any]:
        """Every counter of every process, summed where that makes sense.

        ``frames``/``ticks``/``quotes``/``bars``/``errors``/``control`` are what the workers
        decoded; ``dropped`` counts frames the network process could not put in a ring and
        output the parent did not take in time; ``gaps`` the sequence numbers the workers
        found missing; ``latency_us`` is frame receipt to rows handed over in this process.
        ``delivered`` and ``latency_us`` count a batch once it has been handed over: in
        the polling thread, at once; seen from another thread, from the next poll on.
        """
        if threading.get_ident() == self._consumer:
            self._flush()  # the consumer's own call: count what it holds (another thread
            # must not: the batch may be released under it)
        if self._final is not None:
            out = dict(self._final)
            out["delivered"] = dict(self._delivered)
            out["latency_us"] = self._latency.summary()
            return out
        return self._collect()

    def _collect(self) -> dict[str, Any]:
        pool = self._pool
        session = self._session.counters() if self._session is not None else {}
        workers = pool.stats() if pool is not None else []
        rings = pool.rings if pool is not None else []
        total = {k: sum(getattr(w, k) for w in workers)
                 for k in ("frames", "ticks", "quotes", "bars", "errors", "control")}
        out = dict(total)
        out["control"] += session.get("control", 0)
        out["dropped"] = session.get("ring_drops", 0) + sum(w.output_dropped for w in workers)
        out["gaps"] = sum(r.gaps for r in rings)
        out["reconnects"] = session.get("reconnects", 0)
        out["auth_renewals"] = session.get("auth_renewals", 0)
        out["worker_restarts"] = sum(w.restarts for w in workers)
        out["poisoned"] = sum(w.poisoned for w in workers)
        out["received"] = session.get("frames", 0)
        out["delivered"] = dict(self._delivered)
        out["latency_us"] = self._latency.summary()
        out["elapsed_s"] = round(time.monotonic() - self._started_at, 3) if self._started_at else 0.0
        out["session"] = session
        out["workers"] = [asdict(w) for w in workers]
        return out
