"""Frames whose keys come in a new order in every message take the decoder's structure-first
paths (ext/decode.h: ff_message_flat for flat messages up to 128 bytes, AVX-512, or
ff_message_flat_avx2 with AVX2 only; ff_series_flat for up to 256 bytes, series with their
bars included, AVX-512 VBMI2; chosen at run time), and they change no result.  Every test runs
once for each vector unit this CPU has (the decoder told to use at most that one), and once
with none.

A Decoder trained on such a stream finds its learned bytes useless for it and reads each
frame in two steps: where every member lies, from masks of the whole frame, then the values
in the fields' order.  Every test here trains a decoder on a shuffled stream, gives it frames
that differ from the stream by a little (a byte, a key, a cut, a separator inside a string)
and checks that its outcome for each is the one a fresh Decoder gives (which reads a first
frame the general way): the same error text, the same rows by value, the same control
messages.  On a CPU without AVX2 the paths do not exist; the comparisons still run.
"""

from __future__ import annotations

import json
import random
import sys
import zlib

import pytest

from fastfeed import Decoder, _decoder

from . import framegen
from .fuzz.guardpage import GuardedRegion
from .test_decoder_learned import (
    TRAIN,
    TRAINED_CFG,
    _rows,
    assert_as_fresh,
    fresh_outcome,
    near_misses,
    outcome_of,
    random_edits,
    trained_decoder,
)

LEVELS = _decoder.SIMD_LEVELS
CPU = LEVELS.index(Decoder().simd)  # the best the CPU has (or what FASTFEED_SIMD allows)
# set for each test by the fixture below: which paths the decoders under test may take
HAS_FLAT = HAS_SERIES_FLAT = False


@pytest.fixture(autouse=True, params=LEVELS[:CPU + 1])
def simd(request, monkeypatch):
    """Every Decoder this test makes uses at most this vector unit."""
    level = LEVELS.index(request.param)
    monkeypatch.setattr(_decoder, "_SIMD_LIMIT", level)
    monkeypatch.setattr(sys.modules[__name__], "HAS_FLAT", level >= LEVELS.index("avx2"))
    monkeypatch.setattr(sys.modules[__name__], "HAS_SERIES_FLAT", level >= LEVELS.index("avx512vbmi2"))
    assert Decoder().simd == request.param
    return request.param


class Shuffled:
    """A Decoder trained on a shuffled stream; ``outcome(frame)`` is the outcome of ``frame``
    on it, and ``flat`` counts the frames the structure-first path decoded."""

    def __init__(self, train: list[bytes]) -> None:
        self.train = train
        self.dec = trained_decoder(train)
        self.flat = self.tried = 0
        self.before: list[bytes] = []  # decoded before each frame, after train[:20]

    def outcome(self, frame) -> tuple:
        dec = self.dec
        # the bank stays one of shuffled frames
        b = dec.decode(self.train[:20] + self.before, recv_ts=0)
        assert not b.errors, b.errors
        f0 = dec._flat_frames
        out = outcome_of(dec, frame)
        self.flat += dec._flat_frames > f0
        self.tried += 1
        return out


def _trained(kind: str, salt: str) -> tuple[list[bytes], Shuffled, random.Random]:
    name = f"{salt} {kind}/shuffled"
    train = framegen.stream(kind, "shuffled", TRAIN, seed=zlib.crc32(name.encode()) & 0xFFFF)
    return train, Shuffled(train), random.Random(name)


def _check(trained: Shuffled, mutants, min_flat: float) -> int:
    assert_as_fresh(trained, mutants)
    if HAS_SERIES_FLAT:  # the paths under test decided a share of them, not only the general parse
        assert trained.flat >= min_flat * trained.tried, (trained.flat, trained.tried)
    return len(mutants)


def test_a_shuffled_stream_takes_the_flat_path_and_decodes_as_on_a_fresh_decoder():
    train = framegen.stream("mixed", "shuffled", 600, seed=11)
    dec = Decoder(**TRAINED_CFG)
    b = dec.decode(train, recv_ts=0)
    assert not b.errors
    got = (_rows(dec, b.ticks), _rows(dec, b.quotes), _rows(dec, b.bars))
    want = tuple(sum((fresh_outcome(f)[i] for f in train), []) for i in (1, 2, 3))
    assert got == want
    if HAS_SERIES_FLAT:  # ticks, quotes, and series of up to 256 bytes
        flat_max = sum(len(f) <= 256 for f in train)
        assert dec._flat_frames > 0.8 * flat_max, (dec._flat_frames, flat_max)
    elif HAS_FLAT:  # ticks and quotes up to 128 bytes
        assert dec._flat_frames > 300, dec._flat_frames


def reshuffled(frame: bytes, r: random.Random, k: int = 3) -> list[bytes]:
    """k copies of ``frame`` (valid) with the keys after the first shuffled anew, and the
    bars' keys: the same length and bank, another key order.  Decoded before each near miss
    of one frame, they keep the decoder from seeing one key order again and again (a stream
    that settled: the decoder then learns it, and the structure-first path steps aside)."""

    def shuffle(v, keep_first):
        if isinstance(v, list):
            return [shuffle(x, False) for x in v]
        if not isinstance(v, dict):
            return v
        items = list(v.items())
        head, rest = (items[:1], items[1:]) if keep_first else ([], items)
        r.shuffle(rest)
        return {key: shuffle(x, False) for key, x in head + rest}

    v = json.loads(frame)
    return [json.dumps(shuffle(v, True), separators=(",", ":"), ensure_ascii=False).encode()
            for _ in range(k)]


def _short_series(train: list[bytes], k: int) -> list[bytes]:
    """k series frames of the stream that the structure-first path can take (<= 256 bytes)."""
    return [f for f in reversed(train) if len(f) <= 256][:k]


@pytest.mark.parametrize("kind", ["tick", "quote", "series", "mixed"])
def test_near_misses_of_a_shuffled_stream_decode_as_on_a_fresh_decoder(kind):
    train, trained, r = _trained(kind, "near misses")
    targets = (train[-3:] if kind == "mixed" else _short_series(train, 2) if kind == "series"
               else [train[-1], train[TRAIN // 2]])
    # most near misses are no valid frame (the path hands those to the general one)
    n = 0
    for t in targets:
        trained.before = reshuffled(t, r)
        n += _check(trained, near_misses(t, r), 0.02 if kind == "mixed" else 0.05)
    assert n > 500


@pytest.mark.parametrize("kind", ["tick", "quote", "series", "mixed"])
def test_random_edits_of_a_shuffled_stream_decode_as_on_a_fresh_decoder(kind):
    train, trained, r = _trained(kind, "edits")
    assert _check(trained, [random_edits(r.choice(train), r) for _ in range(1500)], 0.05) == 1500


@pytest.mark.parametrize("kind", ["tick", "quote", "series"])
def test_every_prefix_of_a_shuffled_frame_at_a_guard_page(kind):
    """The structure-first paths load the frame in 64-byte masked loads: a prefix that ends
    at a PROT_NONE page would fault if a byte past the frame were read."""
    train = framegen.stream(kind, "shuffled", TRAIN, seed=5)
    trained = Shuffled(train)
    for frame in (train[-1], train[-2]) if kind != "series" else _short_series(train, 2):
        guard = GuardedRegion(len(frame))
        for n in range(len(frame) + 1):
            assert trained.outcome(guard.place(frame[:n])) == fresh_outcome(frame[:n]), frame[:n]
        # and the whole frame, at the page's end, took the path
        f0 = trained.dec._flat_frames
        trained.outcome(guard.place(frame))
        assert trained.dec._flat_frames > f0 or not (HAS_SERIES_FLAT if kind == "series" else HAS_FLAT)


@pytest.mark.parametrize("symbol", ['A,B', 'A}B', 'X,"t":1', 'X","t":5,"c":"Y', 'A:B', 'A\\",B',
                                    'A\\u002cB', 'caf\u00e9,1'])
def test_separators_inside_strings(symbol):
    """A `,` or `}` inside a string is no separator; the path splits on it anyway and must
    notice (the string then does not end where the member would)."""
    train, trained, _ = _trained("tick", "strings")
    for order in (["c", "t", "p", "v"], ["t", "c", "v", "p"], ["p", "v", "t", "c"]):
        msg = {"c": symbol, "t": 1749462520.5, "p": 1.25, "v": 100.0}
        frame = json.dumps({k: msg[k] for k in order}, separators=(",", ":"),
                           ensure_ascii=False).encode()
        got, want = trained.outcome(frame), fresh_outcome(frame)
        assert got == want and not want[0], (frame, got, want)


SERIES = {"c": "NASDAQ:TSLA", "be": 1739771459.0, "lu": 1739771458640, "bt": "1m"}
BAR = {"t": 1739771400.0, "o": 490.26, "h": 490.46, "l": 490.06, "c": 490.26, "v": 634256.0}
ORDERS = (["c", "be", "lu", "bt", "s"], ["s", "c", "bt", "lu", "be"], ["lu", "s", "be", "c", "bt"])


def _series_frame(order: list[str], bars: list, **over) -> bytes:
    msg = {**SERIES, "s": bars, **over}
    return json.dumps({k: msg[k] for k in order if k in msg}, separators=(",", ":"),
                      ensure_ascii=False).encode()


@pytest.mark.parametrize("symbol", ["A[B", "A]B", "A{B", "A}B", "A,B", "[", "]", "],[{", 'A\\"]'])
def test_brackets_and_separators_inside_a_series_strings(symbol):
    """ff_series_flat tells the array and the bars by their bytes (`[`, `]`, `{`, `}`), with
    no string told apart first: one inside a symbol or a bar type must send the frame the
    general way, or be read as the general way reads it."""
    train, trained, _ = _trained("series", "strings")
    bars = [dict(BAR), {**BAR, "v": 1.0}]
    for order in ORDERS:
        for over in ({"c": symbol}, {"bt": symbol}):
            frame = _series_frame(order, bars, **over)
            got, want = trained.outcome(frame), fresh_outcome(frame)
            assert got == want and not want[0], (frame, got, want)


@pytest.mark.parametrize("s", [
    "[]", "null", "1", '"x"', "[1]", "[{}]", "[{},{}]", "[null]", "[[]]", '[{"t":1}]', '[{"t":1},]',
    '[{"t":1}{"t":2}]', '[{"t":1},,{"t":2}]', '[{"t":1},{"t":2}', '[{"t":{"x":1}}]', '[{"t":[1]}]',
    '[{"t":1,"t":2}]', '[{"x":1,"t":2}]', '[{"t":1,"o":"5"}]', '[{"t":1e400}]', '[{"t":-1}]',
    '[{"t":1,"o":null}]', '[{"o":1.5}],"s":[]', '[{"o":1.5}],"s":null', '[{"o":1}],"p":[2]',
    '[{"o":1}]]', '[[{"o":1}]]', '[{"o":1}],[{"o":2}]', '[{"t":1739771400.0,"v":99999999999999999999}]',
])
def test_series_shapes_the_flat_path_must_refuse_or_read_exactly(s):
    """Arrays and bars of every odd shape, in a frame the flat path would take were its `s`
    the usual one: each gives what a fresh decoder gives (rows, or the same error text)."""
    train, trained, r = _trained("series", "shapes")
    for order in ORDERS:
        frame = _with_s(order, s)
        trained.before = _same_bank(frame, r)
        assert trained.outcome(frame) == fresh_outcome(frame), frame


def _with_s(order: list[str], s: str) -> bytes:
    members = [_series_frame([k], [])[1:-1] for k in order if k != "s"]
    members.insert(order.index("s"), b'"s":' + s.encode())
    return b"{" + b",".join(members) + b"}"


def _same_bank(frame: bytes, r: random.Random, k: int = 6) -> list[bytes]:
    """k valid series frames as long as ``frame``, beginning with `c` where it does (the
    decoder's bank for it), each with its keys in another order: decoded before ``frame``,
    they leave that bank to the structure-first path."""
    out = []
    for _ in range(k):
        keys = ["be", "lu", "bt", "s"]
        r.shuffle(keys)
        order = ["c", *keys] if frame[2:3] == b"c" else [keys[0], "c", *keys[1:]]
        base = _series_frame(order, [{"o": 1}], c="X")
        if len(base) > len(frame):
            return []
        out.append(_series_frame(order, [{"o": 1}], c="X" * (1 + len(frame) - len(base))))
    return out


def test_series_shapes_of_a_short_frame_take_the_flat_path():
    """The shapes above reach ff_series_flat (short series frames, under 128 bytes, go there
    from ff_message_flat), and those it takes decode as the general path decodes them."""
    train, trained, r = _trained("series", "short shapes")
    for s in ['[{"t":1}]', '[{"o":1.5},{"v":2}]', '[{"t":1,"o":"5"}]', '[{"t":1,"o":null}]']:
        for order in ORDERS:
            frame = _with_s(order, s)
            trained.before = _same_bank(frame, r)
            f0 = trained.flat
            assert trained.outcome(frame) == fresh_outcome(frame), frame
            assert trained.flat > f0 or not HAS_SERIES_FLAT, frame


def test_series_frames_up_to_256_bytes_take_the_flat_path_and_longer_ones_do_not():
    train, trained, _ = _trained("series", "sizes")
    for nbars, flat in ((1, True), (2, True), (4, False)):
        frame = _series_frame(["bt", "s", "c", "lu", "be"],
                              [{**BAR, "v": float(i)} for i in range(nbars)])
        assert (len(frame) <= 256) == flat, len(frame)
        f0 = trained.flat
        assert trained.outcome(frame) == fresh_outcome(frame)
        assert (trained.flat > f0) == (flat and HAS_SERIES_FLAT), frame


@pytest.mark.parametrize("kind", ["tick", "series"])
def test_a_shuffled_stream_that_settles_gets_its_learned_bytes_back(kind):
    """Keys in any order, then in one order: the flat paths notice the order repeating and
    hand the stream back to the learned bytes within a few frames (a frame the learned bytes
    match entirely skips every key's general parse)."""
    shuffled = framegen.stream(kind, "shuffled", 300, seed=21)
    settled = framegen.stream(kind, "compact", 60, seed=22)
    dec = Decoder(**TRAINED_CFG)
    dec.decode(shuffled, recv_ts=0)
    dec.decode(settled[:30], recv_ts=0)
    h0, f0 = dec._learned_hits, dec._flat_frames
    b = dec.decode(settled[30:], recv_ts=0)
    assert not b.errors
    # the frames match their learned bytes, key by key; a few (a bank of a length not met
    # yet: banks go by length) still go the flat way.  Where no flat path reads this kind,
    # the bank learns one frame in 16, and its learned bytes are back within ~16 frames.
    flat = HAS_SERIES_FLAT if kind == "series" else HAS_FLAT
    assert dec._learned_hits - h0 >= (30 if flat else 10) * 4, dec._learned_hits - h0
    assert dec._flat_frames - f0 <= 5, dec._flat_frames - f0


@pytest.mark.parametrize("kind", ["tick", "series"])
def test_the_flat_paths_take_a_stream_again_once_its_keys_are_shuffled_again(kind):
    """The reverse: learned bytes that stop matching leave the frames to the flat paths,
    and the frames that learn (to notice the stream settling) stay few."""
    settled = framegen.stream(kind, "compact", 60, seed=23)
    shuffled = [f for f in framegen.stream(kind, "shuffled", 400, seed=24) if len(f) <= 256]
    dec = Decoder(**TRAINED_CFG)
    dec.decode(settled + shuffled[:100], recv_ts=0)
    f0 = dec._flat_frames
    b = dec.decode(shuffled[100:], recv_ts=0)
    assert not b.errors
    if HAS_SERIES_FLAT:
        assert dec._flat_frames - f0 >= 0.9 * len(shuffled[100:]), (dec._flat_frames - f0, len(shuffled))


def _flat_message_of(n: int, order: tuple[str, ...]) -> bytes:
    """A valid flat message of exactly n bytes (16..128), its keys in ``order`` (of c t p v;
    fewer for the shortest), the symbol padded to length."""
    vals = {"t": "1", "p": "2", "v": "3"}
    keys = [k for k in order if n >= 26 or k in ("c", "t")]

    def text(sym: str) -> str:
        return "{" + ",".join(f'"{k}":' + (f'"{sym}"' if k == "c" else vals[k]) for k in keys) + "}"

    frame = text("X" * (n - len(text("")))).encode()
    assert len(frame) == n, (n, frame)
    return frame


def test_flat_messages_of_every_length_at_a_guard_page():
    """Every length a flat message can have on the structure-first paths (16 to 128 bytes:
    the AVX2 path's overlapping 32-byte loads move back at each 32-byte step, the AVX-512
    path's masked loads at 64): the frame and each of its prefixes end at a PROT_NONE page,
    on a decoder whose bank for that length leaves them to the flat paths, and decode as on a
    fresh decoder; the whole frame takes the path (from 26 bytes: four keys).  Under 32
    bytes the AVX2 path copies the frame first."""
    orders = [("c", "t", "p", "v"), ("t", "c", "v", "p"), ("p", "v", "t", "c"), ("v", "p", "c", "t"),
              ("t", "v", "c", "p")]
    guard = GuardedRegion(256)
    for n in range(16, 129):
        primers = [_flat_message_of(n, o) for o in orders[:4]]
        frame = _flat_message_of(n, orders[4])
        dec = Decoder(**TRAINED_CFG)
        for k in range(n + 1):
            dec.decode(primers, recv_ts=0)  # each time: the bank stays one of shuffled frames
            assert outcome_of(dec, guard.place(frame[:k])) == fresh_outcome(frame[:k]), frame[:k]
        # (a new decoder: the one above met its bank's one-in-256 learning frame by now)
        dec = Decoder(**TRAINED_CFG)
        dec.decode(primers * 2, recv_ts=0)
        f0 = dec._flat_frames
        assert outcome_of(dec, guard.place(frame)) == fresh_outcome(frame), frame
        if n >= 26:  # four keys (fewer repeat their orders: the bank learns them)
            assert dec._flat_frames > f0 or not HAS_FLAT, frame
