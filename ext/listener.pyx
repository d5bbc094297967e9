# cython: language_level=3
"""The network process's hot path: a picows listener that copies each data frame into a ring.

picows calls ``on_ws_frame`` through its C vtable with a pointer into its receive buffer.
For a data frame this listener does, in C and without creating a Python object:

1. stamp the receive time (CLOCK_REALTIME, microseconds) once per socket read: every frame
   that came out of one read arrived at the same instant, and one clock read per read rather
   than per frame keeps the cost off the 60-byte frames;
2. find the symbol code (the first ``"c"`` key whose value is a string) and hash it (FNV-1a)
   to a non-negative route; ring = route % number of rings, so one symbol always goes to the
   same ring and its order is kept;
3. ``ff_ring_write`` the payload straight from picows' buffer into that ring (the only copy
   between the socket and the decoder).

**Backpressure.** When the rings were made with the "pause" policy (the default: lossless), a
frame that does not fit is not dropped: it goes to a private backlog, the socket stops being
read (``pause_reading``; TCP flow control then pushes back to the sender), and a timer on the
event loop moves the backlog into the rings as the workers make room, then reads again. Frames
keep their order and their receive time. Writing is not paused: the heartbeat's pings still go
out, and the session's pong watchdog does not count the time it spent paused against the server.

Everything else is the control path (cold): the text ``pong`` updates the heartbeat clock,
other texts (status and error objects, anything without a symbol) are counted and handed to a
Python callback. Fragmented messages are reassembled in a private buffer first.
"""

from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memchr, memcpy, memmove
from posix.time cimport CLOCK_MONOTONIC, CLOCK_REALTIME, clock_gettime, timespec

from picows.picows cimport WSFrame, WSListener, WSMsgType, WSTransport

from posix.unistd cimport getpid

from ff_route cimport ff_route
from ff_ring cimport (FF_POLICY_PAUSE, ff_ring_hdr, ff_ring_set_producer, ff_ring_try_write,
                     ff_ring_write)

import asyncio

cdef enum:
    # Record type of a data frame in the ring (the decoder reads every record as JSON text).
    _DATA_TYPE = 1
    # Largest reassembled message accepted; picows already bounds a single frame.
    _MAX_MESSAGE = 64 * 1024 * 1024
    # Backlog record header: u32 length, i32 route, i64 receive time.
    _BL_HDR = 16

# Reading is paused as soon as the backlog is non-empty, so it only ever holds the rest of one
# socket read (picows hands every frame of a read over at once): this bound is a guard against
# a broken peer, not a working limit. Past it, frames are dropped and counted.
cdef Py_ssize_t _BACKLOG_MAX = 1 << 30
# How often the backlog is retried while the rings are full. uvloop's timers tick in whole
# milliseconds; a 4 MiB ring takes longer than that to fill at the feed's rates.
cdef double _RETRY_S = 0.0005

__all__ = ["FeedListener", "route_of"]


cdef inline int64_t _realtime_us() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return <int64_t>ts.tv_sec * 1000000 + ts.tv_nsec // 1000


cdef inline int64_t _monotonic_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


def route_of(code) -> int:
    """The route of a symbol code, or of a whole frame (``bytes`` or ``str``): its ring is
    ``route % n_rings``; -1 for a frame with no symbol (the listener's control path).

    A frame (text starting with ``{`` or ``[``) is routed exactly as the listener routes
    it, by the first string ``"c"`` in it; anything else is taken as a bare code.
    """
    if isinstance(code, str):
        code = code.encode()
    cdef bytes data = bytes(code)
    cdef bytes stripped = data.lstrip()
    if stripped[:1] in (b"{", b"["):
        return ff_route(data, len(data))
    cdef bytes frame = b'{"c":"' + data + b'"}'
    return ff_route(frame, len(frame))


cdef class FeedListener(WSListener):
    """Writes data frames into shared-memory rings; see the module docstring.

    ``ring_addresses``: base addresses (``Ring.address``) of the rings, in order.
    ``keepalive``: objects that own those mappings (kept referenced while the listener lives).
    ``on_control(payload: bytes)``: called for every control message except ``pong``.
    The counters are cumulative over every connection the listener serves.
    """

    cdef void **_bases
    cdef int _n
    cdef object _keepalive
    cdef object _on_control
    cdef char *_frag
    cdef Py_ssize_t _frag_len, _frag_cap
    cdef bint _frag_active
    cdef bint _need_ts
    cdef int64_t _ts
    cdef bint _lossless
    cdef char *_bl
    cdef Py_ssize_t _bl_head, _bl_tail, _bl_cap
    cdef int64_t _paused_at
    cdef object _paused_tr
    cdef object _timer

    cdef readonly uint64_t frames
    """Data frames written into a ring."""
    cdef readonly uint64_t bytes
    """Payload bytes written into rings."""
    cdef readonly uint64_t ring_drops
    """Data frames a ring refused (full past its policy, or larger than its max payload)."""
    cdef readonly uint64_t control
    """Control messages other than pong (status/error objects, texts without a symbol)."""
    cdef readonly uint64_t pongs
    """Text pong messages."""
    cdef readonly uint64_t fragmented
    """Messages that arrived in several frames and were reassembled."""
    cdef readonly uint64_t too_big
    """Reassembled messages dropped for exceeding the size limit."""
    cdef readonly int64_t last_pong_ns
    """CLOCK_MONOTONIC time (ns, as time.monotonic_ns) of the last pong; 0 before any."""
    cdef readonly uint64_t connections
    """Connections opened (on_ws_connected calls)."""
    cdef readonly object transport
    """The current connection's WSTransport, or None."""
    cdef readonly uint64_t backlog
    """Frames waiting in the backlog for room in a ring (lossless mode)."""
    cdef readonly uint64_t pauses
    """Times reading was paused because a ring was full (lossless mode)."""
    cdef readonly int64_t paused_ns
    """Total time reading was paused, in ns (the current pause included)."""
    cdef readonly int64_t last_resume_ns
    """CLOCK_MONOTONIC time (ns) reading last resumed after a pause; 0 before any."""

    def __cinit__(self):
        self._bases = NULL
        self._frag = NULL
        self._bl = NULL

    def __init__(self, ring_addresses, keepalive=None, on_control=None):
        addrs = [int(a) for a in ring_addresses]
        if not addrs:
            raise ValueError("FeedListener needs at least one ring")
        if any(a == 0 for a in addrs):
            raise ValueError("ring address must not be 0")
        self._bases = <void **>malloc(len(addrs) * sizeof(void *))
        if self._bases == NULL:
            raise MemoryError()
        for i, a in enumerate(addrs):
            self._bases[i] = <void *><size_t>a
            # Writes go straight through ff_ring_write, so register this process as the
            # producer here (the ring's liveness checks read it).
            ff_ring_set_producer(self._bases[i], getpid())
        self._n = len(addrs)
        self._lossless = ff_ring_hdr(self._bases[0]).full_policy == FF_POLICY_PAUSE
        self._keepalive = keepalive
        self._on_control = on_control
        self._need_ts = True

    def __dealloc__(self):
        free(self._bases)
        free(self._frag)
        free(self._bl)

    @property
    def n_rings(self) -> int:
        """Number of rings frames are routed over."""
        return self._n

    @property
    def paused(self) -> bool:
        """True while reading is paused for room in a ring."""
        return self._paused_at != 0

    @property
    def lossless(self) -> bool:
        """True when a full ring pauses reading instead of dropping (the "pause" policy)."""
        return self._lossless

    def backpressure_ns(self) -> int:
        """Total time reading was paused, in ns, the current pause included."""
        if self._paused_at:
            return self.paused_ns + (_monotonic_ns() - self._paused_at)
        return self.paused_ns

    def stats(self) -> dict:
        """The counters as a dict."""
        return {"frames": self.frames, "bytes": self.bytes, "ring_drops": self.ring_drops,
                "control": self.control, "pongs": self.pongs, "fragmented": self.fragmented,
                "too_big": self.too_big, "connections": self.connections,
                "pauses": self.pauses, "backpressure_ns": self.backpressure_ns(),
                "backlog": self.backlog}

    def flush(self) -> int:
        """Move what the backlog holds into the rings as far as they have room; resume
        reading once it is empty. Returns the frames still waiting."""
        self._flush()
        if self._bl_head == self._bl_tail and self._paused_at:
            self._resume()
        return self.backlog

    def discard_backlog(self) -> int:
        """Give up on the frames still waiting (the session is ending and the rings stayed
        full): they are counted in ``ring_drops``. Returns how many there were."""
        cdef uint64_t n = self.backlog
        self.ring_drops += n
        self.backlog = 0
        self._bl_head = self._bl_tail = 0
        if self._paused_at:
            self._resume()
        return n

    def _retry(self):
        self._timer = None
        if self.flush():
            self._schedule()

    cdef _schedule(self):
        if self._timer is None:
            self._timer = asyncio.get_event_loop().call_later(_RETRY_S, self._retry)

    cdef _pause(self):
        if self._paused_at == 0:
            self._paused_at = _monotonic_ns()
            self.pauses += 1
        self._schedule()  # first: the retry must be armed whatever the transport does
        tr = self.transport
        if tr is not None and self._paused_tr is None:
            self._paused_tr = (<WSTransport>tr).underlying_transport
            self._paused_tr.pause_reading()

    cdef _resume(self):
        cdef int64_t now = _monotonic_ns()
        self.paused_ns += now - self._paused_at
        self._paused_at = 0
        self.last_resume_ns = now
        tr = self._paused_tr
        self._paused_tr = None
        if tr is not None and not tr.is_closing():
            tr.resume_reading()

    cdef void _flush(self) noexcept:
        cdef uint32_t n
        cdef int32_t route
        cdef int64_t ts
        cdef int r
        cdef char *rec
        while self._bl_head < self._bl_tail:
            rec = self._bl + self._bl_head
            n = (<uint32_t *>rec)[0]
            route = (<int32_t *>(rec + 4))[0]
            ts = (<int64_t *>(rec + 8))[0]
            r = ff_ring_try_write(self._bases[route % self._n], rec + _BL_HDR, n, _DATA_TYPE,
                                  ts, route)
            if r == 0:
                return  # still full: keep the order, try again later
            if r == 1:
                self.frames += 1
                self.bytes += n
            else:
                self.ring_drops += 1  # larger than a ring record: it never fits
            self._bl_head += _BL_HDR + ((n + 7) & ~7)
            self.backlog -= 1
        self._bl_head = self._bl_tail = 0

    cdef void _keep(self, const char *p, Py_ssize_t n, int32_t route) noexcept:
        """Append one frame to the backlog (lossless mode: its ring is full)."""
        cdef Py_ssize_t need = _BL_HDR + ((n + 7) & ~7), cap
        cdef char *grown
        cdef char *rec
        if self._bl_tail + need > self._bl_cap:
            if self._bl_head > 0:
                memmove(self._bl, self._bl + self._bl_head, self._bl_tail - self._bl_head)
                self._bl_tail -= self._bl_head
                self._bl_head = 0
            if self._bl_tail + need > self._bl_cap:
                cap = max(self._bl_tail + need, 2 * self._bl_cap, 1 << 16)
                grown = NULL if cap > _BACKLOG_MAX else <char *>realloc(self._bl, cap)
                if grown == NULL:
                    self.ring_drops += 1
                    return
                self._bl = grown
                self._bl_cap = cap
        rec = self._bl + self._bl_tail
        (<uint32_t *>rec)[0] = <uint32_t>n
        (<int32_t *>(rec + 4))[0] = route
        (<int64_t *>(rec + 8))[0] = self._ts
        memcpy(rec + _BL_HDR, p, n)
        self._bl_tail += need
        self.backlog += 1

    cpdef on_ws_connected(self, WSTransport transport):
        self.transport = transport
        self.connections += 1
        self._frag_active = False
        self._frag_len = 0
        self._need_ts = True
        if self._bl_head != self._bl_tail:
            # Frames of the last connection still wait for room: they go first.
            self._paused_tr = None
            self._pause()

    cpdef on_ws_disconnected(self, WSTransport transport):
        if self.transport is transport:
            self.transport = None
            self._paused_tr = None
        self._frag_active = False
        self._frag_len = 0

    cpdef on_ws_frame(self, WSTransport transport, WSFrame frame):
        cdef WSMsgType t = frame.msg_type
        if self._need_ts:
            self._ts = _realtime_us()
        # The next frame starts a new socket read when this one is the last of this one.
        self._need_ts = frame.last_in_buffer
        if t == WSMsgType.TEXT or t == WSMsgType.BINARY:
            if frame.fin:
                self._message(frame.payload_ptr, frame.payload_size)
            else:
                self._frag_active = True
                self._frag_len = 0
                self._append(frame.payload_ptr, frame.payload_size)
        elif t == WSMsgType.CONTINUATION:
            if not self._frag_active:
                return  # picows rejects a stray continuation before it gets here
            self._append(frame.payload_ptr, frame.payload_size)
            if frame.fin:
                self._frag_active = False
                if self._frag_len < 0:
                    self.too_big += 1
                else:
                    self.fragmented += 1
                    self._message(self._frag, self._frag_len)
                self._frag_len = 0
        elif t == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()

    cdef inline void _append(self, const char *p, Py_ssize_t n) noexcept:
        # _frag_len < 0 marks a message that already overflowed: drop the rest of it.
        cdef Py_ssize_t need, cap
        cdef char *grown
        if self._frag_len < 0:
            return
        need = self._frag_len + n
        if need > _MAX_MESSAGE:
            self._frag_len = -1
            return
        if need > self._frag_cap:
            cap = max(need, 2 * self._frag_cap)
            if cap < 4096:
                cap = 4096
            grown = <char *>realloc(self._frag, cap)
            if grown == NULL:
                self._frag_len = -1
                return
            self._frag = grown
            self._frag_cap = cap
        memcpy(self._frag + self._frag_len, p, n)
        self._frag_len = need

    cdef inline void _message(self, const char *p, Py_ssize_t n) noexcept:
        cdef int32_t route = ff_route(p, n)
        cdef int r
        if route >= 0:
            if self._bl_head != self._bl_tail:
                self._keep(p, n, route)  # behind frames that wait: keep the order
                return
            r = ff_ring_try_write(self._bases[route % self._n], p, <uint32_t>n, _DATA_TYPE,
                                  self._ts, route)
            if r == 1:
                self.frames += 1
                self.bytes += n
            elif r == 0 and self._lossless:
                self._keep(p, n, route)
                try:
                    self._pause()
                except Exception:
                    pass  # the retry timer is armed first; a closing transport is fine
            elif ff_ring_write(self._bases[route % self._n], p, <uint32_t>n, _DATA_TYPE,
                               self._ts, route):
                self.frames += 1  # room after waiting, per the ring's policy
                self.bytes += n
            else:
                self.ring_drops += 1
        elif n == 4 and p[0] == b'p' and p[1] == b'o' and p[2] == b'n' and p[3] == b'g':
            self.pongs += 1
            self.last_pong_ns = _monotonic_ns()
        else:
            self.control += 1
            if self._on_control is not None:
                try:
                    self._on_control(p[:n])
                except Exception:
                    # A failing callback must not tear down the feed connection.
                    pass
