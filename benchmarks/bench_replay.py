"""How fast does a capture replay, next to the bare decoder on the same frames?

A seeded corpus (bench_decode's: 70% ticks, 25% quotes, 5% bars over a few hundred
symbols) is written as a two-file capture, as ``fastfeed record --workers 2`` writes it.
Then, in one run:

- the standalone ``Decoder.decode`` over the same frames, in batches of 4096 (the bound);
- ``Feed(replay=..., workers=W)`` at speed 0 for W = 0 (decoded in this process), 1 and 2,
  consuming every batch in this process, timed from the first batch to the last (start-up
  excluded: spawning and importing the processes, and the symbol-id index, which decodes
  the capture once in ``start()``; shown in its own column).

Ratios are replay frames/s over the decoder's. On a shared 2-core machine the replay's
processes (reader, workers, consumer) compete for the same two cores as everything else:
compare ratios within one run.

    python benchmarks/bench_replay.py [--frames N] [--repeat R] [--workers 0,1,2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decode import corpus  # noqa: E402

from fastfeed import Decoder  # noqa: E402
from fastfeed._listener import route_of  # noqa: E402
from fastfeed.capture import MAGIC, RECORD  # noqa: E402
from fastfeed.feed import Feed  # noqa: E402


def write_capture(directory: Path, frames: list[bytes], files: int = 2) -> list[int]:
    """The frames as a capture of ``files`` worker files (routed as the live run routes)."""
    outs = [open(directory / f"capture-w{i}.ffcap", "wb") for i in range(files)]  # noqa: SIM115
    seqs = [0] * files
    ts = []
    t = 1_749_462_520_000_000
    for f in outs:
        f.write(MAGIC)
    for p in frames:
        w = route_of(p) % files
        t += 1
        outs[w].write(RECORD.pack(len(p), w, t, seqs[w]) + p)
        seqs[w] += 1
        ts.append(t)
    for f in outs:
        f.close()
    return ts


def bench_decoder(frames: list[bytes], ts: list[int]) -> float:
    dec = Decoder()
    t0 = time.perf_counter()
    for i in range(0, len(frames), 4096):
        dec.decode(frames[i:i + 4096], recv_ts=ts[i:i + 4096])
    return time.perf_counter() - t0


def bench_replay(cap: Path, workers: int, n: int) -> tuple[float, float, int]:
    """(start-up s, replay s, frames) of one replay at speed 0. Start-up (spawning the
    processes, importing, the symbol-id index) ends when the first batch arrives; the
    replay is timed from there, over the frames after that first batch."""
    t_start = time.perf_counter()
    feed = Feed(replay=str(cap), workers=workers)
    feed.start()
    t0 = first = None
    try:
        for _b in feed:
            if t0 is None:
                t0 = time.perf_counter()
                first = feed.stats()["frames"]
        t1 = time.perf_counter()
        s = feed.stats()
    finally:
        feed.stop()
    assert s["frames"] == n and t0 is not None and first is not None, (s["frames"], n)
    return t0 - t_start, t1 - t0, n - first

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=500_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workers", default="0,1,2")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    frames = corpus(args.frames, (0.7, 0.25, 0.05))
    with tempfile.TemporaryDirectory(prefix="fastfeed-bench-replay-") as tmp:
        cap = Path(tmp)
        ts = write_capture(cap, frames)
        size = sum(os.path.getsize(f) for f in cap.glob("*.ffcap"))
        results: dict[str, dict[str, float]] = {}
        dec_s = statistics.median(bench_decoder(frames, ts) for _ in range(args.repeat))
        results["decoder"] = {"s": dec_s, "fps": args.frames / dec_s, "startup_s": 0.0}
        for w in (int(x) for x in args.workers.split(",")):
            runs = [bench_replay(cap, w, args.frames) for _ in range(args.repeat)]
            fps = statistics.median(r[2] / r[1] for r in runs)
            results[f"replay workers={w}"] = {
                "s": args.frames / fps, "fps": fps,
                "startup_s": statistics.median(r[0] for r in runs)}
    if args.json:
        print(json.dumps(results))
        return 0
    print(f"# replay of a {args.frames:,}-frame capture ({size / 1e6:.1f} MB, 2 files), "
          f"speed 0; median of {args.repeat}; {platform.python_version()}, "
          f"{os.cpu_count()} CPUs\n")
    print("| way | frames/s | vs. decoder | start-up s (excluded) |")
    print("|---|---:|---:|---:|")
    base = results["decoder"]["fps"]
    for name, r in results.items():
        print(f"| {name} | {r['fps'] / 1e6:.2f} M | {r['fps'] / base:.2f}x | "
              f"{r['startup_s']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
