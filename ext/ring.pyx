# cython: freethreading_compatible = False
"""Single-producer single-consumer rings in named shared memory (extension ``fastfeed._ring``).

The layout and the lock-free protocol live in ``ring.h`` so that Cython producers (the network
process's listener) can call ``ff_ring_write`` with nothing but ``Ring.address``. This module
adds the segment lifecycle (create, attach with checks, unlink, stale cleanup) and the Python
API: ``write``/``write_many`` for producers, ``read_batch`` for consumers.
"""

import os

import numpy as np

from cpython.buffer cimport (PyBUF_WRITABLE, PyBuffer_FillInfo, PyBuffer_Release,
                              PyObject_GetBuffer)
from cpython.bytes cimport (PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize,
                            PyBytes_GET_SIZE)
from cpython.exc cimport PyErr_CheckSignals
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy

from ff_ring cimport *

from fastfeed import shm as _shm

__all__ = ["Ring", "Batch", "Doorbell", "RingError", "cleanup_stale",
           "HEADER_SIZE", "RECORD_HEADER_SIZE", "PAD_TYPE"]

HEADER_SIZE = FF_RING_HEADER_SIZE
RECORD_HEADER_SIZE = FF_REC_HEADER_SIZE
PAD_TYPE = FF_PAD_TYPE
MIN_CAPACITY = FF_RING_MIN_CAPACITY
MAX_CAPACITY = FF_RING_MAX_CAPACITY

_POLICIES = {"drop": FF_POLICY_DROP, "wait": FF_POLICY_WAIT, "block": FF_POLICY_BLOCK,
             "pause": FF_POLICY_PAUSE}
_POLICY_NAMES = {v: k for k, v in _POLICIES.items()}

# A blocking read sleeps in slices this long (ns) so Ctrl-C and signal handlers run promptly.
cdef int64_t _WAIT_SLICE_NS = 50_000_000
# Default batch size: big enough to amortise the per-batch Python cost (a few µs) to nothing
# per record, small enough that a batch's arrays stay in L2.
DEFAULT_BATCH = 4096


class RingError(RuntimeError):
    """A segment that is not a fastfeed ring, or a ring used against its contract."""


def cleanup_stale() -> list:
    """Unlink fastfeed segments in /dev/shm whose creating process is dead; return their names."""
    return _shm.cleanup_stale()


cdef class _Mapping:
    """Holds one mapping of a segment (made by ``fastfeed.shm.map_file``, the one place that
    opens segments) and its base address; munmap happens when the last reference (including
    every memoryview exported from it) is gone, so a closed Ring never leaves a dangling view."""
    cdef char *ptr
    cdef Py_ssize_t size
    cdef object _mm
    cdef Py_buffer _view
    cdef bint _has_view

    def __getbuffer__(self, Py_buffer *view, int flags):
        if self.ptr == NULL:
            raise ValueError("mapping is closed")
        PyBuffer_FillInfo(view, self, self.ptr, self.size, 0, flags)

    def __releasebuffer__(self, Py_buffer *view):
        pass

    def __dealloc__(self):
        if self._has_view:
            PyBuffer_Release(&self._view)
            self._has_view = False
            self.ptr = NULL
            self._mm.close()


cdef _Mapping _map_segment(str path, Py_ssize_t size, bint create):
    mm = _shm.map_file(path, size, create=create)
    cdef _Mapping m = _Mapping.__new__(_Mapping)
    m._mm = mm
    PyObject_GetBuffer(mm, &m._view, PyBUF_WRITABLE)
    m._has_view = True
    m.ptr = <char *>m._view.buf
    m.size = m._view.len
    return m


cdef class Batch:
    """Records read in place from a ring, valid until :meth:`release`.

    Arrays (NumPy views of the ring's scratch arrays, length ``len(batch)``):
    ``offsets`` and ``lengths`` (int64, payload position in ``buffer`` and size), ``recv_ts``
    (int64 µs), ``seqs`` (uint64), ``types`` and ``routes`` (int32). ``buffer`` is a read-only
    memoryview of the ring's whole data region: ``buffer[offsets[i]:offsets[i] + lengths[i]]``
    is record i, with no copy. Nothing here may be used after ``release()``: the producer
    reuses the memory and the next batch reuses the arrays.
    """
    cdef Ring _ring
    cdef readonly uint32_t count
    cdef uint64_t _start, _end, _expected, _gaps, _gaps_before
    cdef bint _released

    def __len__(self):
        return self.count

    cdef inline _check(self):
        if self._released:
            raise RingError("batch used after release()")

    @property
    def offsets(self):
        self._check()
        return self._ring._offsets[:self.count]

    @property
    def lengths(self):
        self._check()
        return self._ring._lengths[:self.count]

    @property
    def recv_ts(self):
        self._check()
        return self._ring._recv_ts[:self.count]

    @property
    def seqs(self):
        self._check()
        return self._ring._seqs[:self.count]

    @property
    def types(self):
        self._check()
        return self._ring._types[:self.count]

    @property
    def routes(self):
        self._check()
        return self._ring._routes[:self.count]

    @property
    def buffer(self):
        self._check()
        return self._ring._data_view

    @property
    def gaps(self):
        """Sequence numbers skipped (frames dropped by the producer) before or inside this batch."""
        return self._gaps - self._gaps_before

    @property
    def start_position(self):
        """Consumer position (byte counter) where this batch starts."""
        return self._start

    @property
    def end_position(self):
        """Consumer position after this batch; committed by release()."""
        return self._end

    @property
    def released(self):
        return self._released

    def frame(self, Py_ssize_t i):
        """Record i's payload as a read-only memoryview into the ring (no copy)."""
        self._check()
        if i < 0 or i >= self.count:
            raise IndexError(i)
        cdef int64_t off = self._ring._off_p[i]
        return self._ring._data_view[off:off + self._ring._len_p[i]]

    def pack(self, Py_ssize_t start=0, Py_ssize_t stop=-1, uint32_t tag=0) -> bytes:
        """Records [start, stop) (stop -1: to the end) as one ``bytes``, each record as
        ``u32 length | u32 tag | i64 recv_ts | u64 seq | payload``, little-endian, unpadded:
        the record layout of a fastfeed capture file. One pass in C, where a Python loop
        over the records costs about 0.5 µs each."""
        self._check()
        if stop < 0:
            stop = self.count
        if start < 0 or start > stop or stop > self.count:
            raise IndexError(f"records {start}..{stop} of a batch of {self.count}")
        cdef Ring r = self._ring
        cdef const uint8_t *data = ff_ring_data(r._live())
        cdef Py_ssize_t i, total = 0
        cdef uint32_t n
        for i in range(start, stop):
            total += 24 + r._len_p[i]
        out = PyBytes_FromStringAndSize(NULL, total)
        cdef char *q = PyBytes_AS_STRING(out)
        for i in range(start, stop):
            n = <uint32_t>r._len_p[i]
            memcpy(q, &n, 4)
            memcpy(q + 4, &tag, 4)
            memcpy(q + 8, &r._ts_p[i], 8)
            memcpy(q + 16, &r._seq_p[i], 8)
            memcpy(q + 24, data + r._off_p[i], n)
            q += 24 + n
        return out

    def release(self):
        """Commit the consumer position past this batch; the producer may then reuse its space.

        Call it only once the batch is fully handled: a consumer that dies before releasing
        leaves the batch in the ring for its successor. Idempotent.
        """
        if not self._released:
            self._ring._release(self)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        # On an exception the batch is not released: its records stay for the next reader.
        if exc_type is None:
            self.release()
        else:
            self._ring._abandon(self)

    def __repr__(self):
        return "<Batch count=%d positions=%d..%d%s>" % (
            self.count, self._start, self._end, " released" if self._released else "")


cdef class Ring:
    """A single-producer single-consumer ring of variable-length records in shared memory.

    Create with :meth:`create` (the creator owns and unlinks the segment) and attach from other
    processes with :meth:`attach` by ``ring.name``. One process writes (``write``,
    ``write_many``, or ``ff_ring_write`` from C/Cython at ``address``), one reads
    (``read_batch``). Both roles may use the same handle in tests.
    """
    cdef _Mapping _map
    cdef void *_base
    cdef ff_ring_header *_h
    cdef readonly str name
    cdef readonly bint owner
    cdef public bint busy_poll
    cdef bint _producer_set, _consumer_set, _closed
    cdef Batch _pending
    cdef object _data_view
    # consumer scratch arrays and their raw pointers
    cdef uint32_t _cap_records
    cdef object _offsets, _lengths, _recv_ts, _seqs, _types, _routes
    cdef int64_t *_off_p
    cdef int64_t *_len_p
    cdef int64_t *_ts_p
    cdef uint64_t *_seq_p
    cdef int32_t *_type_p
    cdef int32_t *_route_p

    def __cinit__(self):
        self._base = NULL
        self._h = NULL

    @classmethod
    def create(cls, str name, capacity=1 << 22, *, full_policy="wait", wait_timeout_us=5000,
               busy_poll=False):
        """Create a ring in a new segment named ``fastfeed.<pid>.<start>.<name>``.

        capacity: data bytes, a power of two (>= 1024). The largest record payload is
            capacity/8 - 32 bytes (``max_payload``).
        full_policy: what a producer does when the ring is full: "wait" up to
            ``wait_timeout_us`` then drop, "drop" at once, "block" until there is room, or
            "pause": refuse at once without dropping (the write returns False, nothing is
            counted as dropped and no sequence number is used: the producer keeps the frame,
            stops reading its source and writes it again once there is room). Every drop is
            counted (``dropped``) and skips a sequence number.
        wait_timeout_us: bound for "wait". 5 ms outlasts a consumer's usual scheduling hiccup
            while keeping a stuck consumer from stalling the network process for long.
        busy_poll: default wait mode of this handle's ``read_batch``.

        Segments left by dead processes are removed first (see :func:`cleanup_stale`).
        """
        cdef uint64_t cap
        try:
            cap = capacity
        except OverflowError:
            raise ValueError("capacity must be a positive power of two") from None
        if cap < FF_RING_MIN_CAPACITY or cap > FF_RING_MAX_CAPACITY or (cap & (cap - 1)):
            raise ValueError("capacity must be a power of two between %d and %d, got %r"
                             % (FF_RING_MIN_CAPACITY, FF_RING_MAX_CAPACITY, capacity))
        if full_policy not in _POLICIES:
            raise ValueError("full_policy must be one of %s, got %r"
                             % (sorted(_POLICIES), full_policy))
        if wait_timeout_us < 0:
            raise ValueError("wait_timeout_us must be >= 0")
        _shm.cleanup_stale()
        seg = _shm.segment_name(name)
        cdef _Mapping m = _map_segment(os.path.join(_shm.SHM_DIR, seg),
                                       ff_ring_segment_size(cap), True)
        pid = os.getpid()
        ticks = _shm.process_start_ticks(pid) or 0
        # A fresh ftruncate'd segment reads as zeros: only the constants need writing.
        if ff_ring_init(m.ptr, cap, _POLICIES[full_policy],
                        <int64_t>(wait_timeout_us * 1000), pid, ticks) != 0:
            raise ValueError("invalid capacity")
        cdef Ring r = cls.__new__(cls)
        r._setup(m, seg, True, busy_poll)
        return r

    @classmethod
    def attach(cls, str name, *, busy_poll=False):
        """Map an existing ring by its full segment name (``ring.name`` of the creator).

        Checks the magic number, version, header layout and that the segment is as large as
        its capacity says. Raises FileNotFoundError if there is no such segment and RingError
        if it is not a compatible fastfeed ring.
        """
        cdef _Mapping m = _map_segment(os.path.join(_shm.SHM_DIR, name), 0, False)
        cdef ff_ring_header *h = ff_ring_hdr(m.ptr)
        if <uint64_t>m.size < FF_RING_HEADER_SIZE + FF_RING_MIN_CAPACITY:
            raise RingError("%s: %d bytes is too small for a ring" % (name, m.size))
        if ff_ld_u64(&h.magic) != FF_RING_MAGIC:
            raise RingError("%s: bad magic (not a fastfeed ring, or not initialised yet)" % name)
        if h.version != FF_RING_VERSION:
            raise RingError("%s: ring version %d, this build speaks %d"
                            % (name, h.version, FF_RING_VERSION))
        if h.header_size != FF_RING_HEADER_SIZE or h.rec_header_size != FF_REC_HEADER_SIZE:
            raise RingError("%s: incompatible header layout" % name)
        cap = h.capacity
        if cap < FF_RING_MIN_CAPACITY or (cap & (cap - 1)) or <uint64_t>m.size != ff_ring_segment_size(cap):
            raise RingError("%s: capacity %d does not match the segment size %d"
                            % (name, cap, m.size))
        cdef Ring r = cls.__new__(cls)
        r._setup(m, name, False, busy_poll)
        return r

    cdef _setup(self, _Mapping m, str name, bint owner, bint busy_poll):
        self._map = m
        self._base = m.ptr
        self._h = ff_ring_hdr(m.ptr)
        self.name = name
        self.owner = owner
        self.busy_poll = busy_poll
        self._data_view = memoryview(m)[FF_RING_HEADER_SIZE:].toreadonly()
        self._cap_records = 0

    cdef inline void *_live(self) except NULL:
        if self._base == NULL:
            raise ValueError("ring is closed")
        return self._base

    # -------------------------------------------------------------------------------------
    # properties

    @property
    def address(self):
        """Base address of this process's mapping, for ``ff_ring_write`` in Cython/C code.
        Valid while this Ring is open."""
        return <size_t>self._live()

    @property
    def capacity(self):
        """Size of the data region in bytes."""
        self._live()
        return self._h.capacity

    @property
    def max_payload(self):
        """Largest record payload in bytes (capacity/8 - 32)."""
        self._live()
        return self._h.max_payload

    @property
    def full_policy(self):
        self._live()
        return _POLICY_NAMES[self._h.full_policy]

    @property
    def wait_timeout_us(self):
        self._live()
        return self._h.wait_timeout_ns // 1000

    @property
    def written(self):
        """Records published by the producer."""
        self._live()
        return ff_ld_u64(&self._h.written)

    @property
    def dropped(self):
        """Frames the producer dropped (ring full past its policy, or too large)."""
        self._live()
        return ff_ld_u64(&self._h.dropped)

    @property
    def dropped_oversize(self):
        """Frames dropped because they exceeded max_payload (included in ``dropped``)."""
        self._live()
        return ff_ld_u64(&self._h.dropped_oversize)

    @property
    def full_waits(self):
        """Times the producer found the ring full and had to wait or drop."""
        self._live()
        return ff_ld_u64(&self._h.full_waits)

    @property
    def next_seq(self):
        """Sequence number the next frame will get (= frames written + dropped)."""
        self._live()
        return ff_ld_u64(&self._h.next_seq)

    @property
    def consumed(self):
        """Records released by consumers."""
        self._live()
        return ff_ld_u64(&self._h.consumed)

    @property
    def gaps(self):
        """Sequence numbers the consumer found missing (dropped frames it has seen past)."""
        self._live()
        return ff_ld_u64(&self._h.gaps)

    @property
    def batches(self):
        """Batches released by consumers."""
        self._live()
        return ff_ld_u64(&self._h.batches)

    @property
    def head(self):
        """Consumer position (bytes ever consumed, padding included)."""
        self._live()
        return ff_ld_u64(&self._h.head)

    @property
    def tail(self):
        """Producer position (bytes ever published, padding included)."""
        self._live()
        return ff_ld_u64(&self._h.tail)

    @property
    def used(self):
        """Bytes published and not yet released."""
        return self.tail - self.head

    @property
    def producer_pid(self):
        """Pid of the last process that wrote (0 if none)."""
        self._live()
        return ff_ld_i32(&self._h.producer_pid)

    @property
    def consumer_pid(self):
        """Pid of the last process that read (0 if none)."""
        self._live()
        return ff_ld_i32(&self._h.consumer_pid)

    @property
    def owner_pid(self):
        self._live()
        return self._h.owner_pid

    @property
    def producer_alive(self):
        """True while the process recorded as producer runs."""
        return _pid_alive(self.producer_pid)

    @property
    def consumer_alive(self):
        """True while the process recorded as consumer runs."""
        return _pid_alive(self.consumer_pid)

    @property
    def consumer_heartbeat_ns(self):
        """CLOCK_MONOTONIC (ns) of the consumer's last read attempt."""
        self._live()
        return ff_ld_i64(&self._h.consumer_heartbeat_ns)

    @property
    def closed(self):
        """True once the owner has shut the ring down (or this handle is closed)."""
        if self._base == NULL:
            return True
        return ff_ld_u32(&self._h.closed) != 0

    def stats(self) -> dict:
        """All counters at once, as a dict."""
        return {k: getattr(self, k) for k in (
            "capacity", "written", "dropped", "dropped_oversize", "full_waits", "next_seq",
            "consumed", "gaps", "batches", "head", "tail", "producer_pid", "consumer_pid")}

    # -------------------------------------------------------------------------------------
    # producer

    cdef inline void _as_producer(self):
        if not self._producer_set:
            ff_ring_set_producer(self._base, os.getpid())
            self._producer_set = True

    def write(self, data, *, int32_t type=1, int64_t recv_ts=0, int32_t route=0):
        """Write one record (any bytes-like payload). Returns True if written, False if the
        ring's full-ring policy dropped it (counted in ``dropped``), or, under "pause", if it
        did not fit (not dropped: write it again later).

        Raises ValueError if the payload exceeds ``max_payload`` and if ``type`` is the
        padding type (-1). Waiting for space (policies "wait" and "block") releases the GIL.
        """
        cdef void *base = self._live()
        cdef const unsigned char[::1] mv
        cdef const char *p
        cdef Py_ssize_t n
        cdef int r
        if type == FF_PAD_TYPE:
            raise ValueError("type -1 is reserved for padding records")
        if PyBytes_CheckExact(data):
            p = PyBytes_AS_STRING(data)
            n = PyBytes_GET_SIZE(data)
        else:
            mv = data
            n = mv.shape[0]
            p = <const char *>&mv[0] if n > 0 else <const char *>""
        if n > self._h.max_payload:
            raise ValueError("payload of %d bytes exceeds max_payload (%d) of ring %s"
                             % (n, self._h.max_payload, self.name))
        self._as_producer()
        r = ff_ring_try_write(base, p, <uint32_t>n, type, recv_ts, route)
        if r == 1:
            return True
        with nogil:
            r = ff_ring_write(base, p, <uint32_t>n, type, recv_ts, route)
        return r == 1

    def write_many(self, data, lengths, *, int32_t type=1, recv_ts=None, routes=None):
        """Write consecutive frames of ``data`` (bytes-like) whose sizes are ``lengths``, one
        record each, applying the full-ring policy per frame, without the GIL.

        recv_ts / routes: optional int64 / int32 arrays, one value per frame (default 0).
        Frames larger than ``max_payload`` are dropped and counted, as the C producer does.
        Returns the number of records written (the rest were dropped and counted).
        """
        cdef void *base = self._live()
        cdef const unsigned char[::1] buf = data
        cdef int64_t[::1] lens = np.ascontiguousarray(lengths, dtype=np.int64)
        cdef Py_ssize_t count = lens.shape[0], i
        cdef int64_t[::1] ts
        cdef int32_t[::1] rt
        cdef bint have_ts = recv_ts is not None, have_rt = routes is not None
        if type == FF_PAD_TYPE:
            raise ValueError("type -1 is reserved for padding records")
        if have_ts:
            ts = np.ascontiguousarray(recv_ts, dtype=np.int64)
            if ts.shape[0] != count:
                raise ValueError("recv_ts must have one value per frame")
        if have_rt:
            rt = np.ascontiguousarray(routes, dtype=np.int32)
            if rt.shape[0] != count:
                raise ValueError("routes must have one value per frame")
        cdef int64_t total = 0
        for i in range(count):
            if lens[i] < 0:
                raise ValueError("negative length")
            total += lens[i]
        if total > buf.shape[0]:
            raise ValueError("lengths add up to %d bytes, data has %d" % (total, buf.shape[0]))
        if count == 0:
            return 0
        self._as_producer()
        cdef const unsigned char *p = &buf[0]
        cdef Py_ssize_t written = 0
        cdef int64_t t = 0
        cdef int32_t ro = 0
        cdef uint32_t n
        with nogil:
            for i in range(count):
                if have_ts:
                    t = ts[i]
                if have_rt:
                    ro = rt[i]
                # Lengths above 4 GiB cannot be a record: clamp so the ring counts a drop.
                n = <uint32_t>lens[i] if lens[i] <= <int64_t>0xffffffff else <uint32_t>0xffffffff
                written += ff_ring_write(base, p, n, type, t, ro)
                p += lens[i]
        return written

    # -------------------------------------------------------------------------------------
    # consumer

    cdef _ensure_arrays(self, uint32_t n):
        if n <= self._cap_records:
            return
        self._offsets = np.empty(n, np.int64)
        self._lengths = np.empty(n, np.int64)
        self._recv_ts = np.empty(n, np.int64)
        self._seqs = np.empty(n, np.uint64)
        self._types = np.empty(n, np.int32)
        self._routes = np.empty(n, np.int32)
        cdef int64_t[::1] a = self._offsets
        cdef int64_t[::1] b = self._lengths
        cdef int64_t[::1] c = self._recv_ts
        cdef uint64_t[::1] d = self._seqs
        cdef int32_t[::1] e = self._types
        cdef int32_t[::1] f = self._routes
        self._off_p = &a[0]
        self._len_p = &b[0]
        self._ts_p = &c[0]
        self._seq_p = &d[0]
        self._type_p = &e[0]
        self._route_p = &f[0]
        self._cap_records = n

    def read_batch(self, Py_ssize_t max_records=DEFAULT_BATCH, timeout=None, *, busy_poll=None):
        """Wait for records and return up to ``max_records`` of them as a :class:`Batch`, read in
        place; None if none arrived within ``timeout`` seconds (None: wait forever, 0: poll).

        The records stay in the ring until ``batch.release()``; call it once the batch is fully
        handled. Only one batch may be outstanding per handle. Waiting spins, yields, then
        sleeps on a futex (or only spins with busy_poll=True), without the GIL.
        """
        cdef void *base = self._live()
        cdef ff_ring_header *h = self._h
        cdef int64_t deadline, left, slice_ns
        cdef int busy = self.busy_poll if busy_poll is None else bool(busy_poll)
        cdef uint64_t pos, expected, gaps, head
        cdef uint32_t n
        cdef int ok
        cdef Batch b
        if self._pending is not None and not self._pending._released:
            raise RingError("release() the previous batch before reading the next one")
        if max_records <= 0 or max_records > 0xffffffff:
            raise ValueError("max_records must be positive")
        self._ensure_arrays(<uint32_t>max_records)
        if not self._consumer_set:
            ff_st_i32(&h.consumer_pid, os.getpid())
            self._consumer_set = True
        if timeout is None:
            deadline = -1
        else:
            if timeout < 0:
                raise ValueError("timeout must be >= 0 or None")
            deadline = ff_now_ns() + <int64_t>(timeout * 1e9)
        while True:
            ff_st_i64(&h.consumer_heartbeat_ns, ff_now_ns())
            head = ff_ld_u64(&h.head)
            if not ff_ring_available(base, head):
                if deadline >= 0:
                    left = deadline - ff_now_ns()
                    if left <= 0:
                        return None
                    slice_ns = left if left < _WAIT_SLICE_NS else _WAIT_SLICE_NS
                else:
                    slice_ns = _WAIT_SLICE_NS
                with nogil:
                    ok = ff_ring_wait(base, head, slice_ns, busy)
                if not ok:
                    PyErr_CheckSignals()
                    if ff_ld_u32(&h.closed) and not ff_ring_available(base, head):
                        return None
                    continue
            pos = head
            expected = ff_ld_u64(&h.next_expected_seq)
            gaps = ff_ld_u64(&h.gaps)
            n = ff_ring_poll(base, <uint32_t>max_records, &pos, &expected, &gaps, self._off_p,
                             self._len_p, self._ts_p, self._seq_p, self._type_p, self._route_p)
            if n == 0:
                if pos == head:
                    raise RingError("%s: corrupted record header at position %d" % (self.name, head))
                # Only padding was published: step over it and wait for the record behind it.
                ff_ring_skip(base, pos)
                continue
            b = Batch.__new__(Batch)
            b._ring = self
            b.count = n
            b._start = head
            b._end = pos
            b._expected = expected
            b._gaps = gaps
            b._gaps_before = ff_ld_u64(&h.gaps)
            self._pending = b
            return b

    cdef _release(self, Batch b):
        self._live()
        if b._ring is not self or self._pending is not b:
            raise RingError("batch does not belong to this ring's current read")
        ff_ring_release(self._base, b._end, b._expected, b._gaps, b.count)
        b._released = True
        self._pending = None

    cdef _abandon(self, Batch b):
        # Give the batch up without committing: the same records are read again next time.
        b._released = True
        if self._pending is b:
            self._pending = None

    def wait_readable(self, timeout=None, *, busy_poll=None) -> bool:
        """Wait until records are available without reading them. True if some are."""
        cdef void *base = self._live()
        cdef int busy = self.busy_poll if busy_poll is None else bool(busy_poll)
        cdef int64_t deadline = -1 if timeout is None else ff_now_ns() + <int64_t>(timeout * 1e9)
        cdef int64_t left
        cdef uint64_t head
        cdef int ok
        while True:
            head = ff_ld_u64(&self._h.head)
            left = _WAIT_SLICE_NS
            if deadline >= 0:
                left = deadline - ff_now_ns()
                if left <= 0:
                    return bool(ff_ring_available(base, head))
                if left > _WAIT_SLICE_NS:
                    left = _WAIT_SLICE_NS
            with nogil:
                ok = ff_ring_wait(base, head, left, busy)
            if ok:
                return True
            PyErr_CheckSignals()
            if ff_ld_u32(&self._h.closed):
                return bool(ff_ring_available(base, head))

    # -------------------------------------------------------------------------------------
    # testing hooks (aeron's tests force wraps the same way)

    def _set_positions(self, uint64_t pos):
        """Move an empty ring's head and tail to byte position ``pos`` (8-aligned), e.g. just
        before the end of the data region to force a wrap. Tests only: no one else may use the
        ring meanwhile."""
        self._live()
        cdef ff_ring_header *h = self._h
        if ff_ld_u64(&h.tail) != ff_ld_u64(&h.head) or self._pending is not None:
            raise RingError("ring must be empty")
        if pos % FF_REC_ALIGN:
            raise ValueError("position must be 8-aligned")
        ff_st_u64(&h.tail, pos)
        ff_st_u64(&h.cached_head, pos)
        ff_st_u64(&h.head, pos)

    @property
    def _consumer_waiting(self):
        """True while a consumer sleeps on the futex (tests use it to prove the wake-up)."""
        self._live()
        return ff_ld_u32(&self._h.consumer_waiting) != 0

    @property
    def _producer_waiting(self):
        self._live()
        return ff_ld_u32(&self._h.producer_waiting) != 0

    def _claim_commit(self, data, Py_ssize_t reserve, *, bint commit=True, int32_t type=1,
                      int64_t recv_ts=0, int32_t route=0):
        """Write through ff_ring_claim + ff_ring_commit (or abort): the zero-copy C path, for
        tests. Reserves ``reserve`` bytes, copies ``data`` (<= reserve) into them. Returns True
        if committed, False if the claim failed (dropped and counted) or was aborted."""
        cdef void *base = self._live()
        cdef const unsigned char[::1] mv = data
        cdef Py_ssize_t n = mv.shape[0]
        cdef void *p
        if n > reserve or reserve > 0xffffffff:
            raise ValueError("data longer than the reservation")
        self._as_producer()
        with nogil:
            p = ff_ring_claim(base, <uint32_t>reserve)
        if p == NULL:
            return False
        if n:
            memcpy(p, &mv[0], n)
        if not commit:
            ff_ring_abort(base)
            return False
        return ff_ring_commit(base, <uint32_t>n, type, recv_ts, route) == 1

    # -------------------------------------------------------------------------------------
    # lifecycle

    def wake(self):
        """Wake every process sleeping on this ring (they re-check their state)."""
        ff_ring_wake_all(self._live())

    def shutdown(self):
        """Mark the ring closed: waiting producers give up (and count a drop), sleeping
        consumers return once the ring is empty."""
        cdef void *base = self._live()
        ff_st_u32(&self._h.closed, 1)
        ff_ring_wake_all(base)

    def close(self):
        """Unmap this handle (views still held keep the memory mapped until released).
        The owner's close also shuts the ring down. Idempotent."""
        if self._base == NULL:
            return
        if self.owner:
            self.shutdown()
        self._pending = None
        self._data_view = None
        self._base = NULL
        self._h = NULL
        self._map = None

    def unlink(self):
        """Remove the segment's name (owner's job); mapped handles keep working."""
        try:
            os.unlink(os.path.join(_shm.SHM_DIR, self.name))
        except FileNotFoundError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        if self.owner:
            self.unlink()

    def __repr__(self):
        if self._base == NULL:
            return "<Ring %r closed>" % self.name
        return "<Ring %r capacity=%d policy=%s used=%d written=%d dropped=%d>" % (
            self.name, self._h.capacity, self.full_policy, self.used, self.written, self.dropped)


cdef class Doorbell:
    """A wake-up word in shared memory: several producers ring it after publishing, one waiter
    sleeps on it (futex) until any of them has. Lets one consumer wait on many rings at once.

    ``buffer``: a writable buffer (a shared-memory segment) holding the 8-byte bell at
    ``offset`` (4-aligned, zero-initialised); the Doorbell keeps the buffer exported while it
    lives. Waiting protocol (the re-check is what makes it race-free)::

        while not ready():
            token = bell.prepare()
            if ready():
                bell.cancel()
                break
            bell.wait(token, timeout)
    """
    cdef Py_buffer _view
    cdef bint _has_view
    cdef uint32_t *_bell

    def __cinit__(self, buffer, Py_ssize_t offset=0):
        PyObject_GetBuffer(buffer, &self._view, PyBUF_WRITABLE)
        self._has_view = True
        if offset < 0 or offset % 4 or offset + 8 > self._view.len:
            raise ValueError("the bell needs 8 bytes at a 4-aligned offset inside the buffer")
        self._bell = <uint32_t *>(<char *>self._view.buf + offset)

    def __dealloc__(self):
        if self._has_view:
            PyBuffer_Release(&self._view)

    def ring(self) -> None:
        """Wake the waiter if it sleeps (cheap when it does not: a fence and a load)."""
        ff_bell_ring(self._bell)

    def prepare(self) -> int:
        """Announce that the caller is about to sleep; returns the token for wait()."""
        return ff_bell_prepare(self._bell)

    def cancel(self) -> None:
        """The condition became true after prepare(): do not sleep."""
        ff_bell_cancel(self._bell)

    def wait(self, uint32_t token, timeout=None) -> None:
        """Sleep until rung (or ``timeout`` seconds; None: a 50 ms slice, so signals run)."""
        cdef int64_t ns = _WAIT_SLICE_NS if timeout is None else <int64_t>(timeout * 1e9)
        if ns < 0:
            ns = 0
        with nogil:
            ff_bell_wait(self._bell, token, ns)
        PyErr_CheckSignals()


def _pid_alive(int pid) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
