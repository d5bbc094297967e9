"""The network process: the WebSocket session to the feed (PROTOCOL.md section 2).

:class:`FeedSession` owns the connection on uvloop + picows: token (cache or login), the
``X-ZUMO-AUTH`` upgrade, the email message, the optional subscription message, the text
``ping`` heartbeat with its pong watchdog, reconnects with capped exponential back-off and
jitter, and the control path. The per-frame work happens in C, in
:class:`fastfeed._listener.FeedListener`, which writes each data frame into the ring of its
symbol.

:class:`SessionProcess` runs a session in its own (spawned) process, writing into rings the
parent created (by name), with live counters in shared memory::

    proc = SessionProcess(settings, [ring.name for ring in rings]).start()
    ...
    proc.counters()        # {"frames": ..., "reconnects": ..., ...}
    proc.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Any

from .auth import Authenticator, AuthError, CredentialsError, Token
from .child import ChildProcess, serve
from .config import ConfigError, Settings

__all__ = ["COUNTERS", "Backoff", "FeedAuthError", "FeedSession", "SessionProcess", "run_session"]

log = logging.getLogger("fastfeed.session")

#: Counter names, in the order of the shared array of :class:`SessionProcess`.
COUNTERS = ("frames", "bytes", "ring_drops", "control", "pongs", "fragmented", "too_big",
            "connects", "reconnects", "auth_renewals", "refused_upgrades", "pings_sent",
            "heartbeat_timeouts", "connect_errors", "pauses", "backpressure_us", "backlog",
            # control messages as the decoder counts them (fastfeed.control)
            "control_msgs", "control_errors", "unroutable")

# picows' limit for one frame: the provider's messages are small; 16 MiB only guards memory.
_MAX_FRAME = 16 * 1024 * 1024
# picows' initial read buffer: large reads mean many frames per wakeup at high rates.
_READ_BUFFER = 1 << 20


class _RedactingAdapter(logging.LoggerAdapter):  # type: ignore[type-arg]
    """picows' logger, with the ``X-ZUMO-AUTH`` value blanked out of every record.

    picows logs the whole upgrade request (headers included) at its level 9, below DEBUG: a
    user who turns logging all the way up must still never see the token. An adapter rather
    than a filter because picows gives each connection its own child of a plain logger, and
    filters do not apply to children; an adapter it uses as it is.
    """

    _pattern = re.compile(r"(x-zumo-auth:\s*)[^\s\\'\"]+", re.IGNORECASE)

    def log(self, level: int, msg: Any, *args: Any, **kwargs: Any) -> None:
        if not self.isEnabledFor(level):
            return
        text = str(msg) % args if args else str(msg)
        if "zumo" in text.lower():
            text = self._pattern.sub(r"\1<redacted>", text)
        kwargs.setdefault("stacklevel", 2)
        self.logger.log(level, "%s", text, **kwargs)


_PICOWS_LOGGER = _RedactingAdapter(logging.getLogger("picows.fastfeed"), {})


class FeedAuthError(AuthError):
    """The feed host refused a token that had just been issued: retrying cannot help."""


class Backoff:
    """Capped exponential back-off with full jitter: ``first``, then doubling up to ``cap``.

    The first retry is fast (a dropped connection is usually a one-off); :meth:`reset` after a
    connection that stayed healthy for ``reset_after`` seconds starts again from ``first``.
    """

    def __init__(self, first: float, cap: float, reset_after: float,
                 rng: random.Random | None = None) -> None:
        if first < 0 or cap < first:
            raise ValueError("back-off needs 0 <= first <= cap")
        self.first, self.cap, self.reset_after = first, cap, reset_after
        self._attempt = 0
        self._rng = rng or random.Random()

    def next(self, healthy_for: float = 0.0) -> float:
        """The delay before the next attempt; ``healthy_for``: how long the last connection lived."""
        if healthy_for >= self.reset_after:
            self._attempt = 0
        delay = min(self.cap, self.first * (2 ** self._attempt)) if self.first else 0.0
        self._attempt = min(self._attempt + 1, 62)
        # Full jitter keeps many clients that lost the feed at once from reconnecting in step.
        return self._rng.uniform(delay / 2, delay)

    def reset(self) -> None:
        """Start again from the first delay."""
        self._attempt = 0


class FeedSession:
    """One logical feed session: connects, keeps the connection healthy, reconnects.

    ``rings``: the rings data frames go to (objects with an ``address``, such as
    ``fastfeed._ring.Ring``, or plain base addresses); a frame goes to ring
    ``route_of(symbol) % len(rings)``. ``on_control(payload: bytes)`` sees every control message
    except ``pong`` (after it is counted and logged at debug).
    """

    def __init__(
        self,
        settings: Settings,
        rings: Sequence[Any],
        *,
        authenticator: Authenticator | None = None,
        on_control: Callable[[bytes], None] | None = None,
    ) -> None:
        from ._listener import FeedListener

        settings.require("host", "email")
        self.settings = settings
        self.auth = authenticator or Authenticator(settings)
        self._user_control = on_control
        addresses = [r if isinstance(r, int) else r.address for r in rings]
        self.listener = FeedListener(addresses, keepalive=list(rings), on_control=self._control)
        self._counts = dict.fromkeys(("connects", "reconnects", "refused_upgrades", "pings_sent",
                                      "heartbeat_timeouts", "connect_errors"), 0)
        self._renewals_at_start = self.auth.renewals
        from .control import ControlCounter

        self._classify = ControlCounter(self._counts)  # symbol-less frames, as the decoder
        self._stop = asyncio.Event()
        self.last_error: str | None = None

    def __repr__(self) -> str:
        return f"FeedSession(url={self.settings.ws_url!r}, rings={self.listener.n_rings})"

    # -- counters -----------------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        """Every counter in :data:`COUNTERS`, cumulative since the session was created."""
        lst = self.listener
        out = {"frames": lst.frames, "bytes": lst.bytes, "ring_drops": lst.ring_drops,
               "control": lst.control, "pongs": lst.pongs, "fragmented": lst.fragmented,
               "too_big": lst.too_big, "pauses": lst.pauses,
               "backpressure_us": lst.backpressure_ns() // 1000, "backlog": lst.backlog,
               "auth_renewals": self.auth.renewals - self._renewals_at_start}
        out.update(self._counts)
        return {k: out[k] for k in COUNTERS}

    def _control(self, payload: bytes) -> None:
        # Cold path: status and error objects, texts without a symbol. Shown at debug only and
        # cut short: a control message is never a place for secrets, but it can be long.
        self._classify(payload)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("control message: %r", payload[:200])
        if self._user_control is not None:
            self._user_control(payload)

    # -- lifecycle ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask :meth:`run` to close the connection (WebSocket close 1000) and return."""
        self._stop.set()

    async def run(self) -> None:
        """Connect and keep the feed flowing until :meth:`stop`.

        Raises :class:`~fastfeed.auth.CredentialsError` when the login itself is refused and
        :class:`FeedAuthError` when the feed host refuses a freshly issued token; every other
        failure is logged and retried with back-off.
        """
        renewer = asyncio.ensure_future(self._keep_token_fresh())
        try:
            await self._run()
        finally:
            renewer.cancel()
            await self._drain_backlog()

    async def _drain_backlog(self, timeout: float = 5.0) -> None:
        """Frames received but still waiting for room in a ring (lossless mode) go into the
        rings before the session ends, while the workers drain them; past ``timeout`` they
        are dropped and counted."""
        lst = self.listener
        deadline = time.monotonic() + timeout
        while lst.flush() and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        if lst.backlog:
            log.warning("stopping with %d received frames the rings had no room for: dropped",
                        lst.discard_backlog())

    async def _keep_token_fresh(self) -> None:
        """Renew the token in the background once it is within ``renew_before`` of expiry.

        A connection can outlive its token; renewing while connected means a reconnect late
        in a token's life never has to wait for (or fail on) a login.
        """
        loop = asyncio.get_running_loop()
        period = min(3600.0, max(0.1, self.settings.renew_before / 10))
        while True:
            await asyncio.sleep(period)
            try:
                await loop.run_in_executor(None, self.auth.get_token)  # renews when due
            except AuthError as exc:
                log.warning("background token renewal failed, will retry: %s", exc)

    async def _login(self, step: Callable[[], Any], backoff: Backoff) -> Any:
        """Run a blocking login step in the executor. Bad credentials end the session; any
        other failure is logged and waited out (None: the caller retries)."""
        try:
            return await asyncio.get_running_loop().run_in_executor(None, step)
        except CredentialsError:
            raise
        except AuthError as exc:
            self.last_error = str(exc)
            log.warning("login failed, will retry: %s", exc)
            await self._sleep(backoff.next())
            return None

    async def _run(self) -> None:
        s = self.settings
        backoff = Backoff(s.backoff_first, s.backoff_cap, s.backoff_reset_after)
        renewed_after_refusal = False
        while not self._stop.is_set():
            renewals = self.auth.renewals
            # The login is blocking HTTP (cold path): keep it off the event loop.
            token = await self._login(self.auth.get_token, backoff)
            if token is None:
                continue
            fresh = renewed_after_refusal or self.auth.renewals > renewals
            renewed_after_refusal = False
            status = await self._connect_once(token)
            if status == "refused":
                self._counts["refused_upgrades"] += 1
                if fresh:
                    raise FeedAuthError(
                        "exchange", f"feed host {s.base_url} refused a freshly issued token "
                        f"({self.last_error}); check the account's feed entitlement",
                        status=401)
                # Expired or revoked: log in again (both steps) once, then retry at once.
                if await self._login(lambda t=token: self.auth.renew(t), backoff) is None:
                    continue
                renewed_after_refusal = True
                continue
            if self._stop.is_set():
                break
            healthy_for = status if isinstance(status, float) else 0.0
            if isinstance(status, float):
                self._counts["reconnects"] += 1
            delay = backoff.next(healthy_for)
            log.info("reconnecting in %.2fs", delay)
            await self._sleep(delay)

    async def _sleep(self, delay: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stop.wait(), delay)

    async def _connect_once(self, token: Token) -> str | float | None:
        """One connection: "refused" on 401/403, None if it never opened, else its lifetime."""
        from picows import WSError, WSHandshakeError, WSMsgType, ws_connect

        s = self.settings
        ssl_ctx = None
        if s.ws_url.startswith("wss:"):
            ssl_ctx = ssl.create_default_context()
            if not s.verify_tls:
                ssl_ctx.check_hostname = False
                ssl_ctx.verify_mode = ssl.CERT_NONE
        try:
            transport, _ = await ws_connect(
                lambda: self.listener, s.ws_url, ssl_context=ssl_ctx,
                extra_headers={"X-ZUMO-AUTH": token.value}, enable_auto_pong=True,
                max_frame_size=_MAX_FRAME, read_buffer_init_size=_READ_BUFFER,
                websocket_handshake_timeout=max(5.0, s.heartbeat_interval),
                logger_name=_PICOWS_LOGGER)
        except WSHandshakeError as exc:
            resp = exc.response
            code = resp.status if resp is not None else None
            body = (exc.raw_body or b"")[:200].decode("utf-8", "replace")
            self.last_error = f"upgrade refused: HTTP {code} {body}".strip()
            if code in (401, 403):
                log.warning("feed host refused token %s: HTTP %s %s", token.fingerprint, code,
                            body)
                return "refused"
            self._counts["connect_errors"] += 1
            log.warning("WebSocket upgrade failed: HTTP %s %s", code, body)
            return None
        except (TimeoutError, OSError, WSError) as exc:
            self._counts["connect_errors"] += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("cannot connect to %s: %s", s.ws_url, self.last_error)
            return None

        self._counts["connects"] += 1
        opened = time.monotonic()
        log.info("connected to %s (token %s)", s.ws_url, token.fingerprint)
        # The provider expects the support contact first, then the optional subscription.
        transport.send(WSMsgType.TEXT, json.dumps({"email": s.email}).encode())
        if s.subscription:
            transport.send(WSMsgType.TEXT, s.subscription.encode())
        heartbeat = asyncio.ensure_future(self._heartbeat(transport))
        stop = asyncio.ensure_future(self._stop.wait())
        closed = asyncio.ensure_future(transport.wait_disconnected())
        try:
            await asyncio.wait({closed, stop, heartbeat}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            heartbeat.cancel()
            stop.cancel()
            if not closed.done():
                if self._stop.is_set():
                    transport.send_close()
                transport.disconnect(graceful=self._stop.is_set())
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(closed, 5.0)
            closed.cancel()
        lived = time.monotonic() - opened
        if not self._stop.is_set():
            log.warning("connection lost after %.1fs", lived)
        return lived

    async def _heartbeat(self, transport: Any) -> None:
        """Send ``ping`` every interval; return (dead connection) after ``pong_misses`` misses."""
        from picows import WSMsgType

        s = self.settings
        interval = s.heartbeat_interval
        limit_ns = int(interval * s.pong_misses * 1e9)
        opened_ns = time.monotonic_ns()
        while True:
            transport.send(WSMsgType.TEXT, b"ping")
            self._counts["pings_sent"] += 1
            await asyncio.sleep(interval)
            lst = self.listener
            if lst.paused:
                continue  # we stopped reading ourselves: the pong may sit unread in the socket
            # Time spent paused is ours, not the server's: count from the last resume too.
            last = max(opened_ns, lst.last_pong_ns, lst.last_resume_ns)
            if time.monotonic_ns() - last > limit_ns:
                self._counts["heartbeat_timeouts"] += 1
                log.warning("no pong for %d heartbeat intervals: connection is dead",
                            s.pong_misses)
                return


# -- the session in its own process ---------------------------------------------------------------

def run_session(settings: Settings, ring_names: Sequence[str], *,
                counters: Any | None = None, stop_event: Any | None = None) -> None:
    """Attach the rings by name and run a :class:`FeedSession` on uvloop until stopped.

    Blocking; this is the body of :class:`SessionProcess`. ``counters``: a shared array of
    ``len(COUNTERS)`` int64 updated every 50 ms and at the end. ``stop_event``: a
    ``multiprocessing.Event``; SIGTERM and SIGINT stop the session too.
    """
    import uvloop

    from ._ring import Ring

    rings = [Ring.attach(name) for name in ring_names]
    try:
        session = FeedSession(settings, rings)
        uvloop.run(serve(session, lambda: session.counters().values(), counters, stop_event))
    finally:
        for r in rings:
            r.close()


def _process_main(settings: Settings, ring_names: list[str], counters: Any, stop_event: Any,
                  conn: Any, log_level: int) -> None:
    logging.basicConfig(level=log_level,
                        format="%(asctime)s %(processName)s %(name)s %(levelname)s %(message)s")
    try:
        run_session(settings, ring_names, counters=counters, stop_event=stop_event)
    except (AuthError, ConfigError) as exc:
        conn.send(("error", " ".join(str(exc).split())))
        raise SystemExit(1) from None
    except BaseException as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        raise
    conn.send(("ok", None))


class SessionProcess(ChildProcess):
    """A :class:`FeedSession` in its own spawned process, writing into rings named by the parent.

    ``counters()`` reads the live counters from shared memory; ``error`` holds the one-line
    reason when the process stopped on a fatal error (bad credentials, refused token).
    """

    def __init__(self, settings: Settings, ring_names: Sequence[str], *,
                 log_level: int = logging.WARNING, log: Any = None) -> None:
        settings.require("host", "email")
        super().__init__(_process_main, (settings, list(ring_names)), COUNTERS,
                         name="fastfeed-session", log_level=log_level, log=log)
