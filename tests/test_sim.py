"""The simulator on its own, checked with an independent client (the ``websockets`` library)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from decimal import Decimal

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from fastfeed.auth import login
from fastfeed.config import load_settings
from fastfeed.sim import Market, SimulatorProcess, parse_faults
from fastfeed.sim.market import TickStamper
from fastfeed.sim.server import POOL_FRAMES

from .conftest import ROOT

START = 1749462520.0


def feed_token(sim, tmp_path) -> str:
    s = load_settings(sim.settings_args(token_cache=str(tmp_path / "t.json")), env={})
    return login(s).value


def open_ws(sim, token, **kw):
    # max_queue=None: the sync client stops reading when its queue is full, which would
    # also keep it from seeing the server's close frame.
    return connect(sim.ws_url, additional_headers={"X-ZUMO-AUTH": token}, max_size=None,
                   max_queue=None, open_timeout=10, **kw)


def receive(ws, n, timeout=10.0):
    """The next ``n`` data frames (``pong`` texts are left out)."""
    out = []
    while len(out) < n:
        msg = ws.recv(timeout=timeout)
        if msg != "pong":
            out.append(msg if isinstance(msg, bytes) else msg.encode())
    return out


def expected_pool(seed=0, symbols=100, **faults):
    return Market(symbols, seed=seed, **faults).block(POOL_FRAMES, int(START * 1e6), 1).payloads


def test_first_line_json_counts_and_deterministic_frames(start_sim, tmp_path):
    sim = start_sim("--rate", "0", "--count", "5000", "--seed", "7", "--symbols", "20",
                    "--start-time", str(START))
    token = feed_token(sim, tmp_path)
    with open_ws(sim, token) as ws:
        ws.send(json.dumps({"email": "support@example.com"}))
        frames = receive(ws, 5000)
        # --count: no more data, but the connection stays up and answers pings.
        ws.send("ping")
        assert ws.recv(timeout=10) == "pong"
    assert frames == expected_pool(seed=7, symbols=20)[:5000]
    kinds = {"ticks": 0, "quotes": 0, "bars": 0}
    for f in frames:
        obj = json.loads(f)
        if "p" in obj:
            kinds["ticks"] += 1
        elif "s" in obj:
            kinds["bars"] += len(obj["s"])
        else:
            kinds["quotes"] += 1
    stats = sim.stop()
    assert stats["frames_sent"] == 5000 and stats["malformed"] == 0
    assert {k: stats[k] for k in kinds} == kinds
    assert stats["connections"] == 1 and stats["emails"] == 1
    assert stats["last_email"] == "support@example.com"
    assert stats["pings"] == 1 and stats["pongs_sent"] == 1


def test_frames_follow_the_protocol_formats(start_sim, tmp_path):
    sim = start_sim("--rate", "0", "--count", "3000", "--start-time", str(START))
    with open_ws(sim, feed_token(sim, tmp_path)) as ws:
        ws.send(json.dumps({"email": "a@example.com"}))
        frames = [json.loads(f) for f in receive(ws, 3000)]
    seen = set()
    for obj in frames:
        assert isinstance(obj["c"], str) and ":" in obj["c"]
        if "p" in obj:
            seen.add("tick")
            # six fraction digits, exactly as the provider sends them
            assert isinstance(obj["t"], float)
        elif "s" in obj:
            seen.add("bar")
            assert obj["bt"] == "1m" and isinstance(obj["lu"], int)
            assert all(set(b) == {"t", "o", "h", "l", "c", "v"} for b in obj["s"])
            assert all(b["l"] <= b["c"] <= b["h"] for b in obj["s"])
        else:
            seen.add("quote")
            assert obj["b"] <= obj["a"]
            if "ss" in obj:
                seen.add("ss")
                assert "lt" not in obj and "lp" not in obj
    assert seen == {"tick", "bar", "quote", "ss"}


def test_upgrade_without_valid_token_is_401(sim, tmp_path):
    for headers in ({}, {"X-ZUMO-AUTH": "garbage"}):
        with pytest.raises(InvalidStatus) as info:
            connect(sim.ws_url, additional_headers=headers, open_timeout=10)
        assert info.value.response.status_code == 401
    assert sim.stats()["upgrades_refused"] == 2


def test_refuse_tokens_fault_refuses_only_first_n(start_sim, tmp_path):
    sim = start_sim("--fault", "refuse-tokens=1")
    token = feed_token(sim, tmp_path)
    with pytest.raises(InvalidStatus):
        open_ws(sim, token)
    with open_ws(sim, token) as ws:
        ws.send(json.dumps({"email": "a@example.com"}))
        assert len(receive(ws, 3)) == 3


def test_email_must_come_first(sim, tmp_path):
    with open_ws(sim, feed_token(sim, tmp_path)) as ws:
        ws.send("ping")
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=10)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1008
    assert sim.stats()["protocol_errors"] == 1


def test_no_pong_fault_and_subscription(start_sim, tmp_path):
    sim = start_sim("--rate", "200", "--fault", "no-pong")
    with open_ws(sim, feed_token(sim, tmp_path)) as ws:
        ws.send(json.dumps({"email": "a@example.com"}))
        ws.send(json.dumps({"subscriptions": [{"code": "NASDAQ:AAPL", "type": "quote"}]}))
        ws.send("ping")
        msgs = [ws.recv(timeout=10) for _ in range(40)]
    assert "pong" not in msgs
    stats = sim.stats()
    assert stats["pings"] == 1 and stats["pongs_sent"] == 0
    assert stats["subscriptions"] == 1 and "NASDAQ:AAPL" in stats["last_subscription"]


def test_stall_fault_goes_silent(start_sim, tmp_path):
    sim = start_sim("--rate", "0", "--fault", "stall=100")
    with open_ws(sim, feed_token(sim, tmp_path)) as ws:
        ws.send(json.dumps({"email": "a@example.com"}))
        assert len(receive(ws, 100)) == 100
        ws.send("ping")
        with pytest.raises(TimeoutError):
            ws.recv(timeout=0.5)
    stats = sim.stats()
    assert stats["frames_sent"] == 100 and stats["stalls"] == 1 and stats["pongs_sent"] == 0


def test_drop_fault_loses_nothing(start_sim, tmp_path):
    sim = start_sim("--rate", "0", "--count", "2500", "--fault", "drop=1000",
                    "--start-time", str(START))
    token = feed_token(sim, tmp_path)
    got: list[bytes] = []
    for _ in range(3):
        with open_ws(sim, token) as ws:
            ws.send(json.dumps({"email": "a@example.com"}))
            try:
                while len(got) < 2500:
                    got.append(ws.recv(timeout=10).encode())
            except ConnectionClosed:
                pass
    assert got == expected_pool()[:2500]
    stats = sim.stop()
    assert stats["drops"] == 2 and stats["connections"] == 3 and stats["frames_sent"] == 2500


def test_fragment_malformed_arrays_and_rfc_pings(start_sim, tmp_path):
    faults = ("fragment=16", "malformed=0.1", "arrays=0.1", "ping-every=100")
    args = [a for f in faults for a in ("--fault", f)]
    sim = start_sim("--rate", "0", "--count", "2000", "--start-time", str(START), *args)
    with open_ws(sim, feed_token(sim, tmp_path)) as ws:
        ws.send(json.dumps({"email": "a@example.com"}))
        frames = receive(ws, 2000)
        ws.send("ping")  # by now the client has answered the RFC pings it received
        assert ws.recv(timeout=10) == "pong"
    assert frames == expected_pool(fragment=16, malformed=0.1, arrays=0.1,
                                   ping_every=100)[:2000]
    bad = arrays = 0
    for f in frames:
        try:
            obj = json.loads(f)
        except ValueError:
            bad += 1
            continue
        arrays += isinstance(obj, list)
    stats = sim.stop()
    assert bad == stats["malformed"] > 0 and arrays > 0
    assert stats["rfc_pongs"] == 20


def test_paced_rate_sends_count_frames(start_sim, tmp_path):
    sim = start_sim("--rate", "5000", "--count", "300")
    with open_ws(sim, feed_token(sim, tmp_path)) as ws:
        ws.send(json.dumps({"email": "a@example.com"}))
        frames = receive(ws, 300)
        with pytest.raises(TimeoutError):
            ws.recv(timeout=0.3)
    now = time.time()
    ts = [json.loads(f).get("t") for f in frames]
    # Paced frames carry the wall clock, not a replayed pool.
    assert all(now - 60 < t <= now + 1 for t in ts if t is not None)
    assert sim.stop()["frames_sent"] == 300


def test_http_routes(sim):
    import urllib.error
    import urllib.request
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(sim.url + "/nope", timeout=10)
    info.value.close()
    assert info.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(sim.url + "/.auth/login/aad", timeout=10)
    info.value.close()
    assert info.value.code == 405


def test_parse_faults():
    f = parse_faults(["drop=10", "no-pong", "stall", "refuse-tokens", "malformed=0.5"])
    assert (f.drop, f.no_pong, f.stall, f.refuse_tokens, f.malformed) == (10, True, 0, -1, 0.5)
    with pytest.raises(ValueError, match="unknown fault 'bogus'"):
        parse_faults(["bogus"])
    with pytest.raises(ValueError, match="bad value for fault 'malformed'"):
        parse_faults(["malformed=2"])
    assert parse_faults(["forbid"]).forbid and not parse_faults([]).forbid


def test_cli_sim_errors_are_one_line():
    r = subprocess.run([sys.executable, "-m", "fastfeed", "sim", "--fault", "bogus=1"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        r.stderr.strip()] and r.stderr.startswith("fastfeed: error: unknown fault 'bogus'")


def test_cli_sim_duration_exits_with_json():
    r = subprocess.run([sys.executable, "-m", "fastfeed", "sim", "--port", "0",
                        "--duration", "0.2", "--json"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("listening on http://127.0.0.1:")
    stats = json.loads(lines[-1])
    for key in ("frames_sent", "ticks", "quotes", "bars", "malformed", "connections"):
        assert stats[key] == 0


def test_simulator_process_reports_a_failed_start():
    with pytest.raises(RuntimeError, match="simulator did not start.*--symbols"):
        SimulatorProcess("--symbols", "0")


def _sim_settings(sim, tmp_path, **extra):
    """Settings that log in to an in-process simulator with its own credentials."""
    return load_settings({"host": sim.url, "authority": sim.url,
                          "tenant_id": "fastfeed-sim", "client_id": "fastfeed-sim",
                          "client_secret": "fastfeed-sim-secret", "scope": "a/.default",
                          "token_cache": str(tmp_path / "t.json"), **extra}, env={})


async def _registered_frames(ws_url, token, n, **connect):
    """The first n frames a simulator sends to a client that connects with the token and
    registers (the websockets library: a client independent of fastfeed)."""
    from websockets.asyncio.client import connect as aconnect

    async with aconnect(ws_url, additional_headers={"X-ZUMO-AUTH": token.value}, **connect) as ws:
        await ws.send('{"email":"x@example.com"}')
        return [await ws.recv() for _ in range(n)]


def test_simulator_in_process(tmp_path):
    """The embeddable API: Simulator in this process's event loop."""
    import asyncio

    from fastfeed.sim import SimConfig, Simulator

    async def main():
        sim = Simulator(SimConfig(rate=0, count=100, symbols=5))
        await sim.start()
        try:
            token = await asyncio.get_running_loop().run_in_executor(
                None, login, _sim_settings(sim, tmp_path))
            got = await _registered_frames(sim.url.replace("http", "ws") + "/ws", token, 100)
        finally:
            await sim.close()
        return got, sim.stats()

    got, stats = asyncio.run(main())
    assert len(got) == 100 and stats["frames_sent"] == 100 and stats["connections"] == 1
    assert {json.loads(g)["c"] for g in got} <= set(Market(5).codes)


def test_simulator_in_process_over_tls_with_an_independent_client(tmp_path):
    """TLS (tls_cert): the login with fastfeed's client and the WebSocket with the websockets
    library, both verifying the simulator's certificate against a CA made here; a client
    trusting another CA is refused at the handshake."""
    import asyncio
    import ssl

    trustme = pytest.importorskip("trustme")
    from websockets.asyncio.client import connect as aconnect

    from fastfeed.sim import SimConfig, Simulator

    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(
        str(tmp_path / "server.pem"))
    good = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    other = ssl.create_default_context()  # the system store: does not know this CA

    async def main():
        sim = Simulator(SimConfig(rate=0, count=100, symbols=5,
                                  tls_cert=str(tmp_path / "server.pem")))
        await sim.start()
        try:
            assert sim.url.startswith("https://")
            token = await asyncio.get_running_loop().run_in_executor(
                None, login, _sim_settings(sim, tmp_path, ca_file=str(tmp_path / "ca.pem")))
            ws_url = sim.url.replace("https", "wss") + "/ws"
            with pytest.raises(ssl.SSLCertVerificationError):
                async with aconnect(ws_url, ssl=other,
                                    additional_headers={"X-ZUMO-AUTH": token.value}):
                    pass
            got = await _registered_frames(ws_url, token, 100, ssl=good)
        finally:
            await sim.close()
        return got, sim.stats()

    got, stats = asyncio.run(main())
    assert len(got) == 100 and stats["frames_sent"] == 100 and stats["connections"] == 1


# -- --stamp-send ---------------------------------------------------------------------------

_TICK_T = re.compile(rb'"t":\d{10}\.\d{6},"p":')


def receive_timed(ws, n, timeout=10.0):
    """The next ``n`` data frames, each with the receive time in µs (CLOCK_REALTIME)."""
    out = []
    while len(out) < n:
        msg = ws.recv(timeout=timeout)
        now_us = time.time_ns() // 1000
        if msg != "pong":
            out.append((msg if isinstance(msg, bytes) else msg.encode(), now_us))
    return out


def tick_times_us(frame):
    """Every tick's "t" in a frame, exactly, in µs (Decimal: no float rounding)."""
    obj = json.loads(frame, parse_float=Decimal)
    objs = obj if isinstance(obj, list) else [obj]
    return [int(o["t"] * 1_000_000) for o in objs if "p" in o]


def rows_seen(frames):
    kinds = {"ticks": 0, "quotes": 0, "bars": 0}
    for f in frames:
        obj = json.loads(f)
        for o in obj if isinstance(obj, list) else [obj]:
            if "p" in o:
                kinds["ticks"] += 1
            elif "s" in o:
                kinds["bars"] += len(o["s"])
            else:
                kinds["quotes"] += 1
    return kinds


def check_send_stamps(timed, before_us, max_lag_us=1_000_000):
    ticks = 0
    for frame, recv_us in timed:
        for t_us in tick_times_us(frame):
            assert before_us <= t_us <= recv_us, (before_us, t_us, recv_us)
            assert recv_us - t_us < max_lag_us
            ticks += 1
    return ticks


def test_stamp_send_paced_live_ticks_carry_the_send_time(start_sim, tmp_path):
    sim = start_sim("--rate", "2000", "--count", "600", "--stamp-send")
    token = feed_token(sim, tmp_path)
    before_us = time.time_ns() // 1000
    with open_ws(sim, token) as ws:
        ws.send(json.dumps({"email": "a@example.com"}))
        timed = receive_timed(ws, 600)
    frames = [f for f, _ in timed]
    ticks = check_send_stamps(timed, before_us)
    assert ticks > 300
    # Generation stays deterministic: the same market as ever, only the times differ (here
    # bars and quotes carry the wall clock too, so every time is masked).
    def mask(f):
        return re.sub(rb'"lu":\d+', b"L", re.sub(rb"\d{10}\.\d{6}", b"T", f))
    payloads = Market(100).block(600, int(START * 1e6), 1).payloads
    assert [mask(f) for f in frames] == [mask(p) for p in payloads]
    stats = sim.stop()
    assert stats["frames_sent"] == 600
    assert {k: stats[k] for k in ("ticks", "quotes", "bars")} == rows_seen(frames)


@pytest.mark.parametrize("rate", ["50000", "0"])
def test_stamp_send_pool_ticks_carry_the_send_time(start_sim, tmp_path, rate):
    n = 20000 if rate != "0" else 2 * 4096 + 100  # rate 0: two full writes and a part
    sim = start_sim("--rate", rate, "--count", str(n), "--stamp-send",
                    "--start-time", str(START))
    token = feed_token(sim, tmp_path)
    before_us = time.time_ns() // 1000
    with open_ws(sim, token) as ws:
        ws.send(json.dumps({"email": "a@example.com"}))
        timed = receive_timed(ws, n)
    frames = [f for f, _ in timed]
    # Ticks carry the send time (the pool's are from START, long before before_us)...
    assert check_send_stamps(timed, before_us) == rows_seen(frames)["ticks"] > n // 2
    # ... and nothing else changed: every other byte, bar and quote times included, is the
    # pool's, so frame lengths and byte counts are too.
    pool = expected_pool()
    assert [_TICK_T.sub(b"T", f) for f in frames] == [_TICK_T.sub(b"T", p) for p in pool[:n]]
    stats = sim.stop()
    assert stats["frames_sent"] == n
    assert {k: stats[k] for k in ("ticks", "quotes", "bars")} == rows_seen(frames)


def test_pool_rate_without_stamp_send_sends_the_pool_times(start_sim, tmp_path):
    sim = start_sim("--rate", "50000", "--count", "5000", "--start-time", str(START))
    with open_ws(sim, feed_token(sim, tmp_path)) as ws:
        ws.send(json.dumps({"email": "a@example.com"}))
        frames = receive(ws, 5000)
    assert frames == expected_pool()[:5000]
    assert sim.stop()["frames_sent"] == 5000


def test_stamp_send_needs_unfragmented_frames():
    from fastfeed.sim import Faults, SimConfig, Simulator
    with pytest.raises(ValueError, match="unfragmented"):
        Simulator(SimConfig(stamp_send=True, faults=Faults(fragment=16)))
    with pytest.raises(RuntimeError, match="--stamp-send needs unfragmented frames"):
        SimulatorProcess("--stamp-send", "--fault", "fragment=16")


def test_tick_stamper_matches_an_in_place_patch():
    """TickStamper.stamped == the pool with its tick times overwritten, for any frame range;
    bar times ("t" then "o"), quotes' "lt", broken and array frames included."""
    import random

    import numpy as np
    block = Market(20, seed=3, arrays=0.3, malformed=0.1, ping_every=7, status_every=11).block(
        4000, int(START * 1e6), 1)
    stamper = TickStamper(block.data)
    offs = stamper.offsets
    assert len(offs) >= block.rows(0, len(block))[0] > 0
    assert all(block.data[o - 4:o] == b'"t":' and block.data[o + 17:o + 22] == b',"p":'
               for o in offs.tolist())
    us = 1_800_000_000_123_456
    stamp = np.frombuffer(b"1800000000.123456", dtype=np.uint8)
    rng = random.Random(1)
    for _ in range(200):
        i = rng.randrange(len(block))
        j = min(len(block), i + rng.choice((1, 2, 25, 1000)))
        a, b = int(block.offsets[i]), int(block.offsets[j])
        ref = bytearray(block.data)
        idx = offs[np.searchsorted(offs, a):np.searchsorted(offs, b)]
        np.frombuffer(ref, dtype=np.uint8)[idx[:, None] + np.arange(17)] = stamp
        assert bytes(stamper.stamped(a, b, us)) == bytes(ref[a:b])
    with pytest.raises(ValueError, match="not 17 bytes"):
        TickStamper(Market(5).block(10, 5_000_000, 1).data)


def test_write_interval_sends_smaller_bursts(start_sim, tmp_path):
    # 100 k frames/s written every 100 µs is 10 frames a write; the event loop's 1 ms timer
    # would make it about 100. The bound leaves room for sleeps overshooting on a busy machine.
    n = 30_000
    sim = start_sim("--rate", "100000", "--count", str(n), "--write-interval-us", "100")
    with open_ws(sim, feed_token(sim, tmp_path)) as ws:
        ws.send(json.dumps({"email": "a@example.com"}))
        t0 = time.monotonic()
        assert len(receive(ws, n, timeout=30)) == n
        elapsed = time.monotonic() - t0
    stats = sim.stop()
    assert stats["frames_sent"] == n and stats["data_writes"] >= n / 40, stats["data_writes"]
    assert elapsed > 0.2  # paced, not sent at once (0.3 s at the asked rate)


def test_write_interval_is_checked():
    r = subprocess.run([sys.executable, "-m", "fastfeed", "sim", "--write-interval-us", "-1"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "--write-interval-us must be between" in r.stderr
    assert "Traceback" not in r.stderr
