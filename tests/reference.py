"""An obviously-right reference decoder, in plain Python, for differential tests.

It follows PROTOCOL.md section 3 literally: the standard library's ``json`` for
the grammar, ``decimal`` for exact timestamps, ``float()`` for prices.  Slow and
simple on purpose.  Rows carry codes (not ids), so that they can be compared with
the fast decoder's output after mapping its ids through its tables.
"""

from __future__ import annotations

import json
import math
import struct
from decimal import ROUND_HALF_EVEN, Context, Decimal, localcontext

NAT = -(2**63)
INT64_MAX = 2**63 - 1

QUOTE_KEYS = {"lt", "lp", "a", "b", "as", "bs", "ss"}


class RefError(Exception):
    pass


class Num:
    """A JSON number, kept as its text."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


def _reject_constant(name: str):
    raise RefError(f"{name} is not JSON")


def _check_str(s: str) -> None:
    for ch in s:
        if 0xD800 <= ord(ch) <= 0xDFFF:
            raise RefError("lone surrogate")


def _walk_strings(v) -> None:
    if isinstance(v, str):
        _check_str(v)
    elif isinstance(v, list):
        for x in v:
            _walk_strings(x)
    elif isinstance(v, dict):
        for k, x in v.items():
            _check_str(k)
            _walk_strings(x)


def _pairs(pairs):
    for k, _ in pairs:
        _check_str(k)
    return dict(pairs)  # the last of repeated keys wins


def parse(frame: bytes):
    try:
        text = frame.decode("utf-8")
        v = json.loads(
            text,
            parse_float=Num,
            parse_int=Num,
            parse_constant=_reject_constant,
            object_pairs_hook=_pairs,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise RefError(str(e)) from None
    _walk_strings(v)
    return v


def fixed(v, scale: int) -> int:
    """A number or None as exact int64 units of 10**-scale, half to even."""
    if v is None:
        return NAT
    if not isinstance(v, Num):
        raise RefError("expected a number")
    d = Decimal(v.text)  # exact, whatever the exponent
    if d and d.adjusted() + scale > 40:
        raise RefError("timestamp out of range")
    if d and d.adjusted() + scale < -5:
        return 0  # far below half a unit
    with localcontext(Context(prec=5000)):
        q = d.scaleb(scale).quantize(Decimal(1), rounding=ROUND_HALF_EVEN)
    q = int(q)
    if q > INT64_MAX or q < -INT64_MAX:
        raise RefError("timestamp out of range")
    return q


def real(v) -> float:
    if v is None:
        return math.nan
    if not isinstance(v, Num):
        raise RefError("expected a number")
    return float(v.text)


def opt_str(v) -> str:
    if v is None:
        return ""
    if not isinstance(v, str):
        raise RefError("expected a string")
    return v


FIXED = {"t": 6, "lt": 6, "be": 6, "lu": 3}
REAL = ("p", "v", "lp", "a", "b", "as", "bs")


def _bar(bar) -> tuple:
    if not isinstance(bar, dict):
        raise RefError("bar is not an object")
    return (fixed(bar.get("t"), 6),) + tuple(real(bar.get(k)) for k in "ohlcv")


USED = {  # the keys each kind of message reads; any other key is skipped, whatever it holds
    "ticks": ("c", "t", "p", "v"),
    "quotes": ("c", "lt", "v", "lp", "a", "b", "as", "bs", "ss"),
    "bars": ("c", "be", "lu", "bt", "s"),
}


def message(m: dict, recv_ts: int, out: dict) -> bool:
    """Appends the rows of one message, and its codes to ``out["codes"]`` as (table, code);
    False when it is a control message."""
    if "s" in m or "bt" in m:
        kind = "bars"
    elif "p" in m:
        kind = "ticks"
    elif QUOTE_KEYS & m.keys():
        kind = "quotes"
    else:
        return False
    c = m.get("c")
    if not isinstance(c, str):
        raise RefError("data message without a string c")
    # The fields this kind uses must hold their types; the others are not looked at.
    used = USED[kind]
    f = {k: fixed(m.get(k), n) for k, n in FIXED.items() if k in used}
    r = {k: real(m.get(k)) for k in REAL if k in used}
    ss = opt_str(m.get("ss")) if kind == "quotes" else ""
    bt = opt_str(m.get("bt")) if kind == "bars" else ""
    s = m.get("s")
    if s is not None and not isinstance(s, list):
        raise RefError("s is not an array")
    bars = [_bar(b) for b in s or []]
    out["codes"].append(("symbols", c))
    if kind == "quotes":
        out["codes"].append(("statuses", ss))
    elif kind == "bars":
        out["codes"].append(("bar_types", bt))  # even with no bars
    if kind == "ticks":
        out["ticks"].append((c, f["t"], r["p"], r["v"], recv_ts))
    elif kind == "quotes":
        out["quotes"].append(
            (c, ss, f["lt"], r["lp"], r["v"], r["b"], r["a"], r["bs"], r["as"], recv_ts)
        )
    else:
        for t, o, h, lo, cl, v in bars:
            out["bars"].append((c, bt, t, f["be"], f["lu"], o, h, lo, cl, v, recv_ts))
    return True


MAX_DEPTH = 64  # containers inside one another: 64 levels are accepted, 65 refused


def depth(v) -> int:
    """How many containers the deepest value of ``v`` sits in (a scalar: 0)."""
    deepest, stack = 0, [(v, 1)]
    while stack:
        x, d = stack.pop()
        if isinstance(x, (list, dict)):
            deepest = max(deepest, d)
            stack.extend((y, d + 1) for y in (x.values() if isinstance(x, dict) else x))
    return deepest


def decode(frames: list[bytes], recv_ts: int = 0) -> dict:
    """{'ticks': [...], 'quotes': [...], 'bars': [...], 'errors': [index], 'control': [bytes],
    'ncontrol': int, 'tables': {'symbols': [...], 'statuses': [...], 'bar_types': [...]}}

    ``control``: the frames that hold at least one control message; ``ncontrol``: how many
    control messages there were (a frame that is an array counts each of its elements that
    is not a market-data message; ``[]`` holds none).
    ``tables``: what a fresh decoder's tables hold afterwards, in id order: the codes of
    the frames that decoded, in order of first use (a frame that fails adds none)."""
    out = {"ticks": [], "quotes": [], "bars": [], "errors": [], "control": [], "ncontrol": 0}
    tables: dict[str, list[str]] = {"symbols": [], "statuses": [""], "bar_types": [""]}
    for i, f in enumerate(frames):
        rows = {"ticks": [], "quotes": [], "bars": [], "codes": []}
        try:
            v = parse(f)
            if depth(v) > MAX_DEPTH:
                raise RefError("nesting too deep")
            control = 0
            if isinstance(v, dict):
                control = int(not message(v, recv_ts, rows))
            elif isinstance(v, list):
                for m in v:
                    if isinstance(m, dict):
                        control += not message(m, recv_ts, rows)
                    else:
                        control += 1
            else:
                control = 1
        except RefError:
            out["errors"].append(i)
            continue
        for table, code in rows.pop("codes"):
            if code not in tables[table]:
                tables[table].append(code)
        for k in rows:
            out[k].extend(rows[k])
        if control:
            out["control"].append(bytes(f))
            out["ncontrol"] += control
    out["tables"] = tables
    return out


def fast_rows(dec, batch) -> dict:
    """The fast decoder's batch in the reference's shape (codes instead of ids), with its
    tables (compare them only when the decoder was fresh for this batch)."""
    sy, st, bt = list(dec.symbols), list(dec.statuses), list(dec.bar_types)
    return {
        "tables": {"symbols": sy, "statuses": st, "bar_types": bt},
        "ticks": [(sy[r[0]], *r[1:]) for r in batch.ticks.tolist()],
        "quotes": [(sy[r[0]], st[r[1]], *r[2:]) for r in batch.quotes.tolist()],
        "bars": [(sy[r[0]], bt[r[1]], *r[2:]) for r in batch.bars.tolist()],
        "errors": [i for i, _ in batch.errors],
        "control": list(batch.control),
        "ncontrol": dec.control_total,
    }


def _bits(row: tuple) -> tuple:
    # floats compared bit for bit (NaN equal to NaN, -0.0 distinct from 0.0)
    return tuple(struct.pack("<d", x) if isinstance(x, float) else x for x in row)


def mismatches(frames: list[bytes], got: dict, want: dict) -> list[str]:
    out = []
    if got["errors"] != want["errors"]:
        g, w = set(got["errors"]), set(want["errors"])
        for i in sorted(g ^ w)[:5]:
            out.append(f"frame {i} error: fast={i in g} ref={i in w}: {frames[i]!r}")
    for k in ("ticks", "quotes", "bars"):
        if len(got[k]) != len(want[k]):
            out.append(f"{k}: {len(got[k])} rows, reference {len(want[k])}")
            continue
        for a, b in zip(got[k], want[k], strict=True):
            if _bits(a) != _bits(b):
                out.append(f"{k}: {a} != reference {b}")
                break
    if got["control"] != want["control"]:
        out.append(f"control: {len(got['control'])} vs reference {len(want['control'])}")
    if got.get("ncontrol", want["ncontrol"]) != want["ncontrol"]:
        out.append(f"control messages: {got['ncontrol']} vs reference {want['ncontrol']}")
    for k in ("symbols", "statuses", "bar_types"):
        if got["tables"][k] != want["tables"][k]:
            out.append(f"{k} table: {got['tables'][k]} != reference {want['tables'][k]}")
    return out
