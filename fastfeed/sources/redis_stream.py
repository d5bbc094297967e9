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
- an entry id already committed by this source (``dedup_window`` most recent) is a
  ``duplicate``: acknowledged, not written again.

Parameters: ``stream=`` (required), ``group=`` (default ``fastfeed``), ``consumer=`` (default
``HOSTNAME-PID``; give a stable name to resume a crashed instance's own pending entries at
once), ``field=`` (the entry field holding the frame, default ``data``), ``start=`` (where a
new group starts: ``$``, the default, new entries only; ``0`` the whole stream),
``count=`` (entries per read, default 1000), ``block=`` (ms per blocking read, default 500).
``rediss+stream://`` is the same over TLS. The group is created (with the stream) if missing.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

from .._decoder import now_us
from .base import FatalSourceError, Source
from .url import SourceURLError

__all__ = ["RedisStreamSource"]

log = logging.getLogger("fastfeed.sources.redis")


def _raw(response: Any, **options: Any) -> Any:
    # The reply as the parser made it: the default callbacks build a dict per entry.
    return response


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
        self._redis: Any = None

    @classmethod
    def validate(cls, url: Any) -> None:
        url.require("stream")
        if url.int("count", 1000) < 1 or url.int("block", 500) < 1:
            raise SourceURLError("count= and block= must be positive")
        if url.int("claim_idle", 30000) < 0:
            raise SourceURLError("claim_idle= must not be negative")

    async def consume(self) -> None:
        try:
            import redis.asyncio as aioredis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff
            from redis.exceptions import AuthenticationError, ResponseError
        except ImportError:
            raise FatalSourceError("the Redis sources need redis and hiredis: "
                                   "pip install 'fastfeed[redis]'") from None
        u = self.url
        db = int(u.path.strip("/") or 0) if u.path.strip("/").isdigit() else 0
        # No retries inside the client: a lost connection surfaces here, is counted, and the
        # reconnect loop (with back-off) takes over.
        r = self._redis = aioredis.Redis(
            host=u.host, port=u.port or 6379, db=db, username=u.username, password=u.password,
            ssl=u.scheme.startswith("rediss"), socket_connect_timeout=10,
            socket_timeout=max(10.0, 3 * self.block / 1000), retry=Retry(NoBackoff(), 0),
            single_connection_client=True, client_name=u.str("name", "fastfeed"), protocol=2)
        r.response_callbacks["XREADGROUP"] = _raw
        r.response_callbacks["XAUTOCLAIM"] = _raw
        try:
            await r.ping()
        except AuthenticationError as exc:
            raise FatalSourceError(f"Redis refused the credentials: {u.scrub(str(exc))}") \
                from None
        except ResponseError as exc:
            if "NOAUTH" in str(exc) or "WRONGPASS" in str(exc):
                raise FatalSourceError(f"Redis refused the credentials: {u.scrub(str(exc))}") \
                    from None
            raise
        try:
            await r.xgroup_create(self.stream, self.group, id=self.start, mkstream=True)
            log.info("created consumer group %s on stream %s", self.group.decode(),
                     self.stream.decode())
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise FatalSourceError(f"cannot create the consumer group: {exc}") from None
        self.connected()
        await self._loop(r)

    async def _loop(self, r: Any) -> None:
        # Start with this consumer's own pending entries: delivered before, never acknowledged.
        pending_from: bytes | None = b"0"
        next_claim = 0.0
        loop_time = time.monotonic
        while not self.stopping:
            if self.claim_idle and loop_time() >= next_claim:
                await self._claim(r)
                next_claim = loop_time() + min(self.claim_idle / 2000, 5.0)
            if pending_from is not None:
                reply = await r.execute_command(
                    "XREADGROUP", "GROUP", self.group, self.consumer, "COUNT", self.count,
                    "STREAMS", self.stream, pending_from)
            else:
                reply = await r.execute_command(
                    "XREADGROUP", "GROUP", self.group, self.consumer, "COUNT", self.count,
                    "BLOCK", self.block, "STREAMS", self.stream, ">")
            entries = reply[0][1] if reply else []
            if pending_from is not None:
                if not entries:
                    pending_from = None  # own backlog done: on to new entries
                    continue
                pending_from = entries[-1][0]
                self.counts["redelivered"] += len(entries)
            if not entries:
                continue
            refused = await self._commit(r, entries, now_us())
            if refused:
                # A ring was full past its wait: those entries stay pending; read them again
                # from the start of the pending list after a short pause.
                pending_from = b"0"
                await self.sleep(0.01)

    async def _commit(self, r: Any, entries: list[Any], ts: int) -> int:
        """Write each entry's frame, acknowledge what is committed; returns how many were not."""
        write = self.out.write
        seen = self.seen
        field = self.field
        acks: list[bytes] = []
        refused = 0
        for entry_id, fields in entries:
            if entry_id in seen:
                self.counts["messages"] += 1
                self.counts["duplicates"] += 1
                acks.append(entry_id)
                continue
            payload = None
            if fields:
                # fields is [name, value, name, value, ...]
                for i in range(0, len(fields) - 1, 2):
                    if fields[i] == field:
                        payload = fields[i + 1]
                        break
            if payload is None:
                # Deleted entry (trimmed while pending) or no frame field: nothing to decode.
                self.counts["messages"] += 1
                self.counts["control"] += 1
                acks.append(entry_id)
                continue
            if write(payload, ts):
                seen.add(entry_id)
                acks.append(entry_id)
            else:
                refused += 1
        if acks:
            await r.execute_command("XACK", self.stream, self.group, *acks)
            self.counts["acked"] += len(acks)
        return refused

    async def _claim(self, r: Any) -> None:
        """Take over entries other consumers left pending longer than ``claim_idle``."""
        start = b"0-0"
        for _ in range(100):  # bounded: a huge backlog is taken over a slice per pass
            reply = await r.execute_command(
                "XAUTOCLAIM", self.stream, self.group, self.consumer, self.claim_idle, start,
                "COUNT", self.count)
            start, entries = reply[0], reply[1]
            deleted = reply[2] if len(reply) > 2 else []
            if deleted:
                # Entries trimmed away while pending: XAUTOCLAIM drops them from the group.
                self.counts["reclaimed"] += len(deleted)
            if entries:
                self.counts["reclaimed"] += len(entries)
                log.info("reclaimed %d entries from idle consumers", len(entries))
                await self._commit(r, entries, now_us())
            if start in (b"0-0", "0-0") or self.stopping:
                return

    async def close(self) -> None:
        r, self._redis = self._redis, None
        if r is not None:
            try:
                await r.aclose()
            except Exception:  # noqa: BLE001 - closing a broken connection may fail; it is gone
                pass
