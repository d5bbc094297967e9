# cython: freethreading_compatible = False
"""C loops the benchmarks time without Python's cost per message (built by setup.py as
``benchmarks/_loops``; never part of the installed package).

- ``latency_producer`` / ``latency_consumer``: the ring's own one-way latency
  (benchmarks/bench_ring.py). They drive a ring through its public ``Ring.address`` and the C
  API in ``ring.h``, as the network process's listener does.
- ``scan_copy``: a plain ``memchr`` + ``memcpy`` pass over frames in one region, the memory
  floor that the decoder's bytes/s is compared with (benchmarks/bench_decode.py).
"""

import os

import numpy as np

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memchr, memcpy

from ff_ring cimport *


def latency_producer(ring, Py_ssize_t n, Py_ssize_t size, int64_t interval_ns) -> int:
    """Write ``n`` records of ``size`` (>= 8) bytes to ``ring``, one every ``interval_ns``
    (busy-waiting between them so the pacing itself never sleeps). The payload's first 8
    bytes carry the CLOCK_MONOTONIC time in ns taken just before ``ff_ring_write``. Returns the
    number written."""
    cdef void *base = <void *><size_t>ring.address
    cdef bytearray buf = bytearray(max(size, 8))
    cdef unsigned char *p = buf
    cdef Py_ssize_t i, written = 0
    cdef int64_t next_t, now
    ff_ring_set_producer(base, os.getpid())
    with nogil:
        next_t = ff_now_ns()
        for i in range(n):
            while True:
                now = ff_now_ns()
                if now >= next_t:
                    break
            next_t = now + interval_ns
            now = ff_now_ns()
            memcpy(p, &now, 8)
            written += ff_ring_write(base, p, <uint32_t>size, 1, 0, 0)
    return written


def latency_consumer(ring, Py_ssize_t n, bint busy, double timeout=60.0):
    """Read ``n`` records one batch at a time as they arrive (spin only if ``busy``, else
    spin/yield/futex) and return their one-way latencies in ns as an int64 array (shorter if
    ``timeout`` s passed first)."""
    cdef void *base = <void *><size_t>ring.address
    cdef ff_ring_header *h = ff_ring_hdr(base)
    cdef uint8_t *data = ff_ring_data(base)
    out = np.empty(n, np.int64)
    cdef int64_t[::1] lat = out
    cdef int64_t off[64]
    cdef int64_t lens[64]
    cdef int64_t ts[64]
    cdef uint64_t seqs[64]
    cdef int32_t types[64]
    cdef int32_t routes[64]
    cdef uint64_t head, pos, expected, gaps
    cdef uint32_t k, j
    cdef int64_t stamp, now, deadline
    cdef Py_ssize_t got = 0
    ff_st_i32(&h.consumer_pid, os.getpid())
    with nogil:
        deadline = ff_now_ns() + <int64_t>(timeout * 1e9)
        while got < n:
            head = ff_ld_u64(&h.head)
            if not ff_ring_wait(base, head, 100000000, busy):
                if ff_now_ns() > deadline:
                    break
                continue
            pos = head
            expected = ff_ld_u64(&h.next_expected_seq)
            gaps = ff_ld_u64(&h.gaps)
            k = ff_ring_poll(base, 64, &pos, &expected, &gaps, off, lens, ts, seqs, types, routes)
            now = ff_now_ns()
            for j in range(k):
                if got < n:
                    memcpy(&stamp, data + off[j], 8)
                    lat[got] = now - stamp
                    got += 1
            if k:
                ff_ring_release(base, pos, expected, gaps, k)
            elif pos != head:
                ff_ring_skip(base, pos)
    return out[:got]


def scan_copy(data, offsets, lengths, out) -> int:
    """For each frame ``data[offsets[i]:offsets[i] + lengths[i]]``: one ``memchr`` over all of its
    bytes (for a byte no frame holds) and one ``memcpy`` of them into ``out`` (as large as
    ``data``): the least a reader that looks at every byte does.  Returns the bytes covered."""
    cdef Py_buffer src, dst
    cdef const int64_t[::1] off = offsets
    cdef const int64_t[::1] ln = lengths
    cdef Py_ssize_t i, n = off.shape[0], total = 0
    cdef const uint8_t *base
    cdef uint8_t *o
    if ln.shape[0] != n:
        raise ValueError("offsets and lengths differ in length")
    PyObject_GetBuffer(data, &src, PyBUF_SIMPLE)
    try:
        PyObject_GetBuffer(out, &dst, PyBUF_SIMPLE)
        try:
            if dst.len < src.len:
                raise ValueError("out is smaller than data")
            for i in range(n):
                if off[i] < 0 or ln[i] < 0 or off[i] + ln[i] > src.len:
                    raise ValueError(f"frame {i} lies outside data")
            base = <const uint8_t *>src.buf
            o = <uint8_t *>dst.buf
            with nogil:
                for i in range(n):
                    if memchr(base + off[i], 0, ln[i]) == NULL:
                        memcpy(o + off[i], base + off[i], ln[i])
                        total += ln[i]
        finally:
            PyBuffer_Release(&dst)
    finally:
        PyBuffer_Release(&src)
    return total
