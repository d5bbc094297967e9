"""What every pub/sub source shares: routing into rings, counters, reconnects, shutdown.

A source is one broker connection (or client) run on an event loop in the source process.
:class:`RingWriter` is its hot path: it finds a frame's symbol, routes it exactly as the
WebSocket listener does (``route_of(symbol) % len(rings)``, the route in the record), and
writes it into that ring, stamped with the receive time of the broker read it came from.
:class:`Source` is the cold path: connect, consume until stopped or disconnected, reconnect
with capped exponential back-off and jitter, close cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import deque
from collections.abc import Hashable, Sequence
from typing import Any, ClassVar

from .._listener import route_of
from ..session import Backoff
from . import COUNTERS
from .url import SourceURL

__all__ = ["COUNTERS", "FatalSourceError", "RingWriter", "SeenIds", "Source", "symbol_of"]

log = logging.getLogger("fastfeed.sources")

# The provider's frames start with the symbol: '{"c":"NASDAQ:AAPL",...}'. Anything else
# (arrays, other key orders, whitespace) takes the general scan below, which finds the same
# first string value of a "c" key as the listener's C scan.
_FAST_PREFIX = b'{"c":"'
_C_KEY = re.compile(rb'"c"[ \t\r\n]*:[ \t\r\n]*"([^"]*)"')
# Symbol -> route cache size: far above any real universe, bounded against junk symbols.
_ROUTE_CACHE_MAX = 1 << 16


class FatalSourceError(Exception):
    """A failure retrying cannot fix (refused credentials, missing client library, bad setup)."""


def symbol_of(payload: bytes) -> bytes | None:
    """The frame's symbol code: the first string value of a ``"c"`` key, as the WebSocket
    listener finds it (raw bytes, escapes not undone); None for a frame without one."""
    if payload.startswith(_FAST_PREFIX):
        end = payload.find(b'"', 6)
        return payload[6:end] if end >= 0 else None
    m = _C_KEY.search(payload)
    return m.group(1) if m is not None else None


def _slow_route(payload: bytes) -> int:
    """The route of a frame not in the provider's usual layout (arrays, other key orders,
    whitespace, garbage), -1 when it has no symbol."""
    first = payload[:1]
    if first not in (b"{", b"["):
        first = payload.lstrip()[:1]
    if first in (b"{", b"["):
        # route_of scans a JSON text with the listener's own C code.
        return int(route_of(payload))
    # route_of would take anything else for a bare symbol code: find the "c" key here.
    code = symbol_of(payload)
    return -1 if code is None else int(route_of(code))


class RingWriter:
    """Routes frames by symbol and writes them into the rings; counts what happens.

    ``rings``: :class:`fastfeed._ring.Ring` objects attached as producer, in pool order.
    ``counts``: the source's counter dict (:data:`COUNTERS` keys), updated in place.
    """

    __slots__ = ("_cache", "_n", "_rings", "_writes", "counts")

    def __init__(self, rings: Sequence[Any], counts: dict[str, int]) -> None:
        if not rings:
            raise ValueError("a source needs at least one ring")
        self._rings = list(rings)
        self._writes = [r.write for r in self._rings]
        self._n = len(self._rings)
        self._cache: dict[bytes, int] = {}
        self.counts = counts

    def route(self, payload: bytes) -> int:
        """The route of the frame's symbol, or -1 when it has none (a control message)."""
        if payload[:6] != _FAST_PREFIX:
            return _slow_route(payload)
        end = payload.find(b'"', 6)
        if end < 0:
            return -1
        code = payload[6:end]
        r = self._cache.get(code)
        if r is None:
            if len(self._cache) >= _ROUTE_CACHE_MAX:
                self._cache.clear()
            r = self._cache[code] = route_of(code)
        return r

    def write(self, payload: bytes, recv_ts: int) -> bool:
        """Commit one message: True when it is done with (written, control, or too big to ever
        fit, each counted), False when a ring refused it (counted; redeliver it)."""
        c = self.counts
        c["messages"] += 1
        r = self.route(payload)
        if r < 0:
            # As the WebSocket listener: no symbol means not market data; count, never decode.
            c["control"] += 1
            if log.isEnabledFor(logging.DEBUG):
                log.debug("control message: %r", payload[:200])
            return True
        try:
            ok = self._rings[r % self._n].write(payload, recv_ts=recv_ts, route=r)
        except ValueError:
            c["too_big"] += 1
            log.warning("message of %d bytes is larger than a ring record: dropped", len(payload))
            return True
        if ok:
            c["frames"] += 1
            c["bytes"] += len(payload)
            return True
        c["ring_drops"] += 1
        return False

    def write_batch(self, payloads: Sequence[bytes], recv_ts: int) -> list[int]:
        """:meth:`write` for every payload of one broker read; returns the indices a ring
        refused (usually none). The hot loop of the sources: locals, counters added once."""
        writes, n, cache = self._writes, self._n, self._cache
        frames = nbytes = control = 0
        refused: list[int] = []
        for i, p in enumerate(payloads):
            if p[:6] == _FAST_PREFIX and (end := p.find(b'"', 6)) >= 0:
                # '{"c":"CODE"...': the provider's own layout; the route of each code is
                # computed once.
                code = p[6:end]
                r = cache.get(code)
                if r is None:
                    if len(cache) >= _ROUTE_CACHE_MAX:
                        cache.clear()
                    r = cache[code] = route_of(code)
            else:
                r = _slow_route(p)
                if r < 0:
                    control += 1
                    if log.isEnabledFor(logging.DEBUG):
                        log.debug("control message: %r", p[:200])
                    continue
            try:
                ok = writes[r % n](p, recv_ts=recv_ts, route=r)
            except ValueError:
                self.counts["too_big"] += 1
                log.warning("message of %d bytes is larger than a ring record: dropped", len(p))
                continue
            if ok:
                frames += 1
                nbytes += len(p)
            else:
                refused.append(i)
        c = self.counts
        c["messages"] += len(payloads)
        c["frames"] += frames
        c["bytes"] += nbytes
        c["control"] += control
        c["ring_drops"] += len(refused)
        return refused


class SeenIds:
    """The ids of the last ``window`` messages committed to a ring, to recognise redeliveries.

    At-least-once brokers redeliver what was not acknowledged, including messages whose
    acknowledgement was lost with a connection: those were already decoded, so a second copy
    is counted as a duplicate and acknowledged without being written again.
    """

    __slots__ = ("_order", "_set", "window")

    def __init__(self, window: int = 1 << 18) -> None:
        self.window = max(1, window)
        self._set: set[Hashable] = set()
        self._order: deque[Hashable] = deque()

    def __len__(self) -> int:
        return len(self._set)

    def __contains__(self, msg_id: Hashable) -> bool:
        return msg_id in self._set

    def add(self, msg_id: Hashable) -> None:
        if msg_id in self._set:
            return
        self._set.add(msg_id)
        self._order.append(msg_id)
        if len(self._order) > self.window:
            self._set.discard(self._order.popleft())


class Source:
    """One broker source: subclasses implement :meth:`consume` (one connection's lifetime).

    :meth:`consume` connects (calling :meth:`connected` once it is up), then consumes until
    :attr:`stopping` is set, returning then; a lost connection is an exception. :meth:`run`
    wraps it in the reconnect loop. Subclasses release their connection in :meth:`close`.
    """

    #: URL schemes this source serves.
    schemes: ClassVar[tuple[str, ...]] = ()
    #: Query parameters it accepts (beyond :data:`COMMON_PARAMS`).
    params: ClassVar[tuple[str, ...]] = ()
    #: Whether the broker redelivers what is not acknowledged.
    at_least_once: ClassVar[bool] = False

    #: Parameters every source takes: back-off (seconds) and the duplicate window (messages).
    COMMON_PARAMS: ClassVar[tuple[str, ...]] = ("backoff_first", "backoff_cap", "dedup_window",
                                                "name")

    def __init__(self, url: SourceURL, rings: Sequence[Any]) -> None:
        self.url = url
        self.counts: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.out = RingWriter(rings, self.counts)
        self.seen = SeenIds(url.int("dedup_window", 1 << 18))
        self.stopping = False
        self._stop = asyncio.Event()
        self._connected_at: float | None = None
        self.last_error: str | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url.redacted!r})"

    # -- hooks --------------------------------------------------------------------------------

    async def consume(self) -> None:
        """Connect and consume until :attr:`stopping`; raise when the connection is lost."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release the connection (called after every :meth:`consume`, whatever happened)."""

    def connected(self) -> None:
        """Subclasses call this once the connection is up and subscribed."""
        c = self.counts
        c["connects"] += 1
        if c["connects"] > 1:
            c["reconnects"] += 1
        self._connected_at = time.monotonic()
        log.info("%s: connected to %s", type(self).__name__, self.url.redacted)

    # -- lifecycle ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask :meth:`run` to finish the current message batch, close and return."""
        self.stopping = True
        self._stop.set()

    async def run(self) -> None:
        """Consume, reconnecting with back-off, until :meth:`stop`.

        Raises :class:`FatalSourceError` when retrying cannot help.
        """
        u = self.url
        backoff = Backoff(u.float("backoff_first", 0.05), u.float("backoff_cap", 2.0), 10.0)
        while not self.stopping:
            self._connected_at = None
            task = asyncio.ensure_future(self.consume())
            stop = asyncio.ensure_future(self._stop.wait())
            try:
                await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
                if not task.done():
                    # Stopping: let the source finish its batch (write, then acknowledge) so
                    # that a clean stop leaves nothing pending; cancel past a bound.
                    done, _ = await asyncio.wait({task}, timeout=3.0)
                    if not done:
                        task.cancel()
                        with contextlib.suppress(asyncio.CancelledError, Exception):
                            await task
                        break
                exc = task.exception() if not task.cancelled() else None
            finally:
                stop.cancel()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.close(), 5.0)
            if isinstance(exc, FatalSourceError):
                raise exc
            if self.stopping:
                break
            healthy_for = 0.0
            if self._connected_at is not None:
                healthy_for = time.monotonic() - self._connected_at
                self.counts["disconnects"] += 1
                self.last_error = u.scrub(_describe(exc)) if exc else "connection closed"
                log.warning("%s: connection to %s lost: %s", type(self).__name__,
                            u.redacted, self.last_error)
            else:
                self.counts["connect_errors"] += 1
                self.last_error = u.scrub(_describe(exc)) if exc else "connection closed"
                log.warning("%s: cannot connect to %s: %s", type(self).__name__, u.redacted,
                            self.last_error)
            delay = backoff.next(healthy_for)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)

    async def sleep(self, seconds: float) -> None:
        """Sleep, waking early when the source is stopped."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)


def _describe(exc: BaseException) -> str:
    # One line, and never the URL: client libraries sometimes echo it with its password.
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]
