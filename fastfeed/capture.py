"""Raw captures: every data frame with its receive time, for replay.

File format (little-endian), one file per worker (``capture-w<N>.ffcap``)::

    header   8 bytes   b"FFCAP001"
    record   u32 length | u32 worker | i64 recv_ts (µs) | u64 seq | payload (length bytes)
    ...

``seq`` is the frame's sequence number in its ring: a worker restarted after a crash
may write the records of the batch it died in a second time, and readers drop the
repeats by ``seq``.  A file cut short by a crash ends in a partial record, which
readers ignore (and count).

:class:`ReplayProcess` feeds captures back through the same pipeline (rings, workers,
decoder), with the recorded receive times, at recorded pace or as fast as possible:
the decoded output is identical to the live run's.
"""

from __future__ import annotations

import heapq
import logging
import os
import struct
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from . import control
from .child import ChildProcess

__all__ = ["MAGIC", "CaptureWriter", "ReplayProcess", "read_capture", "capture_files"]

MAGIC = b"FFCAP001"
RECORD = struct.Struct("<IIqQ")

log = logging.getLogger("fastfeed.capture")


class CaptureWriter:
    """Appends the records of ring batches to one capture file (used inside a worker)."""

    def __init__(self, path: str | os.PathLike[str], worker: int) -> None:
        self.path = Path(path)
        self.worker = worker
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._f: BinaryIO = open(self.path, "ab", buffering=1 << 20)  # noqa: SIM115
        if new:
            self._f.write(MAGIC)

    def write_batch(self, batch: Any, start: int, stop: int) -> None:
        """Records [start, stop) of a ring batch, payloads copied straight from ring memory
        (``Batch.pack`` lays them out in this file's record format)."""
        self._f.write(batch.pack(start, stop, self.worker))

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def capture_files(path: str | os.PathLike[str]) -> list[Path]:
    """The capture files at ``path``: the file itself, or every ``*.ffcap`` in a directory."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.ffcap"))
        if not files:
            raise FileNotFoundError(f"no *.ffcap capture files in {p}")
        return files
    if not p.is_file():
        raise FileNotFoundError(f"capture not found: {p}")
    return [p]


def _records(path: Path, stats: dict[str, int]) -> Iterator[tuple[int, int, bytes]]:
    """(recv_ts, seq, payload) of one file, repeats dropped, a torn tail ignored."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != MAGIC:
        raise ValueError(f"{path}: not a fastfeed capture (bad magic {data[:8]!r})")
    pos, end = 8, len(data)
    last_seq = -1
    while pos < end:
        if end - pos < RECORD.size:
            stats["torn"] += 1
            break
        n, _w, ts, seq = RECORD.unpack_from(data, pos)
        pos += RECORD.size
        if end - pos < n:
            stats["torn"] += 1
            break
        payload = data[pos:pos + n]
        pos += n
        if seq <= last_seq:
            stats["repeats"] += 1  # a restarted worker wrote it again
            continue
        last_seq = seq
        yield ts, seq, payload


def read_capture(path: str | os.PathLike[str], stats: dict[str, int] | None = None
                 ) -> Iterator[tuple[int, bytes]]:
    """Every frame of a capture (file or directory) as (recv_ts, payload), merged across
    files in receive-time order (ties keep each file's own order)."""
    stats = stats if stats is not None else {}
    stats.setdefault("torn", 0)
    stats.setdefault("repeats", 0)
    streams = [((ts, i, seq, payload) for ts, seq, payload in _records(f, stats))
               for i, f in enumerate(capture_files(path))]
    for ts, _i, _seq, payload in heapq.merge(*streams):
        yield ts, payload


# -- replay as a source ----------------------------------------------------------------------

COUNTERS = ("frames", "bytes", "ring_drops", "control", "reconnects", "auth_renewals",
            "torn", "repeats", "pauses", "backpressure_us")
# While a ring is full under the "pause" policy, the replay tries again this often.
_RETRY_S = 0.0002


def _replay_main(path: str, ring_names: list[str], speed: float, counters: Any, stop: Any,
                 conn: Any, log_level: int) -> None:
    logging.basicConfig(level=log_level)
    from fastfeed._listener import route_of
    from fastfeed._ring import Ring

    rings = [Ring.attach(n) for n in ring_names]
    stats: dict[str, int] = {"torn": 0, "repeats": 0}
    c = dict.fromkeys(COUNTERS, 0)
    try:
        first_ts = None
        t0 = time.monotonic()
        k = len(rings)
        for i, (ts, payload) in enumerate(read_capture(path, stats)):
            if i % 4096 == 0:
                c.update(stats)
                counters[:] = [c[n] for n in COUNTERS]
                if stop.is_set():
                    break
            if speed > 0:
                if first_ts is None:
                    first_ts = ts
                due = t0 + (ts - first_ts) / 1e6 / speed
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            route = route_of(payload)
            if route < 0:
                # as the live listener does: no symbol, not market data for a ring
                c["control"] += 1
                control.publish(payload)
                continue
            ring = rings[route % k]
            if not ring.write(payload, recv_ts=ts, route=route):
                if ring.full_policy != "pause":
                    c["ring_drops"] += 1
                    continue
                # Lossless: a finite source waits for the workers, whatever the consumer does.
                c["pauses"] += 1
                bp0, p0 = c["backpressure_us"], time.monotonic()
                while not ring.write(payload, recv_ts=ts, route=route):
                    if stop.is_set():
                        break
                    time.sleep(_RETRY_S)
                    c["backpressure_us"] = bp0 + int((time.monotonic() - p0) * 1e6)
                    counters[:] = [c[n] for n in COUNTERS]
                else:
                    c["frames"] += 1
                    c["bytes"] += len(payload)
                c["backpressure_us"] = bp0 + int((time.monotonic() - p0) * 1e6)
                if stop.is_set():
                    break
                continue
            c["frames"] += 1
            c["bytes"] += len(payload)
        c.update(stats)
        counters[:] = [c[n] for n in COUNTERS]
        conn.send(("ok", None))
    except (OSError, ValueError) as exc:
        conn.send(("error", f"replay of {path} failed: {exc}"))
        raise SystemExit(1) from None
    finally:
        for r in rings:
            r.close()
    # Stay alive (idle) until asked to stop, as a live source would, so that the feed
    # drains and reports at its own pace.
    stop.wait()


class ReplayProcess(ChildProcess):
    """Replays a capture into rings from its own process; the interface of SessionProcess.

    ``speed``: 0 for as fast as possible, 1.0 for the recorded pace, 2.0 for twice as fast.
    ``done`` tells when every frame has been written.
    """

    def __init__(self, path: str | os.PathLike[str], ring_names: Sequence[str], *,
                 speed: float = 0.0, log_level: int = logging.WARNING, log: Any = None) -> None:
        capture_files(path)  # fail here, in the caller, on a missing capture
        if speed < 0:
            raise ValueError("speed must be >= 0")
        super().__init__(_replay_main, (str(path), list(ring_names), speed), COUNTERS,
                         name="fastfeed-replay", log_level=log_level, log=log)

    @property
    def done(self) -> bool:
        """True once every frame of the capture has been written (or the replay failed)."""
        self._collect()
        return self.finished


def capture_size(path: str | os.PathLike[str]) -> int:
    """Frames in a capture (repeats dropped), read without replaying."""
    return sum(1 for _ in read_capture(path))


def frames_array(path: str | os.PathLike[str]) -> tuple[list[bytes], np.ndarray]:
    """A capture's frames and receive times, in replay order (for tests and tools)."""
    frames, ts = [], []
    for t, p in read_capture(path):
        ts.append(t)
        frames.append(p)
    return frames, np.array(ts, np.int64)
