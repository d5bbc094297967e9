"""NATS: ``nats://[user:password@|token@]HOST:PORT?subject=feed.>&queue=q`` (``tls://`` for TLS).

Core NATS (no ``stream=``): subscribes to ``subject=`` (wildcards ``*`` and ``>`` allowed;
repeat it or give a comma-separated list), in queue group ``queue=`` when given, so that the
instances of one group share the messages (each message to one of them). At-most-once:
what arrives while disconnected is lost; a connection the server closes because this process
fell behind ("Slow Consumer") is counted as ``evicted``. ``heartbeat=`` (seconds, default 5):
a ``PING``, and the connection is dead after three unanswered ones.

The core subscriber over plain TCP speaks the NATS text protocol itself (``INFO``,
``CONNECT``, ``SUB``, ``MSG``/``HMSG``, ``PING``/``PONG``): one socket read is parsed in one
pass, stamped with one receive time and written to the rings in one batch, with no Python
object per message beyond its payload. nats-py's per-message path (a ``Msg`` object and a
callback each) measured as slow as the rest of the pipeline together. Over TLS (``tls://``)
and for JetStream the source uses nats-py.

JetStream (``stream=S``): a durable pull consumer ``durable=`` (default ``fastfeed``) on stream
``S`` (created over ``subject=`` if missing), at-least-once: a message is acknowledged after
its frame is committed to a ring, handed back (``nak``) when a ring refused it, and counted
as a ``duplicate`` when its stream sequence was already committed. Instances that use the
same durable share its messages. ``batch=`` messages per pull (default 1000),
``ack_wait=`` seconds before an unacknowledged message is redelivered (default 30).

Under the rings' "pause" policy a full ring stops the source (see
:class:`~fastfeed.sources.base.RingWriter`): the core subscriber stops reading its socket (the
server buffers for it, and drops it as a slow consumer past its limits: ``evicted``); over
nats-py (TLS) the subscription stops taking messages (nats-py buffers them, up to
``pending_msgs=``, then drops and counts ``slow_consumer``); JetStream pulls nothing more and
acknowledges the batch once it is all written (telling the server it is in progress every
``ack_wait/2`` meanwhile). The heartbeat does not count the time paused against the server.
``broker_restarts`` counts reconnections to a server with a different ``server_id`` (a new
one at every start of ``nats-server``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from .._decoder import now_us
from .base import FatalSourceError, Source, tls_context
from .url import SourceURL, SourceURLError

__all__ = ["NatsSource", "connect_nats", "ensure_stream"]

log = logging.getLogger("fastfeed.sources.nats")


def _import_nats() -> Any:
    try:
        import nats
    except ImportError:
        raise FatalSourceError("the NATS source needs nats-py: pip install 'fastfeed[nats]'") \
            from None
    return nats


async def connect_nats(u: SourceURL, *, allow_reconnect: bool = False, **options: Any) -> Any:
    """A connected ``nats.aio.client.Client`` for the URL's server and credentials.

    Reconnection is left to the caller (:class:`~fastfeed.sources.base.Source` counts and
    backs off); the client's own reconnect loop would hide disconnects from the counters.
    """
    nats = _import_nats()
    kwargs: dict[str, Any] = dict(options)
    if u.username is not None and u.password is not None:
        kwargs.update(user=u.username, password=u.password)
    elif u.username is not None:
        kwargs["token"] = u.username
    if u.scheme == "tls":
        kwargs["tls"] = tls_context(u)
        kwargs["tls_hostname"] = u.host
    try:
        # nats-py's first connect retries a refused server forever unless its attempts are
        # capped (0 means no cap): cap them, so the failure reaches the source's own counted
        # back-off.
        return await asyncio.wait_for(
            nats.connect(f"nats://{u.host}:{u.port or 4222}", name=u.str("name", "fastfeed"),
                         connect_timeout=5, allow_reconnect=allow_reconnect,
                         max_reconnect_attempts=1, reconnect_time_wait=0.1, **kwargs), 10.0)
    except Exception as exc:
        text = str(exc).lower()
        if "authorization" in text or "authentication" in text:
            raise FatalSourceError.credentials("NATS", u, str(exc)) from None
        raise


async def ensure_stream(js: Any, name: str, u: SourceURL) -> None:
    """Create JetStream stream ``name`` over the URL's subjects if it does not exist."""
    from nats.js.errors import NotFoundError
    try:
        await js.stream_info(name)
    except NotFoundError:
        subjects = [s.replace("{shard}", "*").replace("{symbol}", "*")
                    for s in u.list("subject")]
        await js.add_stream(name=name, subjects=subjects)
        log.info("created JetStream stream %s over %s", name, ", ".join(subjects))


class NatsSource(Source):
    """Core NATS subscriber or JetStream durable pull consumer; see the module docstring."""

    schemes = ("nats", "tls")
    params = ("subject", "queue", "stream", "durable", "batch", "ack_wait", "pending_msgs",
              "heartbeat")

    def __init__(self, url: SourceURL, rings: Any) -> None:
        super().__init__(url, rings)
        self.subjects = url.list("subject")
        self.queue = url.str("queue") or ""
        self.stream = url.str("stream")
        self.durable = url.str("durable") or "fastfeed"
        self.batch = url.int("batch", 1000)
        self.ack_wait = url.float("ack_wait", 30.0)
        self.pending_msgs = url.int("pending_msgs", 1 << 20)
        self.heartbeat = url.float("heartbeat", 5.0)
        self._proto: _CoreProtocol | None = None
        self.at_least_once = self.stream is not None
        self._nc: Any = None
        self._closed: asyncio.Future[None] | None = None
        self._server_id: str | None = None

    @classmethod
    def validate(cls, url: SourceURL) -> None:
        if not url.list("subject"):
            raise SourceURLError(f"nats:// needs subject= ({url.redacted})")
        if url.str("stream") and url.str("queue"):
            raise SourceURLError("give queue= (core NATS) or stream= (JetStream), not both: "
                                 "JetStream instances share a durable= instead")
        if url.int("batch", 1000) < 1:
            raise SourceURLError("batch= must be positive")

    async def consume(self) -> None:
        if self.stream is None and self.url.scheme == "nats":
            await self._core_raw()
            return
        _import_nats()
        loop = asyncio.get_running_loop()
        closed: asyncio.Future[None] = loop.create_future()
        self._closed = closed

        async def on_closed() -> None:
            if not closed.done():
                closed.set_result(None)

        async def on_error(exc: Exception) -> None:
            from nats.errors import SlowConsumerError
            if isinstance(exc, SlowConsumerError):
                self.counts["slow_consumer"] += 1
            else:
                log.debug("NATS error: %s", self.url.scrub(str(exc)))

        self._nc = nc = await connect_nats(self.url, closed_cb=on_closed,
                                           disconnected_cb=on_closed, error_cb=on_error)
        self._check_server(getattr(nc, "_server_info", None) or {})
        if self.stream is None:
            await self._core(nc, closed)
        else:
            await self._jetstream(nc, closed)

    def _check_server(self, info: dict[str, Any]) -> None:
        """Count a restart: the server's ``server_id`` is new at every start."""
        server_id = info.get("server_id")
        if not server_id:
            return
        if self._server_id is not None and server_id != self._server_id:
            self.counts["broker_restarts"] += 1
            log.warning("NATS server restarted (new server_id)")
        self._server_id = server_id

    async def _core(self, nc: Any, closed: asyncio.Future[None]) -> None:
        out = self.out
        write = out.write

        async def on_msg(msg: Any) -> None:
            write(msg.data, now_us())
            if out.backlog:
                # A ring is full ("pause"): take no more messages until it is written
                # (nats-py holds them, up to its pending limits).
                await out.written(out.kept)

        for subject in self.subjects:
            await nc.subscribe(subject, queue=self.queue, cb=on_msg,
                               pending_msgs_limit=self.pending_msgs,
                               pending_bytes_limit=max(64 << 20, self.pending_msgs * 512))
        # The subscription is in place once the server answered a PING sent after it.
        await nc.flush(timeout=10)
        self.connected()
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({closed, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not self.stopping:
            raise ConnectionError("NATS connection closed")

    async def _jetstream(self, nc: Any, closed: asyncio.Future[None]) -> None:
        from nats.errors import TimeoutError as NatsTimeout
        from nats.js.api import AckPolicy, ConsumerConfig

        assert self.stream is not None
        js = nc.jetstream()
        await ensure_stream(js, self.stream, self.url)
        filter_subject = self.subjects[0] if len(self.subjects) == 1 else None
        config = ConsumerConfig(durable_name=self.durable, ack_policy=AckPolicy.EXPLICIT,
                                ack_wait=self.ack_wait, max_ack_pending=max(4 * self.batch,
                                                                            20000),
                                filter_subject=filter_subject)
        psub = await js.pull_subscribe(filter_subject or "", durable=self.durable,
                                       stream=self.stream, config=config)
        self.connected()
        out = self.out
        write = out.write
        seen = self.seen
        counts = self.counts
        while not self.stopping:
            if closed.done():
                raise ConnectionError("NATS connection closed")
            try:
                msgs = await psub.fetch(self.batch, timeout=0.5)
            except (TimeoutError, NatsTimeout):
                continue
            ts = now_us()
            done: list[Any] = []     # to acknowledge once everything before is written
            for msg in msgs:
                md = msg.metadata
                seq = md.sequence.stream
                if md.num_delivered > 1:
                    counts["redelivered"] += 1
                if seq in seen:
                    counts["messages"] += 1
                    counts["duplicates"] += 1
                    done.append(msg)
                elif write(msg.data, ts, seq):  # seq goes to seen once in a ring
                    done.append(msg)
                else:
                    # A ring dropped it: redeliver soon, after the workers caught up.
                    await msg.nak(delay=0.05)
                    counts["nacked"] += 1
            if out.backlog:
                # "pause": part of the batch waits for room; pull nothing, acknowledge nothing
                # until it is written.
                await self._hold(done)
            for msg in done:
                await msg.ack()
            counts["acked"] += len(done)

    async def _hold(self, msgs: list[Any]) -> None:
        """Wait for the backlog to be written, telling the server every ``ack_wait/2`` that
        the batch is in progress (so that it does not redeliver it meanwhile)."""
        while self.out.backlog:
            try:
                await asyncio.wait_for(self.out.drain(), max(0.5, self.ack_wait / 2))
            except TimeoutError:
                for msg in msgs:
                    await msg.in_progress()

    async def _core_raw(self) -> None:
        u = self.url
        loop = asyncio.get_running_loop()
        _, proto = await asyncio.wait_for(loop.create_connection(
            lambda: _CoreProtocol(self), u.host, u.port or 4222), 10.0)
        self._proto = proto
        info = await asyncio.wait_for(asyncio.shield(proto.info), 10.0)
        if info.get("tls_required"):
            raise FatalSourceError("this NATS server requires TLS: use tls://")
        self._check_server(info)
        connect: dict[str, Any] = {
            "verbose": False, "pedantic": False, "tls_required": False,
            "name": u.str("name", "fastfeed"), "lang": "python-fastfeed", "version": "1",
            "protocol": 1, "headers": True, "no_responders": True}
        if u.username is not None and u.password is not None:
            connect.update(user=u.username, **{"pass": u.password})
        elif u.username is not None:
            connect["auth_token"] = u.username
        out = [b"CONNECT " + json.dumps(connect).encode() + b"\r\n"]
        for sid, subject in enumerate(self.subjects, 1):
            q = f" {self.queue}" if self.queue else ""
            out.append(f"SUB {subject}{q} {sid}\r\n".encode())
        out.append(b"PING\r\n")
        proto.send(b"".join(out))
        # The server answers the PING after it processed CONNECT and SUB: subscribed.
        try:
            await asyncio.wait_for(asyncio.shield(proto.ready), 10.0)
        except ConnectionError as exc:
            if "authorization" in str(exc).lower() or "authentication" in str(exc).lower():
                raise FatalSourceError.credentials("NATS", u, str(exc)) from None
            raise
        self.connected()
        assert proto.transport is not None
        # Backpressure from here on pauses this socket (at once if frames still wait).
        self.out.attach(proto.transport.pause_reading, proto.transport.resume_reading)
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            while not self.stopping:
                await asyncio.wait({proto.lost, stop}, timeout=self.heartbeat,
                                   return_when=asyncio.FIRST_COMPLETED)
                if self.stopping:
                    return
                if proto.lost.done():
                    if proto.error and "slow consumer" in proto.error.lower():
                        self.counts["evicted"] += 1
                    raise ConnectionError(f"NATS connection closed ({proto.error or 'EOF'})")
                if self.out.paused:
                    continue  # we stopped reading ourselves: the PONG may sit unread
                # The time paused is ours, not the server's: count from the resume too.
                if time.monotonic() - max(proto.last_pong, self.out.resumed_at) \
                        > 3 * self.heartbeat:
                    self.counts["heartbeat_timeouts"] += 1
                    raise ConnectionError(f"no PONG for {3 * self.heartbeat:.0f}s")
                proto.send(b"PING\r\n")
        finally:
            stop.cancel()

    async def close(self) -> None:
        proto, self._proto = self._proto, None
        if proto is not None and proto.transport is not None:
            proto.transport.close()
            await asyncio.wait({proto.lost}, timeout=2.0)
        nc, self._nc = self._nc, None
        if nc is not None:
            with contextlib.suppress(Exception):
                # flush() first so that the last batch's acknowledgements leave.
                if nc.is_connected:
                    await nc.flush(timeout=2)
            with contextlib.suppress(Exception):
                await nc.close()


class _CoreProtocol(asyncio.Protocol):
    """The core NATS subscriber connection: parses the server's side of the text protocol."""

    def __init__(self, source: NatsSource) -> None:
        loop = asyncio.get_running_loop()
        self.source = source
        self.transport: asyncio.Transport | None = None
        self.info: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.ready: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[Exception | None] = loop.create_future()
        self.buf = b""
        self.need = -1   # payload (+ headers) bytes the current MSG/HMSG still needs, or -1
        self.skip = 0    # header bytes at the start of that payload (HMSG)
        self.last_pong = time.monotonic()
        self.error: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)
        for f in (self.info, self.ready):
            if not f.done():
                f.set_exception(ConnectionError(self.error or "NATS connection closed"))

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        ts = now_us()
        buf = self.buf + data if self.buf else data
        if self.need < 0:
            payloads = self._only_messages(buf)
            if payloads is not None:
                if payloads:
                    self.source.out.write_batch(payloads, ts)
            else:
                self._parse(buf, ts)
        else:
            self._parse(buf, ts)
        # Any data shows the connection alive, and writing may have waited on a full ring
        # ("block" policy) while a PONG sat unread behind the messages.
        self.last_pong = time.monotonic()

    def _only_messages(self, buf: bytes) -> list[bytes] | None:
        """The fast path: a read made only of ``MSG`` lines, each followed by its payload,
        is split in one C call and checked (every header says MSG, every payload has the
        size its header gives) with two comprehensions. None when the read holds anything
        else (PING, INFO, HMSG, a payload with a CRLF inside): :meth:`_parse` takes it."""
        parts = buf.split(b"\r\n")
        k = (len(parts) - 1) // 2  # complete header/payload pairs (the last part is the rest)
        heads = parts[0:2 * k:2]
        payloads = parts[1:2 * k:2]
        sizes = [int(h[h.rfind(b" ") + 1:]) if h[:4] == b"MSG " else -1 for h in heads]
        if sizes != [len(p) for p in payloads]:
            return None
        if 2 * k == len(parts) - 1:
            self.buf = parts[-1]
        else:
            # A header whose payload has not arrived (in full) yet: keep both for the next read.
            head = parts[-2]
            if head[:4] != b"MSG ":
                return None
            self.buf = head + b"\r\n" + parts[-1]
        return payloads

    def _parse(self, buf: bytes, ts: int) -> None:
        """The general parser: any mix of protocol lines and payloads, split anywhere."""
        n = len(buf)
        pos = 0
        payloads: list[bytes] = []
        need, skip = self.need, self.skip
        while pos < n:
            if need >= 0:
                end = pos + need
                if end + 2 > n:
                    break
                payloads.append(buf[pos + skip:end])
                pos = end + 2
                need = -1
                continue
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            op = buf[pos:pos + 3]
            if op == b"MSG":
                # MSG <subject> <sid> [reply-to] <#bytes>
                need = int(buf[buf.rfind(b" ", pos, eol) + 1:eol])
                skip = 0
            elif op == b"HMS":
                # HMSG <subject> <sid> [reply-to] <#header bytes> <#total bytes>
                parts = buf[pos:eol].split(b" ")
                need, skip = int(parts[-1]), int(parts[-2])
            else:
                self._control(buf[pos:eol])
            pos = eol + 2
        self.need, self.skip = need, skip
        self.buf = buf[pos:] if pos < n else b""
        if payloads:
            self.source.out.write_batch(payloads, ts)

    def _control(self, line: bytes) -> None:
        if line == b"PING":
            self.send(b"PONG\r\n")
        elif line == b"PONG":
            self.last_pong = time.monotonic()
            if not self.ready.done():
                self.ready.set_result(None)
        elif line.startswith(b"INFO "):
            if not self.info.done():
                self.info.set_result(json.loads(line[5:]))
        elif line.startswith(b"-ERR"):
            self.error = line[5:].decode("utf-8", "replace").strip(" '")
            log.warning("NATS server error: %s", self.error)
            if not self.ready.done():
                self.ready.set_exception(ConnectionError(self.error))
        # +OK (verbose mode only) needs nothing.
