"""End to end: the simulator in its own process, the whole pipeline against the obvious client.

(a) Throughput with zero loss: the simulator at rate 0 sends N frames; we time from the
    first frame received to the last row handed to the consumer, for
    - fastfeed (session process + rings + W decoder workers, rows to this process),
    - the obvious single-process client: picows with a Python ``on_ws_frame`` that does
      ``orjson.loads`` and fills the same NumPy structured arrays row by row.
(b) Latency at fixed rates (10 k, 100 k, 500 k frames/s): frame receipt (the receive
    stamp taken in the network process) to rows handed to the consumer in this
    process, p50/p99/p99.9, with sleeping workers (default) and busy-polling ones.

    python benchmarks/bench_e2e.py [--frames N] [--json]

Benchmarks on a shared 2-core machine are noisy: read ratios within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from typing import Any

import numpy as np
import orjson

from fastfeed import BAR_DTYPE, QUOTE_DTYPE, TICK_DTYPE
from fastfeed.config import load_settings
from fastfeed.feed import Feed
from fastfeed.sim.process import SimulatorProcess


def settings(sim: SimulatorProcess, tmp: str) -> Any:
    return load_settings(sim.settings_args(token_cache=os.path.join(tmp, "token.json")), env={})


def run_fastfeed(n: int, workers: int, tmp: str) -> dict[str, Any]:
    with SimulatorProcess("--rate", "0", "--count", str(n)) as sim:
        feed = Feed(settings(sim, tmp), workers=workers)
        rows = 0
        first = None
        with feed:
            last = time.perf_counter()
            while True:
                b = feed.poll(timeout=0.05)
                now = time.perf_counter()
                if b is not None:
                    if first is None:
                        first = now
                    rows += len(b.ticks) + len(b.quotes) + len(b.bars)
                    last = now
                s = feed.stats()
                if s["frames"] >= n and rows >= s["ticks"] + s["quotes"] + s["bars"]:
                    break
                if first is not None and now - last > 5:
                    break  # rows were lost (counted below): do not wait forever
            t = last - (first or last)
            s = feed.stats()
        sent = sim.stop()
    lost = sent["ticks"] + sent["quotes"] + sent["bars"] - rows
    return {"frames": s["frames"], "seconds": t, "rate": s["frames"] / t, "lost_rows": lost,
            "dropped": s["dropped"]}


class _NaiveClient:
    """picows + orjson + row-by-row array filling, in one process (what a user would write)."""

    def __init__(self, n: int) -> None:
        self.n = n
        cap = n + 16
        self.ticks = np.empty(cap, TICK_DTYPE)
        self.quotes = np.empty(cap, QUOTE_DTYPE)
        self.bars = np.empty(cap * 2, BAR_DTYPE)
        self.nt = self.nq = self.nb = 0
        self.frames = 0
        self.first = 0.0
        self.last = 0.0
        self.syms: dict[str, int] = {}
        self.done = asyncio.Event()

    def on_frame(self, payload: bytes) -> None:
        if payload == b"pong":
            return
        if not self.frames:
            self.first = time.perf_counter()
        now = time.time_ns() // 1000
        nan = float("nan")
        m = orjson.loads(payload)
        sym = self.syms.setdefault(m["c"], len(self.syms))
        if "s" in m:
            be = round(m["be"] * 1e6) if m.get("be") is not None else -(2**63)
            lu = m["lu"] * 1000 if m.get("lu") is not None else -(2**63)
            for x in m["s"]:
                self.bars[self.nb] = (sym, 0, round(x["t"] * 1e6), be, lu, x["o"], x["h"], x["l"], x["c"], x["v"], now)
                self.nb += 1
        elif "p" in m:
            self.ticks[self.nt] = (sym, round(m["t"] * 1e6), m["p"], m["v"], now)
            self.nt += 1
        else:
            lt = m.get("lt")
            self.quotes[self.nq] = (sym, 0, round(lt * 1e6) if lt is not None else -(2**63),
                                    m.get("lp", nan), m.get("v", nan), m.get("b", nan),
                                    m.get("a", nan), m.get("bs", nan), m.get("as", nan), now)
            self.nq += 1
        self.frames += 1
        if self.frames >= self.n:
            self.last = time.perf_counter()
            self.done.set()


def run_naive(n: int, tmp: str) -> dict[str, Any]:
    import picows

    from fastfeed.auth import Authenticator

    with SimulatorProcess("--rate", "0", "--count", str(n)) as sim:
        st = settings(sim, tmp)
        token = Authenticator(st).get_token()
        client = _NaiveClient(n)

        class Listener(picows.WSListener):
            def on_ws_connected(self, transport: Any) -> None:
                transport.send(picows.WSMsgType.TEXT, json.dumps({"email": "bench@example.com"}).encode())

            def on_ws_frame(self, transport: Any, frame: Any) -> None:
                if frame.msg_type == picows.WSMsgType.TEXT:
                    client.on_frame(frame.get_payload_as_bytes())

        async def main() -> None:
            transport, _ = await picows.ws_connect(
                Listener, st.ws_url, extra_headers={"X-ZUMO-AUTH": token.value})
            await asyncio.wait_for(client.done.wait(), 300)
            transport.disconnect()

        import uvloop

        uvloop.run(main())
        sim.stop()
    t = client.last - client.first
    return {"frames": client.frames, "seconds": t, "rate": client.frames / t, "lost_rows": 0, "dropped": 0}


def run_latency(rate: int, seconds: float, busy: bool, tmp: str) -> dict[str, Any]:
    with SimulatorProcess("--rate", str(rate)) as sim:
        feed = Feed(settings(sim, tmp), workers=1, busy_poll=busy)
        with feed:
            # let the connection settle before recording
            t_end = time.monotonic() + 1.0
            while time.monotonic() < t_end:
                feed.poll(timeout=0.01)
            feed._latency.__init__()
            t_end = time.monotonic() + seconds
            while time.monotonic() < t_end:
                feed.poll(timeout=0.01)
            s = feed.stats()
        sim.stop()
    return {"rate": rate, "busy_poll": busy, "rows": feed._latency.total, **s["latency_us"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=1_000_000)
    ap.add_argument("--latency-seconds", type=float, default=4.0)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--only", choices=("throughput", "latency"), help="run one part")
    args = ap.parse_args(argv)
    out: dict[str, Any] = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"}
    thr: dict[str, Any] = {}
    lat: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.only != "latency":
            thr["fastfeed, 1 worker"] = run_fastfeed(args.frames, 1, tmp)
            thr["fastfeed, 2 workers"] = run_fastfeed(args.frames, 2, tmp)
            thr["picows + orjson + arrays (1 process)"] = run_naive(args.frames, tmp)
        if args.only != "throughput":
            lat = [run_latency(r, args.latency_seconds, busy, tmp)
                   for r in (10_000, 100_000, 500_000) for busy in (False, True)]
    out["throughput"] = thr
    out["latency"] = lat
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"machine: {out['machine']}; {args.frames:,} frames per throughput run\n")
    if thr:
        base = thr["picows + orjson + arrays (1 process)"]["rate"]
        print("| client | frames/s | lost rows | dropped | vs. picows + orjson |")
        print("|---|---:|---:|---:|---:|")
        for name, r in thr.items():
            print(f"| {name} | {r['rate'] / 1e6:.2f} M | {r['lost_rows']} | {r['dropped']} | {r['rate'] / base:.2f}x |")
    print("\n| rate (frames/s) | workers wait by | rows | p50 µs | p99 µs | p99.9 µs | max µs |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in lat:
        print(f"| {r['rate']:,} | {'busy-poll' if r['busy_poll'] else 'sleeping'} | {r['rows']:,} | "
              f"{r['p50']} | {r['p99']} | {r['p999']} | {r['max']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
