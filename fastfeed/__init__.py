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

__version__ = "0.1.0"

__all__ = [
    "BAR_DTYPE",
    "NAT",
    "QUOTE_DTYPE",
    "TICK_DTYPE",
    "Batch",
    "Decoder",
    "SymbolTable",
    "now_us",
]
