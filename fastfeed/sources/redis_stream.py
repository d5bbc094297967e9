"""Redis Streams: ``redis+stream://[user:password@]HOST:PORT[/DB]?stream=S&group=G&consumer=C``.

A consumer in a consumer group (``XREADGROUP``), at-least-once:

- an entry is acknowledged (``XACK``, once per batch) only after its frame is committed to a
  ring; an entry a ring refused stays pending and is read again (from this consumer's pending
  list) a moment later;
- at every (re)connect the consumer first re-reads its own pending entries (those delivered
  before a lost connection or a restart under the same ``consumer=`` name);
- every ``claim_idle`` ms (default 30000; 0 turns it off) it takes over entries that another
  consumer of the group left pending for longer than that (``XAUTOCLAIM``): a crashed
  instance's messages are not lost, they are ``reclaimed``;
- the ids of the entries committed to a ring are remembered (the ``dedup_window`` most
  recent): an entry that comes again, pending or even as new (a Redis restarted from an
  append-only file that missed its last second of acknowledgements and reads), is a
  ``duplicate``: acknowledged, not written again;
- under the rings' "pause" policy a full ring keeps the rest of the batch waiting in order
  (see :class:`~fastfeed.sources.base.RingWriter`): nothing more is read and nothing of the
  batch is acknowledged until it is all written;
- ``broker_restarts`` counts reconnections to a server with a different ``run_id``.

Parameters: ``stream=`` (required), ``group=`` (default ``fastfeed``), ``consumer=`` (default
``HOSTNAME-PID``; give a stable name to resume a crashed instance's own pending entries at
once), ``field=`` (the entry field holding the frame, default ``data``), ``start=`` (where a
new group starts: ``$``, the default, new entries only; ``0`` the whole stream),
``count=`` (entries per read, default 1000), ``block=`` (ms per blocking read, default 500).
``rediss+stream://`` is the same over TLS. The group is created (with the stream) if missing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import deque
from typing import Any

from .._decoder import now_us
from .base import FatalSourceError, Source, tls_context
from .resp import RespConnection, RespError, resp_command
from .url import SourceURLError

__all__ = ["RedisStreamSource"]

# Reads in flight at once: Redis serves the next batch while this process writes the last.
_DEPTH = 2
# An XACK the server has not confirmed by then: the connection is taken for dead (the entries
# stay pending and come again, recognised as duplicates).
_ACK_TIMEOUT = 30.0

log = logging.getLogger("fastfeed.sources.redis")


class RedisStreamSource(Source):
    """Redis Streams consumer-group source; see the module docstring."""

    schemes = ("redis+stream", "rediss+stream")
    params = ("stream", "group", "consumer", "field", "start", "count", "block", "claim_idle")
    at_least_once = True

    def __init__(self, url: Any, rings: Any) -> None:
        super().__init__(url, rings)
        self.stream = url.require("stream").encode()
        self.group = (url.str("group") or "fastfeed").encode()
        self.consumer = (url.str("consumer") or f"{socket.gethostname()}-{os.getpid()}").encode()
        self.field = (url.str("field") or "data").encode()
        self.start = url.str("start") or "$"
        self.count = url.int("count", 1000)
        self.block = url.int("block", 500)
        self.claim_idle = url.int("claim_idle", 30000)
        self._conn: RespConnection | None = None
        # Entries acknowledged but not confirmed yet, by batch (counted as acked on the reply).
        self._unconfirmed: dict[int, int] = {}
        self._batch = 0
        self._next_claim = 0.0
        # The highest entry id committed, as (ms, seq): every id in self.seen is at most this,
        # so a batch of new entries that starts above it needs no duplicate check.
        self._high = (-1, -1)
        self._run_id: bytes | None = None

    @classmethod
    def validate(cls, url: Any) -> None:
        url.require("stream")
        if url.int("count", 1000) < 1 or url.int("block", 500) < 1:
            raise SourceURLError("count= and block= must be positive")
        if url.int("claim_idle", 30000) < 0:
            raise SourceURLError("claim_idle= must not be negative")

    async def consume(self) -> None:
        try:
            import hiredis  # noqa: F401  (the reply parser of RespConnection)
        except ImportError:
            raise FatalSourceError("the Redis sources need hiredis: "
                                   "pip install 'fastfeed[redis]'") from None
        self._unconfirmed = {}
        u = self.url
        conn = self._conn = await RespConnection.open(u.host, u.port or 6379, tls=tls_context(u))
        try:
            if u.password is not None:
                await conn.call("AUTH", *([u.username] if u.username else []), u.password)
            db = u.path.strip("/")
            if db and db != "0":
                await conn.call("SELECT", db)
            await conn.call("CLIENT", "SETNAME", u.str("name", "fastfeed") or "fastfeed")
            info = await conn.call("INFO", "server")
        except RespError as exc:
            text = str(exc)
            if text.startswith(("WRONGPASS", "NOAUTH", "NOPERM", "ERR AUTH", "ERR invalid")):
                raise FatalSourceError.credentials("Redis", u, text) from None
            raise
        try:
            await conn.call("XGROUP", "CREATE", self.stream, self.group, self.start, "MKSTREAM")
            log.info("created consumer group %s on stream %s", self.group.decode(),
                     self.stream.decode())
        except RespError as exc:
            text = str(exc)
            if text.startswith(("WRONGTYPE", "NOPERM")):
                raise FatalSourceError(f"cannot create the consumer group: {text}") from None
            if "BUSYGROUP" not in text:
                raise  # LOADING (a restarted server replaying its file) and the like: retry
        run_id = _run_id(info)
        if run_id is not None:
            if self._run_id is not None and run_id != self._run_id:
                self.counts["broker_restarts"] += 1
                log.warning("Redis restarted (new run_id): entries it lost from its file "
                            "are gone; entries that come again are recognised as duplicates")
            self._run_id = run_id
        self.connected()
        await self._loop(conn)

    def _read(self) -> bytes:
        """XREADGROUP of new entries (">"), blocking up to ``block`` ms."""
        return resp_command("XREADGROUP", "GROUP", self.group, self.consumer, "COUNT",
                            self.count, "BLOCK", self.block, "STREAMS", self.stream, ">")

    async def _loop(self, conn: RespConnection) -> None:
        # Start with this consumer's own pending entries: delivered before, never acknowledged.
        self._next_claim = 0.0
        while not self.stopping:
            await self._drain_pending(conn)
            await self._stream(conn)

    async def _drain_pending(self, conn: RespConnection) -> None:
        """Re-read this consumer's pending list from the start until it is empty (the slow,
        rare path: after a (re)connect, and after a ring refused entries)."""
        from_id = b"0"
        while not self.stopping:
            reply = await conn.call("XREADGROUP", "GROUP", self.group, self.consumer, "COUNT",
                                    self.count, "STREAMS", self.stream, from_id)
            entries = reply[0][1] if reply else []
            if not entries:
                return
            from_id = entries[-1][0]
            self.counts["redelivered"] += len(entries)
            ids, refused = await self._commit(entries, now_us(), fresh=False)
            if ids:
                await asyncio.wait_for(self._ack(conn, ids), _ACK_TIMEOUT)
            if refused:
                await self.sleep(0.01)  # let the workers catch up, then start over
                from_id = b"0"

    async def _stream(self, conn: RespConnection) -> None:
        """New entries, pipelined: ``_DEPTH`` reads are on their way while a batch is written
        (so Redis always has the next one to serve), acknowledgements ride along; returns to
        re-read pending entries after a refusal, or when stopping (then every read in flight
        is committed and acknowledged first, leaving nothing pending)."""
        timeout = 10.0 + self.block / 1000
        reads = deque(conn.request(self._read()) for _ in range(_DEPTH))
        try:
            await self._pipeline(conn, reads, timeout)
        finally:
            # After a lost connection the reads still queued hold its error: retrieve it
            # (asyncio would report it as never retrieved).
            for f in reads:
                if f.done() and not f.cancelled():
                    f.exception()
                else:
                    f.cancel()

    async def _pipeline(self, conn: RespConnection, reads: deque[asyncio.Future[Any]],
                        timeout: float) -> None:
        refused = 0
        while reads:
            reply = await asyncio.wait_for(reads.popleft(), timeout)
            if not (self.stopping or refused):
                reads.append(conn.request(self._read()))
            entries = reply[0][1] if reply else []
            if entries:
                # Under "pause" this waits for the rings (the reads in flight wait too).
                ids, r = await self._commit(entries, now_us(), fresh=True)
                refused += r
                if ids:
                    ack = self._ack(conn, ids)
                    if self.stopping or refused:
                        await asyncio.wait_for(ack, _ACK_TIMEOUT)
            if refused and not reads:
                # Entries a ring refused stay pending: pause for the workers, then re-read
                # the pending list.
                await self.sleep(0.01)
                return
            if self.claim_idle and not refused and time.monotonic() >= self._next_claim:
                await self._claim(conn)
                self._next_claim = time.monotonic() + min(self.claim_idle / 2000, 5.0)

    def _ack(self, conn: RespConnection, ids: list[bytes]) -> asyncio.Future[Any]:
        """XACK ``ids`` (already committed, so in :attr:`seen`); counted once the server
        confirms. If the connection goes first, their redelivery is recognised."""
        batch = self._batch = self._batch + 1
        self._unconfirmed[batch] = len(ids)
        fut = conn.request(self._xack(ids))

        def done(f: asyncio.Future[Any]) -> None:
            # Refused or lost with the connection, the entries stay pending and come again:
            # their ids are in self.seen, so they are recognised as duplicates then.
            n = self._unconfirmed.pop(batch, 0)
            if not f.cancelled() and f.exception() is None:
                self.counts["acked"] += n
        fut.add_done_callback(done)
        return fut

    def _xack(self, ids: list[bytes]) -> bytes:
        """``XACK stream group id...`` in RESP. Runs for every entry at full rate: ids of one
        length (a batch has a few: "<ms>-<seq>" with 1, 2, 3... digit sequences) are joined
        in one C call each, the order of the ids being free."""
        head = resp_command("XACK", self.stream, self.group)
        parts = [b"*%d" % (3 + len(ids)) + head[head.index(b"\r\n"):]]
        for n in set(map(len, ids)):
            same = [i for i in ids if len(i) == n]
            prefix = b"$%d\r\n" % n
            parts.append(prefix + (b"\r\n" + prefix).join(same) + b"\r\n")
        return b"".join(parts)

    async def _commit(self, entries: list[Any], ts: int, *,
                      fresh: bool) -> tuple[list[bytes], int]:
        """Write each entry's frame; returns (ids to acknowledge, how many a ring dropped:
        those stay pending). ``fresh``: new entries (">"), in increasing id order.

        Under "pause" the frames a ring had no room for wait in the writer's backlog; this
        waits until they are written, so that every id returned is committed."""
        new, done, refused = self._write(entries, ts, fresh)
        out = self.out
        if out.backlog:
            await out.drain()
        if new:
            self.seen.add_many(new)
            high = _id_key(new[-1])
            if high > self._high:
                self._high = high
        return new + done if done else new, refused

    def _write(self, entries: list[Any], ts: int,
               fresh: bool) -> tuple[list[bytes], list[bytes], int]:
        """(ids written or waiting in the backlog, ids done with otherwise: duplicates and
        entries without a frame, how many a ring dropped)."""
        field = self.field
        if fresh and (not self.seen or _id_key(entries[0][0]) > self._high):
            # The common case: new entries above every id committed so far (none can be a
            # duplicate) whose only field is the frame. Comprehensions rather than a loop:
            # this runs for every entry at full rate.
            id_tuple, fields = zip(*entries, strict=True)
            ids = list(id_tuple)
            payloads = [f[1] if f and f[0] == field else None for f in fields]
            if None not in payloads:
                refused = self.out.write_batch(payloads, ts)
                if refused:
                    skip = set(refused)
                    ids = [x for i, x in enumerate(ids) if i not in skip]
                return ids, [], len(refused)
        seen = self.seen
        ids: list[bytes] = []
        payloads: list[bytes] = []
        done: list[bytes] = []
        for entry_id, fields in entries:
            if entry_id in seen:
                self.counts["messages"] += 1
                self.counts["duplicates"] += 1
                done.append(entry_id)
                continue
            payload = None
            if fields:
                # fields is [name, value, name, value, ...]; the frame is normally the only one.
                if fields[0] == field:
                    payload = fields[1]
                else:
                    for i in range(2, len(fields) - 1, 2):
                        if fields[i] == field:
                            payload = fields[i + 1]
                            break
            if payload is None:
                # Deleted entry (trimmed while pending) or no frame field: nothing to decode.
                self.counts["messages"] += 1
                self.counts["control"] += 1
                done.append(entry_id)
                continue
            ids.append(entry_id)
            payloads.append(payload)
        refused = self.out.write_batch(payloads, ts)
        if refused:
            skip = set(refused)
            ids = [x for i, x in enumerate(ids) if i not in skip]
        return ids, done, len(refused)

    async def _claim(self, conn: RespConnection) -> None:
        """Take over entries other consumers left pending longer than ``claim_idle``."""
        start = b"0-0"
        for _ in range(100):  # bounded: a huge backlog is taken over a slice per pass
            reply = await conn.call("XAUTOCLAIM", self.stream, self.group, self.consumer,
                                    self.claim_idle, start, "COUNT", self.count)
            start, entries = reply[0], reply[1]
            deleted = reply[2] if len(reply) > 2 else []
            if deleted:
                # Entries trimmed away while pending: XAUTOCLAIM drops them from the pending
                # list itself; there is nothing left to decode.
                log.info("%d pending entries were trimmed from the stream", len(deleted))
            entries = [e for e in entries if e is not None]
            if entries:
                self.counts["reclaimed"] += len(entries)
                self.counts["redelivered"] += len(entries)
                log.info("reclaimed %d entries from idle consumers", len(entries))
                ids, _ = await self._commit(entries, now_us(), fresh=False)
                if ids:
                    await asyncio.wait_for(self._ack(conn, ids), _ACK_TIMEOUT)
            if start == b"0-0" or self.stopping:
                return

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
            await asyncio.wait({conn.lost}, timeout=2.0)


def _id_key(entry_id: bytes) -> tuple[int, int]:
    """A stream entry id ``b"<ms>-<seq>"`` as a tuple that sorts as Redis sorts ids."""
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


def _run_id(info: Any) -> bytes | None:
    """``run_id`` from an ``INFO server`` reply (new at every start of the server)."""
    if isinstance(info, bytes):
        for line in info.split(b"\r\n"):
            if line.startswith(b"run_id:"):
                return line[7:].strip()
    return None
