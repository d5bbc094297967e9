"""``fastfeed sim --publish URL``: the synthetic market published into a broker, as the provider
would publish it (PROTOCOL.md section 4), with the simulator's counts.

The URL is the one a fastfeed source reads (see :mod:`fastfeed.sources`); the publisher takes
its destination from it:

- ``redis://...?channel=C`` (``PUBLISH``) or ``?schannel=C`` (``SPUBLISH``);
- ``redis+stream://...?stream=S`` (``XADD S * data <frame>``; ``field=`` renames ``data``;
  ``maxlen=N`` trims approximately);
- ``nats://...?subject=S`` (core publish; with ``stream=``, JetStream publishes, each
  acknowledged by the server, into that stream, created over ``subject=`` if missing);
- ``amqp://...?exchange=X&routing_key=K`` (persistent messages with a ``message_id``; without
  ``exchange=``, straight into ``queue=``; ``exchange_type=``, default ``fanout``, as the
  source declares it);
- ``kafka://...?topic=T`` (keyed by symbol, so a symbol stays in one partition).

A destination may contain ``{shard}``, replaced per frame by ``route_of(symbol) % shards``
(the same hash the rings use), or ``{symbol}``: the recipes for sharding a fan-out feed by
symbol over several instances (``channel=feed.{shard}``, ``subject=feed.{shard}``). With
``shards`` > 1 and no placeholder, ``.{shard}`` is appended (``channel=feed``: ``feed.0`` ..
``feed.N-1``), as ``fastfeed sim --publish URL --shards N`` says.

:func:`publish` returns the simulator's ``--json`` counts: ``frames_sent``, ``ticks``,
``quotes``, ``bars``, ``malformed``, ``control_sent``, ``bytes_sent`` (and ``elapsed_s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid
from collections.abc import Callable
from typing import Any

from .._listener import route_of
from ..sources.base import symbol_of
from ..sources.url import SourceURL, SourceURLError
from .market import KINDS, Market

__all__ = ["publish", "publish_async", "publish_command"]

# Frames generated and sent per round: big enough to amortise a round trip to the broker,
# small enough that pacing at a modest rate stays smooth.
_BATCH = 1000
_STATUS = b'{"status":"ok","message":"simulator status"}'
# The optional extra that brings each scheme's client library.
_EXTRAS = {"redis": "redis", "rediss": "redis", "redis+stream": "redis",
           "rediss+stream": "redis", "nats": "nats", "tls": "nats", "amqp": "rabbitmq",
           "amqps": "rabbitmq", "kafka": "kafka"}


def publish(url: str, *, count: int | None, rate: float = 0.0, symbols: int = 100,
            seed: int = 0, mix: tuple[float, float, float] = (0.7, 0.25, 0.05),
            malformed: float = 0.0, arrays: float = 0.0, status_every: int = 0,
            shards: int = 1, duration: float | None = None,
            start_time: float | None = None, send_timeout: float = 60.0) -> dict[str, Any]:
    """Publish ``count`` data frames of the synthetic market into the broker at ``url``.

    Stops after ``count`` frames (None: no limit), after ``duration`` seconds, or on
    SIGINT/SIGTERM, whichever comes first, and returns the counts of what was published.
    ``rate``: frames per second (0: as fast as the broker takes them). ``symbols``, ``seed``,
    ``mix``, ``malformed``, ``arrays``: as ``fastfeed sim`` (a malformed frame keeps its symbol,
    so a source routes it and the decoder counts an error). ``status_every`` > 0 publishes a
    status object (a control message) after every that many frames. ``shards``: the modulus
    of ``{shard}`` in the destination. ``send_timeout``: a broker that takes longer than
    this to connect, or to take (and confirm) a batch, is taken for stuck: TimeoutError.
    Returns the counts (see the module docstring).
    """
    coro = publish_async(url, count=count, rate=rate, symbols=symbols, seed=seed, mix=mix,
                         malformed=malformed, arrays=arrays, status_every=status_every,
                         shards=shards, duration=duration, start_time=start_time,
                         handle_signals=True, send_timeout=send_timeout)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.run(coro)
    return uvloop.run(coro)


async def publish_async(url: str, *, count: int | None, rate: float = 0.0, symbols: int = 100,
                        seed: int = 0, mix: tuple[float, float, float] = (0.7, 0.25, 0.05),
                        malformed: float = 0.0, arrays: float = 0.0, status_every: int = 0,
                        shards: int = 1, duration: float | None = None,
                        start_time: float | None = None,
                        handle_signals: bool = False,
                        send_timeout: float = 60.0) -> dict[str, Any]:
    """:func:`publish` on the running event loop (``handle_signals``: stop on SIGINT and
    SIGTERM, as the command does)."""
    if (count is not None and count < 0) or rate < 0 or shards < 1 or status_every < 0:
        raise ValueError("count, rate and status_every must not be negative; shards >= 1")
    if count is None and duration is None and rate == 0 and not handle_signals:
        raise ValueError("give count or duration (or rate and a signal to stop)")
    stop = asyncio.Event()
    if handle_signals:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, stop.set)
    u = SourceURL.parse(url)
    pub = _publisher(u, shards)
    market = Market(symbols, seed=seed, mix=mix, malformed=malformed, arrays=arrays)
    t0_us = int(round((start_time if start_time is not None else time.time()) * 1e6))
    counts: dict[str, Any] = dict.fromkeys(("frames_sent", *KINDS, "bytes_sent"), 0)
    started = time.monotonic()
    try:
        await _bounded(pub.open(), stop, "the connection", send_timeout)  # stopped: no loop
        started = time.monotonic()
        deadline = None if duration is None else started + duration
        limit = count if count is not None else float("inf")
        sent = 0
        since_status = 0
        while sent < limit and not stop.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                break
            n = int(min(_BATCH, limit - sent))
            if rate > 0:
                # Pace: never ahead of the wall clock, in slices of about 10 ms.
                n = min(n, max(1, int(rate / 100)))
                due = (sent + n) / rate - (time.monotonic() - started)
                if due > 0:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(stop.wait(), due)
                    if stop.is_set():
                        break
            block = market.block(n, t0_us + sent, 1)
            payloads: list[bytes] = []
            for p in block.payloads:
                payloads.append(p)
                if status_every:
                    since_status += 1
                    if since_status >= status_every:
                        since_status = 0
                        payloads.append(_STATUS)
                        counts["control_sent"] += 1
            if not await _bounded(pub.send(payloads), stop, "sending a batch", send_timeout):
                break  # stopped mid-batch: it is not counted as sent
            for kind, rows in zip(KINDS, block.rows(0, n), strict=True):
                if kind != "control_sent":
                    counts[kind] += rows
            counts["frames_sent"] += n
            counts["bytes_sent"] += sum(len(p) for p in block.payloads)
            sent += n
        await _bounded(pub.flush(), stop, "flushing", send_timeout)
    finally:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(pub.close(), _CLOSE_TIMEOUT)
    counts["elapsed_s"] = round(time.monotonic() - started, 3)
    return counts


_CLOSE_TIMEOUT = 10.0


async def _bounded(step: Any, stop: asyncio.Event, what: str, timeout: float) -> bool:
    """Await ``step`` within ``timeout`` seconds (a frozen Redis, a RabbitMQ whose memory
    alarm blocks publishers), or until ``stop`` (a signal): True once done, False when
    stopped first; TimeoutError naming ``what`` past the bound."""
    task = asyncio.ensure_future(step)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        done, _ = await asyncio.wait({task, stopped}, timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if task in done:
        task.result()  # its error, if any
        return True
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    if stop.is_set():
        return False
    raise TimeoutError(f"the broker did not finish {what} within {timeout:g} s "
                       f"(is it stuck, or blocking publishers?)")


def publish_command(args: Any, faults: Any) -> dict[str, Any]:
    """``fastfeed sim --publish URL``: publish with the ``sim`` command's options.

    ``args``: the parsed ``sim`` arguments (``publish``, ``count``, ``rate``, ``duration``,
    ``symbols``, ``seed``, ``mix``, ``start_time``, ``shards``, ``json``); ``faults``: the
    parsed ``--fault`` options (``malformed``, ``arrays`` and ``status_every`` apply; the
    others concern the WebSocket). Prints the counts as one JSON line with ``--json``, else a
    one-line summary; returns them. Raises :class:`~fastfeed.sources.url.SourceURLError` or
    ``ValueError`` for a bad URL or option (the command shows it as a usage error).
    """
    import json

    url = SourceURL.parse(args.publish)
    _publisher(url, 1)  # checks the scheme and destination before anything is generated
    try:
        counts = publish(args.publish, count=args.count, rate=args.rate, symbols=args.symbols,
                         seed=args.seed, mix=tuple(args.mix), malformed=faults.malformed,
                         arrays=faults.arrays, status_every=faults.status_every,
                         shards=getattr(args, "shards", 1) or 1, duration=args.duration,
                         start_time=args.start_time)
    except ImportError as exc:
        extra = _EXTRAS.get(url.scheme, "")
        raise SourceURLError(f"publishing to {url.scheme}:// needs {exc.name}: "
                             f"pip install 'fastfeed[{extra}]'") from None
    if args.json:
        print(json.dumps(counts), flush=True)
    else:
        print(f"published {counts['frames_sent']:,} frames ({counts['ticks']:,} ticks, "
              f"{counts['quotes']:,} quotes, {counts['bars']:,} bars, {counts['malformed']:,} "
              f"malformed) to {url.redacted} in {counts['elapsed_s']:.1f}s", flush=True)
    return counts


# -- publishers ---------------------------------------------------------------------------------

class _Publisher:
    """Sends lists of frames to one destination (possibly per-frame, by ``{shard}``)."""

    def __init__(self, url: SourceURL, shards: int) -> None:
        self.url = url
        self.shards = shards

    def destination(self, template: str) -> Callable[[bytes], str]:
        """A function frame -> destination name for a template with {shard} or {symbol}.

        With ``shards`` > 1 and neither placeholder, ``.{shard}`` is appended: ``feed``
        becomes ``feed.0`` .. ``feed.N-1``.
        """
        if "{shard}" not in template and "{symbol}" not in template:
            if self.shards <= 1:
                return lambda payload: template
            template += ".{shard}"
        shards = self.shards

        def dest(payload: bytes) -> str:
            code = symbol_of(payload) or b""
            return template.format(shard=route_of(code) % shards if code else 0,
                                   symbol=code.decode("utf-8", "replace"))
        return dest

    async def open(self) -> None: ...
    async def send(self, payloads: list[bytes]) -> None: ...
    async def flush(self) -> None: ...
    async def close(self) -> None: ...


def _publisher(u: SourceURL, shards: int) -> _Publisher:
    if u.scheme in ("redis", "rediss"):
        return _RedisPublisher(u, shards, stream=False)
    if u.scheme in ("redis+stream", "rediss+stream"):
        return _RedisPublisher(u, shards, stream=True)
    if u.scheme in ("nats", "tls"):
        return _NatsPublisher(u, shards)
    if u.scheme in ("amqp", "amqps"):
        return _AmqpPublisher(u, shards)
    if u.scheme == "kafka":
        return _KafkaPublisher(u, shards)
    raise SourceURLError(f"cannot publish to {u.scheme}://")


class _RedisPublisher(_Publisher):
    """PUBLISH / SPUBLISH / XADD, pipelined: one write and one round trip per batch."""

    def __init__(self, url: SourceURL, shards: int, *, stream: bool) -> None:
        super().__init__(url, shards)
        self.stream = stream
        if stream:
            self.command = b"XADD"
            self.dest = self.destination(url.require("stream"))
            self.field = (url.str("field") or "data").encode()
            self.maxlen = url.int("maxlen", 0)
        else:
            sharded = url.str("schannel")
            self.command = b"SPUBLISH" if sharded else b"PUBLISH"
            self.dest = self.destination(sharded or url.require("channel"))
        self.reader: Any = None
        self.rd: asyncio.StreamReader | None = None
        self.wr: asyncio.StreamWriter | None = None
        self.errors = 0

    async def open(self) -> None:
        import hiredis

        from ..sources.base import tls_context
        from ..sources.resp import resp_command

        u = self.url
        self.rd, self.wr = await asyncio.open_connection(u.host, u.port or 6379,
                                                         ssl=tls_context(u))
        self.reader = hiredis.Reader()
        first = []
        if u.password is not None:
            first.append(resp_command("AUTH", *([u.username] if u.username else []),
                                      u.password))
        db = u.path.strip("/")
        if db.isdigit() and db != "0":
            first.append(resp_command("SELECT", db))
        if first:
            await self._roundtrip(b"".join(first), len(first))

    async def _roundtrip(self, data: bytes, replies: int) -> None:
        assert self.rd is not None and self.wr is not None
        self.wr.write(data)
        await self.wr.drain()
        got = 0
        first_error: Exception | None = None
        while got < replies:
            while (m := self.reader.gets()) is not False:
                got += 1
                if isinstance(m, Exception) and first_error is None:
                    first_error = m
            if got >= replies:
                break
            chunk = await self.rd.read(1 << 16)
            if not chunk:
                raise ConnectionError("Redis closed the connection")
            self.reader.feed(chunk)
        if first_error is not None:
            raise RuntimeError(f"Redis refused a command: {self.url.scrub(str(first_error))}")

    async def send(self, payloads: list[bytes]) -> None:
        out = []
        cmd = self.command
        for p in payloads:
            d = self.dest(p).encode()
            if self.stream:
                if self.maxlen:
                    ml = str(self.maxlen).encode()
                    out.append(b"*8\r\n$4\r\nXADD\r\n$%d\r\n%s\r\n$6\r\nMAXLEN\r\n$1\r\n~\r\n"
                               b"$%d\r\n%s\r\n$1\r\n*\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n"
                               % (len(d), d, len(ml), ml, len(self.field), self.field,
                                  len(p), p))
                else:
                    out.append(b"*5\r\n$4\r\nXADD\r\n$%d\r\n%s\r\n$1\r\n*\r\n$%d\r\n%s\r\n"
                               b"$%d\r\n%s\r\n" % (len(d), d, len(self.field), self.field,
                                                   len(p), p))
            else:
                out.append(b"*3\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n"
                           % (len(cmd), cmd, len(d), d, len(p), p))
        await self._roundtrip(b"".join(out), len(payloads))

    async def close(self) -> None:
        if self.wr is not None:
            self.wr.close()
            try:
                await self.wr.wait_closed()
            except (ConnectionError, OSError):
                pass


class _NatsPublisher(_Publisher):
    def __init__(self, url: SourceURL, shards: int) -> None:
        super().__init__(url, shards)
        self.subject = url.require("subject")
        self.dest = self.destination(self.subject)
        self.stream = url.str("stream")
        self.nc: Any = None
        self.js: Any = None

    async def open(self) -> None:
        from ..sources.nats import connect_nats, ensure_stream
        self.nc = await connect_nats(self.url, allow_reconnect=False)
        if self.stream:
            self.js = self.nc.jetstream()
            await ensure_stream(self.js, self.stream, self.url)

    async def send(self, payloads: list[bytes]) -> None:
        if self.js is not None:
            # Each JetStream publish is acknowledged once stored; send a batch concurrently.
            acks = [self.js.publish(self.dest(p), p) for p in payloads]
            await asyncio.gather(*acks)
            return
        pub = self.nc.publish
        for p in payloads:
            await pub(self.dest(p), p)

    async def flush(self) -> None:
        await self.nc.flush(timeout=30)

    async def close(self) -> None:
        if self.nc is not None:
            await self.nc.close()


class _AmqpPublisher(_Publisher):
    def __init__(self, url: SourceURL, shards: int) -> None:
        super().__init__(url, shards)
        self.exchange_name = url.str("exchange") or ""
        key = url.str("routing_key") or ("" if self.exchange_name else url.require("queue"))
        self.dest = self.destination(key)
        self.conn: Any = None
        self.exchange: Any = None
        self.run = uuid.uuid4().hex[:12]
        self.seq = 0

    async def open(self) -> None:
        from ..sources.rabbitmq import connect_amqp, declare
        self.conn = await connect_amqp(self.url)
        channel = await self.conn.channel(publisher_confirms=True)
        self.exchange, _ = await declare(channel, self.url, bind=False)

    async def send(self, payloads: list[bytes]) -> None:
        import aio_pika
        msgs = []
        for p in payloads:
            self.seq += 1
            msg = aio_pika.Message(p, delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                   message_id=f"{self.run}-{self.seq}")
            msgs.append(self.exchange.publish(msg, routing_key=self.dest(p)))
        # Publisher confirms: every message is confirmed by the broker before the next batch.
        await asyncio.gather(*msgs)

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()


class _KafkaPublisher(_Publisher):
    def __init__(self, url: SourceURL, shards: int) -> None:
        super().__init__(url, shards)
        self.dest = self.destination(url.require("topic"))
        self.producer: Any = None

    async def open(self) -> None:
        from confluent_kafka import Producer
        u = self.url
        self.producer = Producer({"bootstrap.servers": f"{u.host}:{u.port or 9092}",
                                  "linger.ms": 5, "enable.idempotence": True})

    async def send(self, payloads: list[bytes]) -> None:
        for p in payloads:
            while True:
                try:
                    self.producer.produce(self.dest(p), p, key=symbol_of(p))
                    break
                except BufferError:
                    self.producer.poll(0.05)
            self.producer.poll(0)

    async def flush(self) -> None:
        left = await asyncio.get_running_loop().run_in_executor(None, self.producer.flush, 60)
        if left:
            raise RuntimeError(f"{left} Kafka messages not delivered")
