"""The feed simulator: the Azure AD token endpoint, the feed's token exchange and ``/ws``.

One asyncio protocol serves everything on one port. picows' server only accepts ``GET``
upgrade requests without a body, and the two login steps are ``POST`` s, so this module speaks
the little HTTP/1.1 it needs itself (one request per connection, ``Connection: close``) and does
the RFC 6455 upgrade and framing by hand. Framing by hand also lets it pre-encode whole runs of
frames and inject faults at the byte level (fragmentation, interleaved pings).

TLS (``fastfeed sim --tls-cert FILE --tls-key FILE``): the same three endpoints over
``https://`` and ``wss://``; ``--tls-client-ca FILE`` makes it require a client certificate
from that CA (mutual TLS). Without them it speaks plain HTTP, as before.

Speed at ``rate=0``: a pool of pre-encoded frames (:class:`~fastfeed.sim.market.Block`) is
cycled; each send is one ``transport.write`` of a memoryview slice holding thousands of frames,
so Python does a few microseconds of work per several thousand frames.

``stamp_send`` (``fastfeed sim --stamp-send``): every tick's ``t`` is the time its frame is
written to the socket (``time.time_ns() // 1000`` just before ``transport.write``), so a client
can measure wire-to-array latency. Live frames get the time directly; pool slices are sent as
stamped copies (:class:`~fastfeed.sim.market.TickStamper`). Only ticks are stamped: quote and
bar times are left as generated.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import logging
import signal
import sys
import time
import uuid
from collections.abc import Iterable
from typing import Any, TextIO
from urllib.parse import parse_qs

from .market import KINDS, Block, Market, TickStamper, _secs, ws_header
from .tokens import TokenSigner

__all__ = ["Faults", "SimConfig", "Simulator", "parse_faults", "run"]

log = logging.getLogger("fastfeed.sim")

_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# Above this paced rate, frames come from the pre-encoded pool (see _stream_pool).
_LIVE_PACED_MAX = 20000.0
# Frames per write at rate 0: ~4096 * 70 bytes = ~300 kB, large enough that the per-write
# Python overhead vanishes, small enough to interleave pongs promptly.
_CHUNK = 4096
# Pre-encoded frames cycled at rate 0 (about 2.5 MB: stays in cache, builds in ~0.4 s).
POOL_FRAMES = 32768
# Largest request head or client message accepted: the client only ever sends small texts.
_MAX_HTTP_HEAD = 64 * 1024
_MAX_CLIENT_MSG = 1 << 20
_DEFAULT_TOKEN_LIFETIME = 30 * 24 * 3600.0
_AAD_TOKEN_LIFETIME = 3599


@dataclasses.dataclass
class Faults:
    """Faults the simulator injects; see :func:`parse_faults` for the command-line names."""

    #: Close each connection (TCP close, no WebSocket close frame) after this many data frames.
    drop: int = 0
    #: Never answer the text ``ping``.
    no_pong: bool = False
    #: After this many data frames on a connection, go silent: no data, no pongs.
    stall: int | None = None
    #: Refuse this many ``/ws`` upgrades with 401 (``-1``: all of them).
    refuse_tokens: int = 0
    #: Share of data frames replaced by truncated JSON.
    malformed: float = 0.0
    #: Share of data frames that carry a JSON array of messages.
    arrays: float = 0.0
    #: Lifetime in seconds of the feed tokens issued (overrides ``token_lifetime``).
    short_tokens: float | None = None
    #: Answer this many token requests with 429 and ``Retry-After: 1``.
    throttle: int = 0
    #: Split every data message into frames of this many payload bytes.
    fragment: int = 0
    #: Send an RFC 6455 ping after every this many data frames.
    ping_every: int = 0
    #: Send a status object (a control message) after every this many data frames.
    status_every: int = 0
    #: Answer every token exchange with 403 (an app the feed host does not entitle).
    forbid: bool = False


_FAULT_HELP = {
    "drop=N": "close each connection after N data frames",
    "no-pong": "never answer the text ping",
    "stall[=N]": "go silent (no data, no pongs) after N data frames (default 0)",
    "refuse-tokens[=N]": "refuse the first N /ws upgrades with 401 (default: all)",
    "malformed=P": "replace a share P (0..1) of data frames by broken JSON",
    "arrays=P": "send a share P of data frames as JSON arrays of messages",
    "short-tokens=S": "issue feed tokens that expire after S seconds",
    "throttle=N": "answer the first N token requests with 429 Retry-After: 1",
    "fragment=N": "split every data message into frames of N payload bytes",
    "ping-every=N": "send an RFC 6455 ping after every N data frames",
    "status-every=N": "send a status object (control message) after every N data frames",
    "forbid": "answer every token exchange (/.auth/login/aad) with 403",
}


def parse_faults(specs: Iterable[str]) -> Faults:
    """Parse ``NAME[=VALUE]`` fault specs (``drop=1000``, ``no-pong``, ...) into :class:`Faults`."""
    faults = Faults()
    for spec in specs:
        name, _, value = spec.partition("=")
        key = name.strip().lower().replace("-", "_")
        try:
            if key == "no_pong":
                faults.no_pong = True
            elif key == "forbid":
                faults.forbid = True
            elif key == "stall":
                faults.stall = int(value) if value else 0
            elif key == "refuse_tokens":
                faults.refuse_tokens = int(value) if value else -1
            elif key in ("drop", "throttle", "fragment", "ping_every", "status_every"):
                setattr(faults, key, int(value))
            elif key in ("malformed", "arrays"):
                share = float(value)
                if not 0.0 <= share <= 1.0:
                    raise ValueError
                setattr(faults, key, share)
            elif key == "short_tokens":
                faults.short_tokens = float(value)
            else:
                known = ", ".join(_FAULT_HELP)
                raise ValueError(f"unknown fault {name!r} (known: {known})")
        except ValueError as exc:
            if exc.args:
                raise
            raise ValueError(f"bad value for fault {name!r}: {value!r}") from None
    if min(faults.drop, faults.throttle, faults.fragment, faults.ping_every,
           faults.status_every) < 0:
        raise ValueError("fault counts must not be negative")
    return faults


@dataclasses.dataclass
class SimConfig:
    """How the simulator listens, what market it makes and which credentials it accepts."""

    host: str = "127.0.0.1"
    port: int = 0
    #: Data frames per second per connection; 0 means as fast as the socket takes them.
    rate: float = 1000.0
    symbols: int = 100
    #: Stop sending data after this many frames in all (connections stay up); None: no limit.
    count: int | None = None
    seed: int = 0
    tenant: str = "fastfeed-sim"
    client_id: str = "fastfeed-sim"
    client_secret: str = dataclasses.field(default="fastfeed-sim-secret", repr=False)
    token_lifetime: float = _DEFAULT_TOKEN_LIFETIME
    mix: tuple[float, float, float] = (0.7, 0.25, 0.05)
    #: Timestamp (seconds since epoch) of the first frame at rate 0; None: now.
    start_time: float | None = None
    faults: Faults = dataclasses.field(default_factory=Faults)
    #: Every tick's "t" is the time its frame is written to the socket (for wire-to-array
    #: latency measurement); needs unfragmented frames.
    stamp_send: bool = False
    #: Paced rates: write every this many µs (0: every ~1 ms, the event loop's timer
    #: granularity, so each write is a burst of rate/1000 frames). A smaller interval sends
    #: smaller bursts, nearer a feed that writes each message as it is made, and costs the
    #: simulator more CPU (one wake-up per write).
    write_interval_us: int = 0
    #: Serve TLS (https:// and wss://) with this certificate chain and key (PEM files).
    tls_cert: str | None = None
    tls_key: str | None = None
    #: With TLS: require a client certificate issued by this CA (mutual TLS).
    tls_client_ca: str | None = None


def _precise_timers() -> None:
    """Sleep for what was asked: Linux adds up to 50 µs of timer slack to every sleep of a
    normal thread, as much as half of a short write interval."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(29, 1000, 0, 0, 0)  # PR_SET_TIMERSLACK, 1 µs
    except (OSError, AttributeError):
        pass  # not Linux: sleeps are a little longer, pacing a little burstier


def _aad_error(status: int, error: str, code: int, text: str) -> tuple[int, dict[str, Any]]:
    # The shape of a real Azure AD error answer.
    return status, {
        "error": error,
        "error_description": f"AADSTS{code}: {text}\r\nTrace ID: {uuid.uuid4()}\r\n"
                             f"Correlation ID: {uuid.uuid4()}\r\nTimestamp: "
                             f"{time.strftime('%Y-%m-%d %H:%M:%SZ', time.gmtime())}",
        "error_codes": [code],
        "timestamp": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()),
        "trace_id": str(uuid.uuid4()),
        "correlation_id": str(uuid.uuid4()),
    }


class Simulator:
    """The simulated provider. ``await start()``, then connect to :attr:`url`; ``await close()``."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self.precise_timers = False
        f = self.config.faults
        if self.config.stamp_send and f.fragment:
            raise ValueError("stamp_send needs unfragmented frames: it cannot be combined "
                             "with the fragment fault")
        self.market = Market(self.config.symbols, seed=self.config.seed, mix=self.config.mix,
                             malformed=f.malformed, arrays=f.arrays, fragment=f.fragment,
                             ping_every=f.ping_every, status_every=f.status_every)
        self.signer = TokenSigner()
        self.counters: dict[str, int] = dict.fromkeys(
            ("frames_sent", *KINDS, "bytes_sent", "data_writes", "connections", "open_connections",
             "upgrades_refused", "token_requests", "tokens_issued", "token_errors", "throttled",
             "exchanges", "exchange_errors", "emails", "protocol_errors", "pings", "pongs_sent",
             "rfc_pongs", "subscriptions", "control_messages", "drops", "stalls"), 0)
        self.last_email: str | None = None
        self.last_subscription: str | None = None
        self.cursor = 0
        self._pool: Block | None = None
        self._pool_offsets: list[int] = []
        self._stamper: TickStamper | None = None
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[_Conn] = set()
        self.host = self.config.host
        self.port = self.config.port

    @property
    def url(self) -> str:
        """``http://HOST:PORT`` (``https://`` with TLS) of the running simulator."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "https" if self.config.tls_cert else "http"
        return f"{scheme}://{host}:{self.port}"

    def pool(self) -> Block:
        """The pre-encoded frames cycled at rate 0 (built on first use)."""
        if self._pool is None:
            start = self.config.start_time if self.config.start_time is not None else time.time()
            pool = self.market.block(POOL_FRAMES, int(round(start * 1e6)), 1)
            if self.config.stamp_send:
                # Find (and check) every tick time once, here, not per write.
                self._stamper = TickStamper(pool.data)
            self._pool_offsets = pool.offsets.tolist()
            self._pool = pool
        return self._pool

    async def start(self) -> None:
        """Bind and listen (port 0 picks a free port; :attr:`port` holds the real one)."""
        if self.config.rate == 0 or (self.config.stamp_send
                                     and self.config.rate > _LIVE_PACED_MAX):
            # stamp_send: build (and check) the pool before listening, so that a pool whose
            # tick times cannot be stamped fails the start, not the first connection.
            self.pool()
        loop = asyncio.get_running_loop()
        ctx = None
        if self.config.tls_cert:
            from ..tls import server_context

            ctx = server_context(self.config.tls_cert, self.config.tls_key,
                                 self.config.tls_client_ca)
        elif self.config.tls_client_ca:
            raise ValueError("tls_client_ca needs tls_cert (client certificates are a TLS thing)")
        self._server = await loop.create_server(lambda: _Conn(self), self.config.host,
                                                self.config.port, ssl=ctx)
        sockname = self._server.sockets[0].getsockname()
        self.host, self.port = sockname[0], sockname[1]

    async def close(self) -> None:
        """Stop listening and close every connection (WebSocket close 1001, going away)."""
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            conn.shutdown()
        if self._server is not None:
            await self._server.wait_closed()
        await asyncio.sleep(0)

    def stats(self) -> dict[str, Any]:
        """Counters so far: frames and rows sent, connections, logins, pings, faults fired."""
        out: dict[str, Any] = dict(self.counters)
        out["last_email"] = self.last_email
        out["last_subscription"] = self.last_subscription
        return out

    # -- accounting ---------------------------------------------------------------------------

    def remaining(self) -> int | None:
        """Data frames still allowed by ``count`` (None: unlimited)."""
        if self.config.count is None:
            return None
        return max(0, self.config.count - self.counters["frames_sent"])

    def account(self, block: Block, i: int, j: int, nbytes: int) -> None:
        c = self.counters
        for kind, rows in zip(KINDS, block.rows(i, j), strict=True):
            c[kind] += rows
        c["frames_sent"] += j - i
        c["bytes_sent"] += nbytes
        c["data_writes"] += 1

    # -- HTTP endpoints -----------------------------------------------------------------------

    def token_endpoint(self, tenant: str, body: bytes) -> tuple[int, dict[str, Any], dict[str, str]]:
        """Step 1: Azure AD client credentials, with Azure AD's error answers."""
        c = self.counters
        cfg = self.config
        c["token_requests"] += 1
        if c["throttled"] < cfg.faults.throttle:
            c["throttled"] += 1
            status, data = _aad_error(429, "temporarily_unavailable", 50196,
                                      "The server is temporarily throttling requests.")
            return status, data, {"Retry-After": "1"}
        form = {k: v[-1] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
        err: tuple[int, dict[str, Any]] | None = None
        if tenant != cfg.tenant:
            err = _aad_error(400, "invalid_request", 90002,
                             f"Tenant '{tenant}' not found. Check to make sure you have the "
                             "correct tenant ID and are signing into the correct cloud.")
        elif form.get("grant_type") != "client_credentials":
            err = _aad_error(400, "unsupported_grant_type", 70003,
                             f"The app requested an unsupported grant type "
                             f"'{form.get('grant_type', '')}'.")
        elif form.get("client_id") != cfg.client_id:
            err = _aad_error(400, "unauthorized_client", 700016,
                             f"Application with identifier '{form.get('client_id', '')}' was "
                             f"not found in the directory '{tenant}'.")
        elif form.get("client_secret") != cfg.client_secret:
            err = _aad_error(401, "invalid_client", 7000215,
                             "Invalid client secret provided. Ensure the secret being sent in "
                             "the request is the client secret value, not the client secret ID, "
                             f"for a secret added to app '{cfg.client_id}'.")
        elif not form.get("scope"):
            err = _aad_error(400, "invalid_request", 90014,
                             "The required field 'scope' is missing from the credential.")
        elif not form["scope"].endswith("/.default"):
            err = _aad_error(400, "invalid_scope", 1002012,
                             f"The provided value for scope {form['scope']} is not valid. "
                             "Client credential flows must have a scope value with /.default "
                             "suffixed to the resource identifier (application ID URI).")
        if err is not None:
            c["token_errors"] += 1
            return err[0], err[1], {}
        now = int(time.time())
        token = self.signer.sign({"kind": "aad", "aud": form["scope"], "appid": cfg.client_id,
                                  "tid": tenant, "iat": now, "exp": now + _AAD_TOKEN_LIFETIME})
        c["tokens_issued"] += 1
        return 200, {"token_type": "Bearer", "expires_in": _AAD_TOKEN_LIFETIME,
                     "ext_expires_in": _AAD_TOKEN_LIFETIME, "access_token": token}, {}

    def exchange_endpoint(self, body: bytes) -> tuple[int, dict[str, Any]]:
        """Step 2: trade an Azure AD token for the feed's ``authenticationToken``."""
        c = self.counters
        try:
            data = json.loads(body)
            access = data["access_token"]
            if not isinstance(access, str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            c["exchange_errors"] += 1
            return 400, {"code": 400, "error": "body must be JSON {\"access_token\": \"...\"}"}
        claims, reason = self.signer.verify(access, "aad")
        if claims is None:
            c["exchange_errors"] += 1
            return 401, {"code": 401, "error": f"access token rejected: {reason}"}
        if self.config.faults.forbid:
            c["exchange_errors"] += 1
            return 403, {"code": 403, "error": "this application is not allowed to use the feed"}
        uid = "sid:" + hashlib.sha256(str(claims.get("appid")).encode()).hexdigest()[:32]
        lifetime = self.config.faults.short_tokens
        if lifetime is None:
            lifetime = self.config.token_lifetime
        now = time.time()
        token = self.signer.sign({"kind": "feed", "sub": uid, "iss": "fastfeed-sim",
                                  "iat": int(now), "exp": now + lifetime})
        c["exchanges"] += 1
        return 200, {"authenticationToken": token, "user": {"userId": uid}}

    def check_upgrade_token(self, token: str | None) -> str:
        """Why a ``/ws`` upgrade must be refused (``""``: accept)."""
        refuse = self.config.faults.refuse_tokens
        if refuse < 0 or self.counters["upgrades_refused"] < refuse:
            return "token refused (fault refuse-tokens)"
        if not token:
            return "missing X-ZUMO-AUTH"
        claims, reason = self.signer.verify(token, "feed")
        return "" if claims is not None else reason


class _Conn(asyncio.Protocol):
    """One client connection: an HTTP request, possibly upgraded to a WebSocket."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.ws = False
        self.closing = False
        self.paused = False
        self.resumed = asyncio.Event()
        self.resumed.set()
        self.sent = 0
        self.got_email = False
        self.stalled = False
        self.task: asyncio.Task[None] | None = None
        self.msg_op = 0
        self.msg = bytearray()
        # After a drop (our side closed for writing) the client's messages are still read and
        # counted (a subscription sent just before the drop), never answered.
        self.half_closed = False

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance check.
        self.transport = transport  # type: ignore[assignment]
        # Big buffer: at rate 0 the sender writes ~300 kB per call and should rarely pause.
        transport.set_write_buffer_limits(high=4 << 20)
        self.sim._conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.sim._conns.discard(self)
        if self.ws:
            self.sim.counters["open_connections"] -= 1
        if self.task is not None:
            self.task.cancel()
        self.resumed.set()

    def pause_writing(self) -> None:
        self.paused = True
        self.resumed.clear()

    def resume_writing(self) -> None:
        self.paused = False
        self.resumed.set()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.ws:
            self._ws_input()
        else:
            self._http_input()

    def shutdown(self) -> None:
        """Close politely: a close frame (1001) on a WebSocket, then the TCP connection."""
        if self.transport is None or self.closing:
            return
        if self.ws:
            self._send_close(1001, b"simulator shutting down")
        self.closing = True
        self.transport.close()

    # -- HTTP ---------------------------------------------------------------------------------

    def _respond(self, status: int, body: dict[str, Any] | None, headers: dict[str, str] | None = None) -> None:
        assert self.transport is not None
        reasons = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
                   404: "Not Found",
                   405: "Method Not Allowed", 429: "Too Many Requests",
                   431: "Request Header Fields Too Large"}
        payload = json.dumps(body).encode() if body is not None else b""
        head = [f"HTTP/1.1 {status} {reasons.get(status, 'Error')}",
                "Content-Type: application/json", f"Content-Length: {len(payload)}",
                "Connection: close"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.transport.write(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
        self.closing = True
        self.transport.close()

    def _http_input(self) -> None:
        if self.closing:
            return
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > _MAX_HTTP_HEAD:
                self._respond(431, {"error": "request head too large"})
            return
        lines = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
        try:
            method, target, _version = lines[0].split(" ", 2)
        except ValueError:
            self._respond(400, {"error": "bad request line"})
            return
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            self._respond(400, {"error": "bad Content-Length"})
            return
        if length > _MAX_HTTP_HEAD:
            self._respond(400, {"error": "body too large"})
            return
        if len(self.buf) < end + 4 + length:
            return
        body = bytes(self.buf[end + 4:end + 4 + length])
        del self.buf[:end + 4 + length]
        path = target.split("?", 1)[0]
        sim = self.sim
        parts = path.strip("/").split("/")
        if len(parts) == 4 and parts[1:] == ["oauth2", "v2.0", "token"]:
            if method != "POST":
                self._respond(405, {"error": "use POST"})
                return
            status, data, extra = sim.token_endpoint(parts[0], body)
            self._respond(status, data, extra)
        elif path == "/.auth/login/aad":
            if method != "POST":
                self._respond(405, {"error": "use POST"})
                return
            status, data = sim.exchange_endpoint(body)
            self._respond(status, data)
        elif path == "/ws" and method == "GET":
            self._upgrade(headers)
        elif path == "/stats" and method == "GET":
            self._respond(200, sim.stats())
        else:
            self._respond(404, {"error": f"no route for {method} {path}"})

    def _upgrade(self, headers: dict[str, str]) -> None:
        assert self.transport is not None
        key = headers.get("sec-websocket-key", "")
        if ("websocket" not in headers.get("upgrade", "").lower()
                or headers.get("sec-websocket-version") != "13" or not key):
            self._respond(400, {"error": "not a WebSocket upgrade request"})
            return
        reason = self.sim.check_upgrade_token(headers.get("x-zumo-auth"))
        if reason:
            self.sim.counters["upgrades_refused"] += 1
            self._respond(401, {"code": 401, "error": reason})
            return
        accept = base64.b64encode(hashlib.sha1(key.encode() + _WS_GUID).digest()).decode()
        self.transport.write(
            ("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             f"Sec-WebSocket-Accept: {accept}\r\n\r\n").encode())
        self.ws = True
        self.sim.counters["connections"] += 1
        self.sim.counters["open_connections"] += 1
        if self.buf:
            self._ws_input()

    # -- WebSocket ----------------------------------------------------------------------------

    def _send(self, opcode: int, payload: bytes) -> None:
        if self.transport is not None and not self.closing:
            self.transport.write(ws_header(opcode, len(payload)) + payload)

    def _send_close(self, code: int, reason: bytes) -> None:
        self._send(0x8, code.to_bytes(2, "big") + reason[:120])

    def _half_close(self) -> None:
        """End our side after what was written (FIN, no close frame), then wait for the peer.

        A full close() here could answer the client's next ping with a TCP reset, and a reset
        may discard frames still in flight: every frame counted as sent must arrive.
        """
        self.closing = True
        self.half_closed = True
        assert self.transport is not None
        if self.transport.can_write_eof():
            self.transport.write_eof()
            # The client normally closes at once on EOF; do not wait for it forever.
            asyncio.get_running_loop().call_later(5.0, self.transport.close)
        else:
            self.transport.close()

    def _fail(self, code: int, reason: str) -> None:
        self.half_closed = False
        self.sim.counters["protocol_errors"] += 1
        log.info("closing connection: %s", reason)
        self._send_close(code, reason.encode())
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def _ws_input(self) -> None:
        buf = self.buf
        while (not self.closing or self.half_closed) and len(buf) >= 2:
            b0, b1 = buf[0], buf[1]
            fin, opcode = b0 & 0x80, b0 & 0x0F
            length = b1 & 0x7F
            pos = 2
            if length == 126:
                if len(buf) < 4:
                    return
                length = int.from_bytes(buf[2:4], "big")
                pos = 4
            elif length == 127:
                if len(buf) < 10:
                    return
                length = int.from_bytes(buf[2:10], "big")
                pos = 10
            if not b1 & 0x80:
                self._fail(1002, "client frames must be masked")
                return
            if length > _MAX_CLIENT_MSG:
                self._fail(1009, "message too big")
                return
            if len(buf) < pos + 4 + length:
                return
            mask = bytes(buf[pos:pos + 4])
            raw = bytes(buf[pos + 4:pos + 4 + length])
            del buf[:pos + 4 + length]
            # XOR with the repeated mask as one big integer: no per-byte Python loop.
            reps = (mask * (length // 4 + 1))[:length]
            payload = (int.from_bytes(raw, "big") ^ int.from_bytes(reps, "big")).to_bytes(
                length, "big")
            self._ws_frame(bool(fin), opcode, payload)

    def _ws_frame(self, fin: bool, opcode: int, payload: bytes) -> None:
        c = self.sim.counters
        if opcode == 0x8:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1000
            self._send_close(code if code in (1000, 1001) else 1000, b"")
            # RFC 6455 7.1.1: after the closing handshake the server closes TCP first.
            self.closing = True
            if self.transport is not None:
                self.transport.close()
        elif opcode == 0x9:
            if not self.stalled:
                self._send(0xA, payload)
        elif opcode == 0xA:
            c["rfc_pongs"] += 1
        elif opcode in (0x1, 0x2):
            if fin:
                self._message(payload)
            else:
                self.msg_op, self.msg = opcode, bytearray(payload)
        elif opcode == 0x0:
            if not self.msg_op:
                self._fail(1002, "continuation frame without a message")
                return
            self.msg += payload
            if len(self.msg) > _MAX_CLIENT_MSG:
                self._fail(1009, "message too big")
            elif fin:
                self.msg_op = 0
                self._message(bytes(self.msg))
        else:
            self._fail(1002, f"unknown opcode {opcode}")

    def _message(self, payload: bytes) -> None:
        c = self.sim.counters
        if not self.got_email:
            try:
                data = json.loads(payload)
            except ValueError:
                data = None
            if not (isinstance(data, dict) and isinstance(data.get("email"), str)):
                self._fail(1008, 'expected {"email": ...} as the first message')
                return
            self.got_email = True
            c["emails"] += 1
            self.sim.last_email = data["email"]
            self.task = asyncio.get_running_loop().create_task(self._stream())
            return
        if payload == b"ping":
            c["pings"] += 1
            if not (self.sim.config.faults.no_pong or self.stalled):
                self._send(0x1, b"pong")
                c["pongs_sent"] += 1
            return
        c["control_messages"] += 1
        try:
            data = json.loads(payload)
        except ValueError:
            return
        if isinstance(data, dict) and "subscriptions" in data:
            c["subscriptions"] += 1
            self.sim.last_subscription = payload.decode("utf-8", "replace")

    # -- streaming ----------------------------------------------------------------------------

    def _limit(self, k: int) -> int:
        """Cut a planned run of ``k`` frames at the count, drop and stall limits."""
        sim = self.sim
        budget = sim.remaining()
        if budget is not None:
            k = min(k, budget)
        f = sim.config.faults
        if f.drop:
            k = min(k, f.drop - self.sent)
        if f.stall is not None:
            k = min(k, f.stall - self.sent)
        return max(k, 0)

    def _after_send(self) -> bool:
        """Fire the drop and stall faults; False when this connection must stop sending."""
        f = self.sim.config.faults
        if f.drop and self.sent >= f.drop:
            self.sim.counters["drops"] += 1
            self._half_close()
            return False
        if f.stall is not None and self.sent >= f.stall:
            if not self.stalled:
                self.stalled = True
                self.sim.counters["stalls"] += 1
            return False
        return True

    async def _stream(self) -> None:
        try:
            if not self._after_send():
                return
            rate = self.sim.config.rate
            if rate == 0 or rate > _LIVE_PACED_MAX:
                await self._stream_pool(rate)
            else:
                await self._stream_paced()
        except (ConnectionError, asyncio.CancelledError):
            pass

    async def _pace(self, default_s: float) -> None:
        """Wait before the next paced write: ``default_s`` on the event loop's timer, or
        ``write_interval_us`` with a precise blocking sleep (the loop's timers have 1 ms
        granularity). The blocking sleep is short and the loop runs between writes, so
        pings and new connections are still served."""
        us = self.sim.config.write_interval_us
        if us > 0:
            if not self.sim.precise_timers:
                _precise_timers()
                self.sim.precise_timers = True
            time.sleep(us / 1e6)
            await asyncio.sleep(0)
        else:
            await asyncio.sleep(default_s)

    async def _stream_pool(self, rate: float = 0.0) -> None:
        """Send slices of the pre-encoded pool: as fast as possible (rate 0), or paced.

        Pacing from the pool instead of generating frames live matters above some tens of
        thousands a second, where live generation (a few µs a frame in Python) would eat
        the core the client under test needs; the timestamps are then the pool's, not the
        send time, unless ``stamp_send``.

        With ``stamp_send`` each slice is sent as a stamped copy
        (:meth:`TickStamper.stamped`), not a view of the pool: a transport keeps a reference
        to what it could not send yet (uvloop holds the memoryview, no copy, and at rate 0
        the 4 MB high-water mark exceeds the 2.5 MB pool), so stamping the shared pool in place
        could rewrite, or tear, times still queued. The copy costs about as much as the
        stamping itself (a few tens of µs per 4096-frame write)."""
        sim = self.sim
        pool = sim.pool()
        offsets = sim._pool_offsets
        stamper = sim._stamper
        view = memoryview(pool.data)
        n = len(pool)
        # time.monotonic, not loop.time(): uvloop's clock moves in whole milliseconds,
        # which would turn any pacing into 1 ms bursts.
        clock = time.monotonic
        started = clock()
        sent_here = 0
        while not self.closing:
            if self.paused:
                await self.resumed.wait()
                continue
            want = _CHUNK
            if rate > 0:
                want = min(want, int((clock() - started) * rate) - sent_here)
                if want <= 0:
                    await self._pace(0.0005)
                    continue
            i = sim.cursor % n
            k = self._limit(min(want, n - i))
            if k == 0:
                return  # count reached: stay connected, answer pings, send no more data
            a, b = offsets[i], offsets[i + k]
            assert self.transport is not None
            if stamper is None:
                self.transport.write(view[a:b])
            else:
                self.transport.write(stamper.stamped(a, b, time.time_ns() // 1000))
            sim.cursor += k
            sim.account(pool, i, i + k, b - a)
            self.sent += k
            sent_here += k
            if not self._after_send():
                return
            await asyncio.sleep(0)

    async def _stream_paced(self) -> None:
        sim = self.sim
        rate = sim.config.rate
        # time.monotonic, not loop.time(): uvloop's clock moves in whole milliseconds,
        # which would turn any pacing into 1 ms bursts.
        clock = time.monotonic
        # Wake often enough for smooth pacing, rarely enough to stay cheap at low rates.
        tick = min(0.05, max(0.001, 16.0 / rate))
        step_us = max(1, int(1e6 / rate))
        stamp_send = sim.config.stamp_send
        started = clock()
        sent_here = 0
        while not self.closing:
            if self.paused:
                await self.resumed.wait()
                continue
            due = int((clock() - started) * rate) - sent_here
            if due <= 0:
                await self._pace(tick)
                continue
            k = self._limit(min(due, _CHUNK))
            if k == 0:
                return
            now_us = time.time_ns() // 1000
            if stamp_send:
                # All ticks at one time, then restamped with the time of the write itself:
                # generating the block takes several µs a frame. Same length, same bytes
                # otherwise; bar times (followed by "o") and quotes' "lt" are not touched.
                block = sim.market.block(k, now_us, 0)
                data = block.data.replace(
                    b'"t":%s,"p":' % _secs(now_us).encode(),
                    b'"t":%s,"p":' % _secs(time.time_ns() // 1000).encode())
            else:
                block = sim.market.block(k, now_us - (k - 1) * step_us, step_us)
                data = block.data
            assert self.transport is not None
            self.transport.write(data)
            sim.cursor += k
            sim.account(block, 0, k, len(block.data))
            self.sent += k
            sent_here += k
            if not self._after_send():
                return
            await asyncio.sleep(0)


async def run(
    config: SimConfig,
    *,
    duration: float | None = None,
    out: TextIO = sys.stdout,
    json_stats: bool = False,
) -> dict[str, Any]:
    """Run a simulator until ``duration`` passes or SIGINT/SIGTERM arrives; return its stats.

    Prints ``listening on http://HOST:PORT`` (``https://`` with TLS) first (flushed: scripts wait for it) and, with
    ``json_stats``, one JSON object of counters when it stops.
    """
    sim = Simulator(config)
    await sim.start()
    print(f"listening on {sim.url}", file=out, flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    if duration is not None:
        loop.call_later(duration, stop.set)
    try:
        await stop.wait()
    finally:
        await sim.close()
    stats = sim.stats()
    if json_stats:
        print(json.dumps(stats), file=out, flush=True)
    else:
        print(f"sent {stats['frames_sent']} frames ({stats['ticks']} ticks, {stats['quotes']} "
              f"quotes, {stats['bars']} bars, {stats['malformed']} malformed) over "
              f"{stats['connections']} connections", file=sys.stderr, flush=True)
    return stats
