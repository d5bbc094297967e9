"""How fast does each way of decoding the feed's JSON into arrays go?

A seeded, realistic corpus (70% ticks, 25% quotes, 5% one-bar series over a few
hundred symbols; ~60, ~100 and ~145 bytes per message), decoded in one run by:

- fastfeed's ``Decoder.decode`` (JSON to NumPy rows, exact timestamps);
- ``orjson.loads`` + filling the same structured arrays row by row (what a user
  would write without fastfeed);
- ``msgspec`` decoding each message to a Struct (decode only: no arrays);
- ``orjson.loads`` alone (decode only: dicts);
- a memory copy of the same bytes, for scale.

Each is timed over the whole corpus ``--repeat`` times; the table shows the
median, with "vs." ratios to fastfeed.  Benchmarks on a shared 2-core machine
are noisy: compare ratios within one run, not numbers across runs.

    python benchmarks/bench_decode.py [--messages N] [--repeat R] [--json]
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


_DECODER = Decoder()  # configure once, decode many: how the API is meant to be used


def fastfeed_decode(frames: list[bytes]) -> int:
    b = _DECODER.decode(frames, recv_ts=0)
    return len(b.ticks) + len(b.quotes) + len(b.bars)


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


def orjson_only(frames: list[bytes]) -> int:
    loads = orjson.loads
    for f in frames:
        loads(f)
    return len(frames)


_buffers: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def memcopy(frames: list[bytes]) -> int:
    """One copy of the corpus' bytes, contiguous, into memory already faulted in."""
    if id(frames) not in _buffers:
        src = np.frombuffer(b"".join(frames), np.uint8)
        _buffers[id(frames)] = (src, np.ones_like(src))
    src, dst = _buffers[id(frames)]
    np.copyto(dst, src)
    return len(dst)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--json", action="store_true", help="print results as JSON")
    args = ap.parse_args(argv)

    contenders = [("fastfeed", fastfeed_decode), ("orjson + fill arrays", orjson_fill)]
    try:
        contenders.append(("msgspec (decode only)", make_msgspec()))
    except ImportError:
        print("msgspec not installed: skipped", file=sys.stderr)
    contenders += [("orjson.loads (decode only)", orjson_only), ("memory copy", memcopy)]

    corpora = {
        "ticks": corpus(args.messages, (1.0, 0.0, 0.0)),
        "mixed": corpus(args.messages, (0.70, 0.25, 0.05)),
    }
    # Contenders run in turn within each repeat, so that a burst of load from
    # elsewhere on a shared machine hits all of them alike; medians per contender.
    results = []
    for cname, frames in corpora.items():
        nbytes = sum(map(len, frames))
        for _, fn in contenders:
            fn(frames[:2000])  # warm up caches and lazy imports
        times: dict[str, list[float]] = {name: [] for name, _ in contenders}
        for _ in range(args.repeat):
            for name, fn in contenders:
                t0 = time.perf_counter()
                fn(frames)
                times[name].append(time.perf_counter() - t0)
        for name, _ in contenders:
            t = statistics.median(times[name])
            results.append({
                "corpus": cname, "decoder": name, "ns_per_msg": t / len(frames) * 1e9,
                "msgs_per_s": len(frames) / t, "mb_per_s": nbytes / t / 1e6,
                "bytes_per_msg": nbytes / len(frames),
            })
    if args.json:
        print(json.dumps({"machine": machine(), "results": results}, indent=2))
        return 0
    print(f"machine: {machine()}")
    print(f"{args.messages} messages per corpus, median of {args.repeat} runs\n")
    print("| corpus | decoder | ns/msg | msgs/s | MB/s | vs. fastfeed |")
    print("|---|---|---:|---:|---:|---:|")
    for cname in corpora:
        rows = [r for r in results if r["corpus"] == cname]
        base = rows[0]["ns_per_msg"]
        for r in rows:
            label = f'{cname} ({r["bytes_per_msg"]:.0f} B/msg)'
            print(f'| {label} | {r["decoder"]} | {r["ns_per_msg"]:.1f} | {r["msgs_per_s"] / 1e6:.2f} M | '
                  f'{r["mb_per_s"]:.0f} | {r["ns_per_msg"] / base:.2f}x |')
    return 0


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import os

    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, NumPy {np.__version__}"


if __name__ == "__main__":
    sys.exit(main())
