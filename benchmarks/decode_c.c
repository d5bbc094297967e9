/* ff_decode_frame alone, for bench_decode_c.py: no Python objects, no NumPy arrays.
 *
 *     decode_c CORPUS PASSES
 *
 * CORPUS holds frames as <u32 little-endian length><bytes>.  Every pass decodes all of them
 * with one decoder (its tables and learned bytes stay warm across passes, as in a feed) and
 * empties the row arrays after each frame's rows are counted.  Prints one line:
 * frames, best ns/frame, median ns/frame, frames failed (last pass), rows (last pass).
 * Built by bench_decode_c.py against the decode.h of each revision it compares. */
#define PY_SSIZE_T_CLEAN
#include "decode.h"

#include <time.h>

static double now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static void *table(ff_symtab *t, uint32_t capacity, int reserve_empty)
{
    void *block = calloc(1, ff_symtab_nbytes(capacity));
    if (!block) return NULL;
    ff_symtab_init(block, capacity);
    ff_symtab_bind(t, block);
    if (reserve_empty) ff_symtab_intern(t, "", 0);
    return block;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s CORPUS PASSES\n", argv[0]);
        return 2;
    }
    int passes = atoi(argv[2]);
    if (passes < 1 || passes > 1000) {
        fprintf(stderr, "PASSES must be 1..1000\n");
        return 2;
    }
    FILE *f = fopen(argv[1], "rb");
    if (!f) {
        perror(argv[1]);
        return 1;
    }
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *buf = malloc(size > 0 ? (size_t)size : 1);
    if (!buf || fread(buf, 1, (size_t)size, f) != (size_t)size) {
        fprintf(stderr, "%s: cannot read\n", argv[1]);
        return 1;
    }
    fclose(f);

    /* the frames, laid end to end without their length prefixes, as in a ring */
    size_t nframes = 0, pos = 0, at = 0;
    while (pos + 4 <= (size_t)size) {
        uint32_t n;
        memcpy(&n, buf + pos, 4);
        if (pos + 4 + n > (size_t)size) break;
        pos += 4 + n;
        nframes++;
    }
    uint8_t *data = malloc(pos ? pos : 1);
    size_t *off = malloc((nframes + 1) * sizeof(size_t));
    if (!data || !off) return 1;
    pos = 0;
    for (size_t i = 0; i < nframes; i++) {
        uint32_t n;
        memcpy(&n, buf + pos, 4);
        memcpy(data + at, buf + pos + 4, n);
        off[i] = at;
        at += n;
        pos += 4 + n;
    }
    off[nframes] = at;
    free(buf);

    static ff_dec d; /* zeroed, as Decoder.__cinit__ does */
    d.ticks.itemsize = sizeof(ff_tick);
    d.quotes.itemsize = sizeof(ff_quote);
    d.bars.itemsize = sizeof(ff_bar);
    if (!table(&d.symbols, 65536, 0) || !table(&d.statuses, 256, 1) || !table(&d.bar_types, 4096, 1)) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }

    double *ns = malloc(passes * sizeof(double));
    size_t failed = 0, rows = 0;
    for (int k = 0; k < passes; k++) {
        failed = rows = 0;
        double t0 = now_ns();
        for (size_t i = 0; i < nframes; i++) {
            if (ff_decode_frame(&d, data + off[i], off[i + 1] - off[i], 0) < 0) failed++;
            /* a Decoder hands rows over per batch; keep the arrays small and warm */
            if (d.ticks.len + d.quotes.len + d.bars.len >= 4096) {
                rows += d.ticks.len + d.quotes.len + d.bars.len;
                d.ticks.len = d.quotes.len = d.bars.len = 0;
            }
        }
        ns[k] = (now_ns() - t0) / (nframes ? nframes : 1);
        rows += d.ticks.len + d.quotes.len + d.bars.len;
        d.ticks.len = d.quotes.len = d.bars.len = 0;
    }
    qsort(ns, passes, sizeof(double), cmp_double);
    printf("%zu %.2f %.2f %zu %zu\n", nframes, ns[0], ns[passes / 2], failed, rows);
    return 0;
}
