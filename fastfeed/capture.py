"""Raw captures: every data frame with its receive time, for replay.

File format (little-endian), one file per worker (``capture-w<N>.ffcap``)::

    header   8 bytes   b"FFCAP001"
    record   u32 length | u32 worker | i64 recv_ts (µs) | u64 seq | payload (length bytes)
    ...

``seq`` is the frame's sequence number in its ring: a worker restarted after a crash
may write the records of the batch it died in a second time, and readers drop the
repeats by ``seq``.  A file cut short by a crash ends in a partial record, which
readers ignore (and count).  A second recording into the same directory first renames
the previous run's files to ``capture-run<R>-w<N>.ffcap`` (:func:`set_aside_previous_run`):
each run's sequence numbers start at 0 in files of its own, and a replay of the directory
gives every run, merged by receive time.

:class:`LocalReplay` feeds captures back through the same pipeline (rings, workers,
decoder), with the recorded receive times, at recorded pace or as fast as possible:
the decoded output is identical to the live run's.  The frames go from the mapped files
into the rings in C (``ext/capture.pyx``), driven by the consuming process.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import mmap
import os
import re
import struct
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

__all__ = ["MAGIC", "CaptureError", "CaptureWriter", "LocalReplay", "capture_files",
           "intern_codes", "read_capture", "set_aside_previous_run"]

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
    """The capture files at ``path``: the file itself, or every ``*.ffcap`` in a directory
    (in name order: earlier runs' files, see :func:`set_aside_previous_run`, first).
    Raises :class:`FileNotFoundError` when there is none and :class:`CaptureError` when a
    file is not a capture."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.ffcap"))
        if not files:
            raise FileNotFoundError(f"no *.ffcap capture files in {p}")
    elif not p.is_file():
        raise FileNotFoundError(f"capture not found: {p}")
    else:
        files = [p]
    for f in files:
        with open(f, "rb") as fh:
            head = fh.read(len(MAGIC))
        if head != MAGIC:
            raise CaptureError(f"{f} is not a fastfeed capture (it starts with {head[:8]!r}, "
                               f"not {MAGIC!r}): give a file or directory that "
                               f"'fastfeed record --format capture' wrote")
    return files


class CaptureError(ValueError):
    """A file given as a capture is not one."""


_RUN_FILE = re.compile(r"^capture-run(\d+)-w\d+\.ffcap$")
_LIVE_FILE = re.compile(r"^capture-w(\d+)\.ffcap$")


def set_aside_previous_run(directory: str | os.PathLike[str]) -> list[Path]:
    """Before a recording starts in ``directory``: rename the files a previous run left
    there (``capture-w<N>.ffcap``) to ``capture-run<R>-w<N>.ffcap``, R one more than any
    run set aside before, and return the new names. The new run then starts files of its
    own, whose sequence numbers start again at 0 without being taken for the repeats of a
    restarted worker; a replay of the directory gives every run, merged by receive time
    (so in order). One recording at a time per directory."""
    d = Path(directory)
    live = sorted(f for f in d.glob("capture-w*.ffcap") if _LIVE_FILE.match(f.name))
    if not live:
        return []
    runs = [int(m.group(1)) for f in d.glob("capture-run*-w*.ffcap")
            if (m := _RUN_FILE.match(f.name))]
    run = max(runs, default=0) + 1
    moved = []
    for f in live:
        m = _LIVE_FILE.match(f.name)
        assert m is not None
        dst = d / f"capture-run{run:04d}-w{m.group(1)}.ffcap"
        os.replace(f, dst)
        moved.append(dst)
    return moved


class _Mapped:
    """The files of a capture, mapped read-only (closed with :meth:`close`)."""

    def __init__(self, files: Sequence[Path]) -> None:
        self.maps: list[Any] = []
        for f in files:
            with open(f, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                # an empty mapping is not allowed: a header-only file has no records
                self.maps.append(mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
                                 if size > len(MAGIC) else MAGIC)

    def close(self) -> None:
        for m in self.maps:
            if isinstance(m, mmap.mmap):
                with contextlib.suppress(BufferError):
                    m.close()
        self.maps = []


def _records(path: Path, stats: dict[str, int]) -> Iterator[tuple[int, int, bytes]]:
    """(recv_ts, seq, payload) of one file, repeats dropped, a torn tail ignored."""
    from fastfeed._capture import scan

    m = _Mapped([path])
    try:
        data = m.maps[0]
        pos, last = len(MAGIC), -1
        while True:
            offs, lens, ts, pos, last, repeats, torn = scan(data, pos, 1 << 16, last)
            stats["repeats"] += repeats
            stats["torn"] += torn
            for o, n, t in zip(offs.tolist(), lens.tolist(), ts.tolist(), strict=True):
                yield t, 0, bytes(data[o:o + n])
            if not len(offs):
                break
    finally:
        m.close()


def read_capture(path: str | os.PathLike[str], stats: dict[str, int] | None = None
                 ) -> Iterator[tuple[int, bytes]]:
    """Every frame of a capture (file or directory) as (recv_ts, payload), merged across
    files in receive-time order (ties keep the files' order, then each file's own order):
    the order a replay writes them in."""
    stats = stats if stats is not None else {}
    stats.setdefault("torn", 0)
    stats.setdefault("repeats", 0)
    def keyed(i: int, f: Path) -> Iterator[tuple[int, int, int, bytes]]:
        for k, (ts, _seq, payload) in enumerate(_records(f, stats)):
            yield ts, i, k, payload

    streams = [keyed(i, f) for i, f in enumerate(capture_files(path))]
    for ts, _i, _k, payload in heapq.merge(*streams):
        yield ts, payload


def intern_codes(path: str | os.PathLike[str], symbols: Any, statuses: Any,
                 bar_types: Any) -> dict[str, int]:
    """Intern every symbol, status and bar-type code of a capture into these tables, file
    by file in name order, each file in its own order, before a replay starts: then ids
    do not depend on which worker meets a code first, and two replays of one capture give
    the same ids with any number of workers. The frames are decoded in place from the
    mapped files (nothing kept), so this takes what decoding them takes.

    Returns what the frames without a symbol hold, as the decoder counts it (they go to no
    ring in a replay, as in the live run; see :mod:`fastfeed.control_count`): ``control_msgs``,
    ``control_errors`` and ``unroutable``."""
    import numpy as np

    from fastfeed._capture import routes, scan
    from fastfeed._decoder import Decoder

    dec = Decoder(symbols=symbols, statuses=statuses, bar_types=bar_types, error_store=0)
    ctl = Decoder(error_store=0)  # symbol-less frames: counted, their codes kept apart
    probe = None
    unroutable = 0
    m = _Mapped(capture_files(path))
    try:
        for data in m.maps:
            pos, last = len(MAGIC), -1
            while True:
                offs, lens, ts, pos, last, _rep, _torn = scan(data, pos, 1 << 15, last)
                if not len(offs):
                    break
                none = routes(data, offs, lens) < 0
                if none.any():
                    b = ctl.decode_region(data, offs[none], lens[none], ts[none])
                    if b.rows:
                        # rows the router cannot place: count the frames that hold them, one
                        # at a time through one probe decoder (its tables are megabytes: made
                        # once, not per frame)
                        if probe is None:
                            probe = Decoder(error_store=0)
                        one_ts = np.zeros(1, np.int64)
                        for o, n in zip(offs[none].tolist(), lens[none].tolist(), strict=True):
                            unroutable += probe.decode_region(
                                data, np.array([o]), np.array([n]), one_ts
                            ).rows > 0
                    keep = ~none
                    offs, lens, ts = offs[keep], lens[keep], ts[keep]
                if len(offs):
                    dec.decode_region(data, offs, lens, ts)
        return {"control_msgs": ctl.control_total, "control_errors": ctl.errors_total,
                "unroutable": int(unroutable)}
    finally:
        del dec, ctl, probe
        m.close()


# -- replay as a source ----------------------------------------------------------------------

COUNTERS = ("frames", "bytes", "ring_drops", "control", "reconnects", "auth_renewals",
            "torn", "repeats", "pauses", "backpressure_us", "started_us", "first_ts")
# A LocalReplay whose rings are full comes back this soon: a 4 MiB ring holds some 8 ms of
# decoding, so the decoders never run dry waiting for it.
_FULL_RETRY_S = 0.0005


class LocalReplay:
    """A replay driven by the consuming process: no replay process, no hop. Each
    :meth:`pump` moves the frames that are due from the mapped capture into the rings (in
    C: :class:`fastfeed._capture.CaptureReader`), and the Feed calls it between reading
    batches: with ``workers=0`` just before it decodes them from its inline ring, with
    workers while they decode. The frames go through the same rings, decoders and counters
    as any feed, and a replay costs little more than decoding. Frames without a symbol go
    to ``control`` (the consumer's control ring), as the live network process sends them.
    For the Feed it stands where
    a source process would: ``counters()``, ``done``, ``request_stop()``, ``stop()``."""

    def __init__(self, path: str | os.PathLike[str], rings: Sequence[Any], *,
                 speed: float = 0.0, control: Any = None) -> None:
        from fastfeed._capture import CaptureReader
        from fastfeed._decoder import now_us

        if speed < 0:
            raise ValueError("speed must be >= 0")
        self.path = str(path)
        self.speed = speed
        self._mapped: _Mapped | None = _Mapped(capture_files(path))
        self._reader: Any = CaptureReader(self._mapped.maps)
        self._addresses = [r.address for r in rings]
        # frames without a symbol: to the consumer's control ring (fastfeed.control), if any
        self._control_address = control.address if control is not None else 0
        self._first_ts = self._reader.next_ts
        self._t0 = time.monotonic()
        self._c = dict.fromkeys(COUNTERS, 0)
        self._c["first_ts"] = self._first_ts or 0
        self._c["started_us"] = now_us()
        self._paused_at: float | None = None
        self._stop = False
        self.error: str | None = None
        self.finished = self._first_ts is None
        self.pid = os.getpid()
        self.exitcode: int | None = None

    def pump(self, max_frames: int = 1 << 16) -> float | None:
        """Write what is due and fits. Returns when to call again: None once every frame is
        written (or the replay was stopped), else in how many seconds (0: at once; a ring
        full: shortly, once the decoders made room; paced: when the next frame is due)."""
        from fastfeed._capture import DONE, FULL, PACED

        r = self._reader
        if self.finished or self._stop or r is None:
            return None
        until = (1 << 63) - 1
        if self.speed > 0 and self._first_ts is not None:
            until = self._first_ts + int((time.monotonic() - self._t0) * 1e6 * self.speed)
        # Lossless whatever the rings' policy: a finite source waits for the decoders.
        status = r.pump(self._addresses, max_frames, until, True, self._control_address)
        if status == FULL:
            if self._paused_at is None:
                self._paused_at = time.monotonic()
                self._c["pauses"] += 1
            return _FULL_RETRY_S
        if self._paused_at is not None:
            self._c["backpressure_us"] += int((time.monotonic() - self._paused_at) * 1e6)
            self._paused_at = None
        if status == DONE:
            self.finished = True
            return None
        if status == PACED:
            due = self._t0 + (r.next_ts - self._first_ts) / 1e6 / self.speed
            return max(0.0, due - time.monotonic())
        return 0.0

    @property
    def done(self) -> bool:
        return self.finished

    def counters(self) -> dict[str, int]:
        r = self._reader
        if r is not None:
            for k in ("frames", "bytes", "ring_drops", "control", "repeats", "torn"):
                self._c[k] = getattr(r, k)
        return dict(self._c)

    def is_alive(self) -> bool:
        return not (self.finished or self._stop)

    def request_stop(self) -> None:
        self._stop = True

    def join(self, timeout: float | None = None) -> int | None:
        return self.exitcode

    def stop(self, timeout: float = 10.0) -> int | None:
        self._stop = True
        if self._reader is not None:
            self._c = self.counters()
            self._reader = None  # its pointers into the maps go before the maps
        if self._mapped is not None:
            self._mapped.close()
            self._mapped = None
        self.exitcode = 0
        return 0


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
