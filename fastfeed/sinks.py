"""Sinks: where decoded rows go besides your code.

:class:`ParquetSink` writes one file set per kind (``ticks-000001.parquet``, ...) with
pyarrow, rolled by rows or seconds, on a background thread: ``write(batch)`` only copies
the arrays and queues them, so the consumer never waits on the disk.  Rows are gathered
into row groups of ``row_group_rows`` (or what ``flush_seconds`` gathered), not one per
batch.  A sink in a directory that already holds files numbers its own after them: a
second recording adds files, never overwrites.  ``close()`` (or leaving its ``with``
block) writes what is queued and closes every file; a full queue (the disk cannot keep
up) drops the batch and counts it, never blocks.

The raw capture sink (every frame with its receive time, for replay) lives in
:mod:`fastfeed.capture`; it is written by the workers.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["ParquetSink"]

log = logging.getLogger("fastfeed.sinks")

_KINDS = ("ticks", "quotes", "bars")


class ParquetSink:
    """Decoded rows to Parquet, in the background.

    out: directory (created if missing).
    tables: a callable returning ``(symbols, statuses, bar_types)`` at write time (e.g.
        ``lambda: (feed.symbols, feed.statuses, feed.bar_types)``), so codes are stored
        as dictionary-encoded strings; None stores the ids.
    roll_rows / roll_seconds: start a new file of a kind past this many rows or seconds.
    row_group_rows: rows gathered per row group (each a separate read unit in Parquet);
        fewer only at a roll, at close, or after ``flush_seconds`` of gathering.
    flush_seconds: write what has been gathered at least this often, so that a slow
        stream still reaches the disk (a row group each time).
    max_queue: batches waiting for the writer; when it is full, :meth:`write` waits (up to
        ``put_timeout`` seconds, then the batch is dropped, counted and logged).
    """

    def __init__(self, out: str | os.PathLike[str], *, tables: Any = None,
                 roll_rows: int = 5_000_000, roll_seconds: float = 300.0,
                 row_group_rows: int = 131_072, flush_seconds: float = 10.0,
                 max_queue: int = 1024, compression: str = "zstd",
                 put_timeout: float = 60.0) -> None:
        import pyarrow  # noqa: F401  (fail now, not in the thread, when it is missing)

        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.tables = tables
        self.roll_rows = roll_rows
        self.close_timeout = 120.0  # bound on close(): what is queued is written first
        self.roll_seconds = roll_seconds
        self.compression = compression
        self.dropped = 0
        self.put_timeout = put_timeout
        self.rows_written = dict.fromkeys(_KINDS, 0)
        self.files: list[Path] = []
        self.error: BaseException | None = None
        self._q: queue.Queue[Any] = queue.Queue(max_queue)
        self._writers: dict[str, Any] = {}
        self._opened: dict[str, tuple[float, int]] = {}
        self.row_group_rows = max(1, row_group_rows)
        self.flush_seconds = flush_seconds
        # Number after the files already there: a second run adds, never overwrites.
        self._seq = {k: max((int(m.group(1)) for f in self.out.glob(f"{k}-*.parquet")
                             if (m := re.fullmatch(rf"{k}-(\d+)\.parquet", f.name))), default=0)
                     for k in _KINDS}
        self._gathered: dict[str, list[Any]] = {k: [] for k in _KINDS}
        self._gathered_rows = dict.fromkeys(_KINDS, 0)
        self._gathered_since: dict[str, float] = {}
        self._tables_now: tuple[Any, ...] = (None, None, None)
        self._thread = threading.Thread(target=self._run, name="fastfeed-parquet", daemon=True)
        self._thread.start()

    def _codes(self) -> tuple[list[str] | None, ...]:
        """The code lists as of now, grown in place: the writer thread may run after the
        feed (and its shared tables) is gone, so it never reads the live tables."""
        if self.tables is None:
            return (None, None, None)
        live = self.tables()
        if not hasattr(self, "_code_lists"):
            self._code_lists: list[list[str]] = [[], [], []]
        for have, table in zip(self._code_lists, live, strict=True):
            if table is not None:
                have.extend(table[i] for i in range(len(have), len(table)))
        return tuple(self._code_lists)

    def write(self, batch: Any) -> None:
        """Queue a batch's rows (copied: the batch may be a view that is about to go)."""
        item = [(k, getattr(batch, k).copy()) for k in _KINDS if len(getattr(batch, k))]
        if not item:
            return
        item.append(self._codes())  # type: ignore[arg-type]
        try:
            # Lossless: a full queue makes the consumer wait for the writer (and the feed
            # pushes back upstream); only a writer stuck for put_timeout loses the batch.
            self._q.put(item, timeout=self.put_timeout)
        except queue.Full:
            self.dropped += 1
            log.warning("parquet sink: the writer has taken nothing for %g s; a batch of %d "
                        "rows dropped (counted in parquet_dropped)", self.put_timeout,
                        sum(len(a) for _, a in item[:-1]))

    def _run(self) -> None:
        from .convert import to_arrow

        try:
            while True:
                try:
                    item = self._q.get(timeout=min(1.0, self.flush_seconds))
                except queue.Empty:
                    item = ()
                if item is None:
                    break
                if item:
                    *parts, lists = item
                    # the lists only grow: the first len() entries are this batch's codes
                    self._tables_now = tuple(None if c is None else c[:len(c)] for c in lists)
                    for kind, arr in parts:
                        if not self._gathered[kind]:
                            self._gathered_since[kind] = time.monotonic()
                        self._gathered[kind].append(arr)
                        self._gathered_rows[kind] += len(arr)
                        if self._gathered_rows[kind] >= self.row_group_rows:
                            self._flush(kind, to_arrow)
                now = time.monotonic()
                for kind in _KINDS:
                    if self._gathered[kind] and \
                            now - self._gathered_since[kind] >= self.flush_seconds:
                        self._flush(kind, to_arrow)
            for kind in _KINDS:
                self._flush(kind, to_arrow)
        except BaseException as exc:  # noqa: BLE001 - reported by close()
            self.error = exc
        for w in self._writers.values():
            w.close()
        self._writers.clear()

    def _flush(self, kind: str, to_arrow: Any) -> None:
        """Write the rows gathered for ``kind`` as row groups of up to row_group_rows."""
        import numpy as np

        parts = self._gathered[kind]
        if not parts:
            return
        self._gathered[kind] = []
        self._gathered_rows[kind] = 0
        arr = parts[0] if len(parts) == 1 else np.concatenate(parts)
        self._writer(kind, arr, self._tables_now, to_arrow)

    def _writer(self, kind: str, arr: Any, tables: Any, to_arrow: Any) -> None:
        import pyarrow.parquet as pq

        table = to_arrow(arr, *tables)
        # Slices (zero-copy) so that no file passes roll_rows, however large the batches.
        while table.num_rows:
            w = self._writers.get(kind)
            if w is not None:
                opened, rows = self._opened[kind]
                if rows >= self.roll_rows or time.monotonic() - opened >= self.roll_seconds \
                        or w.schema != table.schema:
                    w.close()
                    w = None
            if w is None:
                self._seq[kind] += 1
                path = self.out / f"{kind}-{self._seq[kind]:06d}.parquet"
                w = pq.ParquetWriter(path, table.schema, compression=self.compression)
                self._writers[kind] = w
                self._opened[kind] = (time.monotonic(), 0)
                self.files.append(path)
            opened, rows = self._opened[kind]
            room = max(1, self.roll_rows - rows)
            part, table = table.slice(0, room), table.slice(room)
            w.write_table(part, row_group_size=self.row_group_rows)
            self._opened[kind] = (opened, rows + part.num_rows)
            self.rows_written[kind] += part.num_rows

    def close(self) -> None:
        """Write what is queued, close the files; re-raise a writer error."""
        if self._thread.is_alive():
            deadline = time.monotonic() + self.close_timeout
            try:  # a stuck writer with a full queue must not hold close() past its deadline
                self._q.put(None, timeout=self.close_timeout)
            except queue.Full:
                pass
            self._thread.join(max(0.0, deadline - time.monotonic()))
            if self._thread.is_alive():
                raise RuntimeError(f"parquet sink: the writer did not finish within "
                                   f"{self.close_timeout:g} s; files may be incomplete")
        if self.error is not None:
            raise RuntimeError(f"parquet sink failed: {self.error}") from self.error

    def __enter__(self) -> ParquetSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
