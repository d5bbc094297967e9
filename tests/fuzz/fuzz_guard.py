"""atheris fuzz target: the decoder reading frames that end where mapped memory ends.

Each input is copied so that its last byte is the last byte before a PROT_NONE page and
decoded from there without a copy (``decode`` of a memoryview, ``decode_region`` and
``decode_buffer``), so that a read even one byte past a frame's end faults at once; the
result is compared with tests/reference.py as fuzz_decoder.py does (error or not, control
frames, row counts).  Prefixes of the input (all of them for a short input, a sample of
a long one's) are placed at guard pages too and decoded in one ``decode_region`` call:
they must not crash, whatever they decode to.

Run it under the sanitizer build of the decoder (ASan + UBSan), built apart from the
normal one, with tests/fuzz/run_guard.sh, which CI uses too:

    bash tests/fuzz/run_guard.sh -runs=200000          # what CI runs
    nice -n 10 bash tests/fuzz/run_guard.sh -max_total_time=3600 -print_final_stats=1

That script copies the package to a scratch directory ($SAN), builds ``fastfeed._decoder``
there with the sanitizers but no sanitizer runtime linked, and runs this file with
atheris' own runtime (LLVM's ASan + UBSan, with libFuzzer) preloaded:

    cp -r setup.py pyproject.toml README.md ext fastfeed $SAN/ && rm -f $SAN/ext/*.c
    (cd $SAN && FASTFEED_SANITIZE=1 FASTFEED_SANITIZE_RUNTIME=preload \
        FASTFEED_ONLY=fastfeed._decoder python3 setup.py build_ext --inplace)
    PY=$(python3 -c 'import sys; print(sys.executable)')   # not a pyenv shim script
    env PYTHONPATH=$SAN FASTFEED_EXPECT_SANITIZED=1 \
        LD_PRELOAD=$($PY -c 'import atheris; print(atheris.path())')/asan_with_fuzzer.so \
        ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1 \
        UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
        $PY tests/fuzz/fuzz_guard.py -max_len=4096 $CORPUS [libFuzzer flags]

Python itself is not built with ASan, so the runtime must be preloaded; leak checking is
off because the interpreter never frees some memory by design.  GCC's runtime
(``LD_PRELOAD=$(gcc -print-file-name=libasan.so)``, with the module built by plain
``FASTFEED_SANITIZE=1``) finds the same bugs, but its stubs of libFuzzer's coverage
callbacks take precedence over libFuzzer's, so atheris gets no coverage and the corpus
collapses to one input: run_guard.sh uses it only when atheris' runtime is missing.
With ``FASTFEED_EXPECT_SANITIZED=1`` the target refuses to start unless the decoder it
imported really is the sanitized build.  Without the sanitizer it still runs: the guard
pages alone catch over-reads past a frame's end.
"""

import decimal
import os
import random
import sys
import zlib

import atheris

import fastfeed  # noqa: I001  (before the instrumented imports: numpy is not the target)
from fastfeed import Decoder

with atheris.instrument_imports():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    import reference

sys.path.insert(0, os.path.dirname(__file__))
import guardpage  # noqa: E402  (beside this file, not instrumented)

MAX_LEN = 1 << 16  # longer inputs are cut here
NPREFIX = 64       # prefixes decoded per input

DEC = Decoder(error_store=0)


def _primed(level: str) -> Decoder:
    dec = Decoder(error_store=0)
    dec._limit_simd(level)
    return dec


def _flat_levels() -> list[str]:
    from fastfeed._decoder import SIMD_LEVELS

    best = SIMD_LEVELS.index(DEC.simd)
    return list(SIMD_LEVELS[1:best + 1])


# Primed before each input (see _primers), one for each vector unit this CPU has, from AVX2
# up: each level has structure-first paths of its own (ext/decode.h, FF_SIMD_*).
FLATDECS = {level: _primed(level) for level in _flat_levels()}
FLATIN = dict.fromkeys(FLATDECS, 0)  # inputs each level's structure-first paths took
# Errors for the decoder's documented limits (a code over 65535 bytes, a full table).
LIMITS = ("code too long", "table full")
GUARD = guardpage.GuardedRegion(MAX_LEN)
SLOTS = guardpage.GuardedSlots(NPREFIX, MAX_LEN)


def sanitized(path: str) -> bool:
    """Whether the shared object at ``path`` was built with AddressSanitizer."""
    with open(path, "rb") as f:
        return b"__asan_report_load" in f.read()


def _prefix_lengths(data: bytes) -> list[int]:
    n = len(data)
    if n <= NPREFIX:
        return list(range(n))
    r = random.Random(zlib.crc32(data))  # the same input always gets the same sample
    tail = list(range(n - NPREFIX // 4, n))  # the last few cut points, always
    return sorted(set(tail + r.sample(range(n - NPREFIX // 4), NPREFIX - len(tail))))


def _reference(data: bytes) -> dict | None:
    try:
        return reference.decode([data], 0)
    except decimal.InvalidOperation:
        # A number whose exponent is beyond what a Decimal can hold at all (reference.fixed
        # takes Decimal(text) of a timestamp): the reference cannot judge the frame, so for
        # this input only the bounds (no crash, no sanitizer report) are checked.
        return None


FLAT = [0, 0]  # inputs so far; frames of decoders before DEC the flat paths took


def _full(dec: Decoder) -> bool:
    return len(dec.statuses) > 200 or len(dec.bar_types) > 4000 or len(dec.symbols) > 60000


def _decoder() -> Decoder:
    """DEC, or a fresh one when a table of it is nearly full: a frame that needs a new code
    in a full table fails, where the reference (no tables) accepts it (FLATDECS likewise)."""
    global DEC
    FLAT[0] += 1
    if FLAT[0] % 50_000 == 0:  # the run shows that the vector paths, where there are, ran
        by_level = ", ".join(f"{k} {v}" for k, v in FLATIN.items()) or "none: no AVX2"
        print(f"fuzz_guard: {FLAT[0]} inputs, {FLAT[1] + DEC._flat_frames} frames through "
              "the structure-first paths (ff_message_flat, ff_series_flat); inputs through "
              f"them on the primed decoders: {by_level}",
              file=sys.stderr, flush=True)
    if _full(DEC):
        FLAT[1] += DEC._flat_frames
        DEC = Decoder(error_store=0)
    for level, dec in FLATDECS.items():
        if _full(dec):
            FLATDECS[level] = _primed(level)
    return DEC


_ORDERS = {True: [("c", "t", "p", "v"), ("c", "v", "t", "p"), ("c", "p", "v", "t"), ("c", "t", "v", "p")],
           False: [("t", "c", "p", "v"), ("v", "p", "c", "t"), ("p", "t", "v", "c"), ("t", "v", "c", "p")]}
_PRIMERS: dict = {}


def _primers(data: bytes) -> list[bytes]:
    """Four valid ticks as long as data, beginning with `c` where data's third byte is one
    (the decoder's bank for data goes by its length and first bytes), in four key orders;
    none for data the structure-first paths never see (under 26 or over 256 bytes, or not
    beginning with `{`)."""
    n = len(data)
    if not 26 <= n <= 256 or data[:1] != b"{":
        return []
    key = (n, data[2:3] == b"c")
    if key not in _PRIMERS:
        vals = {"t": "1", "p": "2", "v": "3"}
        sym = "X" * (n - 26)
        _PRIMERS[key] = [("{" + ",".join(f'"{k}":' + (f'"{sym}"' if k == "c" else vals[k]) for k in order)
                          + "}").encode() for order in _ORDERS[key[1]]]
    return _PRIMERS[key]


def one_input(data: bytes) -> None:
    dec = _decoder()
    data = data[:MAX_LEN]
    n = len(data)
    view = GUARD.place(data)
    off = GUARD.offset(n)

    c0 = dec.control_total
    batch = dec.decode([view], recv_ts=0)
    ncontrol = dec.control_total - c0
    ref = _reference(data)
    got_error = bool(batch.errors)
    if got_error and any(lim in batch.errors[0][1] for lim in LIMITS):
        ref = None  # a limit of the decoder's that the reference does not have
    if ref is not None:
        assert got_error == bool(ref["errors"]), (data, batch.errors)
    if ref is not None and not got_error:
        assert batch.control == ref["control"], data
        assert ncontrol == ref["ncontrol"], (data, ncontrol)
        assert (len(batch.ticks), len(batch.quotes), len(batch.bars)) == (
            len(ref["ticks"]), len(ref["quotes"]), len(ref["bars"])), data
    primers = _primers(data)
    for level, flatdec in FLATDECS.items() if primers else ():
        # the same input on a decoder whose bank for it leaves it to the flat paths
        flatdec.decode(primers, recv_ts=0)
        f0 = flatdec._flat_frames
        flat = flatdec.decode([view], recv_ts=0)
        FLATIN[level] += flatdec._flat_frames - f0
        assert bool(flat.errors) == got_error, (data, flat.errors, batch.errors)
        if got_error and not any(lim in batch.errors[0][1] for lim in LIMITS):
            assert flat.errors[0][1] == batch.errors[0][1], (data, flat.errors, batch.errors)
        for a, b in ((flat.ticks, batch.ticks), (flat.quotes, batch.quotes), (flat.bars, batch.bars)):
            assert len(a) == len(b), data
            for name in a.dtype.names:  # ids aside: the two decoders' tables differ
                if name not in ("sym", "status", "bar_type"):
                    assert a[name].tobytes() == b[name].tobytes(), (data, name)
    again = dec.decode_region(GUARD.region, [off], [n], [0])
    assert bool(again.errors) == got_error, data
    assert (len(again.ticks), len(again.quotes), len(again.bars)) == (
        len(batch.ticks), len(batch.quotes), len(batch.bars)), data
    dec.decode_buffer(view, recv_ts=0)

    lengths = _prefix_lengths(data)
    offsets = [SLOTS.place(i, data[:k]) for i, k in enumerate(lengths)]
    dec.decode_region(SLOTS.memory, offsets, lengths, [0] * len(lengths))


# What this target found, each run first on a decoder of its own (a fresh one: some of
# them need one), before the fuzzing starts.
REGRESSIONS = [
    # the empty code as a fresh decoder's first new code: memcpy(dst, NULL, 0) when
    # committing it (UBSan: null pointer passed as a nonnull argument), symtab.h
    b'{"c":"","lt":1636014463309}',
    b'{"c":"","t":1,"p":2,"v":3}',
    b'[{"c":"","p":1}]',
]


def main() -> None:
    global DEC
    mod = sys.modules["fastfeed._decoder"].__file__
    if os.environ.get("FASTFEED_EXPECT_SANITIZED") == "1" and not sanitized(mod):
        sys.exit(f"fuzz_guard: {mod} is not the sanitizer build (fastfeed from {fastfeed.__file__})")
    print(f"fuzz_guard: decoder {mod} ({'sanitized' if sanitized(mod) else 'not sanitized'})",
          file=sys.stderr, flush=True)
    for data in REGRESSIONS:
        DEC = Decoder(error_store=0)
        one_input(data)
    DEC = Decoder(error_store=0)
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
