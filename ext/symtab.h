/* An append-only string -> int32 id table that lives in one flat memory block.
 *
 * The block may be private (a bytearray) or a shared-memory segment mapped by
 * several processes: lookups are lock-free (entries are published with a
 * release store of their slot, read with acquire), inserts take a spinlock
 * word inside the block.  That is what keeps symbol ids identical in every
 * worker of one feed without routing every new symbol through one process.
 *
 * Layout:  header (64 B) | entries[capacity] {u32 off, u32 len}
 *          | slots[nslots] u32 (id + 1, 0 = empty) | arena[arena_size]
 */
#ifndef FF_SYMTAB_H
#define FF_SYMTAB_H

#include <stdint.h>
#include <string.h>
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <unistd.h>

#define FF_SYMTAB_MAGIC 0x3142415453464646ULL /* "FFFSTAB1" */
#define FF_SYMTAB_VERSION 1u
/* Average bytes reserved per code: exchange-qualified codes such as
 * "NASDAQ:AAPL" are ~12 bytes, so 48 leaves ample room for long ones. */
#define FF_SYMTAB_BYTES_PER_CODE 48u
/* Longest code: a table stores any length its bytes for codes hold; this only keeps one
 * absurd code from taking a table's room at once. */
#define FF_SYMTAB_MAX_CODE 65535u

typedef struct {
    uint64_t magic;
    uint32_t version;
    uint32_t capacity;
    uint32_t nslots;
    uint32_t arena_size;
    uint32_t count;      /* entries published; release/acquire */
    uint32_t arena_used; /* only touched under the lock */
    uint32_t lock;       /* 0 free, else the holder's pid */
    uint32_t _reserved[7];
} ff_symtab_hdr;

typedef struct {
    uint32_t off;
    uint32_t len;
} ff_symtab_entry;

typedef struct {
    ff_symtab_hdr *hdr;
    ff_symtab_entry *entries;
    uint32_t *slots;
    char *arena;
    uint32_t mask;
} ff_symtab;

static inline uint32_t ff_symtab_nslots(uint32_t capacity)
{
    uint32_t n = 16;
    while (n < capacity * 2u) n <<= 1; /* load factor <= 0.5 keeps probes short */
    return n;
}

static inline size_t ff_symtab_nbytes(uint32_t capacity)
{
    return sizeof(ff_symtab_hdr) + (size_t)capacity * sizeof(ff_symtab_entry) +
           (size_t)ff_symtab_nslots(capacity) * 4u +
           (size_t)capacity * FF_SYMTAB_BYTES_PER_CODE;
}

static inline void ff_symtab_bind(ff_symtab *t, void *block)
{
    t->hdr = (ff_symtab_hdr *)block;
    t->entries = (ff_symtab_entry *)((char *)block + sizeof(ff_symtab_hdr));
    t->slots = (uint32_t *)(t->entries + t->hdr->capacity);
    t->arena = (char *)(t->slots + t->hdr->nslots);
    t->mask = t->hdr->nslots - 1u;
}

/* Format a zeroed block.  The creator does this once, before other processes attach. */
static inline void ff_symtab_init(void *block, uint32_t capacity)
{
    ff_symtab_hdr *h = (ff_symtab_hdr *)block;
    memset(block, 0, ff_symtab_nbytes(capacity));
    h->version = FF_SYMTAB_VERSION;
    h->capacity = capacity;
    h->nslots = ff_symtab_nslots(capacity);
    h->arena_size = capacity * FF_SYMTAB_BYTES_PER_CODE;
    __atomic_store_n(&h->magic, FF_SYMTAB_MAGIC, __ATOMIC_RELEASE);
}

static inline uint64_t ff_mix(uint64_t h)
{
    h *= 0xD6E8FEB86659FD93ULL;
    return h ^ (h >> 32);
}

/* Symbol codes are short: up to 16 bytes they are hashed (and compared) from two
 * overlapping fixed-size loads, with no byte loop and no library call. */
static inline uint64_t ff_load_u64(const char *p)
{
    uint64_t w;
    memcpy(&w, p, 8);
    return w;
}

static inline uint32_t ff_load_u32(const char *p)
{
    uint32_t w;
    memcpy(&w, p, 4);
    return w;
}

static inline uint64_t ff_hash_bytes(const char *p, size_t n)
{
    uint64_t h = 0x9E3779B97F4A7C15ULL ^ (uint64_t)n;
    if (n >= 8 && n <= 16) {
        h = (h ^ ff_load_u64(p)) * 0xBF58476D1CE4E5B9ULL;
        h = (h ^ (h >> 29) ^ ff_load_u64(p + n - 8)) * 0x94D049BB133111EBULL;
        return ff_mix(h);
    }
    if (n >= 4 && n < 8) {
        uint64_t w = ((uint64_t)ff_load_u32(p) << 32) | ff_load_u32(p + n - 4);
        return ff_mix((h ^ w) * 0xBF58476D1CE4E5B9ULL);
    }
    uint64_t w;
    while (n >= 8) {
        memcpy(&w, p, 8);
        h = (h ^ w) * 0xBF58476D1CE4E5B9ULL;
        h ^= h >> 29;
        p += 8;
        n -= 8;
    }
    if (n) {
        w = 0;
        memcpy(&w, p, n);
        h = (h ^ w) * 0x94D049BB133111EBULL;
        h ^= h >> 31;
    }
    return ff_mix(h);
}

static inline int ff_same_bytes(const char *a, const char *b, size_t n)
{
    if (n >= 8 && n <= 16)
        return ff_load_u64(a) == ff_load_u64(b) && ff_load_u64(a + n - 8) == ff_load_u64(b + n - 8);
    return n == 0 || memcmp(a, b, n) == 0; /* memcmp must not get NULL, even for 0 bytes */
}

/* -1 when absent. */
static inline int32_t ff_symtab_find(const ff_symtab *t, const char *p, uint32_t n, uint64_t h)
{
    uint32_t i = (uint32_t)h & t->mask;
    for (;;) {
        uint32_t s = __atomic_load_n(&t->slots[i], __ATOMIC_ACQUIRE);
        if (s == 0) return -1;
        const ff_symtab_entry *e = &t->entries[s - 1];
        if (e->len == n && ff_same_bytes(t->arena + e->off, p, n)) return (int32_t)(s - 1);
        i = (i + 1) & t->mask;
    }
}

/* The insert lock holds its owner's pid, so that a process killed while holding it
 * (a worker SIGKILLed mid-insert) cannot wedge every other process: a waiter that
 * finds the holder gone takes the lock over.  An insert cut short that way leaves at
 * worst an entry no slot points to, never a slot pointing to a missing entry. */
static inline void ff_symtab_lock(ff_symtab_hdr *hdr)
{
    uint32_t me = (uint32_t)getpid();
    for (unsigned spins = 0;; spins++) {
        uint32_t holder = 0;
        if (__atomic_compare_exchange_n(&hdr->lock, &holder, me, 0, __ATOMIC_ACQUIRE,
                                        __ATOMIC_RELAXED))
            return;
        if ((spins & 1023) == 1023 && holder != 0 && kill((pid_t)holder, 0) == -1 &&
            errno == ESRCH &&
            __atomic_compare_exchange_n(&hdr->lock, &holder, me, 0, __ATOMIC_ACQUIRE,
                                        __ATOMIC_RELAXED))
            return;
        sched_yield();
    }
}

static inline int ff_symtab_trylock(ff_symtab_hdr *hdr)
{
    uint32_t holder = 0;
    return __atomic_compare_exchange_n(&hdr->lock, &holder, (uint32_t)getpid(), 0,
                                       __ATOMIC_ACQUIRE, __ATOMIC_RELAXED);
}

static inline void ff_symtab_unlock(ff_symtab_hdr *hdr)
{
    __atomic_store_n(&hdr->lock, 0u, __ATOMIC_RELEASE);
}

/* Takes the locks of n distinct tables together, whatever order other processes take
 * them in: block on one, try the others, and when one is busy release everything and
 * block on that one first next time.  No fixed order is needed, so two processes whose
 * decoders hold the same tables in different roles cannot deadlock. */
static inline void ff_symtab_lock_all(ff_symtab_hdr *const *hs, int n)
{
    int first = 0;
    for (;;) {
        ff_symtab_lock(hs[first]);
        int busy = -1;
        for (int i = 0; i < n && busy < 0; i++)
            if (i != first && !ff_symtab_trylock(hs[i])) busy = i;
        if (busy < 0) return;
        for (int i = 0; i < busy; i++)
            if (i != first) ff_symtab_unlock(hs[i]);
        ff_symtab_unlock(hs[first]);
        first = busy;
        sched_yield();
    }
}

/* Under the lock: the id of the code, appending it if absent.  -1: table full (no room
 * for another entry, or for its bytes).  n must be <= FF_SYMTAB_MAX_CODE. */
static inline int32_t ff_symtab_add_locked(ff_symtab *t, const char *p, uint32_t n, uint64_t h)
{
    int32_t id = ff_symtab_find(t, p, n, h); /* another process may have won the race */
    if (id >= 0) return id;
    ff_symtab_hdr *hdr = t->hdr;
    uint32_t count = hdr->count;
    if (count >= hdr->capacity || hdr->arena_used + n > hdr->arena_size) return -1;
    if (n) memcpy(t->arena + hdr->arena_used, p, n); /* p may be NULL when n is 0 */
    t->entries[count].off = hdr->arena_used;
    t->entries[count].len = n;
    hdr->arena_used += n;
    __atomic_store_n(&hdr->count, count + 1u, __ATOMIC_RELEASE);
    uint32_t i = (uint32_t)h & t->mask;
    while (t->slots[i]) i = (i + 1) & t->mask;
    __atomic_store_n(&t->slots[i], count + 1u, __ATOMIC_RELEASE);
    return (int32_t)count;
}

/* The id of the code, inserting it if new.  -1: table full, -2: code too long. */
static inline int32_t ff_symtab_intern(ff_symtab *t, const char *p, uint32_t n)
{
    uint64_t h = ff_hash_bytes(p, n);
    int32_t id = ff_symtab_find(t, p, n, h);
    if (__builtin_expect(id >= 0, 1)) return id;
    if (n > FF_SYMTAB_MAX_CODE) return -2;
    ff_symtab_lock(t->hdr);
    id = ff_symtab_add_locked(t, p, n, h);
    ff_symtab_unlock(t->hdr);
    return id;
}

static inline uint32_t ff_symtab_count(const ff_symtab *t)
{
    return __atomic_load_n(&t->hdr->count, __ATOMIC_ACQUIRE);
}

#endif
