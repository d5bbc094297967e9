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
import functools
import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

from . import control
from .auth import MAX_RETRY_AFTER_S, Authenticator, AuthError, CredentialsError, Token
from .backoff import Backoff
from .child import ChildProcess, serve
from .config import ConfigError, Settings
from .net import FatalNetworkError, proxy_auth_failure, proxy_for, redact_url
from .tls import tls_failure

__all__ = ["COUNTERS", "FeedAuthError", "FeedSession", "SessionProcess", "run_session"]

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
    """The feed host refused a token that had just been issued, twice: retrying cannot help."""


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
        from .control_count import ControlCounter

        self._classify = ControlCounter(self._counts)  # symbol-less frames, as the decoder
        self._stop = asyncio.Event()
        self.last_error: str | None = None
        self._ssl: Any = None
        self._down_since = time.monotonic()  # since when no connection is up
        self._attempts = 0  # failed attempts since then
        self._tls_eofs = 0  # TLS connections closed unanswered right after the handshake

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
        control.publish(payload)  # to the consumer's batches, when a feed reads them
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

    async def _login(self, step: Callable[[float | None], Any], backoff: Backoff) -> Any:
        """Run a blocking login step in the executor. Refused credentials and certificates
        end the session; any other failure is logged with the next delay and waited out
        (None: the caller retries)."""
        s = self.settings
        deadline = self._deadline()
        try:
            return await asyncio.get_running_loop().run_in_executor(None, step, deadline)
        except CredentialsError:
            raise
        except AuthError as exc:
            self._counts["connect_errors"] += 1
            self.last_error = " ".join(str(exc).split())
            if exc.status is None and any(m in self.last_error for m in _CLOSED_UNANSWERED):
                # closed without an answer: over TLS, maybe a refused client certificate
                url = s.token_url if exc.step == "token" else s.exchange_url
                if url.startswith("https:") and proxy_for(url, s.proxy) is None:
                    await self._diagnose_tls(_host_port(url))
            delay = backoff.next()
            if exc.retry_after is not None:  # a throttling server said how long
                delay = max(delay, min(exc.retry_after, MAX_RETRY_AFTER_S))
            await self._wait_retry(f"login failed: {self.last_error}", delay)
            return None

    async def _diagnose_tls(self, where: str) -> None:
        """After a TLS connection to ``where`` closed before any answer: ask the server once
        more, directly, why (TLS 1.3 servers send a refused client certificate's alert after
        the handshake, which the clients above do not surface); raise
        :class:`~fastfeed.net.FatalNetworkError` when it is something retrying cannot fix."""
        s = self.settings
        fatal = await asyncio.get_running_loop().run_in_executor(
            None, _probe_tls, where, self._ssl_context(), s)
        if fatal == "eof":
            # No alert, no answer: some TLS stacks close this way on a refused client
            # certificate (asyncio's, the simulator's, among them). Three in a row is not
            # a passing hiccup.
            self._tls_eofs += 1
            if self._tls_eofs >= 3:
                given = (f"the one given, {s.client_cert}, is not accepted"
                         if s.client_cert else "none was given")
                raise FatalNetworkError(
                    f"{where} closed the TLS connection right after the handshake, "
                    f"{self._tls_eofs} times, without an answer: it wants a client "
                    f"certificate and {given} -- give one its CA accepts with "
                    f"--client-cert FILE --client-key FILE")
        elif fatal is not None:
            raise FatalNetworkError(fatal)

    def _renew(self, refused: Token, deadline: float | None) -> Token:
        return self.auth.renew(refused, deadline, attempts=1)

    def _deadline(self) -> float | None:
        """When ``connect_timeout`` runs out (``time.monotonic()``), None without one."""
        t = self.settings.connect_timeout
        return None if t is None else self._down_since + t

    async def _wait_retry(self, what: str, delay: float) -> None:
        """Log one failed attempt (reason, count, next delay) and wait; past the
        ``connect_timeout`` deadline, raise :class:`~fastfeed.net.FatalNetworkError`."""
        s = self.settings
        self._attempts += 1
        deadline = self._deadline()
        if deadline is not None and time.monotonic() + delay >= deadline:
            await self._sleep(max(0.0, deadline - time.monotonic()))
            if self._stop.is_set():
                return
            raise FatalNetworkError(
                f"no connection to {s.base_url} for {s.connect_timeout:g} s "
                f"(--connect-timeout) after {self._attempts} attempt(s); last error: "
                f"{self.last_error}")
        log.warning("%s; attempt %d, next in %.2fs", what, self._attempts, delay)
        await self._sleep(delay)

    async def _run(self) -> None:
        s = self.settings
        if not s.verify_tls and s.ws_url.startswith("wss:"):
            log.warning("TLS verification is OFF (verify_tls=false): anyone on the path can "
                        "read the feed and the token")
        backoff = Backoff(s.backoff_first, s.backoff_cap, s.backoff_reset_after)
        renewed_after_refusal = False
        fresh_refused = 0
        self._down_since = time.monotonic()
        while not self._stop.is_set():
            renewals = self.auth.renewals
            # The login is blocking HTTP (cold path): keep it off the event loop.
            # One HTTP attempt per login here: this loop's back-off retries (and logs) it.
            token = await self._login(lambda d: self.auth.get_token(d, attempts=1), backoff)
            if token is None:
                continue
            fresh = renewed_after_refusal or self.auth.renewals > renewals
            renewed_after_refusal = False
            status = await self._connect_once(token)
            if status == "refused":
                self._counts["refused_upgrades"] += 1
                if fresh:
                    fresh_refused += 1
                    if fresh_refused > 1:
                        raise FeedAuthError(
                            "exchange", f"feed host {s.base_url} refused two freshly issued "
                            f"tokens ({self.last_error}) -- check that the app's client id is "
                            f"entitled to the feed", status=401)
                    log.warning("feed host refused a fresh token (%s); logging in once more",
                                self.last_error)
                # Expired, revoked, or refused once just after a login: log in again (both
                # steps) and retry at once.
                if await self._login(functools.partial(self._renew, token), backoff) is None:
                    continue
                renewed_after_refusal = True
                continue
            if self._stop.is_set():
                break
            if isinstance(status, float):
                # It was up: the connect deadline and the attempt count start again.
                fresh_refused = 0
                self._counts["reconnects"] += 1
                self._down_since = time.monotonic()
                self._attempts = 0
                delay = backoff.next(status)
                log.info("reconnecting in %.2fs", delay)
                await self._sleep(delay)
            else:
                await self._wait_retry(f"cannot connect to {s.ws_url}: {self.last_error}",
                                       backoff.next())

    async def _sleep(self, delay: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stop.wait(), delay)

    def _proxy(self) -> tuple[str | None, Any]:
        """The proxy for the WebSocket (explicit, else *_PROXY/NO_PROXY) and the TLS context
        for an https:// proxy."""
        s = self.settings
        proxy = proxy_for(s.ws_url, s.proxy)
        if proxy is None:
            return None, None
        if proxy.startswith("socks5h:"):
            proxy = "socks5:" + proxy[8:]  # python-socks sends the name itself (remote DNS)
        return proxy, (self._ssl_context() if proxy.startswith("https:") else None)

    def _host_port(self) -> str:
        return _host_port(self.settings.ws_url)

    def _ssl_context(self) -> Any:
        if self._ssl is None:
            self._ssl = self.settings.ssl_context()
        return self._ssl

    async def _connect_once(self, token: Token) -> str | float | None:
        """One connection: "refused" on 401/403, None if it never opened, else its lifetime.

        Raises :class:`~fastfeed.net.FatalNetworkError` for what retrying cannot fix (an
        untrusted or mismatched certificate, a refused client certificate or proxy login)."""
        from picows import WSHandshakeError, WSMsgType, ws_connect

        s = self.settings
        ssl_ctx = self._ssl_context() if s.ws_url.startswith("wss:") else None
        proxy, proxy_ssl = self._proxy()
        timeout = max(5.0, s.heartbeat_interval)
        deadline = self._deadline()
        if deadline is not None:
            timeout = max(0.1, min(timeout, deadline - time.monotonic()))
        try:
            # The bound covers the TCP connect and the proxy too, not only the upgrade.
            transport, _ = await asyncio.wait_for(ws_connect(
                lambda: self.listener, s.ws_url, ssl_context=ssl_ctx,
                extra_headers={"X-ZUMO-AUTH": token.value}, enable_auto_pong=True,
                max_frame_size=_MAX_FRAME, read_buffer_init_size=_READ_BUFFER,
                websocket_handshake_timeout=timeout, proxy=proxy,
                proxy_ssl_context=proxy_ssl, logger_name=_PICOWS_LOGGER), timeout + 1.0)
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
            return None
        except Exception as exc:  # refused, DNS, timeout, TLS, proxy: sorted out below
            self._counts["connect_errors"] += 1
            where = f"{self._host_port()}"
            fatal = tls_failure(exc, where, ca_file=s.ca_file, client_cert=s.client_cert)
            if fatal is not None:
                raise FatalNetworkError(fatal) from None
            self.last_error = _describe(exc, self._host_port().rsplit(":", 1)[0])
            if proxy is not None:
                if (refused := proxy_auth_failure(exc, proxy)) is not None:
                    raise FatalNetworkError(refused) from None
                if "407" in self.last_error:
                    raise FatalNetworkError(
                        f"proxy {redact_url(proxy)} refused the connection with 407 (proxy "
                        f"authentication required): put user:password@ in --proxy") from None
                self.last_error += f" (through proxy {redact_url(proxy)})"
            return None

        if transport.response is None:
            # Closed before the upgrade's answer: picows returns without an error. Over TLS
            # that is how a server refusing our client certificate looks (TLS 1.3 sends the
            # alert after the handshake): ask the server once more, directly, to learn why.
            self._counts["connect_errors"] += 1
            self.last_error = "connection closed during the WebSocket handshake"
            if ssl_ctx is not None and proxy is None:
                await self._diagnose_tls(self._host_port())
            return None

        self._counts["connects"] += 1
        self._tls_eofs = 0
        opened = time.monotonic()
        log.info("connected to %s%s (token %s)", s.ws_url,
                 f" through proxy {redact_url(proxy)}" if proxy else "", token.fingerprint)
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
    except (AuthError, ConfigError, FatalNetworkError) as exc:
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


def _describe(exc: BaseException, host: str = "") -> str:
    """One line for a failed connection attempt: the innermost reason, not a repr chain."""
    import socket

    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)) and not str(exc):
        return "timed out"
    gai = exc if isinstance(exc, socket.gaierror) else exc.__cause__
    if isinstance(gai, socket.gaierror):
        return f"DNS: {host or 'the host'} does not resolve ({gai.strerror})"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]


# How a login request over TLS ends when the server hangs up without an answer.
_CLOSED_UNANSWERED = ("RemoteDisconnected", "Connection aborted", "EOF occurred in violation",
                      "UNEXPECTED_EOF", "Connection reset")


def _host_port(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    secure = parts.scheme in ("https", "wss")
    return f"{parts.hostname}:{parts.port or (443 if secure else 80)}"


def _probe_tls(where: str, ctx: Any, settings: Settings, timeout: float = 3.0) -> str | None:
    """Connect to ``where`` (``host:port``) with ``ctx`` and read: the TLS alert a server
    sends after the handshake (a client certificate it refuses) surfaces here as an error
    :func:`~fastfeed.tls.tls_failure` can name. ``"eof"`` when the server closed without a
    word; None when it answered or nothing permanent shows."""
    import socket
    import ssl

    host, _, port = where.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as raw, \
                ctx.wrap_socket(raw, server_hostname=host.strip("[]")) as tls:
            tls.sendall(b"GET /ws HTTP/1.1\r\nHost: " + host.encode() + b"\r\n\r\n")
            if not tls.recv(1):
                return "eof"
    except (OSError, ssl.SSLError) as exc:
        fatal = tls_failure(exc, where, ca_file=settings.ca_file, client_cert=settings.client_cert)
        if fatal is None and isinstance(exc, (ssl.SSLEOFError, ConnectionResetError)):
            return "eof"  # cut in the handshake itself: the same refusal, seen earlier
        return fatal
    return None
