"""The latency histogram: the C row recorder agrees with the NumPy one, percentiles are
within a bucket (2%) of the truth."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fastfeed import BAR_DTYPE, QUOTE_DTYPE, TICK_DTYPE
from fastfeed.latency import LatencyHistogram


@pytest.mark.parametrize("dtype", [TICK_DTYPE, QUOTE_DTYPE, BAR_DTYPE])
def test_rows_recorded_in_c_match_numpy(dtype):
    rng = np.random.default_rng(7)
    now = 1_800_000_000_000_000
    lat = np.concatenate([rng.integers(-5, 3, 50), rng.lognormal(4, 2, 5000).astype(np.int64),
                          [0, 1, 2, 10**12]])
    rows = np.zeros(len(lat), dtype)
    rows["recv_ts"] = now - lat
    rows["ts"] = now - 2 * lat
    c, ref = LatencyHistogram(), LatencyHistogram()
    c.record_rows(now, rows)
    ref.record(now - rows["recv_ts"])
    assert (c.counts == ref.counts).all() and (c.total, c.max_us) == (ref.total, ref.max_us)
    c2 = LatencyHistogram()
    c2.record_rows(now, rows, "ts")
    assert c2.max_us == 2 * 10**12 and c2.total == len(lat)


def test_percentiles_are_within_two_percent():
    h = LatencyHistogram()
    assert math.isnan(h.percentile(50))
    rows = np.zeros(1000, TICK_DTYPE)
    rows["recv_ts"] = -np.arange(1, 1001)  # latencies 1..1000 µs at now = 0
    h.record_rows(0, rows)
    for p, want in ((50, 500), (99, 990), (99.9, 999)):
        assert want <= h.percentile(p) <= want * 1.02 + 1
    assert h.summary()["max"] == 1000.0


def test_bad_rows_are_refused():
    h = LatencyHistogram()
    with pytest.raises(ValueError, match="no int64 price field"):
        h.record_rows(0, np.zeros(3, TICK_DTYPE), "price")
    with pytest.raises(ValueError, match="contiguous"):
        h.record_rows(0, np.zeros(6, TICK_DTYPE)[::2])
    with pytest.raises(TypeError):
        h.record_rows(0, [1, 2, 3])
