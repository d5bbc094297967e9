"""The network session against the real simulator (and an independent ``websockets`` server),
writing into real shared-memory rings."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import uuid
from collections import defaultdict

import pytest
import uvloop
from websockets.asyncio.server import serve

from fastfeed._listener import FeedListener, route_of
from fastfeed._ring import Ring
from fastfeed.auth import Token, TokenCache, login
from fastfeed.backoff import Backoff
from fastfeed.config import load_settings
from fastfeed.session import COUNTERS, FeedSession, SessionProcess
from fastfeed.sim import Market
from fastfeed.sim.server import POOL_FRAMES

from .conftest import SIM_SECRET

START = 1749462520.0


@pytest.fixture
def rings():
    made: list[Ring] = []

    def make(n: int = 2, capacity: int = 1 << 22, policy: str = "wait") -> list[Ring]:
        tag = uuid.uuid4().hex[:8]
        rs = [Ring.create(f"t{tag}{i}", capacity, full_policy=policy) for i in range(n)]
        made.extend(rs)
        return rs

    yield make
    for r in made:
        r.close()
        r.unlink()


def drain(rs: list[Ring]) -> list[list[tuple[bytes, int, int]]]:
    """Every record left in each ring: (payload, recv_ts, route)."""
    out: list[list[tuple[bytes, int, int]]] = []
    for r in rs:
        got: list[tuple[bytes, int, int]] = []
        while (b := r.read_batch(timeout=0)) is not None:
            with b:
                ts, routes = b.recv_ts.tolist(), b.routes.tolist()
                got.extend((bytes(b.frame(i)), ts[i], routes[i]) for i in range(len(b)))
        out.append(got)
    return out


def wait_until(cond, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def session_settings(sim, tmp_path, **extra):
    # A generous heartbeat by default: a loaded CI machine must not turn a slow pong into a
    # reconnect in tests that count connections. Heartbeat tests set their own.
    args = {"token_cache": str(tmp_path / "token.json"), "heartbeat_interval": 2.0,
            "backoff_first": 0.01, "backoff_cap": 0.05}
    args.update(extra)
    return load_settings(sim.settings_args(**args), env={})


def pool(**kw):
    return Market(100, seed=0, **kw).block(POOL_FRAMES, int(START * 1e6), 1).payloads


def code_of(payload: bytes) -> str:
    obj = json.loads(payload)
    return (obj[0] if isinstance(obj, list) else obj)["c"]


def check_rings(per_ring, expected, n_rings):
    """Every expected frame is in the ring of its symbol, in sent order, and nothing else."""
    want: dict[int, list[bytes]] = defaultdict(list)
    for p in expected:
        want[route_of(code_of(p)) % n_rings].append(p)
    for i, got in enumerate(per_ring):
        assert [p for p, _, _ in got] == want[i], f"ring {i}"
        for p, _, route in got:
            assert route == route_of(code_of(p))


def test_route_of_matches_the_scan():
    codes = ["NASDAQ:AAPL", "NYSE:BX", "ARCA:X"]
    routes = [route_of(c) for c in codes]
    assert len(set(routes)) == 3 and all(0 <= r < 2**31 for r in routes)
    assert route_of(b"NASDAQ:AAPL") == routes[0]


def _frame(payload: bytes, msg_type=None, fin: bool = True):
    from picows import WSMsgType
    from picows.picows import _make_test_ws_frame
    return _make_test_ws_frame(WSMsgType.TEXT if msg_type is None else msg_type, payload, fin,
                               False)


def test_listener_routing_control_and_fragments(rings):
    """The Cython listener alone, fed picows test frames: where each kind of frame goes."""
    from picows import WSMsgType

    rs = rings(3)
    controls: list[bytes] = []
    lst = FeedListener([r.address for r in rs], keepalive=rs, on_control=controls.append)
    assert all(r.producer_pid == os.getpid() for r in rs)
    data = [
        b'{"c":"NASDAQ:AAPL","t":1749462520.177003,"p":242.89,"v":200.0}',
        # pretty-printed, and the bar's "c" (a number) comes before the symbol's
        b'{\n  "s" : [ {"t":1.0,"o":1,"h":1,"l":1,"c" : 2.5,"v":1} ],\n  "c" : "NYSE:BX"\n}',
        b'[{"c":"ARCA:X","p":1.0,"t":1},{"c":"ARCA:X","p":2.0,"t":2}]',
        b'{"c":"NASDAQ:TSLA","t":17494',  # malformed: still data, the decoder records it
    ]
    for p in data:
        lst.on_ws_frame(None, _frame(p))
    lst.on_ws_frame(None, _frame(b"pong"))
    lst.on_ws_frame(None, _frame(b'{"status":"ok","message":"hello"}'))
    lst.on_ws_frame(None, _frame(b'{"c":42}'))  # "c" but no string: not a symbol
    # One message in three frames.
    whole = b'{"c":"NASDAQ:MSFT","p":1.5,"t":3}'
    lst.on_ws_frame(None, _frame(whole[:4], fin=False))
    lst.on_ws_frame(None, _frame(whole[4:10], WSMsgType.CONTINUATION, fin=False))
    lst.on_ws_frame(None, _frame(whole[10:], WSMsgType.CONTINUATION, fin=True))
    assert lst.stats() == {"frames": 5, "bytes": sum(map(len, data)) + len(whole),
                           "ring_drops": 0, "control": 2, "pongs": 1, "fragmented": 1,
                           "too_big": 0, "connections": 0, "pauses": 0,
                           "backpressure_ns": 0, "backlog": 0}
    assert lst.last_pong_ns > 0
    assert controls == [b'{"status":"ok","message":"hello"}', b'{"c":42}']
    codes = ["NASDAQ:AAPL", "NYSE:BX", "ARCA:X", "NASDAQ:TSLA", "NASDAQ:MSFT"]
    expected = [(p, route_of(c)) for p, c in zip([*data, whole], codes, strict=True)]
    per_ring = drain(rs)
    for i, got in enumerate(per_ring):
        assert [(p, r) for p, _, r in got] == [e for e in expected if e[1] % 3 == i]
    # Receive times are CLOCK_REALTIME microseconds.
    now = time.time_ns() // 1000
    assert all(now - 60_000_000 < t <= now for got in per_ring for _, t, _ in got)


def test_listener_counts_ring_drops(rings):
    rs = rings(1, capacity=1024, policy="drop")
    lst = FeedListener([rs[0].address], keepalive=rs)
    big = b'{"c":"NASDAQ:AAPL","x":"' + b"y" * 200 + b'"}'  # larger than 1024/8 - 32
    small = b'{"c":"NASDAQ:AAPL"}'
    lst.on_ws_frame(None, _frame(big))
    for _ in range(100):
        lst.on_ws_frame(None, _frame(small))
    assert lst.ring_drops > 1 and lst.frames + lst.ring_drops == 101
    assert rs[0].dropped == lst.ring_drops and rs[0].dropped_oversize == 1


def test_backoff_is_capped_jittered_and_resets():
    b = Backoff(0.1, 1.0, 30.0)
    delays = [b.next() for _ in range(8)]
    assert 0.05 <= delays[0] <= 0.1
    assert all(d <= 1.0 for d in delays) and max(delays) >= 0.5
    assert b.next(healthy_for=31.0) <= 0.1


def test_listener_needs_rings():
    with pytest.raises(ValueError):
        FeedListener([])


def test_frames_reach_rings_by_symbol_in_order(start_sim, rings, tmp_path):
    sim = start_sim("--rate", "0", "--count", "30000", "--start-time", str(START),
                    "--fault", "status-every=1000")
    rs = rings(3)
    sub = json.dumps({"subscriptions": [{"code": "NASDAQ:AAPL", "type": "quote"}]})
    s = session_settings(sim, tmp_path, subscription=sub)
    before = time.time_ns() // 1000
    with SessionProcess(s, [r.name for r in rs]) as proc:
        wait_until(lambda: proc.counters()["frames"] >= 30000, what="30000 frames")
        wait_until(lambda: proc.counters()["control"] >= 30, what="status messages")
        c = proc.counters()
    after = time.time_ns() // 1000
    assert proc.exitcode == 0 and proc.error is None
    assert c["frames"] == 30000 and c["ring_drops"] == 0 and c["control"] == 30
    assert all(r.producer_pid == proc.pid for r in rs)
    assert c["connects"] == 1 and c["reconnects"] == 0 and c["auth_renewals"] == 1
    per_ring = drain(rs)
    check_rings(per_ring, pool(status_every=1000)[:30000], 3)
    for got in per_ring:
        ts = [t for _, t, _ in got]
        assert all(before <= t <= after for t in ts) and ts == sorted(ts)
    stats = sim.stats()
    assert stats["emails"] == 1 and stats["protocol_errors"] == 0  # the email came first
    assert stats["last_email"] == "support@example.com"
    assert stats["subscriptions"] == 1 and "NASDAQ:AAPL" in stats["last_subscription"]
    assert stats["control_sent"] == 30


def test_reconnect_after_drops_loses_and_repeats_nothing(start_sim, rings, tmp_path):
    sim = start_sim("--rate", "0", "--count", "20000", "--start-time", str(START),
                    "--fault", "drop=6000")
    rs = rings(2)
    s = session_settings(sim, tmp_path, subscription='{"subscriptions": []}')
    with SessionProcess(s, [r.name for r in rs]) as proc:
        wait_until(lambda: proc.counters()["frames"] >= 20000, what="20000 frames")
        wait_until(lambda: sim.stats()["subscriptions"] == 4, what="4 subscriptions")
        c = proc.counters()
    assert c["frames"] == 20000 and c["reconnects"] == 3 and c["connects"] == 4
    check_rings(drain(rs), pool()[:20000], 2)
    stats = sim.stop()
    assert stats["drops"] == 3 and stats["connections"] == 4
    # Email then subscription again on every connection.
    assert stats["emails"] == 4 and stats["subscriptions"] == 4
    assert stats["protocol_errors"] == 0


def test_fragmented_messages_and_rfc_pings(start_sim, rings, tmp_path):
    sim = start_sim("--rate", "0", "--count", "5000", "--start-time", str(START),
                    "--fault", "fragment=9", "--fault", "ping-every=500")
    rs = rings(2)
    with SessionProcess(session_settings(sim, tmp_path), [r.name for r in rs]) as proc:
        wait_until(lambda: proc.counters()["frames"] >= 5000, what="5000 frames")
        wait_until(lambda: sim.stats()["rfc_pongs"] == 10, what="10 RFC pongs")
        c = proc.counters()
    assert c["fragmented"] == 5000 and c["frames"] == 5000
    check_rings(drain(rs), pool(fragment=9, ping_every=500)[:5000], 2)


def test_malformed_and_array_frames_go_to_rings(start_sim, rings, tmp_path):
    sim = start_sim("--rate", "0", "--count", "4000", "--start-time", str(START),
                    "--fault", "malformed=0.05", "--fault", "arrays=0.05")
    rs = rings(2)
    with SessionProcess(session_settings(sim, tmp_path), [r.name for r in rs]) as proc:
        wait_until(lambda: proc.counters()["frames"] >= 4000, what="4000 frames")
        c = proc.counters()
    assert c["frames"] == 4000 and c["control"] == 0
    per_ring = drain(rs)
    got = [p for ring in per_ring for p, _, _ in ring]
    expected = pool(malformed=0.05, arrays=0.05)[:4000]
    assert sorted(got) == sorted(expected)
    assert sim.stop()["malformed"] > 0


@pytest.mark.parametrize("fault", ["no-pong", "stall=50"])
def test_missing_pongs_mean_a_dead_connection(start_sim, rings, tmp_path, fault):
    sim = start_sim("--rate", "500", "--fault", fault)
    rs = rings(1)
    s = session_settings(sim, tmp_path, heartbeat_interval=0.2)
    with SessionProcess(s, [r.name for r in rs]) as proc:
        wait_until(lambda: proc.counters()["reconnects"] >= 2, what="2 reconnects")
        c = proc.counters()
    assert c["heartbeat_timeouts"] >= 2 and c["frames"] > 0
    stats = sim.stop()
    assert stats["connections"] >= 3 and stats["pings"] >= 4
    if fault == "no-pong":
        assert c["pongs"] == 0
    else:
        # Data and pongs flowed until the stall; then silence, detected the same way.
        assert stats["stalls"] >= 2 and stats["frames_sent"] >= 100


def test_pongs_keep_the_connection(start_sim, rings, tmp_path):
    sim = start_sim("--rate", "200")
    rs = rings(1)
    # Pings every 50 ms, but only 2.5 s without a pong counts as dead: not timing-sensitive.
    with SessionProcess(session_settings(sim, tmp_path, heartbeat_interval=0.05,
                                         pong_misses=50),
                        [r.name for r in rs]) as proc:
        wait_until(lambda: proc.counters()["pongs"] >= 10, what="10 pongs")
        c = proc.counters()
    assert c["heartbeat_timeouts"] == 0 and c["reconnects"] == 0 and c["pings_sent"] >= 10


def test_token_is_renewed_in_the_background_while_connected(start_sim, rings, tmp_path):
    sim = start_sim("--rate", "100", "--token-lifetime", "3")
    s = session_settings(sim, tmp_path, renew_before=2.5)
    with SessionProcess(s, [r.name for r in rings(1)]) as proc:
        wait_until(lambda: proc.counters()["auth_renewals"] >= 3, what="3 renewals")
        c = proc.counters()
    assert c["connects"] == 1 and c["reconnects"] == 0 and c["frames"] > 0
    assert sim.stats()["exchanges"] >= c["auth_renewals"]


def test_refused_token_is_renewed_once_then_used(start_sim, rings, tmp_path):
    sim = start_sim("--rate", "100", "--fault", "refuse-tokens=1")
    s = session_settings(sim, tmp_path)
    TokenCache(s.token_cache).store(login(s))  # a valid cached token that the feed refuses
    rs = rings(1)
    with SessionProcess(s, [r.name for r in rs]) as proc:
        wait_until(lambda: proc.counters()["frames"] >= 10, what="frames after renewal")
        c = proc.counters()
    assert c["refused_upgrades"] == 1 and c["auth_renewals"] == 1 and c["connects"] == 1
    assert sim.stats()["exchanges"] == 2


def test_refused_fresh_token_stops_without_looping(start_sim, rings, tmp_path, capfd):
    sim = start_sim("--fault", "refuse-tokens")
    s = session_settings(sim, tmp_path)
    cached = login(s)
    TokenCache(s.token_cache).store(cached)
    rs = rings(1)
    proc = SessionProcess(s, [r.name for r in rs], log_level=1).start()  # all levels
    assert proc.join(timeout=60) == 1
    assert "refused two freshly issued tokens" in (proc.error or "")
    stats = sim.stats()
    # One refusal of the cached token, one renewal, one refusal of the fresh one, one more
    # login (a new token may take a moment to be honoured), its refusal: then no loop.
    assert stats["upgrades_refused"] == 3 and stats["exchanges"] == 3
    fresh = TokenCache(s.token_cache).load()
    assert fresh is not None and fresh != cached
    out, err = capfd.readouterr()
    assert "refused" in err  # the child's debug log went to the captured stderr
    for secret in (SIM_SECRET, cached.value, fresh.value):
        assert secret not in out + err


def test_bad_credentials_stop_the_process(start_sim, rings, tmp_path):
    sim = start_sim()
    s = session_settings(sim, tmp_path, client_secret="wrong")
    proc = SessionProcess(s, [r.name for r in rings(1)]).start()
    assert proc.join(timeout=60) == 1
    assert "AADSTS7000215" in (proc.error or "") and "wrong" not in (proc.error or "")
    assert sim.stats()["token_requests"] == 1


def test_ring_full_drops_are_counted(start_sim, rings, tmp_path):
    sim = start_sim("--rate", "0", "--count", "50000")
    rs = rings(1, capacity=1 << 16, policy="drop")  # nobody reads: the ring fills up
    with SessionProcess(session_settings(sim, tmp_path), [r.name for r in rs]) as proc:
        wait_until(lambda: sum(proc.counters()[k] for k in ("frames", "ring_drops")) >= 50000,
                   what="all frames written or dropped")
        c = proc.counters()
    assert c["ring_drops"] > 0 and c["frames"] + c["ring_drops"] == 50000
    assert rs[0].dropped == c["ring_drops"] and rs[0].written == c["frames"]


def test_in_process_session_logs_no_secret(start_sim, rings, tmp_path, caplog):
    sim = start_sim("--rate", "1000", "--fault", "refuse-tokens=1", "--fault", "drop=200")
    s = session_settings(sim, tmp_path)
    TokenCache(s.token_cache).store(login(s))  # cached, then refused: one renewal
    rs = rings(1)
    controls: list[bytes] = []

    async def main() -> FeedSession:
        session = FeedSession(s, rs, on_control=controls.append)
        task = asyncio.ensure_future(session.run())
        deadline = time.monotonic() + 30
        while session.counters()["reconnects"] < 1 and not task.done():
            assert time.monotonic() < deadline, "timed out waiting for a reconnect"
            await asyncio.sleep(0.01)
        session.stop()
        await task
        return session

    # Level 1: below DEBUG too, where picows logs the upgrade request with its headers.
    with caplog.at_level(1):
        session = uvloop.run(main())
    c = session.counters()
    assert set(c) == set(COUNTERS) and c["reconnects"] >= 1 and c["frames"] >= 200
    assert c["auth_renewals"] == 1 and c["refused_upgrades"] == 1
    token = TokenCache(s.token_cache).load()
    assert token is not None and token.fingerprint in caplog.text
    assert token.value not in caplog.text and SIM_SECRET not in caplog.text
    assert "X-ZUMO-AUTH: <redacted>" in caplog.text  # the request was logged, redacted


# -- an independent server: the websockets library ---------------------------------------------

class WebsocketsFeed:
    """A feed written with the ``websockets`` library, in a thread: checks the token and the
    email, answers ``ping``, sends plain, fragmented and control messages and an RFC ping."""

    TOKEN = "independent-server-token"

    def __init__(self, frames: list[bytes]) -> None:
        self.frames = frames
        self.events: list[str] = []
        self.ready = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.stop_future: asyncio.Future[None] | None = None
        self.thread.start()
        assert self.ready.wait(10)

    def _run(self) -> None:
        try:
            self.loop.run_until_complete(self._main())
        finally:
            self.loop.close()

    async def _handler(self, ws) -> None:
        if ws.request.headers.get("X-ZUMO-AUTH") != self.TOKEN:
            self.events.append("bad-token")
            await ws.close(1008)
            return
        first = json.loads(await ws.recv())
        self.events.append(f"email:{first.get('email')}")
        for i, f in enumerate(self.frames):
            if i % 3 == 0:
                # A fragmented message: websockets sends an iterable as fragments.
                await ws.send([f[:5].decode(), f[5:20].decode(), f[20:].decode()])
            else:
                await ws.send(f.decode())
            if i == 10:
                await ws.send('{"status":"ok"}')
                pong_waiter = await ws.ping(b"x")
        await asyncio.wait_for(pong_waiter, 10)
        self.events.append("rfc-pong")
        async for msg in ws:
            if msg == "ping":
                self.events.append("ping")
                await ws.send("pong")

    async def _main(self) -> None:
        async with serve(self._handler, "127.0.0.1", 0) as server:
            self.port = server.sockets[0].getsockname()[1]
            self.stop_future = asyncio.get_running_loop().create_future()
            self.ready.set()
            await self.stop_future

    def close(self) -> None:
        assert self.stop_future is not None
        self.loop.call_soon_threadsafe(self.stop_future.set_result, None)
        self.thread.join(10)


def _sized(n: int) -> bytes:
    """A data frame of exactly ``n`` bytes."""
    head = b'{"c":"NASDAQ:AAPL","x":"'
    return head + b"y" * (n - len(head) - 2) + b'"}'


# WebSocket length encodings change at 126 and 65536 bytes (RFC 6455 5.2).
EDGE_SIZES = (125, 126, 127, 65535, 65536, 65537)


def test_sim_frame_headers_at_length_edges():
    from fastfeed.sim.market import ws_header
    assert ws_header(1, 125) == b"\x81\x7d"
    assert ws_header(1, 126) == b"\x81\x7e\x00\x7e"
    assert ws_header(1, 65535) == b"\x81\x7e\xff\xff"
    assert ws_header(1, 65536) == b"\x81\x7f" + (65536).to_bytes(8, "big")
    assert ws_header(0, 5, fin=False) == b"\x00\x05"


def test_session_against_an_independent_websockets_server(rings, tmp_path):
    frames = [p for p in pool()[:300]] + [_sized(n) for n in EDGE_SIZES]
    server = WebsocketsFeed(frames)
    try:
        host = f"http://127.0.0.1:{server.port}"
        s = load_settings({"host": host, "email": "ops@example.com", "client_id": "c",
                           "token_cache": str(tmp_path / "t.json"), "heartbeat_interval": 0.1,
                           "pong_misses": 50},
                          env={})
        # A valid cached token: no login needed (this server has no token endpoint).
        TokenCache(s.token_cache).store(Token(
            value=WebsocketsFeed.TOKEN, user_id="sid:x", expires_at=time.time() + 86400 * 30,
            obtained_at=time.time(), host=host, client_id="c"))
        rs = rings(2)
        with SessionProcess(s, [r.name for r in rs]) as proc:
            wait_until(lambda: proc.counters()["frames"] >= 306, what="306 frames")
            wait_until(lambda: proc.counters()["pongs"] >= 2, what="pongs")
            wait_until(lambda: "rfc-pong" in server.events, what="RFC pong")
            c = proc.counters()
        assert c["frames"] == 306 and c["fragmented"] == 102 and c["control"] == 1
        check_rings(drain(rs), frames, 2)
        assert server.events[0] == "email:ops@example.com"
        assert "ping" in server.events and "bad-token" not in server.events
    finally:
        server.close()


# -- failing fast on what retrying cannot fix; retrying the rest visibly ----------------------

def test_token_refused_right_after_a_fresh_login_is_retried_once(start_sim, rings, tmp_path):
    sim = start_sim("--rate", "100", "--fault", "refuse-tokens=1")
    s = session_settings(sim, tmp_path)  # no cached token: the first one is fresh
    with SessionProcess(s, [r.name for r in rings(1)]) as proc:
        wait_until(lambda: proc.counters()["frames"] >= 10, what="frames after the retry")
        c = proc.counters()
    assert c["refused_upgrades"] == 1 and c["auth_renewals"] == 2 and c["connects"] == 1
    assert sim.stats()["exchanges"] == 2


def fastfeed_cli(*args: str, env_extra: dict[str, str] | None = None, timeout: float = 90.0):
    """``fastfeed *args`` in a subprocess: (returncode, stdout, stderr, seconds)."""
    import subprocess
    import sys

    from .conftest import ROOT

    env = {k: v for k, v in os.environ.items()
           if not k.startswith("FASTFEED_") and k.lower() not in
           ("https_proxy", "http_proxy", "all_proxy", "no_proxy")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra or {})
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "fastfeed", *args], capture_output=True,
                         text=True, timeout=timeout, env=env)
    return res.returncode, res.stdout, res.stderr, time.monotonic() - t0


def sim_args(url: str, tmp_path, secret: str = SIM_SECRET) -> list[str]:
    from .conftest import SIM_CLIENT_ID, SIM_SCOPE, SIM_TENANT

    return ["--host", url, "--authority", url, "--tenant", SIM_TENANT, "--client-id",
            SIM_CLIENT_ID, "--client-secret", secret, "--scope", SIM_SCOPE, "--email",
            "ops@example.com", "--token-cache", str(tmp_path / "token.json")]


def one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("fastfeed: error: "), stderr[-2000:]
    assert "Traceback" not in stderr
    return lines[-1]


def test_refused_credentials_end_the_stream_at_once(start_sim, tmp_path):
    sim = start_sim("--rate", "100")
    rc, _, err, took = fastfeed_cli("stream", *sim_args(sim.url, tmp_path, "wrong"),
                                    "--count", "10")
    line = one_error_line(err)
    assert rc == 1 and took < 15, (took, err)
    assert "AADSTS7000215" in line and "check the client secret" in line
    assert sim.stats()["token_requests"] == 1  # no retry of refused credentials


def test_forbidden_login_ends_the_stream_at_once(start_sim, tmp_path):
    sim = start_sim("--rate", "100", "--fault", "forbid")
    rc, _, err, took = fastfeed_cli("stream", *sim_args(sim.url, tmp_path), "--count", "10")
    line = one_error_line(err)
    assert rc == 1 and took < 15, (took, err)
    assert "HTTP 403" in line and "entitle" in line
    assert sim.stats()["exchange_errors"] == 1


@pytest.mark.parametrize("host, message", [
    ("http://127.0.0.1:abc", "port must be a number from 1 to 65535"),
    ("http://127.0.0.1:70000", "port must be a number from 1 to 65535"),
    ("ftp://127.0.0.1:21", "scheme must be one of"),
    ("http://:8080", "no host name"),
])
def test_malformed_host_is_refused_before_anything_starts(tmp_path, host, message):
    rc, _, err, took = fastfeed_cli("stream", *sim_args(host, tmp_path), "--count", "10")
    line = one_error_line(err)
    assert rc == 2 and message in line and "--host" in line, line
    assert err.count("\n") == 1


def test_refused_connection_with_connect_timeout_ends_in_about_that(tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    rc, _, err, took = fastfeed_cli("stream", *sim_args(url, tmp_path), "--count", "10",
                                    "--connect-timeout", "3")
    line = one_error_line(err)
    assert rc == 1 and 2.5 < took < 10, (took, err)
    assert "no connection to" in line and "for 3 s" in line and "refused" in line.lower()
    # each attempt logged once with its count and next delay, before the end
    attempts = [ln for ln in err.splitlines() if "; attempt " in ln and "next in" in ln]
    assert len(attempts) >= 3


def test_dns_failure_is_retried_visibly_and_duration_without_connect_fails(tmp_path):
    url = "http://no-such-host.invalid:8080"
    rc, out, err, took = fastfeed_cli("stream", *sim_args(url, tmp_path), "--duration", "3",
                                      "--json")
    line = one_error_line(err)
    assert rc == 1 and "never connected" in line
    assert "DNS" in err  # the reason of each attempt, as it happened
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["stop_reason"] == "duration" and summary["connect_errors"] >= 2


def test_client_secret_is_not_in_the_children_environment(start_sim, tmp_path, monkeypatch):
    import multiprocessing

    from fastfeed import Feed

    sim = start_sim("--rate", "100")
    args = sim.settings_args(token_cache=str(tmp_path / "token.json"))
    monkeypatch.setenv("FASTFEED_CLIENT_SECRET", args.pop("client_secret"))
    monkeypatch.setattr("fastfeed.config._taken", {})  # what load_settings takes: undone after
    with Feed(**args, workers=2) as feed:
        wait_until(lambda: feed.stats()["session"].get("connects", 0) >= 1, what="connect")
        pids = [p.pid for p in multiprocessing.active_children()]
        assert feed._session.pid in pids and len(pids) >= 3  # the session and two workers
        for pid in pids:
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
            assert not any(e.startswith(b"FASTFEED_CLIENT_SECRET=") for e in environ), pid
            assert SIM_SECRET.encode() not in b"\0".join(environ)
    assert "FASTFEED_CLIENT_SECRET" not in os.environ


def test_throttled_login_waits_as_the_server_says(start_sim, rings, tmp_path):
    """429 with Retry-After: 1, twice: the session's back-off waits at least that long (not
    its own 10 ms first delay) and then logs in and streams."""
    sim = start_sim("--rate", "100", "--fault", "throttle=2")
    s = session_settings(sim, tmp_path)
    t0 = time.monotonic()
    with SessionProcess(s, [r.name for r in rings(1)]) as proc:
        wait_until(lambda: proc.counters()["frames"] >= 10, what="frames after throttling")
        c = proc.counters()
    assert time.monotonic() - t0 >= 2.0
    assert c["connect_errors"] == 2 and c["connects"] == 1
    stats = sim.stats()
    assert stats["throttled"] == 2 and stats["token_requests"] == 3
