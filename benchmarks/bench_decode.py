"""How fast does each way of decoding the feed's JSON into arrays go, on every kind and layout?

A seeded corpus per kind over 400 symbols: ticks (~60 B), quotes (~104 B), one-bar series
(~145 B), and a realistic mix (70% ticks, 25% quotes, 5% series), each in four layouts:

- ``compact``: the provider's documented layout (no whitespace, keys in its order);
- ``spaced``: ``", "`` and ``": "``;
- ``sorted``: every object's keys in alphabetical order (``json.dumps(sort_keys=True)``: a
  sender whose serializer has its own fixed order);
- ``reordered``: every object's keys shuffled, each message anew (a sender that serializes
  a hash map with a random seed per map: the worst case, where no key order repeats);
- ``pretty``: newlines and an indent of 2;

and, for the mix, ``realistic``: a quarter of the frames spaced, a tenth reordered.

Decoded in one run, by each contender in turn on a fifth of every corpus before the next
fifth (so that a burst of load from elsewhere, or a slower minute on a shared machine, hits
every contender and every layout alike), by:

- fastfeed's ``Decoder.decode`` (JSON to NumPy rows, exact timestamps), one decoder per
  corpus (a stream);
- ``orjson.loads`` + filling the same structured arrays row by row (what a user would write
  without fastfeed);
- ``msgspec`` decoding each message to a Struct (decode only: no arrays).

The table gives ns per message (medians) and the ratios: how many times fewer ns fastfeed
takes than each of the others, and how its time on a layout compares with compact (and, for
scale, msgspec's on the same layout against its own compact: what a layout costs a decoder
that dispatches on keys).  A second
table gives bytes per second of ``decode_region`` against a plain ``memchr`` + ``memcpy`` pass
over the same frames (benchmarks/_loops.pyx, built by ``setup.py build_ext --inplace``): the
distance to the memory limit.  Benchmarks on a shared 2-core machine are noisy: compare ratios
within one run, not numbers across runs.

    python benchmarks/bench_decode.py [--messages N] [--repeat R] [--kinds ticks,mixed] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time

import numpy as np
import orjson

from fastfeed import BAR_DTYPE, QUOTE_DTYPE, TICK_DTYPE, Decoder

EXCHANGES = ["NASDAQ", "NYSE", "ARCA", "BATS", "LSE", "XETRA"]


def corpus(n: int, mix: tuple[float, float, float], seed: int = 1) -> list[bytes]:
    """n frames; mix = shares of (ticks, quotes, series)."""
    r = random.Random(seed)
    syms = sorted({f"{r.choice(EXCHANGES)}:{''.join(r.choices('ABCDEFGHIJKLMNOPQRSTUVWXYZ', k=r.randint(2, 5)))}" for _ in range(400)})
    px = {s: r.uniform(5, 900) for s in syms}
    t = 1_749_462_520_000_000
    out = []
    for _ in range(n):
        s = r.choice(syms)
        px[s] = max(0.01, px[s] + r.gauss(0, 0.05))
        p = round(px[s], 2)
        t += r.randint(0, 2000)
        sec, us = divmod(t, 1_000_000)
        roll = r.random()
        if roll < mix[0]:
            m = f'{{"c":"{s}","t":{sec}.{us:06d},"p":{p},"v":{r.randint(1, 50) * 100}.0}}'
        elif roll < mix[0] + mix[1]:
            m = (f'{{"c":"{s}","lt":{sec}.0,"v":{r.randint(1000, 9_000_000)}.0,"lp":{p},'
                 f'"a":{p + 0.01:.2f},"b":{p:.2f},"as":{r.randint(1, 99) * 10}.0,"bs":{r.randint(1, 99) * 10}.0}}')
        else:
            bs = sec - sec % 60
            m = (f'{{"c":"{s}","be":{bs + 59}.0,"lu":{t // 1000},"bt":"1m","s":[{{"t":{bs}.0,'
                 f'"o":{p:.2f},"h":{p + 0.2:.2f},"l":{p - 0.2:.2f},"c":{p:.2f},"v":{r.randint(1000, 900000)}.0}}]}}')
        out.append(m.encode())
    return out


def make_fastfeed():
    """One Decoder per stream, configured once and decoding many: how the API is meant to be
    used (a feed's worker keeps one decoder for its stream)."""
    dec = Decoder()

    def fastfeed_decode(frames: list[bytes]) -> int:
        b = dec.decode(frames, recv_ts=0)
        return len(b.ticks) + len(b.quotes) + len(b.bars)

    return fastfeed_decode


def orjson_fill(frames: list[bytes]) -> int:
    """The obvious client: orjson, then one structured-array row per message."""
    n = len(frames)
    ticks = np.empty(n, TICK_DTYPE)
    quotes = np.empty(n, QUOTE_DTYPE)
    bars = np.empty(n, BAR_DTYPE)
    syms: dict[str, int] = {}
    types: dict[str, int] = {"": 0}
    nan = float("nan")
    nt = nq = nb = 0
    for f in frames:
        m = orjson.loads(f)
        sym = syms.setdefault(m["c"], len(syms))
        if "s" in m:
            bt = types.setdefault(m.get("bt", ""), len(types))
            be = round(m["be"] * 1_000_000)
            lu = m["lu"] * 1000
            for x in m["s"]:
                bars[nb] = (sym, bt, round(x["t"] * 1_000_000), be, lu, x["o"], x["h"], x["l"], x["c"], x["v"], 0)
                nb += 1
        elif "p" in m:
            ticks[nt] = (sym, round(m["t"] * 1_000_000), m["p"], m["v"], 0)
            nt += 1
        else:
            lt = m.get("lt")
            quotes[nq] = (sym, 0, round(lt * 1_000_000) if lt is not None else -(2**63),
                          m.get("lp", nan), m.get("v", nan), m.get("b", nan), m.get("a", nan),
                          m.get("bs", nan), m.get("as", nan), 0)
            nq += 1
    return nt + nq + nb


def make_msgspec():
    import msgspec

    # Built at run time so that msgspec stays optional; annotations are real
    # objects here (no string forward references), which msgspec needs.
    opt = float | None
    Bar = msgspec.defstruct("Bar", [(k, opt, None) for k in "tohlcv"])
    Msg = msgspec.defstruct(
        "Msg",
        [("c", str)]
        + [(k, opt, None) for k in ("t", "p", "v", "lt", "lp", "a", "b", "as", "bs", "be")]
        + [("lu", int | None, None), ("ss", str | None, None), ("bt", str | None, None),
           ("s", list[Bar] | None, None)],
    )
    dec = msgspec.json.Decoder(Msg)

    def msgspec_decode(frames: list[bytes]) -> int:
        d = dec.decode
        for f in frames:
            d(f)
        return len(frames)

    return msgspec_decode


LAYOUTS = ("compact", "spaced", "sorted", "reordered", "pretty")
KINDS = {"ticks": (1.0, 0.0, 0.0), "quotes": (0.0, 1.0, 0.0), "bars": (0.0, 0.0, 1.0),
         "mixed": (0.70, 0.25, 0.05)}


def relayout(frames: list[bytes], layout: str, seed: int = 2) -> list[bytes]:
    """The same messages in another layout: ``spaced`` (``", "`` and ``": "``), ``sorted`` (keys
    in alphabetical order), ``reordered`` (each object's keys shuffled anew), ``pretty``
    (newlines, indent 2), or ``realistic`` (a quarter of the frames spaced, a tenth reordered,
    the rest compact).  Number texts are kept as
    they are (floats print the shortest text that reads back the same value)."""
    r = random.Random(seed)

    def shuffle(v):
        if isinstance(v, dict):
            items = list(v.items())
            r.shuffle(items)
            return {k: shuffle(x) for k, x in items}
        if isinstance(v, list):
            return [shuffle(x) for x in v]
        return v

    def one(f: bytes, how: str) -> bytes:
        v = json.loads(f)
        if how == "compact":
            return json.dumps(v, separators=(",", ":")).encode()
        if how == "spaced":
            return json.dumps(v, separators=(", ", ": ")).encode()
        if how == "sorted":
            return json.dumps(v, separators=(",", ":"), sort_keys=True).encode()
        if how == "reordered":
            return json.dumps(shuffle(v), separators=(",", ":")).encode()
        if how == "pretty":
            return json.dumps(v, indent=2).encode()
        raise ValueError(how)

    if layout == "realistic":
        out = []
        for f in frames:
            x = r.random()
            out.append(one(f, "spaced" if x < 0.25 else "reordered" if x < 0.35 else "compact"))
        return out
    return [one(f, layout) for f in frames]


def corpora(kinds: list[str], layouts: list[str], n: int):
    """(kind, layout, frames) for each kind in each layout (``realistic``: the mix only), a
    kind's messages the same in every layout: what bench_decode_c and bench_decode_ab time."""
    for kind in kinds:
        base = corpus(n, KINDS[kind])
        for layout in layouts:
            if layout != "realistic" or kind == "mixed":
                yield kind, layout, relayout(base, layout)


def time_all(cases: dict[str, list[bytes]], contenders: list, repeat: int,
             chunks: int = 5) -> dict[tuple[str, str], float]:
    """Median seconds per (case, contender) over ``repeat`` rounds.  ``contenders``: (name,
    factory) pairs; each case gets its own instance (a stream, its own decoder), run once
    over the whole case first to warm up.  A round takes every case in ``chunks`` slices
    and runs slice i of every case by every contender before slice i + 1, so that a burst
    of load from elsewhere on a shared machine, or a slower minute, hits all of them alike:
    both the ratios between contenders and those between layouts hold."""
    fns = {(c, n): make() for c in cases for n, make in contenders}
    for (case, _), fn in fns.items():
        fn(cases[case])  # warm up caches, lazy imports, and the decoder's learned bytes
    times: dict[tuple[str, str], list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        total = dict.fromkeys(fns, 0.0)
        for i in range(chunks):
            for case, frames in cases.items():
                part = frames[len(frames) * i // chunks:len(frames) * (i + 1) // chunks]
                for name, _ in contenders:
                    fn = fns[case, name]
                    t0 = time.perf_counter()
                    fn(part)
                    total[case, name] += time.perf_counter() - t0
        for k, t in total.items():
            times[k].append(t)
    return {k: statistics.median(ts) for k, ts in times.items()}


def bytes_pass(frames: list[bytes], repeat: int) -> dict[str, float] | None:
    """Seconds (medians) for the decoder's ``decode_region`` over frames laid end to end in one
    buffer (as the workers read a ring) and for a plain memchr + memcpy pass over the same
    frames (benchmarks/_loops.pyx); None when that module is not built."""
    try:
        import _loops  # benchmarks/ is sys.path[0] when this runs as a script
    except ImportError:
        return None
    data = b"".join(frames)
    lengths = np.array([len(f) for f in frames], np.int64)
    offsets = np.zeros(len(frames), np.int64)
    np.cumsum(lengths[:-1], out=offsets[1:])
    stamps = np.zeros(len(frames), np.int64)
    out = bytearray(len(data))
    dec = Decoder()
    dec.decode_region(data, offsets, lengths, stamps)
    fns = [("decoder", lambda: dec.decode_region(data, offsets, lengths, stamps)),
           ("memchr + memcpy", lambda: _loops.scan_copy(data, offsets, lengths, out))]
    times: dict[str, list[float]] = {name: [] for name, _ in fns}
    for _ in range(repeat):
        for name, fn in fns:
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {"bytes": len(data), **{k: statistics.median(v) for k, v in times.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=50_000, help="messages per corpus")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset of " + ",".join(KINDS))
    ap.add_argument("--json", action="store_true", help="print results as JSON")
    args = ap.parse_args(argv)

    contenders = [("fastfeed", make_fastfeed), ("orjson + arrays", lambda: orjson_fill)]
    try:
        make_msgspec()
        contenders.append(("msgspec", make_msgspec))
    except ImportError:
        print("msgspec not installed: skipped", file=sys.stderr)

    results = []
    cases = [(k, lay) for k in args.kinds.split(",") for lay in LAYOUTS]
    if "mixed" in args.kinds.split(","):
        cases.append(("mixed", "realistic"))
    base_frames = {k: corpus(args.messages, KINDS[k]) for k in args.kinds.split(",")}
    for kind in base_frames:
        layouts = [lay for k, lay in cases if k == kind]
        frames = {lay: relayout(base_frames[kind], lay) for lay in layouts}
        t = time_all(frames, contenders, args.repeat)
        for lay in layouts:
            nbytes = sum(map(len, frames[lay]))
            n = len(frames[lay])
            row = {"kind": kind, "layout": lay, "bytes_per_msg": nbytes / n}
            for name, _ in contenders:
                row[name] = t[lay, name] / n * 1e9
            results.append(row)
    passes = []
    for layout in (*LAYOUTS, "realistic"):
        if "mixed" not in base_frames:
            break
        bp = bytes_pass(relayout(base_frames["mixed"], layout), args.repeat)
        if bp is None:
            print("benchmarks/_loops not built (python3 setup.py build_ext --inplace): "
                  "bytes/s pass skipped", file=sys.stderr)
            break
        passes.append({"layout": layout, "decoder_gb_s": bp["bytes"] / bp["decoder"] / 1e9,
                       "memchr_memcpy_gb_s": bp["bytes"] / bp["memchr + memcpy"] / 1e9})
    if args.json:
        print(json.dumps({"machine": machine(), "results": results, "bytes_per_s": passes}, indent=2))
        return 0
    print(f"machine: {machine()}")
    print(f"{args.messages} messages per corpus, median of {args.repeat} rounds\n")
    names = [n for n, _ in contenders]
    head = "| kind | layout | B/msg | " + " | ".join(f"{n} ns/msg" for n in names)
    head += " | vs. orjson + arrays | vs. msgspec | vs. compact | msgspec vs. its compact |" \
        if "msgspec" in names else " | vs. orjson + arrays | vs. compact |"
    print(head)
    print("|---|---|" + "---:|" * (head.count("|") - 3))
    compact = {(r["kind"], n): r[n] for r in results if r["layout"] == "compact" for n in names}
    for r in results:
        cells = [r["kind"], r["layout"], f'{r["bytes_per_msg"]:.0f}'] + [f"{r[n]:.0f}" for n in names]
        cells.append(f'{r["orjson + arrays"] / r["fastfeed"]:.1f}x')
        if "msgspec" in names:
            cells.append(f'{r["msgspec"] / r["fastfeed"]:.1f}x')
        for n in ("fastfeed", "msgspec") if "msgspec" in names else ("fastfeed",):
            base = compact.get((r["kind"], n))
            cells.append(f"{r[n] / base:.2f}x" if base else "-")
        print("| " + " | ".join(cells) + " |")
    if passes:
        print("\nBytes per second over the mixed corpus laid end to end in one buffer (`decode_region`, "
              "as the workers read a ring), against a plain memchr + memcpy pass over the same frames:\n")
        print("| layout | decoder GB/s | memchr + memcpy GB/s | share of the memory pass |")
        print("|---|---:|---:|---:|")
        for p in passes:
            print(f'| {p["layout"]} | {p["decoder_gb_s"]:.2f} | {p["memchr_memcpy_gb_s"]:.2f} | '
                  f'{p["decoder_gb_s"] / p["memchr_memcpy_gb_s"]:.0%} |')
    return 0


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import os

    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, NumPy {np.__version__}, "
            f"decoder's vector unit {Decoder().simd} (FASTFEED_SIMD caps it)")


if __name__ == "__main__":
    sys.exit(main())
