"""The decoder against PROTOCOL.md section 3, rule by rule, and against a reference."""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing as mp
import os
import random
import struct
import subprocess
import sys
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastfeed
import fastfeed._decoder
from fastfeed import BAR_DTYPE, NAT, QUOTE_DTYPE, TICK_DTYPE, Decoder, SymbolTable

from . import framegen, reference

# The provider's examples, as its documentation prints them (pretty-printed).
QUOTE_DOC = b"""{
"c": "NASDAQ:AAPL",
"lt": 1733432340.0,
"v": 533779.0,
"lp": 243.08,
"a": 243.09,
"b": 243.08,
"as": 520.0,
"bs": 430.0
}"""
SERIES_DOC = b"""{
"c": "NASDAQ:AAPL",
"be": 1733432399.0,
"lu": 1733432399820,
"bt": "1m",
"s": [
{
"t": 1733432340.0,
"o": 242.89,
"h": 243.09,
"l": 242.82,
"c": 243.08,
"v": 533779.0
}
]
}"""
TICK_DOC = b"""{
"c": "NASDAQ:AAPL",
"t": 1749462520.177003,
"p": 242.89,
"v": 200.0
}"""
TICK = b'{"c":"NASDAQ:AAPL","t":1749462520.177003,"p":242.89,"v":200.0}'
QUOTE = b'{"c":"NASDAQ:AAPL","lt":1733432340.0,"v":533779.0,"lp":243.08,"a":243.09,"b":243.08,"as":520.0,"bs":430.0}'
SERIES = b'{"c":"NASDAQ:AAPL","be":1733432399.0,"lu":1733432399820,"bt":"1m","s":[{"t":1733432340.0,"o":242.89,"h":243.09,"l":242.82,"c":243.08,"v":533779.0}]}'


def one(frame: bytes, dec: Decoder | None = None):
    dec = dec or Decoder()
    return dec, dec.decode([frame], recv_ts=123)


def tick_ts(text: str) -> int:
    _, b = one(b'{"c":"X","t":%s,"p":1}' % text.encode())
    assert not b.errors, b.errors
    return int(b.ticks["ts"][0])


# ---- public surface -------------------------------------------------------------


def test_dtypes_have_the_documented_fields():
    assert TICK_DTYPE.names == ("sym", "ts", "price", "volume", "recv_ts")
    assert QUOTE_DTYPE.names == (
        "sym", "status", "ts", "last", "volume", "bid", "ask", "bid_size", "ask_size", "recv_ts",
    )
    assert BAR_DTYPE.names == (
        "sym", "bar_type", "ts", "bar_end", "last_update", "open", "high", "low", "close",
        "volume", "recv_ts",
    )
    assert TICK_DTYPE["sym"] == np.int32 and TICK_DTYPE["ts"] == np.int64
    assert QUOTE_DTYPE["status"] == np.uint8 and BAR_DTYPE["bar_type"] == np.int16
    assert fastfeed.TICK_DTYPE is TICK_DTYPE


@pytest.mark.parametrize("frame", [TICK_DOC, TICK])
def test_provider_tick(frame):
    dec, b = one(frame)
    assert (len(b.ticks), len(b.quotes), len(b.bars), b.errors, b.control) == (1, 0, 0, [], [])
    t = b.ticks[0]
    assert dec.symbols[t["sym"]] == "NASDAQ:AAPL"
    assert t["ts"] == 1749462520177003
    assert t["price"] == 242.89 and t["volume"] == 200.0 and t["recv_ts"] == 123


@pytest.mark.parametrize("frame", [QUOTE_DOC, QUOTE])
def test_provider_quote(frame):
    dec, b = one(frame)
    q = b.quotes[0]
    assert len(b.quotes) == 1 and not b.errors
    assert dec.symbols[q["sym"]] == "NASDAQ:AAPL" and q["status"] == 0
    assert q["ts"] == 1733432340000000
    assert (q["last"], q["volume"], q["bid"], q["ask"], q["bid_size"], q["ask_size"]) == (
        243.08, 533779.0, 243.08, 243.09, 430.0, 520.0,
    )


@pytest.mark.parametrize("frame", [SERIES_DOC, SERIES])
def test_provider_series(frame):
    dec, b = one(frame)
    r = b.bars[0]
    assert len(b.bars) == 1 and not b.errors
    assert dec.symbols[r["sym"]] == "NASDAQ:AAPL" and dec.bar_types[r["bar_type"]] == "1m"
    assert r["ts"] == 1733432340000000 and r["bar_end"] == 1733432399000000
    assert r["last_update"] == 1733432399820000  # lu is milliseconds
    assert (r["open"], r["high"], r["low"], r["close"], r["volume"]) == (
        242.89, 243.09, 242.82, 243.08, 533779.0,
    )


def test_tables_start_with_empty_code():
    dec = Decoder()
    assert dec.statuses[0] == "" and dec.bar_types[0] == ""
    assert len(dec.symbols) == 0


# ---- timestamps ------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,us",
    [
        ("1749462520.177003", 1749462520177003),
        ("1749462520", 1749462520000000),
        ("1749462520.1", 1749462520100000),
        ("1749462520.0000005", 1749462520000000),  # tie: to even (0)
        ("1749462520.0000015", 1749462520000002),  # tie: to even (2)
        ("1749462520.00000150000000001", 1749462520000002),
        ("1749462520.0000025", 1749462520000002),
        ("1749462520.00000250000001", 1749462520000003),
        ("1749462520.0000024999999999", 1749462520000002),
        ("1749462520.9999995", 1749462521000000),
        ("1.749462520177003e9", 1749462520177003),
        ("1.749462520177003E+9", 1749462520177003),
        ("1749462520177003e-6", 1749462520177003),
        ("17494625201770030000000000e-16", 1749462520177003),
        ("0.000001e15", 1_000_000_000_000_000),
        ("-1.5", -1500000),
        ("-0.0000005", 0),
        ("-0.0000015", -2),
        ("0", 0),
        ("-0", 0),
        ("1e-400", 0),
        ("0e999999999999", 0),
        ("9223372036854.775807", 9223372036854775807),
        ("-9223372036854.775807", -9223372036854775807),
        ("0.00000000000000000000000000000000000000000000000000000001e50", 1),
    ],
)
def test_timestamp_exact(text, us):
    assert tick_ts(text) == us


def test_timestamp_beyond_float_precision():
    # a float round trip would lose the last digit at this magnitude
    text = "9007199254.740993"
    assert float(text) * 1e6 != 9007199254740993
    assert tick_ts(text) == 9007199254740993


@pytest.mark.parametrize("text", ["9223372036854.775808", "1e19", "-1e30", "1e999999999999"])
def test_timestamp_out_of_range_is_an_error(text):
    _, b = one(b'{"c":"X","t":%s,"p":1}' % text.encode())
    assert len(b.errors) == 1 and "out of int64 range" in b.errors[0][1]
    assert len(b.ticks) == 0


def test_lu_is_milliseconds():
    _, b = one(b'{"c":"X","bt":"1m","lu":1733432399820.5,"s":[{"t":1}]}')
    assert b.bars["last_update"][0] == 1733432399820500


def test_missing_and_null_times_are_nat():
    _, b = one(b'{"c":"X","t":null,"p":1}')
    assert b.ticks["ts"][0] == NAT
    assert b.ticks["ts"].view("M8[us]")[0] != b.ticks["ts"].view("M8[us]")[0]  # NaT
    _, b = one(b'{"c":"X","p":1}')
    assert b.ticks["ts"][0] == NAT


# ---- floats ----------------------------------------------------------------------

FLOAT_TEXTS = [
    "242.89", "0.1", "0.3", "1e23", "8.98846567431158e307", "1e308", "1.7976931348623157e308",
    "1e400", "-1e400", "4.9e-324", "2.4703282292062327e-324", "2.2250738585072014e-308",
    "9007199254740993", "9007199254740992.5", "123456789012345678901234567890", "0.000001",
    "1.00000000000000011102230246251565404236316680908203125", "-0.0", "0", "-0", "1E2",
    "3.141592653589793238462643383279", "0.30000000000000004", "5e-324", "1e-400",
    "12345678.1234567", "99999999999999999", "1.5e-7", "7.0e+1",
]


@pytest.mark.parametrize("text", FLOAT_TEXTS)
def test_float_bit_exact(text):
    _, b = one(b'{"c":"X","p":%s}' % text.encode())
    got = struct.pack("<d", b.ticks["price"][0])
    assert got == struct.pack("<d", float(text)), text


@given(st.floats(allow_nan=False, allow_infinity=False))
@settings(max_examples=3000, deadline=None)
def test_float_repr_round_trip(x):
    dec = Decoder()
    for text in (repr(x), f"{x:.17g}", f"{x:.3e}", f"{x:.2f}" if abs(x) < 1e15 else repr(x)):
        b = dec.decode([b'{"c":"X","p":%s}' % text.encode()])
        assert struct.pack("<d", b.ticks["price"][0]) == struct.pack("<d", float(text)), text


@given(st.integers(0, 10**18), st.integers(0, 12), st.booleans())
@settings(max_examples=3000, deadline=None)
def test_decimal_texts_exact(mant, frac, neg):
    digits = str(mant).rjust(frac + 1, "0")
    text = ("-" if neg else "") + (digits[: len(digits) - frac] + "." + digits[len(digits) - frac:] if frac else digits)
    dec = Decoder()
    b = dec.decode([b'{"c":"X","t":%s,"p":%s}' % (text.encode(), text.encode())])
    try:
        want = reference.fixed(reference.Num(text), 6)
    except reference.RefError:
        assert "out of int64 range" in b.errors[0][1]
        return
    assert not b.errors
    assert struct.pack("<d", b.ticks["price"][0]) == struct.pack("<d", float(text))
    assert b.ticks["ts"][0] == want


def test_missing_and_null_numbers_are_nan():
    _, b = one(b'{"c":"X","lp":null,"b":1.5}')
    q = b.quotes[0]
    assert math.isnan(q["last"]) and math.isnan(q["ask"]) and q["bid"] == 1.5
    assert q["ts"] == NAT


# ---- structure -------------------------------------------------------------------


def test_key_order_and_whitespace_do_not_matter():
    frames = [
        b'{"v":200.0,"p":242.89,"t":1749462520.177003,"c":"NASDAQ:AAPL"}',
        b' \t\r\n{ "p" :242.89 ,\n"c":\t"NASDAQ:AAPL", "v": 200.0 , "t" : 1749462520.177003 }\n ',
    ]
    _, b = one(TICK)
    for f in frames:
        _, b2 = one(f)
        assert b2.ticks.tobytes() == b.ticks.tobytes()


def test_unknown_keys_of_any_type_are_skipped():
    f = (b'{"x":{"a":[1,{"b":[[],{}]},"s"],"c":"inner"},"c":"NASDAQ:AAPL","arr":[1,2,[3]],'
         b'"n":null,"t":1749462520.177003,"flag":true,"p":242.89,"f":false,"str":"\\u00e9","v":200.0,"num":-1.5e3}')
    _, b = one(f)
    _, ref = one(TICK)
    assert not b.errors and b.ticks.tobytes() == ref.ticks.tobytes()


def test_last_repeated_key_wins():
    dec, b = one(b'{"c":"A","p":"bad","t":1,"p":2.5,"c":"B"}')
    assert not b.errors and b.ticks["price"][0] == 2.5 and dec.symbols[b.ticks["sym"][0]] == "B"
    _, b = one(b'{"c":"A","p":1,"p":"bad"}')
    assert len(b.errors) == 1
    _, b = one(b'{"c":"A","bt":"1m","s":[{"t":1},{"t":2}],"s":[{"t":3}]}')
    assert b.bars["ts"].tolist() == [3_000_000]


def test_string_escapes_and_unicode():
    dec, b = one(b'{"c":"NASDAQ\\u003AAAPL","p":1}')
    assert dec.symbols[b.ticks["sym"][0]] == "NASDAQ:AAPL"
    dec, b = one('{"c":"\\"Q\\"\\\\/\\/\\u00e9\\ud83d\\ude00東","p":1}'.encode())
    assert dec.symbols[b.ticks["sym"][0]] == '"Q"\\//é😀東'
    dec, b = one('{"c":"ÉCOLE:東証","p":1}'.encode())
    assert dec.symbols[b.ticks["sym"][0]] == "ÉCOLE:東証"
    dec, b = one(b'{"\\u0063":"X","\\u0070":1}')  # escaped keys
    assert len(b.ticks) == 1


@pytest.mark.parametrize(
    "frame,what",
    [
        (b'{"c":"\xff","p":1}', "invalid UTF-8"),
        (b'{"c":"\xc3","p":1}', "invalid UTF-8"),
        (b'{"c":"\xed\xa0\x80","p":1}', "invalid UTF-8"),  # encoded surrogate
        (b'{"c":"\xc0\xaf","p":1}', "invalid UTF-8"),  # overlong
        (b'{"c":"\xf4\x90\x80\x80","p":1}', "invalid UTF-8"),  # above U+10FFFF
        (b'{"c":"X","p":1,"k":"\xe9"}', "invalid UTF-8"),  # in a skipped value too
        (b'{"c":"\\ud800","p":1}', "surrogate"),
        (b'{"c":"\\udc00x","p":1}', "surrogate"),
        (b'{"c":"a\nb","p":1}', "control character"),
        (b'{"c":"\\x","p":1}', "invalid escape"),
    ],
)
def test_bad_strings_are_errors(frame, what):
    _, b = one(frame)
    assert len(b.errors) == 1 and what in b.errors[0][1], b.errors
    assert len(b.ticks) == 0


def test_close_inside_a_bar_is_a_price_and_series_give_a_row_per_bar():
    dec, b = one(b'{"c":"SYM","bt":"5m","be":10,"lu":5000,"s":[{"t":1,"c":1.5},{"t":2,"c":2.5,"o":2},{"t":3}]}')
    assert len(b.bars) == 3
    assert dec.symbols[b.bars["sym"][0]] == "SYM"
    assert b.bars["close"][:2].tolist() == [1.5, 2.5] and math.isnan(b.bars["close"][2])
    assert set(b.bars["bar_end"].tolist()) == {10_000_000} and set(b.bars["last_update"].tolist()) == {5_000_000}
    assert b.bars["ts"].tolist() == [1_000_000, 2_000_000, 3_000_000]


def test_series_without_bars_gives_no_rows():
    _, b = one(b'{"c":"X","bt":"1m","s":[]}')
    assert (len(b.bars), b.errors, b.control) == (0, [], [])
    _, b = one(b'{"c":"X","bt":"1m","s":null}')
    assert (len(b.bars), b.errors) == (0, [])


def test_array_frame_gives_every_message():
    dec, b = one(b"[" + TICK + b"," + QUOTE + b"," + SERIES + b"]")
    assert (len(b.ticks), len(b.quotes), len(b.bars), b.errors) == (1, 1, 1, [])


def test_a_failing_message_fails_its_whole_frame_only():
    frames = [TICK, b"[" + TICK + b',{"c":"X","p":"oops"}]', QUOTE, b'{"p":1}', SERIES]
    _, b = Decoder().decode(frames, recv_ts=0), None
    b = _
    assert [i for i, _ in b.errors] == [1, 3]
    assert "expected number or null for `p`, got string" in b.errors[0][1]
    assert "without a string `c`" in b.errors[1][1]
    assert (len(b.ticks), len(b.quotes), len(b.bars)) == (1, 1, 1)


@pytest.mark.parametrize(
    "frame,why",
    [
        (b'{"c":7,"p":1}', "expected string for `c`, got number"),
        (b'{"c":null,"p":1}', "expected string for `c`, got null"),
        (b'{"p":1}', "without a string `c`"),
        (b'{"c":"X","p":true}', "`p`, got boolean"),
        (b'{"c":"X","t":"1","p":1}', "`t`, got string"),
        (b'{"c":"X","lt":false}', "`lt`, got boolean"),
        (b'{"c":"X","lp":[1]}', "`lp`, got array"),
        (b'{"c":"X","ss":5}', "`ss`, got number"),
        (b'{"c":"X","bt":true,"s":[]}', "`bt`, got boolean"),
        (b'{"c":"X","bt":"1m","s":{}}', "`s`, got object"),
        (b'{"c":"X","bt":"1m","s":[1]}', "`s`, got number"),
        (b'{"c":"X","bt":"1m","s":[{"o":"1"}]}', "`s[].o`, got string"),
        (b'{"c":"X","bt":"1m","s":[{"t":true}]}', "`s[].t`, got boolean"),
        (b'{"c":"X","bt":"1m","lu":"x"}', "`lu`, got string"),
        (b'{"c":"X","bt":"1m","be":1e30}', "timestamp `be` out of int64 range"),
        (b'{"c":"X","bt":"1m","s":[{"c":"1"}]}', "`s[].c`, got string"),
    ],
)
def test_wrong_types_are_errors_that_say_what_and_where(frame, why):
    _, b = one(frame)
    assert len(b.errors) == 1 and why in b.errors[0][1], b.errors
    assert "(byte " in b.errors[0][1]
    assert len(b.ticks) + len(b.quotes) + len(b.bars) == 0


def test_error_names_the_byte():
    _, b = one(b'{"c":"X","p":1,}')
    assert b.errors == [(0, "JSON is malformed: expected a string key (byte 15)")]
    _, b = one(b'{"c":"X","p":1')
    assert b.errors == [(0, "input truncated: unclosed object (byte 14)")]


@pytest.mark.parametrize(
    "frame",
    [b'{"status":"ok"}', b"{}", b'"pong"', b"42", b"null", b'[{"email":"a@b"}]', b'{"c":"X","t":"not data"}'],
)
def test_valid_non_market_json_is_control(frame):
    dec, b = one(frame)
    assert b.control == [frame] and not b.errors and b.rows == 0
    assert dec.control_total == 1


@pytest.mark.parametrize(
    "frame,n",
    [
        (b"[]", 0),
        (b"[ ]", 0),
        (b"[1,0]", 2),
        (b'[{"status":"ok"},{"status":"ok"}]', 2),
        (b'[{"c":"X","p":1},"pong",{"c":"Y","p":2},{}]', 2),
        (b'[{"c":"X","p":1}]', 0),
        (b'[[],[]]', 2),
        (b'{"status":"ok"}', 1),
    ],
)
def test_control_is_counted_per_message(frame, n):
    dec, b = one(frame)
    assert not b.errors
    assert dec.control_total == n and dec.stats()["control"] == n
    assert b.control == ([frame] if n else [])  # the frames that hold a control message


def test_control_count_of_a_failing_frame_is_zero():
    dec, b = one(b'[1,2,{"c":"X","p":"bad"}]')
    assert len(b.errors) == 1 and dec.control_total == 0 and b.control == []


@pytest.mark.parametrize("frame", [b"", b"   ", b"pong", b"{", b"}", b"[1,]", b'{"a":1}x', b"NaN", b"01", b'{"a":01}', b"-", b"1.", b".5", b"1e", b"tru", b"nul"])
def test_invalid_json_is_an_error(frame):
    _, b = one(frame)
    assert len(b.errors) == 1 and not b.control


def _nest(levels: int, kind: str) -> bytes:
    return (b"[" * levels + b"1" + b"]" * levels) if kind == "[" else (b'{"x":' * levels + b"1" + b"}" * levels)


# Every path the decoder reads a nested value by: (frame with {} where the nested value
# goes, how many containers already hold that value).
NEST_PATHS = [
    (b"{}", 0),                                           # the frame itself (control)
    (b"[{}]", 1),                                         # an element of an array frame
    (b'{"c":"X","p":1,"x":{}}', 1),                       # an unknown key of a tick
    (b'{"c":"X","p":1,"lt":{}}', 1),                      # a quote's key in a tick: unused
    (b'[{"c":"X","p":1,"x":{}}]', 2),                     # a message in an array frame
    (b'{"c":"X","s":[{"t":1,"x":{}}]}', 3),               # an unknown key of a bar
    (b'[{"c":"X","s":[{"t":1,"x":{}}]}]', 4),             # ... of a bar in an array frame
    (b'{"status":{}}', 1),                                # a control message's value
    (b'[{"status":{}}]', 2),
]


@pytest.mark.parametrize("path,outer", NEST_PATHS)
@pytest.mark.parametrize("kind", ["[", "{"])
def test_nesting_limit_is_exactly_64_levels_on_every_path(path, outer, kind):
    """64 containers inside one another decode; 65 are an error, whichever path reads them."""
    dec = Decoder()
    ok = path.replace(b"{}", _nest(64 - outer, kind)) if outer < 64 else None
    deep = path.replace(b"{}", _nest(65 - outer, kind))
    b = dec.decode([ok, deep], recv_ts=0)
    assert [i for i, _ in b.errors] == [1], b.errors
    assert "nesting too deep" in b.errors[0][1] and "64" in b.errors[0][1]
    assert reference.decode([ok, deep])["errors"] == [1]


@pytest.mark.parametrize("depth", [1000, 100_000])
def test_very_deep_nesting_is_an_error_not_a_crash(depth):
    for opener, closer in ((b"[", b"]"), (b'{"a":', b"}"), (b'{"a":[', b"]}")):
        frame = b'{"c":"X","p":1,"x":' + opener * depth + b"1" + closer * depth + b"}"
        _, b = one(frame)
        assert len(b.errors) == 1 and "nesting too deep" in b.errors[0][1]


@pytest.mark.parametrize(
    "frame,kind",
    [
        (b'{"c":"X","s":[],"v":true}', "bars"),                  # the example
        (b'{"c":"X","s":[],"p":"x","t":[1],"v":{},"a":null,"ss":5,"lt":"now"}', "bars"),
        (b'{"c":"X","p":1,"lt":"x","lp":[],"a":{},"b":true,"as":"","bs":[1],"ss":7}', "ticks"),
        (b'{"c":"X","p":1,"be":"x","lu":1e300}', "ticks"),
        (b'{"c":"X","lt":1,"t":"x","p_":1,"be":[],"lu":true}', "quotes"),
        (b'{"c":"X","lt":1,"t":1e300}', "quotes"),                # out of range, unused: fine
        (b'{"c":"X","bt":"1m","s":[{"t":1,"p":"x","lt":[],"bt":5,"s":{}}]}', "bars"),
        (b'{"c":7,"status":"ok","p_":1}', "control"),           # no data key: nothing judged
    ],
)
def test_keys_the_kind_does_not_use_are_skipped_whatever_their_type(frame, kind):
    dec, b = one(frame)
    assert not b.errors, b.errors
    ref = reference.decode([frame], b.ticks["recv_ts"][0] if len(b.ticks) else 0)
    assert ref["errors"] == []
    if kind == "control":
        assert dec.control_total == 1 and b.rows == 0
    else:
        assert dec.control_total == 0
        assert b.rows == len(getattr(b, kind)) == len(ref[kind])
        assert len(ref[kind]) == (0 if kind == "bars" and b'"t":1' not in frame else 1)


def test_every_truncation_of_valid_frames_is_an_error():
    dec = Decoder()
    for frame in (TICK, QUOTE, SERIES, TICK_DOC, b"[" + TICK + b"," + SERIES + b"]"):
        cuts = [frame[:i] for i in range(len(frame))]
        b = dec.decode(cuts, recv_ts=0)
        # a cut that is itself valid JSON is a number prefix at top level: none here
        assert len(b.errors) == len(cuts), [c for i, c in enumerate(cuts) if i not in {e[0] for e in b.errors}]
        assert b.rows == 0


def test_random_bytes_never_crash():
    r = random.Random(1234)
    dec = Decoder()
    junk = [bytes(r.randrange(256) for _ in range(r.randrange(80))) for _ in range(20000)]
    junk += [framegen.mutate(r, TICK) for _ in range(20000)]
    b = dec.decode(junk, recv_ts=0)
    assert len(b.errors) + len(b.control) + b.rows >= len(junk) - b.rows  # every frame accounted
    ref = reference.decode(junk, 0)
    assert [i for i, _ in b.errors] == ref["errors"]


# ---- inputs and entry points -------------------------------------------------------


def test_bytes_like_inputs():
    dec = Decoder()
    b = dec.decode([TICK, bytearray(TICK), memoryview(TICK), np.frombuffer(TICK, np.uint8)], recv_ts=0)
    assert len(b.ticks) == 4 and len(set(b.ticks.tobytes()[i * 40:(i + 1) * 40] for i in range(4))) == 1
    with pytest.raises(TypeError, match="frame 0 is a str"):
        dec.decode([TICK.decode()])


def test_recv_ts_forms():
    dec = Decoder()
    before = fastfeed.now_us()
    b = dec.decode([TICK, TICK])
    assert before <= b.ticks["recv_ts"][0] <= fastfeed.now_us()
    assert dec.decode([TICK, TICK], recv_ts=[5, 6]).ticks["recv_ts"].tolist() == [5, 6]
    assert dec.decode([TICK], recv_ts=np.array([9])).ticks["recv_ts"].tolist() == [9]
    with pytest.raises(ValueError, match="2 entries for 1 frames"):
        dec.decode([TICK], recv_ts=[1, 2])


def test_decode_buffer_ndjson():
    dec = Decoder()
    data = TICK + b"\n\n" + QUOTE + b"\r\n  \n" + b"garbage\n" + SERIES
    b = dec.decode_buffer(data, recv_ts=1)
    assert (len(b.ticks), len(b.quotes), len(b.bars), b.frames) == (1, 1, 1, 4)
    assert [i for i, _ in b.errors] == [2]


def test_decode_region_reads_frames_in_place():
    dec = Decoder()
    region = bytearray(b"....") + TICK + b"xx" + QUOTE + b"!"
    offsets = [4, 4 + len(TICK) + 2]
    b = dec.decode_region(region, offsets, [len(TICK), len(QUOTE)], [10, 20], 2)
    assert (len(b.ticks), len(b.quotes)) == (1, 1)
    assert (b.ticks["recv_ts"][0], b.quotes["recv_ts"][0]) == (10, 20)
    b = dec.decode_region(region, offsets, [len(TICK), len(QUOTE)], [10, 20], 1)
    assert (len(b.ticks), len(b.quotes)) == (1, 0)
    with pytest.raises(ValueError, match="outside the buffer"):
        dec.decode_region(region, [len(region)], [1], [0])


def test_error_store_is_bounded_and_keeps_raw_bytes():
    dec = Decoder(error_store=3)
    dec.decode([b"bad%d" % i for i in range(10)])
    assert len(dec.last_errors) == 3 and dec.last_errors[-1][1] == b"bad9"
    assert dec.stats()["errors"] == 10 and dec.stats()["frames"] == 10


def test_symbol_ids_are_stable_across_batches():
    dec = Decoder()
    a = dec.decode([b'{"c":"A","p":1}', b'{"c":"B","p":1}'])
    b = dec.decode([b'{"c":"B","p":1}', b'{"c":"C","p":1}', b'{"c":"A","p":1}'])
    assert a.ticks["sym"].tolist() == [0, 1] and b.ticks["sym"].tolist() == [1, 2, 0]
    assert list(dec.symbols) == ["A", "B", "C"]


def test_status_and_bar_type_interning():
    dec = Decoder()
    b = dec.decode([b'{"c":"A","ss":"OPEN"}', b'{"c":"A","ss":"CLOSED"}', b'{"c":"A","ss":"OPEN"}', b'{"c":"A","b":1}'])
    assert [dec.statuses[i] for i in b.quotes["status"]] == ["OPEN", "CLOSED", "OPEN", ""]


def test_status_table_overflow_is_a_clear_error():
    dec = Decoder()
    b = dec.decode([b'{"c":"A","ss":"S%d"}' % i for i in range(300)])
    assert len(b.quotes) == 255 and len(b.errors) == 45
    assert "status table full" in b.errors[0][1]


# ---- what the tables hold: frames that fail, tables that are full ----------------------


def tables(dec: Decoder) -> tuple[list[str], list[str], list[str]]:
    return list(dec.symbols), list(dec.statuses), list(dec.bar_types)


def test_a_failing_frame_adds_no_symbol():
    dec = Decoder()
    dec.decode([TICK])
    # the documented tick layout, decoded whole, then garbage after it
    b = dec.decode([b'{"c":"NEW","t":1,"p":1,"v":1}x'])
    assert "trailing characters" in b.errors[0][1]
    assert len(dec.symbols) == 1
    b = dec.decode([b'{"c":"OTHER","p":1}', b'{"c":"NEW","p":2}'])
    assert b.ticks["sym"].tolist() == [1, 2]  # as if the bad frame had never come
    assert list(dec.symbols) == ["NASDAQ:AAPL", "OTHER", "NEW"]


# Each adds a new symbol, and most a new status or bar type, before failing.
FAILING_WITH_NEW_CODES = [
    # malformed JSON after the codes
    b'{"c":"NEW","t":1,"p":1,"v":1}x',
    b'{"c":"NEW","lt":1,"v":1,"lp":1,"a":1,"b":1,"as":1,"bs":1},',
    b'{"c":"NEW","be":1,"lu":1,"bt":"NEWBT","s":[{"t":1,"o":1,"h":1,"l":1,"c":1,"v":1}]}]',
    b'{"c":"NEW","ss":"NEWSS","lp":1,}',
    b'{"c":"NEW","ss":"NEWSS","lp":1} {"c":"X"}',
    b'[{"c":"NEW","p":1},{"c":"NEW2","ss":"NEWSS","lp":1}',
    b'[{"c":"NEW","t":1,"p":1,"v":1} {"c":"X","p":1}]',
    b'{"c":"N\\u0045W","ss":"NEWSS","lp":1}}',
    # a wrong type, in the message itself or in a later one of its array
    b'{"c":"NEW","p":"oops"}',
    b'{"c":"NEW","ss":"NEWSS","lp":true}',
    b'{"c":"NEW","bt":"NEWBT","s":[{"o":"1"}]}',
    b'[{"c":"NEW","t":1,"p":1,"v":1},{"c":"X","p":"oops"}]',
    b'[{"c":"NEW","ss":"NEWSS","lp":1},{"c":"NEW2","bt":"NEWBT","s":[]},{"p":1}]',
    b'[{"c":"NEW","be":1,"lu":1,"bt":"NEWBT","s":[{"t":1,"o":1,"h":1,"l":1,"c":1,"v":1}]},{"c":"X","t":1e999,"p":1}]',
    # truncated
    b'{"c":"NEW","t":1,"p":1,"v":1',
    b'[{"c":"NEW","ss":"NEWSS","lp":1}',
    b'[{"c":"NEW","be":1,"lu":1,"bt":"NEWBT","s":[{"t":1,"o":1,"h":1,"l":1,"c":1,"v":1}]},',
    # a code too long for any table, after the others
    b'[{"c":"NEW","ss":"NEWSS","lp":1},{"c":"' + b"L" * 65536 + b'","p":1}]',
]


@pytest.mark.parametrize("frame", FAILING_WITH_NEW_CODES)
def test_no_kind_of_failing_frame_adds_codes(frame):
    dec = Decoder()
    dec.decode([TICK, QUOTE, SERIES])
    before = tables(dec)
    b = dec.decode([frame] * 2, recv_ts=0)
    assert [i for i, _ in b.errors] == [0, 1] and b.rows == 0
    assert tables(dec) == before
    # the same codes from a good frame do go in, with the next ids
    b = dec.decode([b'[{"c":"NEW","ss":"NEWSS","lp":1},{"c":"NEW","bt":"NEWBT","s":[{"t":1}]}]'])
    assert (b.quotes["sym"].tolist(), b.quotes["status"].tolist()) == ([1], [1])
    assert (b.bars["sym"].tolist(), b.bars["bar_type"].tolist()) == ([1], [2])
    assert tables(dec) == (before[0] + ["NEW"], before[1] + ["NEWSS"], before[2] + ["NEWBT"])


def test_no_truncation_of_frames_with_new_codes_adds_codes():
    dec = Decoder()
    frame = (b'[{"c":"A","t":1,"p":1,"v":1},{"c":"B","ss":"S","lp":1},'
             b'{"c":"C","be":1,"lu":1,"bt":"1h","s":[{"t":1,"o":1,"h":1,"l":1,"c":1,"v":1}]},'
             b'{"c":"D","lt":1,"v":1,"lp":1,"a":1,"b":1,"as":1,"bs":1}]')
    b = dec.decode([frame[:i] for i in range(len(frame))], recv_ts=0)
    assert len(b.errors) == len(frame) and b.rows == 0
    assert tables(dec) == ([], [""], [""])
    b = dec.decode([frame], recv_ts=0)
    assert tables(dec) == (["A", "B", "C", "D"], ["", "S"], ["", "1h"])
    assert b.ticks["sym"].tolist() == [0] and b.quotes["sym"].tolist() == [1, 3]
    assert b.quotes["status"].tolist() == [1, 0]
    assert (b.bars["sym"].tolist(), b.bars["bar_type"].tolist()) == ([2], [1])


def test_new_codes_get_their_ids_wherever_they_appear_in_a_frame():
    dec = Decoder()
    dec.decode([b'{"c":"OLD","p":1}'])
    frame = b"[" + b",".join(
        [b'{"c":"S%d","t":%d,"p":1,"v":1}' % (i % 3000, i) for i in range(5000)]
        + [b'{"c":"S7","ss":"NEW","lp":1}', b'{"c":"OLD","lt":1,"v":1,"lp":1,"a":1,"b":1,"as":1,"bs":1}',
           b'{"c":"S\\u0031","be":1,"lu":1,"bt":"2h","s":[{"t":1},{"t":2}]}', b'{"c":"S9","ss":"NEW","bt":"2h","s":[]}']
    ) + b"]"
    b = dec.decode([frame, b'{"c":"S1","ss":"NEW","lp":1}', b'{"c":"S3000","p":1}'])
    assert not b.errors
    assert list(dec.symbols) == ["OLD"] + [f"S{i}" for i in range(3001)]
    assert b.ticks["sym"].tolist() == [1 + i % 3000 for i in range(5000)] + [3001]
    assert b.quotes["sym"].tolist() == [8, 0, 2] and b.quotes["status"].tolist() == [1, 0, 1]
    assert b.bars["sym"].tolist() == [2, 2] and b.bars["bar_type"].tolist() == [1, 1]
    assert list(dec.statuses) == ["", "NEW"] and list(dec.bar_types) == ["", "2h"]


def test_a_full_symbol_table_makes_each_frame_needing_a_new_symbol_an_error():
    dec = Decoder(symbols=SymbolTable(capacity=4))
    b = dec.decode([b'{"c":"S%d","p":1}' % i for i in range(4)])
    assert not b.errors and len(dec.symbols) == 4
    frames = [
        b'{"c":"NEW","p":1}',                                     # 0 general path
        b'{"c":"NEW","t":1,"p":1,"v":1}',                         # 1 tick layout
        b'{"c":"S1","p":2}',                                      # 2 known: fine
        b'[{"c":"S2","p":3},{"c":"NEW","p":4},{"c":"NEW2","p":5}]',  # 3 once for the frame
        b'{"c":"NEW","lt":1,"v":1,"lp":1,"a":1,"b":1,"as":1,"bs":1}',  # 4 quote layout
        b'{"c":"NEW","be":1,"lu":1,"bt":"1h","s":[{"t":1,"o":1,"h":1,"l":1,"c":1,"v":1}]}',  # 5
        b'{"c":"S3","p":"oops"}',                                 # 6 another error
        b'{"c":"S3","lt":1,"v":1,"lp":1,"a":1,"b":1,"as":1,"bs":1}',  # 7 known: fine
    ]
    b = dec.decode(frames, recv_ts=0)
    assert [i for i, _ in b.errors] == [0, 1, 3, 4, 5, 6]
    assert b.errors[0][1] == "symbol table full (4 symbols): raise max_symbols= (byte 6)"
    assert b.errors[2][1] == (f"symbol table full (4 symbols): raise max_symbols= "
                              f"(byte {frames[3].index(b'NEW')})")
    assert all(r.startswith("symbol table full (4 symbols): raise max_symbols=") for _, r in b.errors[:5])
    assert "expected number or null" in b.errors[5][1]
    assert b.ticks["sym"].tolist() == [1] and b.quotes["sym"].tolist() == [3] and len(b.bars) == 0
    assert list(dec.symbols) == ["S0", "S1", "S2", "S3"] and list(dec.bar_types) == [""]
    assert (dec.symbols_full_total, dec.errors_total) == (5, 6)
    assert dec.stats()["symbols_full"] == 5 and dec.stats()["errors"] == 6
    dec.decode([b'{"c":"NEW","p":1}', b'{"c":"S0","p":1}'])
    assert (dec.symbols_full_total, dec.errors_total) == (6, 7)


def test_a_symbol_table_out_of_bytes_for_codes_is_full_too():
    dec = Decoder(symbols=SymbolTable(capacity=4))  # 4 * 48 bytes for codes
    b = dec.decode([b'{"c":"%s","p":1}' % (c * 100) for c in (b"A", b"B")])
    assert [i for i, _ in b.errors] == [1] and len(dec.symbols) == 1
    assert b.errors[0][1] == ("symbol table full (its 192 bytes for codes are used up, 48 per entry): "
                              "raise max_symbols= (byte 6)")
    assert dec.symbols_full_total == 1


def test_a_code_too_long_is_an_error_but_not_a_full_table():
    dec = Decoder()
    b = dec.decode([b'{"c":"%s","p":1}' % (b"A" * 65536), b'{"c":"%s","p":1}' % (b"A" * 65535)])
    assert b.errors == [(0, "symbol code too long (65536 bytes, the most is 65535) (byte 6)")]
    assert len(dec.symbols) == 1 and dec.symbols_full_total == 0
    assert fastfeed._decoder.MAX_CODE_BYTES == 65535


def test_symbol_codes_up_to_the_limit_decode():
    """1024 bytes was the limit once: long codes are fine up to 65,535 bytes."""
    dec = Decoder()
    codes = [b"X" * n for n in (1024, 1025, 5000, 65535)]
    b = dec.decode([b'{"c":"%s","p":1}' % c for c in codes], recv_ts=0)
    assert not b.errors and [dec.symbols[i] for i in b.ticks["sym"]] == [c.decode() for c in codes]


@pytest.mark.parametrize(
    "kwargs,frames,error",
    [
        (dict(max_symbols=2), [b'{"c":"S%d","p":1}' % i for i in range(3)],
         "symbol table full (2 symbols): raise max_symbols= (byte 6)"),
        (dict(max_statuses=3), [b'{"c":"A","ss":"S%d"}' % i for i in range(3)],
         "status table full (3 statuses): raise max_statuses= (byte 15)"),
        (dict(max_bar_types=2), [b'{"c":"A","bt":"B%d"}' % i for i in range(2)],
         "bar type table full (2 bar types): raise max_bar_types= (byte 15)"),
        (dict(), [b'{"c":"A","ss":"S%d"}' % i for i in range(256)],
         "status table full (256 statuses, all that the row's status (u1) numbers) (byte 15)"),
    ],
)
def test_each_limit_is_an_error_naming_it_and_its_setting(kwargs, frames, error):
    dec = Decoder(**kwargs)
    b = dec.decode(frames, recv_ts=0)
    assert [r for _, r in b.errors] == [error]
    assert b.errors[0][0] == len(frames) - 1 and dec.symbols_full_total == 1


def test_limits_can_be_raised():
    dec = Decoder(max_symbols=100_000, max_bar_types=32768)
    assert dec.symbols.capacity == 100_000 and dec.bar_types.capacity == 32768
    b = dec.decode([b'{"c":"S%d","p":1}' % i for i in range(70_000)], recv_ts=0)
    assert not b.errors and len(dec.symbols) == 70_000 and b.ticks["sym"].max() == 69_999
    b = dec.decode([b'{"c":"A","bt":"B%d","s":[{"t":1}]}' % i for i in range(5000)], recv_ts=0)
    assert not b.errors and len(dec.bar_types) == 5001 and b.bars["bar_type"].max() == 5000


@pytest.mark.parametrize("kw,bad", [("max_symbols", 0), ("max_statuses", 257), ("max_bar_types", 32769),
                                    ("max_bar_types", True), ("max_symbols", 1.5)])
def test_limits_out_of_range_are_refused(kw, bad):
    with pytest.raises(ValueError, match=kw):
        Decoder(**{kw: bad})


def test_the_nat_timestamp_is_an_error():
    """INT64_MIN is NaT, the missing-time marker: a time that lands on it exactly is refused
    as out of range rather than read as missing."""
    _, b = one(b'{"c":"X","t":-9223372036854.775808,"p":1}')
    assert len(b.errors) == 1 and "out of int64 range" in b.errors[0][1]
    _, b = one(b'{"c":"X","t":-9223372036854.775807,"p":1}')
    assert not b.errors and b.ticks["ts"][0] == -(2**63) + 1


def test_full_status_and_bar_type_tables_are_errors_that_add_nothing():
    dec = Decoder(statuses=SymbolTable(capacity=3, reserve_empty=True),
                  bar_types=SymbolTable(capacity=2, reserve_empty=True))
    b = dec.decode([b'{"c":"A","ss":"OPEN","lp":1}', b'{"c":"A","ss":"HALT","lp":1}',
                    b'{"c":"A","bt":"1m","s":[{"t":1}]}'])
    assert not b.errors
    frames = [
        b'{"c":"NEW","ss":"CLOSED","lp":1}',
        b'{"c":"NEW","be":1,"lu":1,"bt":"1h","s":[{"t":1,"o":1,"h":1,"l":1,"c":1,"v":1}]}',
        b'[{"c":"NEW2","p":1},{"c":"A","bt":"1h","s":[]}]',
        b'{"c":"NEW","ss":"HALT","bt":"1m","s":[{"t":2}]}',
    ]
    b = dec.decode(frames, recv_ts=0)
    at = [frames[0].index(b"CLOSED"), frames[1].index(b"1h"), frames[2].index(b"1h")]
    assert b.errors == [(0, f"status table full (3 statuses): raise max_statuses= (byte {at[0]})"),
                        (1, f"bar type table full (2 bar types): raise max_bar_types= (byte {at[1]})"),
                        (2, f"bar type table full (2 bar types): raise max_bar_types= (byte {at[2]})")]
    # nothing of the failed frames went in, not even their new symbols
    assert tables(dec) == (["A", "NEW"], ["", "OPEN", "HALT"], ["", "1m"])
    assert b.bars["sym"].tolist() == [1] and b.bars["bar_type"].tolist() == [1]
    assert (dec.symbols_full_total, dec.errors_total) == (3, 3)


def test_a_status_table_larger_than_the_status_field_is_full_at_256():
    dec = Decoder(statuses=SymbolTable(capacity=1024, reserve_empty=True))
    b = dec.decode([b'{"c":"A","ss":"S%d"}' % i for i in range(257)])
    assert len(b.quotes) == 255 and [i for i, _ in b.errors] == [255, 256]
    assert b.errors[0][1] == "status table full (256 statuses, all that the row's status (u1) numbers) (byte 15)"
    assert len(dec.statuses) == 256 and dec.symbols_full_total == 2


# ---- symbol tables shared between processes ------------------------------------------


def test_symbol_table_over_a_buffer_is_shared():
    buf = bytearray(SymbolTable.nbytes(1000))
    t1 = SymbolTable(buf, capacity=1000)
    d1 = Decoder(symbols=t1)
    d1.decode([b'{"c":"A","p":1}'])
    d2 = Decoder(symbols=SymbolTable(buf))
    b = d2.decode([b'{"c":"B","p":1}', b'{"c":"A","p":1}'])
    assert b.ticks["sym"].tolist() == [1, 0]
    assert list(t1) == ["A", "B"]
    with pytest.raises(ValueError, match="too small"):
        SymbolTable(bytearray(100), capacity=1000)
    with pytest.raises(ValueError, match="something other"):
        SymbolTable(bytearray(b"\x01" * SymbolTable.nbytes(10)), capacity=10)


def _intern_in_child(name: str, codes: list[str], out) -> None:
    shm = shared_memory.SharedMemory(name=name)
    try:
        t = SymbolTable(shm.buf)
        dec = Decoder(symbols=t)
        frames = [b'{"c":"%s","p":1}' % c.encode() for c in codes]
        b = dec.decode(frames)
        out.put([t[i] for i in b.ticks["sym"]])
        del t, dec, b
    finally:
        shm.close()


def test_symbol_ids_agree_across_processes():
    ctx = mp.get_context("spawn")
    shm = shared_memory.SharedMemory(create=True, size=SymbolTable.nbytes(4096))
    try:
        table = SymbolTable(shm.buf, capacity=4096)
        codes = [f"EX:S{i}" for i in range(2000)]
        out = ctx.Queue()
        procs = [ctx.Process(target=_intern_in_child, args=(shm.name, random.Random(s).sample(codes, 2000), out)) for s in range(3)]
        for p in procs:
            p.start()
        results = [out.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
        # every process saw its own codes back through the shared ids
        assert all(sorted(r) == sorted(codes) for r in results)
        assert len(table) == 2000 and sorted(table) == sorted(codes)
        del table
    finally:
        shm.close()
        shm.unlink()


def _shared_tables(buf, caps: list[int]) -> list[SymbolTable]:
    out, off = [], 0
    for cap in caps:
        n = SymbolTable.nbytes(cap)
        out.append(SymbolTable(buf[off:off + n], capacity=cap, reserve_empty=True))
        off += n
    return out


def _decode_in_child(name: str, caps: list[int], job: int, roles: list[str], frames: list[bytes],
                     start, out) -> None:
    shm = shared_memory.SharedMemory(name=name)
    try:
        t = _shared_tables(shm.buf, caps)
        dec = Decoder(**dict(zip(roles, t, strict=True)))
        start.wait(60)  # all together, so that they do race
        try:
            b = dec.decode(frames, recv_ts=0)
            sy, st, bt = list(dec.symbols), list(dec.statuses), list(dec.bar_types)
            out.put({
                "job": job,
                "errors": [i for i, _ in b.errors],
                "full": dec.symbols_full_total,
                "quotes": [(sy[r[0]], st[r[1]]) for r in b.quotes[["sym", "status"]].tolist()],
                "bars": [(sy[r[0]], bt[r[1]]) for r in b.bars[["sym", "bar_type"]].tolist()],
            })
            del b
        except Exception as e:
            out.put({"job": job, "failed": repr(e)})
        del t, dec
    finally:
        shm.close()


def _run_children(caps: list[int], jobs: list[tuple[list[str], list[bytes]]]):
    ctx = mp.get_context("spawn")
    shm = shared_memory.SharedMemory(create=True, size=sum(SymbolTable.nbytes(c) for c in caps))
    procs = []
    try:
        tables_ = _shared_tables(shm.buf, caps)
        out, start = ctx.Queue(), ctx.Barrier(len(jobs))
        procs = [ctx.Process(target=_decode_in_child, args=(shm.name, caps, j, roles, frames, start, out))
                 for j, (roles, frames) in enumerate(jobs)]
        for p in procs:
            p.start()
        results = sorted((out.get(timeout=120) for _ in procs), key=lambda r: r["job"])
        assert [r.get("failed") for r in results] == [None] * len(procs)
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
        return results, [list(t) for t in tables_]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        del tables_
        shm.close()
        shm.unlink()


def test_shared_tables_filling_up_concurrently_take_all_of_a_frame_or_nothing():
    # Three workers, each with its own new symbols, race to fill a shared status table
    # with room for 15 of 40 statuses: a frame whose status does not fit must leave its
    # symbol out of the (roomy) shared symbol table too.
    def frames(w):
        return [b'{"c":"W%d-%d","ss":"ST%d","lp":1}' % (w, i, i % 40) for i in range(400)]

    results, (symbols, statuses) = _run_children(
        [4096, 16], [(["symbols", "statuses"], frames(w)) for w in range(3)])
    assert len(statuses) == 16 and len(set(statuses)) == 16
    decoded = set()
    for w, r in enumerate(results):
        for i in range(400):
            fits = f"ST{i % 40}" in statuses
            assert (i not in r["errors"]) == fits, (w, i)
            if fits:
                decoded.add(f"W{w}-{i}")
        assert r["quotes"] == [(f"W{w}-{i}", f"ST{i % 40}") for i in range(400) if i not in r["errors"]]
        assert r["full"] == len(r["errors"]) > 0
    assert sorted(symbols[1:]) == sorted(decoded)  # [0] is the reserved ""


def test_processes_taking_shared_tables_in_opposite_roles_do_not_deadlock():
    # Every frame adds a code to both tables, which one process locks as (symbols, bar
    # types) and the other as (bar types, symbols).  (Locking them in role order hangs
    # here within a few thousand frames.)
    n = 16000

    def frames(w):
        return [b'{"c":"P%d-%d","bt":"B%d-%d","s":[{"t":1}]}' % (w, i, w, i) for i in range(n)]

    results, (one, two) = _run_children(
        [32768, 32768], [(["symbols", "bar_types"], frames(0)), (["bar_types", "symbols"], frames(1))])
    for w, r in enumerate(results):
        assert r["errors"] == [] and r["full"] == 0
        assert r["bars"] == [(f"P{w}-{i}", f"B{w}-{i}") for i in range(n)]
    assert sorted(one[1:]) == sorted([f"P0-{i}" for i in range(n)] + [f"B1-{i}" for i in range(n)])
    assert sorted(two[1:]) == sorted([f"B0-{i}" for i in range(n)] + [f"P1-{i}" for i in range(n)])


# ---- differential ------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_differential_against_reference(seed):
    """100,000 generated frames in all: valid, reordered, pretty-printed, odd and broken."""
    frames = framegen.frames(seed, 20_000)
    dec = Decoder()
    batch = dec.decode(frames, recv_ts=7)
    assert reference.mismatches(frames, reference.fast_rows(dec, batch), reference.decode(frames, 7)) == []
    # the generator must exercise every path, or the comparison proves little
    assert min(len(batch.ticks), len(batch.quotes), len(batch.bars), len(batch.errors), len(batch.control)) > 500


@st.composite
def frame_lists(draw):
    seed = draw(st.integers(0, 2**32))
    n = draw(st.integers(1, 40))
    return framegen.frames(seed, n, corrupt=0.1)


@given(frame_lists())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_differential_hypothesis(frames):
    dec = Decoder()
    batch = dec.decode(frames, recv_ts=7)
    assert reference.mismatches(frames, reference.fast_rows(dec, batch), reference.decode(frames, 7)) == []


# ---- same input, same bytes ----------------------------------------------------------------

# Bytes of each row that no field covers (alignment padding): (dtype, [(offset, size)]).
PADDING = [
    (TICK_DTYPE, [(4, 4)]),       # sym i4 | pad 4 | ts i8 ...
    (QUOTE_DTYPE, [(5, 3)]),      # sym i4 | status u1 | pad 3 | ts i8 ...
    (BAR_DTYPE, [(6, 2)]),        # sym i4 | bar_type i2 | pad 2 | ts i8 ...
]


def test_padding_is_where_the_test_says():
    for dt, pads in PADDING:
        covered = np.zeros(dt.itemsize, bool)
        for name in dt.names:
            f, off = dt.fields[name][:2]
            covered[off:off + f.itemsize] = True
        assert [(int(i), 1) for i in np.flatnonzero(~covered)] == [(o + k, 1) for o, n in pads for k in range(n)]


def _dirty_heap():
    # freed blocks full of 0xAB: a decoder that takes memory without writing all of it
    # would hand these bytes out
    junk = [bytearray(b"\xab" * (1 << n)) for n in range(10, 22)]
    del junk


def test_same_frames_give_the_same_bytes_whatever_memory_held_before():
    frames = framegen.frames(11, 3000, corrupt=0.0) + [TICK, QUOTE, SERIES] * 50
    noise = framegen.frames(12, 3000, corrupt=0.2)
    fresh = Decoder()
    want = fresh.decode(frames, recv_ts=5)
    _dirty_heap()
    used = Decoder()
    used.decode(noise, recv_ts=-1)   # its row buffers now hold other rows
    _dirty_heap()
    # ids differ between decoders with different histories: the padding is compared here,
    # whole rows below
    got = used.decode(frames, recv_ts=5)
    for kind, (dt, pads) in zip(("ticks", "quotes", "bars"), PADDING, strict=True):
        a, b = getattr(want, kind), getattr(got, kind)
        assert len(a) == len(b) > 100
        for arr in (a, b):
            raw = arr.view(np.uint8).reshape(len(arr), dt.itemsize)
            for off, n in pads:
                assert not raw[:, off:off + n].any(), f"{kind}: padding bytes {off}..{off + n - 1} not zero"
    # a fresh decoder over a dirty heap gives the very same bytes as the first one
    _dirty_heap()
    again = Decoder().decode(frames, recv_ts=5)
    for kind in ("ticks", "quotes", "bars"):
        x, y = getattr(want, kind), getattr(again, kind)
        assert hashlib.sha256(x.tobytes()).hexdigest() == hashlib.sha256(y.tobytes()).hexdigest()


_SIMD_CHILD = """
import hashlib, json, sys
from fastfeed import Decoder
from tests import framegen
dec = Decoder()
h = hashlib.sha256()
for layout in ("shuffled", "compact", "spaced"):
    frames = framegen.stream("mixed", layout, 400, seed=31)
    frames += [f[:-1] for f in frames[:50]] + [f.replace(b'":', b'" :', 1) for f in frames[50:100]]
    b = dec.decode(frames, recv_ts=0)
    for a in (b.ticks, b.quotes, b.bars):
        h.update(a.tobytes())
    h.update(repr(b.errors).encode())
print(json.dumps({"simd": dec.simd, "flat": dec._flat_frames, "hash": h.hexdigest()}))
"""


def _simd_child(level: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("FASTFEED_SIMD", None)
    if level is not None:
        env["FASTFEED_SIMD"] = level
    root = str(Path(fastfeed.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", _SIMD_CHILD], env=env, capture_output=True, text=True,
                          timeout=120)


def test_fastfeed_simd_caps_the_vector_unit_and_changes_no_byte():
    """FASTFEED_SIMD, read at import (so in every worker), caps the vector unit of the
    decoder's structure-first paths: at every level the CPU has, the same frames (keys
    shuffled, compact, spaced, cut short, broken) give the same rows, padding included, and
    the same errors; from AVX2 up the structure-first paths take some of them."""
    from fastfeed._decoder import SIMD_LEVELS

    best = json.loads(_simd_child(None).stdout)
    assert best["simd"] in SIMD_LEVELS
    for level in SIMD_LEVELS[:SIMD_LEVELS.index(best["simd"]) + 1]:
        proc = _simd_child(level)
        assert proc.returncode == 0, proc.stderr[-2000:]
        got = json.loads(proc.stdout)
        assert got["simd"] == level
        assert got["hash"] == best["hash"], level
        assert (got["flat"] > 0) == (level != "none"), (level, got["flat"])


def test_fastfeed_simd_with_a_name_it_does_not_know_is_a_clear_error():
    proc = _simd_child("avx1024")
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "FASTFEED_SIMD='avx1024'" in last and "none, avx2, avx512, avx512vbmi2" in last, last
