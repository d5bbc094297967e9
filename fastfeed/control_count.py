"""Messages without a symbol, counted as the standalone decoder counts them.

The network process (the WebSocket listener, a broker source) routes each frame by its
symbol; a frame without one goes to no ring. It used to be counted as one "control"
message whatever it held, so a feed's totals differed from :class:`fastfeed.Decoder`'s on
the same frames: a malformed frame without a symbol is an *error* to the decoder, and an
array of two status objects is *two* control messages. :class:`ControlCounter` decodes each
such frame (the cold path: status and error objects are rare) and counts what the decoder
finds: ``control_msgs``, ``control_errors``, and ``unroutable`` for a frame that holds
market data the router could not place (its ``"c"`` key written with JSON escapes, which the
provider never does); those rows are lost, counted, and logged once.
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["CONTROL_COUNTERS", "ControlCounter"]

#: The counters a ControlCounter keeps (added to a source's or session's counters).
CONTROL_COUNTERS = ("control_msgs", "control_errors", "unroutable")

log = logging.getLogger("fastfeed.control_count")

# A decoder's own symbol table fills with the codes of unroutable frames: start a fresh one
# well before it is full (a full table would turn later frames into errors).
_FRESH_AFTER = 60_000


class ControlCounter:
    """``counter(payload)`` adds one symbol-less frame's decoder counts to ``counts``."""

    def __init__(self, counts: dict[str, int]) -> None:
        self.counts = counts
        for k in CONTROL_COUNTERS:
            counts.setdefault(k, 0)
        self._dec: Any = None
        self._said = False

    def __call__(self, payload: Any) -> None:
        dec = self._dec
        if dec is None or len(dec.symbols) > _FRESH_AFTER:
            from fastfeed._decoder import Decoder

            dec = self._dec = Decoder(error_store=0)
        e0, c0 = dec.errors_total, dec.control_total
        b = dec.decode([payload])
        c = self.counts
        c["control_msgs"] += dec.control_total - c0
        c["control_errors"] += dec.errors_total - e0
        if b.rows:
            c["unroutable"] += 1
            if not self._said:
                self._said = True
                log.warning("a frame with market data but no symbol the router can read (its "
                            "\"c\" key written with JSON escapes?) went to no ring: counted in "
                            "'unroutable' (logged once): %r", bytes(payload[:120]))
