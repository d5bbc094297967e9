"""The simulator's synthetic market: random-walk prices, encoded as the provider's frames.

Frames are produced in :class:`Block` objects: the JSON payloads, each already wrapped in its
server-to-client WebSocket header and concatenated into one ``bytes`` object, so that sending
any run of consecutive frames is a single ``transport.write`` of a slice. Per-kind cumulative
row counts let the sender account for a slice with two lookups instead of a loop.

The sequence is a pure function of the constructor's arguments and the timestamps asked for,
so a test can rebuild exactly what a simulator sent.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import random
import re
import string

import numpy as np

__all__ = ["KINDS", "Block", "Market", "TickStamper", "tick_time_offsets", "ws_header"]

#: Row kinds, in the order of :attr:`Block.cum`'s rows (``control_sent``: status messages).
KINDS = ("ticks", "quotes", "bars", "malformed", "control_sent")
_TICK, _QUOTE, _BAR, _BAD, _CONTROL = range(5)

_EXCHANGES = ("NASDAQ", "NYSE", "ARCA", "BATS")
_WELL_KNOWN = ("AAPL", "TSLA", "MSFT", "NVDA", "AMZN", "GOOG", "META", "AMD", "NFLX", "INTC")


def ws_header(opcode: int, length: int, fin: bool = True) -> bytes:
    """The header of an unmasked (server-to-client) WebSocket frame, RFC 6455 section 5.2."""
    b0 = (0x80 if fin else 0) | opcode
    if length < 126:
        return bytes((b0, length))
    if length < 65536:
        return bytes((b0, 126)) + length.to_bytes(2, "big")
    return bytes((b0, 127)) + length.to_bytes(8, "big")


def _frame(payload: bytes, fragment: int) -> bytes:
    """One text message as wire bytes; split into ``fragment``-byte frames when asked."""
    if fragment <= 0 or len(payload) <= fragment:
        return ws_header(0x1, len(payload)) + payload
    parts = []
    for start in range(0, len(payload), fragment):
        piece = payload[start:start + fragment]
        last = start + fragment >= len(payload)
        parts.append(ws_header(0x1 if start == 0 else 0x0, len(piece), fin=last) + piece)
    return b"".join(parts)


def _secs(us: int) -> str:
    # Exact decimal seconds from integer microseconds: the provider's six-digit format.
    return f"{us // 1_000_000}.{us % 1_000_000:06d}"


#: Bytes of one tick time on the wire: ``DDDDDDDDDD.DDDDDD`` (epoch seconds 1e9..1e10).
TICK_TIME_LEN = 17
# A tick's time: "t" followed by the price. Bar times ("t" inside "s":[...]) are followed by
# "o", quotes carry "lt": neither matches. No group can run into the next frame: that frame
# starts with '{"c":"', and the value excludes '"' and ','.
_TICK_TIME = re.compile(rb'"t":([^,"]*),"p":')
_TICK_TIME_VALUE = re.compile(rb"\d{10}\.\d{6}")


def tick_time_offsets(data: bytes | bytearray | memoryview) -> np.ndarray:
    """Sorted byte offsets (int64) of every tick's ``t`` value in unfragmented wire data.

    Each value must be exactly :data:`TICK_TIME_LEN` bytes (``\\d{10}\\.\\d{6}``) so that it
    can be overwritten in place without changing any frame length; ValueError otherwise.
    """
    found = []
    for m in _TICK_TIME.finditer(data):
        if not _TICK_TIME_VALUE.fullmatch(m.group(1)):
            raise ValueError(f"tick time {bytes(m.group(1))!r} at byte {m.start(1)} is not "
                             f"{TICK_TIME_LEN} bytes DDDDDDDDDD.DDDDDD (epoch seconds between "
                             "1e9 and 1e10)")
        found.append(m.start(1))
    return np.array(found, dtype=np.int64)


class TickStamper:
    """Copies of slices of immutable wire data with every tick's ``t`` set to one time.

    ``stamped(a, b, us)`` is ``data[a:b]`` (``a`` and ``b`` frame boundaries) with each tick
    time inside replaced by ``us`` as 17 bytes: the same length, so frame headers and byte
    counts stay valid. The data is cut once, at the tick times, into the constant runs between
    them; a slice is then one ``bytes.join`` of those runs with the time as separator, a
    single C pass that builds the copy and stamps it (no per-frame Python loop). The result is
    a new object, never a view of shared memory, so a transport may hold it unsent for as long
    as it likes while other writes stamp the same region again.
    """

    def __init__(self, data: bytes) -> None:
        self.data = bytes(data)
        #: Sorted byte offsets of the tick times (see :func:`tick_time_offsets`).
        self.offsets = tick_time_offsets(self.data)
        self._pos: list[int] = self.offsets.tolist()
        pos, n, d = self._pos, TICK_TIME_LEN, self.data
        ends = [*pos, len(d)]
        starts = [0, *(p + n for p in pos)]
        # _runs[i]: the constant bytes before tick time i (the last one: after the last time).
        self._runs = [d[s:e] for s, e in zip(starts, ends, strict=True)]
        self._view = memoryview(self.data)

    def stamped(self, a: int, b: int, us: int) -> bytes | memoryview:
        """``data[a:b]`` with every tick time in it set to ``us`` (µs since the epoch)."""
        pos = self._pos
        lo = bisect.bisect_left(pos, a)
        hi = bisect.bisect_left(pos, b, lo)
        if lo == hi:
            return self._view[a:b]  # no tick inside: the data itself is immutable
        stamp = _secs(us).encode()
        if len(stamp) != TICK_TIME_LEN:
            raise ValueError(f"time {us} us does not fit the {TICK_TIME_LEN}-byte tick time")
        parts = self._runs[lo:hi + 1]
        parts[0] = self.data[a:pos[lo]]
        parts[-1] = self.data[pos[hi - 1] + TICK_TIME_LEN:b]
        return stamp.join(parts)


@dataclasses.dataclass
class Block:
    """Consecutive frames ready to send.

    ``data[offsets[i]:offsets[j]]`` is frames ``i..j-1`` on the wire; ``cum[k, j] - cum[k, i]``
    is how many rows of kind ``KINDS[k]`` they carry; ``payloads`` are the JSON texts.
    """

    data: bytes
    offsets: np.ndarray
    cum: np.ndarray
    payloads: list[bytes]

    def __len__(self) -> int:
        return len(self.payloads)

    def rows(self, i: int, j: int) -> tuple[int, ...]:
        """Rows of each of :data:`KINDS` in frames ``i..j-1``."""
        return tuple(int(x) for x in self.cum[:, j] - self.cum[:, i])


class Market:
    """N symbols with geometric random-walk prices and cumulative volumes.

    ``mix`` is the share of (ticks, quotes, series) frames; ``malformed`` the share of frames
    replaced by broken JSON; ``arrays`` the share of frames that carry a JSON array of several
    messages for one symbol; ``fragment`` > 0 splits every message into frames of that many
    payload bytes; ``ping_every`` > 0 puts an RFC 6455 ping after every that many messages;
    ``status_every`` > 0 puts a status object (a control message, not data) after every that
    many.
    """

    def __init__(
        self,
        symbols: int = 100,
        *,
        seed: int = 0,
        mix: tuple[float, float, float] = (0.7, 0.25, 0.05),
        malformed: float = 0.0,
        arrays: float = 0.0,
        fragment: int = 0,
        ping_every: int = 0,
        status_every: int = 0,
    ) -> None:
        if symbols < 1:
            raise ValueError("symbols must be at least 1")
        if len(mix) != 3 or min(mix) < 0 or sum(mix) <= 0:
            raise ValueError("mix must be three non-negative shares with a positive sum")
        if not 0.0 <= malformed <= 1.0 or not 0.0 <= arrays <= 1.0:
            raise ValueError("malformed and arrays must be shares between 0 and 1")
        self.rng = random.Random(seed)
        total = sum(mix)
        self._cut_tick = mix[0] / total
        self._cut_quote = (mix[0] + mix[1]) / total
        self.malformed = malformed
        self.arrays = arrays
        self.fragment = fragment
        self.ping_every = ping_every
        self._since_ping = 0
        self.status_every = status_every
        self._since_status = 0
        self.codes = self._make_codes(symbols)
        self.price = [self.rng.uniform(5.0, 500.0) for _ in self.codes]
        self.volume = [float(self.rng.randrange(1000, 1_000_000)) for _ in self.codes]

    def _make_codes(self, n: int) -> list[str]:
        codes: list[str] = []
        seen: set[str] = set()
        for i in range(n):
            if i < len(_WELL_KNOWN):
                name = _WELL_KNOWN[i]
                exch = "NASDAQ" if i != 7 else "NYSE"
            else:
                while True:
                    name = "".join(self.rng.choice(string.ascii_uppercase)
                                   for _ in range(self.rng.randint(2, 4)))
                    exch = self.rng.choice(_EXCHANGES)
                    if f"{exch}:{name}" not in seen:
                        break
            code = f"{exch}:{name}"
            seen.add(code)
            codes.append(code)
        return codes

    # -- one message --------------------------------------------------------------------------

    def _step(self, s: int) -> float:
        # Log-normal step with a floor so a long run never walks a price to zero.
        p = max(0.01, self.price[s] * math.exp(self.rng.gauss(0.0, 0.0005)))
        self.price[s] = p
        return p

    def _message(self, kind: int, s: int, us: int) -> tuple[str, int]:
        """One JSON object of ``kind`` for symbol ``s`` at ``us``; returns (text, rows)."""
        rng = self.rng
        code = self.codes[s]
        p = self._step(s)
        if kind == _TICK:
            size = float(rng.choice((1, 10, 50, 100, 100, 200, 500)))
            self.volume[s] += size
            return f'{{"c":"{code}","t":{_secs(us)},"p":{p:.2f},"v":{size:.1f}}}', 1
        if kind == _QUOTE:
            spread = max(0.01, round(p * 0.0002, 2))
            bid, ask = p - spread / 2, p + spread / 2
            bs, asz = rng.randrange(1, 100) * 10.0, rng.randrange(1, 100) * 10.0
            if rng.random() < 0.1:
                # The later revision: session status, no last-trade time or price.
                return (f'{{"c":"{code}","v":{self.volume[s]:.1f},"a":{ask:.2f},'
                        f'"b":{bid:.2f},"as":{asz:.1f},"bs":{bs:.1f},"ss":"OPEN"}}'), 1
            lt = _secs(us - us % 1_000_000)
            return (f'{{"c":"{code}","lt":{lt},"v":{self.volume[s]:.1f},"lp":{p:.2f},'
                    f'"a":{ask:.2f},"b":{bid:.2f},"as":{asz:.1f},"bs":{bs:.1f}}}'), 1
        minute = us - us % 60_000_000
        nbars = 1 if rng.random() < 0.8 else 2
        bars = []
        for k in range(nbars):
            t = minute - (nbars - 1 - k) * 60_000_000
            o = p * math.exp(rng.gauss(0.0, 0.001))
            hi = max(o, p) * (1 + abs(rng.gauss(0.0, 0.0005)))
            lo = min(o, p) * (1 - abs(rng.gauss(0.0, 0.0005)))
            v = float(rng.randrange(100, 100_000))
            bars.append(f'{{"t":{_secs(t)},"o":{o:.2f},"h":{hi:.2f},"l":{lo:.2f},'
                        f'"c":{p:.2f},"v":{v:.1f}}}')
        return (f'{{"c":"{code}","be":{_secs(minute + 59_000_000)},"lu":{us // 1000},'
                f'"bt":"1m","s":[{",".join(bars)}]}}'), nbars

    def _kind(self) -> int:
        r = self.rng.random()
        return _TICK if r < self._cut_tick else _QUOTE if r < self._cut_quote else _BAR

    def block(self, n: int, t0_us: int, step_us: int = 1) -> Block:
        """The next ``n`` frames, the i-th stamped ``t0_us + i * step_us``."""
        rng = self.rng
        nsym = len(self.codes)
        wire: list[bytes] = []
        payloads: list[bytes] = []
        offsets = np.zeros(n + 1, dtype=np.int64)
        cum = np.zeros((len(KINDS), n + 1), dtype=np.int64)
        counts = [0] * len(KINDS)
        pos = 0
        for i in range(n):
            us = t0_us + i * step_us
            s = rng.randrange(nsym)
            if self.arrays and rng.random() < self.arrays:
                parts = []
                for _ in range(rng.randint(2, 3)):
                    kind = self._kind()
                    text, rows = self._message(kind, s, us)
                    parts.append(text)
                    counts[kind] += rows
                payload = ("[" + ",".join(parts) + "]").encode()
            else:
                kind = self._kind()
                text, rows = self._message(kind, s, us)
                payload = text.encode()
                if self.malformed and rng.random() < self.malformed:
                    # Cut inside the object: the symbol survives (so it is routed as data)
                    # but the JSON does not.
                    keep = len(self.codes[s]) + 7  # '{"c":"' + code + '"'
                    payload = payload[:rng.randint(keep, len(payload) - 1)]
                    counts[_BAD] += 1
                else:
                    counts[kind] += rows
            framed = _frame(payload, self.fragment)
            if self.ping_every:
                self._since_ping += 1
                if self._since_ping >= self.ping_every:
                    self._since_ping = 0
                    framed += ws_header(0x9, 4) + b"sim!"
            if self.status_every:
                self._since_status += 1
                if self._since_status >= self.status_every:
                    self._since_status = 0
                    status = b'{"status":"ok","message":"simulator status"}'
                    framed += ws_header(0x1, len(status)) + status
                    counts[_CONTROL] += 1
            wire.append(framed)
            payloads.append(payload)
            pos += len(framed)
            offsets[i + 1] = pos
            cum[:, i + 1] = counts
        return Block(b"".join(wire), offsets, cum, payloads)
