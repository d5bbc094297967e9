"""The worker pool: N spawned decoder processes, each consuming one shared-memory ring.

::

    producer (network process) ──► ring i ──► worker i: Decoder.decode_region(ring memory)
                                                  ├─► handler(worker, batch) in the worker
                                                  └─► output ring i ──► parent: read_output(i)

The parent creates every segment (input rings, output rings, the symbol tables, a small state
segment), spawns the workers and supervises them: a worker that dies is started again, attaches
to the same ring and resumes at the consumer position kept in the ring. The position only moves
after a batch is fully handled (decoded, handler run, output published), so nothing committed
is lost; a per-worker watermark in the state segment makes sure nothing is decoded or output
twice either (see :func:`_process_batch`). ``stop()`` drains the rings before the workers exit,
and :meth:`WorkerPool.install_signal_handlers` makes SIGINT/SIGTERM do that.

Symbol ids are the same in every worker: the three tables (symbols, statuses, bar types) live in
one shared segment that the parent formats before any worker starts.
"""

from __future__ import annotations

import gc
import itertools
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType, TracebackType
from typing import Any

import numpy as np

from fastfeed import shm
from fastfeed._ring import Doorbell, Ring

__all__ = [
    "OUTPUT_BARS",
    "OUTPUT_QUOTES",
    "OUTPUT_TICKS",
    "OutputBatch",
    "WorkerPool",
    "WorkerStats",
]

Handler = Callable[[int, Any], None]
"""``handler(worker_index, batch)``, run inside the worker for every decoded batch (a
``fastfeed.Batch`` with ``ticks``, ``quotes``, ``bars``, ``errors``, ``control``). It must be
picklable (a module-level function or a ``functools.partial`` of one): workers are spawned."""

# Output record types (the ring record's `type`); the route field carries the worker index.
OUTPUT_TICKS = 1
OUTPUT_QUOTES = 2
OUTPUT_BARS = 3
_KIND_NAMES = {OUTPUT_TICKS: "ticks", OUTPUT_QUOTES: "quotes", OUTPUT_BARS: "bars"}
# Output payload header: first input seq, end input seq (exclusive), chunk index, chunk count,
# reserved. 32 bytes keep the rows behind it 8-byte aligned, as the ring's records are.
_OUT_HDR = struct.Struct("<QQIIQ")

# State segment: one 256-byte row (32 int64) per worker after a global row and the output
# doorbell's row, so workers never write to the same cache line.
_COLS = 32
G_STOP = 0  # 0 run, 1 drain then exit, 2 exit after the current batch
_BELL_OFFSET = _COLS * 8  # row 1: the doorbell workers ring after publishing output
_W0 = 2  # row of worker 0
F_PID = 0
F_RESTARTS = 1
F_STATE = 2
F_BATCHES = 3
F_FRAMES = 4
F_TICKS = 5
F_QUOTES = 6
F_BARS = 7
F_ERRORS = 8
F_CONTROL = 9
F_HANDLER_ERRORS = 10
F_DONE_SEQ = 11  # every input record with seq < this is fully handled
F_PENDING_END = 12  # end seq of the batch being published (> DONE only mid-publish)
F_HEARTBEAT = 13  # CLOCK_MONOTONIC ns of the worker's last loop
F_SKIPPED = 14  # records skipped after a restart because they had been handled
F_OUT_DROPPED = 15  # output records the output ring dropped (its policy)
# Poison frames: a frame that kills the worker every time (a crash in a handler's C code,
# say) would otherwise make it restart forever while its ring fills up.
F_CRASH_SEQ = 16  # DONE_SEQ when the worker last died
F_CRASHES = 17  # deaths in a row at that DONE_SEQ (the worker zeroes it once past it)
F_POISONED = 18  # frames set aside because they killed the worker POISON_DEATHS times
F_PUB_END = 19  # end seq of the range whose output publishing began (== PENDING_END: begun)
F_CRASH_END = 20  # end seq of the range being handled at that death: isolate up to here
POISON_DEATHS = 3
S_IDLE, S_RUNNING, S_EXITED = 0, 1, 2

_pool_ids = itertools.count()


@dataclass(frozen=True)
class _WorkerSpec:
    """Everything a spawned worker needs; pickled to the child."""

    index: int
    ring_name: str
    output_name: str | None
    state_name: str
    symbols_name: str
    symbol_capacity: int
    small_capacity: int
    batch_size: int
    busy_poll: bool
    handler: Handler | None
    parent_pid: int
    # Directory for a raw capture (fastfeed.capture): each worker appends its frames.
    capture_dir: str | None = None
    # Tests only: (point, marker path). The first worker to reach `point` ("after_publish":
    # output published, watermark not stored; "before_release": watermark stored, ring
    # position not released) while the marker does not exist creates it and SIGKILLs itself.
    fault: tuple[str, str] | None = None


@dataclass(frozen=True)
class WorkerStats:
    """One worker's counters (from the shared state segment)."""

    index: int
    pid: int
    restarts: int
    running: bool
    batches: int
    frames: int
    ticks: int
    quotes: int
    bars: int
    errors: int
    control: int
    handler_errors: int
    done_seq: int
    skipped: int
    output_dropped: int
    poisoned: int


def _symbol_layout(symbol_capacity: int, small_capacity: int) -> tuple[list[tuple[int, int]], int]:
    """(offset, capacity) of the symbols, statuses and bar-types tables in one segment."""
    from fastfeed._decoder import SymbolTable

    layout, off = [], 0
    for cap in (symbol_capacity, small_capacity, small_capacity):
        layout.append((off, cap))
        off += (SymbolTable.nbytes(cap) + 127) // 128 * 128
    return layout, off


def _tables(buf: memoryview, symbol_capacity: int, small_capacity: int) -> list[Any]:
    from fastfeed._decoder import SymbolTable

    layout, _ = _symbol_layout(symbol_capacity, small_capacity)
    return [
        SymbolTable(buf[off : off + SymbolTable.nbytes(cap)], capacity=cap) for off, cap in layout
    ]


# -------------------------------------------------------------------------------------------
# worker side


class _Stop:
    requested = False


def _worker_main(spec: _WorkerSpec) -> None:
    """Entry point of a worker process."""
    from fastfeed._decoder import Decoder

    stop = _Stop()
    # Ctrl-C reaches the whole process group: the parent coordinates the shutdown, so the
    # worker ignores SIGINT instead of dying mid-batch. SIGTERM means "drain, then exit".
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def on_term(signum: int, frame: FrameType | None) -> None:
        stop.requested = True

    signal.signal(signal.SIGTERM, on_term)

    state_seg = shm.Segment.attach(spec.state_name)
    sym_seg = shm.Segment.attach(spec.symbols_name)
    ring = Ring.attach(spec.ring_name, busy_poll=spec.busy_poll)
    out = Ring.attach(spec.output_name) if spec.output_name else None
    assert state_seg.buf is not None and sym_seg.buf is not None
    # int64 cells as a memoryview: reading and bumping one gives a Python int, several times
    # cheaper than a NumPy scalar, and the worker does it a dozen times per batch.
    cells = state_seg.buf.cast("q")
    row = _row_cells(cells, spec.index)
    bell = Doorbell(state_seg.buf, _BELL_OFFSET)
    tables = _tables(sym_seg.buf, spec.symbol_capacity, spec.small_capacity)
    dec = Decoder(symbols=tables[0], statuses=tables[1], bar_types=tables[2])
    capture = None
    if spec.capture_dir is not None:
        from fastfeed.capture import CaptureWriter

        capture = CaptureWriter(os.path.join(spec.capture_dir, f"capture-w{spec.index}.ffcap"),
                                spec.index)
    row[F_PID] = os.getpid()
    row[F_STATE] = S_RUNNING
    gc.freeze()  # keep the collector's full passes short: they pause decoding
    # After two deaths at the same place, take one frame at a time until past it, so that
    # the frame that kills the worker is found; at the third death it is set aside. Only
    # when the range being handled had published nothing: otherwise it must be handled
    # again exactly as before (see _process_batch), and the death was not in decoding.
    isolate = (int(row[F_CRASHES]) >= POISON_DEATHS - 1
               and int(row[F_PUB_END]) < int(row[F_PENDING_END]))
    try:
        while True:
            row[F_HEARTBEAT] = time.monotonic_ns()
            flag = cells[G_STOP]
            stopping = stop.requested or flag != 0
            if flag == 2:
                break
            # While stopping, poll without waiting: an empty ring means drained.
            batch = ring.read_batch(1 if isolate else spec.batch_size,
                                    timeout=0 if stopping else 0.05)
            if batch is None:
                if stopping:
                    break
                if os.getppid() != spec.parent_pid:
                    break  # orphaned: the parent died; its segments are cleaned at next start
                continue
            if isolate and _set_aside(spec, batch, row):
                batch.release()
                continue
            _process_batch(spec, batch, dec, row, out, bell, capture)
            if row[F_CRASHES] and row[F_DONE_SEQ] > row[F_CRASH_SEQ]:
                row[F_CRASHES] = 0  # past the place it died at
            if isolate and row[F_DONE_SEQ] >= row[F_CRASH_END]:
                isolate = False  # past the whole range it died in
            if spec.fault is not None and spec.fault[0] == "before_release":
                _maybe_crash(spec.fault[1])
            batch.release()
    finally:
        if capture is not None:
            capture.close()
        row[F_STATE] = S_EXITED
        row.release()
        cells.release()
        del dec, tables, bell
        if out is not None:
            out.close()
        ring.close()
        sym_seg.close()
        state_seg.close()


def _row_cells(cells: memoryview, worker: int) -> memoryview:
    """Worker ``worker``'s row of the state segment, as int64 cells."""
    return cells[(_W0 + worker) * _COLS : (_W0 + worker + 1) * _COLS]


def _set_aside(spec: _WorkerSpec, batch: Any, row: Any) -> bool:
    """In isolation (one frame per batch): if this is the frame the worker died at
    POISON_DEATHS times, count it, report it on stderr and mark it handled. True if so."""
    seq = int(batch.seqs[0])
    if int(row[F_CRASHES]) < POISON_DEATHS or seq != int(row[F_CRASH_SEQ]):
        return False
    off, n = int(batch.offsets[0]), int(batch.lengths[0])
    head = bytes(batch.buffer[off : off + min(n, 120)])
    print(f"fastfeed worker {spec.index}: frame seq {seq} ({n} bytes) killed the worker "
          f"{int(row[F_CRASHES])} times; set aside, counted as poisoned: {head!r}",
          file=sys.stderr, flush=True)
    row[F_POISONED] += 1
    row[F_PENDING_END] = seq + 1
    row[F_PUB_END] = seq + 1
    row[F_DONE_SEQ] = seq + 1
    row[F_CRASHES] = 0
    return True


def _process_batch(spec: _WorkerSpec, batch: Any, dec: Any, row: Any, out: Ring | None,
                   bell: Doorbell | None = None, capture: Any = None) -> None:
    """Decode one ring batch, run the handler, publish the output; advance the watermark.

    Exactly-once bookkeeping across a SIGKILL at any instruction:
    - records with seq < row[F_DONE_SEQ] were fully handled by a previous life: skipped;
    - row[F_PENDING_END] is stored before an output is published and F_DONE_SEQ after, so if a
      previous life died in between, this life handles exactly the same range [done,
      pending_end) first: its output is identical (same records, same shared symbol ids, same
      chunking) and the parent drops the parts it already has (see WorkerPool.read_output).
    The ring's consumer position is released by the caller only after this returns.
    """
    seqs = batch.seqs
    n = len(seqs)
    done = int(row[F_DONE_SEQ])
    # Searches only after a restart: normally the batch starts where the last one ended.
    start = 0 if int(seqs[0]) >= done else int(np.searchsorted(seqs, np.uint64(done)))
    row[F_SKIPPED] += start
    while start < n:
        pending = int(row[F_PENDING_END])
        stop = int(np.searchsorted(seqs, np.uint64(pending))) if pending > done else n
        if stop <= start:
            stop = n
        end_seq = int(seqs[stop - 1]) + 1
        first_seq = int(seqs[start])
        row[F_PENDING_END] = end_seq
        e0, c0 = dec.errors_total, dec.control_total
        if start == 0:
            res = dec.decode_region(batch.buffer, batch.offsets, batch.lengths, batch.recv_ts,
                                    stop)
        else:
            res = dec.decode_region(
                batch.buffer, batch.offsets[start:stop], batch.lengths[start:stop],
                batch.recv_ts[start:stop])
        if capture is not None:
            capture.write_batch(batch, start, stop)
        if spec.handler is not None:
            try:
                spec.handler(spec.index, res)
            except Exception:
                # A failing handler must not kill the worker: the restarted worker would get
                # the same batch and fail again forever. Count it and keep going.
                row[F_HANDLER_ERRORS] += 1
                traceback.print_exc(file=sys.stderr)
        if out is not None:
            row[F_PUB_END] = end_seq  # from here on, this range must be repeated identically
            _publish(out, spec.index, first_seq, end_seq, res, row)
            if bell is not None:
                bell.ring()  # wake the parent if it sleeps in wait_output()
        if spec.fault is not None and spec.fault[0] == "after_publish":
            _maybe_crash(spec.fault[1])
        row[F_BATCHES] += 1
        row[F_FRAMES] += stop - start
        row[F_TICKS] += len(res.ticks)
        row[F_QUOTES] += len(res.quotes)
        row[F_BARS] += len(res.bars)
        row[F_ERRORS] += dec.errors_total - e0  # len(res.errors) would make a list
        row[F_CONTROL] += dec.control_total - c0
        row[F_DONE_SEQ] = end_seq
        done = end_seq
        start = stop


def _maybe_crash(marker: str) -> None:
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


def _publish(out: Ring, worker: int, first: int, end: int, res: Any, row: Any) -> None:
    """Write each non-empty array of a decoded batch to the output ring, chunked to fit."""
    room = out.max_payload - _OUT_HDR.size
    for kind, arr in ((OUTPUT_TICKS, res.ticks), (OUTPUT_QUOTES, res.quotes), (OUTPUT_BARS, res.bars)):
        if not len(arr):
            continue
        per = max(1, room // arr.dtype.itemsize)
        nchunks = (len(arr) + per - 1) // per
        raw = memoryview(np.ascontiguousarray(arr)).cast("B")
        step = per * arr.dtype.itemsize
        for c in range(nchunks):
            body = raw[c * step : (c + 1) * step]
            payload = _OUT_HDR.pack(first, end, c, nchunks, 0) + body
            if not out.write(payload, type=kind, route=worker):
                row[F_OUT_DROPPED] += 1


def set_affinity(pid: int, cpus: set[int], what: str) -> None:
    """``os.sched_setaffinity`` with an error that names the option and the machine's CPUs."""
    try:
        os.sched_setaffinity(pid, cpus)
    except (OSError, ValueError) as e:
        have = sorted(os.sched_getaffinity(0))
        raise ValueError(f"{what}={sorted(cpus)}: cannot pin to these CPUs ({e}); "
                         f"this process may use CPUs {have}") from None


class _Inline:
    """The decoder of an inline pool: ring 0 read and decoded in the calling process.

    No exactly-once bookkeeping is needed: the reader is the process that owns the pool,
    so nothing survives it to resume. Counters go to worker 0's row of the state segment,
    so :meth:`WorkerPool.stats` reads the same either way."""

    def __init__(self, pool: WorkerPool) -> None:
        from fastfeed._decoder import Decoder

        assert pool._state_seg is not None and pool._state_seg.buf is not None
        self.ring = pool.rings[0]
        self.cells = pool._state_seg.buf.cast("q")
        self.row: Any = _row_cells(self.cells, 0)
        self.batch_size = pool.batch_size
        self.busy_poll = pool.busy_poll
        self.handler = pool.handler
        t = pool._tables
        self.dec = Decoder(symbols=t[0], statuses=t[1], bar_types=t[2])
        self.capture = None
        if pool.capture_dir is not None:
            from fastfeed.capture import CaptureWriter

            self.capture = CaptureWriter(os.path.join(pool.capture_dir, "capture-w0.ffcap"), 0)
        self.row[F_PID] = os.getpid()
        self.row[F_STATE] = S_RUNNING

    def read(self, timeout: float | None, busy_poll: bool | None = None) -> Any:
        b = self.ring.read_batch(self.batch_size, timeout,
                                 busy_poll=self.busy_poll if busy_poll is None else busy_poll)
        if b is None:
            return None
        dec = self.dec
        e0, c0 = dec.errors_total, dec.control_total
        try:
            res = dec.decode_region(b.buffer, b.offsets, b.lengths, b.recv_ts)
            if self.capture is not None:
                self.capture.write_batch(b, 0, len(b))
        finally:
            # The rows are copies: the ring space can go back to the producer at once.
            b.release()
        row = self.row
        if self.handler is not None:
            try:
                self.handler(0, res)
            except Exception:
                row[F_HANDLER_ERRORS] += 1
                traceback.print_exc(file=sys.stderr)
        row[F_BATCHES] += 1
        row[F_FRAMES] += res.frames
        row[F_TICKS] += len(res.ticks)
        row[F_QUOTES] += len(res.quotes)
        row[F_BARS] += len(res.bars)
        row[F_ERRORS] += dec.errors_total - e0  # len(res.errors) would make a list
        row[F_CONTROL] += dec.control_total - c0
        return res

    def close(self) -> None:
        if self.capture is not None:
            self.capture.close()
            self.capture = None
        if self.row is not None:
            self.row[F_STATE] = S_EXITED
            self.row.release()  # the segment cannot be closed while a view of it is out
            self.cells.release()
            self.row = None


# -------------------------------------------------------------------------------------------
# parent side


class OutputBatch:
    """Decoded rows from one worker's output ring, as zero-copy NumPy views into the ring.

    ``parts`` is a list of ``(kind, array)`` with kind "ticks", "quotes" or "bars"; ``ticks``,
    ``quotes`` and ``bars`` concatenate the parts of one kind (a copy only when there are
    several). Valid until :meth:`release`, which lets the worker reuse the space.
    """

    def __init__(self, worker: int, parts: list[tuple[str, np.ndarray]], ring_batch: Any,
                 dtypes: dict[str, np.dtype]) -> None:
        self.worker = worker
        self.parts = parts
        self._batch = ring_batch
        self._dtypes = dtypes

    def _kind(self, kind: str) -> np.ndarray:
        arrays = [a for k, a in self.parts if k == kind]
        if len(arrays) == 1:
            return arrays[0]
        if not arrays:
            return np.empty(0, self._dtypes[kind])
        return np.concatenate(arrays)

    @property
    def ticks(self) -> np.ndarray:
        return self._kind("ticks")

    @property
    def quotes(self) -> np.ndarray:
        return self._kind("quotes")

    @property
    def bars(self) -> np.ndarray:
        return self._kind("bars")

    def release(self) -> None:
        """Give the space back to the worker. The arrays must not be used afterwards."""
        self.parts = []
        self._batch.release()

    def __enter__(self) -> OutputBatch:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def __repr__(self) -> str:
        counts = {k: sum(len(a) for kk, a in self.parts if kk == k) for k in _KIND_NAMES.values()}
        return f"<OutputBatch worker={self.worker} {counts}>"


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
        full_policy: str = "wait",
        wait_timeout_us: int = 5000,
        output_capacity: int = 1 << 24,
        output_policy: str = "wait",
        batch_size: int = 4096,
        busy_poll: bool = False,
        restart: bool = True,
        symbol_capacity: int = 65536,
        name: str | None = None,
        capture_dir: str | None = None,
        inline: bool = False,
        cpus: set[int] | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
        if inline and workers != 1:
            raise ValueError("an inline pool has exactly one ring (workers=1)")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if handler is not None and not callable(handler):
            raise ValueError("handler must be callable")
        self.workers = workers
        self.handler = handler
        self.output = output and not inline  # inline, read_inline hands the rows over
        self.ring_capacity = ring_capacity
        self.full_policy = full_policy
        self.wait_timeout_us = wait_timeout_us
        self.output_capacity = output_capacity
        self.output_policy = output_policy
        self.batch_size = batch_size
        self.busy_poll = busy_poll
        self.restart = restart
        self.symbol_capacity = symbol_capacity
        self.capture_dir = capture_dir
        self.inline = inline
        self.cpus = set(cpus) if cpus is not None else None
        self._inline: _Inline | None = None
        self.small_capacity = 1024  # statuses and bar types: a handful of distinct codes
        self.name = name or f"pool{next(_pool_ids)}"
        self.rings: list[Ring] = []
        self.outputs: list[Ring] = []
        self._state_seg: shm.Segment | None = None
        self._sym_seg: shm.Segment | None = None
        self._state: np.ndarray | None = None
        self._tables: list[Any] = []
        self._procs: list[Any] = []
        self._started_at: list[float] = []
        self._failures: list[int] = []
        self._specs: list[_WorkerSpec] = []
        self._lock = threading.RLock()
        self._stopping = False
        self._started = False
        self._closed = False
        self._supervisor: threading.Thread | None = None
        self._stop_requested = threading.Event()
        self._seen: list[tuple[int, int, int]] = []
        self._bell: Doorbell | None = None
        self._fault: tuple[str, str] | None = None  # tests only, see _WorkerSpec.fault
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
                self._inline = _Inline(self)
                return self
            for i in range(self.workers):
                self._spawn(i)
        except BaseException:
            self.close()
            raise
        self._supervisor = threading.Thread(target=self._supervise, name=f"{self.name}-supervisor",
                                            daemon=True)
        self._supervisor.start()
        return self

    def _create_segments(self) -> None:
        from fastfeed._decoder import BAR_DTYPE, QUOTE_DTYPE, TICK_DTYPE

        self._dtypes = {"ticks": TICK_DTYPE, "quotes": QUOTE_DTYPE, "bars": BAR_DTYPE}
        for i in range(self.workers):
            self.rings.append(Ring.create(f"{self.name}.in{i}", self.ring_capacity,
                                          full_policy=self.full_policy,
                                          wait_timeout_us=self.wait_timeout_us))
            if self.output:
                self.outputs.append(Ring.create(f"{self.name}.out{i}", self.output_capacity,
                                                full_policy=self.output_policy,
                                                wait_timeout_us=self.wait_timeout_us))
        rows = _W0 + self.workers
        self._state_seg = shm.Segment.create(f"{self.name}.state", rows * _COLS * 8)
        assert self._state_seg.buf is not None
        self._state = np.ndarray((rows, _COLS), np.int64, self._state_seg.buf)
        self._bell = Doorbell(self._state_seg.buf, _BELL_OFFSET)
        _, size = _symbol_layout(self.symbol_capacity, self.small_capacity)
        self._sym_seg = shm.Segment.create(f"{self.name}.symbols", size)
        assert self._sym_seg.buf is not None
        # Format the tables here, before any worker lays a table over the same memory.
        self._tables = _tables(self._sym_seg.buf, self.symbol_capacity, self.small_capacity)
        self._seen = [(0, 0, -1)] * self.workers
        for i in range(self.workers):
            self._specs.append(_WorkerSpec(
                index=i, ring_name=self.rings[i].name,
                output_name=self.outputs[i].name if self.output else None,
                state_name=self._state_seg.name, symbols_name=self._sym_seg.name,
                symbol_capacity=self.symbol_capacity, small_capacity=self.small_capacity,
                batch_size=self.batch_size, busy_poll=self.busy_poll, handler=self.handler,
                parent_pid=os.getpid(), fault=self._fault, capture_dir=self.capture_dir))
            self._procs.append(None)
            self._started_at.append(0.0)
            self._failures.append(0)

    def _spawn(self, i: int) -> None:
        p = self._ctx.Process(target=_worker_main, args=(self._specs[i],),
                              name=f"fastfeed-{self.name}-w{i}", daemon=True)
        p.start()
        self._procs[i] = p
        self._started_at[i] = time.monotonic()
        if self.cpus is not None:
            set_affinity(p.pid, self.cpus, "worker_cpus")

    def _supervise(self) -> None:
        """Restart workers that die while the pool runs. A worker that keeps dying right after
        it starts (a broken handler import, say) is restarted with an exponential back-off
        instead of in a tight loop."""
        due: dict[int, float] = {}  # worker -> time of its next start
        while not self._closed:
            with self._lock:
                if self._stopping:
                    return
                live = {p.sentinel: i for i, p in enumerate(self._procs) if p is not None}
            ready = mp.connection.wait(list(live), timeout=0.05 if due else 0.2) if live else []
            if not live:
                time.sleep(0.05)
            with self._lock:
                if self._stopping or self._closed:
                    return
                now = time.monotonic()
                for s in ready:
                    i = live[s]
                    p = self._procs[i]
                    p.join()
                    self._procs[i] = None
                    assert self._state is not None
                    self._state[_W0 + i, F_STATE] = S_EXITED
                    self._note_death(i)
                    if not self.restart:
                        continue
                    quick = now - self._started_at[i] < 1.0
                    self._failures[i] = self._failures[i] + 1 if quick else 0
                    delay = min(5.0, 0.05 * 2 ** self._failures[i]) if self._failures[i] else 0.0
                    due[i] = now + delay
                for i, t in list(due.items()):
                    if t <= now:
                        del due[i]
                        assert self._state is not None
                        self._state[_W0 + i, F_RESTARTS] += 1
                        self._spawn(i)

    def _note_death(self, i: int) -> None:
        """Count deaths in a row at the same stream position (see POISON_DEATHS)."""
        assert self._state is not None
        row = self._state[_W0 + i]
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
        seconds are terminated, then killed. Returns True if every worker exited on its own."""
        if not self._started or self._stopping:
            return True
        if self._inline is not None:
            if drain:
                while self._inline.read(0.0) is not None:
                    pass
            self._stopping = True
            self._inline.close()
            return True
        with self._lock:
            self._stopping = True
            assert self._state is not None
            self._state[0, G_STOP] = 1 if drain else 2
        for r in self.rings:
            r.wake()
        if self._supervisor is not None:
            self._supervisor.join()
        for i, p in enumerate(self._procs):
            if p is not None and not p.is_alive() and p.exitcode != 0:
                # Killed before the supervisor noticed (exit code 0 is a worker that already
                # drained in answer to the stop flag).
                p.join()
                self._procs[i] = None
                self._note_death(i)
        if drain and self.restart:
            # A worker that died and awaits its restart still has frames in its ring: start it
            # now; it sees the stop flag and drains.
            for i, p in enumerate(self._procs):
                if p is None:
                    assert self._state is not None
                    self._state[_W0 + i, F_RESTARTS] += 1
                    self._spawn(i)
        deadline = time.monotonic() + timeout
        clean = True
        # Enough lives for a poison frame to be found and set aside while draining.
        lives = POISON_DEATHS + 1
        for i in range(len(self._procs)):
            for attempt in range(lives + 1):
                p = self._procs[i]
                if p is None:
                    break
                p.join(max(0.0, deadline - time.monotonic()))
                if p.is_alive():
                    clean = False
                    if self.outputs:
                        # It may be blocked on a full output ring nobody reads: release it
                        # (its remaining output is dropped and counted), then let it go.
                        self.outputs[i].shutdown()
                        p.join(1)
                    p.terminate()
                    p.join(5)
                    if p.is_alive():
                        p.kill()
                        p.join()
                    break
                if p.exitcode == 0:
                    break
                # It died during the stop (a kill that landed just before it, a crash):
                # its ring may still hold frames, so a fresh worker drains them.
                self._note_death(i)
                if drain and self.restart and attempt < lives:
                    assert self._state is not None
                    self._state[_W0 + i, F_RESTARTS] += 1
                    self._spawn(i)
                    continue
                clean = False
                break
        return clean

    def close(self) -> None:
        """Stop the workers if needed (without draining) and remove every segment."""
        if self._closed:
            return
        if self._started and not self._stopping:
            self.stop(drain=False)
        self._closed = True
        if self._inline is not None:
            self._inline.close()
            self._inline = None
        self._tables = []
        self._state = None
        self._bell = None
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
        """Block until a stop is requested (signal or request_stop); True if it was."""
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

    def read_output(self, worker: int, timeout: float | None = 0.0,
                    max_records: int = 1024) -> OutputBatch | None:
        """Decoded rows published by ``worker`` since the last call, or None if none arrived
        within ``timeout`` seconds (None: wait). Parts a restarted worker published a second
        time are dropped here, so every row is seen once."""
        if not self.output:
            raise RuntimeError("pool was created with output=False")
        ring = self.outputs[worker]
        b = ring.read_batch(max_records, timeout)
        if b is None:
            return None
        parts: list[tuple[str, np.ndarray]] = []
        buf = b.buffer
        seen = self._seen[worker]
        for off, length, kind in zip(b.offsets.tolist(), b.lengths.tolist(), b.types.tolist(),
                                     strict=True):
            first, end, chunk, nchunks, _ = _OUT_HDR.unpack_from(buf, off)
            key = (end, kind, chunk)
            if key <= seen:
                continue  # already delivered before the worker restarted
            seen = key
            name = _KIND_NAMES[kind]
            dt = self._dtypes[name]
            count = (length - _OUT_HDR.size) // dt.itemsize
            parts.append((name, np.frombuffer(buf, dt, count, off + _OUT_HDR.size)))
        self._seen[worker] = seen
        return OutputBatch(worker, parts, b, self._dtypes)

    def read_inline(self, timeout: float | None = 0.0, *, busy_poll: bool | None = None) -> Any:
        """Inline pools only: decode what is in ring 0 in this process and return it as a
        :class:`fastfeed.Batch` (rows owned by the batch), or None if nothing arrived within
        ``timeout`` seconds (None: wait). Runs the handler, if any, on the batch first."""
        if self._inline is None:
            raise RuntimeError("read_inline needs a started pool made with inline=True")
        return self._inline.read(timeout, busy_poll)

    def wait_output(self, timeout: float | None = None) -> bool:
        """Sleep until any worker's output ring has records (True) or ``timeout`` seconds pass
        (False; None waits indefinitely). One futex for all workers: the workers ring the
        pool's doorbell after publishing, so the parent neither polls nor waits on one ring
        while another fills."""
        if not self.output:
            raise RuntimeError("pool was created with output=False")
        bell = self._bell
        assert bell is not None
        deadline = None if timeout is None else time.monotonic() + timeout

        def ready() -> bool:
            return any(o.used for o in self.outputs)

        while not ready():
            token = bell.prepare()
            if ready():
                bell.cancel()
                break
            if deadline is None:
                bell.wait(token, None)
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                bell.cancel()
                return False
            bell.wait(token, min(left, 0.05))
        return True

    # -- introspection ------------------------------------------------------------------------

    def stats(self) -> list[WorkerStats]:
        """Counters of every worker."""
        if self._state is None:
            return []
        out = []
        for i in range(self.workers):
            r = self._state[_W0 + i]
            p = self._procs[i]
            running = (int(r[F_STATE]) == S_RUNNING if self.inline
                       else bool(p is not None and p.is_alive()))
            out.append(WorkerStats(
                index=i, pid=int(r[F_PID]), restarts=int(r[F_RESTARTS]),
                running=running, batches=int(r[F_BATCHES]),
                frames=int(r[F_FRAMES]), ticks=int(r[F_TICKS]), quotes=int(r[F_QUOTES]),
                bars=int(r[F_BARS]), errors=int(r[F_ERRORS]), control=int(r[F_CONTROL]),
                handler_errors=int(r[F_HANDLER_ERRORS]), done_seq=int(r[F_DONE_SEQ]),
                skipped=int(r[F_SKIPPED]), output_dropped=int(r[F_OUT_DROPPED]),
                poisoned=int(r[F_POISONED])))
        return out

    def pids(self) -> list[int | None]:
        """Current worker pids (None for a worker that is not running)."""
        with self._lock:
            return [p.pid if p is not None else None for p in self._procs]

    def __repr__(self) -> str:
        return f"<WorkerPool {self.name!r} workers={self.workers} started={self._started}>"
