"""atheris fuzz target: the decoder on arbitrary bytes must never crash, and must
agree with the reference decoder on which frames are errors.

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
    import reference

    from fastfeed import Decoder

DEC = Decoder(error_store=0)


def one_input(data: bytes) -> None:
    c0 = DEC.control_total
    batch = DEC.decode([data], recv_ts=0)
    ncontrol = DEC.control_total - c0
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
