# Cython declarations of ring.h, for any module that produces into or consumes from a ring
# knowing only its base address (Ring.address):
#
#     from ff_ring cimport ff_ring_write
#     ...
#     with nogil:
#         ok = ff_ring_write(<void *><size_t>address, ptr, n, 1, recv_ts, sym)
#
# Single producer, single consumer: at most one process writes a given ring at a time.

from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t


cdef extern from "ring.h" nogil:
    const uint64_t FF_RING_MAGIC
    const uint64_t FF_RING_MIN_CAPACITY
    const uint64_t FF_RING_MAX_CAPACITY
    enum:
        FF_RING_VERSION
        FF_RING_SLOT
        FF_RING_HEADER_SIZE
        FF_REC_HEADER_SIZE
        FF_REC_ALIGN
        FF_PAD_TYPE
        FF_POLICY_DROP
        FF_POLICY_WAIT
        FF_POLICY_BLOCK
        FF_POLICY_PAUSE

    ctypedef struct ff_rec_header:
        uint32_t length
        int32_t type
        int64_t recv_ts
        uint64_t seq
        int32_t route

    ctypedef struct ff_ring_header:
        uint64_t magic
        uint32_t version
        uint32_t header_size
        uint64_t capacity
        uint32_t max_payload
        uint32_t full_policy
        int64_t wait_timeout_ns
        int32_t owner_pid
        uint32_t rec_header_size
        uint64_t owner_start_ticks
        int32_t producer_pid
        int32_t consumer_pid
        uint32_t closed
        int64_t consumer_heartbeat_ns
        uint64_t tail
        uint64_t cached_head
        uint64_t next_seq
        uint64_t written
        uint64_t dropped
        uint64_t dropped_oversize
        uint64_t full_waits
        uint64_t head
        uint64_t next_expected_seq
        uint64_t gaps
        uint64_t consumed
        uint64_t batches
        uint32_t data_seq
        uint32_t consumer_waiting
        uint32_t space_seq
        uint32_t producer_waiting

    uint64_t ff_ld_u64(const uint64_t *p)
    int64_t ff_ld_i64(const int64_t *p)
    uint32_t ff_ld_u32(const uint32_t *p)
    int32_t ff_ld_i32(const int32_t *p)
    void ff_st_i32(int32_t *p, int32_t v)
    void ff_st_u32(uint32_t *p, uint32_t v)
    void ff_st_i64(int64_t *p, int64_t v)
    void ff_st_u64(uint64_t *p, uint64_t v)

    ff_ring_header *ff_ring_hdr(void *base)
    uint8_t *ff_ring_data(void *base)
    uint64_t ff_align8(uint64_t n)
    uint64_t ff_ring_segment_size(uint64_t capacity)
    uint32_t ff_ring_max_payload_for(uint64_t capacity)
    int64_t ff_now_ns()
    int ff_ring_init(void *base, uint64_t capacity, uint32_t policy, int64_t wait_timeout_ns,
                     int32_t owner_pid, uint64_t owner_start_ticks)

    # producer
    int ff_ring_try_write(void *base, const void *payload, uint32_t len, int32_t type,
                          int64_t recv_ts, int32_t route)
    int ff_ring_write(void *base, const void *payload, uint32_t len, int32_t type,
                      int64_t recv_ts, int32_t route)
    void *ff_ring_claim(void *base, uint32_t max_len)
    int ff_ring_commit(void *base, uint32_t len, int32_t type, int64_t recv_ts, int32_t route)
    void ff_ring_abort(void *base)
    void ff_ring_set_producer(void *base, int32_t pid)

    # consumer
    uint32_t ff_ring_poll(void *base, uint32_t max, uint64_t *pos, uint64_t *expected,
                          uint64_t *gaps, int64_t *offsets, int64_t *lengths, int64_t *recv_ts,
                          uint64_t *seqs, int32_t *types, int32_t *routes)
    int ff_ring_available(void *base, uint64_t head)
    void ff_ring_skip(void *base, uint64_t end)
    void ff_ring_release(void *base, uint64_t end, uint64_t expected, uint64_t gaps,
                         uint64_t nrecords)
    int ff_ring_wait(void *base, uint64_t head, int64_t timeout_ns, int busy)
    void ff_ring_wake_all(void *base)

    # doorbell
    void ff_bell_ring(uint32_t *bell)
    uint32_t ff_bell_prepare(uint32_t *bell)
    void ff_bell_cancel(uint32_t *bell)
    void ff_bell_wait(uint32_t *bell, uint32_t seq, int64_t timeout_ns)
