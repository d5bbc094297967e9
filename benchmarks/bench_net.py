"""bench_net.py: how fast frames get from the simulator's socket into a client, on loopback.

One simulator (``fastfeed sim --rate 0``: pre-encoded ~60-byte tick frames as fast as the socket
takes them) runs in its own process; each client runs, in turn, in a fresh process of its own
and receives ``--frames`` data frames:

- **fastfeed session**: :class:`fastfeed.session.FeedSession` with its Cython listener, writing
  every frame into the shared-memory ring of its symbol (nobody reads the rings during the run:
  they are sized to hold every frame, and their pages are touched once beforehand, as a ring that
  has gone round once has);
- **picows, counting**: a plain picows client whose Python ``on_ws_frame`` only counts;
- **websockets**: the ``websockets`` library's asyncio client, ``async for`` over messages.

The TLS case: a second simulator serves ``wss://`` (``fastfeed sim --tls-cert``, with a CA made
for the run by trustme), and the fastfeed session and the counting picows client run against it
too, in the same rounds: the table shows what TLS costs each (``--no-tls`` skips it).

All run on uvloop with the same picows read buffer where that applies. Rates are frames
from the first data frame to the last, measured by a watcher that polls the count every
millisecond. Each client runs ``--rounds`` times, interleaved; the table shows the best and the
median.

    python benchmarks/bench_net.py [--frames 3000000] [--ws-frames 300000] [--rounds 3]
                                   [--rings 2] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# picows' initial read buffer for both picows-based clients: one size for a fair comparison.
READ_BUFFER = 1 << 20
# Bytes a ring record takes for a ~60-byte tick: 32-byte header + payload, 8-aligned.
RECORD_BYTES = 96


async def _watch(get_count: Any, n: int, timeout: float) -> tuple[int, float]:
    """Poll ``get_count()`` every ms; return (frames, seconds) from the first frame to ``n``."""
    deadline = time.perf_counter() + timeout
    while get_count() == 0:
        if time.perf_counter() > deadline:
            raise TimeoutError("no frame arrived")
        await asyncio.sleep(0.001)
    c0, t0 = get_count(), time.perf_counter()
    while True:
        await asyncio.sleep(0.001)
        c, t = get_count(), time.perf_counter()
        if c >= n or t > deadline:
            return c - c0, t - t0


def _client_fastfeed(settings: Any, ring_names: list[str], n: int, out: Any) -> None:
    import uvloop

    from fastfeed._ring import HEADER_SIZE, Ring
    from fastfeed.session import FeedSession

    rings = [Ring.attach(name) for name in ring_names]
    for r in rings:
        # Touch every page once (the data region is empty: nothing reads these bytes).
        ctypes.memset(r.address + HEADER_SIZE, 0, r.capacity)

    async def main() -> tuple[int, float]:
        session = FeedSession(settings, rings)
        task = asyncio.ensure_future(session.run())
        try:
            return await _watch(lambda: session.listener.frames + session.listener.ring_drops,
                                n, 120)
        finally:
            session.stop()
            await task
            out.put(("drops", session.listener.ring_drops))

    out.put(uvloop.run(main()))
    for r in rings:
        r.close()


def _client_picows(ws_url: str, token: str, n: int, ca_file: str | None, out: Any) -> None:
    import ssl

    import uvloop
    from picows import WSListener, WSMsgType, ws_connect

    class Counter(WSListener):  # the baseline: a Python on_ws_frame that only counts
        def __init__(self) -> None:
            self.n = 0

        def on_ws_frame(self, transport: Any, frame: Any) -> None:
            self.n += 1

    async def main() -> tuple[int, float]:
        ctx = ssl.create_default_context(cafile=ca_file) if ws_url.startswith("wss:") else None
        transport, listener = await ws_connect(
            Counter, ws_url, extra_headers={"X-ZUMO-AUTH": token}, ssl_context=ctx,
            read_buffer_init_size=READ_BUFFER)
        transport.send(WSMsgType.TEXT, b'{"email":"bench@example.com"}')
        try:
            return await _watch(lambda: listener.n, n, 120)
        finally:
            transport.disconnect()

    out.put(uvloop.run(main()))


def _client_websockets(ws_url: str, token: str, n: int, ca_file: str | None, out: Any) -> None:
    import uvloop
    from websockets.asyncio.client import connect

    async def main() -> tuple[int, float]:
        count = 0
        async with connect(ws_url, additional_headers={"X-ZUMO-AUTH": token}, max_size=None,
                           compression=None) as ws:
            await ws.send('{"email":"bench@example.com"}')

            async def consume() -> None:
                nonlocal count
                async for _ in ws:
                    count += 1

            task = asyncio.ensure_future(consume())
            try:
                return await _watch(lambda: count, n, 120)
            finally:
                task.cancel()

    out.put(uvloop.run(main()))


def _run(target: Any, *args: Any) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    res: dict[str, Any] = {"drops": 0}
    while True:
        item = q.get(timeout=300)
        if isinstance(item, tuple) and item and item[0] == "drops":
            res["drops"] = item[1]
            continue
        res["frames"], res["seconds"] = item
        break
    p.join(60)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=3_000_000,
                    help="frames per run for the picows-based clients")
    ap.add_argument("--ws-frames", type=int, default=300_000,
                    help="frames per run for the websockets client (it is much slower)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rings", type=int, default=2)
    ap.add_argument("--symbols", type=int, default=100)
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--no-tls", action="store_true", help="skip the wss:// rows")
    args = ap.parse_args()

    from fastfeed._listener import route_of
    from fastfeed._ring import Ring
    from fastfeed.auth import login
    from fastfeed.config import load_settings
    from fastfeed.sim import Market

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    tmp = tempfile.mkdtemp()
    tls_args: list[str] = []
    ca_file = None
    if not args.no_tls:
        try:
            import trustme
        except ImportError:
            print("trustme is not installed: no wss:// rows (pip install trustme)",
                  file=sys.stderr)
        else:
            ca = trustme.CA()
            ca_file = os.path.join(tmp, "ca.pem")
            ca.cert_pem.write_to_path(ca_file)
            cert = os.path.join(tmp, "server.pem")
            ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(cert)
            tls_args = ["--tls-cert", cert]

    def start_sim(extra: list[str]) -> tuple[subprocess.Popen[str], str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fastfeed", "sim", "--rate", "0", "--port", "0", "--mix",
             "1,0,0", "--symbols", str(args.symbols), "--json", *extra],
            stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        assert proc.stdout is not None
        return proc, proc.stdout.readline().split("listening on ", 1)[1].strip()

    def settings_for(url: str, name: str) -> Any:
        s = load_settings({
            "host": url, "authority": url, "tenant_id": "fastfeed-sim",
            "client_id": "fastfeed-sim", "client_secret": "fastfeed-sim-secret",
            "scope": "api://fastfeed-sim/.default", "email": "bench@example.com",
            "token_cache": os.path.join(tmp, name), "ca_file": ca_file if url.startswith(
                "https:") else None}, env={})
        TokenCache(s.token_cache).store(login(s))
        return s

    from fastfeed.auth import TokenCache
    sim, url = start_sim([])
    sims = [sim]
    settings = settings_for(url, "token.json")
    token = TokenCache(settings.token_cache).load()
    assert token is not None
    tls_settings = None
    if tls_args:
        tls_sim, tls_url = start_sim(tls_args)
        sims.append(tls_sim)
        tls_settings = settings_for(tls_url, "token-tls.json")

    # Size each ring for the share of symbols it carries, with room to spare.
    codes = Market(args.symbols, seed=0, mix=(1, 0, 0)).codes
    share = [0] * args.rings
    for c in codes:
        share[route_of(c) % args.rings] += 1
    caps = []
    for i in range(args.rings):
        need = int(args.frames * RECORD_BYTES * (share[i] / len(codes)) * 1.5) + (1 << 20)
        caps.append(1 << max(20, (need - 1).bit_length()))

    frames = Market(args.symbols, seed=0, mix=(1, 0, 0)).block(10000, int(time.time() * 1e6))
    sizes = [len(p) for p in frames.payloads]
    mean_size = statistics.mean(sizes)

    # name -> (client, frames, settings)
    clients: dict[str, tuple[Any, int, Any]] = {
        "fastfeed session -> rings": (_client_fastfeed, args.frames, settings),
        "picows, Python on_ws_frame counting": (_client_picows, args.frames, settings),
        "websockets (asyncio client)": (_client_websockets, args.ws_frames, settings),
    }
    if tls_settings is not None:
        clients["fastfeed session -> rings, wss://"] = (_client_fastfeed, args.frames,
                                                        tls_settings)
        clients["picows, Python on_ws_frame counting, wss://"] = (_client_picows, args.frames,
                                                                  tls_settings)
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in clients}
    try:
        for _ in range(args.rounds):
            for name, (fn, n, st) in clients.items():
                if fn is _client_fastfeed:
                    # Fresh, empty rings for every run.
                    tag = uuid.uuid4().hex[:6]
                    rings = [Ring.create(f"bench{tag}{i}", cap, full_policy="drop")
                             for i, cap in enumerate(caps)]
                    try:
                        res = _run(fn, st, [r.name for r in rings], n)
                    finally:
                        for r in rings:
                            r.close()
                            r.unlink()
                else:
                    tok = TokenCache(st.token_cache).load()
                    assert tok is not None
                    res = _run(fn, st.ws_url, tok.value, n,
                               str(st.ca_file) if st.ca_file else None)
                res["rate"] = res["frames"] / res["seconds"]
                results[name].append(res)
                print(f"  {name}: {res['rate'] / 1e6:.3f} M frames/s", file=sys.stderr)
    finally:
        outs = []
        for p in sims:
            p.terminate()
            outs.append(p.communicate(timeout=30)[0])
        sim_out = outs[0]

    base = max(r["rate"] for r in results["picows, Python on_ws_frame counting"])
    rows = []
    for name, runs in results.items():
        rates = [r["rate"] for r in runs]
        best = max(rates)
        rows.append({"client": name, "best": best, "median": statistics.median(rates),
                     "frames": runs[0]["frames"], "drops": sum(r["drops"] for r in runs),
                     "vs_picows": best / base})
    tls_cost = {}
    for plain, tls in (("fastfeed session -> rings", "fastfeed session -> rings, wss://"),
                       ("picows, Python on_ws_frame counting",
                        "picows, Python on_ws_frame counting, wss://")):
        if tls in results:
            best = {r["client"]: r["best"] for r in rows}
            tls_cost[plain] = best[tls] / best[plain]
    if args.json:
        print(json.dumps({"rows": rows, "mean_frame_bytes": mean_size, "tls_over_plain": tls_cost},
                         indent=2))
        return
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import picows
    import uvloop
    import websockets
    print(f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {cpu}, "
          f"{os.cpu_count()} logical CPUs, Linux {platform.release()}, Python "
          f"{platform.python_version()}, picows {picows.__version__}, uvloop "
          f"{uvloop.__version__}, websockets {websockets.__version__}.")
    print(f"Frames: ticks, {mean_size:.1f} bytes of JSON on average; {args.symbols} symbols; "
          f"{args.rings} rings; best and median of {args.rounds} runs.\n")
    print("| client | frames per run | best frames/s | median frames/s | MB/s (best) | "
          "ring drops | vs. picows counting |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = r["vs_picows"]
        vs = "1" if abs(ratio - 1) < 1e-9 else (
            f"{ratio:.2f}x" if ratio >= 1 else f"{ratio:.2f}x ({1 / ratio:.1f}x slower)")
        print(f"| {r['client']} | {r['frames']:,} | {r['best'] / 1e6:.2f} M | "
              f"{r['median'] / 1e6:.2f} M | {r['best'] * mean_size / 1e6:.0f} | {r['drops']} | "
              f"{vs} |")
    ff = rows[0]["best"]
    ws = rows[2]["best"]  # the first three rows are the plain ws:// clients
    print(f"\nfastfeed session: {ff / base:.0%} of the counting picows client, "
          f"{ff / ws:.1f}x the websockets client.")
    for name, ratio in tls_cost.items():
        print(f"TLS (wss:// vs ws://, same run): {name} keeps {ratio:.0%} of its plain rate.")
    stats = json.loads([ln for ln in sim_out.splitlines() if ln.startswith("{")][-1])
    print(f"Simulator: {stats['frames_sent']:,} frames sent in all, "
          f"{stats['connections']} connections.")


if __name__ == "__main__":
    main()
