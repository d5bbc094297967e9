"""Seeded random feed frames for differential tests: valid, odd and broken.

Frames are rendered by hand (not json.dumps) so that number texts, escapes,
whitespace, key order and repeated keys can all vary.
"""

from __future__ import annotations

import json
import random

WS = ["", "", "", " ", "\n", "\n  ", "\t", " \r\n "]


class N:
    """A number with its exact text."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


class Obj:
    """An object as a list of pairs: order and repetition are kept."""

    __slots__ = ("pairs",)

    def __init__(self, pairs: list) -> None:
        self.pairs = pairs


def _esc_char(r: random.Random, ch: str) -> str:
    cp = ord(ch)
    if ch == '"':
        return '\\"'
    if ch == "\\":
        return "\\\\"
    if cp < 0x20:
        return {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\b": "\\b", "\f": "\\f"}.get(
            ch, f"\\u{cp:04x}"
        )
    roll = r.random()
    if roll < 0.05:
        if cp >= 0x10000:
            v = cp - 0x10000
            return f"\\u{0xD800 + (v >> 10):04X}\\u{0xDC00 + (v & 0x3FF):04x}"
        return f"\\u{cp:04x}"
    if roll < 0.07 and ch == "/":
        return "\\/"
    return ch


def render_str(r: random.Random, s: str) -> str:
    return '"' + "".join(_esc_char(r, ch) for ch in s) + '"'


def render(r: random.Random, v, ws: bool = True) -> str:
    def w() -> str:
        return r.choice(WS) if ws else ""

    if v is None:
        return "null"
    if v is True:
        return "true"
    if v is False:
        return "false"
    if isinstance(v, N):
        return v.text
    if isinstance(v, str):
        return render_str(r, v)
    if isinstance(v, list):
        return "[" + w() + ("," + w()).join(render(r, x, ws) + w() for x in v) + "]"
    if isinstance(v, Obj):
        items = [w() + render_str(r, k) + w() + ":" + w() + render(r, x, ws) + w() for k, x in v.pairs]
        return "{" + ",".join(items) + (w() if not items else "") + "}"
    raise TypeError(type(v))


SYMBOLS = [
    "NASDAQ:AAPL", "NASDAQ:TSLA", "NYSE:IBM", "LSE:VOD", "XETRA:SAP", "BINANCE:BTCUSDT",
    "TSE:7203", "É:ÉCOLE", "東証:トヨタ", "X:😀", 'Q:"QUOTED"', "A/B\\C", "", "S:\tTAB",
]


def price(r: random.Random) -> N:
    roll = r.random()
    if roll < 0.45:
        return N(f"{r.uniform(0.01, 5000):.2f}")
    if roll < 0.6:
        return N(repr(r.uniform(-1e6, 1e6)))
    if roll < 0.7:
        return N(str(r.randint(-(10**6), 10**12)))
    if roll < 0.78:
        m = f"{r.uniform(1, 10):.{r.randint(0, 17)}f}"
        return N(f"{m}{r.choice('eE')}{r.choice(['', '+', '-'])}{r.randint(0, 40)}")
    if roll < 0.84:  # more digits than a double holds
        return N(str(r.randint(1, 9)) + "".join(r.choice("0123456789") for _ in range(r.randint(17, 40))) + "." + str(r.randint(0, 999)))
    if roll < 0.88:
        return N(r.choice(["0", "-0", "0.0", "-0.0", "1e308", "1e-320", "2.2250738585072014e-308", "1e400", "-1e400", "4.9e-324", "9007199254740993", "0.1", "1e23", "8.98846567431158e307"]))
    if roll < 0.94:
        return N(f"0.{'0' * r.randint(0, 8)}{r.randint(1, 10**r.randint(1, 12))}")
    return N(f"{r.randint(0, 10**6)}.{r.randint(0, 10**8):0{r.randint(1, 9)}d}")


def seconds(r: random.Random) -> N:
    base = r.randint(1_600_000_000, 1_800_000_000)
    roll = r.random()
    if roll < 0.5:
        return N(f"{base}.{r.randint(0, 999999):06d}")
    if roll < 0.6:
        return N(f"{base}.0")
    if roll < 0.65:
        return N(str(base))
    if roll < 0.75:  # more than six fraction digits: round half to even
        frac = f"{r.randint(0, 999999):06d}" + r.choice(["5", "50", "500000", "4999", "51", "5000001", str(r.randint(0, 10**9))])
        return N(f"{base}.{frac}")
    if roll < 0.85:
        digits = f"{base}{r.randint(0, 999999):06d}"
        e = r.randint(0, 12)
        return N(f"{digits[0]}.{digits[1:]}{r.choice('eE')}{r.choice(['', '+'])}{e}")
    if roll < 0.9:
        return N(f"{base * 1000 + r.randint(0, 999)}e-3")
    if roll < 0.95:
        return N(r.choice(["0", "-1.5", "-0.0000005", "0.0000015", "0.0000025", "1e-7", "9223372036854.775807", "-9223372036854.775807", "9223372036854.775808", "1e13", "1e12", "123456789e-300"]))
    return N(f"{r.randint(-10**15, 10**15)}.{r.randint(0, 10**20)}")


def millis(r: random.Random) -> N:
    roll = r.random()
    if roll < 0.85:
        return N(str(r.randint(1_600_000_000_000, 1_800_000_000_000)))
    if roll < 0.95:
        return N(f"{r.randint(1_600_000_000_000, 1_800_000_000_000)}.{r.randint(0, 9999)}")
    return N(r.choice(["9223372036854775", "9223372036854776", "1.7e12", "0"]))


def junk(r: random.Random, depth: int = 0):
    roll = r.random()
    if depth < 3 and roll < 0.15:
        return [junk(r, depth + 1) for _ in range(r.randint(0, 3))]
    if depth < 3 and roll < 0.3:
        return Obj([(r.choice(["x", "meta", "c", "p", "t", "é", "k\u0000"]), junk(r, depth + 1)) for _ in range(r.randint(0, 3))])
    return r.choice([None, True, False, N("1"), N("-2.5e-3"), "str", "", "\u00e9\u6771", price(r)])


def wrong(r: random.Random):
    return r.choice(["1.5", "", True, False, [], Obj([]), [N("1")]])


def maybe(r: random.Random, gen, p_null: float = 0.05, p_wrong: float = 0.01):
    roll = r.random()
    if roll < p_null:
        return None
    if roll < p_null + p_wrong:
        return wrong(r)
    return gen(r)


def _finish(r: random.Random, pairs: list) -> Obj:
    if r.random() < 0.3:
        r.shuffle(pairs)
    if r.random() < 0.15:
        for _ in range(r.randint(1, 3)):
            pairs.insert(r.randint(0, len(pairs)), (r.choice(["x", "seq", "src", "exchange", "flags", "cc"]), junk(r)))
    if r.random() < 0.05 and pairs:  # a repeated key: the last one wins
        k, _ = r.choice(pairs)
        pairs.insert(0, (k, wrong(r) if r.random() < 0.5 else junk(r)))
    return Obj(pairs)


def sym(r: random.Random):
    roll = r.random()
    if roll < 0.985:
        return r.choice(SYMBOLS[:7]) if r.random() < 0.9 else r.choice(SYMBOLS)
    return r.choice([None, N("7"), True])


def tick(r: random.Random) -> Obj:
    pairs = [("c", sym(r)), ("t", maybe(r, seconds)), ("p", maybe(r, price)), ("v", maybe(r, price))]
    if r.random() < 0.05:
        pairs.pop(r.choice([0, 1, 3]))
    return _finish(r, pairs)


def quote(r: random.Random) -> Obj:
    keys = [("lt", seconds), ("v", price), ("lp", price), ("a", price), ("b", price), ("as", price), ("bs", price)]
    if r.random() < 0.3:  # partial update
        keys = r.sample(keys, r.randint(1, len(keys)))
    pairs = [("c", sym(r))] + [(k, maybe(r, g)) for k, g in keys]
    if r.random() < 0.3:
        pairs.append(("ss", r.choice(["OPEN", "CLOSED", "PRE", "POST", "HALT", "", None, "ÉTAT"])))
    return _finish(r, pairs)


def bar(r: random.Random) -> Obj:
    pairs = [("t", maybe(r, seconds, 0.02, 0.003))] + [(k, maybe(r, price, 0.02, 0.003)) for k in "ohlcv"]
    if r.random() < 0.1:
        pairs.pop(r.randrange(len(pairs)))
    return _finish(r, pairs)


def series(r: random.Random) -> Obj:
    pairs = [
        ("c", sym(r)),
        ("be", maybe(r, seconds)),
        ("lu", maybe(r, millis)),
        ("bt", r.choice(["1m", "5m", "1h", "1d", "1m", None])),
        ("s", [bar(r) for _ in range(r.choice([1, 1, 1, 2, 3, 0, 5]))]),
    ]
    if r.random() < 0.05:
        pairs.pop(r.choice([1, 2, 3, 4]))
    return _finish(r, pairs)


def control(r: random.Random):
    return r.choice([
        Obj([("email", "ops@example.com")]),
        Obj([("status", "ok"), ("code", N("200"))]),
        Obj([("error", "rate limited"), ("retry", N("1.5"))]),
        Obj([]),
        Obj([("c", "NASDAQ:AAPL"), ("t", "not a time")]),
        "pong",
        N("42"),
        [],
    ])


def message(r: random.Random):
    roll = r.random()
    if roll < 0.55:
        return tick(r)
    if roll < 0.85:
        return quote(r)
    if roll < 0.97:
        return series(r)
    return control(r)


def frame(r: random.Random, corrupt: float = 0.03) -> bytes:
    if r.random() < 0.08:
        v = [message(r) for _ in range(r.randint(0, 4))]
    else:
        v = message(r)
    text = render(r, v, ws=r.random() < 0.3)
    if r.random() < 0.05:
        text = r.choice(WS) + text + r.choice(WS)
    data = text.encode("utf-8")
    if r.random() < corrupt:
        data = mutate(r, data)
    return data


def mutate(r: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    roll = r.random()
    if roll < 0.3 and b:
        del b[r.randrange(len(b)) :]
    elif roll < 0.6 and b:
        b[r.randrange(len(b))] = r.randrange(256)
    elif roll < 0.8:
        b.insert(r.randrange(len(b) + 1), r.choice(b'{}[]",:\\\x00\xff\xc3 0e-.'))
    else:
        b += r.choice([b"x", b",", b"}", b" {}", b"\xe9"])
    return bytes(b)


def frames(seed: int, n: int, corrupt: float = 0.03) -> list[bytes]:
    r = random.Random(seed)
    return [frame(r, corrupt) for _ in range(n)]


# ---- one-layout streams (what the decoder's learned literals lock onto) ----------------

LAYOUTS = ("compact", "spaced", "pretty", "reordered")
KINDS = ("tick", "quote", "series", "mixed")
_KEYS = {
    "tick": ["c", "t", "p", "v"],
    "quote": ["c", "lt", "v", "lp", "a", "b", "as", "bs", "ss"],
    "series": ["c", "be", "lu", "bt", "s"],
    "bar": ["t", "o", "h", "l", "c", "v"],
}


def _stream_message(r: random.Random, kind: str) -> dict:
    c = r.choice(SYMBOLS[:7])
    sec = r.randint(1_700_000_000, 1_760_000_000)
    px = round(r.uniform(1, 900), 2)
    if kind == "tick":
        return {"c": c, "t": float(f"{sec}.{r.randint(0, 999999):06d}"), "p": px,
                "v": float(r.randint(1, 50) * 100)}
    if kind == "quote":
        return {"c": c, "lt": float(sec), "v": float(r.randint(1000, 9_000_000)), "lp": px,
                "a": round(px + 0.01, 2), "b": px, "as": float(r.randint(1, 99) * 10),
                "bs": float(r.randint(1, 99) * 10), "ss": r.choice(["OPEN", "CLOSED", "PRE"])}
    bs = sec - sec % 60
    bars = [{"t": float(bs - 60 * i), "o": px, "h": round(px + 0.2, 2), "l": round(px - 0.2, 2),
             "c": px, "v": float(r.randint(1000, 900000))} for i in range(r.randint(1, 3))]
    return {"c": c, "be": float(bs + 59), "lu": sec * 1000 + r.randint(0, 999),
            "bt": r.choice(["1m", "5m"]), "s": bars}


def _reorder(v: dict, kind: str, orders: dict) -> dict:
    out = {k: v[k] for k in orders[kind]}
    if "s" in out:
        out["s"] = [{k: b[k] for k in orders["bar"]} for b in out["s"]]
    return out


def stream(kind: str, layout: str, n: int, seed: int = 0) -> list[bytes]:
    """``n`` valid frames of one message kind (``mixed``: ticks, quotes and series in
    turn) that all share one layout: ``compact``, ``spaced`` (``", "`` and ``": "``),
    ``pretty`` (indent 2), ``reordered`` (compact, every object's keys in one fixed
    shuffled order) or ``shuffled`` (compact, every object's keys shuffled anew in every
    message: no order for the decoder to learn).  The same (kind, seed) gives the same
    messages in every layout."""
    r = random.Random(seed)
    shuffler = random.Random(seed + 7)
    orders = {k: shuffler.sample(keys, len(keys)) for k, keys in _KEYS.items()}
    kinds = ("tick", "quote", "series") if kind == "mixed" else (kind,)
    out = []
    for i in range(n):
        k = kinds[i % len(kinds)]
        v = _stream_message(r, k)
        if layout == "shuffled":
            orders = {k: shuffler.sample(keys, len(keys)) for k, keys in _KEYS.items()}
        if layout in ("reordered", "shuffled"):
            v = _reorder(v, k, orders)
        if layout == "pretty":
            text = json.dumps(v, indent=2)
        elif layout == "spaced":
            text = json.dumps(v, separators=(", ", ": "))
        elif layout in ("compact", "reordered", "shuffled"):
            text = json.dumps(v, separators=(",", ":"))
        else:
            raise ValueError(layout)
        out.append(text.encode())
    return out
