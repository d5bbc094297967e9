"""Memory that ends at a PROT_NONE guard page, for bounds tests of the decoder.

``GuardedRegion(size).place(data)`` copies ``data`` so that its last byte is the last
byte before an inaccessible page and returns a memoryview of exactly those bytes (no
copy): a decoder that reads one byte past the end of the view faults at once, where a
read past the end of a ``bytes`` object would land on its trailing NUL unnoticed.
"""

from __future__ import annotations

import ctypes
import mmap

PAGE = mmap.PAGESIZE
PROT_NONE = 0

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mprotect.restype = ctypes.c_int


class GuardedRegion:
    """``size`` bytes (rounded up to whole pages) of read-write memory followed by one
    PROT_NONE page.  ``region`` is a memoryview of the accessible part; its end is the
    guard."""

    def __init__(self, size: int = PAGE) -> None:
        self.size = max(PAGE, -(-size // PAGE) * PAGE)
        self._map = mmap.mmap(-1, self.size + PAGE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        anchor = ctypes.c_char.from_buffer(self._map)
        addr = ctypes.addressof(anchor)
        del anchor  # the export would keep the map from ever being closed
        if _libc.mprotect(addr + self.size, PAGE, PROT_NONE) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mprotect of the guard page failed: {err}")
        self.region = memoryview(self._map)[: self.size]

    def place(self, data: bytes) -> memoryview:
        """``data`` copied to end at the guard page; a view of exactly those bytes."""
        n = len(data)
        if n > self.size:
            raise ValueError(f"{n} bytes do not fit in a region of {self.size}")
        start = self.size - n
        self.region[start:] = data
        return self.region[start:]

    def offset(self, data_len: int) -> int:
        """Where in ``region`` the last ``place`` of ``data_len`` bytes starts."""
        return self.size - data_len


class GuardedSlots:
    """``nslots`` regions of ``size`` bytes each, every one followed by its own PROT_NONE
    page, in one map: many frames at once, each ending at a guard, for one
    ``decode_region`` call over ``memory``."""

    def __init__(self, nslots: int, size: int = PAGE) -> None:
        self.size = max(PAGE, -(-size // PAGE) * PAGE)
        self.stride = self.size + PAGE
        self.nslots = nslots
        self._map = mmap.mmap(-1, self.stride * nslots, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        anchor = ctypes.c_char.from_buffer(self._map)
        addr = ctypes.addressof(anchor)
        del anchor
        for i in range(nslots):
            if _libc.mprotect(addr + i * self.stride + self.size, PAGE, PROT_NONE) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"mprotect of a guard page failed: {err}")
        self.memory = memoryview(self._map)

    def place(self, i: int, data: bytes) -> int:
        """``data`` copied into slot ``i`` to end at its guard; its offset in ``memory``."""
        end = i * self.stride + self.size
        self.memory[end - len(data) : end] = data
        return end - len(data)


def decode_at_guard(dec, guard: GuardedRegion, data: bytes) -> list[bool]:
    """``data`` placed to end at the guard page and decoded through each zero-copy entry
    point of ``dec``; for each, whether the frame failed: ``[decode, decode_region,
    decode_buffer]`` (the last only when ``data`` is one non-blank line, since
    ``decode_buffer`` splits at newlines; it still runs on the others)."""
    view = guard.place(data)
    n = len(data)
    off = guard.offset(n)
    out = [
        bool(dec.decode([view], recv_ts=0).errors),
        bool(dec.decode_region(guard.region, [off], [n], [0]).errors),
    ]
    buf = dec.decode_buffer(view, recv_ts=0)
    if b"\n" not in data and data.strip(b" \t\r"):
        out.append(bool(buf.errors))
    return out


def check_prefixes(frames: list[bytes], progress=None) -> list[dict]:
    """Every prefix of every frame (the whole frame included) decoded at the guard page.

    Per frame: ``{"ok_prefixes": [(length, path), ...], "full": [error per path]}``, where
    ``ok_prefixes`` lists the proper prefixes that some path decoded without an error.
    ``progress``, a writable buffer of 16 bytes, gets (frame index, prefix length) before
    each decode, so that whoever watches a process that dies knows where it died."""
    import struct

    from fastfeed import Decoder

    dec = Decoder(error_store=0)
    guard = GuardedRegion(max((len(f) for f in frames), default=1))
    results = []
    for i, frame in enumerate(frames):
        ok = []
        for n in range(len(frame)):
            if progress is not None:
                struct.pack_into("<qq", progress, 0, i, n)
            errs = decode_at_guard(dec, guard, frame[:n])
            ok += [(n, path) for path, err in enumerate(errs) if not err]
        if progress is not None:
            struct.pack_into("<qq", progress, 0, i, len(frame))
        results.append({"ok_prefixes": ok, "full": decode_at_guard(dec, guard, frame)})
    return results


def _main(argv: list[str]) -> int:
    """``guardpage.py FRAMES.json RESULT.json PROGRESS``: check_prefixes on the frames (a
    JSON list of latin-1 strings), its result to RESULT.json; PROGRESS (16 bytes) tells
    where a crash happened."""
    import json
    import sys

    import fastfeed

    frames = [s.encode("latin-1") for s in json.load(open(argv[0]))]
    with open(argv[2], "r+b") as f:
        progress = mmap.mmap(f.fileno(), 16)
        results = check_prefixes(frames, progress)
    with open(argv[1], "w") as f:
        json.dump({"fastfeed": fastfeed.__file__, "results": results}, f)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(_main(sys.argv[1:]))
