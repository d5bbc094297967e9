"""The output reader: decoded rows from the workers' output rings, in the parent.

Each worker publishes its decoded arrays to its own output ring (see :mod:`fastfeed.worker`);
the parent reads them here as zero-copy NumPy views into the ring. A worker that restarted
mid-publish publishes the interrupted range again, identically: the parts already seen are
dropped here, so every row is handed over once. One doorbell, rung by every worker after it
publishes, lets the parent sleep until any worker has output.
"""

from __future__ import annotations

import time
from types import TracebackType
from typing import Any

import numpy as np

from fastfeed._ring import Doorbell, Ring
from fastfeed.state import KIND_NAMES, OUT_HDR

__all__ = ["OutputBatch", "OutputReader"]


class OutputBatch:
    """Decoded rows from one worker's output ring, as zero-copy NumPy views into the ring.

    ``parts`` is a list of ``(kind, array)`` with kind "ticks", "quotes" or "bars"; ``ticks``,
    ``quotes`` and ``bars`` concatenate the parts of one kind (a copy only when there are
    several). Valid until :meth:`release`, which lets the worker reuse the space.
    ``gaps``: frames of this worker's ring dropped (under a dropping full policy) since the
    rows of the previous batch, so a consumer sees where data is missing; 0 when lossless.
    """

    def __init__(self, worker: int, parts: list[tuple[str, np.ndarray]], ring_batch: Any,
                 dtypes: dict[str, np.dtype], gaps: int = 0) -> None:
        self.worker = worker
        self.parts = parts
        self.gaps = gaps
        self._batch = ring_batch
        self._dtypes = dtypes

    def _kind(self, kind: str) -> np.ndarray:
        arrays = [a for k, a in self.parts if k == kind]
        if len(arrays) == 1:
            return arrays[0]
        if not arrays:
            return np.empty(0, self._dtypes[kind])
        # As raw bytes: NumPy concatenates structured rows field by field and leaves their
        # padding uninitialized (stale memory in the user's rows, different every run).
        return np.concatenate([a.view(np.uint8) for a in arrays]).view(self._dtypes[kind])

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
        counts = {k: sum(len(a) for kk, a in self.parts if kk == k) for k in KIND_NAMES.values()}
        return f"<OutputBatch worker={self.worker} {counts}>"




class OutputReader:
    """Reads the output rings of a pool (``outputs[i]`` is worker i's)."""

    def __init__(self, outputs: list[Ring], bell: Doorbell, dtypes: dict[str, np.dtype]) -> None:
        self.outputs = outputs
        self._bell = bell
        self._dtypes = dtypes
        self._seen: list[tuple[int, int, int]] = [(0, 0, -1)] * len(outputs)
        self._next = 0

    def read(self, worker: int, timeout: float | None = 0.0,
             max_records: int = 1024) -> OutputBatch | None:
        """Decoded rows published by ``worker`` since the last call, or None if none arrived
        within ``timeout`` seconds (None: wait). Parts a restarted worker published a second
        time are dropped here, so every row is seen once."""
        ring = self.outputs[worker]
        b = ring.read_batch(max_records, timeout)
        if b is None:
            return None
        parts: list[tuple[str, np.ndarray]] = []
        buf = b.buffer
        seen = self._seen[worker]
        gaps = 0
        for off, length, kind in zip(b.offsets.tolist(), b.lengths.tolist(), b.types.tolist(),
                                     strict=True):
            first, end, chunk, nchunks, missing = OUT_HDR.unpack_from(buf, off)
            key = (end, kind, chunk)
            if key <= seen:
                continue  # already delivered before the worker restarted
            seen = key
            gaps += missing
            name = KIND_NAMES[kind]
            dt = self._dtypes[name]
            count = (length - OUT_HDR.size) // dt.itemsize
            parts.append((name, np.frombuffer(buf, dt, count, off + OUT_HDR.size)))
        self._seen[worker] = seen
        return OutputBatch(worker, parts, b, self._dtypes, gaps)

    def take(self) -> OutputBatch | None:
        """The next ready output, taking the workers in turn so that none is starved."""
        n = len(self.outputs)
        for _ in range(n):
            w = self._next
            self._next = (w + 1) % n
            b = self.read(w, timeout=0)
            if b is not None:
                return b
        return None

    def empty(self) -> bool:
        return not any(o.used for o in self.outputs)

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep until any worker's output ring has records (True) or ``timeout`` seconds pass
        (False; None waits indefinitely). One futex for all workers: the workers ring the
        pool's doorbell after publishing, so the parent neither polls nor waits on one ring
        while another fills."""
        bell = self._bell
        deadline = None if timeout is None else time.monotonic() + timeout

        def ready() -> bool:
            return any(o.used for o in self.outputs)

        while not ready():
            token = bell.prepare()
            if ready():
                bell.cancel()
                break
            if deadline is None:
                bell.wait(token, 0.05)  # in slices: a stop is noticed between them
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                bell.cancel()
                return False
            bell.wait(token, min(left, 0.05))
        return True
