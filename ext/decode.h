/* The feed's abbreviated JSON -> fixed-layout rows, in one pass.
 *
 * A tiny recursive-descent scanner for exactly the three message shapes of
 * PROTOCOL.md section 3.  It validates JSON fully (grammar, UTF-8, escapes),
 * so anything it accepts json.loads accepts too, and it never builds a
 * Python object on the data path: keys are matched by length and bytes,
 * numbers are converted in place, symbol codes are interned to int32 ids.
 *
 * Rows are appended to growable arrays whose element layout is exactly the
 * NumPy dtype the Python layer exposes (aligned structs).  A frame that fails
 * rolls the three arrays back to where they stood at the frame's start, so a
 * bad frame contributes no rows.  Codes new to their table are only looked up
 * while the frame is read and inserted once all of it has decoded, so a bad
 * frame adds nothing to the tables either.
 *
 * Bounds: every byte read lies in [start, end) of the frame, on every path, valid
 * input or not.  Frames are not padded (they sit in ring memory, mmap'd captures,
 * broker buffers, and may end where mapped memory ends), so an 8-byte load is made
 * only after one check that end - p >= 8 (ff_load_upto serves a frame's last bytes
 * from a load that ends at `end`), and a function that reads *p either checks p < end
 * itself or says that its caller did (asserted in debug builds).
 * tests/test_decoder_bounds.py and tests/fuzz/fuzz_guard.py hold frames against a
 * PROT_NONE page to prove it.  (The structure-first paths load a frame into a zero-padded
 * copy of its own: with AVX-512 by masked loads, which neither read nor fault on the bytes
 * masked off past its end; with AVX2 by 32-byte loads moved back to end at its end.)
 */
#ifndef FF_DECODE_H
#define FF_DECODE_H

#include <Python.h>
#include <assert.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "symtab.h"

#define FF_LIKELY(x) __builtin_expect(!!(x), 1)
#define FF_UNLIKELY(x) __builtin_expect(!!(x), 0)

/* Deep enough for any real message (the deepest is frame > array > series >
 * bar), shallow enough that recursion cannot exhaust the C stack. */
#define FF_MAX_DEPTH 64
#define FF_NAT INT64_MIN

/* SWAR: eight bytes at a time in one 64-bit word (little-endian loads). */
#define FF_ONES 0x0101010101010101ULL
#define FF_HIGHS 0x8080808080808080ULL

static inline __attribute__((always_inline)) uint64_t ff_load8(const uint8_t *p)
{
    uint64_t w;
    memcpy(&w, p, 8);
    return w;
}

/* High bit set in the lowest byte that is '"', '\\', a control character or
 * non-ASCII (bytes above the first flagged one may be flagged spuriously). */
static inline __attribute__((always_inline)) uint64_t ff_str_stops(uint64_t w)
{
    uint64_t q = w ^ (FF_ONES * '"');
    uint64_t b = w ^ (FF_ONES * '\\');
    return (((q - FF_ONES) & ~q) | ((b - FF_ONES) & ~b) | ((w - FF_ONES * 0x20) & ~w) | w) & FF_HIGHS;
}

static inline __attribute__((always_inline)) int ff_all_digits8(uint64_t w)
{
    return ((w & 0xF0F0F0F0F0F0F0F0ULL) | (((w + FF_ONES * 6) & 0xF0F0F0F0F0F0F0F0ULL) >> 4)) ==
           FF_ONES * 0x33;
}

/* Eight ASCII digits, first in the lowest byte, to their value. */
static inline __attribute__((always_inline)) uint32_t ff_digits8(uint64_t w)
{
    w = ((w & 0x0F0F0F0F0F0F0F0FULL) * 2561) >> 8;               /* pairs of digits */
    w = ((w & 0x00FF00FF00FF00FFULL) * 6553601) >> 16;           /* groups of four */
    return (uint32_t)(((w & 0x0000FFFF0000FFFFULL) * 42949672960001ULL) >> 32);
}

/* How many of the eight bytes, from the lowest, are ASCII digits before the first
 * that is not. */
static inline __attribute__((always_inline)) unsigned ff_ndigits8(uint64_t w)
{
    /* x = byte - '0': a digit leaves 0..9, whose high bit stays clear even after + 0x76;
     * anything else sets it in x or in x + 0x76.  Borrows and carries only run upward,
     * from a byte that is already flagged, so the lowest flagged byte is exact. */
    uint64_t x = w - FF_ONES * '0';
    uint64_t m = (x | (x + FF_ONES * 0x76)) & FF_HIGHS;
    return m ? (unsigned)__builtin_ctzll(m) >> 3 : 8u;
}

/* The first n (1..8) digits of w as a number. */
static inline __attribute__((always_inline)) uint64_t ff_lead_digits(uint64_t w, unsigned n)
{
    return ff_digits8(w << (64 - 8 * n));
}

static const uint64_t ff_ipow10[] = {1ULL, 10ULL, 100ULL, 1000ULL, 10000ULL, 100000ULL,
    1000000ULL, 10000000ULL, 100000000ULL, 1000000000ULL, 10000000000ULL, 100000000000ULL,
    1000000000000ULL, 10000000000000ULL, 100000000000000ULL, 1000000000000000ULL,
    10000000000000000ULL, 100000000000000000ULL, 1000000000000000000ULL};

static const double ff_pow10[] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,
                                  1e8,  1e9,  1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
                                  1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};


/* Eight bytes from p, of which those at or past e read as zero (a zero byte ends
 * any number).  Near the end of a frame it loads the last eight bytes of the
 * frame and shifts, so it never touches memory outside [lo, e). */
static inline __attribute__((always_inline)) uint64_t ff_load_upto(const uint8_t *p, const uint8_t *e, const uint8_t *lo)
{
    ptrdiff_t left = e - p;
    if (FF_LIKELY(left >= 8)) return ff_load8(p);
    if (left <= 0) return 0;
    if (e - lo >= 8) return ff_load8(e - 8) >> (8 * (8 - left));
    uint64_t w = 0;
    memcpy(&w, p, (size_t)left);
    return w;
}

/* The 16 bytes at p as two words, those at or past e read as zero; the frame [lo, e) holds
 * at least 16 bytes.  Near the frame's end it loads the frame's last 16 and shifts. */
static inline __attribute__((always_inline)) void ff_load16_upto(const uint8_t *p, const uint8_t *e, const uint8_t *lo, uint64_t *w0,
                                  uint64_t *w1)
{
    (void)lo;
    assert(e - lo >= 16);
    ptrdiff_t left = e - p;
    if (FF_LIKELY(left >= 16)) {
        *w0 = ff_load8(p);
        *w1 = ff_load8(p + 8);
        return;
    }
    if (left <= 0) {
        *w0 = *w1 = 0;
        return;
    }
    unsigned __int128 v = ((unsigned __int128)ff_load8(e - 8) << 64) | ff_load8(e - 16);
    v >>= 8 * (16 - left);
    *w0 = (uint64_t)v;
    *w1 = (uint64_t)(v >> 64);
}

/* A number as its field read it: converted only when the message's kind is known, in the
 * row's fixed order, so that which field a key names never steers a branch of the number
 * parser (keys come in any order; the branch predictor learns a fixed sequence only). */
enum { FF_NUM_FAST, FF_NUM_NULL, FF_NUM_TEXT };
typedef struct {
    uint64_t mant;       /* FF_NUM_FAST: the digits, the point left out */
    const uint8_t *text; /* the number's first byte (FF_NUM_TEXT: parse it again from here) */
    uint32_t nfrac;      /* FF_NUM_FAST: how many digits follow the point */
    uint8_t neg, how;
} ff_numv;

/* The first n (0..7) digits of w as a number (0 for none). */
static inline __attribute__((always_inline)) uint64_t ff_lead_digits0(uint64_t w, unsigned n)
{
    return ff_digits8((w << (56 - 8 * n)) << 8);
}

/* The shape nearly every feed number has, `-?D{1,15}(.D{1,7})?` with no exponent and at
 * most 18 digits, read in three 8-byte loads with no branch on how many digits there are
 * (a timestamp's ten and a price's three take the same path).  0: anything else, which
 * the general parser then takes, errors included.  p may be at e (a frame that ends right
 * after a key's colon): every byte it reads is in [lo, e). */
/* roomy: the caller checked that 32 bytes from p lie in the frame, so the three loads (which
 * reach at most 26 bytes past p) need no check each. */
#define FF_LOAD(q) (roomy ? ff_load8(q) : ff_load_upto(q, e, lo))
static inline __attribute__((always_inline)) int ff_scan_decimal_in(const uint8_t *p, const uint8_t *e,
                                                                    const uint8_t *lo, ff_numv *v,
                                                                    const uint8_t **out, int roomy)
{
    if (FF_UNLIKELY(p >= e)) return 0;
    v->text = p;
    unsigned ng = *p == '-';
    p += ng;
    uint64_t w = FF_LOAD(p);
    unsigned n1 = ff_ndigits8(w);
    if (FF_UNLIKELY(n1 == 0 || (n1 > 1 && (uint8_t)w == '0'))) return 0;
    /* A price or size (`243.08`, `520.0`): its digits, point and fraction, and the byte after
     * them, all lie in this one load.  The point is cut out and all the digits converted at
     * once.  Bytes past the frame's end read as zero, which is neither a digit nor `e`. */
    if (n1 < 7 && (uint8_t)(w >> (8 * n1)) == '.') {
        uint64_t hi = w >> (8 * (n1 + 1));
        unsigned nf1 = ff_ndigits8(hi);
        if (FF_LIKELY(nf1 && n1 + 1 + nf1 < 8)) {
            unsigned after = n1 + 1 + nf1; /* <= 7: the byte after the number is in w */
            if (FF_UNLIKELY(((uint8_t)(w >> (8 * after)) | 0x20) == 'e')) return 0;
            uint64_t dig = (w & ((1ULL << (8 * n1)) - 1)) | (hi << (8 * n1));
            v->mant = ff_lead_digits(dig, n1 + nf1);
            v->nfrac = nf1;
            v->neg = (uint8_t)ng;
            v->how = FF_NUM_FAST;
            *out = p + after;
            return 1;
        }
    }
    uint64_t m = ff_lead_digits(w, n1);
    p += n1;
    /* more integer digits: none unless the first load held eight (a timestamp's ten; a
     * price's or size's few end in the first load, which saves a load and a conversion) */
    unsigned n2 = 0;
    if (n1 == 8) {
        w = FF_LOAD(p);
        n2 = ff_ndigits8(w);
        if (FF_UNLIKELY(n2 == 8)) return 0;
        m = m * ff_ipow10[n2] + ff_lead_digits0(w, n2);
        p += n2;
    }
    unsigned nf = 0;
    if (FF_LIKELY(p < e && *p == '.')) {
        w = FF_LOAD(p + 1);
        nf = ff_ndigits8(w);
        if (FF_UNLIKELY(nf == 0 || nf == 8 || n1 + n2 + nf > 18)) return 0;
        m = m * ff_ipow10[nf] + ff_lead_digits(w, nf);
        p += 1 + nf;
    }
    if (FF_UNLIKELY(p < e && (*p | 0x20) == 'e')) return 0;
    v->mant = m;
    v->nfrac = nf;
    v->neg = (uint8_t)ng;
    v->how = FF_NUM_FAST;
    *out = p;
    return 1;
}

#undef FF_LOAD

static inline __attribute__((always_inline)) int ff_scan_decimal(const uint8_t *p, const uint8_t *e,
                                                                 const uint8_t *lo, ff_numv *v,
                                                                 const uint8_t **out)
{
    if (FF_LIKELY(e - p >= 32)) return ff_scan_decimal_in(p, e, lo, v, out, 1);
    return ff_scan_decimal_in(p, e, lo, v, out, 0);
}

/* A run of ASCII digits at p: accumulates the first 19 into *mp and counts them
 * in *np; returns the first byte after the run.  Eight bytes per step: the count
 * of leading digits comes from one mask, their value from ff_digits8. */
static inline const uint8_t *ff_digit_run(const uint8_t *p, const uint8_t *e, uint64_t *mp,
                                          uint32_t *np)
{
    uint64_t m = *mp;
    uint32_t nsig = *np;
    while (e - p >= 8) {
        uint64_t w = ff_load8(p);
        unsigned n = ff_ndigits8(w);
        if (n == 0) goto done;
        if (nsig + n > 19) break; /* past what a uint64 holds: finish byte by byte */
        m = m * ff_ipow10[n] + ff_lead_digits(w, n);
        nsig += n;
        p += n;
        if (n < 8) goto done;
    }
    while (p < e && (unsigned)(*p - '0') < 10) {
        if (nsig < 19) m = m * 10 + (*p - '0');
        nsig++;
        p++;
    }
done:
    *mp = m;
    *np = nsig;
    return p;
}

typedef struct {
    int32_t sym;
    int32_t _pad;
    int64_t ts;
    double price;
    double volume;
    int64_t recv_ts;
} ff_tick;

typedef struct {
    int32_t sym;
    uint8_t status;
    uint8_t _pad[3];
    int64_t ts;
    double last, volume, bid, ask, bid_size, ask_size;
    int64_t recv_ts;
} ff_quote;

typedef struct {
    int32_t sym;
    int16_t bar_type;
    int16_t _pad;
    int64_t ts, bar_end, last_update;
    double open, high, low, close, volume;
    int64_t recv_ts;
} ff_bar;

typedef struct {
    char *data;
    size_t len;
    size_t cap;
    size_t itemsize;
} ff_vec;

/* The last status or bar type found in its table: its bytes as a word, length + 1 (0: none)
 * and id. */
typedef struct {
    uint64_t k;
    uint32_t len;
    int32_t id;
} ff_lastcode;

/* A code (symbol, status or bar type) that a frame uses and no table holds yet.  It is
 * inserted only when the whole frame has decoded (ff_commit), so that a frame that
 * fails adds nothing to any table; until then its rows hold a placeholder, -(index+1),
 * patched through the frame's ff_fix list. */
typedef struct {
    uint64_t hash;
    uint32_t off, len; /* its bytes in ff_dec.pend_text */
    size_t pos;        /* where in the frame it first appeared, for errors */
    int role;          /* FF_ROLE_* */
    int32_t id;        /* set by ff_commit */
} ff_pend;

/* A row field waiting for a pending code's id. */
typedef struct {
    uint32_t pend;
    uint32_t what; /* FF_FIX_* */
    size_t row, nrows;
} ff_fix;

enum { FF_ROLE_SYM, FF_ROLE_STATUS, FF_ROLE_BAR_TYPE, FF_NROLES };
enum { FF_FIX_TICK_SYM, FF_FIX_QUOTE_SYM, FF_FIX_QUOTE_STATUS, FF_FIX_BAR_SYM, FF_FIX_BAR_TYPE };

/* The bytes from the end of one value (or from an object's `{`) to the start of the next
 * value, as the last frame that had them held them: `,"t":`, `, "t": `, `,\n  "t": `.  A feed
 * sends one layout and mostly one key order, so after field f the same few bytes follow
 * again and again: one 16-byte compare then stands for the separator, the whitespace, the
 * key and the colon.  Exact: when the bytes are equal, the general parse of them gives the
 * same key (or the object's end) and leaves the cursor at the same place.  Slots: one per
 * field the bytes follow, one for an object's start and one for a key we skip; per object
 * kind (message, bar). */
#define FF_LIT_START 20 /* after `{` */
#define FF_LIT_OTHER 21 /* after the value of a key we skip */
#define FF_LIT_SLOTS 22
#define FF_LIT_END 0xFF  /* `next`: the object closes */
#define FF_LIT_SKIP 0xFE /* `next`: a key we skip */
typedef struct {
    uint64_t w[2], m[2]; /* the bytes, and a mask of those that count */
    uint8_t len;         /* 0: nothing learned */
    uint8_t next;        /* the field whose value follows, FF_LIT_END or FF_LIT_SKIP */
    uint8_t conf;        /* how many times in a row the general parse found these bytes again:
                          * tried from 2 (a hit skips the general parse, so it stays there),
                          * so that a slot whose next key varies (keys in any order) costs no
                          * mispredicted compare; a miss sets it back to 0 */
    uint8_t _pad[5];
} ff_lit;

/* A set of learned bytes for one kind of frame.  A stream that mixes kinds (ticks, quotes,
 * series) or layouts (compact and spaced senders, a sender with keys in any order) would
 * thrash one set: after `c` comes `,"t":` in a tick and `,"lt":` in a quote.  So a frame
 * takes the bank of its length in 16-byte steps (ticks, quotes and series differ in length)
 * and of its first bytes: spaced or not (`{"c": ` or `{"c":"`), and whether it begins with
 * the provider's first key `c` (a pretty-printed or reordered frame does not).  Which bank a
 * frame takes never changes what it decodes to, only how often the learned bytes match. */
#define FF_LIT_BANKS 64 /* 16 lengths x 4 classes of first bytes */
enum { FF_FLAT_TOOK = 1, FF_FLAT_REFUSED = 2 };
enum { FF_SIMD_NONE, FF_SIMD_AVX2, FF_SIMD_AVX512, FF_SIMD_AVX512VBMI2 };
typedef struct {
    ff_lit lit[2][FF_LIT_SLOTS]; /* [message or bar object][slot] */
    uint32_t hits;               /* learned bytes matched in the last frame that took this bank */
    uint32_t nframes;
    uint8_t poor;                /* one bit per frame, the last in bit 0: matched no more than
                                  * not (zero, a new bank's, reads as four good frames) */
    uint8_t flat;                /* what ff_message_flat or ff_series_flat last did with a frame
                                  * of this bank: FF_FLAT_TOOK it (flat_same: with its keys in the
                                  * same order as the frames before it), FF_FLAT_REFUSED it, or
                                  * 0 (none tried yet) */
    uint8_t flat_same;
    uint8_t _pad[5];
    uint64_t flat_sig;           /* (its keys' order) */
} ff_litbank;

typedef struct {
    const uint8_t *start; /* first byte of the current frame */
    const uint8_t *p;
    const uint8_t *end;
    ff_vec ticks, quotes, bars;
    ff_symtab symbols, statuses, bar_types;
    char *scratch; /* unescaped strings */
    size_t scratch_cap;
    int64_t recv_ts;
    size_t ncontrol;   /* control messages in the frame (valid JSON that is not market data) */
    int bar_bad_field; /* which bar key held a wrong type; -1: an `s` element was no object */
    int table_full;    /* the frame failed because a table was full */
    /* codes of the current frame waiting for its end; all empty between frames */
    ff_pend *pend;
    size_t npend, pend_cap;
    char *pend_text;
    size_t pend_text_len, pend_text_cap;
    uint64_t *pend_index; /* open addressing: generation << 32 | (index + 1) */
    uint32_t pend_nslots, pend_gen;
    ff_fix *fix;
    size_t nfix, fix_cap;
    /* what came between one value and the next, learned from the frames before (see ff_lit) */
    ff_litbank banks[FF_LIT_BANKS];
    ff_litbank *bank;              /* this frame's (NULL until a frame of 16 bytes or more) */
    ff_lastcode last_code[FF_NROLES]; /* by role (FF_ROLE_STATUS, FF_ROLE_BAR_TYPE; not symbols) */
    uint32_t lit_hits, lit_misses; /* in this frame: learned bytes matched, general parses */
    uint64_t lit_hits_total;       /* over all frames (tests: the learned path ran) */
    uint64_t flat_total;           /* frames the flat paths decoded (tests: they ran) */
    uint64_t flat_sig;             /* the order of the keys of the last frame they decoded */
    int simd;                      /* the flat paths' vector unit, FF_SIMD_* + 1 (0: not chosen:
                                    * the best the CPU has, at the first frame); ff_simd_for */
    int learn;         /* learn this frame (see ff_decode_frame) */
    int lits_on;       /* try the learned bytes in this frame (else the plain loop) */
    /* ff_message_flat, ff_series_flat: the frame's bytes, then at least 64 zeros (the copy's
     * number and string reads stop at a zero; nothing writes past byte 256) */
    uint8_t flatbuf[320]; /* (the decoder lives inside a Python object: no alignment beyond 16) */
    char err[200];
} ff_dec;

/* ---- growable row arrays ------------------------------------------------ */

static int ff_vec_reserve(ff_vec *v, size_t extra)
{
    if (FF_LIKELY(v->len + extra <= v->cap)) return 0;
    size_t cap = v->cap ? v->cap : 1024;
    while (cap < v->len + extra) cap *= 2;
    char *d = (char *)realloc(v->data, cap * v->itemsize);
    if (!d) return -1;
    v->data = d;
    v->cap = cap;
    return 0;
}

static inline __attribute__((always_inline)) void *ff_vec_push(ff_vec *v)
{
    if (FF_UNLIKELY(v->len == v->cap) && ff_vec_reserve(v, 1) < 0) return NULL;
    return v->data + (v->len++) * v->itemsize;
}

/* ---- rows ----------------------------------------------------------------- */

/* Bars [from, len) were appended while their `s` array was read; the fields of the
 * enclosing message are known only at its end. */
static inline void ff_finish_bars(ff_dec *d, size_t from, int32_t sym, int16_t bar_type,
                                  int64_t bar_end, int64_t last_update)
{
    ff_bar *r = (ff_bar *)d->bars.data + from, *end = (ff_bar *)d->bars.data + d->bars.len;
    for (; r < end; r++) {
        r->sym = sym;
        r->bar_type = bar_type;
        r->_pad = 0;
        r->bar_end = bar_end;
        r->last_update = last_update;
        r->recv_ts = d->recv_ts;
    }
}

/* ---- errors ------------------------------------------------------------- */

static int ff_fail(ff_dec *d, const uint8_t *at, const char *what)
{
    size_t pos = (size_t)((at > d->end ? d->end : at) - d->start);
    if (at >= d->end)
        snprintf(d->err, sizeof d->err, "input truncated: %s (byte %zu)", what, pos);
    else
        snprintf(d->err, sizeof d->err, "JSON is malformed: %s (byte %zu)", what, pos);
    return -1;
}

static int ff_fail_type(ff_dec *d, size_t pos, const char *key, const char *want, const char *got)
{
    snprintf(d->err, sizeof d->err, "expected %s for `%s`, got %s (byte %zu)", want, key, got, pos);
    return -1;
}

static int ff_fail_msg(ff_dec *d, const uint8_t *at, const char *what)
{
    snprintf(d->err, sizeof d->err, "%s (byte %zu)", what, (size_t)(at - d->start));
    return -1;
}

/* ---- lexical pieces ----------------------------------------------------- */

/* High bit set in each byte of w equal to c (exact: no borrow crosses a byte). */
static inline __attribute__((always_inline)) uint64_t ff_eq_bytes(uint64_t w, uint8_t c)
{
    uint64_t x = w ^ (FF_ONES * c);
    return ~(((x & ~FF_HIGHS) + ~FF_HIGHS) | x) & FF_HIGHS;
}

/* The first byte at or after p that is not JSON whitespace (space, \n, \r, \t), eight
 * bytes per step: pretty-printed frames put a newline and an indent before every key. */
static const uint8_t *ff_ws_run(const uint8_t *p, const uint8_t *e)
{
    while (e - p >= 8) {
        uint64_t w = ff_load8(p);
        uint64_t ws = ff_eq_bytes(w, ' ') | ff_eq_bytes(w, '\n') | ff_eq_bytes(w, '\r') |
                      ff_eq_bytes(w, '\t');
        uint64_t other = ~ws & FF_HIGHS;
        if (other) return p + (__builtin_ctzll(other) >> 3);
        p += 8;
    }
    while (p < e && (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t')) p++;
    return p;
}

#if defined(__SSE2__)
/* Bits set for the bytes of p[0..15] that are not JSON whitespace (SSE2: every x86-64). */
static inline __attribute__((always_inline)) unsigned ff_nonws16(const uint8_t *p)
{
    __m128i v = _mm_loadu_si128((const __m128i *)p);
    __m128i ws = _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(v, _mm_set1_epi8(' ')),
                                           _mm_cmpeq_epi8(v, _mm_set1_epi8('\n'))),
                              _mm_or_si128(_mm_cmpeq_epi8(v, _mm_set1_epi8('\r')),
                                           _mm_cmpeq_epi8(v, _mm_set1_epi8('\t'))));
    return ~(unsigned)_mm_movemask_epi8(ws) & 0xFFFFu;
}
#endif

/* Past a run of whitespace that is not one space: a newline and an indent (pretty-printed
 * frames) in one SSE2 step. */
static __attribute__((noinline)) const uint8_t *ff_ws_skip(const uint8_t *p, const uint8_t *e)
{
#if defined(__SSE2__)
    if (FF_LIKELY(e - p >= 16)) {
        unsigned m = ff_nonws16(p);
        return m ? p + __builtin_ctz(m) : ff_ws_run(p + 16, e);
    }
#endif
    return ff_ws_run(p, e);
}

static inline __attribute__((always_inline)) void ff_ws(ff_dec *d)
{
    const uint8_t *p = d->p, *e = d->end;
    if (FF_LIKELY(p < e && *p > ' ')) return; /* compact JSON: nothing to skip */
    if (p >= e) return;
    if (FF_LIKELY(e - p >= 2 && p[0] == ' ' && p[1] > ' ')) { /* ", " and ": ": one space */
        d->p = p + 1;
        return;
    }
#if defined(__SSE2__)
    if (FF_LIKELY(e - p >= 16)) { /* a newline and an indent: one step, here */
        unsigned m = ff_nonws16(p);
        if (FF_LIKELY(m)) {
            d->p = p + __builtin_ctz(m);
            return;
        }
    }
#endif
    d->p = ff_ws_skip(p, e);
}

typedef struct {
    const uint8_t *s; /* bytes between the quotes, raw */
    uint32_t n;
    int escaped;
} ff_str;

/* The caller checked that p[0..3] are in the frame. */
static inline int ff_hex4(const uint8_t *p, uint32_t *out)
{
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) {
        uint8_t c = p[i];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= c - '0';
        else if (c >= 'a' && c <= 'f') v |= c - 'a' + 10;
        else if (c >= 'A' && c <= 'F') v |= c - 'A' + 10;
        else return -1;
    }
    *out = v;
    return 0;
}

/* Length of a valid UTF-8 sequence starting at p (lead byte >= 0x80), 0 if invalid. */
static inline int ff_utf8_len(const uint8_t *p, const uint8_t *e)
{
    assert(p < e);
    uint8_t c = p[0];
    if (c >= 0xC2 && c <= 0xDF) {
        if (e - p < 2 || (p[1] & 0xC0) != 0x80) return 0;
        return 2;
    }
    if (c >= 0xE0 && c <= 0xEF) {
        if (e - p < 3 || (p[1] & 0xC0) != 0x80 || (p[2] & 0xC0) != 0x80) return 0;
        if (c == 0xE0 && p[1] < 0xA0) return 0; /* overlong */
        if (c == 0xED && p[1] > 0x9F) return 0; /* UTF-16 surrogate */
        return 3;
    }
    if (c >= 0xF0 && c <= 0xF4) {
        if (e - p < 4 || (p[1] & 0xC0) != 0x80 || (p[2] & 0xC0) != 0x80 || (p[3] & 0xC0) != 0x80)
            return 0;
        if (c == 0xF0 && p[1] < 0x90) return 0; /* overlong */
        if (c == 0xF4 && p[1] > 0x8F) return 0; /* above U+10FFFF */
        return 4;
    }
    return 0;
}

/* d->p at the opening quote.  Validates escapes and UTF-8; leaves d->p after the closing quote. */
static int ff_string(ff_dec *d, ff_str *out)
{
    assert(d->p < d->end && *d->p == '"');
    const uint8_t *p = d->p + 1, *e = d->end;
    out->s = p;
    out->escaped = 0;
    for (;;) {
        /* Plain printable ASCII is the common case: run through it first. */
        while (e - p >= 8) {
            uint64_t stops = ff_str_stops(ff_load8(p));
            if (stops) {
                p += __builtin_ctzll(stops) >> 3;
                break;
            }
            p += 8;
        }
        while (p < e && *p >= 0x20 && *p != '"' && *p != '\\' && *p < 0x80) p++;
        if (FF_UNLIKELY(p >= e)) return ff_fail(d, p, "unterminated string");
        uint8_t c = *p;
        if (c == '"') break;
        if (c == '\\') {
            out->escaped = 1;
            if (e - p < 2) return ff_fail(d, e, "unterminated escape");
            uint8_t x = p[1];
            if (x == 'u') {
                uint32_t cp, lo;
                if (e - p < 6) return ff_fail(d, e, "unterminated \\u escape");
                if (ff_hex4(p + 2, &cp) < 0) return ff_fail(d, p, "invalid \\u escape");
                p += 6;
                if (cp >= 0xD800 && cp <= 0xDBFF) {
                    if (e - p < 6 || p[0] != '\\' || p[1] != 'u' || ff_hex4(p + 2, &lo) < 0 ||
                        lo < 0xDC00 || lo > 0xDFFF)
                        return ff_fail_msg(d, p, "string holds a lone UTF-16 surrogate");
                    p += 6;
                } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
                    return ff_fail_msg(d, p - 6, "string holds a lone UTF-16 surrogate");
                }
            } else if (x == '"' || x == '\\' || x == '/' || x == 'b' || x == 'f' || x == 'n' ||
                       x == 'r' || x == 't') {
                p += 2;
            } else {
                return ff_fail(d, p, "invalid escape in string");
            }
        } else if (c < 0x20) {
            return ff_fail(d, p, "control character in string");
        } else {
            int n = ff_utf8_len(p, e);
            if (!n) return ff_fail_msg(d, p, "invalid UTF-8 in string");
            p += n;
        }
    }
    out->n = (uint32_t)(p - out->s);
    d->p = p + 1;
    return 0;
}

static int ff_scratch_reserve(ff_dec *d, size_t n)
{
    if (n <= d->scratch_cap) return 0;
    size_t cap = d->scratch_cap ? d->scratch_cap : 256;
    while (cap < n) cap *= 2;
    char *s = (char *)realloc(d->scratch, cap);
    if (!s) return -1;
    d->scratch = s;
    d->scratch_cap = cap;
    return 0;
}

static inline char *ff_put_utf8(char *o, uint32_t cp)
{
    if (cp < 0x80) {
        *o++ = (char)cp;
    } else if (cp < 0x800) {
        *o++ = (char)(0xC0 | (cp >> 6));
        *o++ = (char)(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
        *o++ = (char)(0xE0 | (cp >> 12));
        *o++ = (char)(0x80 | ((cp >> 6) & 0x3F));
        *o++ = (char)(0x80 | (cp & 0x3F));
    } else {
        *o++ = (char)(0xF0 | (cp >> 18));
        *o++ = (char)(0x80 | ((cp >> 12) & 0x3F));
        *o++ = (char)(0x80 | ((cp >> 6) & 0x3F));
        *o++ = (char)(0x80 | (cp & 0x3F));
    }
    return o;
}

/* The string's UTF-8 text, unescaped into scratch when it had escapes.
 * Already validated by ff_string, so this cannot fail but for memory. */
static int ff_text_escaped(ff_dec *d, const ff_str *s, const char **p, uint32_t *n);

static inline int ff_text(ff_dec *d, const ff_str *s, const char **p, uint32_t *n)
{
    if (FF_LIKELY(!s->escaped)) {
        *p = (const char *)s->s;
        *n = s->n;
        return 0;
    }
    return ff_text_escaped(d, s, p, n);
}

static __attribute__((noinline)) int ff_text_escaped(ff_dec *d, const ff_str *s, const char **p, uint32_t *n)
{
    if (ff_scratch_reserve(d, s->n) < 0) return -1; /* unescaping never grows the text */
    const uint8_t *i = s->s, *e = s->s + s->n;
    char *o = d->scratch;
    while (i < e) {
        if (*i != '\\') {
            *o++ = (char)*i++;
            continue;
        }
        uint8_t x = i[1];
        uint32_t cp = 0, lo = 0xDC00;
        switch (x) {
        case 'b': *o++ = '\b'; i += 2; break;
        case 'f': *o++ = '\f'; i += 2; break;
        case 'n': *o++ = '\n'; i += 2; break;
        case 'r': *o++ = '\r'; i += 2; break;
        case 't': *o++ = '\t'; i += 2; break;
        case 'u':
            ff_hex4(i + 2, &cp);
            i += 6;
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                ff_hex4(i + 2, &lo);
                i += 6;
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            }
            o = ff_put_utf8(o, cp);
            break;
        default: *o++ = (char)x; i += 2; break; /* " \ / */
        }
    }
    *p = d->scratch;
    *n = (uint32_t)(o - d->scratch);
    return 0;
}

/* ---- numbers ------------------------------------------------------------ */

typedef struct {
    const uint8_t *start, *end; /* the whole token */
    const uint8_t *ip;          /* integer digits */
    const uint8_t *fp;          /* fraction digits */
    uint32_t ilen, flen;
    int neg;
    int64_t exp;   /* saturated at +-1e9 */
    uint64_t mant; /* significant digits, valid when nsig <= 19 */
    uint32_t nsig;
} ff_num;

/* d->p at '-' or a digit.  JSON's number grammar, exactly. */
static int ff_number(ff_dec *d, ff_num *n)
{
    const uint8_t *p = d->p, *e = d->end;
    uint64_t m = 0;
    uint32_t nsig = 0;
    n->start = p;
    n->neg = 0;
    if (p < e && *p == '-') {
        n->neg = 1;
        p++;
    }
    n->ip = p;
    if (p < e && *p == '0') {
        p++;
    } else if (p < e && *p >= '1' && *p <= '9') {
        p = ff_digit_run(p, e, &m, &nsig);
    } else {
        return ff_fail(d, p, "invalid number");
    }
    n->ilen = (uint32_t)(p - n->ip);
    n->fp = p;
    n->flen = 0;
    if (p < e && *p == '.') {
        p++;
        n->fp = p;
        /* Leading fraction zeros are counted as significant here: that only makes
         * nsig larger, which can send a number to the exact slow path, never to a
         * wrong result. */
        p = ff_digit_run(p, e, &m, &nsig);
        n->flen = (uint32_t)(p - n->fp);
        if (!n->flen) return ff_fail(d, p, "expected a digit after the decimal point");
    }
    n->exp = 0;
    if (p < e && (*p == 'e' || *p == 'E')) {
        int eneg = 0;
        int64_t x = 0;
        p++;
        if (p < e && (*p == '+' || *p == '-')) eneg = *p++ == '-';
        if (p >= e || (unsigned)(*p - '0') >= 10) return ff_fail(d, p, "expected a digit in the exponent");
        while (p < e && (unsigned)(*p - '0') < 10) {
            if (x < 1000000000) x = x * 10 + (*p - '0');
            p++;
        }
        n->exp = eneg ? -x : x;
    }
    n->end = p;
    n->mant = m;
    n->nsig = nsig;
    d->p = p;
    return 0;
}

/* Bit-exact with Python's float() of the same text. */
static double ff_to_double(ff_num *n)
{
    if (n->nsig == 0) return n->neg ? -0.0 : 0.0;
    /* Clinger's fast path: mantissa and power of ten both exact in a double,
     * so one correctly rounded IEEE multiply or divide gives the exact result.
     * Prices like 243.08 and sizes like 520.0 all land here. */
    if (n->nsig <= 19 && n->mant <= (1ULL << 53)) {
        /* digits after the first significant one that are fraction digits */
        int64_t e10 = n->exp - (int64_t)n->flen;
        /* trailing digits beyond nsig only occur when nsig > 19, so mant is whole */
        if (e10 >= -22 && e10 <= 22) {
            double v = (double)n->mant;
            v = e10 < 0 ? v / ff_pow10[-e10] : v * ff_pow10[e10];
            return n->neg ? -v : v;
        }
    }
    /* Everything else goes to CPython's own correctly rounded strtod. */
    char buf[64];
    size_t len = (size_t)(n->end - n->start);
    char *s = len < sizeof buf ? buf : (char *)malloc(len + 1);
    if (!s) return NAN;
    memcpy(s, n->start, len);
    s[len] = 0;
    double v = PyOS_string_to_double(s, NULL, NULL);
    if (v == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        v = NAN;
    }
    if (s != buf) free(s);
    return v;
}

/* The number times 10**scale as an exact int64, rounding half to even.
 * Works from the decimal digits, never through a binary float. */
static int ff_to_fixed(const ff_num *n, int scale, int64_t *out)
{
    uint32_t L = n->ilen + n->flen;
    int64_t k = n->exp - (int64_t)n->flen + scale; /* value = D * 10**k, D the digit string */
    /* Fast path: the significant digits fit in mant (nsig <= 19 means mant is D
     * exactly), which covers every timestamp the feed sends. */
    if (FF_LIKELY(n->nsig <= 18 && k >= -18 && k <= 18)) {
        uint64_t q;
        if (k >= 0) {
            unsigned __int128 w = (unsigned __int128)n->mant * ff_ipow10[k];
            if (w > (unsigned __int128)INT64_MAX) return -1;
            q = (uint64_t)w;
        } else {
            uint64_t div = ff_ipow10[-k];
            q = n->mant / div;
            uint64_t rem = n->mant - q * div, half = div / 2;
            if (rem > half || (rem == half && (q & 1))) q++;
        }
        *out = n->neg ? -(int64_t)q : (int64_t)q;
        return 0;
    }
#define FF_DIGIT(i) ((i) < n->ilen ? n->ip[i] - '0' : n->fp[(i) - n->ilen] - '0')
    unsigned __int128 q = 0;
    const unsigned __int128 lim = (unsigned __int128)INT64_MAX;
    int64_t cut = k >= 0 ? (int64_t)L : (int64_t)L + k; /* digits that stay whole */
    for (int64_t i = 0; i < cut; i++) {
        q = q * 10 + FF_DIGIT(i);
        if (q > lim) return -1;
    }
    if (k > 0 && q) {
        if (k > 19) return -1;
        for (int64_t i = 0; i < k; i++) {
            q *= 10;
            if (q > lim) return -1;
        }
    } else if (k < 0 && cut >= 0 && cut < (int64_t)L) {
        int first = FF_DIGIT(cut);
        int up = first > 5;
        if (first == 5) {
            int rest = 0;
            for (uint32_t i = (uint32_t)cut + 1; i < L && !rest; i++) rest = FF_DIGIT(i) != 0;
            up = rest || (q & 1);
        }
        if (up && ++q > lim) return -1;
    }
#undef FF_DIGIT
    *out = n->neg ? -(int64_t)q : (int64_t)q;
    return 0;
}

/* ---- skipping values we do not use -------------------------------------- */

static int ff_skip(ff_dec *d, int depth);

static int ff_skip_literal(ff_dec *d, const char *lit, size_t n)
{
    size_t left = (size_t)(d->end - d->p);
    if (FF_UNLIKELY(left < n || memcmp(d->p, lit, n) != 0)) {
        /* a cut-off "nul" is truncation; "nul!" is a bad literal */
        if (left < n && memcmp(d->p, lit, left) == 0) return ff_fail(d, d->end, "incomplete literal");
        return ff_fail(d, d->p, "invalid literal");
    }
    d->p += n;
    return 0;
}

static int ff_skip_container(ff_dec *d, int depth, uint8_t close)
{
    assert(d->p < d->end); /* at the opening bracket */
    if (depth >= FF_MAX_DEPTH) return ff_fail_msg(d, d->p, "nesting too deep (more than 64 levels)");
    d->p++;
    ff_ws(d);
    if (d->p < d->end && *d->p == close) {
        d->p++;
        return 0;
    }
    for (;;) {
        if (close == '}') {
            ff_str k;
            if (d->p >= d->end || *d->p != '"') return ff_fail(d, d->p, "expected a string key");
            if (ff_string(d, &k) < 0) return -1;
            ff_ws(d);
            if (d->p >= d->end || *d->p != ':') return ff_fail(d, d->p, "expected ':'");
            d->p++;
            ff_ws(d);
        }
        if (ff_skip(d, depth + 1) < 0) return -1;
        ff_ws(d);
        if (d->p >= d->end) return ff_fail(d, d->p, "unclosed container");
        if (*d->p == ',') {
            d->p++;
            ff_ws(d);
            continue;
        }
        if (*d->p == close) {
            d->p++;
            return 0;
        }
        return ff_fail(d, d->p, close == '}' ? "expected ',' or '}'" : "expected ',' or ']'");
    }
}

/* d->p at the first byte of a value (whitespace already skipped). */
static int ff_skip(ff_dec *d, int depth)
{
    if (d->p >= d->end) return ff_fail(d, d->p, "expected a value");
    ff_str s;
    ff_num n;
    switch (*d->p) {
    case '"': return ff_string(d, &s);
    case '{': return ff_skip_container(d, depth, '}');
    case '[': return ff_skip_container(d, depth, ']');
    case 't': return ff_skip_literal(d, "true", 4);
    case 'f': return ff_skip_literal(d, "false", 5);
    case 'n': return ff_skip_literal(d, "null", 4);
    default:
        if (*d->p == '-' || (unsigned)(*d->p - '0') < 10) return ff_number(d, &n);
        return ff_fail(d, d->p, "expected a value");
    }
}

static const char *ff_kind_name(uint8_t c)
{
    switch (c) {
    case '"': return "string";
    case 't': case 'f': return "boolean";
    case '{': return "object";
    case '[': return "array";
    case 'n': return "null";
    default: return "number";
    }
}

/* ---- the messages -------------------------------------------------------- */

/* Field ids; also the bits of a message's "seen" and "wrong type" masks. */
enum {
    F_C, F_T, F_P, F_V, F_LT, F_LP, F_A, F_B, F_AS, F_BS, F_SS, F_BE, F_LU, F_BT, F_S, F_N,
    F_O = F_N, F_H, F_L, F_CL, F_NBAR /* keys of a bar object only (`c` there is the close) */
};
_Static_assert(F_NBAR <= FF_LIT_START, "a field id must not be a literal slot of its own");
static const char *const ff_field_name[] = {"c",  "t",  "p",  "v",  "lt", "lp", "a",  "b",  "as", "bs",
                                            "ss", "be", "lu", "bt", "s",  "o",  "h",  "l",  "c"};

/* What each field holds, and so how its value is read: one routine reads every field of
 * every kind from this table (ff_field), instead of a hand-written run per key. */
enum { FT_STR, FT_NSTR, FT_F64, FT_FIX6, FT_FIX3, FT_SERIES };
static const uint8_t ff_field_type[F_NBAR] = {
    [F_C] = FT_STR,   [F_T] = FT_FIX6,  [F_P] = FT_F64,   [F_V] = FT_F64,  [F_LT] = FT_FIX6,
    [F_LP] = FT_F64,  [F_A] = FT_F64,   [F_B] = FT_F64,   [F_AS] = FT_F64, [F_BS] = FT_F64,
    [F_SS] = FT_NSTR, [F_BE] = FT_FIX6, [F_LU] = FT_FIX3, [F_BT] = FT_NSTR, [F_S] = FT_SERIES,
    [F_O] = FT_F64,   [F_H] = FT_F64,   [F_L] = FT_F64,  [F_CL] = FT_F64};

#define FF_BIT(f) (1u << (f))
/* The keys each kind of message uses.  Any other key, known to another kind or to none,
 * is skipped as whatever JSON value it holds (PROTOCOL.md section 3). */
#define FF_TICK_USED (FF_BIT(F_C) | FF_BIT(F_T) | FF_BIT(F_P) | FF_BIT(F_V))
#define FF_QUOTE_USED (FF_BIT(F_C) | FF_BIT(F_LT) | FF_BIT(F_V) | FF_BIT(F_LP) | FF_BIT(F_A) | \
                       FF_BIT(F_B) | FF_BIT(F_AS) | FF_BIT(F_BS) | FF_BIT(F_SS))
#define FF_SERIES_USED (FF_BIT(F_C) | FF_BIT(F_BE) | FF_BIT(F_LU) | FF_BIT(F_BT) | FF_BIT(F_S))
/* The keys whose presence makes a message a quote, or a series. */
#define FF_QUOTE_KEYS (FF_BIT(F_LT) | FF_BIT(F_LP) | FF_BIT(F_A) | FF_BIT(F_B) | FF_BIT(F_AS) | \
                       FF_BIT(F_BS) | FF_BIT(F_SS))
#define FF_SERIES_KEYS (FF_BIT(F_S) | FF_BIT(F_BT))

/* One-character keys by their byte, for messages and for bar objects: id + 1, 0 for a key
 * we skip. */
static const uint8_t ff_key1_msg[256] = {['c'] = F_C + 1, ['t'] = F_T + 1, ['p'] = F_P + 1,
                                         ['v'] = F_V + 1, ['a'] = F_A + 1, ['b'] = F_B + 1,
                                         ['s'] = F_S + 1};
static const uint8_t ff_key1_bar[256] = {['t'] = F_T + 1, ['o'] = F_O + 1, ['h'] = F_H + 1,
                                         ['l'] = F_L + 1, ['c'] = F_CL + 1, ['v'] = F_V + 1};

#define FF_K2(a, b) ((unsigned)(a) | ((unsigned)(b) << 8))
/* Two-character message keys, indexed by the low five bits of each byte; an entry holds
 * the key's bytes (checked: other bytes share the index) and its id + 1.  A table, not a
 * switch: keys come in any order, and a lookup has no branch to mispredict. */
#define FF_K2_AT(a, b) ((((unsigned)(a) & 31) << 5) | ((unsigned)(b) & 31))
#define FF_K2_ENTRY(a, b, f) [FF_K2_AT(a, b)] = (FF_K2(a, b) << 8) | ((f) + 1)
static const uint32_t ff_key2_tab[1024] = {
    FF_K2_ENTRY('l', 't', F_LT), FF_K2_ENTRY('l', 'p', F_LP), FF_K2_ENTRY('a', 's', F_AS),
    FF_K2_ENTRY('b', 's', F_BS), FF_K2_ENTRY('s', 's', F_SS), FF_K2_ENTRY('b', 'e', F_BE),
    FF_K2_ENTRY('l', 'u', F_LU), FF_K2_ENTRY('b', 't', F_BT)};

/* The compact form of a key we read, `"k":` or `"kk":`, by the same index of its first two
 * bytes (a one-character key's second byte is the closing quote, whose index no two-character
 * key of ours shares): the bytes after the opening quote that must match, with a mask of
 * how many, and the field id + 1 (0: no key here); the key's length follows from its bytes. */
typedef struct {
    uint32_t pat, mask;
    uint8_t f;
} ff_keyfast;
#define FF_KF1(a, fid) [FF_K2_AT(a, '"')] = {(unsigned)(a) | ('"' << 8) | (':' << 16), 0xFFFFFFu, (fid) + 1}
#define FF_KF2(a, b, fid) \
    [FF_K2_AT(a, b)] = {(unsigned)(a) | ((unsigned)(b) << 8) | ('"' << 16) | ((unsigned)':' << 24), 0xFFFFFFFFu, (fid) + 1}
static const ff_keyfast ff_keyfast_msg[1024] = {
    FF_KF1('c', F_C), FF_KF1('t', F_T), FF_KF1('p', F_P), FF_KF1('v', F_V), FF_KF1('a', F_A),
    FF_KF1('b', F_B), FF_KF1('s', F_S), FF_KF2('l', 't', F_LT), FF_KF2('l', 'p', F_LP),
    FF_KF2('a', 's', F_AS), FF_KF2('b', 's', F_BS), FF_KF2('s', 's', F_SS), FF_KF2('b', 'e', F_BE),
    FF_KF2('l', 'u', F_LU), FF_KF2('b', 't', F_BT)};
#undef FF_KF1
#undef FF_KF2

static inline __attribute__((always_inline)) int ff_key2_msg(unsigned k)
{
    uint32_t e = ff_key2_tab[FF_K2_AT(k & 0xFF, k >> 8)];
    return (e >> 8) == k ? (int)(e & 0xFF) - 1 : -1;
}

/* The message key in w (8 bytes from its opening quote, which the caller checked) if it is
 * a compact `"k":` or `"kk":` of ours: its field id, and in *len how many bytes up to its
 * value (from the bytes in w, not the table: the next value's position then waits on one
 * load, not two; keys in any order: 4-7% a frame).  -1: any other key, or not compact. */
static inline __attribute__((always_inline)) int ff_key_compact(uint64_t w, unsigned *len)
{
    unsigned c0 = (uint8_t)(w >> 8), c1 = (uint8_t)(w >> 16);
    const ff_keyfast *kf = &ff_keyfast_msg[FF_K2_AT(c0, c1)];
    *len = 4 + (c1 != '"'); /* a one-character key's second byte is its closing quote */
    return kf->f && ((uint32_t)(w >> 8) & kf->mask) == kf->pat ? kf->f - 1 : -1;
}

/* Key text (unescaped) to field id, -1 for keys we skip.  `bar` selects the bar object's keys. */
static inline int ff_key(const char *k, uint32_t n, int bar)
{
    if (n == 1 && (uint8_t)k[0] < 128)
        return (bar ? ff_key1_bar : ff_key1_msg)[(uint8_t)k[0]] - 1;
    if (n == 2 && !bar) return ff_key2_msg(FF_K2((uint8_t)k[0], (uint8_t)k[1]));
    return -1;
}


/* Reads "key" and its colon, leaves d->p at the value and returns the key's field id (-1:
 * a key we skip, -2: error).  The feed's keys are one or two characters: one 8-byte load
 * and two table lookups tell which (by where the closing quote is, and the bytes before
 * it); anything else (unknown, longer, escaped, non-ASCII) goes through the string parser. */
static inline __attribute__((always_inline)) int ff_member_key(ff_dec *d, int bar)
{
    const uint8_t *p = d->p, *e = d->end;
    if (FF_LIKELY(e - p >= 8 && p[0] == '"')) {
        uint64_t w = ff_load8(p);
        unsigned c0 = (uint8_t)(w >> 8), c1 = (uint8_t)(w >> 16), c2 = (uint8_t)(w >> 24);
        /* compact: `"k":` or `"kk":`, one lookup and one masked compare (message keys only:
         * a bar object's one-character keys measured no faster this way) */
        unsigned len;
        int fc = bar ? -1 : ff_key_compact(w, &len);
        if (FF_LIKELY(fc >= 0)) {
            d->p = p + len;
            ff_ws(d);
            return fc;
        }
        /* "k" or "kk" that is one of ours, told apart with no branch on which (keys come
         * in any order); any other key takes the string parser below */
        int f1 = (bar ? ff_key1_bar : ff_key1_msg)[c0] - 1;
        int f2 = bar ? -1 : ff_key2_msg(c0 | (c1 << 8));
        unsigned one = (c1 == '"') & (f1 >= 0), two = (c2 == '"') & (f2 >= 0);
        if (FF_LIKELY(one | two)) {
            int f = one ? f1 : f2;
            p += 4 - one;
            if (FF_UNLIKELY(*p != ':')) {
                d->p = p;
                ff_ws(d);
                p = d->p;
                if (p >= e || *p != ':') return ff_fail(d, p, "expected ':'"), -2;
            }
            d->p = p + 1;
            ff_ws(d);
            return f;
        }
    }
    if (FF_UNLIKELY(d->p >= d->end || *d->p != '"')) return ff_fail(d, d->p, "expected a string key"), -2;
    ff_str k;
    if (ff_string(d, &k) < 0) return -2;
    const char *kp = (const char *)k.s;
    uint32_t kn = k.n;
    if (FF_UNLIKELY(k.escaped) && ff_text(d, &k, &kp, &kn) < 0) return ff_fail_msg(d, d->p, "out of memory"), -2;
    ff_ws(d);
    if (d->p >= d->end || *d->p != ':') return ff_fail(d, d->p, "expected ':'"), -2;
    d->p++;
    ff_ws(d);
    return ff_key(kp, kn, bar);
}

/* After a member: 1 = another member follows, 0 = the object closed. */
static inline __attribute__((always_inline)) int ff_member_next(ff_dec *d)
{
    if (FF_UNLIKELY(d->p >= d->end || (*d->p != ',' && *d->p != '}'))) ff_ws(d);
    if (FF_UNLIKELY(d->p >= d->end)) return ff_fail(d, d->p, "unclosed object");
    uint8_t c = *d->p++;
    if (c == ',') {
        ff_ws(d);
        return 1;
    }
    if (c == '}') return 0;
    d->p--;
    return ff_fail(d, d->p, "expected ',' or '}'");
}

#define FF_MEMBER_END (-3)

/* What came between a value (or a `{`) at `from` and d->p: learned for slot, with next the
 * member that followed (FF_MEMBER_END, -1 for a key we skip, or its field id). */
static __attribute__((noinline)) void ff_learn(ff_dec *d, int bar, int slot, const uint8_t *from, int next)
{
    size_t len = (size_t)(d->p - from);
    ff_lit *L = &d->bank->lit[bar][slot];
    assert(d->end - d->start >= 16); /* d->lits_on */
    if (len > 16) return;
    uint64_t m0 = len >= 8 ? ~0ULL : (1ULL << (8 * len)) - 1;
    uint64_t m1 = len <= 8 ? 0 : len == 16 ? ~0ULL : (1ULL << (8 * (len - 8))) - 1;
    uint64_t b0, b1;
    ff_load16_upto(from, d->end, d->start, &b0, &b1);
    b0 &= m0;
    b1 &= m1;
    if (len == L->len && b0 == L->w[0] && b1 == L->w[1]) {
        if (L->conf < 3) L->conf++;
        return;
    }
    L->w[0] = b0;
    L->w[1] = b1;
    L->m[0] = m0;
    L->m[1] = m1;
    L->len = (uint8_t)len;
    L->next = next == FF_MEMBER_END ? FF_LIT_END : next < 0 ? FF_LIT_SKIP : (uint8_t)next;
    L->conf = 0;
}

/* The next member of an object: its field id (>= 0), -1 for a key we skip (d->p at its
 * value's first byte), FF_MEMBER_END when the object closed (d->p past the `}`), -2 on an
 * error.  slot: what came before, FF_LIT_START (d->p at the `{`), a field id or
 * FF_LIT_OTHER (d->p right after that value). */
static inline __attribute__((always_inline)) int ff_next_member(ff_dec *d, ff_lit *bank, int bar, int slot,
                                                                int lits)
{
    const uint8_t *from = d->p;
    ff_lit *L = &bank[slot];
    /* Near the frame's end (a message's last key, its `}`) the bytes past the end read as
     * zero, which no learned byte is (the bytes were valid JSON outside a string): a
     * literal longer than what is left never matches.  lits: the frame holds 16 bytes or
     * more (ff_decode_frame turns the learned bytes off for shorter ones), as the 16-byte
     * load needs. */
    if (lits && L->conf >= 2) {
        assert(d->end - d->start >= 16);
        uint64_t w0, w1;
        ff_load16_upto(from, d->end, d->start, &w0, &w1);
        uint64_t x = ((w0 ^ L->w[0]) & L->m[0]) | ((w1 ^ L->w[1]) & L->m[1]);
        if (FF_LIKELY(x == 0)) {
            unsigned nx = L->next;
            d->p = from + L->len;
            d->lit_hits++;
            if (FF_UNLIKELY(nx == FF_LIT_END)) return FF_MEMBER_END;
            ff_ws(d); /* this frame may hold more whitespace before the value than the last */
            return nx == FF_LIT_SKIP ? -1 : (int)nx;
        }
        L->conf = 0;
    }
    int f;
    if (slot == FF_LIT_START) {
        d->p++; /* at `{` */
        ff_ws(d);
        if (d->p < d->end && *d->p == '}') {
            d->p++;
            f = FF_MEMBER_END;
            goto learn;
        }
    } else {
        int rc = ff_member_next(d);
        if (FF_UNLIKELY(rc < 0)) return -2;
        if (!rc) {
            f = FF_MEMBER_END;
            goto learn;
        }
    }
    f = ff_member_key(d, bar);
    if (FF_UNLIKELY(f == -2)) return -2;
learn:
    if (lits) {
        d->lit_misses++;
        if (d->learn) ff_learn(d, bar, slot, from, f);
    }
    return f;
}

/* The values of one object's known fields, by field id.  A field holds its value only when
 * its bit is in `seen` and not in `bad`: nothing is written for a field that is absent
 * (the row takes its default once, when it is made). */
typedef struct {
    uint32_t seen, bad;
    ff_numv num[F_NBAR]; /* number fields */
    ff_str str[F_N];     /* c, ss, bt (string fields only); .s == NULL: null */
    size_t badpos[F_NBAR];
} ff_obj;

static inline void ff_mark_bad(ff_obj *o, int f, size_t pos)
{
    if (!(o->bad & FF_BIT(f))) o->badpos[f] = pos;
    o->bad |= FF_BIT(f);
}

/* A number field whose text is not the common shape: the general parser (its text is
 * converted again at the message's end), null, or a value of another type (marked bad,
 * decided at the message's end: the last of repeated keys wins, and a key the message's
 * kind does not use is never judged). */
static __attribute__((noinline)) int ff_field_num_slow(ff_dec *d, ff_obj *o, int f, int depth)
{
    uint8_t c = *d->p;
    ff_numv *v = &o->num[f];
    if (c == '-' || (unsigned)(c - '0') < 10) {
        ff_num n;
        if (ff_number(d, &n) < 0) return -1;
        v->text = n.start;
        v->how = FF_NUM_TEXT;
        o->bad &= ~FF_BIT(f);
        return 0;
    }
    if (c == 'n') {
        if (ff_skip_literal(d, "null", 4) < 0) return -1;
        v->how = FF_NUM_NULL;
        o->bad &= ~FF_BIT(f);
        return 0;
    }
    ff_mark_bad(o, f, (size_t)(d->p - d->start));
    return ff_skip(d, depth);
}

static int ff_series_array(ff_dec *d, ff_obj *o, size_t bars_start, int depth);

/* The value of field f, read as the table says; d->p at its first byte, which the caller
 * checked is in the frame.  depth: containers open around the value.  padded: the frame is
 * ff_message_flat's copy, followed by 64 zero bytes, so its number and string fast paths
 * read with no check of where they are. */
static inline __attribute__((always_inline)) int ff_field(ff_dec *d, ff_obj *o, int f, int depth,
                                                          size_t bars_start, int padded)
{
    int type = ff_field_type[f];
    if (FF_LIKELY(type >= FT_F64)) {
        if (FF_UNLIKELY(type == FT_SERIES)) return ff_series_array(d, o, bars_start, depth);
        const uint8_t *after;
        if (FF_LIKELY(padded ? ff_scan_decimal_in(d->p, d->end, d->start, &o->num[f], &after, 1)
                             : ff_scan_decimal(d->p, d->end, d->start, &o->num[f], &after))) {
            d->p = after;
            if (FF_UNLIKELY(o->bad)) o->bad &= ~FF_BIT(f); /* a repeated key: the last wins */
            return 0;
        }
        return ff_field_num_slow(d, o, f, depth);
    }
    /* a string field (c, ss, bt): a string, or null where nullable */
    uint8_t c = *d->p;
    if (FF_LIKELY(c == '"')) {
        /* symbol codes are plain ASCII: run to the closing quote here, eight bytes a step;
         * escapes, control bytes and UTF-8 go through ff_string */
        const uint8_t *p = d->p + 1, *e = d->end;
        while (padded || e - p >= 8) {
            uint64_t stops = ff_str_stops(ff_load8(p));
            if (stops) {
                p += __builtin_ctzll(stops) >> 3;
                if (*p == '"') {
                    o->str[f].s = d->p + 1;
                    o->str[f].n = (uint32_t)(p - d->p - 1);
                    o->str[f].escaped = 0;
                    d->p = p + 1;
                    if (FF_UNLIKELY(o->bad)) o->bad &= ~FF_BIT(f);
                    return 0;
                }
                break;
            }
            p += 8;
        }
        if (ff_string(d, &o->str[f]) < 0) return -1;
        o->bad &= ~FF_BIT(f);
        return 0;
    }
    o->str[f].s = NULL;
    if (c == 'n' && type == FT_NSTR) {
        o->bad &= ~FF_BIT(f);
        return ff_skip_literal(d, "null", 4);
    }
    ff_mark_bad(o, f, (size_t)(d->p - d->start));
    return ff_skip(d, depth);
}

/* ---- numbers, converted once the message's kind is known ---------------------- */

static __attribute__((noinline)) double ff_reparse_double(ff_dec *d, const ff_numv *v)
{
    const uint8_t *save = d->p;
    ff_num n;
    d->p = v->text;
    int rc = ff_number(d, &n); /* it parsed before: cannot fail */
    d->p = save;
    return rc < 0 ? NAN : ff_to_double(&n);
}

static __attribute__((noinline)) int ff_reparse_fixed(ff_dec *d, const ff_numv *v, int scale,
                                                      int64_t *out)
{
    const uint8_t *save = d->p;
    ff_num n;
    d->p = v->text;
    int rc = ff_number(d, &n);
    d->p = save;
    return rc < 0 ? -1 : ff_to_fixed(&n, scale, out);
}

/* A number field (present) as a double: bit-exact with Python's float() of its text. */
static inline __attribute__((always_inline)) double ff_conv_double(ff_dec *d, const ff_numv *v)
{
    if (FF_LIKELY(v->how == FF_NUM_FAST && v->mant <= (1ULL << 53))) {
        double x = (double)v->mant / ff_pow10[v->nfrac]; /* exact operands: one rounding */
        return v->neg ? -x : x;
    }
    if (v->how == FF_NUM_NULL) return NAN;
    return ff_reparse_double(d, v);
}

/* A number field (present) as exact int64 units of 10**-scale, half to even, from its
 * decimal digits (never through a binary float).  -1: outside int64. */
static inline __attribute__((always_inline)) int ff_conv_fixed(ff_dec *d, const ff_numv *v, int scale, int64_t *out)
{
    if (FF_LIKELY(v->how == FF_NUM_FAST)) {
        int k = scale - (int)v->nfrac;
        uint64_t q, m = v->mant;
        if (k >= 0) {
            unsigned __int128 w = (unsigned __int128)m * ff_ipow10[k];
            if (FF_UNLIKELY(w > (unsigned __int128)INT64_MAX)) return -1;
            q = (uint64_t)w;
        } else {
            uint64_t div = ff_ipow10[-k];
            q = m / div;
            uint64_t rem = m - q * div, half = div / 2;
            if (rem > half || (rem == half && (q & 1))) q++;
        }
        *out = v->neg ? -(int64_t)q : (int64_t)q;
        return 0;
    }
    if (v->how == FF_NUM_NULL) {
        *out = FF_NAT;
        return 0;
    }
    return ff_reparse_fixed(d, v, scale, out);
}

/* Field f of o as the row wants it: its default when absent. */
#define FF_F64(d, o, f) ((o).seen & FF_BIT(f) ? ff_conv_double(d, &(o).num[f]) : NAN)

/* A timestamp field as int64 (NaT when absent); -1 with d->err set when outside int64. */
static inline __attribute__((always_inline)) int ff_ts_field(ff_dec *d, const ff_obj *o, int f, int scale, int64_t *out,
                              const char *key)
{
    if (!(o->seen & FF_BIT(f))) {
        *out = FF_NAT;
        return 0;
    }
    if (FF_LIKELY(ff_conv_fixed(d, &o->num[f], scale, out) == 0)) return 0;
    snprintf(d->err, sizeof d->err, "timestamp `%s` out of int64 range (byte %zu)", key,
             (size_t)(o->num[f].text - d->start));
    return -1;
}

/* The first field of `bad` (the keys the message's kind uses only) as an error. */
static int ff_type_error(ff_dec *d, const ff_obj *o, uint32_t bad)
{
    int f = __builtin_ctz(bad);
    const char *key = ff_field_name[f];
    char bar_key[16];
    if (f == F_S && d->bar_bad_field >= 0) {
        snprintf(bar_key, sizeof bar_key, "s[].%s", ff_field_name[d->bar_bad_field]);
        key = bar_key;
    }
    size_t pos = o->badpos[f];
    uint8_t at = d->start[pos];
    int numeric_field = (f == F_S) ? d->bar_bad_field >= 0 : ff_field_type[f] >= FT_F64;
    if (numeric_field && (at == '-' || (unsigned)(at - '0') < 10)) {
        snprintf(d->err, sizeof d->err, "timestamp `%s` out of int64 range (byte %zu)", key, pos);
        return -1;
    }
    if (key == bar_key) return ff_fail_type(d, pos, key, "number or null", ff_kind_name(at));
    const char *want = (f == F_C)                  ? "string"
                       : ff_field_type[f] == FT_NSTR ? "string or null"
                       : (f == F_S)                  ? "array of bar objects"
                                                     : "number or null";
    return ff_fail_type(d, pos, key, want, ff_kind_name(at));
}


/* ---- codes: looked up at once, inserted when the frame has decoded ------------ */

#define FF_LOOKUP_ERR INT32_MIN /* d->err says why */

static const char *const ff_role_name[FF_NROLES] = {"symbol", "status", "bar type"};
static const char *const ff_role_plural[FF_NROLES] = {"symbols", "statuses", "bar types"};
/* The largest id each role's row field holds: sym i4, status u1, bar_type i2. */
static const int32_t ff_role_limit[FF_NROLES] = {INT32_MAX, UINT8_MAX, INT16_MAX};

static inline __attribute__((always_inline)) ff_symtab *ff_table(ff_dec *d, int role)
{
    return role == FF_ROLE_SYM ? &d->symbols : role == FF_ROLE_STATUS ? &d->statuses : &d->bar_types;
}

/* The Decoder setting that sizes each role's table (the Feed's for symbols too). */
static const char *const ff_role_setting[FF_NROLES] = {"max_symbols", "max_statuses", "max_bar_types"};
static const char *const ff_role_field[FF_NROLES] = {"sym (i4)", "status (u1)", "bar_type (i2)"};

/* No room in the role's table for the code at byte pos: it holds as many codes as it
 * can (its capacity, or the role's id range if smaller), or its code bytes are used up.
 * The error names the limit and the setting that raises it. */
static int ff_fail_full(ff_dec *d, int role, int arena, size_t pos)
{
    const ff_symtab_hdr *h = ff_table(d, role)->hdr;
    if (arena) {
        snprintf(d->err, sizeof d->err,
                 "%s table full (its %u bytes for codes are used up, %u per entry): raise %s= (byte %zu)",
                 ff_role_name[role], h->arena_size, FF_SYMTAB_BYTES_PER_CODE, ff_role_setting[role], pos);
    } else {
        uint64_t cap = h->capacity, most = (uint64_t)ff_role_limit[role] + 1;
        if (cap < most)
            snprintf(d->err, sizeof d->err, "%s table full (%llu %s): raise %s= (byte %zu)",
                     ff_role_name[role], (unsigned long long)cap, ff_role_plural[role],
                     ff_role_setting[role], pos);
        else
            snprintf(d->err, sizeof d->err, "%s table full (%llu %s, all that the row's %s numbers) (byte %zu)",
                     ff_role_name[role], (unsigned long long)most, ff_role_plural[role],
                     ff_role_field[role], pos);
    }
    d->table_full = 1;
    return -1;
}

static int32_t ff_fail_oom(ff_dec *d)
{
    snprintf(d->err, sizeof d->err, "out of memory");
    return FF_LOOKUP_ERR;
}

static inline void ff_pend_index_put(ff_dec *d, size_t k)
{
    uint32_t mask = d->pend_nslots - 1, i = (uint32_t)d->pend[k].hash & mask;
    while ((uint32_t)(d->pend_index[i] >> 32) == d->pend_gen) i = (i + 1) & mask;
    d->pend_index[i] = ((uint64_t)d->pend_gen << 32) | (uint32_t)(k + 1);
}

static int ff_pend_index_grow(ff_dec *d)
{
    uint32_t n = d->pend_nslots ? d->pend_nslots * 2 : 64;
    if (n == 0) return -1;
    uint64_t *slots = (uint64_t *)calloc(n, sizeof *slots);
    if (!slots) return -1;
    free(d->pend_index);
    d->pend_index = slots;
    d->pend_nslots = n;
    d->pend_gen = 1;
    for (size_t k = 0; k < d->npend; k++) ff_pend_index_put(d, k);
    return 0;
}

/* Between frames: no pending code.  The index empties by moving to a new generation. */
static void ff_pend_clear(ff_dec *d)
{
    d->npend = d->nfix = d->pend_text_len = 0;
    if (d->pend_nslots && ++d->pend_gen == 0) {
        memset(d->pend_index, 0, d->pend_nslots * sizeof *d->pend_index);
        d->pend_gen = 1;
    }
}

/* ff_lookup's slow side: the code is in no table (found < 0), or beyond the role's id
 * range (found > the limit).  Returns the placeholder of the pending code, the same
 * for every use of one code in one frame, or FF_LOOKUP_ERR. */
static __attribute__((noinline)) int32_t ff_defer(ff_dec *d, int role, const char *p, uint32_t n,
                                                   uint64_t h, size_t pos, int32_t found)
{
    if (found >= 0) {
        ff_fail_full(d, role, 0, pos);
        return FF_LOOKUP_ERR;
    }
    if (n > FF_SYMTAB_MAX_CODE) {
        snprintf(d->err, sizeof d->err, "%s code too long (%u bytes, the most is %u) (byte %zu)",
                 ff_role_name[role], n, FF_SYMTAB_MAX_CODE, pos);
        return FF_LOOKUP_ERR;
    }
    if (d->pend_nslots) {
        uint32_t mask = d->pend_nslots - 1, i = (uint32_t)h & mask;
        for (;;) {
            uint64_t s = d->pend_index[i];
            if ((uint32_t)(s >> 32) != d->pend_gen) break;
            uint32_t k = (uint32_t)s - 1;
            const ff_pend *e = &d->pend[k];
            if (e->hash == h && e->role == role && e->len == n && memcmp(d->pend_text + e->off, p, n) == 0)
                return -(int32_t)k - 1;
            i = (i + 1) & mask;
        }
    }
    if (d->npend >= INT32_MAX - 1 || d->pend_text_len + n > UINT32_MAX) return ff_fail_oom(d);
    if ((d->npend + 1) * 2 > d->pend_nslots && ff_pend_index_grow(d) < 0) return ff_fail_oom(d);
    if (d->npend == d->pend_cap) {
        size_t cap = d->pend_cap ? d->pend_cap * 2 : 16;
        ff_pend *a = (ff_pend *)realloc(d->pend, cap * sizeof *a);
        if (!a) return ff_fail_oom(d);
        d->pend = a;
        d->pend_cap = cap;
    }
    /* allocated even for an empty code: pend_text + off is passed to memcpy/memcmp,
     * which must never get NULL, even for 0 bytes */
    if (!d->pend_text || d->pend_text_len + n > d->pend_text_cap) {
        size_t cap = d->pend_text_cap ? d->pend_text_cap : 1024;
        while (cap < d->pend_text_len + n) cap *= 2;
        char *t = (char *)realloc(d->pend_text, cap);
        if (!t) return ff_fail_oom(d);
        d->pend_text = t;
        d->pend_text_cap = cap;
    }
    size_t k = d->npend;
    ff_pend *e = &d->pend[k];
    e->hash = h;
    e->off = (uint32_t)d->pend_text_len;
    e->len = n;
    e->pos = pos;
    e->role = role;
    e->id = -1;
    if (n) memcpy(d->pend_text + d->pend_text_len, p, n);
    d->pend_text_len += n;
    ff_pend_index_put(d, k);
    d->npend++;
    return -(int32_t)k - 1;
}

/* The id of a code, for a row: the table's id when it holds the code (nearly always: one
 * hash and one probe), else a placeholder (< 0) that ff_commit turns into the id once the
 * frame has decoded.  Nothing is inserted here.  FF_LOOKUP_ERR: d->err says why. */
static inline __attribute__((always_inline)) int32_t ff_lookup(ff_dec *d, int role, const char *p,
                                                               uint32_t n, size_t pos)
{
    /* A status or bar type is nearly always the one before (`"bt":"1m"` on every bar): it is
     * compared first, as a word.  (For symbols, which vary, a last-symbol check and a cache
     * of recent symbols by their bytes both measured slower than the hash and one probe.) */
    uint64_t k = 0;
    ff_lastcode *lc = NULL;
    if (role != FF_ROLE_SYM && n <= 8) {
        for (uint32_t i = 0; i < n; i++) k |= (uint64_t)(uint8_t)p[i] << (8 * i);
        lc = &d->last_code[role];
        if (FF_LIKELY(lc->len == n + 1 && lc->k == k)) return lc->id;
    }
    ff_symtab *t = ff_table(d, role);
    uint64_t h = ff_hash_bytes(p, n);
    int32_t id = ff_symtab_find(t, p, n, h);
    if (FF_LIKELY(id >= 0 && id <= ff_role_limit[role])) {
        if (lc) { /* ids never change once published */
            lc->k = k;
            lc->len = n + 1;
            lc->id = id;
        }
        return id;
    }
    return ff_defer(d, role, p, n, h, pos, id);
}

static int32_t ff_lookup_str(ff_dec *d, int role, const ff_str *s)
{
    const char *p;
    uint32_t n;
    if (ff_text(d, s, &p, &n) < 0) return ff_fail_oom(d);
    return ff_lookup(d, role, p, n, (size_t)(s->s - d->start));
}

/* Rows [row, row + nrows) take the id of placeholder `ph` at the frame's end. */
static int ff_fix_add(ff_dec *d, int32_t ph, uint32_t what, size_t row, size_t nrows)
{
    if (d->nfix == d->fix_cap) {
        size_t cap = d->fix_cap ? d->fix_cap * 2 : 16;
        ff_fix *a = (ff_fix *)realloc(d->fix, cap * sizeof *a);
        if (!a) return -1;
        d->fix = a;
        d->fix_cap = cap;
    }
    ff_fix *f = &d->fix[d->nfix++];
    f->pend = (uint32_t)(-(ph + 1));
    f->what = what;
    f->row = row;
    f->nrows = nrows;
    return 0;
}

/* The bars [from, len) of one message, whose symbol or bar type (or both) is pending:
 * both fixes are recorded, or neither. */
static int ff_fix_bars(ff_dec *d, int32_t sym, int32_t bt, size_t from)
{
    size_t nfix = d->nfix, n = d->bars.len - from;
    if ((sym < 0 && ff_fix_add(d, sym, FF_FIX_BAR_SYM, from, n) < 0) ||
        (bt < 0 && ff_fix_add(d, bt, FF_FIX_BAR_TYPE, from, n) < 0)) {
        d->nfix = nfix;
        return -1;
    }
    return 0;
}

/* The frame has decoded: insert its pending codes, all of them or none, and give their
 * rows the ids.  The tables involved are locked together while it checks that every
 * code fits and then inserts them, so the room it found is still there when it inserts,
 * whatever other processes sharing the tables do meanwhile.  A code another process
 * inserted since the lookup just takes that process's id. */
static int ff_commit(ff_dec *d)
{
    ff_symtab *tabs[FF_NROLES];
    ff_symtab_hdr *locks[FF_NROLES];
    uint32_t count[FF_NROLES], used[FF_NROLES];
    int ntab = 0, tab_of[FF_NROLES];
    unsigned roles = 0;
    for (size_t k = 0; k < d->npend; k++) roles |= 1u << d->pend[k].role;
    for (int r = 0; r < FF_NROLES; r++) {
        tab_of[r] = -1;
        if (!(roles & (1u << r))) continue;
        ff_symtab *t = ff_table(d, r);
        for (int j = 0; j < ntab; j++)
            if (tabs[j]->hdr == t->hdr) tab_of[r] = j; /* one table in two roles */
        if (tab_of[r] < 0) {
            tab_of[r] = ntab;
            tabs[ntab] = t;
            locks[ntab++] = t->hdr;
        }
    }
    ff_symtab_lock_all(locks, ntab);
    for (int j = 0; j < ntab; j++) {
        count[j] = tabs[j]->hdr->count;
        used[j] = tabs[j]->hdr->arena_used;
    }
    /* First whether everything fits (a code counted twice, only when one table serves
     * two roles, makes this stricter, never looser). */
    for (size_t k = 0; k < d->npend; k++) {
        const ff_pend *e = &d->pend[k];
        int j = tab_of[e->role];
        const ff_symtab_hdr *h = tabs[j]->hdr;
        int32_t id = ff_symtab_find(tabs[j], d->pend_text + e->off, e->len, e->hash);
        int full = 0, arena = 0;
        if (id < 0) {
            if (count[j] >= h->capacity) full = 1;
            else if (used[j] + e->len > h->arena_size) full = arena = 1;
            else {
                id = (int32_t)count[j]++;
                used[j] += e->len;
            }
        }
        if (full || id > ff_role_limit[e->role]) {
            for (int i = 0; i < ntab; i++) ff_symtab_unlock(locks[i]);
            return ff_fail_full(d, e->role, arena, e->pos);
        }
    }
    int lost = -1;
    for (size_t k = 0; k < d->npend; k++) {
        ff_pend *e = &d->pend[k];
        e->id = ff_symtab_add_locked(tabs[tab_of[e->role]], d->pend_text + e->off, e->len, e->hash);
        if (e->id < 0 && lost < 0) lost = (int)k; /* cannot happen: it was checked above */
    }
    for (int i = 0; i < ntab; i++) ff_symtab_unlock(locks[i]);
    if (lost >= 0) return ff_fail_full(d, d->pend[lost].role, 0, d->pend[lost].pos);
    for (size_t i = 0; i < d->nfix; i++) {
        const ff_fix *f = &d->fix[i];
        int32_t id = d->pend[f->pend].id;
        switch (f->what) {
        case FF_FIX_TICK_SYM: ((ff_tick *)d->ticks.data)[f->row].sym = id; break;
        case FF_FIX_QUOTE_SYM: ((ff_quote *)d->quotes.data)[f->row].sym = id; break;
        case FF_FIX_QUOTE_STATUS: ((ff_quote *)d->quotes.data)[f->row].status = (uint8_t)id; break;
        case FF_FIX_BAR_SYM:
            for (size_t r = f->row; r < f->row + f->nrows; r++) ((ff_bar *)d->bars.data)[r].sym = id;
            break;
        case FF_FIX_BAR_TYPE:
            for (size_t r = f->row; r < f->row + f->nrows; r++)
                ((ff_bar *)d->bars.data)[r].bar_type = (int16_t)id;
            break;
        }
    }
    return 0;
}

/* The members of one object into o; d->p at its `{`, left past its `}`.  lits: whether the
 * learned bytes are tried and learned (a constant: ff_members_of has both loops and picks by
 * d->lits_on, so that a stream where they do not help runs the plain loop). */
static inline __attribute__((always_inline)) int ff_members(ff_dec *d, ff_obj *o, int bar, int depth,
                                                            size_t bars_start, int lits)
{
    ff_lit *bank = lits ? d->bank->lit[bar] : NULL; /* once: a store to a row may alias d->bank */
    for (int slot = FF_LIT_START;;) {
        int f = ff_next_member(d, bank, bar, slot, lits);
        if (f == FF_MEMBER_END) return 0;
        if (FF_UNLIKELY(f == -2)) return -1;
        if (FF_UNLIKELY(d->p >= d->end)) return ff_fail(d, d->p, "expected a value");
        if (FF_LIKELY(f >= 0)) {
            if (ff_field(d, o, f, depth + 1, bars_start, 0) < 0) return -1;
            o->seen |= FF_BIT(f);
            slot = f;
        } else {
            if (ff_skip(d, depth + 1) < 0) return -1;
            slot = FF_LIT_OTHER;
        }
    }
}

/* ff_members with the learned bytes or without, as this frame goes (d->lits_on). */
static inline __attribute__((always_inline)) int ff_members_of(ff_dec *d, ff_obj *o, int bar, int depth,
                                                               size_t bars_start)
{
    return d->lits_on ? ff_members(d, o, bar, depth, bars_start, 1) : ff_members(d, o, bar, depth, bars_start, 0);
}

/* The row of one bar whose members are in *o (ff_bar_obj, ff_series_flat): a bad field is
 * reported through the message's `s` bit (so that a later `s` key, last wins, can still
 * clear it) and makes no row.  -1: out of memory. */
static inline __attribute__((always_inline)) int ff_bar_row(ff_dec *d, ff_obj *msg, ff_obj *o)
{
    int64_t t = FF_NAT;
    if (FF_LIKELY(!o->bad) && (o->seen & FF_BIT(F_T)) && ff_conv_fixed(d, &o->num[F_T], 6, &t) < 0)
        ff_mark_bad(o, F_T, (size_t)(o->num[F_T].text - d->start)); /* outside int64 */
    if (FF_UNLIKELY(o->bad)) {
        int f = __builtin_ctz(o->bad);
        if (!(msg->bad & FF_BIT(F_S))) {
            msg->badpos[F_S] = o->badpos[f];
            d->bar_bad_field = f;
        }
        msg->bad |= FF_BIT(F_S);
        return 0;
    }
    ff_bar *row = (ff_bar *)ff_vec_push(&d->bars);
    if (!row) return ff_fail_msg(d, d->p, "out of memory");
    row->ts = t;
    row->open = FF_F64(d, *o, F_O);
    row->high = FF_F64(d, *o, F_H);
    row->low = FF_F64(d, *o, F_L);
    row->close = FF_F64(d, *o, F_CL);
    row->volume = FF_F64(d, *o, F_V);
    return 0;
}

/* One bar of a series' `s` array; d->p at '{'; depth: containers open around it.  Appends
 * a row whose message-level fields are filled in when the enclosing message ends. */
static int ff_bar_obj(ff_dec *d, ff_obj *msg, int depth)
{
    assert(d->p < d->end && *d->p == '{');
    ff_obj o;
    o.seen = o.bad = 0;
    if (ff_members_of(d, &o, 1, depth, 0) < 0) return -1;
    return ff_bar_row(d, msg, &o);
}

/* The `s` value; d->p at its first byte; depth: containers open around it. */
static int ff_series_array(ff_dec *d, ff_obj *o, size_t bars_start, int depth)
{
    d->bars.len = bars_start; /* a repeated `s`: the last one wins */
    o->bad &= ~FF_BIT(F_S);
    assert(d->p < d->end); /* the caller checked: a value starts here */
    uint8_t c = *d->p;
    if (c == 'n') return ff_skip_literal(d, "null", 4);
    if (c != '[') {
        o->badpos[F_S] = (size_t)(d->p - d->start);
        d->bar_bad_field = -1;
        o->bad |= FF_BIT(F_S);
        return ff_skip(d, depth);
    }
    d->p++;
    ff_ws(d);
    if (d->p < d->end && *d->p == ']') {
        d->p++;
        return 0;
    }
    for (;;) {
        if (d->p < d->end && *d->p == '{') {
            if (ff_bar_obj(d, o, depth + 1) < 0) return -1;
        } else {
            if (!(o->bad & FF_BIT(F_S))) {
                o->badpos[F_S] = (size_t)(d->p - d->start);
                d->bar_bad_field = -1;
            }
            o->bad |= FF_BIT(F_S);
            if (ff_skip(d, depth + 1) < 0) return -1;
        }
        ff_ws(d);
        if (d->p >= d->end) return ff_fail(d, d->p, "unclosed array");
        if (*d->p == ',') {
            d->p++;
            ff_ws(d);
            continue;
        }
        if (*d->p == ']') {
            d->p++;
            return 0;
        }
        return ff_fail(d, d->p, "expected ',' or ']'");
    }
}

/* The code of string field f (present: the caller checked) as an id or placeholder. */
static inline __attribute__((always_inline)) int32_t ff_lookup_field(ff_dec *d, int role, const ff_obj *o, int f)
{
    return ff_lookup_str(d, role, &o->str[f]);
}

/* One message object; d->p at '{'; depth: containers open around it (0 for a frame that
 * is one object, 1 in an array frame).  Classified at its end by the keys it held. */
static int ff_message_end(ff_dec *d, ff_obj *op, const uint8_t *obj_start, size_t bars_start);

static int ff_message(ff_dec *d, int depth)
{
    assert(d->p < d->end && *d->p == '{');
    const uint8_t *obj_start = d->p;
    ff_obj o;
    o.seen = o.bad = 0;
    size_t bars_start = d->bars.len;

    if (ff_members_of(d, &o, 0, depth, bars_start) < 0) return -1;
    return ff_message_end(d, &o, obj_start, bars_start);
}

/* The message whose members are in *op: classified by the keys it held, its row made. */
static inline __attribute__((always_inline)) int ff_message_end(ff_dec *d, ff_obj *op, const uint8_t *obj_start,
                                                                size_t bars_start)
{
    uint32_t seen = op->seen, used;
    int kind; /* 1 series, 2 tick, 3 quote, 0 control */
    if (seen & FF_SERIES_KEYS) kind = 1, used = FF_SERIES_USED;
    else if (seen & FF_BIT(F_P)) kind = 2, used = FF_TICK_USED;
    else if (seen & FF_QUOTE_KEYS) kind = 3, used = FF_QUOTE_USED;
    else kind = 0, used = 0;
    if (!kind) {
        d->bars.len = bars_start;
        d->ncontrol++;
        return 0;
    }
    uint32_t bad = op->bad & used; /* a key of another kind is never judged */
    if (FF_UNLIKELY(!(seen & FF_BIT(F_C)) || (op->str[F_C].s == NULL && !(bad & FF_BIT(F_C))))) {
        return ff_fail_msg(d, obj_start, "data message without a string `c` (symbol code)");
    }
    if (FF_UNLIKELY(bad)) return ff_type_error(d, op, bad);

    /* Timestamps first: the only conversions that can fail (outside int64). */
    int64_t ts, ts2 = FF_NAT;
    if (kind == 2) {
        if (ff_ts_field(d, op, F_T, 6, &ts, "t") < 0) return -1;
    } else if (kind == 3) {
        if (ff_ts_field(d, op, F_LT, 6, &ts, "lt") < 0) return -1;
    } else if (ff_ts_field(d, op, F_BE, 6, &ts, "be") < 0 || ff_ts_field(d, op, F_LU, 3, &ts2, "lu") < 0) {
        return -1;
    }

    /* Codes new to their table get placeholders (< 0) here, ids when the frame ends. */
    int32_t sym = ff_lookup_field(d, FF_ROLE_SYM, op, F_C);
    if (sym == FF_LOOKUP_ERR) return -1;
    if (kind == 2) {
        ff_tick *r = (ff_tick *)ff_vec_push(&d->ticks);
        if (FF_UNLIKELY(!r)) return ff_fail_msg(d, obj_start, "out of memory");
        r->sym = sym;
        r->_pad = 0;
        r->ts = ts;
        r->price = ff_conv_double(d, &op->num[F_P]); /* p is there: it made the message a tick */
        r->volume = FF_F64(d, *op, F_V);
        r->recv_ts = d->recv_ts;
        if (FF_UNLIKELY(sym < 0) && ff_fix_add(d, sym, FF_FIX_TICK_SYM, d->ticks.len - 1, 1) < 0)
            return ff_fail_msg(d, obj_start, "out of memory");
    } else if (kind == 3) {
        int32_t st = 0;
        if ((seen & FF_BIT(F_SS)) && op->str[F_SS].s &&
            (st = ff_lookup_field(d, FF_ROLE_STATUS, op, F_SS)) == FF_LOOKUP_ERR)
            return -1;
        ff_quote *r = (ff_quote *)ff_vec_push(&d->quotes);
        if (FF_UNLIKELY(!r)) return ff_fail_msg(d, obj_start, "out of memory");
        r->sym = sym;
        r->status = (uint8_t)(st < 0 ? 0 : st);
        r->_pad[0] = r->_pad[1] = r->_pad[2] = 0;
        r->ts = ts;
        r->last = FF_F64(d, *op, F_LP);
        r->volume = FF_F64(d, *op, F_V);
        r->bid = FF_F64(d, *op, F_B);
        r->ask = FF_F64(d, *op, F_A);
        r->bid_size = FF_F64(d, *op, F_BS);
        r->ask_size = FF_F64(d, *op, F_AS);
        r->recv_ts = d->recv_ts;
        if ((sym < 0 && ff_fix_add(d, sym, FF_FIX_QUOTE_SYM, d->quotes.len - 1, 1) < 0) ||
            (st < 0 && ff_fix_add(d, st, FF_FIX_QUOTE_STATUS, d->quotes.len - 1, 1) < 0))
            return ff_fail_msg(d, obj_start, "out of memory");
    } else {
        int32_t bt = 0;
        if ((seen & FF_BIT(F_BT)) && op->str[F_BT].s &&
            (bt = ff_lookup_field(d, FF_ROLE_BAR_TYPE, op, F_BT)) == FF_LOOKUP_ERR)
            return -1;
        ff_finish_bars(d, bars_start, sym, (int16_t)(bt < 0 ? 0 : bt), ts, ts2);
        if ((sym < 0 || bt < 0) && ff_fix_bars(d, sym, bt, bars_start) < 0)
            return ff_fail_msg(d, obj_start, "out of memory");
    }
    return 0;
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define FF_HAVE_FLAT 1

/* The order of a flat frame's keys so far, with key f next: two frames with the same keys in
 * the same order have the same bytes between their values (both compact), which the general
 * path would learn.  (A collision costs speed, never a wrong row.) */
#define FF_SIG(sig, f) ((sig) << 5 ^ (sig) >> 59 ^ (uint64_t)((f) + 1))

/* The bars of a series' `s` array in ff_series_flat's copy: every bar a flat object of the
 * six bar keys (`"k":` then the value, which must end at its separator), bars separated by
 * a lone `,`.  sp[j..je): the `,` and `}` inside the array, in order; op: its bars' `{`, nb
 * of them; b: where the `]` is.  Each bar's values are read in the fields' own order, as in
 * ff_message_flat.  1: not this shape (the caller drops the rows made). */
#define FF_BAR_FIELDS (FF_BIT(F_T) | FF_BIT(F_V) | FF_BIT(F_O) | FF_BIT(F_H) | FF_BIT(F_L) | FF_BIT(F_CL))

/* Field f's value in a flat path's copy buf, from vs[f]: read, and ending at ve[f] (its
 * member's separator).  1: so. */
static inline __attribute__((always_inline)) int ff_flat_field(ff_dec *d, ff_obj *o, int f, const uint8_t *buf,
                                                               const uint8_t *vs, const uint8_t *ve, int depth,
                                                               size_t bars_start)
{
    d->p = buf + vs[f];
    return ff_field(d, o, f, depth, bars_start, 1) == 0 && d->p == buf + ve[f];
}
#define FF_FLAT_TARGET __attribute__((target("avx512bw,avx512vl,avx512vbmi2,bmi,bmi2")))
FF_FLAT_TARGET static inline int ff_bars_flat(ff_dec *d, ff_obj *msg, const uint8_t *sp, unsigned j, unsigned je,
                                              const uint8_t *op, unsigned nb, unsigned b, uint64_t *sig)
{
    const uint8_t *buf = d->start;
    for (unsigned bi = 0;; bi++) {
        unsigned prev = op[bi]; /* the bar's `{`: its place checked by the caller or below */
        uint32_t seen = 0;
        unsigned nm = 0;
        uint8_t vs[F_NBAR], ve[F_NBAR];
        for (;; j++) {
            if (FF_UNLIKELY(j >= je)) return 1;
            unsigned s = sp[j], k = prev + 1;
            uint32_t w = (uint32_t)ff_load8(buf + k); /* `"k":` */
            int f = ff_key1_bar[(uint8_t)(w >> 8)] - 1;
            if (FF_UNLIKELY((w & 0xFFFF00FFu) != ('"' | '"' << 16 | (unsigned)':' << 24) || f < 0 ||
                            k + 4 >= s))
                return 1;
            seen |= FF_BIT(f);
            nm++;
            *sig = FF_SIG(*sig, f);
            vs[f] = (uint8_t)(k + 4);
            ve[f] = (uint8_t)s;
            prev = s;
            if (buf[s] == '}') break;
        }
        j++;
        if (FF_UNLIKELY(nm != (unsigned)__builtin_popcount(seen))) return 1;
        ff_obj o;
        o.seen = seen;
        o.bad = 0;
#define FF_V(f) ff_flat_field(d, &o, f, buf, vs, ve, 3, 0)
        if (seen == FF_BAR_FIELDS) {
            if (!(FF_V(F_T) && FF_V(F_V) && FF_V(F_O) && FF_V(F_H) && FF_V(F_L) && FF_V(F_CL))) return 1;
        } else {
            for (uint32_t m = seen; m; m &= m - 1)
                if (!FF_V(__builtin_ctz(m))) return 1;
        }
#undef FF_V
        if (ff_bar_row(d, msg, &o) < 0) return 1; /* out of memory: the general path says so */
        if (bi + 1 == nb) return prev + 1 != b || j != je; /* the last bar's `}`, then `]` */
        /* `},{` between bars: the `,` is the next separator, the `{` the next bar's */
        if (FF_UNLIKELY(j >= je || sp[j] != prev + 1 || buf[prev + 1] != ',' || op[bi + 1] != prev + 2)) return 1;
        j++;
    }
}

/* A series' array, for ff_flat_values: the separators inside it are sp[ia..ib), its bars'
 * `{` op[0..nb), its `]` at b; nb 0: the frame holds none. */
typedef struct {
    const uint8_t *sp, *op;
    unsigned ia, ib, nb, b;
} ff_flat_array;

/* The second step of ff_message_flat and ff_series_flat: the values of the fields seen, read
 * in the fields' own order (a symbol, a timestamp, then prices: the same branches in the
 * same order every message) from the copy, each of which must end where its member does
 * (vs, ve); the bars of arr by ff_bars_flat; then the message's row.  1: not
 * the shape, no row made, and the caller reads the frame the general way. */
static inline __attribute__((always_inline)) int ff_flat_values(ff_dec *d, int *rc, unsigned n, uint32_t seen,
                                                                const uint8_t *vs, const uint8_t *ve, uint64_t sig,
                                                                const ff_flat_array arr)
{
    uint8_t *buf = d->flatbuf;
    ff_obj o;
    o.seen = seen;
    o.bad = 0;
    size_t bars_start = d->bars.len;
    const uint8_t *start = d->start, *end = d->end;
    d->start = buf; /* positions in errors are the same: the copy starts where the frame does */
    d->end = buf + n;
    int ok = 1;
    /* the usual sets of fields, each a run of calls with the field known where it is compiled */
#define FF_V(f) ff_flat_field(d, &o, f, buf, vs, ve, 1, bars_start)
    if (seen == FF_TICK_USED) {
        ok = FF_V(F_C) && FF_V(F_T) && FF_V(F_P) && FF_V(F_V);
    } else if (seen == (FF_QUOTE_USED & ~FF_BIT(F_SS))) {
        ok = FF_V(F_C) && FF_V(F_V) && FF_V(F_LT) && FF_V(F_LP) && FF_V(F_A) && FF_V(F_B) && FF_V(F_AS) &&
             FF_V(F_BS);
    } else if (seen == FF_SERIES_USED && arr.nb) {
        ok = FF_V(F_C) && FF_V(F_BE) && FF_V(F_LU) && FF_V(F_BT) &&
             ff_bars_flat(d, &o, arr.sp, arr.ia, arr.ib, arr.op, arr.nb, arr.b, &sig) == 0;
    } else {
        for (uint32_t m = seen; ok && m; m &= m - 1) {
            int f = __builtin_ctz(m);
            if (arr.nb && f == F_S) {
                ok = ff_bars_flat(d, &o, arr.sp, arr.ia, arr.ib, arr.op, arr.nb, arr.b, &sig) == 0;
            } else {
                ok = FF_V(f);
            }
        }
    }
#undef FF_V
    if (ok) {
        d->p = d->end;
        d->flat_total++;
        d->flat_sig = sig;
        *rc = ff_message_end(d, &o, buf, bars_start);
    } else {
        d->bars.len = bars_start;
    }
    d->start = start; /* (a code's text is copied when it is new to its table) */
    d->p = d->end = end;
    return !ok;
}

/* ff_message_flat's second half, whichever vector unit found the frame's bytes: e (`}`), s
 * (separators: `,` and `}`) and o (the odd bytes: `{` `[` `\` `]`, whitespace, controls,
 * UTF-8) as bits by position in the frame's two 64-byte words (o may have bits past the
 * frame: zeros there). */
__attribute__((target("bmi,bmi2"))) static inline __attribute__((always_inline)) int
ff_message_members(ff_dec *d, int *rc, size_t n, uint64_t e0, uint64_t e1, uint64_t s0, uint64_t s1, uint64_t o0,
                   uint64_t o1)
{
    uint8_t *buf = d->flatbuf;
    uint64_t k0 = n >= 64 ? ~0ULL : _bzhi_u64(~0ULL, (unsigned)n);
    uint64_t k1 = n > 64 ? _bzhi_u64(~0ULL, (unsigned)(n - 64)) : 0;
    /* `{` at byte 0 only (the caller saw it), `}` at the last byte only */
    if ((o0 & k0) != 1 || (o1 & k1) || (n > 64 ? e0 || e1 != 1ULL << (n - 65) : e0 != 1ULL << (n - 1)))
        return 1;
    /* A separator inside a string (`"c":"A,B"`) is taken for one here, and the members come
     * out wrong; no string is told apart first, because each is checked: a key must be
     * exactly `"k":` or `"kk":` of ours, and a string value must end at its separator, or
     * the frame goes the general way. */

    uint32_t seen = 0;
    uint64_t sig = 0;
    uint8_t vs[F_N], ve[F_N]; /* where each field's value starts and ends */
    unsigned prev = 0;        /* the `{` or `,` before the member */
    for (int half = 0; half < 2; half++) {
        uint64_t m = half ? s1 : s0;
        for (; m; m &= m - 1) {
            unsigned s = 64 * (unsigned)half + (unsigned)_tzcnt_u64(m), k = prev + 1;
            uint64_t w = ff_load8(buf + k); /* k < 128: in the copy, zeros past the frame */
            unsigned len;
            int f = ff_key_compact(w, &len);
            unsigned v = k + len;
            if (FF_UNLIKELY((uint8_t)w != '"' || f < 0 || v >= s || (seen & FF_BIT(f)))) return 1;
            seen |= FF_BIT(f);
            sig = FF_SIG(sig, f);
            vs[f] = (uint8_t)v;
            ve[f] = (uint8_t)s;
            prev = s;
        }
    }
    if (prev != n - 1) return 1; /* the last separator is the object's `}` */

    return ff_flat_values(d, rc, (unsigned)n, seen, vs, ve, sig, (ff_flat_array){0});
}

/* A frame of 16..128 bytes that is one flat message object whose keys come in no fixed
 * order (a bank whose learned bytes keep missing), read in two steps so that the order never
 * steers a branch: with keys in any order, each message's order is information a branching
 * parser must discover one mispredicted branch at a time (4.6 bits a tick, 15.3 a quote).
 * AVX-512 (chosen at run time): the frame in two masked 64-byte loads (bytes past its end are
 * neither read nor faulted on: masked off, they load as zero), one compare per class of byte
 * for the whole frame.  First where each member's key and value lie: a member runs from one
 * separator (`,`, or the closing `}`) to the next, so no value is parsed to find the next
 * member.  Then the values, read by ff_field in the fields' own order (a symbol, a timestamp,
 * then prices: the same branches in the same order every message), from a copy of the frame
 * followed by zeros, so that no read asks where in the frame it is.  1: not this path's shape
 * (nested values, whitespace, escapes, UTF-8, keys we skip or repeat, a value that does not
 * end at its separator): no row was made, and the caller reads the frame the general way. */
__attribute__((target("avx512bw,avx512vl,bmi,bmi2"))) static int ff_message_flat(ff_dec *d, int *rc)
{
    const uint8_t *p = d->start;
    size_t n = (size_t)(d->end - p);
    assert(n >= 16 && n <= 128);
    uint64_t k0 = n >= 64 ? ~0ULL : _bzhi_u64(~0ULL, (unsigned)n);
    uint64_t k1 = n > 64 ? _bzhi_u64(~0ULL, (unsigned)(n - 64)) : 0;
    __m512i v0 = _mm512_maskz_loadu_epi8(k0, p), v1 = _mm512_maskz_loadu_epi8(k1, p + 64);
    uint8_t *buf = d->flatbuf;
    _mm512_storeu_si512((void *)buf, v0);
    _mm512_storeu_si512((void *)(buf + 64), v1);
    /* and 64 zeros past byte 128: ff_series_flat may have left a longer frame's bytes there */
    _mm512_storeu_si512((void *)(buf + 128), _mm512_setzero_si512());
    const __m512i comma = _mm512_set1_epi8(','), close = _mm512_set1_epi8('}');
    const __m512i open = _mm512_set1_epi8('{'), lbr = _mm512_set1_epi8('['), two = _mm512_set1_epi8(2);
    const __m512i bang = _mm512_set1_epi8('!');
#define FF_ODD(v) (_mm512_cmpeq_epi8_mask(v, open) | _mm512_cmple_epu8_mask(_mm512_sub_epi8(v, lbr), two) | \
                   _mm512_cmplt_epi8_mask(v, bang))
    uint64_t e0 = _mm512_cmpeq_epi8_mask(v0, close), e1 = _mm512_cmpeq_epi8_mask(v1, close);
    uint64_t s0 = _mm512_cmpeq_epi8_mask(v0, comma) | e0, s1 = _mm512_cmpeq_epi8_mask(v1, comma) | e1;
    uint64_t o0 = FF_ODD(v0), o1 = FF_ODD(v1);
#undef FF_ODD
    return ff_message_members(d, rc, n, e0, e1, s0, s1, o0, o1);
}

/* ff_message_flat on a CPU with AVX2 but not AVX-512, which has no masked loads: the frame
 * in four 32-byte loads at 0, 32, 64 and 96, each moved back to end at the frame's end if it
 * would pass it (overlapping loads, nothing past the frame read), and stored in the copy at
 * the same places; a frame under 32 bytes is copied first. */
__attribute__((target("avx2,bmi,bmi2,popcnt"))) static int ff_message_flat_avx2(ff_dec *d, int *rc)
{
    const uint8_t *p = d->start;
    size_t n = (size_t)(d->end - p);
    assert(n >= 16 && n <= 128);
    uint8_t *buf = d->flatbuf;
    const __m256i zero = _mm256_setzero_si256();
    if (FF_UNLIKELY(n < 32)) {
        _mm256_storeu_si256((__m256i *)buf, zero);
        memcpy(buf, p, n);
        p = buf;
    }
    const __m256i comma = _mm256_set1_epi8(','), close = _mm256_set1_epi8('}'), open = _mm256_set1_epi8('{');
    const __m256i lbr = _mm256_set1_epi8('['), bsl = _mm256_set1_epi8('\\'), rbr = _mm256_set1_epi8(']');
    const __m256i bang = _mm256_set1_epi8('!');
    unsigned last = n < 32 ? 0 : (unsigned)n - 32;
    unsigned __int128 e = 0, sep = 0, odd = 0;
    for (unsigned i = 0; i < 4; i++) {
        unsigned at = 32 * i < last ? 32 * i : last;
        __m256i v = _mm256_loadu_si256((const __m256i *)(p + at));
        _mm256_storeu_si256((__m256i *)(buf + at), v);
        __m256i ce = _mm256_cmpeq_epi8(v, close);
        __m256i cs = _mm256_or_si256(ce, _mm256_cmpeq_epi8(v, comma));
        /* `{` `[` `\` `]`, and whitespace, controls and UTF-8 (signed: below `!`) */
        __m256i co = _mm256_or_si256(
            _mm256_or_si256(_mm256_cmpeq_epi8(v, open), _mm256_cmpeq_epi8(v, lbr)),
            _mm256_or_si256(_mm256_or_si256(_mm256_cmpeq_epi8(v, bsl), _mm256_cmpeq_epi8(v, rbr)),
                            _mm256_cmpgt_epi8(bang, v)));
        e |= (unsigned __int128)(uint32_t)_mm256_movemask_epi8(ce) << at;
        sep |= (unsigned __int128)(uint32_t)_mm256_movemask_epi8(cs) << at;
        odd |= (unsigned __int128)(uint32_t)_mm256_movemask_epi8(co) << at;
    }
    /* 64 zeros past the frame (a longer frame's bytes may be there) */
    _mm256_storeu_si256((__m256i *)(buf + n), zero);
    _mm256_storeu_si256((__m256i *)(buf + n + 32), zero);
    return ff_message_members(d, rc, n, (uint64_t)e, (uint64_t)(e >> 64), (uint64_t)sep, (uint64_t)(sep >> 64),
                              (uint64_t)odd, (uint64_t)(odd >> 64));
}

/* ff_message_flat for a frame of 16..256 bytes that may hold one array, the `s` of a series
 * message whose bars are flat objects: a series of one bar is ~145 bytes, and its eleven
 * keys, shuffled, cost a branching parser 1.5x the compact frame.  Needs AVX-512 VBMI2 (vpcompressb) besides:
 * the positions of the separators (`,` `}`) and of the few other structural bytes (`{` `[`
 * `]`; whitespace, escapes and UTF-8 are refused) are compressed into two lists, so that
 * walking them never branches on which 64-byte word holds the next (that moves with every
 * symbol's length).  nw: 64-byte words the frame takes (1 to 4).  1: not this shape, no row
 * made. */
FF_FLAT_TARGET static inline __attribute__((always_inline)) int ff_series_flat_w(ff_dec *d, int *rc, const unsigned nw)
{
    const uint8_t *p = d->start;
    unsigned n = (unsigned)(d->end - p);
    uint8_t *buf = d->flatbuf;
    const __m512i comma = _mm512_set1_epi8(','), close = _mm512_set1_epi8('}'), open = _mm512_set1_epi8('{');
    const __m512i lbr = _mm512_set1_epi8('['), two = _mm512_set1_epi8(2), bang = _mm512_set1_epi8('!');
    const __m512i iota = _mm512_set_epi8(63, 62, 61, 60, 59, 58, 57, 56, 55, 54, 53, 52, 51, 50, 49, 48, 47, 46,
                                         45, 44, 43, 42, 41, 40, 39, 38, 37, 36, 35, 34, 33, 32, 31, 30, 29, 28,
                                         27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16, 15, 14, 13, 12, 11, 10,
                                         9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    uint8_t sp[256 + 64], op[256 + 64]; /* positions of the separators, of the odd bytes */
    unsigned ns = 0, no = 0;
    uint64_t seps[4];
    for (unsigned i = 0; i < nw; i++) {
        unsigned lo = 64 * i;
        uint64_t k = n >= lo + 64 ? ~0ULL : n > lo ? _bzhi_u64(~0ULL, n - lo) : 0;
        __m512i v = _mm512_maskz_loadu_epi8(k, p + lo);
        _mm512_storeu_si512((void *)(buf + lo), v);
        uint64_t sep = _mm512_cmpeq_epi8_mask(v, comma) | _mm512_cmpeq_epi8_mask(v, close);
        /* `{`, `[` `\` `]`, and whitespace, controls and UTF-8 (signed: below `!`) */
        uint64_t odd = (_mm512_cmpeq_epi8_mask(v, open) | _mm512_cmple_epu8_mask(_mm512_sub_epi8(v, lbr), two) |
                        _mm512_cmplt_epi8_mask(v, bang)) & k;
        __m512i at = _mm512_add_epi8(iota, _mm512_set1_epi8((char)lo));
        _mm512_storeu_si512((void *)(sp + ns), _mm512_maskz_compress_epi8(sep, at));
        _mm512_storeu_si512((void *)(op + no), _mm512_maskz_compress_epi8(odd, at));
        ns += (unsigned)_mm_popcnt_u64(sep);
        no += (unsigned)_mm_popcnt_u64(odd);
        seps[i] = sep;
    }
    /* 64 zeros past the words (a longer frame's bytes may be there); past 256, never written */
    if (nw < 4) _mm512_storeu_si512((void *)(buf + 64 * nw), _mm512_setzero_si512());
    /* The odd bytes: the message's `{` at 0, and either nothing else (a flat message) or `[`,
     * its bars' `{` and `]` (a series), told apart by their bytes. */
    unsigned a = n, b = n, nb = no - 3, ia = ns, ib = ns;
    if (no > 1) {
        a = op[1];
        b = op[no - 1];
        if (FF_UNLIKELY(no < 4 || buf[a] != '[' || buf[b] != ']' || op[2] != a + 1)) return 1;
        for (unsigned j = 2; j < no - 1; j++)
            if (FF_UNLIKELY(buf[op[j]] != '{')) return 1;
        /* the separators inside the array are sp[ia..ib): how many come before `[` and `]` */
        ia = ib = 0;
        for (unsigned i = 0; i < nw; i++) {
            unsigned lo = 64 * i, ta = a > lo ? a - lo : 0, tb = b > lo ? b - lo : 0;
            ia += (unsigned)_mm_popcnt_u64(_bzhi_u64(seps[i], ta > 64 ? 64 : ta));
            ib += (unsigned)_mm_popcnt_u64(_bzhi_u64(seps[i], tb > 64 ? 64 : tb));
        }
    }
    if (FF_UNLIKELY(op[0] != 0 || ns == 0 || sp[ns - 1] != n - 1)) return 1;

    uint32_t seen = 0;
    uint64_t sig = 0;
    uint8_t vs[F_N], ve[F_N];
    unsigned prev = 0, nm = 0;
    for (unsigned j = 0; j < ns; j++) {
        j += j == ia ? ib - ia : 0; /* over the array: the `s` member's separator is sp[ib] */
        unsigned s = sp[j], k = prev + 1;
        uint64_t w = ff_load8(buf + k); /* k < 256: in the copy, zeros past the frame */
        unsigned len;
        int f = ff_key_compact(w, &len);
        unsigned v = k + len;
        /* a `}` only at the end (one in a string would end the object early) */
        if (FF_UNLIKELY((uint8_t)w != '"' || f < 0 || v >= s || (buf[s] == '}') != (j == ns - 1)))
            return 1;
        seen |= FF_BIT(f);
        nm++;
        sig = FF_SIG(sig, f);
        vs[f] = (uint8_t)v;
        ve[f] = (uint8_t)s;
        prev = s;
    }
    if (FF_UNLIKELY(nm != (unsigned)__builtin_popcount(seen))) return 1; /* a key repeated */
    /* the array is the value of `s`, all of it */
    if (no > 1 && (!(seen & FF_BIT(F_S)) || vs[F_S] != a || ve[F_S] != b + 1)) return 1;

    return ff_flat_values(d, rc, n, seen, vs, ve, sig, (ff_flat_array){sp, op + 2, ia, ib, no > 1 ? nb : 0, b});
}

FF_FLAT_TARGET static int ff_series_flat(ff_dec *d, int *rc)
{
    size_t n = (size_t)(d->end - d->start);
    assert(n >= 16 && n <= 256);
    if (n <= 128) return n <= 64 ? ff_series_flat_w(d, rc, 1) : ff_series_flat_w(d, rc, 2);
    return n <= 192 ? ff_series_flat_w(d, rc, 3) : ff_series_flat_w(d, rc, 4);
}

/* The vector units the structure-first paths use, best last (FF_SIMD_*, ff_dec.simd):
 * none of them; ff_message_flat_avx2; ff_message_flat (AVX-512 BW and VL); and
 * ff_series_flat too (VBMI2 besides).  What the CPU has is found at the first frame. */
static int ff_simd_cpu = -1;
static int ff_simd_check(void)
{
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("bmi") &&
               __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt");
    int avx512 = avx2 && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
    ff_simd_cpu = !avx2 ? FF_SIMD_NONE : !avx512 ? FF_SIMD_AVX2
                  : __builtin_cpu_supports("avx512vbmi2") ? FF_SIMD_AVX512VBMI2 : FF_SIMD_AVX512;
    return ff_simd_cpu;
}
/* ff_dec.simd for a decoder told to use at most FF_SIMD_* level `limit` (-1: no limit):
 * what the CPU has, or less (tests, FASTFEED_SIMD).  Chosen once, not per frame. */
static int ff_simd_for(int limit)
{
    int cpu = ff_simd_cpu >= 0 ? ff_simd_cpu : ff_simd_check();
    return (limit >= 0 && limit < cpu ? limit : cpu) + 1;
}

/* A frame of 16..256 bytes that begins with `{`, by the flat paths: FF_FLAT_TOOK (*rc is the
 * frame's outcome) or FF_FLAT_REFUSED (no row made; the general path reads it). */
static int ff_flat(ff_dec *d, int *rc, int simd)
{
    const uint8_t *p = d->start;
    size_t n = (size_t)(d->end - p);
    int refused = n <= 128 ? (simd >= FF_SIMD_AVX512 ? ff_message_flat(d, rc) : ff_message_flat_avx2(d, rc)) &&
                                 /* a short series (it holds `[`): ff_series_flat's shape */
                                 (!memchr(p, '[', n) || simd < FF_SIMD_AVX512VBMI2 || ff_series_flat(d, rc))
                           : ff_series_flat(d, rc);
    return refused ? FF_FLAT_REFUSED : FF_FLAT_TOOK;
}
#else
static int ff_simd_for(int limit)
{
    (void)limit;
    return FF_SIMD_NONE + 1;
}
#endif

/* this decoder's vector unit for the flat paths (FF_SIMD_*) */
static inline int ff_simd(ff_dec *d)
{
    return (FF_LIKELY(d->simd) ? d->simd : (d->simd = ff_simd_for(-1))) - 1;
}

/* One frame.  0: decoded (rows appended, and d->ncontrol counting the control messages
 * it held); -1: d->err says why (d->table_full when a table had no room), no row of this
 * frame remains and no table holds a code it added. */
static int ff_decode_frame(ff_dec *d, const uint8_t *p, size_t n, int64_t recv_ts)
{
    size_t t0 = d->ticks.len, q0 = d->quotes.len, b0 = d->bars.len;
    d->start = d->p = p;
    d->end = p + n;
    d->recv_ts = recv_ts;
    d->ncontrol = 0;
    d->table_full = 0;
    /* Learning costs a call per general parse: worth it while the learned bytes mostly match
     * (a steady stream, or one that just changed layout), not where keys come in any order.
     * There, where the flat paths take the frames, a frame learns when the same key order
     * came three frames running (and one in 256, as a backstop); elsewhere one in 16 learns,
     * enough to notice when the stream settles.  (One in 64 for all, before the keys' order
     * was known, left a mixed stream's compact bank that had gone poor 4x as long without its
     * learned bytes: 5% slower on the realistic mix.)  Decided per bank, by the last four
     * frames that took it: one odd frame (keys in another order) that unlearned some bytes
     * must not stop the frames after it from learning them back. */
    ff_litbank *B = NULL;
    int flat_able = 0; /* the flat paths could take this frame, were the learned bytes off */
    int simd = FF_SIMD_NONE;
    if (FF_LIKELY(n >= 16)) { /* shorter frames never try learned bytes: their 16-byte loads
                               * (ff_load16_upto) would reach outside the frame */
        unsigned cls = (p[5] == ' ') | (p[2] != 'c') << 1;
        unsigned idx = ((n < 256 ? (unsigned)n >> 4 : 15) << 2) | cls;
        /* A select, not a branch on whether the bank changed: where keys are shuffled the
         * first key, and so the bank, changes from frame to frame, and the branch missed
         * (3-5% of a shuffled frame); in a steady stream both measured the same. */
        B = d->bank = &d->banks[idx];
        int poor = (B->poor & 15) == 15;
        if (!poor) {
            d->learn = 1;
        } else if (B->flat == FF_FLAT_TOOK) {
            d->learn = B->flat_same >= 2 || (++B->nframes & 255) == 0;
            /* each flat frame of the same order again makes the next frame learn */
            if (B->flat_same >= 2) B->flat_same = 1;
        } else {
            d->learn = (++B->nframes & 15) == 0;
        }
        /* A poor bank whose last frame matched learned bytes tries them again: the stream may
         * be settling.  Not where a flat path can take the frame instead: there the keys'
         * order says so, and matches say little (every frame of a stream whose keys are
         * shuffled after a fixed first one matches the object's start, and its bars' too). */
        simd = ff_simd(d);
        flat_able = p[0] == '{' && (n <= 128 ? simd >= FF_SIMD_AVX2 : n <= 256 && simd >= FF_SIMD_AVX512VBMI2);
        d->lits_on = d->learn || (B->hits > 0 && (!flat_able || B->flat == FF_FLAT_REFUSED));
    } else {
        d->learn = d->lits_on = 0;
    }
    d->lit_hits = d->lit_misses = 0;
    ff_ws(d);
    int rc, flat = 0; /* FF_FLAT_TOOK, FF_FLAT_REFUSED, or 0: not tried */
    if (d->p >= d->end) {
        rc = ff_fail(d, d->p, "empty frame");
    } else if (*d->p == '{') {
#if defined(FF_HAVE_FLAT)
        if (flat_able && !d->lits_on && (flat = ff_flat(d, &rc, simd)) == FF_FLAT_REFUSED)
            d->p = p; /* (p[0] is the `{`: no whitespace before it) */
#endif
        if (flat != FF_FLAT_TOOK) rc = ff_message(d, 0);
    } else if (*d->p == '[') {
        /* An array of messages; each element that is not a message object is a control
         * message.  `[]` holds no message at all. */
        d->p++;
        ff_ws(d);
        rc = 0;
        if (d->p < d->end && *d->p == ']') {
            d->p++;
        } else {
            for (;;) {
                if (d->p < d->end && *d->p == '{') {
                    rc = ff_message(d, 1);
                } else {
                    d->ncontrol++;
                    rc = ff_skip(d, 1);
                }
                if (rc < 0) break;
                ff_ws(d);
                if (d->p >= d->end) {
                    rc = ff_fail(d, d->p, "unclosed array");
                    break;
                }
                if (*d->p == ',') {
                    d->p++;
                    ff_ws(d);
                    continue;
                }
                if (*d->p == ']') {
                    d->p++;
                    break;
                }
                rc = ff_fail(d, d->p, "expected ',' or ']'");
                break;
            }
        }
    } else {
        d->ncontrol = 1;
        rc = ff_skip(d, 0);
    }
    if (rc == 0) {
        ff_ws(d);
        if (d->p < d->end) rc = ff_fail(d, d->p, "trailing characters after the JSON value");
    }
    d->lit_hits_total += d->lit_hits;
    if (B) {
        B->hits = d->lit_hits;
        B->poor = (uint8_t)(B->poor << 1 | (d->lit_hits <= d->lit_misses));
        if (flat) B->flat = (uint8_t)flat;
        if (flat == FF_FLAT_TOOK) {
            B->flat_same = d->flat_sig == B->flat_sig ? (uint8_t)(B->flat_same + (B->flat_same < 255)) : 0;
            B->flat_sig = d->flat_sig;
        }
    }
    if (FF_UNLIKELY(d->npend)) {
        /* codes new to the tables go in only now that the whole frame is known good */
        if (rc == 0) rc = ff_commit(d);
        ff_pend_clear(d);
    }
    if (rc < 0) {
        d->ticks.len = t0;
        d->quotes.len = q0;
        d->bars.len = b0;
        d->ncontrol = 0;
    }
    return rc;
}

#endif
