"""A fixed-memory latency histogram: log-spaced buckets, vectorized updates.

Wire-to-array latency (frame receipt to rows handed to the consumer) is recorded per
row in microseconds.  Buckets grow by 2% from 1 µs, so percentiles are within 2% of
the truth, at any rate, with no per-row Python work.
"""

from __future__ import annotations

import math

import numpy as np

from ._decoder import record_latency

_GROWTH = 1.02
_NBUCKETS = 1200  # 1.02**1200 µs is far beyond any latency worth reporting
_LOG_GROWTH = math.log(_GROWTH)


class LatencyHistogram:
    """Counts of latencies in log-spaced buckets; ``percentile(99.9)`` reads them back."""

    def __init__(self) -> None:
        self.counts = np.zeros(_NBUCKETS + 1, np.int64)  # bucket 0: below 1 µs
        self.max_us = 0
        self.total = 0

    def record(self, latency_us: np.ndarray) -> None:
        """Add an int64 array of latencies (µs)."""
        if latency_us.size == 0:
            return
        lat = np.maximum(latency_us, 0)
        idx = np.zeros(lat.shape, np.int64)
        pos = lat >= 1
        idx[pos] = np.minimum(np.log(lat[pos].astype(np.float64)) / _LOG_GROWTH + 1, _NBUCKETS).astype(np.int64)
        self.counts += np.bincount(idx, minlength=_NBUCKETS + 1)
        self.max_us = max(self.max_us, int(lat.max()))
        self.total += int(lat.size)

    def record_rows(self, now_us: int, rows: np.ndarray, field: str = "recv_ts") -> None:
        """Add ``now_us - rows[field]`` for decoded rows (any fastfeed row dtype; ``field``
        an int64 µs time, the receive time by default), in C."""
        n, mx = record_latency(self.counts, now_us, rows, _LOG_GROWTH, field)
        if n:
            self.total += n
            if mx > self.max_us:
                self.max_us = mx

    def merge(self, other: LatencyHistogram) -> None:
        self.counts += other.counts
        self.max_us = max(self.max_us, other.max_us)
        self.total += other.total

    def percentile(self, p: float) -> float:
        """The latency (µs) below which ``p`` percent of the recorded rows fall; NaN if none."""
        if self.total == 0:
            return math.nan
        rank = max(1, math.ceil(self.total * p / 100.0))
        i = int(np.searchsorted(np.cumsum(self.counts), rank))
        if i == 0:
            return 0.0
        # the bucket's upper edge, capped by the largest value seen
        return min(_GROWTH ** i, float(self.max_us))

    def cumulative(self, bounds_us: list[float]) -> list[int]:
        """Rows whose latency is at most each bound (µs), for a histogram with those upper
        bounds (Prometheus' ``le``). Bucket i holds [1.02**(i-1), 1.02**i) µs; a bucket counts
        below a bound when its lower edge is, so a count may include values up to 2% above
        it (and none below 50 µs, where a bucket holds at most one whole µs)."""
        cum = np.cumsum(self.counts)
        out = []
        for b in bounds_us:
            if b < 1:
                out.append(int(self.counts[0]))
                continue
            # the last bucket whose lower edge 1.02**(i-1) is <= b
            i = min(int(math.floor(math.log(b) / _LOG_GROWTH + 1e-9)) + 1, _NBUCKETS)
            out.append(int(cum[i]))
        return out

    def sum_us(self) -> float:
        """The latencies' total (µs), from the bucket midpoints: within 1% of the truth."""
        if self.total == 0:
            return 0.0
        i = np.arange(1, _NBUCKETS + 1, dtype=np.float64)
        mid = _GROWTH ** (i - 0.5)  # geometric middle of [1.02**(i-1), 1.02**i)
        return float(np.dot(self.counts[1:], mid))

    def summary(self) -> dict[str, float]:
        """``p50``, ``p99``, ``p999`` and ``max`` in µs (NaN when nothing was recorded)."""
        return {
            "p50": round(self.percentile(50), 1),
            "p99": round(self.percentile(99), 1),
            "p999": round(self.percentile(99.9), 1),
            "max": float(self.max_us) if self.total else math.nan,
        }
