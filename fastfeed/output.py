"""The output reader: decoded rows from the workers' output rings, in the parent.

Each worker publishes its decoded arrays to its own output ring (see :mod:`fastfeed.worker`);
the parent reads them here as one :class:`fastfeed.Batch` per read: zero-copy NumPy views into
the ring, with the errors and control messages of the same frames (an events record after the
rows of each range) and the range's frame count and gaps (in the record headers). A worker that restarted
mid-publish publishes the interrupted range again, identically: the parts already seen are
dropped here, so every row is handed over once. A range is normally one record (rows of
every kind and events together), so a batch holds whole ranges; a range too big for one
record comes as records per kind and may be split between two batches. One doorbell, rung by every worker after it
publishes, lets the parent sleep until any worker has output.
"""

from __future__ import annotations

import struct
import time
from typing import Any

import numpy as np

from fastfeed._ring import Doorbell, Ring
from fastfeed.batch import Batch, Tables
from fastfeed.state import KIND_NAMES, OUT_HDR, OUTPUT_EVENTS, OUTPUT_RANGE, RANGE_HDR

__all__ = ["OutputReader", "pack_events", "unpack_events"]

# One event (an error or a control message) in an OUTPUT_EVENTS record: seq, length, kind
# (1 error: the reason, UTF-8; 2 control: the message's raw bytes), then the bytes.
_EVENT = struct.Struct("<qIB")
_ERROR, _CONTROL = 1, 2


def pack_events(events: list[tuple[int, int, bytes]], room: int) -> list[bytes]:
    """``(seq, kind, bytes)`` events as record bodies of at most ``room`` bytes each (at least
    one body, empty when there are no events). A message too long for a record by itself is
    cut to fit (the rows' record size is the same limit the input ring set on frames)."""
    bodies: list[bytes] = []
    cur = bytearray()
    for seq, kind, data in events:
        if len(data) + _EVENT.size > room:
            data = data[: room - _EVENT.size]
        if len(cur) + _EVENT.size + len(data) > room:
            bodies.append(bytes(cur))
            cur = bytearray()
        cur += _EVENT.pack(seq, len(data), kind)
        cur += data
    bodies.append(bytes(cur))
    return bodies


def unpack_events(buf: Any, off: int, end: int, errors: list[tuple[int, str]],
                  control: list[bytes]) -> None:
    """Append the events of one record body (``buf[off:end]``) to ``errors`` and ``control``."""
    while off < end:
        seq, n, kind = _EVENT.unpack_from(buf, off)
        off += _EVENT.size
        data = bytes(buf[off : off + n])
        off += n
        if kind == _ERROR:
            errors.append((seq, data.decode("utf-8", "replace")))
        else:
            control.append(data)


def _joined(parts: list[np.ndarray]) -> np.ndarray:
    # As raw bytes: NumPy concatenates structured rows field by field and leaves their
    # padding uninitialized (stale memory in the user's rows, different every run).
    a = np.concatenate([p.view(np.uint8) for p in parts]).view(parts[0].dtype)
    a.flags.writeable = False
    return a


class OutputReader:
    """Reads the output rings of a pool (``outputs[i]`` is worker i's)."""

    def __init__(self, outputs: list[Ring], bell: Doorbell, dtypes: dict[str, np.dtype],
                 tables: Tables | None = None) -> None:
        self.outputs = outputs
        self.tables = tables
        self._bell = bell
        self._dtypes = dtypes
        self._seen: list[tuple[int, int, int]] = [(0, 0, -1)] * len(outputs)
        self._next = 0

    def read(self, worker: int, timeout: float | None = 0.0,
             max_records: int = 1024) -> Batch | None:
        """Decoded rows published by ``worker`` since the last call, as a :class:`Batch` of
        views into the ring (released by the caller), or None if none arrived within
        ``timeout`` seconds (None: wait). Parts a restarted worker published a second time
        are dropped here, so every row is seen once."""
        ring = self.outputs[worker]
        b = ring.read_batch(max_records, timeout)
        if b is None:
            return None
        parts: dict[str, list[np.ndarray]] = {"ticks": [], "quotes": [], "bars": []}
        errors: list[tuple[int, str]] = []
        control: list[bytes] = []
        buf = b.buffer
        seen = self._seen[worker]
        gaps = frames = 0
        first = last = -1
        hdr = OUT_HDR.size
        for off, length, kind in zip(b.offsets.tolist(), b.lengths.tolist(), b.types.tolist(),
                                     strict=True):
            start, end, chunk, _nchunks, missing, nframes, _ = OUT_HDR.unpack_from(buf, off)
            key = (end, kind, chunk)
            if key <= seen:
                continue  # already delivered before the worker restarted
            seen = key
            gaps += missing
            frames += nframes
            if first < 0:
                first = start
            last = end
            if kind == OUTPUT_RANGE:
                p = off + hdr + RANGE_HDR.size
                counts = RANGE_HDR.unpack_from(buf, off + hdr)
                for name, count in zip(("ticks", "quotes", "bars"), counts, strict=False):
                    if count:
                        dt = self._dtypes[name]
                        parts[name].append(np.frombuffer(buf, dt, count, p))
                        p += count * dt.itemsize
                if counts[3]:
                    unpack_events(buf, p, p + counts[3], errors, control)
                continue
            if kind == OUTPUT_EVENTS:
                unpack_events(buf, off + hdr, off + length, errors, control)
                continue
            name = KIND_NAMES[kind]
            dt = self._dtypes[name]
            count = (length - hdr) // dt.itemsize
            parts[name].append(np.frombuffer(buf, dt, count, off + hdr))
        self._seen[worker] = seen
        # One array per kind, made once: the view itself when the kind came in one record (the
        # usual case), else one joined copy, read-only as the views are.
        arrays = [p[0] if len(p) == 1 else (_joined(p) if p else None) for p in parts.values()]
        return Batch(*arrays, frames=frames, errors=errors, control=control,
                     worker=worker, seq=(max(first, 0), max(last, 0)), gaps=gaps,
                     tables=self.tables, owner=b)

    def take(self) -> Batch | None:
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
