# cython: language_level=3
"""Reading raw captures in C: the replay's hot path and its index.

A capture file (see ``fastfeed/capture.py``) is ``b"FFCAP001"`` then records
``u32 length | u32 worker | i64 recv_ts | u64 seq | payload``. Replaying one used to cost
a Python loop per frame (unpack, slice, route, write): 90 % of a replay's time went there,
not into decoding. Here the records are read straight out of the mapped files:

- :class:`CaptureReader` merges the files of a capture by receive time (ties: file order,
  then each file's own order), drops the records a restarted worker wrote twice (a
  sequence number not above the file's last) and a torn tail, routes each frame by its
  symbol exactly as the network process does, and writes it into the rings, without the GIL
  and without a Python object per frame;
- :func:`scan` gives the offsets, lengths and receive times of a file's records as arrays,
  for decoding frames in place from the mapped file (``Decoder.decode_region``).
"""

from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memchr, memcpy

from ff_route cimport ff_route
from ff_ring cimport ff_ring_set_producer, ff_ring_try_write, ff_ring_write

import os

import numpy as np

__all__ = ["CaptureReader", "DONE", "FULL", "PACED", "BUDGET", "route_frame", "routes", "scan"]

cdef enum:
    _HDR = 24  # u32 length, u32 worker, i64 recv_ts, u64 seq
    _MAGIC_LEN = 8
    _DATA_TYPE = 1

# What CaptureReader.pump stopped on.
cdef enum:
    _DONE = 0  # every record has been handled
    _FULL = 1  # a ring is full under the "pause" policy: the frame is kept; call again later
    _PACED = 2  # the next frame is due after `until_ts`
    _BUDGET = 3  # `max_frames` frames handled

DONE, FULL, PACED, BUDGET = _DONE, _FULL, _PACED, _BUDGET


def route_frame(frame) -> int:
    """The route this module gives a frame (for tests: it must equal ``route_of``)."""
    cdef const unsigned char[::1] b = bytes(frame)
    if b.shape[0] == 0:
        return -1
    return ff_route(<const char *>&b[0], b.shape[0])


def routes(data, offsets, lengths):
    """The route of each frame of ``data`` at ``offsets``/``lengths`` (int32; -1: no
    symbol), as :class:`CaptureReader` routes them."""
    cdef const unsigned char[::1] buf = data
    cdef const int64_t[::1] off = np.ascontiguousarray(offsets, np.int64)
    cdef const int64_t[::1] ln = np.ascontiguousarray(lengths, np.int64)
    cdef Py_ssize_t n = off.shape[0], i
    if ln.shape[0] != n:
        raise ValueError("offsets and lengths differ in length")
    out = np.empty(n, np.int32)
    cdef int32_t[::1] r = out
    for i in range(n):
        if off[i] < 0 or ln[i] < 0 or off[i] + ln[i] > buf.shape[0]:
            raise ValueError("frame %d lies outside the data" % i)
    if n == 0:
        return out
    cdef const char *p = <const char *>&buf[0]
    with nogil:
        for i in range(n):
            r[i] = ff_route(p + off[i], ln[i])
    return out


cdef inline uint32_t _u32(const unsigned char *p) noexcept nogil:
    cdef uint32_t v
    memcpy(&v, p, 4)
    return v


cdef inline int64_t _i64(const unsigned char *p) noexcept nogil:
    cdef int64_t v
    memcpy(&v, p, 8)
    return v


cdef inline uint64_t _u64(const unsigned char *p) noexcept nogil:
    cdef uint64_t v
    memcpy(&v, p, 8)
    return v


def scan(data, Py_ssize_t pos=8, Py_ssize_t max_records=1 << 20,
         int64_t last_seq=-1):
    """Records of one capture file's bytes from ``pos`` (just past the magic by default):
    ``(offsets, lengths, recv_ts, next_pos, last_seq, repeats, torn)``, at most
    ``max_records`` of them. Offsets point at payloads in ``data``; records whose sequence
    number is not above ``last_seq`` (written twice by a restarted worker) are skipped and
    counted in ``repeats``; ``torn`` is 1 if the file ends inside a record. Call again from
    ``next_pos`` with the returned ``last_seq`` for the next records."""
    cdef const unsigned char[::1] buf = data
    cdef Py_ssize_t end = buf.shape[0]
    offsets = np.empty(max_records, np.int64)
    lengths = np.empty(max_records, np.int64)
    stamps = np.empty(max_records, np.int64)
    cdef int64_t[::1] off = offsets, ln = lengths, ts = stamps
    cdef Py_ssize_t n = 0, repeats = 0, torn = 0
    cdef uint32_t length
    cdef uint64_t seq
    cdef const unsigned char *p
    if end == 0:
        return offsets[:0], lengths[:0], stamps[:0], pos, last_seq, 0, 0
    p = &buf[0]
    with nogil:
        while pos < end and n < max_records:
            if end - pos < _HDR:
                torn = 1
                break
            length = _u32(p + pos)
            if <uint64_t>(end - pos - _HDR) < length:
                torn = 1
                break
            seq = _u64(p + pos + 16)
            if last_seq >= 0 and seq <= <uint64_t>last_seq:
                repeats += 1
            else:
                last_seq = <int64_t>seq
                off[n] = pos + _HDR
                ln[n] = length
                ts[n] = _i64(p + pos + 8)
                n += 1
            pos += _HDR + length
    return offsets[:n], lengths[:n], stamps[:n], pos, last_seq, repeats, torn


cdef class CaptureReader:
    """The records of a capture's files, merged by receive time, written into rings.

    ``buffers``: one bytes-like object per file (an ``mmap`` of it), each starting with the
    8-byte magic (checked by the caller). Counters: ``frames`` and ``bytes`` written,
    ``control`` (frames without a symbol: not written, as the live listener does),
    ``ring_drops`` (refused by a dropping policy), ``repeats``, ``torn``.
    """

    cdef object _keep
    cdef const unsigned char **_data
    cdef int64_t *_end
    cdef int64_t *_pos
    cdef int64_t *_last
    # each file's head record (parsed, not yet written): payload offset, length, ts
    cdef int64_t *_hoff
    cdef int64_t *_hlen
    cdef int64_t *_hts
    cdef char *_have
    cdef int _k
    cdef public int64_t frames, bytes, control, ring_drops, repeats, torn

    def __cinit__(self, buffers):
        cdef int i
        cdef const unsigned char[::1] b
        self._keep = list(buffers)
        self._k = len(self._keep)
        n = max(self._k, 1)
        self._data = <const unsigned char **>malloc(n * sizeof(void *))
        self._end = <int64_t *>malloc(n * sizeof(int64_t))
        self._pos = <int64_t *>malloc(n * sizeof(int64_t))
        self._last = <int64_t *>malloc(n * sizeof(int64_t))
        self._hoff = <int64_t *>malloc(n * sizeof(int64_t))
        self._hlen = <int64_t *>malloc(n * sizeof(int64_t))
        self._hts = <int64_t *>malloc(n * sizeof(int64_t))
        self._have = <char *>malloc(n)
        if (self._data == NULL or self._end == NULL or self._pos == NULL or self._last == NULL
                or self._hoff == NULL or self._hlen == NULL or self._hts == NULL
                or self._have == NULL):
            raise MemoryError()
        for i in range(self._k):
            b = self._keep[i]
            self._end[i] = b.shape[0]
            self._data[i] = &b[0] if b.shape[0] else NULL
            self._pos[i] = _MAGIC_LEN
            self._last[i] = -1
            self._have[i] = 0
            self._advance(i)

    def __dealloc__(self):
        free(self._data)
        free(self._end)
        free(self._pos)
        free(self._last)
        free(self._hoff)
        free(self._hlen)
        free(self._hts)
        free(self._have)

    cdef void _advance(self, int i) noexcept nogil:
        """Parse file i's next record that is not a repeat into its head (or none)."""
        cdef const unsigned char *p = self._data[i]
        cdef int64_t pos = self._pos[i], end = self._end[i]
        cdef uint32_t length
        cdef uint64_t seq
        self._have[i] = 0
        while pos < end:
            if end - pos < _HDR:
                self.torn += 1
                pos = end
                break
            length = _u32(p + pos)
            if <uint64_t>(end - pos - _HDR) < length:
                self.torn += 1
                pos = end
                break
            seq = _u64(p + pos + 16)
            if self._last[i] >= 0 and seq <= <uint64_t>self._last[i]:
                self.repeats += 1
                pos += _HDR + length
                continue
            self._last[i] = <int64_t>seq
            self._hoff[i] = pos + _HDR
            self._hlen[i] = length
            self._hts[i] = _i64(p + pos + 8)
            self._have[i] = 1
            pos += _HDR + length
            break
        self._pos[i] = pos

    cdef inline int _pick(self) noexcept nogil:
        cdef int i, j = -1
        for i in range(self._k):
            if self._have[i] and (j < 0 or self._hts[i] < self._hts[j]):
                j = i
        return j

    @property
    def next_ts(self):
        """Receive time of the next frame to write, or None when all are written."""
        j = self._pick()
        return None if j < 0 else self._hts[j]

    def pump(self, addresses, int64_t max_frames, int64_t until_ts, bint pause,
             size_t control_address=0):
        """Write frames into the rings at ``addresses`` (``Ring.address`` of each, in ring
        order; a frame goes to ``route % len(addresses)``) until every frame is written
        (DONE), a ring is full under the pause policy (FULL: that frame is kept for the next
        call), the next frame's receive time is past ``until_ts`` (PACED) or ``max_frames``
        frames were handled (BUDGET). A frame without a symbol goes to the ring at
        ``control_address`` when given (the consumer's control messages; that ring's own
        policy decides, and counts, what does not fit), else nowhere; ``control`` counts it."""
        cdef void *ctl = <void *>control_address
        cdef Py_ssize_t nr = len(addresses), r
        if nr == 0:
            raise ValueError("no rings")
        cdef void **bases = <void **>malloc(nr * sizeof(void *))
        if bases == NULL:
            raise MemoryError()
        cdef int status = _BUDGET, j, w
        cdef int32_t route
        cdef int64_t done = 0, length
        cdef const unsigned char *payload
        cdef int pid = os.getpid()
        try:
            for r in range(nr):
                bases[r] = <void *><size_t>addresses[r]
                ff_ring_set_producer(bases[r], pid)
            if ctl != NULL:
                ff_ring_set_producer(ctl, pid)
            with nogil:
                while True:
                    if done >= max_frames:
                        status = _BUDGET
                        break
                    j = self._pick()
                    if j < 0:
                        status = _DONE
                        break
                    if self._hts[j] > until_ts:
                        status = _PACED
                        break
                    payload = self._data[j] + self._hoff[j]
                    length = self._hlen[j]
                    route = ff_route(<const char *>payload, length)
                    if route < 0:
                        # no symbol: the live listener's control path, not a ring's
                        self.control += 1
                        if ctl != NULL:
                            ff_ring_write(ctl, payload, <uint32_t>length, _DATA_TYPE,
                                          self._hts[j], -1)
                        self._advance(j)
                        done += 1
                        continue
                    r = route % nr
                    w = ff_ring_try_write(bases[r], payload, <uint32_t>length, _DATA_TYPE,
                                          self._hts[j], route)
                    if w == 0:
                        if pause:
                            status = _FULL
                            break
                        # the ring's own policy: wait up to its bound, or drop (counted there)
                        w = ff_ring_write(bases[r], payload, <uint32_t>length, _DATA_TYPE,
                                          self._hts[j], route)
                    elif w < 0:
                        # larger than the ring's largest record: dropped and counted there
                        w = ff_ring_write(bases[r], payload, <uint32_t>length, _DATA_TYPE,
                                          self._hts[j], route)
                    if w == 1:
                        self.frames += 1
                        self.bytes += length
                    else:
                        self.ring_drops += 1
                    self._advance(j)
                    done += 1
        finally:
            free(bases)
        return status
