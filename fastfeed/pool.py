"""The worker pool: N spawned decoder processes, each consuming one shared-memory ring.

::

    producer (network process) ──► ring i ──► worker i ──► output ring i ──► parent

The pool creates every segment (input rings, output rings, the symbol tables, a small state
segment; see :mod:`fastfeed.state`), starts the workers (:mod:`fastfeed.worker`) under the
feed's :class:`~fastfeed.supervisor.Supervisor`, and reads their output
(:mod:`fastfeed.output`). A worker that dies is started again and resumes at the consumer
position kept in its ring: nothing committed is lost or decoded twice. :meth:`WorkerPool.stop`
drains the rings before the workers exit.
"""

from __future__ import annotations

import atexit
import dataclasses
import itertools
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from types import FrameType, TracebackType
from typing import Any

import numpy as np

from fastfeed import shm
from fastfeed._ring import HEADER_SIZE as RING_HEADER
from fastfeed._ring import Doorbell, Ring
from fastfeed.batch import Batch
from fastfeed.logs import LogRelay
from fastfeed.output import OutputReader
from fastfeed.state import (
    BELL_OFFSET,
    COLS,
    F_CRASH_END,
    F_CRASH_SEQ,
    F_CRASHES,
    F_DONE_SEQ,
    F_FRAMES,
    F_PENDING_END,
    F_POISONED,
    F_RESTARTS,
    F_STATE,
    G_HANDLER_FAILED,
    G_STOP,
    OUTPUT_BARS,
    OUTPUT_QUOTES,
    OUTPUT_TICKS,
    POISON_DEATHS,
    S_EXITED,
    S_RUNNING,
    W0,
    WorkerStats,
    symbol_layout,
    tables_in,
)
from fastfeed.supervisor import Supervisor, set_affinity
from fastfeed.worker import Handler, InlineDecoder, WorkerSpec, worker_main

__all__ = [
    "OUTPUT_BARS",
    "OUTPUT_QUOTES",
    "OUTPUT_TICKS",
    "WorkerPool",
    "WorkerStats",
    "set_affinity",
]

log = logging.getLogger("fastfeed.pool")
_pool_ids = itertools.count()
#: What a handler's exception does: "log" (count it, log the first with its traceback, then
#: by count, go on) or "raise" (stop the feed on the first).
HANDLER_ERROR_POLICIES = ("log", "raise")


class WorkerPool:
    """N decoder worker processes, each consuming one input ring; see the module docstring.

    workers: number of worker processes (and input rings).
    handler: optional ``handler(worker_index, batch)`` run in the worker for each decoded batch.
    output: give each worker an output ring the parent reads with :meth:`read_output`.
    ring_capacity / full_policy / wait_timeout_us: input rings (see ``Ring.create``); the
        producer (network process) attaches to ``ring_names[i]``.
    output_capacity / output_policy: output rings; "wait" (default) drops and counts output the
        parent does not read in time rather than stalling decoding, "block" never drops.
    batch_size: most records a worker takes from its ring at once.
    busy_poll: workers spin instead of sleeping when idle (lowest latency, a core each).
    restart: start a worker again when it dies.
    symbol_capacity: size of the shared symbol table.
    capture_dir: write every frame each worker takes (raw, with its receive time) to
        ``capture_dir/capture-w<N>.ffcap`` (see :mod:`fastfeed.capture`).
    inline: no worker process: the calling process decodes ring 0 itself with
        :meth:`read_inline` (one process hop fewer, for the lowest latency); needs
        ``workers=1``. The handler then runs in the calling process.
    cpus: the CPUs the worker processes may run on (``os.sched_setaffinity``); None: any.
    """

    def __init__(
        self,
        workers: int = 2,
        *,
        handler: Handler | None = None,
        output: bool = True,
        ring_capacity: int = 1 << 22,
        full_policy: str = "pause",
        wait_timeout_us: int = 5000,
        output_capacity: int = 1 << 24,
        output_policy: str | None = None,
        batch_size: int = 4096,
        busy_poll: bool = False,
        restart: bool = True,
        symbol_capacity: int = 65536,
        name: str | None = None,
        capture_dir: str | None = None,
        inline: bool = False,
        cpus: set[int] | None = None,
        on_handler_error: str = "log",
        supervisor: Supervisor | None = None,
        log: LogRelay | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
        if inline and workers != 1:
            raise ValueError("an inline pool has exactly one ring (workers=1)")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if handler is not None and not callable(handler):
            raise ValueError("handler must be callable")
        if on_handler_error not in HANDLER_ERROR_POLICIES:
            raise ValueError(f"on_handler_error must be one of {HANDLER_ERROR_POLICIES}, "
                             f"got {on_handler_error!r}")
        self.workers = workers
        self.handler = handler
        self.output = output and not inline  # inline, read_inline hands the rows over
        self.ring_capacity = ring_capacity
        self.full_policy = full_policy
        self.wait_timeout_us = wait_timeout_us
        self.output_capacity = output_capacity
        # Lossless input means lossless output: a worker waits for the parent to read.
        if output_policy is None:
            output_policy = "block" if full_policy in ("pause", "block") else "wait"
        self.output_policy = output_policy
        self.batch_size = batch_size
        self.busy_poll = busy_poll
        self.restart = restart
        self.symbol_capacity = symbol_capacity
        self.capture_dir = capture_dir
        self.inline = inline
        self.cpus = set(cpus) if cpus is not None else None
        self.on_handler_error = on_handler_error
        self._inline: InlineDecoder | None = None
        # statuses and bar types: as a standalone Decoder's own tables (max_bar_types=4096;
        # statuses stop at 256, the range of `status`), so that both give the same errors
        self.small_capacity = 4096
        self.name = name or f"pool{next(_pool_ids)}"
        self.rings: list[Ring] = []
        self.outputs: list[Ring] = []
        self._reader: OutputReader | None = None
        self._state_seg: shm.Segment | None = None
        self._sym_seg: shm.Segment | None = None
        self._state: np.ndarray | None = None
        self._tables: list[Any] = []
        self._slots: list[int] = []
        self._specs: list[WorkerSpec] = []
        self._own_supervisor = supervisor is None
        self._sup = supervisor if supervisor is not None else Supervisor(self.name)
        self._log = log
        self._stopping = False
        self._started = False
        self._closed = False
        self._stop_requested = threading.Event()
        self._bell: Doorbell | None = None
        self._fault: tuple[str, str] | None = None  # tests only, see WorkerSpec.fault
        self._ctx = mp.get_context("spawn")

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> WorkerPool:
        """Create the segments, spawn the workers, start supervising. Returns self."""
        if self._started:
            raise RuntimeError("pool already started")
        self._started = True
        shm.cleanup_stale()
        try:
            self._create_segments()
            if self.inline:
                self._inline = InlineDecoder(self)
                return self
            for i in range(self.workers):
                self._slots.append(self._sup.add(f"worker {i}", self._spawner(i),
                                                 self._exit_handler(i)))
        except BaseException:
            self.close()
            raise
        atexit.register(self._close_at_exit)
        return self

    def _close_at_exit(self) -> None:
        """The interpreter is exiting with this pool still open: close it now. Otherwise
        exit waits forever: workers leave SIGTERM to their parent, and multiprocessing
        joins them at exit."""
        log.warning("a WorkerPool was still open at interpreter exit: closing it now (use "
                    "`with WorkerPool(...)` or call pool.close())")
        self.close()

    def _create_segments(self) -> None:
        from fastfeed._decoder import BAR_DTYPE, QUOTE_DTYPE, TICK_DTYPE

        self._dtypes = {"ticks": TICK_DTYPE, "quotes": QUOTE_DTYPE, "bars": BAR_DTYPE}
        _, sym_size = symbol_layout(self.symbol_capacity, self.small_capacity)
        in_size = self.ring_capacity + RING_HEADER
        out_size = self.output_capacity + RING_HEADER if self.output else 0
        per = (f"{in_size / (1 << 20):,.1f} MiB input ring"
               + (f" and a {out_size / (1 << 20):,.1f} MiB output ring" if out_size else ""))
        # Up front, before anything is created: one line naming the size, not a SIGBUS in
        # a worker at its first touch of a page and restarts for ever.
        shm.check_space(self.workers * (in_size + out_size) + sym_size + 65536,
                        f"{self.workers} worker(s) (each a {per})")
        for i in range(self.workers):
            self.rings.append(Ring.create(f"{self.name}.in{i}", self.ring_capacity,
                                          full_policy=self.full_policy,
                                          wait_timeout_us=self.wait_timeout_us))
            shm.reserve(self.rings[-1].name, in_size)
            if self.output:
                self.outputs.append(Ring.create(f"{self.name}.out{i}", self.output_capacity,
                                                full_policy=self.output_policy,
                                                wait_timeout_us=self.wait_timeout_us))
                shm.reserve(self.outputs[-1].name, out_size)
        rows = W0 + self.workers
        self._state_seg = shm.Segment.create(f"{self.name}.state", rows * COLS * 8)
        assert self._state_seg.buf is not None
        self._state = np.ndarray((rows, COLS), np.int64, self._state_seg.buf)
        self._bell = Doorbell(self._state_seg.buf, BELL_OFFSET)
        _, size = symbol_layout(self.symbol_capacity, self.small_capacity)
        self._sym_seg = shm.Segment.create(f"{self.name}.symbols", size)
        assert self._sym_seg.buf is not None
        # Format the tables here, before any worker lays a table over the same memory.
        self._tables = tables_in(self._sym_seg.buf, self.symbol_capacity, self.small_capacity)
        if self.output:
            self._reader = OutputReader(self.outputs, self._bell, self._dtypes, tables=self)
        for i in range(self.workers):
            self._specs.append(WorkerSpec(
                index=i, ring_name=self.rings[i].name,
                output_name=self.outputs[i].name if self.output else None,
                state_name=self._state_seg.name, symbols_name=self._sym_seg.name,
                symbol_capacity=self.symbol_capacity, small_capacity=self.small_capacity,
                batch_size=self.batch_size, busy_poll=self.busy_poll, handler=self.handler,
                parent_pid=os.getpid(), fault=self._fault, capture_dir=self.capture_dir,
                on_handler_error=self.on_handler_error))

    def _spawner(self, i: int) -> Any:
        def spawn() -> Any:
            assert self._state is not None
            if self._state[W0 + i, F_STATE] != 0:
                self._state[W0 + i, F_RESTARTS] += 1  # a life after the first
            # a log pipe of its own for each start (see fastfeed.logs)
            cfg = self._log.config() if self._log is not None else None
            try:
                p = self._ctx.Process(target=worker_main,
                                      args=(dataclasses.replace(self._specs[i], log=cfg),),
                                      name=f"fastfeed-{self.name}-w{i}", daemon=True)
                p.start()
            except BaseException:
                if cfg is not None:
                    self._log.discard(cfg)
                raise
            if cfg is not None:
                cfg.started()
            self._state[W0 + i, F_STATE] = S_RUNNING
            if self.cpus is not None:
                set_affinity(p.pid, self.cpus, "worker_cpus")
            return p
        return spawn

    def _exit_handler(self, i: int) -> Any:
        def on_exit(p: Any) -> bool:
            assert self._state is not None
            self._state[W0 + i, F_STATE] = S_EXITED
            self._note_death(i)
            again = self.restart and not self._stopping
            if again:
                code = p.exitcode
                how = (f"killed by signal {-code}" if code is not None and code < 0
                       else f"exit code {code}")
                log.warning("worker %d died (%s); starting it again (restart %d)", i, how,
                            int(self._state[W0 + i, F_RESTARTS]) + 1)
            return again
        return on_exit

    def _note_death(self, i: int) -> None:
        """Count deaths in a row at the same stream position (see POISON_DEATHS)."""
        assert self._state is not None
        row = self._state[W0 + i]
        done = int(row[F_DONE_SEQ])
        if int(row[F_CRASHES]) and int(row[F_CRASH_SEQ]) == done:
            row[F_CRASHES] += 1
        else:
            row[F_CRASH_SEQ] = done
            row[F_CRASHES] = 1
        row[F_CRASH_END] = max(int(row[F_PENDING_END]), done + 1)

    def stop(self, *, drain: bool = True, timeout: float = 30.0) -> bool:
        """Stop the workers. With ``drain`` each first handles everything already in its ring
        (stop the producer before calling this). Workers still running after ``timeout``
        seconds are killed. Returns True if every worker exited on its own."""
        if not self._started or self._stopping:
            return True
        if self._inline is not None:
            if drain:
                while self._inline.read(0.0) is not None:
                    pass
            self._stopping = True
            self._inline.close()
            return True
        self._stopping = True
        if self._own_supervisor:
            self._sup.hold()
        if self._state is None:
            return True  # start() failed before any worker existed (no room in /dev/shm)
        self._state[0, G_STOP] = 1 if drain else 2
        for r in self.rings:
            r.wake()
        deadline = time.monotonic() + timeout
        clean = True
        # Enough lives for a poison frame to be found and set aside while draining.
        lives = POISON_DEATHS + 1
        for i, slot in enumerate(self._slots):
            for attempt in range(lives + 1):
                p = self._sup.proc(slot)
                if p is None:
                    # Dead and awaiting its restart: its ring may still hold frames.
                    if not (drain and self.restart and attempt < lives):
                        break
                    p = self._sup.restart_now(slot)
                p.join(max(0.0, deadline - time.monotonic()))
                if p.is_alive():
                    clean = False
                    if self.outputs:
                        # It may be blocked on a full output ring nobody reads: release it
                        # (its remaining output is dropped and counted), then let it go.
                        self.outputs[i].shutdown()
                        p.join(1)
                    if p.is_alive():
                        p.kill()  # it ignores SIGTERM: the stop flag is how it is asked
                        p.join(5)
                    self._sup.forget(slot)
                    break
                self._sup.forget(slot)
                if p.exitcode == 0:
                    break
                # It died during the stop (a kill that landed just before it, a crash):
                # its ring may still hold frames, so a fresh worker drains them.
                self._note_death(i)
                if not (drain and self.restart and attempt < lives):
                    clean = False
                    break
        return clean

    def close(self) -> None:
        """Stop the workers if needed (without draining) and remove every segment."""
        if self._closed:
            return
        atexit.unregister(self._close_at_exit)
        if self._started and not self._stopping:
            self.stop(drain=False)
        self._closed = True
        if self._own_supervisor:
            self._sup.close()
        if self._inline is not None:
            self._inline.close()
            self._inline = None
        self._tables = []
        self._state = None
        self._bell = None
        self._reader = None
        for r in self.rings + self.outputs:
            r.close()
            r.unlink()
        for seg in (self._state_seg, self._sym_seg):
            if seg is not None:
                seg.close()
                seg.unlink()

    def __enter__(self) -> WorkerPool:
        if not self._started:
            self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self.stop(drain=exc_type is None)
        finally:
            self.close()

    # -- signals ------------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        """Make SIGINT and SIGTERM request a stop (see :meth:`wait`); main thread only."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stop_requested.set()

    def request_stop(self) -> None:
        """Ask :meth:`wait` to return (thread- and signal-safe)."""
        self._stop_requested.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a stop is requested (signal or request_stop) or ``timeout`` seconds
        pass; True if it was requested."""
        return self._stop_requested.wait(timeout)

    # -- producer helpers --------------------------------------------------------------------

    @property
    def ring_names(self) -> list[str]:
        """Names of the input rings, for the producer's ``Ring.attach``."""
        return [r.name for r in self.rings]

    def ring_for(self, route: int) -> int:
        """Index of the ring that carries ``route`` (a symbol's routing key): each route always
        goes to the same worker, so per-symbol order is kept."""
        return route % self.workers

    @property
    def symbols(self) -> Any:
        """The shared symbol table (ids are the same in every worker)."""
        return self._tables[0] if self._tables else None

    @property
    def statuses(self) -> Any:
        return self._tables[1] if self._tables else None

    @property
    def bar_types(self) -> Any:
        return self._tables[2] if self._tables else None

    # -- output ------------------------------------------------------------------------------

    def _output(self) -> OutputReader:
        if not self.output:
            raise RuntimeError("pool was created with output=False")
        if self._reader is None:
            raise RuntimeError("the pool is not running")
        return self._reader

    def read_output(self, worker: int, timeout: float | None = 0.0,
                    max_records: int = 1024) -> Batch | None:
        """Decoded rows published by ``worker`` since the last call, or None if none arrived
        within ``timeout`` seconds. Every row is seen once, across worker restarts."""
        return self._output().read(worker, timeout, max_records)

    def take_output(self) -> Batch | None:
        """The next ready output of any worker (in turn), or None."""
        return self._output().take()

    def wait_output(self, timeout: float | None = None) -> bool:
        """Sleep until any worker's output ring has records (True) or ``timeout`` seconds
        pass (False)."""
        return self._output().wait(timeout)

    def read_inline(self, timeout: float | None = 0.0, *, busy_poll: bool | None = None
                    ) -> Batch | None:
        """Inline pools only: decode what is in ring 0 in this process and return it as a
        :class:`fastfeed.Batch` (rows owned by the batch), or None if nothing arrived within
        ``timeout`` seconds. Runs the handler, if any, on the batch first."""
        if self._inline is None:
            raise RuntimeError("read_inline needs a started pool made with inline=True")
        return self._inline.read(timeout, busy_poll)

    def idle(self) -> bool:
        """True when every input ring is empty (all of it handled: a worker releases ring
        space only after publishing) and every output ring has been read."""
        if any(r.used for r in self.rings):
            return False
        return not self.output or self._reader is None or self._reader.empty()

    def frames_handled(self) -> int:
        """Frames the workers are done with: decoded (rows or an error) or set aside as
        poisoned. Read straight from the state segment: cheap enough for every poll."""
        if self._state is None:
            return 0
        rows = self._state[W0:W0 + self.workers]
        return int(rows[:, F_FRAMES].sum() + rows[:, F_POISONED].sum())

    def handler_failed(self) -> bool:
        """True once a handler raised under on_handler_error="raise"."""
        return self._state is not None and bool(self._state[0, G_HANDLER_FAILED])

    # -- introspection ------------------------------------------------------------------------

    def stats(self) -> list[WorkerStats]:
        """Counters of every worker."""
        if self._state is None:
            return []
        out = []
        for i in range(self.workers):
            r = self._state[W0 + i]
            if self.inline:
                running = int(r[F_STATE]) == S_RUNNING
            else:
                p = self._sup.proc(self._slots[i]) if i < len(self._slots) else None
                running = bool(p is not None and p.is_alive())
            out.append(WorkerStats.from_row(i, r, running))
        return out

    def pids(self) -> list[int | None]:
        """Current worker pids (None for a worker that is not running)."""
        out: list[int | None] = []
        for i in range(self.workers):
            p = self._sup.proc(self._slots[i]) if i < len(self._slots) else None
            out.append(p.pid if p is not None else None)
        return out

    def __repr__(self) -> str:
        return f"<WorkerPool {self.name!r} workers={self.workers} started={self._started}>"
