/*
 * ring.h - fastfeed's single-producer single-consumer shared-memory ring.
 *
 * Everything the producer and the consumer share lives inside the segment, so any C or
 * Cython code that knows the segment's base address can produce into the ring:
 *
 *     cdef extern from "ring.h":
 *         int ff_ring_write(void *base, const void *data, uint32_t len,
 *                           int32_t type, int64_t recv_ts, int32_t route) nogil
 *
 * Segment layout (all offsets from the base address, which mmap makes page aligned):
 *
 *     0      ff_ring_header: 8 slots of 128 bytes (FF_RING_HEADER_SIZE)
 *              slot 0  constants written once by the creator: magic, version, capacity, policy
 *              slot 1  liveness: producer/consumer pids, closed flag, consumer heartbeat
 *              slot 2  tail         written by the producer only, read by the consumer
 *              slot 3  producer's private state: cached head, next sequence number, counters
 *              slot 4  head         written by the consumer only, read by the producer
 *              slot 5  consumer's private state: next expected sequence, gaps, counters
 *              slot 6  data wake-up word (futex) and the "consumer sleeps" flag
 *              slot 7  space wake-up word (futex) and the "producer sleeps" flag
 *     1024   data region: `capacity` bytes, a power of two
 *
 * Slots are 128 bytes rather than 64 because adjacent-line prefetchers pull cache lines in
 * pairs: two counters 64 bytes apart still ping-pong between cores (aeron does the same).
 *
 * Records are FF_REC_HEADER_SIZE bytes of ff_rec_header followed by the payload, padded so the
 * next record starts 8-byte aligned. A record never straddles the end of the data region: when
 * it would, the producer fills the rest of the region with a padding record (type FF_PAD_TYPE,
 * `length` = bytes to skip) and writes the record at offset 0. Positions (head, tail) are
 * monotonically growing 64-bit byte counters; position & (capacity - 1) is the offset.
 *
 * Ordering: the producer writes the record, then stores tail with release; the consumer loads
 * tail with acquire, reads every record below it, then stores head with release once per batch;
 * the producer loads head with acquire only when its cached copy says the ring may be full.
 * Nothing shared is ever accessed with a plain load or store.
 *
 * Sleeping: a consumer that finds the ring empty spins, yields, then raises `consumer_waiting`
 * and sleeps on the 32-bit futex word `data_seq`. After publishing, the producer (fence, then
 * exchange on the flag) wakes it only if the flag was up, so a busy consumer costs the producer
 * one fence and one load of a line that stays shared. Producers waiting for space do the
 * mirror image on `space_seq` / `producer_waiting`.
 */
#ifndef FASTFEED_RING_H
#define FASTFEED_RING_H

#include <errno.h>
#include <linux/futex.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define FF_RING_MAGIC 0x31474E4952464646ULL /* "FFFRING1" little-endian */
#define FF_RING_VERSION 1u
#define FF_RING_SLOT 128
#define FF_RING_HEADER_SIZE (8 * FF_RING_SLOT)
#define FF_REC_HEADER_SIZE 32
#define FF_REC_ALIGN 8
#define FF_PAD_TYPE (-1)
/* Smallest data region: room for a few records of any size and a sane max payload. */
#define FF_RING_MIN_CAPACITY 1024ULL
/* Largest data region: positions stay far from 2^64 and lengths fit in uint32. */
#define FF_RING_MAX_CAPACITY (1ULL << 32)

/* Full-ring policies. */
#define FF_POLICY_DROP 0  /* drop the frame at once and count it */
#define FF_POLICY_WAIT 1  /* wait up to wait_timeout_ns for space, then drop and count */
#define FF_POLICY_BLOCK 2 /* wait for space as long as the ring is open */
/* Lossless without waiting here: a write that does not fit returns 0 at once, is not counted as
   a drop and takes no sequence number. The producer keeps the frame and stops reading its source
   (TCP flow control then pushes back to the sender) until the consumer makes room. */
#define FF_POLICY_PAUSE 3

/* How long to spin and how often to yield before sleeping. Spinning ~10 µs covers the gaps
   between frames of a busy feed without a syscall (a futex wake-up costs tens of µs on a VM);
   a few yields let a consumer that shares a core with the producer make progress; after that
   the futex makes an idle feed free. Bounded by time, not iterations: `pause` costs from 10
   to 150 cycles depending on the CPU. At 1000 frames/s this costs the consumer ~2% of a core. */
#define FF_SPIN_NS 10000
#define FF_YIELD_ITERS 8

#if defined(__GNUC__)
#define FF_LIKELY(x) __builtin_expect(!!(x), 1)
#define FF_UNLIKELY(x) __builtin_expect(!!(x), 0)
#else
#define FF_LIKELY(x) (x)
#define FF_UNLIKELY(x) (x)
#endif

#define FF_LOAD_ACQ(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define FF_LOAD_RLX(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define FF_STORE_REL(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define FF_STORE_RLX(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)

typedef struct ff_rec_header {
    uint32_t length;  /* payload bytes; for a padding record, bytes to skip */
    int32_t type;     /* user type, FF_PAD_TYPE for padding */
    int64_t recv_ts;  /* receive time, µs since the epoch */
    uint64_t seq;     /* producer's sequence number; drops consume one too */
    int32_t route;    /* routing key / symbol id */
    uint32_t reserved;
} ff_rec_header;

typedef struct ff_ring_header {
    /* slot 0: constants, written once before `magic` is published */
    uint64_t magic;
    uint32_t version;
    uint32_t header_size;
    uint64_t capacity;
    uint32_t max_payload;
    uint32_t full_policy;
    int64_t wait_timeout_ns;
    int32_t owner_pid;
    uint32_t rec_header_size;
    uint64_t owner_start_ticks; /* /proc/<pid>/stat start time: tells a reused pid apart */
    /* slot 1: liveness */
    _Alignas(128) int32_t producer_pid;
    int32_t consumer_pid;
    uint32_t closed;
    uint32_t _r1;
    int64_t consumer_heartbeat_ns; /* CLOCK_MONOTONIC at the consumer's last poll */
    /* slot 2 */
    _Alignas(128) uint64_t tail;
    /* slot 3: written by the producer only */
    _Alignas(128) uint64_t cached_head;
    uint64_t next_seq;
    uint64_t written;
    uint64_t dropped;          /* all drops, oversize included */
    uint64_t dropped_oversize; /* payload larger than max_payload */
    uint64_t full_waits;       /* times the producer found the ring full */
    uint64_t claim_pos;
    uint64_t claim_end;
    uint32_t claim_max;
    uint32_t _r3;
    /* slot 4 */
    _Alignas(128) uint64_t head;
    /* slot 5: written by the consumer only */
    _Alignas(128) uint64_t next_expected_seq;
    uint64_t gaps;
    uint64_t consumed;
    uint64_t batches;
    /* slot 6 */
    _Alignas(128) uint32_t data_seq;
    uint32_t consumer_waiting;
    /* slot 7 */
    _Alignas(128) uint32_t space_seq;
    uint32_t producer_waiting;
    uint8_t _end[FF_RING_SLOT - 8];
} ff_ring_header;

_Static_assert(sizeof(ff_rec_header) == FF_REC_HEADER_SIZE, "record header size");
_Static_assert(sizeof(ff_ring_header) == FF_RING_HEADER_SIZE, "ring header size");

/* Atomic accessors for code that only has a field's address (Cython, counters shown to Python). */
static inline uint64_t ff_ld_u64(const uint64_t *p) { return FF_LOAD_ACQ(p); }
static inline int64_t ff_ld_i64(const int64_t *p) { return FF_LOAD_ACQ(p); }
static inline uint32_t ff_ld_u32(const uint32_t *p) { return FF_LOAD_ACQ(p); }
static inline int32_t ff_ld_i32(const int32_t *p) { return FF_LOAD_ACQ(p); }
static inline void ff_st_i32(int32_t *p, int32_t v) { FF_STORE_REL(p, v); }
static inline void ff_st_u32(uint32_t *p, uint32_t v) { FF_STORE_REL(p, v); }
static inline void ff_st_i64(int64_t *p, int64_t v) { FF_STORE_REL(p, v); }
static inline void ff_st_u64(uint64_t *p, uint64_t v) { FF_STORE_REL(p, v); }

static inline ff_ring_header *ff_ring_hdr(void *base) { return (ff_ring_header *)base; }
static inline uint8_t *ff_ring_data(void *base) { return (uint8_t *)base + FF_RING_HEADER_SIZE; }
static inline uint64_t ff_align8(uint64_t n) { return (n + (FF_REC_ALIGN - 1)) & ~(uint64_t)(FF_REC_ALIGN - 1); }
static inline uint64_t ff_ring_segment_size(uint64_t capacity) { return FF_RING_HEADER_SIZE + capacity; }

static inline int64_t ff_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static inline void ff_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#endif
}

/* Spin for up to FF_SPIN_NS until `cond` holds; when it does, the enclosing function returns 1. */
#define FF_SPIN_UNTIL(cond)                                                                      \
    do {                                                                                         \
        int64_t _spin_end = ff_now_ns() + FF_SPIN_NS;                                            \
        for (;;) {                                                                               \
            for (int _i = 0; _i < 64; _i++) {                                                    \
                if (cond)                                                                        \
                    return 1;                                                                    \
                ff_cpu_relax();                                                                  \
            }                                                                                    \
            if (ff_now_ns() >= _spin_end)                                                        \
                break;                                                                           \
        }                                                                                        \
    } while (0)

/* Process-shared futex (not FUTEX_PRIVATE: the word lives in a MAP_SHARED segment). */
static inline long ff_futex_wait(uint32_t *addr, uint32_t expected, int64_t timeout_ns)
{
    struct timespec ts, *tsp = NULL;
    if (timeout_ns >= 0) {
        ts.tv_sec = timeout_ns / 1000000000LL;
        ts.tv_nsec = timeout_ns % 1000000000LL;
        tsp = &ts;
    }
    return syscall(SYS_futex, addr, FUTEX_WAIT, expected, tsp, NULL, 0);
}

static inline long ff_futex_wake(uint32_t *addr, int n)
{
    return syscall(SYS_futex, addr, FUTEX_WAKE, n, NULL, NULL, 0);
}

/* Largest payload for a capacity: aeron's capacity/8 keeps the padding lost at a wrap small
   and guarantees that any record fits once the consumer catches up. */
static inline uint32_t ff_ring_max_payload_for(uint64_t capacity)
{
    uint64_t m = capacity / 8 - FF_REC_HEADER_SIZE;
    return m > 0x7fffffffULL ? 0x7fffffffU : (uint32_t)m;
}

/* Initialise a zero-filled segment. `magic` is stored last with release so that an attacher
   that sees the magic also sees every constant. Returns 0, or -1 if capacity is invalid. */
static inline int ff_ring_init(void *base, uint64_t capacity, uint32_t policy, int64_t wait_timeout_ns,
                               int32_t owner_pid, uint64_t owner_start_ticks)
{
    ff_ring_header *h = ff_ring_hdr(base);
    if (capacity < FF_RING_MIN_CAPACITY || capacity > FF_RING_MAX_CAPACITY || (capacity & (capacity - 1)))
        return -1;
    h->version = FF_RING_VERSION;
    h->header_size = FF_RING_HEADER_SIZE;
    h->rec_header_size = FF_REC_HEADER_SIZE;
    h->capacity = capacity;
    h->max_payload = ff_ring_max_payload_for(capacity);
    h->full_policy = policy;
    h->wait_timeout_ns = wait_timeout_ns;
    h->owner_pid = owner_pid;
    h->owner_start_ticks = owner_start_ticks;
    FF_STORE_REL(&h->magic, FF_RING_MAGIC);
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Wake-ups                                                                                    */

/* Producer side, after publishing: wake a sleeping consumer. The seq_cst fence orders the tail
   store before the flag load; the consumer does the mirror image (flag store, fence, tail load),
   so at least one of the two sees the other and no wake-up is lost. */
static inline void ff__notify(uint32_t *waiting, uint32_t *seq)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (FF_UNLIKELY(FF_LOAD_RLX(waiting))) {
        if (__atomic_exchange_n(waiting, 0u, __ATOMIC_SEQ_CST)) {
            __atomic_add_fetch(seq, 1u, __ATOMIC_SEQ_CST);
            ff_futex_wake(seq, 1 << 30);
        }
    }
}

/* Wake both sides unconditionally (shutdown, close): sleepers re-check their state. */
static inline void ff_ring_wake_all(void *base)
{
    ff_ring_header *h = ff_ring_hdr(base);
    __atomic_add_fetch(&h->data_seq, 1u, __ATOMIC_SEQ_CST);
    ff_futex_wake(&h->data_seq, 1 << 30);
    __atomic_add_fetch(&h->space_seq, 1u, __ATOMIC_SEQ_CST);
    ff_futex_wake(&h->space_seq, 1 << 30);
}

/* ------------------------------------------------------------------------------------------ */
/* Producer                                                                                    */

/* Reserve room for a record of `len` payload bytes without waiting. On success writes the
   padding record at the wrap if one is needed, sets *pos (position of the record header) and
   *end (position after it) and returns 1; returns 0 when the ring is full. Publishes nothing. */
static inline int ff__reserve(ff_ring_header *h, uint8_t *data, uint32_t len, uint64_t *pos, uint64_t *end)
{
    const uint64_t cap = h->capacity;
    const uint64_t rec = ff_align8((uint64_t)FF_REC_HEADER_SIZE + len);
    uint64_t tail = FF_LOAD_RLX(&h->tail); /* only this producer writes it */
    const uint64_t idx = tail & (cap - 1);
    const uint64_t to_end = cap - idx;
    const uint64_t need = rec <= to_end ? rec : to_end + rec;
    if (FF_UNLIKELY(tail + need - h->cached_head > cap)) {
        uint64_t head = FF_LOAD_ACQ(&h->head);
        h->cached_head = head;
        if (tail + need - head > cap)
            return 0;
    }
    if (FF_UNLIKELY(rec > to_end)) {
        /* Only the first 8 bytes are needed: at least 8 bytes remain since records are 8-aligned. */
        ff_rec_header *pad = (ff_rec_header *)(data + idx);
        pad->length = (uint32_t)to_end;
        pad->type = FF_PAD_TYPE;
        tail += to_end;
    }
    *pos = tail;
    *end = tail + rec;
    return 1;
}

static inline void ff__fill_header(uint8_t *data, uint64_t pos, uint64_t mask, uint32_t len, int32_t type,
                                   int64_t recv_ts, uint64_t seq, int32_t route)
{
    ff_rec_header *r = (ff_rec_header *)(data + (pos & mask));
    r->length = len;
    r->type = type;
    r->recv_ts = recv_ts;
    r->seq = seq;
    r->route = route;
    r->reserved = 0;
}

static inline void ff__publish(ff_ring_header *h, uint64_t end)
{
    FF_STORE_RLX(&h->written, h->written + 1);
    FF_STORE_REL(&h->tail, end);
    ff__notify(&h->consumer_waiting, &h->data_seq);
}

/* Count a drop. Dropped frames consume a sequence number so the consumer sees the gap. */
static inline void ff__count_drop(ff_ring_header *h, int oversize)
{
    FF_STORE_RLX(&h->next_seq, h->next_seq + 1);
    FF_STORE_RLX(&h->dropped, h->dropped + 1);
    if (oversize)
        FF_STORE_RLX(&h->dropped_oversize, h->dropped_oversize + 1);
}

/* A write the policy gave up on: a drop, counted and taking a sequence number, except under
   "pause", where nothing was lost: the producer still holds the frame. */
static inline void ff__refused(ff_ring_header *h)
{
    if (h->full_policy != FF_POLICY_PAUSE)
        ff__count_drop(h, 0);
}

/* Wait until a record of `len` bytes fits, per the ring's policy. Returns 1 when it fits
   (pos/end reserved as by ff__reserve), 0 when the policy gives up or the ring is closed.
   Spins, yields, then sleeps on the space futex. */
static inline int ff__reserve_wait(ff_ring_header *h, uint8_t *data, uint32_t len, uint64_t *pos, uint64_t *end)
{
    uint32_t policy = h->full_policy;
    if (policy == FF_POLICY_DROP)
        return 0;
    FF_STORE_RLX(&h->full_waits, h->full_waits + 1);
    if (policy == FF_POLICY_PAUSE)
        return 0; /* the producer keeps the frame and retries (see ff__refused) */
    if (policy == FF_POLICY_WAIT && h->wait_timeout_ns <= 0)
        return ff__reserve(h, data, len, pos, end);
    int64_t deadline = policy == FF_POLICY_WAIT ? ff_now_ns() + h->wait_timeout_ns : INT64_MAX;
    FF_SPIN_UNTIL(ff__reserve(h, data, len, pos, end));
    for (;;) {
        if (FF_LOAD_RLX(&h->closed))
            return 0;
        int64_t now = ff_now_ns();
        if (now >= deadline)
            return ff__reserve(h, data, len, pos, end);
        for (int i = 0; i < FF_YIELD_ITERS; i++) {
            sched_yield();
            if (ff__reserve(h, data, len, pos, end))
                return 1;
        }
        uint32_t seq = FF_LOAD_ACQ(&h->space_seq);
        __atomic_store_n(&h->producer_waiting, 1u, __ATOMIC_SEQ_CST);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (ff__reserve(h, data, len, pos, end)) {
            FF_STORE_RLX(&h->producer_waiting, 0u);
            return 1;
        }
        now = ff_now_ns();
        int64_t left = deadline - now;
        /* Sleep in slices so a closed flag or a dead consumer's replacement is noticed. */
        if (left > 100000000LL)
            left = 100000000LL;
        if (left > 0)
            ff_futex_wait(&h->space_seq, seq, left);
    }
}

/* Try to write one record without waiting: 1 written, 0 full, -1 larger than max_payload.
   Nothing is counted as dropped on 0 or -1: the caller decides (ff_ring_write does). */
static inline int ff_ring_try_write(void *base, const void *payload, uint32_t len, int32_t type, int64_t recv_ts,
                                    int32_t route)
{
    ff_ring_header *h = ff_ring_hdr(base);
    uint8_t *data = ff_ring_data(base);
    uint64_t pos, end;
    if (FF_UNLIKELY(len > h->max_payload))
        return -1;
    if (FF_UNLIKELY(!ff__reserve(h, data, len, &pos, &end)))
        return 0;
    const uint64_t mask = h->capacity - 1;
    ff__fill_header(data, pos, mask, len, type, recv_ts, h->next_seq, route);
    memcpy(data + (pos & mask) + FF_REC_HEADER_SIZE, payload, len);
    FF_STORE_RLX(&h->next_seq, h->next_seq + 1);
    ff__publish(h, end);
    return 1;
}

/* Write one record applying the ring's full-ring policy (wait up to the bound, block, or drop).
   Returns 1 when written, 0 when dropped; every drop is counted in the header and consumes a
   sequence number. May sleep: call it without the GIL if the policy waits. */
static inline int ff_ring_write(void *base, const void *payload, uint32_t len, int32_t type, int64_t recv_ts,
                                int32_t route)
{
    int r = ff_ring_try_write(base, payload, len, type, recv_ts, route);
    if (FF_LIKELY(r == 1))
        return 1;
    ff_ring_header *h = ff_ring_hdr(base);
    if (r < 0) {
        ff__count_drop(h, 1);
        return 0;
    }
    uint8_t *data = ff_ring_data(base);
    uint64_t pos, end;
    if (!ff__reserve_wait(h, data, len, &pos, &end)) {
        ff__refused(h);
        return 0;
    }
    const uint64_t mask = h->capacity - 1;
    ff__fill_header(data, pos, mask, len, type, recv_ts, h->next_seq, route);
    memcpy(data + (pos & mask) + FF_REC_HEADER_SIZE, payload, len);
    FF_STORE_RLX(&h->next_seq, h->next_seq + 1);
    ff__publish(h, end);
    return 1;
}

/* Zero-copy write, step 1: reserve `max_len` payload bytes (applying the full-ring policy) and
   return a pointer to them, or NULL when the frame is dropped (counted) or too large (counted).
   Fill the bytes, then ff_ring_commit() with the real length (<= max_len) or ff_ring_abort(). */
static inline void *ff_ring_claim(void *base, uint32_t max_len)
{
    ff_ring_header *h = ff_ring_hdr(base);
    uint8_t *data = ff_ring_data(base);
    uint64_t pos, end;
    if (FF_UNLIKELY(max_len > h->max_payload)) {
        ff__count_drop(h, 1);
        return NULL;
    }
    if (FF_UNLIKELY(!ff__reserve(h, data, max_len, &pos, &end))) {
        if (!ff__reserve_wait(h, data, max_len, &pos, &end)) {
            ff__refused(h);
            return NULL;
        }
    }
    h->claim_pos = pos;
    h->claim_end = end;
    h->claim_max = max_len;
    return data + (pos & (h->capacity - 1)) + FF_REC_HEADER_SIZE;
}

/* Zero-copy write, step 2: publish the claimed record with `len` <= the claimed length.
   Returns 1, or 0 if there is no claim or len exceeds it (nothing published). */
static inline int ff_ring_commit(void *base, uint32_t len, int32_t type, int64_t recv_ts, int32_t route)
{
    ff_ring_header *h = ff_ring_hdr(base);
    if (FF_UNLIKELY(h->claim_end == 0 || len > h->claim_max))
        return 0;
    uint8_t *data = ff_ring_data(base);
    uint64_t pos = h->claim_pos;
    uint64_t end = pos + ff_align8((uint64_t)FF_REC_HEADER_SIZE + len); /* shrink to the real length */
    ff__fill_header(data, pos, h->capacity - 1, len, type, recv_ts, h->next_seq, route);
    FF_STORE_RLX(&h->next_seq, h->next_seq + 1);
    h->claim_end = 0;
    ff__publish(h, end);
    return 1;
}

/* Give a claim up: nothing is published and no sequence number is used. A padding record the
   claim may have written stays in free space, unpublished, and is rewritten later. */
static inline void ff_ring_abort(void *base) { ff_ring_hdr(base)->claim_end = 0; }

/* Record that `pid` is now the producer (liveness, shown in the header). */
static inline void ff_ring_set_producer(void *base, int32_t pid)
{
    FF_STORE_REL(&ff_ring_hdr(base)->producer_pid, pid);
}

/* Release the consumer position over padding only (no records): keeps counters unchanged. */
static inline void ff_ring_skip(void *base, uint64_t end)
{
    ff_ring_header *h = ff_ring_hdr(base);
    FF_STORE_REL(&h->head, end);
    ff__notify(&h->producer_waiting, &h->space_seq);
}

/* ------------------------------------------------------------------------------------------ */
/* Consumer                                                                                    */

/* Gather up to `max` records starting at `*pos` (initially the head) without consuming them.
   Fills the arrays (offsets are relative to the data region and point at the payload), sets
   *pos to the position after the last record gathered, and tracks sequence gaps against
   *expected / *gaps. Returns the number of records. Padding records are skipped.
   A record whose header is impossible (only a corrupted segment has one) ends the batch before
   it: returning 0 with *pos unchanged while records are available means corruption. */
static inline uint32_t ff_ring_poll(void *base, uint32_t max, uint64_t *pos, uint64_t *expected, uint64_t *gaps,
                                    int64_t *offsets, int64_t *lengths, int64_t *recv_ts, uint64_t *seqs,
                                    int32_t *types, int32_t *routes)
{
    ff_ring_header *h = ff_ring_hdr(base);
    const uint8_t *data = ff_ring_data(base);
    const uint64_t mask = h->capacity - 1;
    const uint64_t tail = FF_LOAD_ACQ(&h->tail);
    const uint32_t max_payload = h->max_payload;
    uint64_t p = *pos, exp = *expected, g = *gaps;
    uint32_t n = 0;
    while (p < tail && n < max) {
        const uint64_t idx = p & mask;
        const ff_rec_header *r = (const ff_rec_header *)(data + idx);
        const uint32_t len = r->length;
        if (FF_UNLIKELY(r->type == FF_PAD_TYPE)) {
            if (FF_UNLIKELY(idx + len != mask + 1)) /* padding always runs to the end */
                break;
            p += len;
            continue;
        }
        /* Only a corrupted segment fails this: stop before the bad record (see ff_ring_poll's
           comment), never read outside the data region. */
        if (FF_UNLIKELY(len > max_payload))
            break;
        const uint64_t seq = r->seq;
        offsets[n] = (int64_t)(idx + FF_REC_HEADER_SIZE);
        lengths[n] = len;
        recv_ts[n] = r->recv_ts;
        seqs[n] = seq;
        types[n] = r->type;
        routes[n] = r->route;
        /* seq < exp only if a consumer died between committing its counters and its head
           (see ff_ring_release): re-reading is not a gap. */
        if (FF_UNLIKELY(seq != exp) && seq > exp)
            g += seq - exp;
        exp = seq + 1;
        p += ff_align8((uint64_t)FF_REC_HEADER_SIZE + len);
        n++;
    }
    *pos = p;
    *expected = exp;
    *gaps = g;
    return n;
}

/* Non-zero when records are available to a consumer whose head is `head`. */
static inline int ff_ring_available(void *base, uint64_t head)
{
    return FF_LOAD_ACQ(&ff_ring_hdr(base)->tail) != head;
}

/* Commit the consumer position after a batch has been fully handled: counters first, head
   last, so a consumer killed between the two re-reads the batch (and never skips it). Wakes a
   producer that sleeps for space. */
static inline void ff_ring_release(void *base, uint64_t end, uint64_t expected, uint64_t gaps, uint64_t nrecords)
{
    ff_ring_header *h = ff_ring_hdr(base);
    FF_STORE_RLX(&h->next_expected_seq, expected);
    FF_STORE_RLX(&h->gaps, gaps);
    FF_STORE_RLX(&h->consumed, h->consumed + nrecords);
    FF_STORE_RLX(&h->batches, h->batches + 1);
    FF_STORE_REL(&h->head, end);
    ff__notify(&h->producer_waiting, &h->space_seq);
}

/* Wait for records after `head`. busy != 0: spin only (lowest latency, one core at 100%).
   Otherwise spin, yield, then sleep on the data futex. Returns 1 when records are available,
   0 after timeout_ns (< 0: no limit) or when the ring is closed and empty. */
static inline int ff_ring_wait(void *base, uint64_t head, int64_t timeout_ns, int busy)
{
    ff_ring_header *h = ff_ring_hdr(base);
    if (ff_ring_available(base, head))
        return 1;
    int64_t deadline = timeout_ns < 0 ? INT64_MAX : ff_now_ns() + timeout_ns;
    if (busy) {
        for (;;) {
            for (int i = 0; i < 1024; i++) {
                if (ff_ring_available(base, head))
                    return 1;
                ff_cpu_relax();
            }
            if (ff_now_ns() >= deadline || FF_LOAD_RLX(&h->closed))
                return ff_ring_available(base, head);
        }
    }
    FF_SPIN_UNTIL(ff_ring_available(base, head));
    for (;;) {
        for (int i = 0; i < FF_YIELD_ITERS; i++) {
            sched_yield();
            if (ff_ring_available(base, head))
                return 1;
        }
        int64_t left = deadline - ff_now_ns();
        if (left <= 0 || FF_LOAD_RLX(&h->closed))
            return ff_ring_available(base, head);
        uint32_t seq = FF_LOAD_ACQ(&h->data_seq);
        __atomic_store_n(&h->consumer_waiting, 1u, __ATOMIC_SEQ_CST);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (ff_ring_available(base, head)) {
            FF_STORE_RLX(&h->consumer_waiting, 0u);
            return 1;
        }
        ff_futex_wait(&h->data_seq, seq, left);
        FF_STORE_RLX(&h->consumer_waiting, 0u);
        if (ff_ring_available(base, head))
            return 1;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Doorbell: one waiter sleeping until any of several producers has published somewhere        */

/* bell[0] is the futex word (a counter), bell[1] the "someone sleeps" flag; both live in shared
   memory (8 bytes, 4-aligned). Producers call ff_bell_ring after publishing; the waiter calls
   ff_bell_prepare, re-checks its condition (the rings), then ff_bell_wait with the value
   ff_bell_prepare returned: the same flag/fence handshake as the ring's, so no wake-up is lost. */
static inline void ff_bell_ring(uint32_t *bell) { ff__notify(&bell[1], &bell[0]); }

static inline uint32_t ff_bell_prepare(uint32_t *bell)
{
    uint32_t seq = FF_LOAD_ACQ(&bell[0]);
    __atomic_store_n(&bell[1], 1u, __ATOMIC_SEQ_CST);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return seq;
}

static inline void ff_bell_cancel(uint32_t *bell) { FF_STORE_RLX(&bell[1], 0u); }

static inline void ff_bell_wait(uint32_t *bell, uint32_t seq, int64_t timeout_ns)
{
    ff_futex_wait(&bell[0], seq, timeout_ns);
    FF_STORE_RLX(&bell[1], 0u);
}

#endif /* FASTFEED_RING_H */
