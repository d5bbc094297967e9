"""Type stub for the extension fastfeed._listener (source: ext/listener.pyx)."""

import builtins
from collections.abc import Callable, Iterable
from typing import Any

from picows import WSFrame, WSListener, WSTransport

def route_of(code: builtins.bytes | str) -> int:
    """The route (31-bit FNV-1a hash) of a symbol code; its ring is ``route % n_rings``."""

class FeedListener(WSListener):
    """picows listener that writes each data frame into the ring of its symbol."""

    frames: int
    bytes: int
    ring_drops: int
    control: int
    pongs: int
    fragmented: int
    too_big: int
    last_pong_ns: int
    connections: int
    transport: WSTransport | None
    def __init__(
        self,
        ring_addresses: Iterable[int],
        keepalive: Any = None,
        on_control: Callable[[builtins.bytes], None] | None = None,
    ) -> None: ...
    @property
    def n_rings(self) -> int: ...
    def stats(self) -> dict[str, int]: ...
    def on_ws_connected(self, transport: WSTransport) -> None: ...
    def on_ws_disconnected(self, transport: WSTransport) -> None: ...
    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None: ...
