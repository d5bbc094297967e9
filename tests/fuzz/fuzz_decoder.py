"""atheris fuzz target: the decoder on arbitrary bytes must never crash, and must
agree with the reference decoder on which frames are errors; and a decoder whose learned
literals (ext/decode.h: ff_learn) are locked onto a layout must give the same outcome.

    python tests/fuzz/fuzz_decoder.py -runs=200000          # a short run (CI does 20000)
    python tests/fuzz/fuzz_decoder.py -max_total_time=600   # a long one

Coverage comes from Python-level instrumentation plus the comparison with the
reference; for coverage inside the C scanner, build with clang and
CFLAGS=-fsanitize=fuzzer-no-link (see atheris' docs on native extensions).
"""

import decimal
import os
import sys

import atheris

with atheris.instrument_imports():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    import framegen
    import reference

    from fastfeed import Decoder

DEC = Decoder(error_store=0)


def _training_streams() -> list[list[bytes]]:
    """Streams of one layout each: every seed of the corpus repeated (the fuzzer's inputs
    are mutants of the seeds, so these are the near misses of what TRAINED learned) and
    generated ones of each kind and layout."""
    corpus = os.path.join(os.path.dirname(__file__), "corpus")
    seeds = []
    for name in sorted(os.listdir(corpus)):
        with open(os.path.join(corpus, name), "rb") as f:
            seeds.append(f.read())
    probe = Decoder(error_store=0)
    streams = [[s] * 60 for s in seeds if not probe.decode([s], recv_ts=0).errors]
    streams += [framegen.stream(k, lay, 60, seed=i)
                for i, (k, lay) in enumerate((k, lay) for k in framegen.KINDS
                                             for lay in framegen.LAYOUTS)]
    return streams


STREAMS = _training_streams()
TRAINED = Decoder(error_store=0)
for _s in STREAMS[-16:] + STREAMS:  # a few hundred frames of every layout
    TRAINED.decode(_s, recv_ts=0)
# rows, control frames and control messages (an array frame may hold several) each stream
# gives on its own; a stream frame never fails
_COUNTS = []
for _s in STREAMS:
    _d = Decoder(error_store=0)
    _b = _d.decode(_s, recv_ts=0)
    assert not _b.errors, _b.errors
    _COUNTS.append((len(_b.ticks), len(_b.quotes), len(_b.bars), len(_b.control), _d.control_total))

def _stream_for(data: bytes) -> int:
    """The stream whose first frame shares the longest prefix with data: the layout data
    is most likely a near miss of."""
    best, best_n = 0, -1
    for i, s in enumerate(STREAMS):
        n = len(os.path.commonprefix([s[0], data]))
        if n > best_n:
            best, best_n = i, n
    return best


def check_trained(data: bytes, batch, ncontrol: int) -> None:
    """data after a stream of its nearest layout, on TRAINED: the outcome DEC gave."""
    k = _stream_for(data)
    stream = STREAMS[k]
    nt, nq, nb, nc, ncm = _COUNTS[k]
    c0 = TRAINED.control_total
    got = TRAINED.decode([*stream, data], recv_ts=0)
    n = len(stream)
    assert [i for i, _ in got.errors if i != n] == [], (data, got.errors[:3])
    errors = [e for i, e in got.errors if i == n]
    assert errors == [e for _, e in batch.errors], (data, errors, batch.errors)
    assert (len(got.ticks) - nt, len(got.quotes) - nq, len(got.bars) - nb) == (
        len(batch.ticks), len(batch.quotes), len(batch.bars)), data
    assert TRAINED.control_total - c0 - ncm == ncontrol, data
    assert got.control[nc:] == batch.control, data


def one_input(data: bytes) -> None:
    c0 = DEC.control_total
    batch = DEC.decode([data], recv_ts=0)
    ncontrol = DEC.control_total - c0
    check_trained(data, batch, ncontrol)
    try:
        ref = reference.decode([data], 0)
    except decimal.InvalidOperation:
        # a number whose exponent no Decimal holds (the reference's Decimal(text) of a
        # timestamp): the reference cannot judge the frame, only the decoder runs
        DEC.decode_buffer(data, recv_ts=0)
        return
    got_error = bool(batch.errors)
    assert got_error == bool(ref["errors"]), (data, batch.errors)
    if not got_error:
        assert batch.control == ref["control"], data
        assert ncontrol == ref["ncontrol"], (data, ncontrol)
        assert (len(batch.ticks), len(batch.quotes), len(batch.bars)) == (
            len(ref["ticks"]), len(ref["quotes"]), len(ref["bars"])), data
    DEC.decode_buffer(data, recv_ts=0)


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
