"""fastfeed: a fast, exact client for an enterprise real-time market-data feed.

The decoder is usable on its own::

    from fastfeed import Decoder
    dec = Decoder()
    batch = dec.decode([b'{"c":"NASDAQ:AAPL","t":1749462520.177003,"p":242.89,"v":200.0}'])
    batch.ticks["ts"]          # int64 microseconds since the epoch
    dec.symbols[batch.ticks["sym"][0]]
"""

from fastfeed._decoder import (
    BAR_DTYPE,
    NAT,
    QUOTE_DTYPE,
    TICK_DTYPE,
    Batch,
    Decoder,
    SymbolTable,
    now_us,
)
from fastfeed._ring import Batch as RingBatch
from fastfeed._ring import Doorbell, Ring, RingError

__version__ = "0.1.0"

# The pipeline (processes, rings, network) is imported lazily: the decoder alone
# should not pay for it.
_LAZY = {
    "Feed": "fastfeed.feed",
    "FeedError": "fastfeed.feed",
    "FeedIdleError": "fastfeed.feed",
    "WorkerPool": "fastfeed.pool",
    "OutputBatch": "fastfeed.output",
    "WorkerStats": "fastfeed.state",
    "Settings": "fastfeed.config",
    "load_settings": "fastfeed.config",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastfeed' has no attribute {name!r}")


__all__ = [
    "BAR_DTYPE",
    "Doorbell",
    "Feed",
    "FeedError",
    "FeedIdleError",
    "OutputBatch",
    "Ring",
    "RingBatch",
    "RingError",
    "Settings",
    "WorkerPool",
    "WorkerStats",
    "load_settings",
    "NAT",
    "QUOTE_DTYPE",
    "TICK_DTYPE",
    "Batch",
    "Decoder",
    "SymbolTable",
    "now_us",
]
