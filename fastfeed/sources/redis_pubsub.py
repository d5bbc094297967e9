"""Redis Pub/Sub: ``redis://[user:password@]HOST:PORT[/DB]?channel=A&pattern=feed.*&schannel=S``.

``channel=`` subscribes (``SUBSCRIBE``), ``pattern=`` pattern-subscribes (``PSUBSCRIBE``),
``schannel=`` subscribes to Redis 7 sharded channels (``SSUBSCRIBE``); each may repeat or hold
a comma-separated list, and they combine. ``rediss://`` is the same over TLS.
``heartbeat=`` (seconds, default 5): a ``PING`` on the subscribed connection, which is dead
when no answer came for three of them.

At-most-once by nature: what is published while this subscriber is disconnected is never seen.
What can be detected is counted: ``disconnects``, ``evicted`` (the server closed the connection
but kept running, under the same ``run_id``: most often the output-buffer limit of a slow
subscriber, ``client-output-buffer-limit pubsub``), ``broker_restarts`` (a different
``run_id`` after the reconnect) and ``heartbeat_timeouts``.

Under the rings' "pause" policy a full ring stops the reading of the socket (the frames of the
current read wait in order, see :class:`~fastfeed.sources.base.RingWriter`) until the workers
made room: Redis buffers what is published meanwhile, up to its
``client-output-buffer-limit pubsub``, past which it drops this subscriber (``evicted``). The
heartbeat does not count the time paused against the server.

The subscribed connection is a plain asyncio protocol over the ``hiredis`` reply parser (the C
parser ``redis`` itself uses): a socket read is parsed in one pass, stamped with one receive
time, and each message's payload goes to its ring without further Python objects per message
than the parser's reply list. Pub/Sub needs nothing else from a client: after the handshake a
subscribed connection only receives.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from .._decoder import now_us
from .base import FatalSourceError, Source, tls_context
from .resp import resp_command
from .url import SourceURLError

__all__ = ["RedisPubSubSource"]

log = logging.getLogger("fastfeed.sources.redis")

_AUTH_ERRORS = (b"WRONGPASS", b"NOAUTH", b"NOPERM", b"ERR AUTH", b"ERR invalid password")


class _Subscriber(asyncio.Protocol):
    """The subscribed connection: parses replies with hiredis, hands messages to the writer."""

    def __init__(self, source: RedisPubSubSource, reader: Any) -> None:
        self.source = source
        self.reader = reader
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.subscribed = asyncio.get_running_loop().create_future()
        self.expected = 0
        self.confirmed = 0
        self.run_id: bytes | None = None
        self.last_reply = time.monotonic()
        self.error: bytes | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)
        if not self.subscribed.done():
            # keep why (a TLS alert: the server wants a client certificate) for the caller
            err = ConnectionError("connection closed during subscribe")
            err.__cause__ = exc
            self.subscribed.set_exception(err)

    def data_received(self, data: bytes) -> None:
        # One receive time per socket read, as the WebSocket listener stamps frames.
        ts = now_us()
        reader = self.reader
        reader.feed(data)
        payloads = []
        self.last_reply = time.monotonic()
        while (m := reader.gets()) is not False:
            if type(m) is list:
                kind = m[0]
                if kind == b"message" or kind == b"smessage":
                    payloads.append(m[2])
                    continue
                if kind == b"pmessage":
                    payloads.append(m[3])
                    continue
                if kind in (b"subscribe", b"psubscribe", b"ssubscribe"):
                    self.confirmed += 1
                    if self.confirmed >= self.expected and not self.subscribed.done():
                        self.subscribed.set_result(None)
                # b"pong" (PING in subscribed mode) needs nothing beyond last_reply.
                continue
            if isinstance(m, bytes) and m.startswith(b"# Server"):
                for line in m.split(b"\r\n"):
                    if line.startswith(b"run_id:"):
                        self.run_id = line[7:].strip()
                continue
            if isinstance(m, Exception):
                # An error reply (AUTH refused, SSUBSCRIBE unknown, ...): fail the connection.
                self.error = str(m).encode()
                if not self.subscribed.done():
                    self.subscribed.set_exception(ConnectionError(str(m)))
                if self.transport is not None:
                    self.transport.close()
                break
        if payloads:
            # At-most-once: nothing to hand back. Under "pause" what a ring refused waits
            # in the writer's backlog (reading paused); otherwise it is dropped and counted.
            self.source.out.write_batch(payloads, ts)
            # Writing may have waited on a full ring ("block" policy): the connection was
            # alive all along, and the heartbeat must not take the wait for silence.
            self.last_reply = time.monotonic()


class RedisPubSubSource(Source):
    """Redis Pub/Sub subscriber; see the module docstring."""

    schemes = ("redis", "rediss")
    params = ("channel", "pattern", "schannel", "heartbeat")

    def __init__(self, url: Any, rings: Any) -> None:
        super().__init__(url, rings)
        self.channels = url.list("channel")
        self.patterns = url.list("pattern")
        self.schannels = url.list("schannel")
        self.heartbeat = url.float("heartbeat", 5.0)
        self._proto: _Subscriber | None = None
        self._run_id: bytes | None = None

    @classmethod
    def validate(cls, url: Any) -> None:
        if not (url.list("channel") or url.list("pattern") or url.list("schannel")):
            raise SourceURLError("redis:// needs channel=, pattern= or schannel= "
                                 f"({url.redacted})")
        if url.float("heartbeat", 5.0) <= 0:
            raise SourceURLError("heartbeat= must be positive")

    async def consume(self) -> None:
        try:
            import hiredis
        except ImportError:
            raise FatalSourceError("the Redis sources need hiredis and redis: "
                                   "pip install 'fastfeed[redis]'") from None
        u = self.url
        loop = asyncio.get_running_loop()
        ctx = tls_context(u)
        _, proto = await asyncio.wait_for(loop.create_connection(
            lambda: _Subscriber(self, hiredis.Reader()), u.host, u.port or 6379, ssl=ctx), 10.0)
        self._proto = proto
        assert proto.transport is not None
        handshake = []
        if u.password is not None:
            handshake.append(resp_command("AUTH", *(
                [u.username] if u.username else []), u.password))
        handshake.append(resp_command("CLIENT", "SETNAME", u.str("name", "fastfeed") or "fastfeed"))
        handshake.append(resp_command("INFO", "server"))
        for cmd, names in (("SUBSCRIBE", self.channels), ("PSUBSCRIBE", self.patterns),
                           ("SSUBSCRIBE", self.schannels)):
            if names:
                handshake.append(resp_command(cmd, *names))
                proto.expected += len(names)
        proto.transport.write(b"".join(handshake))
        try:
            await asyncio.wait_for(asyncio.shield(proto.subscribed), 10.0)
        except ConnectionError:
            err = proto.error or b""
            if err.startswith(_AUTH_ERRORS):
                raise FatalSourceError.credentials("Redis", u, err.decode()) from None
            if err.startswith((b"ERR unknown command", b"ERR Unknown")):
                raise FatalSourceError(f"this Redis server cannot do it: {err.decode()[:200]}") \
                    from None
            raise
        if self._run_id is not None and proto.run_id is not None:
            if proto.run_id == self._run_id:
                # The server is the same process: it closed our connection on purpose.
                self.counts["evicted"] += 1
                log.warning("Redis closed the subscriber connection while it kept running: "
                            "messages published meanwhile are lost (a slow subscriber? see "
                            "client-output-buffer-limit pubsub)")
            else:
                self.counts["broker_restarts"] += 1
        if proto.run_id is not None:
            self._run_id = proto.run_id
        self.connected()
        # Backpressure from here on pauses this socket (at once if frames still wait).
        self.out.attach(proto.transport.pause_reading, proto.transport.resume_reading)
        await self._watch(proto)

    async def _watch(self, proto: _Subscriber) -> None:
        """Heartbeat until the connection is lost (raise) or the source stops (return)."""
        assert proto.transport is not None
        ping = resp_command("PING")
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            while not self.stopping:
                await asyncio.wait({proto.lost, stop}, timeout=self.heartbeat,
                                   return_when=asyncio.FIRST_COMPLETED)
                if self.stopping:
                    return
                if proto.lost.done():
                    raise ConnectionError(f"connection closed ({proto.lost.result() or 'EOF'})")
                if self.out.paused:
                    continue  # we stopped reading ourselves: the PONG may sit unread
                # The time paused is ours, not the server's: count from the resume too.
                if time.monotonic() - max(proto.last_reply, self.out.resumed_at) \
                        > 3 * self.heartbeat:
                    self.counts["heartbeat_timeouts"] += 1
                    raise ConnectionError(f"no answer to PING for {3 * self.heartbeat:.0f}s")
                proto.transport.write(ping)
        finally:
            stop.cancel()

    async def close(self) -> None:
        proto, self._proto = self._proto, None
        if proto is not None and proto.transport is not None:
            proto.transport.close()
            await asyncio.wait({proto.lost}, timeout=2.0)
