"""The whole pipeline against the real simulator: Feed, the commands, capture and replay."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from fastfeed import Decoder
from fastfeed.capture import frames_array, read_capture
from fastfeed.config import load_settings
from fastfeed.feed import Feed
from fastfeed.sim.process import SimulatorProcess
from tests.feedcheck import no_segments_left, settings_for  # noqa: F401  (autouse)

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "fastfeed", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


def test_feed_delivers_every_row_the_simulator_sent(tmp_path):
    n = 150_000
    with SimulatorProcess("--rate", "0", "--count", str(n), "--symbols", "300") as sim:
        feed = Feed(settings_for(sim, tmp_path), workers=2)
        rows = {"ticks": 0, "quotes": 0, "bars": 0}
        syms: set[int] = set()
        with feed:
            deadline = time.monotonic() + 90
            for b in feed:
                for k in rows:
                    rows[k] += len(getattr(b, k))
                syms.update(np.unique(b.ticks["sym"]).tolist())
                if feed.frames_decoded() >= n and sum(rows.values()) >= sum(feed.stats()[k] for k in rows):
                    break
                assert time.monotonic() < deadline, feed.stats()
            stats = feed.stats()
            names = {feed.symbols[i] for i in syms}
        sent = sim.stop()
    assert stats["frames"] == n == sent["frames_sent"]
    assert rows == {"ticks": sent["ticks"], "quotes": sent["quotes"], "bars": sent["bars"]}
    assert (stats["errors"], stats["dropped"], stats["gaps"]) == (0, 0, 0)
    assert stats["latency_us"]["p50"] > 0 and len(names) == len(syms) > 100


def test_stream_json_counts_match_the_simulator(tmp_path):
    n = 200_000
    with SimulatorProcess("--rate", "0", "--count", str(n)) as sim:
        args = sim.settings_args(token_cache=str(tmp_path / "t.json"))
        r = _stream(args, n)
        sent = sim.stop()
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for k in ("frames", "ticks", "quotes", "bars", "errors", "control", "dropped", "gaps",
              "reconnects", "latency_us"):
        assert k in out
    assert out["frames"] == n == sent["frames_sent"]
    assert (out["ticks"], out["quotes"], out["bars"]) == (sent["ticks"], sent["quotes"], sent["bars"])
    assert (out["errors"], out["dropped"], out["gaps"]) == (0, 0, 0)
    assert set(out["latency_us"]) == {"p50", "p99", "p999", "max"}
    assert "fastfeed-sim-secret" not in r.stdout + r.stderr


def test_stream_inline_busy_poll_counts_match_the_simulator(tmp_path):
    n = 50_000
    with SimulatorProcess("--rate", "0", "--count", str(n)) as sim:
        args = sim.settings_args(token_cache=str(tmp_path / "t.json"))
        r = _stream(args, n, "--workers", "0", "--busy-poll")
        sent = sim.stop()
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["frames"] == n
    assert (out["ticks"], out["quotes"], out["bars"]) == (sent["ticks"], sent["quotes"], sent["bars"])
    assert (out["errors"], out["dropped"], out["gaps"]) == (0, 0, 0)


def _stream(args: dict, n: int, *extra: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["FASTFEED_CLIENT_SECRET"] = args["client_secret"]
    return subprocess.run(
        [sys.executable, "-m", "fastfeed", "stream", "--host", args["host"],
         "--authority", args["authority"], "--tenant", args["tenant_id"],
         "--client-id", args["client_id"], "--scope", args["scope"],
         "--token-cache", args["token_cache"], "--email", "ops@example.com",
         "--count", str(n), "--json", *extra],
        capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)


def _kill_one_worker(feed: Feed) -> int:
    pid = next(p for p in feed._pool.pids() if p)
    os.kill(pid, signal.SIGKILL)
    return pid


def test_killing_a_worker_mid_stream_loses_nothing(tmp_path):
    n = 300_000
    with SimulatorProcess("--rate", "150000", "--count", str(n)) as sim:
        feed = Feed(settings_for(sim, tmp_path), workers=2)
        rows = 0
        killed = None
        with feed:
            deadline = time.monotonic() + 90
            for b in feed:
                rows += len(b.ticks) + len(b.quotes) + len(b.bars)
                if killed is None and feed.frames_decoded() > n // 4:
                    killed = _kill_one_worker(feed)
                s = feed.stats()
                if s["frames"] >= n and rows >= s["ticks"] + s["quotes"] + s["bars"]:
                    break
                assert time.monotonic() < deadline, s
            stats = feed.stats()
        sent = sim.stop()
    assert killed is not None and stats["worker_restarts"] >= 1
    assert stats["frames"] == n
    assert rows == sent["ticks"] + sent["quotes"] + sent["bars"]
    assert (stats["ticks"], stats["quotes"], stats["bars"]) == (sent["ticks"], sent["quotes"], sent["bars"])
    assert (stats["errors"], stats["dropped"]) == (0, 0)


@pytest.mark.parametrize("replay_workers", [1, 0], ids=["worker", "inline"])
def test_record_capture_then_replay_gives_identical_rows(tmp_path, replay_workers):
    n = 50_000
    cap = tmp_path / "cap"
    with SimulatorProcess("--rate", "0", "--count", str(n), "--fault", "malformed=0.01") as sim:
        feed = Feed(settings_for(sim, tmp_path), workers=2, capture=str(cap), output=False)
        stats = feed.run(frames=n, duration=90)
        sent = sim.stop()
    assert stats["frames"] == n
    frames, ts = frames_array(cap)
    assert len(frames) == n and len(list(cap.glob("*.ffcap"))) == 2
    # the decoder alone, over the captured frames in replay order: the expected rows
    dec = Decoder()
    want = dec.decode(frames, recv_ts=ts)
    assert len(want.errors) == sent["malformed"] > 0

    got: dict[str, list] = {"ticks": [], "quotes": [], "bars": []}
    with Feed(replay=str(cap), workers=replay_workers) as replay:
        deadline = time.monotonic() + 60
        while True:
            b = replay.poll(timeout=0.05)
            if b is not None:
                for k in got:
                    got[k].append(getattr(b, k).copy())
            elif replay.source_done():
                # decoded rows are published before they are counted: take what is left
                while (b := replay.poll(timeout=0)) is not None:
                    for k in got:
                        got[k].append(getattr(b, k).copy())
                break
            assert time.monotonic() < deadline, replay.stats()
        symbols = list(replay.symbols)
    rstats = replay.stats()
    assert rstats["frames"] == n and rstats["errors"] == len(want.errors)
    for k in got:
        arr = np.concatenate(got[k]) if got[k] else np.empty(0, getattr(want, k).dtype)
        w = getattr(want, k)
        assert len(arr) == len(w), k
        # ids may differ between the two decoders: compare codes, then every other field
        assert [symbols[i] for i in arr["sym"]] == [dec.symbols[i] for i in w["sym"]]
        for f in w.dtype.names:
            if f not in ("sym", "status", "bar_type"):
                assert arr[f].tobytes() == w[f].tobytes(), (k, f)


def test_replay_command_and_read_capture(tmp_path):
    n = 20_000
    cap = tmp_path / "cap"
    with SimulatorProcess("--rate", "0", "--count", str(n)) as sim:
        feed = Feed(settings_for(sim, tmp_path), workers=2, capture=str(cap), output=False)
        feed.run(frames=n, duration=60)
        sent = sim.stop()
    assert sum(1 for _ in read_capture(cap)) == n
    r = run_cli("replay", str(cap), "--json", "--workers", "2")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["frames"] == n
    assert (out["ticks"], out["quotes"], out["bars"]) == (sent["ticks"], sent["quotes"], sent["bars"])
    r = run_cli("replay", str(tmp_path / "missing"))
    assert r.returncode != 0 and "capture not found" in r.stderr and "Traceback" not in r.stderr


def test_demo_runs_and_exits_zero():
    r = run_cli("demo", "--duration", "3", "--json", timeout=90)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["frames"] > 1000 and out["errors"] == 0 and out["ticks"] > 0


def test_sigint_stops_stream_cleanly_and_removes_segments(tmp_path):
    with SimulatorProcess("--rate", "20000") as sim:
        args = sim.settings_args(token_cache=str(tmp_path / "t.json"))
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env["FASTFEED_CLIENT_SECRET"] = args["client_secret"]
        p = subprocess.Popen(
            [sys.executable, "-m", "fastfeed", "stream", "--host", args["host"], "--authority",
             args["authority"], "--tenant", args["tenant_id"], "--client-id", args["client_id"],
             "--scope", args["scope"], "--token-cache", args["token_cache"], "--email", "a@b.c",
             "--workers", "2", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        # wait until it streams: the simulator has sent it a good number of frames
        deadline = time.monotonic() + 60
        while _sim_sent(sim) < 5000:
            assert time.monotonic() < deadline and p.poll() is None
            time.sleep(0.05)
        time.sleep(0.2)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err  # an orderly stop; 130 says it was Ctrl-C
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["frames"] > 0 and summary["dropped"] == 0
    assert not [n for n in os.listdir("/dev/shm") if f".{p.pid}." in n]


def _sim_sent(sim: SimulatorProcess) -> int:
    with urllib.request.urlopen(sim.url + "/stats", timeout=5) as resp:
        return json.loads(resp.read())["frames_sent"]


def test_commands_fail_with_one_clear_line():
    r = run_cli("stream", "--workers", "0")
    assert r.returncode == 2 and r.stderr.strip().startswith("fastfeed: error:")
    assert "Traceback" not in r.stderr
    r = run_cli("stream", "--host", "http://127.0.0.1:9", "--email", "a@b", "--count", "1", "--duration", "5")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    for cmd in ("demo", "stream", "record", "replay", "bench"):
        h = run_cli(cmd, "--help")
        assert h.returncode == 0 and "usage: fastfeed " + cmd in h.stdout


def test_parquet_sink_and_conversions(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from fastfeed.convert import to_arrow, to_pandas
    from fastfeed.sinks import ParquetSink

    n = 20_000
    with SimulatorProcess("--rate", "0", "--count", str(n)) as sim:
        feed = Feed(settings_for(sim, tmp_path), workers=1)
        sink = ParquetSink(tmp_path / "pq", tables=lambda: (feed.symbols, feed.statuses, feed.bar_types),
                           roll_rows=5000)
        with feed:
            deadline = time.monotonic() + 60
            for b in feed:
                sink.write(b)
                s = feed.stats()
                d = s["delivered"]
                if s["frames"] >= n and d["ticks"] + d["quotes"] + d["bars"] >= s["ticks"] + s["quotes"] + s["bars"]:
                    break
                assert time.monotonic() < deadline
            stats = feed.stats()
        sink.close()
        sim.stop()
    ticks = pa.concat_tables([pq.read_table(f) for f in sorted((tmp_path / "pq").glob("ticks-*.parquet"))])
    assert ticks.num_rows == stats["ticks"] and len(list((tmp_path / "pq").glob("ticks-*"))) > 1
    # files are cut at roll_rows even when one batch brings more
    assert all(pq.read_metadata(f).num_rows <= 5000 for f in (tmp_path / "pq").glob("*.parquet"))
    assert ticks.schema.field("ts").type == pa.timestamp("us", tz="UTC")
    assert str(ticks.column("sym")[0]).startswith(("NASDAQ:", "NYSE:")) or ":" in str(ticks.column("sym")[0])
    dec = Decoder()
    b = dec.decode([b'{"c":"A:B","t":1.5,"p":2,"v":3}'])
    df = to_pandas(b.ticks, dec.symbols)
    assert df["sym"].iloc[0] == "A:B" and str(df["ts"].dtype) == "datetime64[us, UTC]"
    assert to_arrow(b.ticks, dec.symbols).num_rows == 1


def test_prometheus_metrics(tmp_path):
    pytest.importorskip("prometheus_client")
    from fastfeed.metrics import serve_metrics

    with SimulatorProcess("--rate", "0", "--count", "20000") as sim:
        with Feed(settings_for(sim, tmp_path), workers=1) as feed:
            server = serve_metrics(feed, 0)
            try:
                deadline = time.monotonic() + 60
                while True:
                    feed.poll(timeout=0.05)
                    s = feed.stats()  # the consumer's own call counts the batch it holds
                    rows = s["ticks"] + s["quotes"] + s["bars"]
                    # (the network process publishes its counters every 50 ms)
                    if s["frames"] >= 20000 and s["received"] >= 20000 and sum(s["delivered"][k] for k in
                                                    ("ticks", "quotes", "bars")) == rows:
                        break  # every row handed over, so the latency has samples
                    assert time.monotonic() < deadline, s
                url = f"http://127.0.0.1:{server.server_port}/metrics"
                with urllib.request.urlopen(url, timeout=10) as resp:
                    text = resp.read().decode()
            finally:
                server.shutdown()
                server.server_close()
        sim.stop()
    assert "fastfeed_frames_decoded_total 20000.0" in text
    assert "fastfeed_frames_received_total 20000.0" in text
    delivered = sum(float(v) for v in re.findall(
        r'fastfeed_rows_delivered_total\{kind="\w+"\} (\S+)', text))
    assert delivered == rows
    for name in ("frames_dropped", "rows_dropped", "handler_errors"):
        assert f"fastfeed_{name}_total 0.0" in text
    assert 'fastfeed_restarts_total{process="network"} 0.0' in text
    assert "fastfeed_backpressure_seconds_total" in text
    assert "fastfeed_backpressure_pauses_total" in text
    assert 'fastfeed_latency_seconds_bucket{le="1e-06",phase="run"}' in text


@pytest.fixture
def own_affinity():
    """Give this thread its CPUs back: consumer_cpus pins the thread that starts a feed."""
    before = os.sched_getaffinity(0)
    yield before
    os.sched_setaffinity(0, before)


def test_inline_feed_delivers_every_row_and_pins_each_process(tmp_path, own_affinity):
    n = 100_000
    cpus = sorted(own_affinity)
    net, mine = {cpus[0]}, {cpus[-1]}
    with SimulatorProcess("--rate", "0", "--count", str(n)) as sim:
        feed = Feed(settings_for(sim, tmp_path), workers=0, network_cpus=net, consumer_cpus=mine)
        rows = {"ticks": 0, "quotes": 0, "bars": 0}
        with feed:
            assert os.sched_getaffinity(feed._session.pid) == net
            assert os.sched_getaffinity(0) == mine
            assert feed._pool.pids() == [None]  # no worker process: this one decodes
            deadline = time.monotonic() + 60
            kept = None
            for b in feed:
                assert b.errors == [] and b.frames > 0
                if kept is None and len(b.ticks):
                    kept, copy = b.ticks, b.ticks.copy()
                for k in rows:
                    rows[k] += len(getattr(b, k))
                if feed.frames_decoded() >= n:
                    break
                assert time.monotonic() < deadline, feed.stats()
            stats = feed.stats()
        sent = sim.stop()
    # inline batches own their rows: one kept past later batches is unchanged
    assert kept is not None and bool((kept == copy).all())
    assert stats["frames"] == n == sent["frames_sent"]
    assert rows == {"ticks": sent["ticks"], "quotes": sent["quotes"], "bars": sent["bars"]}
    assert (stats["errors"], stats["dropped"], stats["gaps"]) == (0, 0, 0)
    assert stats["workers"][0]["pid"] == os.getpid() and stats["workers"][0]["running"]
    assert not feed.stats()["workers"][0]["running"]
    assert os.sched_getaffinity(0) == own_affinity  # given back at stop
    with pytest.raises(RuntimeError, match="the feed has stopped"):
        feed.poll()
    assert stats["delivered"]["ticks"] > 0 and stats["latency_us"]["p50"] > 0


def test_inline_handler_and_capture_run_in_this_process(tmp_path):
    n = 30_000
    cap = tmp_path / "cap"
    seen = {"rows": 0, "pids": set()}

    def handler(worker: int, batch) -> None:  # a closure: inline needs no pickling
        seen["rows"] += batch.rows
        seen["pids"].add((worker, os.getpid()))

    with SimulatorProcess("--rate", "0", "--count", str(n), "--fault", "malformed=0.01") as sim:
        feed = Feed(settings_for(sim, tmp_path), workers=0, capture=str(cap), output=False,
                    handler=handler)
        stats = feed.run(frames=n, duration=60)
        sent = sim.stop()
    assert stats["frames"] == n and stats["errors"] == sent["malformed"] > 0
    assert seen["pids"] == {(0, os.getpid())}
    assert seen["rows"] == sent["ticks"] + sent["quotes"] + sent["bars"]
    frames, _ = frames_array(cap)
    assert len(frames) == n


def test_bad_pinning_is_one_clear_error(tmp_path, own_affinity):
    with pytest.raises(ValueError, match="workers must be an int >= 0"):
        Feed(replay=str(tmp_path), workers=-1)
    with pytest.raises(ValueError, match="network_cpus"):
        Feed(replay=str(tmp_path), network_cpus=[-1])
    with SimulatorProcess("--rate", "1000") as sim:
        feed = Feed(settings_for(sim, tmp_path), workers=0, network_cpus=[4096])
        with pytest.raises(ValueError, match=r"network_cpus=\[4096\].*may use CPUs"):
            feed.start()
        assert os.sched_getaffinity(0) == own_affinity
    r = run_cli("stream", "--host", "http://127.0.0.1:1", "--consumer-cpus", "x")
    assert r.returncode != 0 and "not a CPU list" in r.stderr and "Traceback" not in r.stderr


def test_verbose_reaches_every_process_in_one_format(tmp_path):
    """-v: the network process's and the workers' records come through the parent's own
    handler, each line naming its process; nothing is printed around logging."""
    with SimulatorProcess("--rate", "0", "--count", "20000") as sim:
        args = sim.settings_args(token_cache=str(tmp_path / "t.json"))
        r = _stream(args, 20000, "--workers", "2", "-v")
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    session = [ln for ln in lines if " fastfeed-session fastfeed.session INFO connected to " in ln]
    assert session, r.stderr
    assert all(" INFO " in ln or " WARNING " in ln or " ERROR " in ln or " DEBUG " in ln
               for ln in lines), r.stderr  # one format: every line is a log record
    assert "Traceback" not in r.stderr


def test_dropping_policy_is_counted_and_exits_3(tmp_path):
    """--full-policy drop: a full ring drops at once; every drop is counted, the run still
    ends (frames accounted = decoded + dropped) and exits with status 3."""
    n = 200_000
    with SimulatorProcess("--rate", "0", "--count", str(n)) as sim:
        args = sim.settings_args(token_cache=str(tmp_path / "t.json"))
        r = _stream(args, n, "--full-policy", "drop", "--workers", "1")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["frames"] + out["dropped"] >= n
    if out["dropped"]:
        assert r.returncode == 3 and "dropped" in r.stderr, (r.returncode, r.stderr)
    else:
        assert r.returncode == 0  # the machine kept up this time: nothing to count


def test_a_slow_consumer_pauses_the_socket_without_killing_the_heartbeat(tmp_path):
    """The consumer stalls for several heartbeat intervals at a time: the rings fill, the
    network process stops reading (its pongs then sit unread in the socket), yet it keeps
    pinging and does not take its own pause for a dead server: no heartbeat timeout, no
    reconnect, every frame delivered."""
    n = 400_000
    with SimulatorProcess("--rate", "0", "--count", str(n)) as sim:
        settings = load_settings(sim.settings_args(token_cache=str(tmp_path / "t.json"),
                                                   heartbeat_interval=0.2, pong_misses=2),
                                 env={})
        rows = 0
        # Inline: the consumer reads the input ring itself, so its stall fills the ring at once
        # (with workers, the output rings would first buffer a good part of the stream).
        with Feed(settings, workers=0, ring_capacity=1 << 16) as feed:
            deadline = time.monotonic() + 90
            stalls = 0
            for b in feed:
                rows += len(b.ticks) + len(b.quotes) + len(b.bars)
                if stalls < 3 and feed.stats()["frames"] > (stalls + 1) * n // 4:
                    time.sleep(1.0)  # five heartbeat intervals with nobody reading
                    stalls += 1
                if feed.frames_accounted() >= n:
                    feed.request_stop()  # the loop hands over what is left, then ends
                assert time.monotonic() < deadline
            s = feed.stats()
        sent = sim.stop()
    assert stalls == 3
    assert s["pauses"] >= 3 and s["backpressure_s"] >= 2.0, s
    assert s["session"]["heartbeat_timeouts"] == 0 and s["reconnects"] == 0, s["session"]
    assert s["session"]["pings_sent"] >= 10, s["session"]
    assert s["frames"] == n and s["dropped"] == 0 and s["dropped_rows"] == 0
    assert rows == sent["ticks"] + sent["quotes"] + sent["bars"] == s["ticks"] + s["quotes"] + s["bars"]


def test_batches_after_a_gap_say_how_many_frames_were_dropped(tmp_path):
    """full_policy="drop" with a consumer that falls behind: frames are dropped; the
    batches that follow carry the number (gaps), inline and through a worker."""
    n = 200_000
    for workers in (1, 0):
        with SimulatorProcess("--rate", "0", "--count", str(n)) as sim:
            with Feed(settings_for(sim, tmp_path), workers=workers, full_policy="drop",
                      ring_capacity=1 << 14) as feed:
                seen_gaps = 0
                deadline = time.monotonic() + 60
                while not feed.finished():
                    b = feed.poll()
                    if b is not None:
                        seen_gaps += b.gaps
                        time.sleep(0.002)
                    # (checked when idle too: the drop counts come from the network process)
                    if feed.frames_accounted() >= n:
                        feed.request_stop()
                    assert time.monotonic() < deadline, feed.stats()
                s = feed.stats()
            sim.stop()
        assert s["dropped"] > 0, s
        # Every gap a worker saw before rows it then published reached the consumer.
        assert 0 < seen_gaps <= s["gaps"] <= s["dropped"], (workers, seen_gaps, s["gaps"])


def test_bad_feed_arguments_are_one_clear_error():
    with pytest.raises(TypeError, match=r"'emial' \(did you mean 'email'\?\)"):
        Feed(host="http://127.0.0.1:9", emial="a@b")
    with pytest.raises(TypeError, match=r"'wrokers' \(did you mean 'workers'\?\)"):
        Feed(source="redis://127.0.0.1:6379/0?channel=x", wrokers=2)
    for kw, what in ((dict(workers=2.5), "workers"), (dict(workers="2"), "workers"),
                     (dict(ring_capacity=1000), "ring_capacity"),
                     (dict(full_policy="x"), "full_policy"), (dict(idle_timeout=0), "idle_timeout"),
                     (dict(on_handler_error="ignore"), "on_handler_error"),
                     (dict(max_symbols=0), "max_symbols")):
        with pytest.raises(ValueError, match=what):
            Feed(source="redis://127.0.0.1:6379/0?channel=x", **kw)


def test_record_to_an_unwritable_place_is_one_line():
    r = run_cli("record", "--out", "/proc/forbidden", "--host", "http://127.0.0.1:9",
                "--email", "a@b", "--duration", "1")
    assert r.returncode == 2 and r.stderr.startswith("fastfeed: error: --out /proc/forbidden")
    assert "Traceback" not in r.stderr
