"""fastfeed: a fast, exact client for an enterprise real-time market-data feed.

The whole pipeline::

    from fastfeed import Feed
    with Feed(host=..., email=..., workers=2) as feed:
        for batch in feed:               # a fastfeed.Batch, valid until the next one
            batch.ticks["price"]         # NumPy structured arrays
            batch.to_pandas("quotes")    # categorical codes, UTC times

The decoder is usable on its own, and returns the same :class:`Batch`::

    from fastfeed import Decoder
    dec = Decoder()
    batch = dec.decode([b'{"c":"NASDAQ:AAPL","t":1749462520.177003,"p":242.89,"v":200.0}'])
    batch.ticks["ts"]          # int64 microseconds since the epoch
    dec.symbols[batch.ticks["sym"][0]]
"""

from typing import TYPE_CHECKING

from fastfeed._decoder import BAR_DTYPE, NAT, QUOTE_DTYPE, TICK_DTYPE, SymbolTable, now_us
from fastfeed._ring import Batch as RingBatch
from fastfeed._ring import Doorbell, Ring, RingError
from fastfeed.batch import Batch, BatchReleasedError, Decoder, Kinds

# The one place the version is written: pyproject.toml reads it from here.
__version__ = "0.1.0"

if TYPE_CHECKING:
    # What the lazy import below gives at run time, typed for checkers.
    from fastfeed.config import Settings, load_settings
    from fastfeed.feed import Feed, FeedError, FeedIdleError
    from fastfeed.pool import WorkerPool
    from fastfeed.state import WorkerStats

# The pipeline (processes, rings, network; about 150 ms of imports) is imported on first use:
# the decoder alone should not pay for it.
_LAZY = {
    "Feed": "fastfeed.feed",
    "FeedError": "fastfeed.feed",
    "FeedIdleError": "fastfeed.feed",
    "WorkerPool": "fastfeed.pool",
    "WorkerStats": "fastfeed.state",
    "Settings": "fastfeed.config",
    "load_settings": "fastfeed.config",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # once: later lookups do not come back here
        return value
    raise AttributeError(f"module 'fastfeed' has no attribute {name!r}")


__all__ = [
    "BAR_DTYPE",
    "NAT",
    "QUOTE_DTYPE",
    "TICK_DTYPE",
    "Batch",
    "BatchReleasedError",
    "Decoder",
    "Doorbell",
    "Feed",
    "FeedError",
    "FeedIdleError",
    "Kinds",
    "Ring",
    "RingBatch",
    "RingError",
    "Settings",
    "SymbolTable",
    "WorkerPool",
    "WorkerStats",
    "load_settings",
    "now_us",
]
