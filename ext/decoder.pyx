# The Python face of ext/decode.h: configure a Decoder once, decode many batches.
from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeUTF8
from cpython.ref cimport Py_INCREF
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free
from libc.string cimport memchr, memcpy, memset

cimport cython
cimport numpy as cnp

import collections
import os

import numpy as np

cnp.import_array()

cdef extern from "numpy/arrayobject.h":
    # Not in Cython's numpy declarations (or not in this form); both steal a reference to
    # ``descr``.
    ctypedef struct PyTypeObject
    object PyArray_Empty(int nd, cnp.npy_intp *dims, cnp.dtype descr, int fortran)
    object PyArray_NewFromDescr(PyTypeObject *subtype, cnp.dtype descr, int nd, cnp.npy_intp *dims,
                                cnp.npy_intp *strides, void *data, int flags, object obj)

cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    struct timespec:
        time_t tv_sec
        long tv_nsec
    int clock_gettime(int clk, timespec *ts)
    int CLOCK_REALTIME

cdef extern from "symtab.h" nogil:
    ctypedef struct ff_symtab_hdr:
        unsigned long long magic
        uint32_t version
        uint32_t capacity
    ctypedef struct ff_symtab_entry:
        uint32_t off
        uint32_t len
    ctypedef struct ff_symtab:
        ff_symtab_hdr *hdr
        ff_symtab_entry *entries
        char *arena
    unsigned long long FF_SYMTAB_MAGIC
    uint32_t FF_SYMTAB_VERSION
    uint32_t FF_SYMTAB_MAX_CODE
    size_t ff_symtab_nbytes(uint32_t capacity)
    void ff_symtab_bind(ff_symtab *t, void *block)
    void ff_symtab_init(void *block, uint32_t capacity)
    int32_t ff_symtab_intern(ff_symtab *t, const char *p, uint32_t n)
    uint32_t ff_symtab_count(const ff_symtab *t)

cdef extern from "decode.h":
    ctypedef struct ff_vec:
        char *data
        size_t len
        size_t cap
        size_t itemsize
    ctypedef struct ff_tick:
        pass
    ctypedef struct ff_quote:
        pass
    ctypedef struct ff_bar:
        pass
    ctypedef struct ff_dec:
        ff_vec ticks, quotes, bars
        ff_symtab symbols, statuses, bar_types
        char *scratch
        size_t scratch_cap
        size_t ncontrol
        int bar_bad_field
        int table_full
        void *pend
        char *pend_text
        void *pend_index
        void *fix
        uint64_t lit_hits_total
        uint64_t flat_total
        int simd
        char err[200]
    int ff_decode_frame(ff_dec *d, const uint8_t *p, size_t n, int64_t recv_ts)
    int ff_simd(ff_dec *d)
    int ff_simd_for(int limit)


TICK_DTYPE = np.dtype(
    [("sym", "<i4"), ("ts", "<i8"), ("price", "<f8"), ("volume", "<f8"), ("recv_ts", "<i8")],
    align=True,
)
QUOTE_DTYPE = np.dtype(
    [
        ("sym", "<i4"), ("status", "u1"), ("ts", "<i8"), ("last", "<f8"), ("volume", "<f8"),
        ("bid", "<f8"), ("ask", "<f8"), ("bid_size", "<f8"), ("ask_size", "<f8"),
        ("recv_ts", "<i8"),
    ],
    align=True,
)
BAR_DTYPE = np.dtype(
    [
        ("sym", "<i4"), ("bar_type", "<i2"), ("ts", "<i8"), ("bar_end", "<i8"),
        ("last_update", "<i8"), ("open", "<f8"), ("high", "<f8"), ("low", "<f8"),
        ("close", "<f8"), ("volume", "<f8"), ("recv_ts", "<i8"),
    ],
    align=True,
)

# The C structs are written to match these dtypes byte for byte; a mismatch
# would corrupt every row, so refuse to import rather than decode garbage.
if (TICK_DTYPE.itemsize != sizeof(ff_tick) or QUOTE_DTYPE.itemsize != sizeof(ff_quote)
        or BAR_DTYPE.itemsize != sizeof(ff_bar)):
    raise ImportError("fastfeed._decoder: row struct layout does not match the NumPy dtypes")

NAT = -(2**63)
"""The int64 value of a missing timestamp (NumPy's NaT)."""


cdef inline int64_t _now_us() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return <int64_t>ts.tv_sec * 1000000 + ts.tv_nsec // 1000


def now_us() -> int:
    """The current CLOCK_REALTIME time in int64 microseconds, as stamped on frames."""
    return _now_us()


cdef class SymbolTable:
    """An append-only table of codes (symbols, statuses or bar types) to int ids.

    ``SymbolTable()`` is private to one process.  ``SymbolTable(buf)`` lays the
    table over a writable buffer of ``SymbolTable.nbytes(capacity)`` bytes, for
    example a shared-memory segment: every process that lays a table over the same
    memory sees the same ids (inserts take a spinlock inside the buffer, lookups are
    lock-free).  A zeroed buffer is formatted by the first table laid over it; do
    that in one process before others attach.
    """

    cdef ff_symtab t
    cdef object _owner          # keeps the memory alive
    cdef Py_buffer _view
    cdef bint _has_view
    cdef list _cache            # id -> str, filled lazily

    def __cinit__(self, buffer=None, *, uint32_t capacity=65536, bint reserve_empty=False):
        cdef size_t need
        self._has_view = False
        self._cache = []
        if capacity < 1 or capacity > 16_000_000:
            raise ValueError(f"capacity must be in 1..16000000, got {capacity}")
        if buffer is None:
            buffer = bytearray(ff_symtab_nbytes(capacity))
        PyObject_GetBuffer(buffer, &self._view, PyBUF_SIMPLE | PyBUF_WRITABLE)
        self._has_view = True
        self._owner = buffer
        cdef ff_symtab_hdr *hdr = <ff_symtab_hdr *>self._view.buf
        if self._view.len < <Py_ssize_t>sizeof(ff_symtab_hdr):
            raise ValueError("buffer too small for a SymbolTable header")
        if hdr.magic == 0:
            need = ff_symtab_nbytes(capacity)
            if <size_t>self._view.len < need:
                raise ValueError(
                    f"buffer of {self._view.len} bytes is too small for capacity {capacity} "
                    f"(needs SymbolTable.nbytes({capacity}) = {need})")
            ff_symtab_init(self._view.buf, capacity)
            ff_symtab_bind(&self.t, self._view.buf)
            if reserve_empty:
                ff_symtab_intern(&self.t, "", 0)
        elif hdr.magic != FF_SYMTAB_MAGIC or hdr.version != FF_SYMTAB_VERSION:
            raise ValueError("buffer holds something other than a fastfeed SymbolTable "
                             f"(magic {hdr.magic:#x}, version {hdr.version})")
        elif <size_t>self._view.len < ff_symtab_nbytes(hdr.capacity):
            raise ValueError("buffer is smaller than the SymbolTable it holds")
        else:
            ff_symtab_bind(&self.t, self._view.buf)

    def __dealloc__(self):
        if self._has_view:
            PyBuffer_Release(&self._view)

    @staticmethod
    def nbytes(uint32_t capacity=65536) -> int:
        """Bytes of memory a table of this capacity needs."""
        return ff_symtab_nbytes(capacity)

    @property
    def capacity(self) -> int:
        return self.t.hdr.capacity

    def __len__(self) -> int:
        return ff_symtab_count(&self.t)

    def __getitem__(self, Py_ssize_t i) -> str:
        cdef uint32_t n = ff_symtab_count(&self.t)
        if i < 0:
            i += n
        if i < 0 or i >= n:
            raise IndexError(f"id {i} not in table of {n} codes")
        while len(self._cache) < n:
            j = len(self._cache)
            self._cache.append(PyUnicode_DecodeUTF8(
                self.t.arena + self.t.entries[j].off, self.t.entries[j].len, "strict"))
        return self._cache[i]

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def intern(self, code: str) -> int:
        """The id of ``code``, adding it if new."""
        b = code.encode("utf-8")
        cdef int32_t r = ff_symtab_intern(&self.t, b, <uint32_t>len(b))
        if r == -1:
            raise OverflowError(f"SymbolTable is full ({self.capacity} codes)")
        if r == -2:
            raise ValueError(f"code of {len(b)} bytes: the most is {FF_SYMTAB_MAX_CODE}")
        return r

    def to_list(self) -> list:
        return list(self)

    def __repr__(self):
        return f"SymbolTable({len(self)} of {self.capacity})"


@cython.no_gc
cdef class Batch:
    """What one ``decode`` call produced.

    ``ticks``, ``quotes``, ``bars``: NumPy structured arrays (TICK_DTYPE, QUOTE_DTYPE,
    BAR_DTYPE) owned by the batch.  ``errors``: ``(frame_index, reason)`` per failed
    frame, in input order.  ``control``: the raw bytes of each valid JSON frame that
    was not market data.  ``frames``: how many frames went in.
    """

    # Not tracked by the garbage collector, and the two lists are made only when there is
    # something to put in them or someone asks: a consumer taking thousands of batches a
    # second would otherwise trigger collections, whose pauses (ms, with a big heap) land
    # on the latency tail. A batch cannot be part of a cycle unless a caller builds one.
    cdef readonly object ticks
    cdef readonly object quotes
    cdef readonly object bars
    cdef list _errors
    cdef list _control
    cdef readonly Py_ssize_t frames
    cdef public Py_ssize_t gaps
    """Frames dropped before this batch's (a dropping full policy), set by who read them from
    a ring; 0 when lossless."""

    @property
    def errors(self) -> list:
        if self._errors is None:
            self._errors = []
        return self._errors

    @property
    def control(self) -> list:
        if self._control is None:
            self._control = []
        return self._control

    @property
    def rows(self) -> int:
        return len(self.ticks) + len(self.quotes) + len(self.bars)

    def __repr__(self):
        return (f"Batch(frames={self.frames}, ticks={len(self.ticks)}, quotes={len(self.quotes)}, "
                f"bars={len(self.bars)}, errors={len(self.errors)}, control={len(self.control)})")


# One shared empty array per row dtype (zero rows: nothing in it can be changed).
cdef dict _EMPTY = {_dt: np.empty(0, _dt) for _dt in (TICK_DTYPE, QUOTE_DTYPE, BAR_DTYPE)}


# A large batch hands the memory its rows were decoded into to its arrays, instead of
# copying them into new memory: new memory is new pages, and the kernel's page faults
# on a few MB of them cost more than the decoding (measured: 847 faults, +37 ns a quote,
# on 50 000 quotes).  The memory comes back to its pool when the last array over it is
# gone, so a decode loop keeps reusing the same warm pages.  A small batch (fewer rows
# than _HAND_OVER_ROWS, or filling less than half its buffer) is copied: its copy is
# cheap, and a list of many small batches then holds only their rows.
cdef enum:
    _HAND_OVER_ROWS = 4096
    _POOL_BUFFERS = 4
cdef size_t _POOL_MAX_BYTES = 64 * 1024 * 1024  # all buffers held together


@cython.final
cdef class _RowPool:
    """Row memory given back by batches, for the decodes after them."""
    cdef char *bufs[_POOL_BUFFERS]
    cdef size_t caps[_POOL_BUFFERS]
    cdef int n
    cdef size_t total

    cdef bint give(self, char *data, size_t nbytes) noexcept:
        """Keep data for a later decode; False (the caller frees it) when the pool is full."""
        if self.n == _POOL_BUFFERS or self.total + nbytes > _POOL_MAX_BYTES:
            return False
        self.bufs[self.n] = data
        self.caps[self.n] = nbytes
        self.n += 1
        self.total += nbytes
        return True

    cdef char *take(self, size_t *nbytes) noexcept:
        """The largest buffer held (NULL, 0 when none)."""
        cdef int i, best = 0
        if self.n == 0:
            nbytes[0] = 0
            return NULL
        for i in range(1, self.n):
            if self.caps[i] > self.caps[best]:
                best = i
        cdef char *data = self.bufs[best]
        nbytes[0] = self.caps[best]
        self.total -= self.caps[best]
        self.n -= 1
        self.bufs[best] = self.bufs[self.n]
        self.caps[best] = self.caps[self.n]
        return data

    def __dealloc__(self):
        cdef int i
        for i in range(self.n):
            free(self.bufs[i])


@cython.final
cdef class _RowMemory:
    """The base object of a large batch's arrays: owns their memory, and gives it back to
    its pool (or frees it) when the last of them is gone."""
    cdef char *data
    cdef size_t nbytes
    cdef _RowPool pool

    def __dealloc__(self):
        if self.data != NULL and not (self.pool is not None and self.pool.give(self.data, self.nbytes)):
            free(self.data)
        self.data = NULL


cdef object _take(ff_vec *v, cnp.dtype dtype, _RowPool pool):
    cdef cnp.npy_intp n = <cnp.npy_intp>v.len
    cdef cnp.ndarray a
    cdef _RowMemory mem
    cdef size_t nbytes
    if n == 0:
        return _EMPTY[dtype]  # most small batches lack a kind or two
    Py_INCREF(dtype)  # both constructors below steal a reference to the descriptor
    if v.len < _HAND_OVER_ROWS or v.len * 2 < v.cap:
        # PyArray_Empty instead of np.empty: no argument parsing, which costs more than
        # copying the rows of a small batch.
        a = PyArray_Empty(1, &n, dtype, 0)
        memcpy(cnp.PyArray_DATA(a), v.data, v.len * v.itemsize)
        v.len = 0
        return a
    mem = _RowMemory.__new__(_RowMemory)
    mem.data = v.data
    mem.nbytes = v.cap * v.itemsize
    mem.pool = pool
    v.data = pool.take(&nbytes)
    v.cap = nbytes // v.itemsize
    v.len = 0
    a = PyArray_NewFromDescr(<PyTypeObject *>np.ndarray, dtype, 1, &n, NULL, mem.data,
                             cnp.NPY_ARRAY_CARRAY, None)
    Py_INCREF(mem)  # PyArray_SetBaseObject steals it
    cnp.PyArray_SetBaseObject(a, mem)
    return a


cdef cnp.ndarray _as_i64(object arr, Py_ssize_t n, str what):
    """``arr`` itself when it is a contiguous one-dimensional int64 array (the common case,
    no allocation), else a converted copy; at least ``n`` long."""
    if (type(arr) is not np.ndarray or (<cnp.ndarray>arr).descr.type_num != cnp.NPY_INT64
            or not cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>arr) or (<cnp.ndarray>arr).ndim != 1):
        arr = np.ascontiguousarray(arr, dtype=np.int64)
        if (<cnp.ndarray>arr).ndim != 1:
            raise ValueError(f"{what} must be one-dimensional")
    if (<cnp.ndarray>arr).shape[0] < n:
        raise ValueError(f"count {n} exceeds the offsets/lengths/recv_ts arrays")
    return <cnp.ndarray>arr


# The limits of a Decoder's own tables (each a keyword argument; README's decoder section).
DEFAULT_MAX_SYMBOLS = 65536
DEFAULT_MAX_BAR_TYPES = 4096
MAX_STATUSES = 256       # ids of `status` (u1), "" (absent) included
MAX_BAR_TYPES = 32768    # ids of `bar_type` (i2), "" (absent) included
MAX_CODE_BYTES = FF_SYMTAB_MAX_CODE


# The vector units the decoder's structure-first paths (keys in any order) may use, least
# first (ext/decode.h, FF_SIMD_*): it takes the best the CPU has, or at most the one the
# environment variable FASTFEED_SIMD names, read when this module is imported (and so in
# every worker, which inherits the environment).
SIMD_LEVELS = ("none", "avx2", "avx512", "avx512vbmi2")


def _simd_limit_from_env():
    """The index in SIMD_LEVELS that FASTFEED_SIMD names, -1 when unset."""
    name = os.environ.get("FASTFEED_SIMD", "").strip().lower()
    if not name:
        return -1
    if name not in SIMD_LEVELS:
        raise ValueError(f"FASTFEED_SIMD={name!r}: expected one of {', '.join(SIMD_LEVELS)} "
                         "(the most the decoder's structure-first paths may use), or unset")
    return SIMD_LEVELS.index(name)


_SIMD_LIMIT = _simd_limit_from_env()


def _limit(name: str, value, most: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        raise ValueError(f"{name} must be an int in 1..{most}, got {value!r}")
    return value


cdef class Decoder:
    """Decodes the feed's JSON frames into NumPy rows.  Reuse one for a whole stream.

    ``symbols``, ``statuses``, ``bar_types``: optional :class:`SymbolTable` objects to
    intern into (pass tables over shared memory so that ids agree across processes);
    by default the decoder makes private ones, of ``max_symbols`` symbols (with 48 bytes
    of code text each), ``max_statuses`` statuses (at most 256: ``status`` is u1) and
    ``max_bar_types`` bar types (at most 32768: ``bar_type`` is i2).  Id 0 of
    ``statuses`` and ``bar_types`` is ``""``, the value of an absent field.
    ``error_store``: how many failed frames (reason and raw bytes) ``last_errors`` keeps
    for inspection.

    A frame that fails adds nothing to the tables: codes new to a table are inserted
    only once the whole frame has decoded.  A frame that needs a new code when its
    table is full fails too (its error names the table, its limit and the setting to
    raise), and counts in ``symbols_full_total`` as well as ``errors_total``.
    """

    cdef ff_dec d
    cdef list _errors   # of the decode in progress; None until the first one
    cdef list _control
    cdef Py_ssize_t _full   # frames of the decode in progress that found a table full
    cdef Py_ssize_t _ncontrol   # control messages of the decode in progress
    cdef _RowPool _pool         # row memory given back by large batches
    cdef readonly SymbolTable symbols
    cdef readonly SymbolTable statuses
    cdef readonly SymbolTable bar_types
    cdef readonly object last_errors
    cdef readonly unsigned long long frames_total
    cdef readonly unsigned long long errors_total
    cdef readonly unsigned long long control_total
    cdef readonly unsigned long long symbols_full_total
    cdef readonly unsigned long long rows_total

    def __cinit__(self, *, SymbolTable symbols=None, SymbolTable statuses=None,
                  SymbolTable bar_types=None, int error_store=100,
                  max_symbols=DEFAULT_MAX_SYMBOLS, max_statuses=MAX_STATUSES,
                  max_bar_types=DEFAULT_MAX_BAR_TYPES):
        memset(&self.d, 0, sizeof(ff_dec))
        self.d.simd = ff_simd_for(_SIMD_LIMIT)
        self._pool = _RowPool.__new__(_RowPool)
        self.d.ticks.itemsize = sizeof(ff_tick)
        self.d.quotes.itemsize = sizeof(ff_quote)
        self.d.bars.itemsize = sizeof(ff_bar)
        _limit("max_symbols", max_symbols, 16_000_000)
        _limit("max_statuses", max_statuses, MAX_STATUSES)
        _limit("max_bar_types", max_bar_types, MAX_BAR_TYPES)
        self.symbols = symbols if symbols is not None else SymbolTable(capacity=max_symbols)
        self.statuses = statuses if statuses is not None else SymbolTable(
            capacity=max_statuses, reserve_empty=True)
        self.bar_types = bar_types if bar_types is not None else SymbolTable(
            capacity=max_bar_types, reserve_empty=True)
        self.d.symbols = self.symbols.t
        self.d.statuses = self.statuses.t
        self.d.bar_types = self.bar_types.t
        if error_store < 0:
            raise ValueError("error_store must be >= 0")
        self.last_errors = collections.deque(maxlen=error_store)

    def __dealloc__(self):
        free(self.d.ticks.data)
        free(self.d.quotes.data)
        free(self.d.bars.data)
        free(self.d.scratch)
        free(self.d.pend)
        free(self.d.pend_text)
        free(self.d.pend_index)
        free(self.d.fix)

    cdef inline int _one(self, const uint8_t *p, size_t n, int64_t recv_ts,
                         Py_ssize_t index) except -1:
        if ff_decode_frame(&self.d, p, n, recv_ts) == 0:
            if self.d.ncontrol:
                self._ncontrol += self.d.ncontrol
                if self._control is None:
                    self._control = []
                self._control.append(PyBytes_FromStringAndSize(<const char *>p, n))
            return 0
        reason = (<bytes>self.d.err).decode("utf-8", "replace")
        if self.d.table_full:
            self._full += 1
        if self._errors is None:
            self._errors = []
        self._errors.append((index, reason))
        if self.last_errors.maxlen:
            self.last_errors.append((reason, PyBytes_FromStringAndSize(<const char *>p, n)))
        return 0

    cdef inline void _start(self):
        # Also drops rows a decode that raised half-way left behind.
        self.d.ticks.len = 0
        self.d.quotes.len = 0
        self.d.bars.len = 0
        self._errors = None
        self._control = None
        self._full = 0
        self._ncontrol = 0

    cdef Batch _finish(self, Py_ssize_t frames):
        cdef Batch b = Batch.__new__(Batch)
        b.ticks = _take(&self.d.ticks, TICK_DTYPE, self._pool)
        b.quotes = _take(&self.d.quotes, QUOTE_DTYPE, self._pool)
        b.bars = _take(&self.d.bars, BAR_DTYPE, self._pool)
        b._errors = self._errors
        b._control = self._control
        b.frames = frames
        self.frames_total += frames
        if self._errors is not None:
            self.errors_total += len(self._errors)
        self.control_total += self._ncontrol
        self._ncontrol = 0
        self.symbols_full_total += self._full
        self._full = 0
        self._errors = None
        self._control = None
        self.rows_total += len(b.ticks) + len(b.quotes) + len(b.bars)
        return b

    def decode(self, frames, recv_ts=None) -> Batch:
        """Decode a sequence of frames (``bytes`` or any bytes-like object).

        ``recv_ts``: the receive time stamped on every row, int64 µs since the
        epoch: ``None`` for now, one int for all frames, or one per frame.
        """
        self._start()
        cdef Py_ssize_t i, n
        cdef Py_buffer view
        cdef int64_t ts
        cdef const int64_t[::1] per = None
        frames = frames if isinstance(frames, (list, tuple)) else list(frames)
        n = len(frames)
        ts, arr = _resolve_ts(recv_ts, n)
        if arr is not None:
            per = arr
        for i in range(n):
            if per is not None:
                ts = per[i]
            f = frames[i]
            if PyBytes_CheckExact(f):
                self._one(<const uint8_t *>PyBytes_AS_STRING(f), PyBytes_GET_SIZE(f), ts, i)
            else:
                if isinstance(f, str):
                    raise TypeError(f"frame {i} is a str; frames must be bytes-like (UTF-8)")
                PyObject_GetBuffer(f, &view, PyBUF_SIMPLE)
                try:
                    self._one(<const uint8_t *>view.buf, view.len, ts, i)
                finally:
                    PyBuffer_Release(&view)
        return self._finish(n)

    @property
    def _learned_hits(self) -> int:
        """Members whose key was matched by learned bytes, over all frames so far: how tests
        know that the learned path ran (ext/decode.h, ff_lit)."""
        return self.d.lit_hits_total

    @property
    def simd(self) -> str:
        """The vector unit this decoder's structure-first paths use (one of
        ``SIMD_LEVELS``): the best the CPU has, or less when ``FASTFEED_SIMD`` says so."""
        return SIMD_LEVELS[ff_simd(&self.d)]

    def _limit_simd(self, level: str) -> None:
        """At most ``level`` for this decoder's structure-first paths (tests: every level on
        one machine)."""
        if level not in SIMD_LEVELS:
            raise ValueError(f"simd level {level!r}: expected one of {', '.join(SIMD_LEVELS)}")
        self.d.simd = ff_simd_for(SIMD_LEVELS.index(level))

    @property
    def _flat_frames(self) -> int:
        """Frames decoded by the structure-first paths for keys in any order, over all frames
        so far (ext/decode.h, ff_message_flat, ff_message_flat_avx2 and ff_series_flat; 0 on
        a CPU without AVX2, or with FASTFEED_SIMD=none): how tests know that they ran."""
        return self.d.flat_total

    def decode_buffer(self, data, recv_ts=None) -> Batch:
        """Decode newline-delimited JSON (one frame per line; blank lines skipped).

        Frame indices in ``errors`` count the non-blank lines from 0.
        """
        self._start()
        cdef Py_buffer view
        cdef const uint8_t *p
        cdef const uint8_t *e
        cdef const uint8_t *nl
        cdef const uint8_t *q
        cdef Py_ssize_t index = 0
        cdef int64_t ts = _resolve_ts(recv_ts, -1)[0]
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            p = <const uint8_t *>view.buf
            e = p + view.len
            while p < e:
                nl = <const uint8_t *>memchr(p, b'\n', e - p)
                if nl == NULL:
                    nl = e
                q = p
                while q < nl and (q[0] == b' ' or q[0] == b'\t' or q[0] == b'\r'):
                    q += 1
                if q < nl:
                    self._one(p, nl - p, ts, index)
                    index += 1
                p = nl + 1
        finally:
            PyBuffer_Release(&view)
        return self._finish(index)

    def decode_region(self, buffer, offsets, lengths, recv_ts, Py_ssize_t count=-1) -> Batch:
        """Decode frames that lie in one memory region, with no object per frame.

        Frame ``i`` is ``buffer[offsets[i]:offsets[i] + lengths[i]]``, received at
        ``recv_ts[i]`` (µs); the first ``count`` entries are used (all when -1).
        This is the entry point for workers reading straight out of a ring.
        """
        self._start()
        cdef Py_buffer view
        cdef Py_ssize_t i
        if count < 0:
            count = len(offsets)
        offsets = _as_i64(offsets, count, "offsets")
        lengths = _as_i64(lengths, count, "lengths")
        recv_ts = _as_i64(recv_ts, count, "recv_ts")
        cdef const int64_t *off = <const int64_t *>cnp.PyArray_DATA(<cnp.ndarray>offsets)
        cdef const int64_t *ln = <const int64_t *>cnp.PyArray_DATA(<cnp.ndarray>lengths)
        cdef const int64_t *ts = <const int64_t *>cnp.PyArray_DATA(<cnp.ndarray>recv_ts)
        PyObject_GetBuffer(buffer, &view, PyBUF_SIMPLE)
        try:
            for i in range(count):
                # (no off + ln: a sum that overflows would pass)
                if off[i] < 0 or ln[i] < 0 or off[i] > view.len or ln[i] > view.len - off[i]:
                    raise ValueError(
                        f"frame {i} ({off[i]}+{ln[i]}) lies outside the buffer of {view.len} bytes")
                self._one(<const uint8_t *>view.buf + off[i], ln[i], ts[i], i)
        finally:
            PyBuffer_Release(&view)
        return self._finish(count)

    def stats(self) -> dict:
        """Totals since the decoder was made."""
        return {
            "frames": self.frames_total,
            "errors": self.errors_total,
            "control": self.control_total,
            "symbols_full": self.symbols_full_total,
            "rows": self.rows_total,
            "symbols": len(self.symbols),
        }


cdef tuple _resolve_ts(object recv_ts, Py_ssize_t n):
    """(one stamp for all frames, or None and an int64 array of one per frame)"""
    if recv_ts is None:
        return _now_us(), None
    if isinstance(recv_ts, int):
        return recv_ts, None
    if n < 0:
        raise TypeError("recv_ts must be None or an int here")
    arr = np.ascontiguousarray(recv_ts, dtype=np.int64)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"recv_ts has {arr.size} entries for {n} frames")
    return 0, arr


cdef extern from "<math.h>" nogil:
    double log(double x)


# (dtype, field) -> byte offset of an int64 field: looked up once per row type.
cdef dict _FIELD_OFFSETS = {}


def record_latency(cnp.int64_t[::1] counts, int64_t now, rows, double log_growth,
                   str field="recv_ts") -> tuple:
    """Add ``now - rows[field]`` (default ``recv_ts``) of every row to the log-bucket ``counts`` of
    :class:`fastfeed.latency.LatencyHistogram` (bucket 0: below 1 µs; bucket i >= 1:
    ``floor(ln(lat) / log_growth) + 1``, capped at the last). Returns ``(rows, max µs)``.

    In C because the consumer calls it on every batch: the NumPy version costs tens of
    µs per call, which delays the next batch."""
    cdef cnp.ndarray a = <cnp.ndarray?>rows
    cdef Py_ssize_t n = a.shape[0] if a.ndim == 1 else 0
    cdef Py_ssize_t nb = counts.shape[0] - 1
    cdef Py_ssize_t i, k, off
    cdef int64_t lat, mx = 0
    if a.ndim != 1 or not cnp.PyArray_IS_C_CONTIGUOUS(a):
        raise ValueError("rows must be a one-dimensional contiguous structured array")
    if nb < 1 or log_growth <= 0:
        raise ValueError("counts needs at least two buckets and log_growth must be > 0")
    if n == 0:
        return 0, 0
    key = (a.dtype, field)
    cached = _FIELD_OFFSETS.get(key)
    if cached is None:
        f = a.dtype.fields.get(field) if a.dtype.fields else None
        if f is None or f[0] != np.dtype("<i8"):
            raise ValueError(f"rows have no int64 {field} field")
        cached = _FIELD_OFFSETS[key] = f[1]
    off = cached
    cdef Py_ssize_t step = a.dtype.itemsize
    cdef const char *base = <const char *>cnp.PyArray_DATA(a) + off
    with nogil:
        for i in range(n):
            lat = now - (<const int64_t *>(base + i * step))[0]
            if lat < 1:
                k = 0
                if lat < 0:
                    lat = 0
            else:
                k = <Py_ssize_t>(log(<double>lat) / log_growth + 1)
                if k > nb:
                    k = nb
            counts[k] += 1
            if lat > mx:
                mx = lat
    return n, mx
