"""RabbitMQ (AMQP 0-9-1): ``amqp://USER:PASS@HOST:PORT/VHOST?queue=q&exchange=x``.

The source declares a durable ``queue=`` (required) and, with ``exchange=``, a durable
exchange of ``exchange_type=`` (default ``fanout``) bound to it with ``routing_key=``
(default ``#``, which matches everything on a topic exchange and is ignored by a fanout one).
Without ``exchange=`` the queue is fed directly (the default exchange). ``amqps://`` is TLS.

At-least-once with manual acknowledgements: at most ``prefetch=`` (default 1000) messages are
in flight; a message is acknowledged once its frame is committed to a ring (acknowledgements
are batched with ``multiple``: at most a quarter of the prefetch window, or 20 ms, late), a
message a ring refused is handed back (``nack`` with requeue), and a message whose
``message_id`` was already committed is counted as a ``duplicate`` and acknowledged. Several
instances consuming one queue are competing consumers: each message goes to one of them.

Under the rings' "pause" policy a message a ring has no room for waits, with every one after
it, in order (see :class:`~fastfeed.sources.base.RingWriter`); no acknowledgement leaves until
they are written, so the broker stops delivering at ``prefetch=`` unacknowledged messages:
the backlog is bounded by the prefetch window, and nothing is handed back.

Broker restarts: AMQP tells a client nothing that changes when the broker restarts (the
server properties hold the product and version only). The source declares a small transient
queue of its own (``fastfeed.sentinel.HOST.PID.RANDOM``, not durable, consumed by this source
so that it never idles, ``x-expires`` 5 minutes so that it disappears after the source does):
a broker that restarted (or whose application was stopped, ``rabbitmqctl stop_app``) has
lost it, which is counted in ``broker_restarts``. After a disconnection longer than its
expiry the loss proves nothing and is not counted. A server that refuses the queue (no
configure permission on that name, RabbitMQ 4 with transient non-exclusive queues
disabled) leaves restarts undetected: they count as reconnects only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from typing import Any

from .._decoder import now_us
from .base import FatalSourceError, Source, tls_context
from .url import SourceURL, SourceURLError

__all__ = ["RabbitMQSource", "connect_amqp", "declare"]

log = logging.getLogger("fastfeed.sources.rabbitmq")

# The restart sentinel's idle expiry (ms): it outlives any reconnect back-off, and disappears
# this long after the source is gone.
_SENTINEL_EXPIRES_MS = 300_000


def _import_aio_pika() -> Any:
    try:
        import aio_pika
    except ImportError:
        raise FatalSourceError("the RabbitMQ source needs aio-pika: "
                               "pip install 'fastfeed[rabbitmq]'") from None
    return aio_pika


async def connect_amqp(u: SourceURL) -> Any:
    """An ``aio_pika`` connection (not the robust kind: reconnects are the source's job)."""
    aio_pika = _import_aio_pika()
    from aiormq.exceptions import ProbableAuthenticationError
    vhost = u.path[1:] if u.path.startswith("/") else u.path
    try:
        return await aio_pika.connect(
            host=u.host, port=u.port or (5671 if u.scheme == "amqps" else 5672),
            login=u.username or "guest", password=u.password or "guest",
            virtualhost=vhost or "/", ssl=u.scheme == "amqps",
            ssl_context=tls_context(u),
            timeout=10, client_properties={"connection_name": u.str("name", "fastfeed")})
    except ProbableAuthenticationError as exc:
        raise FatalSourceError.credentials("RabbitMQ", u, str(exc)) from None


async def declare(channel: Any, u: SourceURL, *, bind: bool = True) -> tuple[Any, Any]:
    """Declare the URL's exchange (if any) and, with ``bind``, its queue bound to it.

    Returns ``(exchange, queue)``; the exchange is the default one without ``exchange=``,
    and queue is None when not ``bind``.
    """
    aio_pika = _import_aio_pika()
    name = u.str("exchange")
    if name:
        exchange = await channel.declare_exchange(
            name, aio_pika.ExchangeType(u.str("exchange_type") or "fanout"), durable=True)
    else:
        exchange = channel.default_exchange
    queue = None
    if bind:
        queue = await channel.declare_queue(u.require("queue"),
                                            durable=u.bool("durable", True))
        if name:
            await queue.bind(exchange, routing_key=u.str("routing_key") or "#")
    return exchange, queue


class RabbitMQSource(Source):
    """AMQP 0-9-1 queue consumer with manual acknowledgements; see the module docstring."""

    schemes = ("amqp", "amqps")
    params = ("queue", "exchange", "exchange_type", "routing_key", "prefetch", "durable")
    at_least_once = True

    def __init__(self, url: SourceURL, rings: Any) -> None:
        super().__init__(url, rings)
        self.prefetch = url.int("prefetch", 1000)
        self._conn: Any = None
        self._last: Any = None  # the last message committed but not yet acknowledged
        self._acked_tag = 0     # the highest delivery tag acknowledged on this channel
        self._unacked = 0
        self._hold = 0
        # The restart sentinel: its name, whether it was declared once, when the last
        # connection was lost; None when the broker refused it (restarts not detected).
        self._sentinel: str | None = (f"fastfeed.sentinel.{socket.gethostname()}."
                                      f"{os.getpid()}.{uuid.uuid4().hex[:8]}")
        self._sentinel_declared = False
        self._lost_at: float | None = None

    @classmethod
    def validate(cls, url: SourceURL) -> None:
        url.require("queue")
        if url.int("prefetch", 1000) < 1:
            raise SourceURLError("prefetch= must be positive")
        kind = url.str("exchange_type") or "fanout"
        if kind not in ("fanout", "direct", "topic", "headers"):
            raise SourceURLError(f"exchange_type= must be fanout, direct, topic or headers, "
                                 f"not {kind!r}")

    async def consume(self) -> None:
        loop = asyncio.get_running_loop()
        lost: asyncio.Future[Any] = loop.create_future()
        self._conn = conn = await connect_amqp(self.url)

        def on_close(_: Any, exc: BaseException | None = None) -> None:
            if not lost.done():
                lost.set_result(exc)

        conn.close_callbacks.add(on_close)
        await self._check_restart(conn)
        channel = await conn.channel(publisher_confirms=False)
        channel.close_callbacks.add(on_close)
        await channel.set_qos(prefetch_count=self.prefetch)
        _, queue = await declare(channel, self.url)
        self._last, self._acked_tag, self._unacked, self._hold = None, 0, 0, 0
        tag = await queue.consume(self._on_message, no_ack=False)
        self.connected()
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            while True:
                done, _ = await asyncio.wait({lost, stop}, timeout=0.02,
                                             return_when=asyncio.FIRST_COMPLETED)
                if lost.done():
                    raise ConnectionError(f"AMQP connection closed: {lost.result()}")
                await self._flush_acks()
                if stop.done():
                    with contextlib.suppress(Exception):
                        await queue.cancel(tag)
                    if self.out.backlog:
                        # Messages waiting for room: a moment for the workers, so that they
                        # are written and acknowledged rather than delivered again.
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self.out.drain(), 2.0)
                        for _ in range(3):
                            await asyncio.sleep(0)  # the deliveries record themselves
                    await self._flush_acks()
                    await self._drop_sentinel(conn)
                    return
        finally:
            stop.cancel()
            if not self.stopping:
                self._lost_at = time.monotonic()

    async def _check_restart(self, conn: Any) -> None:
        """Count a broker restart: the transient sentinel queue of the last connection is
        gone (see the module docstring). Declares it (again) and consumes it."""
        name = self._sentinel
        if name is None:
            return
        from aiormq.exceptions import ChannelClosed, ChannelNotFoundEntity
        try:
            channel = await conn.channel(publisher_confirms=False)
            if self._sentinel_declared:
                try:
                    await channel.declare_queue(name, passive=True)
                except ChannelNotFoundEntity:
                    away = time.monotonic() - (self._lost_at or time.monotonic())
                    if away < _SENTINEL_EXPIRES_MS / 1000 * 0.9:
                        self.counts["broker_restarts"] += 1
                        log.warning("RabbitMQ restarted (its transient queues are gone): "
                                    "unacknowledged messages come again")
                    channel = await conn.channel(publisher_confirms=False)  # 404 closed it
            queue = await channel.declare_queue(
                name, durable=False, auto_delete=False,
                arguments={"x-expires": _SENTINEL_EXPIRES_MS})
            await queue.consume(_ignore, no_ack=True)
            self._sentinel_declared = True
        except ChannelClosed as exc:
            # Refused (permissions, transient queues disabled): restarts go undetected.
            log.info("RabbitMQ refused the restart sentinel queue (%s): broker restarts "
                     "count as reconnects only", self.url.scrub(str(exc)))
            self._sentinel = None

    async def _drop_sentinel(self, conn: Any) -> None:
        if self._sentinel is None or not self._sentinel_declared:
            return
        with contextlib.suppress(Exception):
            channel = await conn.channel(publisher_confirms=False)
            await asyncio.wait_for(channel.queue_delete(self._sentinel), 2.0)

    async def _flush_acks(self) -> None:
        if self._hold:
            # A refused message's nack is on its way: an ack with ``multiple`` now would
            # acknowledge it too. The flusher acknowledges once the nack went out.
            return
        last, self._last = self._last, None
        if last is not None:
            n, self._unacked = self._unacked, 0
            self._acked_tag = last.delivery_tag
            await last.ack(multiple=True)
            self.counts["acked"] += n

    async def _on_message(self, message: Any) -> None:
        c = self.counts
        if message.redelivered:
            c["redelivered"] += 1
        mid = message.message_id
        out = self.out
        if mid is not None and mid in self.seen:
            c["messages"] += 1
            c["duplicates"] += 1
            ok = True
        else:
            # The id goes to self.seen once the frame is in a ring (from the backlog too).
            ok = out.write(message.body, now_us(), mid)
        if ok and out.backlog:
            # "pause": this message, or one delivered before it, waits for room in a ring.
            # Its acknowledgement (``multiple``: it covers every earlier delivery) waits until
            # they are written; meanwhile the broker stops at the prefetch window.
            if not await out.written(out.kept):
                return  # discarded with its connection: the broker delivers it again
        if ok:
            tag = message.delivery_tag
            if tag <= self._acked_tag:
                c["acked"] += 1  # already covered by an ack(multiple) (cannot happen)
                return
            if self._last is None or tag > self._last.delivery_tag:
                self._last = message
            self._unacked += 1
            if self._unacked >= max(1, self.prefetch // 4):
                await self._flush_acks()
        else:
            # aio-pika runs each delivery in a task of its own: hold acknowledgements until
            # this one is handed back, or a later ack(multiple) would cover it.
            self._hold += 1
            try:
                await message.nack(requeue=True)
            finally:
                self._hold -= 1
            c["nacked"] += 1

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 5.0)


async def _ignore(message: Any) -> None:
    """The sentinel queue's consumer: nothing is ever published to it."""
