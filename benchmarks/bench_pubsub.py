"""bench_pubsub.py: messages per second from publish to decoded rows, through a broker.

For Redis Pub/Sub, Redis Streams and core NATS, two consumers receive the same ``--messages``
frames of the simulator's market (ticks, quotes and bars, ``--symbols`` symbols), in turn:

- **fastfeed**: ``Feed(source=URL, workers=W, output=False)``: the source process routes each
  message into a shared-memory ring, decoder workers turn the rings into NumPy arrays;
- **obvious client**: one process with the broker's own asyncio Python client (``redis`` with
  ``hiredis``; ``nats-py``), ``orjson.loads`` per message, rows appended to per-kind lists and
  turned into NumPy structured arrays every 10,000 messages (Streams: ``XREADGROUP`` of 1000
  entries and one ``XACK`` per batch, as for fastfeed).

Each broker is started by the benchmark on a free loopback port (``redis-server`` with the
Pub/Sub output-buffer limit lifted so that neither consumer is disconnected for lagging;
``nats-server``). The load generator writes pre-encoded protocol bytes (``PUBLISH``/``XADD``/
``PUB`` commands built before the clock starts) from a thread, so that publishing costs
almost no CPU. The clock runs from the first byte published to the moment the last message's
rows are decoded (fastfeed: the workers' counters; obvious client: its own count). Each
client runs ``--rounds`` times, interleaved with the other; the table shows the best and the
median.

    python benchmarks/bench_pubsub.py [--messages 200000] [--rounds 3] [--workers 1]
                                      [--only redis|stream|nats] [--write-results]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SECTION = "## Pub/sub (bench_pubsub.py)"
# Messages per conversion of the obvious client's row lists into arrays.
CHUNK = 10_000


# -- brokers -------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"broker on port {port} did not start")


def start_redis(work: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = _free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(work),
         "--save", "", "--appendonly", "no", "--client-output-buffer-limit", "pubsub 0 0 0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_port(port)
    return proc, port


def start_nats(work: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = _free_port()
    exe = shutil.which("nats-server") or "/usr/sbin/nats-server"
    # max_pending: let the server buffer a whole run for a lagging client instead of cutting
    # it off as a slow consumer (the benchmark measures consumers, not the server's policy).
    conf = work / "nats.conf"
    conf.write_text(f"listen: 127.0.0.1:{port}\nmax_pending: 1GB\nwrite_deadline: \"60s\"\n")
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _wait_port(port)
    return proc, port


# -- load generator ------------------------------------------------------------------------------

def frames(n: int, symbols: int, seed: int = 0) -> tuple[list[bytes], dict[str, int]]:
    from fastfeed.sim.market import KINDS, Market
    m = Market(symbols, seed=seed)
    block = m.block(n, int(time.time() * 1e6), 1)
    rows = dict(zip(KINDS, block.rows(0, n), strict=True))
    return block.payloads, rows


def wire(kind: str, payloads: list[bytes]) -> bytes:
    """Every publish command of a run, as the bytes a client would send."""
    if kind == "redis":
        return b"".join(b"*3\r\n$7\r\nPUBLISH\r\n$4\r\nfeed\r\n$%d\r\n%s\r\n" % (len(p), p)
                        for p in payloads)
    if kind == "stream":
        return b"".join(b"*5\r\n$4\r\nXADD\r\n$4\r\nfeed\r\n$1\r\n*\r\n$4\r\ndata\r\n$%d\r\n%s\r\n"
                        % (len(p), p) for p in payloads)
    return b"".join(b"PUB feed.x %d\r\n%s\r\n" % (len(p), p) for p in payloads)


def send(kind: str, port: int, data: bytes) -> threading.Thread:
    """Write ``data`` to the broker from a thread, draining (and discarding) its replies."""
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    if kind == "nats":
        s.recv(4096)  # INFO
        s.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\n')

    def drain() -> None:
        while True:
            try:
                chunk = s.recv(1 << 20)
            except OSError:
                return
            if not chunk:
                return
            if kind == "nats" and b"PING" in chunk:
                try:
                    s.sendall(b"PONG\r\n")
                except OSError:
                    return

    threading.Thread(target=drain, daemon=True).start()

    def run() -> None:
        view = memoryview(data)
        for i in range(0, len(view), 1 << 20):
            s.sendall(view[i:i + (1 << 20)])
        time.sleep(1.0)
        s.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t



# -- the obvious client --------------------------------------------------------------------------

def _obvious(kind: str, port: int, n: int, ready: Any, out: Any) -> None:
    import asyncio

    import numpy as np
    import orjson

    tick_dt = np.dtype([("sym", "<i4"), ("ts", "<i8"), ("price", "<f8"), ("volume", "<f8")])
    quote_dt = np.dtype([("sym", "<i4"), ("ts", "<i8"), ("last", "<f8"), ("volume", "<f8"),
                         ("bid", "<f8"), ("ask", "<f8"), ("bid_size", "<f8"),
                         ("ask_size", "<f8")])
    bar_dt = np.dtype([("sym", "<i4"), ("ts", "<i8"), ("open", "<f8"), ("high", "<f8"),
                       ("low", "<f8"), ("close", "<f8"), ("volume", "<f8")])
    syms: dict[str, int] = {}
    ticks: list[tuple[Any, ...]] = []
    quotes: list[tuple[Any, ...]] = []
    bars: list[tuple[Any, ...]] = []
    arrays: list[Any] = []
    nan = float("nan")
    state = {"msgs": 0, "rows": 0, "t_last": 0.0, "t_first": 0.0}

    def us(x: Any) -> int:
        return int(round(x * 1e6)) if x is not None else -(2**63)

    def one(d: dict[str, Any]) -> None:
        sym = syms.setdefault(d["c"], len(syms))
        if "s" in d or "bt" in d:
            for b in d["s"]:
                bars.append((sym, us(b["t"]), b["o"], b["h"], b["l"], b["c"], b["v"]))
        elif "p" in d:
            ticks.append((sym, us(d["t"]), d["p"], d["v"]))
        else:
            quotes.append((sym, us(d.get("lt")), d.get("lp", nan), d.get("v", nan),
                           d.get("b", nan), d.get("a", nan), d.get("bs", nan),
                           d.get("as", nan)))

    def flush() -> None:
        for rows, dt in ((ticks, tick_dt), (quotes, quote_dt), (bars, bar_dt)):
            if rows:
                arrays.append(np.array(rows, dtype=dt))
                state["rows"] += len(rows)
                rows.clear()

    def handle(data: bytes) -> bool:
        d = orjson.loads(data)
        if type(d) is list:
            for x in d:
                one(x)
        else:
            one(d)
        state["msgs"] += 1
        if state["msgs"] == 1:
            state["t_first"] = time.time()
        if state["msgs"] % CHUNK == 0:
            flush()
            arrays.clear()  # a real consumer hands them on
        if state["msgs"] >= n:
            flush()
            state["t_last"] = time.time()
            return True
        return False

    async def redis_pubsub() -> None:
        import redis.asyncio as aioredis
        r = aioredis.Redis(port=port)
        ps = r.pubsub(ignore_subscribe_messages=True)
        await ps.subscribe("feed")
        ready.set()
        async for msg in ps.listen():
            if msg["type"] == "message" and handle(msg["data"]):
                break
        await ps.aclose()
        await r.aclose()

    async def redis_stream() -> None:
        import redis.asyncio as aioredis
        r = aioredis.Redis(port=port)
        try:
            await r.xgroup_create("feed", "obvious", id="0", mkstream=True)
        except Exception:  # noqa: BLE001 - the group exists from an earlier run
            pass
        ready.set()
        done = False
        while not done:
            resp = await r.xreadgroup("obvious", "c1", {"feed": ">"}, count=1000, block=1000)
            for _, entries in resp or []:
                ids = []
                for entry_id, fields in entries:
                    ids.append(entry_id)
                    done = handle(fields[b"data"]) or done
                await r.xack("feed", "obvious", *ids)
        await r.aclose()

    async def nats_core() -> None:
        import nats
        nc = await nats.connect(f"nats://127.0.0.1:{port}")
        finished = asyncio.Event()

        async def cb(msg: Any) -> None:
            if handle(msg.data):
                finished.set()

        await nc.subscribe("feed.>", cb=cb, pending_msgs_limit=n * 2,
                           pending_bytes_limit=1 << 30)
        await nc.flush()
        ready.set()
        await finished.wait()
        await nc.close()

    import uvloop
    uvloop.run({"redis": redis_pubsub, "stream": redis_stream, "nats": nats_core}[kind]())
    out.put((state["msgs"], state["rows"], state["t_first"], state["t_last"]))


def preload(port: int, n: int, data: bytes) -> float:
    """Fill the stream before a Streams run; returns the XADD rate Redis sustained."""
    import redis
    r = redis.Redis(port=port)
    r.delete("feed")
    t0 = time.time()
    send("stream", port, data)
    while r.xlen("feed") < n:
        time.sleep(0.001)
    rate = n / (time.time() - t0)
    r.close()
    return rate


def run_obvious(kind: str, port: int, n: int, data: bytes) -> tuple[float, int]:
    ctx = mp.get_context("spawn")
    ready, out = ctx.Event(), ctx.Queue()
    p = ctx.Process(target=_obvious, args=(kind, port, n, ready, out))
    p.start()
    if not ready.wait(30):
        p.kill()
        raise RuntimeError("obvious client did not start")
    time.sleep(0.2)
    t0 = time.time()
    if kind != "stream":
        send(kind, port, data)
    msgs, rows, t_first, t_last = out.get(timeout=600)
    p.join(30)
    if kind == "stream":
        # A backlog: from the first message decoded to the last.
        return (msgs - 1) / (t_last - t_first), rows
    return msgs / (t_last - t0), rows


# -- fastfeed ------------------------------------------------------------------------------------

def run_fastfeed(kind: str, port: int, n: int, data: bytes, workers: int) -> tuple[float, int,
                                                                                     dict[str, Any]]:
    from fastfeed import Feed
    url = {"redis": f"redis://127.0.0.1:{port}/0?channel=feed",
           "stream": f"redis+stream://127.0.0.1:{port}/0?stream=feed&group=ff&start=0",
           "nats": f"nats://127.0.0.1:{port}?subject=feed.>"}[kind]
    with Feed(source=url, workers=workers, output=False, ring_capacity=1 << 25) as feed:
        c0 = 0
        if kind == "stream":
            # A backlog, consumed from the moment the source connects: from the first frames
            # decoded to the last.
            deadline = time.monotonic() + 30
            while (c0 := feed.frames_decoded()) == 0:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no frame decoded: {feed.stats()['session']}")
                time.sleep(0.0002)
            t0 = time.time()
        else:
            deadline = time.monotonic() + 30
            while feed.stats()["session"]["connects"] < 1:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"source did not connect: {feed.stats()['session']}")
                time.sleep(0.01)
            time.sleep(0.2)
            t0 = time.time()
            send(kind, port, data)
        deadline = time.monotonic() + 600
        while feed.frames_decoded() < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out: {feed.stats()['session']}")
            time.sleep(0.001)
        t1 = time.time()
        stats = feed.stats()
    rows = stats["ticks"] + stats["quotes"] + stats["bars"]
    return (n - c0) / (t1 - t0), rows, stats


# -- report --------------------------------------------------------------------------------------

def _dist(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


def versions() -> str:
    import hiredis
    import numpy
    import orjson
    import redis
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    rs = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
    rs = "redis-server " + rs.split("v=", 1)[1].split()[0] if "v=" in rs else "redis-server ?"
    ns = subprocess.run([shutil.which("nats-server") or "/usr/sbin/nats-server", "--version"],
                        capture_output=True, text=True).stdout
    return (f"{cpu}, {os.cpu_count()} logical CPUs, Linux {platform.release()}, "
            f"Python {platform.python_version()}, NumPy {numpy.__version__}, "
            f"redis-py {redis.__version__}, hiredis {hiredis.__version__}, "
            f"nats-py {_dist('nats-py')}, orjson {orjson.__version__}; "
            f"{rs}, {ns.strip() or 'nats-server ?'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=200_000)
    ap.add_argument("--symbols", type=int, default=100)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3, help="runs of each client (interleaved)")
    ap.add_argument("--only", choices=("redis", "stream", "nats"), action="append")
    ap.add_argument("--write-results", action="store_true",
                    help=f"replace the '{SECTION}' section of benchmarks/RESULTS.md")
    args = ap.parse_args()

    payloads, sent_rows = frames(args.messages, args.symbols)
    expected_rows = sent_rows["ticks"] + sent_rows["quotes"] + sent_rows["bars"]
    avg = sum(map(len, payloads)) / len(payloads)
    results = []
    xadd_rates: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench_pubsub.") as tmp:
        work = Path(tmp)
        rproc, rport = start_redis(work)
        nproc, nport = start_nats(work)
        try:
            for kind, label, port in (("redis", "Redis Pub/Sub", rport),
                                      ("stream", "Redis Streams", rport),
                                      ("nats", "NATS (core)", nport)):
                if args.only and kind not in args.only:
                    continue
                data = wire(kind, payloads)
                ffs, obs, ok = [], [], True
                for _ in range(args.rounds):
                    # Interleaved, so that a change in the machine's load hits both alike.
                    if kind == "stream":
                        xadd_rates.append(preload(rport, args.messages, data))
                    ob_rate, ob_rows = run_obvious(kind, port, args.messages, data)
                    if kind == "stream":
                        xadd_rates.append(preload(rport, args.messages, data))
                    ff_rate, ff_rows, _ = run_fastfeed(kind, port, args.messages, data,
                                                       args.workers)
                    ok = ok and ff_rows == expected_rows and ob_rows == expected_rows
                    ffs.append(ff_rate)
                    obs.append(ob_rate)
                    print(f"{label}: fastfeed {ff_rate / 1e3:.0f} k msg/s, obvious "
                          f"{ob_rate / 1e3:.0f} k msg/s, {ff_rate / ob_rate:.2f}x "
                          f"(rows {ff_rows}/{ob_rows}/{expected_rows})", file=sys.stderr)
                results.append((label, ffs, obs, ok))
        finally:
            for p in (rproc, nproc):
                p.send_signal(signal.SIGTERM)
                p.wait(20)

    lines = [SECTION, "",
             f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {versions()}.",
             f"{args.messages:,} messages of the simulator's market per run ({avg:.0f} bytes of "
             f"JSON on average, {args.symbols} symbols, {expected_rows:,} rows); fastfeed with "
             f"{args.workers} decoder worker(s); {args.rounds} runs of each client, "
             f"interleaved.", "",
             "| broker | fastfeed msgs/s (best / median) | obvious client msgs/s (best / "
             "median) | fastfeed vs. obvious (best / median) | rows decoded = published |",
             "|---|---:|---:|---:|---|"]
    ratios = []
    for label, ffs, obs, ok in results:
        best = max(ffs) / max(obs)
        med = statistics.median(ffs) / statistics.median(obs)
        ratios.append((label, best, med))
        lines.append(f"| {label} | {max(ffs) / 1e3:,.0f} k / {statistics.median(ffs) / 1e3:,.0f} k"
                     f" | {max(obs) / 1e3:,.0f} k / {statistics.median(obs) / 1e3:,.0f} k | "
                     f"{best:.1f}x / {med:.1f}x | {'yes' if ok else 'NO: MISMATCH'} "
                     f"({expected_rows:,} rows per run) |")
    if ratios:
        lowest = min(ratios, key=lambda r: r[2])
        lines += ["", "fastfeed decodes " + ", ".join(
            f"{label} at {med:.1f}x" for label, _, med in ratios)
            + " the rate of the obvious single-process client (medians; goal: at least 3x; "
            f"the lowest is {lowest[0]})."]
    lines += [
        "",
        "How to read this:",
        "",
        "- Both consumers run against the same broker process, one after the other, on the "
        "same frames. fastfeed is `Feed(source=URL, workers=N, output=False)`: the source "
        "process routes every message into a shared-memory ring, the workers decode the rings "
        "into NumPy arrays; its rate is taken from the workers' counters, so it counts rows "
        "decoded, not messages received. The obvious client is one process: the broker's "
        "asyncio client (`redis.asyncio` with hiredis, `nats-py`), `orjson.loads` per message, "
        "rows appended to per-kind lists and turned into NumPy structured arrays every "
        f"{CHUNK:,} messages.",
        "- Redis Pub/Sub and NATS are live: both consumers are subscribed before the clock "
        "starts, the clock runs from the first byte published to the last message decoded. "
        "The load generator writes pre-encoded `PUBLISH`/`PUB` commands from a thread, so "
        "publishing costs next to no CPU, and the brokers' per-client buffers are unlimited "
        "here, so a consumer that lags is measured at its own pace rather than cut off. The "
        "broker's own rate of taking in and fanning out messages bounds both figures: a "
        "live rate is at most what the broker sustains.",
        "- Redis Streams is a backlog: the stream is filled first "
        + (f"(Redis took the pipelined `XADD`s at {sum(xadd_rates) / len(xadd_rates) / 1e3:,.0f}"
           " k/s; live, with the same Redis serving both sides, a run would mostly measure "
           "that), " if xadd_rates else "")
        + "then each consumer reads it through its own consumer group (`XREADGROUP` of 1000, "
        "one `XACK` per batch after the rows are committed); the clock runs from the first "
        "message decoded to the last.",
        "- This is a 2-vCPU virtual machine shared with other work: the broker, the load "
        "generator, fastfeed's source process and its worker share the two cores (the obvious "
        "client is a single process). Redis Streams is the tightest: Redis itself spends about "
        "as much CPU per entry on `XREADGROUP` and `XACK` as fastfeed's source does, so the "
        "ratio moves with the load of the machine; figures move by tens of "
        "percent between runs, which is why each client runs several times, interleaved.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write_results:
        path = ROOT / "benchmarks" / "RESULTS.md"
        old = path.read_text()
        if SECTION in old:
            head, rest = old.split(SECTION, 1)
            nxt = rest.find("\n## ")
            tail = rest[nxt + 1:] if nxt >= 0 else ""
            new = head + text.rstrip("\n") + "\n" + ("\n" + tail if tail else "")
        else:
            new = old.rstrip("\n") + "\n\n\n" + text
        path.write_text(new)


if __name__ == "__main__":
    main()
