"""Control messages from the network process to the consumer, through a ring of their own.

What the server sends that is not market data (status and error objects, texts without a
symbol) never goes into the data rings: the network process (the WebSocket listener, a
pub/sub source, a replay) counts it and :func:`publish` writes it here, and the Feed hands it
to the consumer on the next :class:`fastfeed.Batch` (``batch.control``), in every mode.

Control messages are rare and must never slow the data path, so the ring drops when full (a
consumer that does not read): the ring counts what it refused (``control_dropped`` in the
feed's stats). A feed with no output (``output=False``: handlers do the work) has no control
ring; the messages are then counted and logged at debug only, as before.
"""

from __future__ import annotations

from ._ring import Ring

__all__ = ["CONTROL_CAPACITY", "ControlReader", "attach", "publish"]

#: Bytes of the control ring: its largest message is an eighth of this (longer ones are cut).
CONTROL_CAPACITY = 1 << 20

_ring: Ring | None = None  # in the network process: where publish() writes


def attach(name: str) -> None:
    """In the network process: send control messages to the ring named ``name``."""
    global _ring
    _ring = Ring.attach(name)


def publish(payload: bytes) -> None:
    """Hand one control message to the consumer (no-op when nobody reads them). Never blocks."""
    r = _ring
    if r is not None:
        if len(payload) > r.max_payload:
            payload = payload[: r.max_payload]
        r.write(payload)


class ControlReader:
    """The consumer's end: creates the ring and takes what arrived."""

    def __init__(self, name: str) -> None:
        self.ring = Ring.create(name, CONTROL_CAPACITY, full_policy="drop")
        self.name = self.ring.name

    def pending(self) -> bool:
        """True if messages wait (one atomic load: cheap enough for every poll)."""
        return self.ring.used != 0

    def take(self) -> list[bytes]:
        """Every message that arrived, oldest first."""
        out: list[bytes] = []
        while (b := self.ring.read_batch(1024, 0)) is not None:
            with b:
                out.extend(bytes(b.frame(i)) for i in range(len(b)))
        return out

    @property
    def dropped(self) -> int:
        """Messages refused because nobody read the ring in time."""
        return self.ring.dropped

    def close(self) -> None:
        """Shut the ring and remove its segment."""
        self.ring.close()
        self.ring.unlink()
