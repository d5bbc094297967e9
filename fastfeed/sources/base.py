"""What every pub/sub source shares: routing into rings, counters, reconnects, shutdown.

A source is one broker connection (or client) run on an event loop in the source process.
:class:`RingWriter` is its hot path: it finds a frame's symbol, routes it exactly as the
WebSocket listener does (``route_of(symbol) % len(rings)``, the route in the record), and
writes it into that ring, stamped with the receive time of the broker read it came from.
:class:`Source` is the cold path: connect, consume until stopped or disconnected, reconnect
with capped exponential back-off and jitter, close cleanly.

**Backpressure.** Under the rings' "pause" full policy a ring refuses a frame without
dropping it. :class:`RingWriter` then keeps that frame and every later one, in order, in a
backlog, counts a pause, tells the connection to stop reading (``attach``: the transport's
``pause_reading``/``resume_reading``), and retries on a short loop timer until the workers have
made room; the backlog written, reading resumes and the time paused is counted
(``backpressure_us``). At-least-once sources also wait for the backlog (:meth:`RingWriter.drain`,
:meth:`RingWriter.written`) before they acknowledge anything, and fetch nothing meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import ssl
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, ClassVar

from .. import control as fastfeed_control  # write_many counts in a local named control
from .._listener import route_of
from ..backoff import Backoff
from ..control_count import ControlCounter
from ..tls import client_context, tls_failure
from . import COUNTERS
from .url import SourceURL, SourceURLError

__all__ = ["COUNTERS", "FatalSourceError", "RingWriter", "SeenIds", "Source", "symbol_of"]

log = logging.getLogger("fastfeed.sources")

# The provider's frames start with the symbol: '{"c":"NASDAQ:AAPL",...}'. Anything else
# (arrays, other key orders, whitespace) takes the general scan below, which finds the same
# first string value of a "c" key as the listener's C scan.
_FAST_PREFIX = b'{"c":"'
_C_KEY = re.compile(rb'"c"[ \t\r\n]*:[ \t\r\n]*"([^"]*)"')
# Symbol -> route cache size: far above any real universe, bounded against junk symbols.
_ROUTE_CACHE_MAX = 1 << 16
# How often a backlog is retried while the rings are full (as the WebSocket listener): uvloop's
# timers tick in whole milliseconds, and a ring takes longer than that to fill at feed rates.
_RETRY_S = 0.0005


class FatalSourceError(Exception):
    """A failure retrying cannot fix (refused credentials, missing client library, bad setup)."""

    @classmethod
    def credentials(cls, broker: str, u: SourceURL, reply: str) -> FatalSourceError:
        """The broker at ``u`` refused the credentials; ``reply`` is what it said (the
        password is blanked out of it)."""
        return cls(f"{broker} at {u.endpoint} refused the credentials: {u.scrub(reply)}")


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

    Under the "pause" policy nothing is dropped: a refused frame and every frame after it go
    to :attr:`backlog` (in order) until the rings have room; see the module docstring.
    """

    __slots__ = ("_cache", "_discarded", "_empty", "_hooks", "_kept", "_lossless", "_n",
                 "_paused_at", "_paused_ns", "_reading_paused", "_rings", "_taken", "_timer",
                 "_writes", "backlog", "counts", "resumed_at", "seen", "_classify")

    def __init__(self, rings: Sequence[Any], counts: dict[str, int]) -> None:
        if not rings:
            raise ValueError("a source needs at least one ring")
        self._rings = list(rings)
        self._writes = [r.write for r in self._rings]
        self._n = len(self._rings)
        self._cache: dict[bytes, int] = {}
        self.counts = counts
        self._classify = ControlCounter(counts)  # symbol-less frames, as the decoder counts
        # Which rings refuse without dropping ("pause"): only looked at on a refusal.
        self._lossless = [getattr(r, "full_policy", None) == "pause" for r in self._rings]
        #: Frames a ring had no room for, in arrival order: (payload, route, receive time,
        #: message id or None).
        self.backlog: deque[tuple[bytes, int, int, Hashable]] = deque()
        #: Where the ids given to :meth:`write` go once their frame is in a ring.
        self.seen: SeenIds | None = None
        self._kept = 0        # frames ever put in the backlog (the last one's ticket)
        self._taken = 0       # frames ever taken out of it (written, or too big)
        self._discarded: list[tuple[int, int]] = []  # ticket ranges discarded, not written
        self._paused_at = 0   # time.monotonic_ns() the current pause began; 0: not paused
        self._paused_ns = 0   # total of the pauses that ended
        #: time.monotonic() of the last resume (0.0 before any): heartbeat clocks start there.
        self.resumed_at = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._hooks: tuple[Callable[[], Any], Callable[[], Any]] | None = None
        self._reading_paused = False
        self._empty: asyncio.Event | None = None  # created by the first written() (async only)

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

    def write(self, payload: bytes, recv_ts: int, key: Hashable = None) -> bool:
        """Commit one message: True when it is done with (written, control, or too big to ever
        fit, each counted) or kept in the backlog (the "pause" policy: it will be written, in
        order; an at-least-once caller acknowledges it after :meth:`written`), False when a
        ring dropped it (counted; redeliver it). ``key``: the message's id, added to
        :attr:`seen` as soon as the frame is in a ring (from the backlog too)."""
        c = self.counts
        c["messages"] += 1
        r = self.route(payload)
        if r < 0:
            # As the WebSocket listener: no symbol means not market data; count, never decode.
            c["control"] += 1
            self._classify(payload)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("control message: %r", payload[:200])
            fastfeed_control.publish(payload)
            return True
        if self.backlog:
            self._keep(payload, r, recv_ts, key)  # behind the frames that wait: keep the order
            return True
        i = r % self._n
        try:
            ok = self._writes[i](payload, recv_ts=recv_ts, route=r)
        except ValueError:
            c["too_big"] += 1
            log.warning("message of %d bytes is larger than a ring record: dropped", len(payload))
            ok = True
        else:
            if ok:
                c["frames"] += 1
                c["bytes"] += len(payload)
        if ok:
            if key is not None and self.seen is not None:
                self.seen.add(key)
            return True
        if self._lossless[i]:
            self._keep(payload, r, recv_ts, key)
            self._pause()
            return True
        c["ring_drops"] += 1
        return False

    def write_batch(self, payloads: Sequence[bytes], recv_ts: int) -> list[int]:
        """:meth:`write` for every payload of one broker read; returns the indices a ring
        dropped (usually none; never under "pause", where the first refused frame and all
        after it go to the backlog). The hot loop of the sources: locals, counters added
        once."""
        if self.backlog:
            self._keep_all(payloads, 0, recv_ts)
            self.counts["messages"] += len(payloads)
            return []
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
                    self._classify(p)
                    if log.isEnabledFor(logging.DEBUG):
                        log.debug("control message: %r", p[:200])
                    fastfeed_control.publish(p)
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
            elif self._lossless[r % n]:
                # Full, nothing dropped: this frame and the rest wait, in order.
                self._keep(p, r, recv_ts)
                self._keep_all(payloads, i + 1, recv_ts)
                self._pause()
                break
            else:
                refused.append(i)
        c = self.counts
        c["messages"] += len(payloads)
        c["frames"] += frames
        c["bytes"] += nbytes
        c["control"] += control
        c["ring_drops"] += len(refused)
        return refused

    # -- backpressure (the "pause" policy) ---------------------------------------------------

    @property
    def paused(self) -> bool:
        """True while frames wait for room in a ring (reading is paused)."""
        return self._paused_at != 0

    @property
    def kept(self) -> int:
        """Frames ever put in the backlog: the ticket of the last one (see :meth:`written`)."""
        return self._kept

    def backpressure_us(self) -> int:
        """Total time paused for room in a ring, in µs, the current pause included."""
        ns = self._paused_ns
        if self._paused_at:
            ns += time.monotonic_ns() - self._paused_at
        return ns // 1000

    def attach(self, pause_reading: Callable[[], Any] | None = None,
               resume_reading: Callable[[], Any] | None = None) -> None:
        """Hook the current connection's ``pause_reading``/``resume_reading`` (None: detach,
        when the connection is gone). A connection attached while frames still wait is
        paused at once: the frames of the last connection go first."""
        self._reading_paused = False
        if pause_reading is None or resume_reading is None:
            self._hooks = None
            return
        self._hooks = (pause_reading, resume_reading)
        if self.backlog:
            self._pause()

    def _keep(self, payload: bytes, route: int, recv_ts: int, key: Hashable = None) -> None:
        self.backlog.append((payload, route, recv_ts, key))
        self._kept += 1

    def _keep_all(self, payloads: Sequence[bytes], start: int, recv_ts: int) -> None:
        """Keep ``payloads[start:]`` behind the backlog (control messages are only counted)."""
        for j in range(start, len(payloads)):
            p = payloads[j]
            r = self.route(p)
            if r < 0:
                self.counts["control"] += 1
                self._classify(p)
                fastfeed_control.publish(p)
            else:
                self._keep(p, r, recv_ts)

    def flush(self) -> int:
        """Write what the backlog holds into the rings, in order, as far as they have room;
        resume once it is empty. Returns the frames still waiting."""
        bl = self.backlog
        if not bl:
            if self._paused_at:
                self._resume()
            return 0
        writes, n = self._writes, self._n
        frames = nbytes = taken = 0
        c = self.counts
        seen = self.seen
        while bl:
            p, r, ts, key = bl[0]
            try:
                ok = writes[r % n](p, recv_ts=ts, route=r)
            except ValueError:
                c["too_big"] += 1
                log.warning("message of %d bytes is larger than a ring record: dropped", len(p))
                ok = None
            if ok is False:
                if self._lossless[r % n]:
                    break  # still full: keep the order, try again later
                c["ring_drops"] += 1  # a ring of another policy dropped it
            else:
                if ok:
                    frames += 1
                    nbytes += len(p)
                if key is not None and seen is not None:
                    seen.add(key)  # committed: a redelivery is a duplicate from now on
            bl.popleft()
            taken += 1
        self._taken += taken
        c["frames"] += frames
        c["bytes"] += nbytes
        if not bl and self._paused_at:
            self._resume()
        return len(bl)

    def _pause(self) -> None:
        if not self._paused_at:
            self._paused_at = time.monotonic_ns()
            self.counts["pauses"] += 1
            if self._empty is not None:
                self._empty.clear()
        self._arm()  # first: the retry must be armed whatever the transport does
        if self._hooks is not None and not self._reading_paused:
            self._reading_paused = True
            self._hooks[0]()

    def _resume(self) -> None:
        self._paused_ns += time.monotonic_ns() - self._paused_at
        self._paused_at = 0
        self.resumed_at = time.monotonic()
        self.counts["backpressure_us"] = self._paused_ns // 1000
        if self._empty is not None:
            self._empty.set()
        if self._reading_paused and self._hooks is not None:
            self._reading_paused = False
            with contextlib.suppress(Exception):  # a transport closing meanwhile
                self._hooks[1]()

    def _arm(self) -> None:
        """Retry the backlog on the running loop's timer (a thread without a loop, the Kafka
        poller, calls :meth:`flush` itself)."""
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._timer = loop.call_later(_RETRY_S, self._retry)

    def _retry(self) -> None:
        self._timer = None
        if self.flush():
            self._arm()

    async def written(self, ticket: int) -> bool:
        """Wait until the backlog frame ``ticket`` (a :attr:`kept` value) and every frame
        before it are written; False when they were discarded instead (:meth:`discard`)."""
        if self._empty is None:
            self._empty = asyncio.Event()
            if not self._paused_at:
                self._empty.set()
        while self._taken < ticket:
            self._arm()
            await self._empty.wait()
        return not any(lo <= ticket <= hi for lo, hi in self._discarded)

    async def drain(self) -> bool:
        """Wait until everything kept so far is written (False: discarded meanwhile)."""
        return await self.written(self._kept)

    def discard(self) -> int:
        """Forget the backlog (its frames are not written) and resume; returns how many
        frames it held. The caller counts them: lost (at most once) or handed back to the
        broker (at least once: they were not acknowledged)."""
        n = len(self.backlog)
        if n:
            self._discarded.append((self._taken + 1, self._kept))
            del self._discarded[:-16]  # only recent tickets are ever waited for
            self.backlog.clear()
            self._taken = self._kept
        if self._paused_at:
            self._resume()
        return n


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

    def add_many(self, ids: Iterable[Hashable]) -> None:
        """:meth:`add` for ids that are not in the window yet (a batch of new ones), in a few
        C calls rather than a Python loop per id."""
        if not isinstance(ids, (list, tuple)):
            ids = list(ids)
        self._set.update(ids)
        order = self._order
        order.extend(ids)
        excess = len(order) - self.window
        if excess > 0:
            pop = order.popleft
            self._set.difference_update([pop() for _ in range(excess)])


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

    #: Parameters every source takes: back-off (seconds), the duplicate window (messages),
    #: and for the TLS schemes the CA file and client certificate (PEM paths).
    COMMON_PARAMS: ClassVar[tuple[str, ...]] = ("backoff_first", "backoff_cap", "dedup_window",
                                                "name", "ca_file", "client_cert", "client_key")

    def __init__(self, url: SourceURL, rings: Sequence[Any]) -> None:
        self.url = url
        self.counts: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.out = RingWriter(rings, self.counts)
        self.seen = SeenIds(url.int("dedup_window", 1 << 18))
        self.out.seen = self.seen
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

    def counters(self) -> dict[str, int]:
        """The live counters (:attr:`counts`, with a pause in progress in
        ``backpressure_us``)."""
        c = self.counts
        c["backpressure_us"] = self.out.backpressure_us()
        return c

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
                self.out.attach(None)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.close(), 5.0)
                if self.at_least_once:
                    await self._settle_backlog()
            if isinstance(exc, FatalSourceError):
                raise exc
            if exc is not None and u.scheme in TLS_SCHEMES:
                fatal = tls_failure(exc, f"{u.host}:{u.port}", ca_file=u.str("ca_file"),
                                    client_cert=u.str("client_cert"))
                if fatal is not None:  # an untrusted certificate stays untrusted
                    raise FatalSourceError(fatal.replace("--ca-file FILE (FASTFEED_CA_FILE, "
                                                         "ca_file=)", "?ca_file=FILE in the URL"))
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
        await self._settle_backlog()

    async def _settle_backlog(self, timeout: float = 5.0) -> None:
        """After a connection, frames that still wait for room in a ring ("pause" policy).

        At least once, nothing of them was acknowledged: they are discarded and the broker
        delivers them again (counted as ``nacked``). At most once they were received and
        cannot come again: they stay, and go first into the rings, across a reconnect; when
        stopping they get ``timeout`` seconds (the workers still drain the rings), then what
        is left is dropped and counted (``ring_drops``)."""
        out = self.out
        if not out.backlog:
            return
        if self.at_least_once:
            self.counts["nacked"] += out.discard()
            return
        deadline = time.monotonic() + timeout
        while out.flush() and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        n = out.discard()
        if n:
            self.counts["ring_drops"] += n
            log.warning("%s: stopping with %d received frames the rings had no room for: "
                        "dropped", type(self).__name__, n)

    async def sleep(self, seconds: float) -> None:
        """Sleep, waking early when the source is stopped."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)


#: URL schemes that speak TLS (``ca_file=``, ``client_cert=``, ``client_key=`` apply).
TLS_SCHEMES = ("rediss", "rediss+stream", "tls", "amqps")


def tls_context(u: SourceURL) -> ssl.SSLContext | None:
    """The verified TLS context for a TLS scheme (None otherwise): the URL's ``ca_file=``
    else the defaults (``SSL_CERT_FILE``/``SSL_CERT_DIR``, the system store), with
    ``client_cert=``/``client_key=`` for mutual TLS (see :mod:`fastfeed.tls`)."""
    if u.scheme not in TLS_SCHEMES:
        return None
    return client_context(u.str("ca_file"), u.str("client_cert"), u.str("client_key"))


def check_tls_params(u: SourceURL) -> None:
    """The TLS parameters name files that exist, and only on a TLS scheme."""
    given = [k for k in ("ca_file", "client_cert", "client_key") if u.str(k)]
    if given and u.scheme not in TLS_SCHEMES:
        raise SourceURLError(f"{', '.join(k + '=' for k in given)}: for TLS schemes only "
                             f"({', '.join(s + '://' for s in TLS_SCHEMES)})")
    for k in given:
        path = u.str(k)
        assert path is not None
        if not os.path.isfile(path):
            raise SourceURLError(f"{k}={path}: no such file")
    if u.str("client_key") and not u.str("client_cert"):
        raise SourceURLError("client_key= needs client_cert=")
    if given:
        try:
            tls_context(u)
        except (ssl.SSLError, OSError) as exc:
            raise SourceURLError(f"cannot use {', '.join(f'{k}={u.str(k)}' for k in given)}: "
                                 f"{getattr(exc, 'reason', None) or exc}") from None


def _describe(exc: BaseException) -> str:
    # One line, and never the URL: client libraries sometimes echo it with its password.
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]
