"""Replays and recordings: deterministic output, every run kept, honest latency, clear errors."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fastfeed import BAR_DTYPE, QUOTE_DTYPE, TICK_DTYPE, Decoder
from fastfeed._capture import route_frame
from fastfeed._listener import route_of
from fastfeed.capture import CaptureError, frames_array, read_capture
from fastfeed.feed import Feed
from fastfeed.sim.process import SimulatorProcess
from tests.feedcheck import write_capture

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("ticks", "quotes", "bars")
DTYPES = {"ticks": TICK_DTYPE, "quotes": QUOTE_DTYPE, "bars": BAR_DTYPE}


def run_cli(*args: str, timeout: float = 120, env_extra: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "fastfeed", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


def sim_args(sim: SimulatorProcess, tmp_path: Path) -> list[str]:
    a = sim.settings_args(token_cache=str(tmp_path / "token.json"))
    return ["--host", a["host"], "--authority", a["authority"], "--tenant", a["tenant_id"],
            "--client-id", a["client_id"], "--client-secret", a["client_secret"],
            "--scope", a["scope"], "--token-cache", a["token_cache"], "--email", a["email"]]


def record(tmp_path: Path, out: Path, n: int, fmt: str, seed: int) -> dict:
    with SimulatorProcess("--rate", "0", "--count", str(n), "--seed", str(seed),
                          "--fault", "malformed=0.01") as sim:
        r = run_cli("record", "--out", str(out), "--format", fmt, "--count", str(n),
                    "--workers", "2", "--json", "--duration", "90", *sim_args(sim, tmp_path))
        sent = sim.stop()
    assert r.returncode == 0, r.stderr
    out_json = json.loads(r.stdout.strip().splitlines()[-1])
    assert out_json["frames"] == n
    assert out_json.get("parquet_dropped", 0) == 0 and not any(out_json["undelivered"].values()), out_json
    return sent


def replay_rows(cap: Path, workers: int) -> tuple[dict[str, np.ndarray], list[list[str]], dict]:
    """Every row of a replay, each kind sorted by symbol id, stably: the order within a
    symbol is the replay's own (a symbol's frames all go through one ring)."""
    # Rows are kept as raw bytes: NumPy's copy, concatenate and take move structured rows
    # field by field and leave their padding uninitialized, which would hide what the
    # pipeline hands over.
    got: dict[str, list[bytes]] = {k: [] for k in KINDS}
    with Feed(replay=str(cap), workers=workers) as feed:
        deadline = time.monotonic() + 90
        for b in feed:
            for k in KINDS:
                got[k].append(getattr(b, k).tobytes())
            assert time.monotonic() < deadline, feed.stats()
    tables = [list(feed.symbols), list(feed.statuses), list(feed.bar_types)]
    out = {}
    for k in KINDS:
        dt = DTYPES[k]
        arr = np.frombuffer(b"".join(got[k]), dt)
        order = np.argsort(arr["sym"], kind="stable")
        rows = arr.view(np.uint8).reshape(len(arr), dt.itemsize)[order]
        out[k] = rows.reshape(-1).view(dt)
    return out, tables, feed.stats()


def digest(rows: dict[str, np.ndarray], zero_padding: bool = False) -> dict[str, str]:
    out = {}
    for k in KINDS:
        arr = rows[k]
        if zero_padding:  # every field copied into zeroed rows: the padding bytes are 0
            z = np.zeros(len(arr), arr.dtype)
            for f in arr.dtype.names:
                z[f] = arr[f]
            arr = z
        out[k] = hashlib.sha256(arr.tobytes()).hexdigest()
    return out


def test_the_replay_routes_every_frame_as_the_listener_does():
    frames = [b'{"c":"NASDAQ:AAPL","p":1}', b'{ "c" : "X:Y" }', b'[{"c":"A:B"},{"c":"C:D"}]',
              b'{"c":1.5,"s":[{"c":2}],"x":"c"}', b'{"s":[{"c":3}],"c":"BAR:S"}', b"pong",
              b'{"status":"ok"}', b'{"c":"unterminated', b"", b'{"c":"\\u0041"}']
    frames += [f'{{"x":{i},"c":"S{i % 97}:{i}"}}'.encode() for i in range(2000)]
    for f in frames:
        # route_of takes text that is not an object or array for a bare code; the
        # listener routes such a frame nowhere (-1), as the replay does
        want = route_of(f) if f.lstrip()[:1] in (b"{", b"[") else -1
        assert route_frame(f) == want, f


@pytest.fixture(scope="module")
def capture(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("replay")
    cap = tmp / "cap"
    record(tmp, cap, 20_000, "capture", seed=3)
    return cap


def test_replays_are_byte_identical_with_any_number_of_workers(capture):
    runs = {w: replay_rows(capture, w) for w in (2, 1, 0)}
    again = replay_rows(capture, 2)
    frames, ts = frames_array(capture)
    want = Decoder().decode(frames, recv_ts=ts)
    base_rows, base_tables, base_stats = runs[2]
    assert base_stats["frames"] == 20_000 and base_stats["errors"] == len(want.errors) > 0
    for w, (rows, tables, _s) in [*runs.items(), ("2 again", again)]:
        # the same ids (symbols, statuses, bar types) in every replay
        assert tables == base_tables, w
        for k in KINDS:
            assert len(rows[k]) == len(getattr(want, k)), (w, k)
            for f in rows[k].dtype.names:
                assert np.array_equal(rows[k][f], base_rows[k][f], equal_nan=True) or \
                    rows[k][f].tobytes() == base_rows[k][f].tobytes(), (w, k, f)
    # ids in order of first appearance in the capture, file by file
    dec = Decoder()
    for f in sorted(capture.glob("*.ffcap")):
        dec.decode(frames_array(f)[0])
    assert base_tables == [list(dec.symbols), list(dec.statuses), list(dec.bar_types)]
    # the same bytes in every field: hashes of the rows with their padding zeroed
    everyone = [*runs.items(), ("2 again", again)]
    assert len({json.dumps(digest(r[0], True), sort_keys=True) for _w, r in everyone}) == 1
    # and the very same bytes: padding included (no leftover ring memory in a row)
    hashes = {w: digest(r[0]) for w, r in everyone}
    assert len({json.dumps(h, sort_keys=True) for h in hashes.values()}) == 1, hashes


def test_record_capture_twice_into_one_directory_keeps_both_runs(tmp_path):
    cap = tmp_path / "cap"
    record(tmp_path, cap, 5_000, "capture", seed=1)
    record(tmp_path, cap, 7_000, "capture", seed=2)
    names = sorted(f.name for f in cap.glob("*.ffcap"))
    assert names == ["capture-run0001-w0.ffcap", "capture-run0001-w1.ffcap",
                     "capture-w0.ffcap", "capture-w1.ffcap"]
    stats = {"torn": 0, "repeats": 0}
    got = list(read_capture(cap, stats))
    assert len(got) == 12_000 and stats == {"torn": 0, "repeats": 0}
    ts = [t for t, _ in got]
    assert ts == sorted(ts)  # the runs in order
    r = run_cli("replay", str(cap), "--json", "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["frames"] == 12_000


def test_record_parquet_twice_adds_files_with_large_row_groups(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "pq"
    sent = [record(tmp_path, out, 30_000, "parquet", seed=s) for s in (1, 2)]
    for kind in KINDS:
        files = sorted(out.glob(f"{kind}-*.parquet"))
        assert [f.name for f in files] == [f"{kind}-{i:06d}.parquet" for i in (1, 2)], files
        rows = 0
        for f in files:
            meta = pq.ParquetFile(f).metadata
            rows += meta.num_rows
            # one row group per 131072 rows, not one per batch
            assert meta.num_row_groups == max(1, -(-meta.num_rows // 131_072)), (f, meta)
        assert rows == sum(s[kind] for s in sent), kind


def test_replay_latency_is_not_the_time_since_the_recording(tmp_path):
    # A capture "recorded" a year ago at 2000 frames/s for 1.5 s.
    cap = write_capture(tmp_path / "old.ffcap", (
        f'{{"c":"X:{i % 7}","t":1.5,"p":1.0,"v":1.0}}'.encode() for i in range(3000)),
        t0=int(time.time() * 1e6) - 365 * 86400 * 10**6, step_us=500)
    r = run_cli("replay", str(cap), "--json", "--speed", "1", "--workers", "0")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["frames"] == 3000 and out["replay"]["speed"] == 1
    # the lag behind the recorded pace: far below a second, never a year
    assert out["latency_us"]["p50"] is not None and out["latency_us"]["p50"] < 1e6, out
    assert "not the time since the recording" in out["replay"]["latency"]
    r = run_cli("replay", str(cap), "--json", "--workers", "0")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["latency_us"]["p50"] is None and out["replay"]["frames_per_s"] > 0
    assert out["replay"]["latency"].startswith("none")


def test_a_path_that_is_not_a_capture_is_one_clear_error(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    with pytest.raises(CaptureError, match="not a fastfeed capture"):
        Feed(replay=str(bad))
    with pytest.raises(FileNotFoundError, match="capture not found"):
        Feed(replay=str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no \\*.ffcap"):
        Feed(replay=str(empty))
    r = run_cli("replay", str(bad))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "not a fastfeed capture" in r.stderr


@pytest.mark.parametrize("workers", [0, 2])
def test_a_replay_hands_its_control_messages_to_the_consumer(tmp_path, workers):
    # Status objects and texts without a symbol, between market data: the consumer gets
    # each one on a batch, in capture order, as from a live feed.
    control = [b'{"status":"connected","seq":%d}' % i for i in range(5)]
    frames: list[bytes] = []
    for i in range(500):
        if i % 100 == 50:
            frames.append(control[i // 100])
        frames.append(f'{{"c":"X:{i % 7}","t":1.5,"p":1.0,"v":1.0}}'.encode())
    cap = write_capture(tmp_path / "ctl.ffcap", frames, t0=1_000_000)
    got: list[bytes] = []
    rows = 0
    with Feed(replay=str(cap), workers=workers) as feed:
        deadline = time.monotonic() + 60
        for b in feed:
            got.extend(b.control)
            rows += b.rows
            assert time.monotonic() < deadline, feed.stats()
        stats = feed.stats()
    assert got == control
    assert rows == 500 and stats["control"] == 5 and stats["control_dropped"] == 0


def count_rows(worker: int, batch) -> None:  # a handler: runs in the workers
    pass


@pytest.mark.parametrize("speed", [0.0, 4.0])
def test_a_replay_with_handlers_only_runs_to_its_end(tmp_path, speed):
    """output=False: the workers do the work, and run() keeps the replay going (the frames
    are moved into the rings from this process, paced at ``speed``)."""
    cap = write_capture(tmp_path / "h.ffcap", (  # 1 s of recording
        f'{{"c":"H:{i % 9}","t":1.5,"p":{i},"v":1.0}}'.encode() for i in range(4000)),
        step_us=250)
    started = time.monotonic()
    s = Feed(replay=str(cap), workers=2, output=False, handler=count_rows,
             speed=speed).run(duration=60)
    took = time.monotonic() - started
    assert s["frames"] == 4000 and s["ticks"] == 4000 and s["delivered"]["batches"] == 0
    if speed:
        assert took >= 1.0 / speed * 0.9  # paced, not as fast as possible
        assert s["latency_us"]["p50"] is None or s["latency_us"]["p50"] != s["latency_us"]["p50"]
