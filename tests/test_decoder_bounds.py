"""Every read of the decoder stays inside the frame: each frame, and every prefix of it,
is placed so that its last byte is the last one before a PROT_NONE page, and decoded
through the entry points that take memory without copying it (``decode`` of a
memoryview, ``decode_region``, ``decode_buffer``).  A read one byte past the end faults.

The decoding runs in a child process per batch, so that a crash fails one test and says
which frame and prefix, instead of killing the whole run.
"""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import fastfeed
from fastfeed import Decoder

from . import framegen, reference
from .fuzz import guardpage

GUARDPAGE = Path(guardpage.__file__)


def _pretty(v) -> bytes:
    return json.dumps(v, indent=2, ensure_ascii=False).encode()


def _spaced(v) -> bytes:
    return json.dumps(v, separators=(", ", ": "), ensure_ascii=False).encode()


def _compact(v) -> bytes:
    return json.dumps(v, separators=(",", ":"), ensure_ascii=False).encode()


TICK = {"c": "NASDAQ:AAPL", "t": 1733432340.123456, "p": 243.08, "v": 100}
QUOTE = {"c": "NASDAQ:AAPL", "lt": 1733432340.0, "v": 533779.0, "lp": 243.08, "a": 243.09,
         "b": 243.08, "as": 520.0, "bs": 430.0}
BAR = {"t": 1733432340.0, "o": 242.89, "h": 243.1, "l": 242.8, "c": 243.08, "v": 120.0}
SERIES = {"c": "NASDAQ:AAPL", "be": 1733432399.0, "lu": 1733432399820, "bt": "1m",
          "s": [BAR, dict(BAR, t=1733432400.5, o=-1.25e-3)]}


def _gen(kind: str, seed: int, n: int, ws: bool) -> list[bytes]:
    r = random.Random(seed)
    make = {"tick": framegen.tick, "quote": framegen.quote, "series": framegen.series,
            "control": framegen.control}[kind]
    return [framegen.render(r, make(r), ws=ws).encode() for _ in range(n)]


def _gen_arrays(seed: int, n: int, ws: bool) -> list[bytes]:
    r = random.Random(seed)
    return [framegen.render(r, [framegen.message(r) for _ in range(r.randint(0, 3))], ws=ws).encode()
            for _ in range(n)]


# The frame kinds, each in its layouts: what the provider sends (compact, keys in its
# order), the same with odd values (negative, exponent, null, escapes, UTF-8), and frames
# from the differential tests' generator.
FRAMES: dict[str, list[bytes]] = {
    "tick": [
        _compact(TICK),
        b'{"c":"X","t":1,"p":2,"v":3}',
        b'{"c":"X","t":-1733432340.5,"p":-0.5e-3,"v":1E+2}',
        b'{"c":"X","t":null,"p":null,"v":null}',
        b'{"c":"X","t":1733432340.1234567,"p":12345678901234567890.5,"v":0}',
        b'{"c":"N\\u00e9\\"x\\\\","t":17334323401234567,"p":1234567812345678,"v":12345678.1234567}',
        '{"c":"東証:トヨタ","t":1.5,"p":2,"v":3,"x":[true,false,null,{"y":"😀"}]}'.encode(),
        *_gen("tick", 1, 12, ws=False),
    ],
    "quote": [
        _compact(QUOTE),
        b'{"c":"X","lt":1,"v":2,"lp":3,"a":4,"b":5,"as":6,"bs":7,"ss":"OPEN"}',
        b'{"c":"X","lt":1733432340.000001,"lp":-0.0,"ss":null}',
        b'{"c":"X","a":1e308,"b":-1e-320,"as":9007199254740993,"bs":0.1}',
        *_gen("quote", 2, 12, ws=False),
    ],
    "series": [
        _compact(SERIES),
        b'{"c":"X","be":1,"lu":2,"bt":"1m","s":[{"t":1,"o":2,"h":3,"l":4,"c":5,"v":6}]}',
        b'{"c":"X","be":1,"lu":2,"bt":"1m","s":[]}',
        b'{"c":"X","bt":null,"s":[{"t":null,"o":1,"x":{}},{}]}',
        *_gen("series", 3, 10, ws=False),
    ],
    "control": [
        b'{"status":"ok","code":200}',
        b'{"email":"ops@example.com"}',
        b'{"error":"rate limited","retry":1.5}',
        b'"pong"',
        b"[]",
        b"[1,0]",
        b"[true,false,null]",
        b'[{"status":"ok"},{"status":"ok"}]',
        b"{}",
        *[f for f in _gen("control", 4, 20, ws=False) if f[:1] not in b"-0123456789"],
    ],
    "array": [
        b"[" + _compact(TICK) + b"," + _compact(QUOTE) + b"," + _compact(SERIES) + b"]",
        b'[{"c":"X","t":1,"p":2,"v":3},{"c":"Y","t":1,"p":2,"v":3}]',
        b'[{"c":"X","t":1,"p":2,"v":3},"pong",7]',
        *_gen_arrays(5, 10, ws=False),
    ],
    "spaced": [
        _spaced(TICK), _spaced(QUOTE), _spaced(SERIES), _spaced([TICK, QUOTE]),
        _spaced({"status": "ok", "code": 200}),
    ],
    "pretty": [
        _pretty(TICK), _pretty(QUOTE), _pretty(SERIES), _pretty([TICK, SERIES]),
        _pretty({"status": "ok", "code": 200}),
        b'{\r\n\t"c" : "X" ,\r\n\t"t" : 1 ,\r\n\t"p" : 2 ,\r\n\t"v" : 3\r\n}',
    ],
    "generated-ws": [
        f for f in (_gen("tick", 6, 6, ws=True) + _gen("quote", 7, 6, ws=True)
                    + _gen("series", 8, 6, ws=True) + _gen_arrays(9, 6, ws=True))
        if f.strip()[:1] not in b"-0123456789"
    ],
}


def _run_child(frames: list[bytes], tmp_path: Path) -> list[dict]:
    """check_prefixes in a child process, so that a crash is reported, not suffered."""
    src, out, progress = tmp_path / "frames.json", tmp_path / "out.json", tmp_path / "progress"
    src.write_text(json.dumps([f.decode("latin-1") for f in frames]))
    progress.write_bytes(struct.pack("<qq", -1, -1))
    env = dict(os.environ)
    root = str(Path(fastfeed.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, str(GUARDPAGE), str(src), str(out), str(progress)],
        env=env, capture_output=True, text=True, timeout=150,
    )
    if proc.returncode != 0:
        i, n = struct.unpack("<qq", progress.read_bytes())
        where = f"frame {i}, prefix of {n} bytes: {frames[i][:n]!r}" if i >= 0 else "before any frame"
        pytest.fail(f"decoding at a guard page exited with {proc.returncode} at {where}\n"
                    f"{proc.stderr[-3000:]}")
    got = json.loads(out.read_text())
    assert Path(got["fastfeed"]).resolve() == Path(fastfeed.__file__).resolve()
    return got["results"]


@pytest.mark.parametrize("kind", sorted(FRAMES))
def test_every_prefix_at_a_guard_page(kind: str, tmp_path: Path) -> None:
    frames = [f.strip(b" \t\r\n") for f in FRAMES[kind]]
    assert frames and all(f for f in frames)
    results = _run_child(frames, tmp_path)
    ref = reference.decode(frames, 0)
    bad = set(ref["errors"])
    problems = []
    for i, (frame, res) in enumerate(zip(frames, results, strict=True)):
        if res["ok_prefixes"]:
            n, path = res["ok_prefixes"][0]
            problems.append(f"prefix of {n} bytes (path {path}) accepted: {frame[:n]!r}")
        want = i in bad
        if any(err != want for err in res["full"]):
            problems.append(f"whole frame: errors {res['full']}, reference error {want}: {frame!r}")
    assert not problems, "\n".join(problems[:10])
    # a kind that the reference refuses entirely would test nothing but errors
    assert len(bad) < len(frames)


# The shapes of issue 12: a compact frame that ends right after a key's colon, or inside
# a number, at the end of mapped memory.
ISSUE_SHAPES = [
    b'{"c":"X","t":',
    b'{"c":"X","t":1733432340.12',
    b'{"c":"X","t":1733432340.',
    b'{"c":"X","t":-',
    b'{"c":"X","t":12345678',
    b'{"c":"X","t":1,"p":',
    b'{"c":"X","t":1,"p":2,"v":',
    b'{"c":"X","t":1,"p":2,"v":3',
    b'{"c":"X","lt":',
    b'{"c":"X","lt":1,"v":2,"lp":3,"a":4,"b":5,"as":6,"bs":',
    b'{"c":"X","be":',
    b'{"c":"X","be":1,"lu":',
    b'{"c":"X","be":1,"lu":2,"bt":"1m","s":[{"t":',
    b'{"c":"X","be":1,"lu":2,"bt":"1m","s":[{"t":1,"o":',
    b'{"c":"X","be":1,"lu":2,"bt":"1m","s":[{"t":1,"o":2,"h":3,"l":4,"c":5,"v":6',
    b'[{"c":"X","t":',
    b'{"c":"X","t":1,"p":2,"v":3,"x":tr',
    b'{"c":"X","t":1,"p":2,"v":3,"x":"\\u00',
]


def test_issue_shapes_at_a_guard_page(tmp_path: Path) -> None:
    results = _run_child(ISSUE_SHAPES, tmp_path)
    for frame, res in zip(ISSUE_SHAPES, results, strict=True):
        assert res["full"] == [True, True, True], frame
        assert not res["ok_prefixes"], frame


def test_issue_shape_in_process() -> None:
    """The first crashing shape, in this process too (a crash here kills the run)."""
    guard = guardpage.GuardedRegion()
    dec = Decoder(error_store=0)
    for frame in ISSUE_SHAPES[:2]:
        assert guardpage.decode_at_guard(dec, guard, frame) == [True, True, True]
    # and the whole frame after it still decodes, from the same memory
    view = guard.place(b'{"c":"X","t":1,"p":2,"v":3}')
    batch = dec.decode([view], recv_ts=0)
    assert not batch.errors and len(batch.ticks) == 1


def test_decode_region_refuses_a_frame_past_the_buffer() -> None:
    """Offsets and lengths whose sum overflows are refused, never read."""
    dec = Decoder(error_store=0)
    buf = b'{"c":"X","t":1,"p":2,"v":3}'
    for off, n in [(1, 2**63 - 1), (2**63 - 1, 2**63 - 1), (2**62, 2**62), (len(buf), 1)]:
        with pytest.raises(ValueError, match="outside the buffer"):
            dec.decode_region(buf, [off], [n], [0])
    assert len(dec.decode_region(buf, [0], [len(buf)], [0]).ticks) == 1


# Found by the guard-page fuzz target under UBSan: a fresh decoder whose first new code
# is the empty one passed NULL (its not yet allocated pending-code text) to memcpy when
# committing it.  Only a sanitizer sees that; here the frames must decode, on every path.
EMPTY_CODE_FIRST = [
    b'{"c":"","lt":1636014463309}',
    b'{"c":"","t":1,"p":2,"v":3}',
    b'[{"c":"","p":1}]',
]


@pytest.mark.parametrize("frame", EMPTY_CODE_FIRST)
def test_empty_code_first_in_a_fresh_decoder(frame: bytes) -> None:
    guard = guardpage.GuardedRegion()
    for path in range(3):
        dec = Decoder(error_store=0)
        view = guard.place(frame)
        if path == 0:
            batch = dec.decode([view], recv_ts=0)
        elif path == 1:
            batch = dec.decode_region(guard.region, [guard.offset(len(frame))], [len(frame)], [0])
        else:
            batch = dec.decode_buffer(view, recv_ts=0)
        assert not batch.errors, (path, batch.errors)
        assert batch.rows == 1 and list(dec.symbols) == [""]
        assert (batch.ticks["sym"].tolist() + batch.quotes["sym"].tolist()) == [0]
