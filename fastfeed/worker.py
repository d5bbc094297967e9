"""The worker loop: one decoder process per input ring, and the same loop run inline.

::

    ring i ──► worker i: Decoder.decode_region(ring memory)
                   ├─► handler(worker, batch) in the worker
                   └─► output ring i ──► the parent (fastfeed.output)

A worker takes a batch of records straight out of ring memory, decodes it, runs the handler,
publishes the rows to its output ring and only then releases the ring space. Its progress
lives in its row of the state segment (fastfeed.state), so a worker started again after a
crash resumes exactly where the last one stopped: nothing committed is lost or repeated (see
:func:`process_batch`). :class:`InlineDecoder` is the same work done in the consuming process.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fastfeed import shm
from fastfeed._ring import Doorbell, Ring
from fastfeed.batch import Batch
from fastfeed.logs import ChildLogging, configure_child_logging
from fastfeed.state import (
    BELL_OFFSET,
    F_BARS,
    F_BATCHES,
    F_CONTROL,
    F_COUNTED_END,
    F_CRASH_END,
    F_CRASH_SEQ,
    F_CRASHES,
    F_DONE_SEQ,
    F_ERRORS,
    F_FRAMES,
    F_GAPS_OWED,
    F_HANDLER_ERRORS,
    F_HEARTBEAT,
    F_OUT_DROPPED,
    F_PENDING_END,
    F_PID,
    F_POISONED,
    F_PUB_END,
    F_QUOTES,
    F_SKIPPED,
    F_STATE,
    F_SYMBOLS_FULL,
    F_TICKS,
    G_HANDLER_FAILED,
    G_STOP,
    OUT_HDR,
    OUTPUT_BARS,
    OUTPUT_EVENTS,
    OUTPUT_QUOTES,
    OUTPUT_RANGE,
    OUTPUT_TICKS,
    POISON_DEATHS,
    RANGE_HDR,
    S_EXITED,
    S_RUNNING,
    row_cells,
    tables_in,
)
from fastfeed.supervisor import exit_orphaned, ignore_stop_signals, watch_parent

__all__ = ["Handler", "InlineDecoder", "WorkerSpec", "worker_main"]

Handler = Callable[[int, Batch], None]
"""``handler(worker_index, batch)``, run inside the worker for every decoded batch (a
:class:`fastfeed.Batch`, released when the handler returns: ``copy()`` what it keeps). It must
be picklable (a module-level function or a ``functools.partial`` of one): workers are spawned."""



@dataclass(frozen=True)
class WorkerSpec:
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
    # What a handler's exception does: "log" (count, log, go on) or "raise" (stop the feed).
    on_handler_error: str = "log"
    # Where this worker's log records go (the parent's handlers), or None for its own.
    log: ChildLogging | None = None


log = logging.getLogger("fastfeed.worker")


class HandlerGuard:
    """Runs the user's handler. An exception is counted (``handler_errors``), logged once with
    its traceback and then by count (at most every ``every_s`` seconds), and under
    ``policy="raise"`` flagged to the parent, which stops the feed (the inline decoder raises
    it at once instead). It never kills the worker: a restarted worker would get the same
    batch and fail again forever."""

    def __init__(self, handler: Handler, where: str, policy: str, row: Any, cells: Any,
                 every_s: float = 10.0) -> None:
        self.handler = handler
        self.where = where
        self.policy = policy
        self.row = row
        self.cells = cells
        self.every_s = every_s
        self._next_log = 0.0
        self._logged = False

    def __call__(self, index: int, batch: Any) -> BaseException | None:
        try:
            self.handler(index, batch)
            return None
        except Exception as exc:
            self.row[F_HANDLER_ERRORS] += 1
            n = int(self.row[F_HANDLER_ERRORS])
            now = time.monotonic()
            if not self._logged:
                log.error("the handler raised in %s (logged once with its traceback; "
                          "later ones are counted in handler_errors)", self.where, exc_info=True)
                self._logged = True
                self._next_log = now + self.every_s
            elif now >= self._next_log:
                log.error("the handler raised %d times in %s (last: %s: %s)", n, self.where,
                          type(exc).__name__, exc)
                self._next_log = now + self.every_s
            if self.policy == "raise":
                self.cells[G_HANDLER_FAILED] = 1
            return exc


class _Stop:
    requested = False  # set by tests to end the loop


def worker_main(spec: WorkerSpec) -> None:
    """Entry point of a worker process."""
    from fastfeed._decoder import Decoder

    stop = _Stop()
    # Ctrl-C and `kill` of a service reach the whole process group: the parent coordinates
    # the shutdown (it drains the rings through the stop flag), so a worker never dies
    # mid-batch of a signal. If the parent itself dies, the watchdog ends the worker.
    ignore_stop_signals()
    watch_parent(spec.parent_pid)
    configure_child_logging(spec.log)

    try:
        state_seg = shm.Segment.attach(spec.state_name)
        sym_seg = shm.Segment.attach(spec.symbols_name)
        ring = Ring.attach(spec.ring_name, busy_poll=spec.busy_poll)
        out = Ring.attach(spec.output_name) if spec.output_name else None
    except FileNotFoundError:
        if os.getppid() != spec.parent_pid:
            exit_orphaned()  # the parent died while this worker started: finish its clean-up
        raise
    assert state_seg.buf is not None and sym_seg.buf is not None
    # int64 cells as a memoryview: reading and bumping one gives a Python int, several times
    # cheaper than a NumPy scalar, and the worker does it a dozen times per batch.
    cells = state_seg.buf.cast("q")
    row = row_cells(cells, spec.index)
    bell = Doorbell(state_seg.buf, BELL_OFFSET)
    tables = tables_in(sym_seg.buf, spec.symbol_capacity, spec.small_capacity)
    dec = Decoder(symbols=tables[0], statuses=tables[1], bar_types=tables[2])
    capture = None
    if spec.capture_dir is not None:
        from fastfeed.capture import CaptureWriter

        capture = CaptureWriter(os.path.join(spec.capture_dir, f"capture-w{spec.index}.ffcap"),
                                spec.index)
    guard = None
    if spec.handler is not None:
        guard = HandlerGuard(spec.handler, f"worker {spec.index}", spec.on_handler_error, row,
                             cells)
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
                continue
            if isolate and _set_aside(spec, batch, row):
                batch.release()
                continue
            _process_batch(spec, batch, dec, row, out, bell, capture, guard)
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



def _set_aside(spec: WorkerSpec, batch: Any, row: Any) -> bool:
    """In isolation (one frame per batch): if this is the frame the worker died at
    POISON_DEATHS times, count it, report it on stderr and mark it handled. True if so."""
    seq = int(batch.seqs[0])
    if int(row[F_CRASHES]) < POISON_DEATHS or seq != int(row[F_CRASH_SEQ]):
        return False
    off, n = int(batch.offsets[0]), int(batch.lengths[0])
    head = bytes(batch.buffer[off : off + min(n, 120)])
    log.error("worker %d: frame seq %d (%d bytes) killed the worker %d times; set aside, "
              "counted as poisoned: %r", spec.index, seq, n, int(row[F_CRASHES]), head)
    row[F_POISONED] += 1
    row[F_PENDING_END] = seq + 1
    row[F_PUB_END] = seq + 1
    row[F_COUNTED_END] = max(int(row[F_COUNTED_END]), seq + 1)
    row[F_DONE_SEQ] = seq + 1
    row[F_CRASHES] = 0
    return True


def _process_batch(spec: WorkerSpec, batch: Any, dec: Any, row: Any, out: Ring | None,
                   bell: Doorbell | None = None, capture: Any = None,
                   guard: HandlerGuard | None = None) -> None:
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
        e0, c0, sf0 = dec.errors_total, dec.control_total, dec.symbols_full_total
        if start == 0:
            res = dec.decode_region(batch.buffer, batch.offsets, batch.lengths, batch.recv_ts,
                                    stop)
        else:
            res = dec.decode_region(
                batch.buffer, batch.offsets[start:stop], batch.lengths[start:stop],
                batch.recv_ts[start:stop])
        if capture is not None:
            capture.write_batch(batch, start, stop)
        new_errors = dec.errors_total != e0
        new_control = dec.control_total != c0
        if guard is not None:
            b = Batch.from_decoded(res, worker=spec.index, seqs=seqs[start:stop],
                                   gaps=batch.gaps if start == 0 else 0, tables=dec)
            guard(spec.index, b)
            b.release()
        if end_seq > row[F_COUNTED_END]:
            # Counted before the rows are published, so a consumer that holds a batch sees
            # it counted; once per range, however often a restarted worker repeats it.
            _count(row, res, stop - start, dec, e0, c0, sf0)
            row[F_COUNTED_END] = end_seq
        if out is not None:
            if start == 0 and end_seq > row[F_PUB_END] and batch.gaps:
                row[F_GAPS_OWED] += batch.gaps  # told to the consumer with the next rows
            row[F_PUB_END] = end_seq  # from here on, this range must be repeated identically
            events = _events(res, seqs, start) if new_errors or new_control else None
            _publish(out, spec.index, first_seq, end_seq, res, row, stop - start, events)
            if bell is not None:
                bell.ring()  # wake the parent if it sleeps in wait_output()
        if spec.fault is not None and spec.fault[0] == "after_publish":
            _maybe_crash(spec.fault[1])
        row[F_DONE_SEQ] = end_seq
        done = end_seq
        start = stop


def _count(row: Any, res: Any, frames: int, dec: Any, e0: int, c0: int, sf0: int) -> None:
    row[F_BATCHES] += 1
    row[F_FRAMES] += frames
    row[F_TICKS] += len(res.ticks)
    row[F_QUOTES] += len(res.quotes)
    row[F_BARS] += len(res.bars)
    row[F_ERRORS] += dec.errors_total - e0  # len(res.errors) would make a list
    row[F_CONTROL] += dec.control_total - c0
    sf = dec.symbols_full_total - sf0
    if sf:
        row[F_SYMBOLS_FULL] += sf
        if not _said["symbols_full"]:
            _said["symbols_full"] = True
            log.error("an intern table is full (symbols: %d): frames with a new code are "
                      "refused as errors and counted in symbols_full; raise max_symbols= "
                      "(--max-symbols)", len(dec.symbols) if dec.symbols is not None else -1)


_said = {"symbols_full": False}  # what this process has logged once already


def _maybe_crash(marker: str) -> None:
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


def _events(res: Any, seqs: Any, start: int) -> list[tuple[int, int, bytes]]:
    """The errors and control messages of a decoded range as ``(seq, kind, bytes)``: kind 1
    an error (its reason, UTF-8), 2 a control message (its raw bytes)."""
    out = [(int(seqs[start + i]), 1, reason.encode()) for i, reason in res.errors]
    # Control messages carry no frame index: they are numbered by the range's first frame.
    first = int(seqs[start])
    out.extend((first, 2, c) for c in res.control)
    return out


def _publish(out: Ring, worker: int, first: int, end: int, res: Any, row: Any,
             frames: int = 0, events: list[tuple[int, int, bytes]] | None = None) -> None:
    """Write each non-empty array of a decoded range to the output ring, chunked to fit, then
    its errors and control messages. The range's frame count (and the gaps owed) go on the
    first record; a range with nothing else to publish sends an empty events record for it.
    Under the lossless policies the write waits for the parent to read; a refused chunk (a
    dropping policy, or a ring shut down at stop) has its rows counted."""
    from fastfeed.output import pack_events

    gaps = int(row[F_GAPS_OWED])
    # The usual case: the whole range in one record, so that the parent never reads part of
    # it (a batch then holds whole ranges: its frame count and seq range are exact).
    arrays = (res.ticks, res.quotes, res.bars)
    ev = pack_events(events, 1 << 62)[0] if events else b""  # all in one body, uncut
    size = OUT_HDR.size + RANGE_HDR.size + sum(a.nbytes for a in arrays) + len(ev)
    if size <= out.max_payload:
        payload = b"".join([OUT_HDR.pack(first, end, 0, 1, gaps, frames, 0),
                            RANGE_HDR.pack(len(arrays[0]), len(arrays[1]), len(arrays[2]),
                                           len(ev)),
                            *(memoryview(np.ascontiguousarray(a)).cast("B") for a in arrays
                              if len(a)), ev])
        if out.write(payload, type=OUTPUT_RANGE, route=worker):
            if gaps:
                row[F_GAPS_OWED] -= gaps
        else:
            row[F_OUT_DROPPED] += sum(len(a) for a in arrays)
        return
    # Too big for one record: each kind chunked to fit, then the events.
    room = out.max_payload - OUT_HDR.size
    for kind, arr in ((OUTPUT_TICKS, res.ticks), (OUTPUT_QUOTES, res.quotes), (OUTPUT_BARS, res.bars)):
        if not len(arr):
            continue
        per = max(1, room // arr.dtype.itemsize)
        nchunks = (len(arr) + per - 1) // per
        raw = memoryview(np.ascontiguousarray(arr)).cast("B")
        step = per * arr.dtype.itemsize
        for c in range(nchunks):
            body = raw[c * step : (c + 1) * step]
            payload = OUT_HDR.pack(first, end, c, nchunks, gaps, frames, 0) + body
            if not out.write(payload, type=kind, route=worker):
                row[F_OUT_DROPPED] += len(body) // arr.dtype.itemsize
            else:
                if gaps:
                    row[F_GAPS_OWED] -= gaps
                    gaps = 0
                frames = 0
    if events or frames:
        bodies = pack_events(events or [], room)
        for c, ev in enumerate(bodies):
            payload = OUT_HDR.pack(first, end, c, len(bodies), gaps, frames, 0) + ev
            if out.write(payload, type=OUTPUT_EVENTS, route=worker):
                if gaps:
                    row[F_GAPS_OWED] -= gaps
                    gaps = 0
                frames = 0


class InlineDecoder:
    """The decoder of an inline pool: ring 0 read and decoded in the calling process.

    No exactly-once bookkeeping is needed: the reader is the process that owns the pool,
    so nothing survives it to resume. Counters go to worker 0's row of the state segment,
    so :meth:`WorkerPool.stats` reads the same either way."""

    def __init__(self, pool: Any) -> None:
        from fastfeed._decoder import Decoder

        assert pool._state_seg is not None and pool._state_seg.buf is not None
        self.ring = pool.rings[0]
        self.cells = pool._state_seg.buf.cast("q")
        self.row: Any = row_cells(self.cells, 0)
        self.batch_size = pool.batch_size
        self.busy_poll = pool.busy_poll
        self.handler = pool.handler
        self.guard = None
        self.on_handler_error = pool.on_handler_error
        if pool.handler is not None:
            self.guard = HandlerGuard(pool.handler, "the consuming process",
                                      pool.on_handler_error, self.row, self.cells)
        t = pool._tables
        self.dec = Decoder(symbols=t[0], statuses=t[1], bar_types=t[2])
        self.capture = None
        if pool.capture_dir is not None:
            from fastfeed.capture import CaptureWriter

            self.capture = CaptureWriter(os.path.join(pool.capture_dir, "capture-w0.ffcap"), 0)
        self.row[F_PID] = os.getpid()
        self.row[F_STATE] = S_RUNNING

    def read(self, timeout: float | None, busy_poll: bool | None = None) -> Batch | None:
        b = self.ring.read_batch(self.batch_size, timeout,
                                 busy_poll=self.busy_poll if busy_poll is None else busy_poll)
        if b is None:
            return None
        dec = self.dec
        e0, c0, sf0 = dec.errors_total, dec.control_total, dec.symbols_full_total
        try:
            res = dec.decode_region(b.buffer, b.offsets, b.lengths, b.recv_ts)
            out = Batch.from_decoded(res, seqs=b.seqs, gaps=b.gaps, tables=dec)
            if self.capture is not None:
                self.capture.write_batch(b, 0, len(b))
        finally:
            # The rows are copies: the ring space can go back to the producer at once.
            b.release()
        row = self.row
        exc = self.guard(0, out) if self.guard is not None else None
        _count(row, res, res.frames, dec, e0, c0, sf0)
        if exc is not None and self.on_handler_error == "raise":
            raise exc
        return out

    def close(self) -> None:
        if self.capture is not None:
            self.capture.close()
            self.capture = None
        if self.row is not None:
            self.row[F_STATE] = S_EXITED
            self.row.release()  # the segment cannot be closed while a view of it is out
            self.cells.release()
            self.row = None

