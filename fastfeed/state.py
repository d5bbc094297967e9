"""The pool's shared state: where each counter and table lives in shared memory.

The parent creates one small state segment and one symbols segment per pool; every worker
maps both. The state segment holds a global row, the output doorbell's row and one 256-byte
row (32 int64 cells) per worker, so that no two workers write to the same cache line. The
symbols segment holds the three intern tables (symbols, statuses, bar types), formatted by the
parent before any worker starts, so that ids are the same in every process.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

__all__ = ["OUTPUT_BARS", "OUTPUT_QUOTES", "OUTPUT_TICKS", "WorkerStats"]

# Output record types (the ring record's `type`); the route field carries the worker index.
OUTPUT_TICKS = 1
OUTPUT_QUOTES = 2
OUTPUT_BARS = 3
# Errors and control messages of a range (see fastfeed.output.pack_events), after its rows.
OUTPUT_EVENTS = 4
# A whole range in one record: RANGE_HDR's counts, then its ticks, quotes, bars and events, so
# that a reader never sees part of a range. Ranges too big for one record are published as
# the records above instead.
OUTPUT_RANGE = 5
RANGE_HDR = struct.Struct("<IIII")  # ticks, quotes, bars (rows), events (bytes); 16 bytes
KIND_NAMES = {OUTPUT_TICKS: "ticks", OUTPUT_QUOTES: "quotes", OUTPUT_BARS: "bars"}
# Output payload header: first input seq, end input seq (exclusive), chunk index, chunk count,
# gaps (input frames dropped before these rows) and frames (input frames the range holds), both
# on the first record a range publishes only; 4 spare bytes. 40 bytes keep the rows behind it
# 8-byte aligned, as the ring's records are.
OUT_HDR = struct.Struct("<QQIIQII")

# State segment: one 256-byte row (32 int64) per worker after a global row and the output
# doorbell's row, so workers never write to the same cache line.
COLS = 32
G_STOP = 0  # 0 run, 1 drain then exit, 2 exit after the current batch
BELL_OFFSET = COLS * 8  # row 1: the doorbell workers ring after publishing output
W0 = 2  # row of worker 0
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
F_OUT_DROPPED = 15  # decoded rows the output ring refused (a dropping policy, or shut at stop)
# Poison frames: a frame that kills the worker every time (a crash in a handler's C code,
# say) would otherwise make it restart forever while its ring fills up.
F_CRASH_SEQ = 16  # DONE_SEQ when the worker last died
F_CRASHES = 17  # deaths in a row at that DONE_SEQ (the worker zeroes it once past it)
F_POISONED = 18  # frames set aside because they killed the worker POISON_DEATHS times
F_PUB_END = 19  # end seq of the range whose output publishing began (== PENDING_END: begun)
F_CRASH_END = 20  # end seq of the range being handled at that death: isolate up to here
POISON_DEATHS = 3
S_IDLE, S_RUNNING, S_EXITED = 0, 1, 2
G_HANDLER_FAILED = 1  # a handler raised and on_handler_error="raise": the parent stops the feed
F_SYMBOLS_FULL = 21  # frames refused because an intern table was full
F_COUNTED_END = 22  # end seq of the last range whose rows were counted (once per range)
F_GAPS_OWED = 23  # ring gaps seen but not yet reported on a published output record


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
    symbols_full: int

    @classmethod
    def from_row(cls, index: int, r: Any, running: bool) -> WorkerStats:
        """From worker ``index``'s row of the state segment."""
        return cls(index=index, pid=int(r[F_PID]), restarts=int(r[F_RESTARTS]), running=running,
                   batches=int(r[F_BATCHES]), frames=int(r[F_FRAMES]), ticks=int(r[F_TICKS]),
                   quotes=int(r[F_QUOTES]), bars=int(r[F_BARS]), errors=int(r[F_ERRORS]),
                   control=int(r[F_CONTROL]), handler_errors=int(r[F_HANDLER_ERRORS]),
                   done_seq=int(r[F_DONE_SEQ]), skipped=int(r[F_SKIPPED]),
                   output_dropped=int(r[F_OUT_DROPPED]), poisoned=int(r[F_POISONED]),
                   symbols_full=int(r[F_SYMBOLS_FULL]))


def symbol_layout(symbol_capacity: int, small_capacity: int) -> tuple[list[tuple[int, int]], int]:
    """(offset, capacity) of the symbols, statuses and bar-types tables in one segment."""
    from fastfeed._decoder import SymbolTable

    layout, off = [], 0
    for cap in (symbol_capacity, small_capacity, small_capacity):
        layout.append((off, cap))
        off += (SymbolTable.nbytes(cap) + 127) // 128 * 128
    return layout, off


def tables_in(buf: memoryview, symbol_capacity: int, small_capacity: int) -> list[Any]:
    from fastfeed._decoder import SymbolTable

    layout, _ = symbol_layout(symbol_capacity, small_capacity)
    # Statuses and bar types keep id 0 for "" (the field was absent), as a standalone
    # Decoder's own tables do; the first to format the segment interns it.
    return [
        SymbolTable(buf[off : off + SymbolTable.nbytes(cap)], capacity=cap, reserve_empty=i > 0)
        for i, (off, cap) in enumerate(layout)
    ]


def row_cells(cells: memoryview, worker: int) -> memoryview:
    """Worker ``worker``'s row of the state segment, as int64 cells."""
    return cells[(W0 + worker) * COLS : (W0 + worker + 1) * COLS]

