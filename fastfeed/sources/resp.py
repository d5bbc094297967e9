"""A minimal pipelined Redis connection: requests out, replies in order, parsed by ``hiredis``.

The Redis Streams source's hot loop is "acknowledge the last batch, read the next one"; with
this connection both commands leave in one write and cost one round trip, and the reply is
the parser's nested lists with no per-entry conversion. (``redis.asyncio`` builds a dict per
entry and packs arguments in Python, which measured slower than the rest of the source.)
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import Any

__all__ = ["RespConnection", "RespError", "resp_command"]


class RespError(Exception):
    """An error reply (``-ERR ...``, ``-NOGROUP ...``) from the server."""


def resp_command(*args: bytes | str | int) -> bytes:
    """One command in the Redis wire protocol (RESP2 array of bulk strings)."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


class RespConnection(asyncio.Protocol):
    """One connection; :meth:`request` queues a command and returns the future of its reply."""

    def __init__(self) -> None:
        import hiredis
        self._reader = hiredis.Reader()
        self._waiting: deque[asyncio.Future[Any]] = deque()
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    @classmethod
    async def open(cls, host: str, port: int, *, tls: ssl.SSLContext | None = None,
                   timeout: float = 10.0) -> RespConnection:
        """Connect (over TLS with the context ``tls``, see ``base.tls_context``)."""
        loop = asyncio.get_running_loop()
        _, proto = await asyncio.wait_for(
            loop.create_connection(cls, host, port, ssl=tls), timeout)
        return proto

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)
        while self._waiting:
            f = self._waiting.popleft()
            if not f.done():
                err = ConnectionError(f"Redis connection lost ({exc or 'EOF'})")
                err.__cause__ = exc  # a TLS alert (no client certificate) is fatal, not retried
                f.set_exception(err)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            if not self._waiting:
                continue  # nothing asked for it (cannot happen outside subscribe mode)
            f = self._waiting.popleft()
            if f.done():
                continue
            if isinstance(reply, Exception):
                f.set_exception(RespError(str(reply)))
            else:
                f.set_result(reply)

    def request(self, command: bytes) -> asyncio.Future[Any]:
        """Send one encoded command (:func:`resp_command`); the future gets its reply."""
        f: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.transport is None or self.transport.is_closing():
            if self.transport is not None and not self.lost.done():
                # closing, and connection_lost has not said why yet: it fails f with the cause
                self._waiting.append(f)
                return f
            err = ConnectionError("Redis connection closed")
            err.__cause__ = self.lost.result() if self.lost.done() else None
            f.set_exception(err)
            return f
        self._waiting.append(f)
        self.transport.write(command)
        return f

    async def call(self, *args: bytes | str | int, timeout: float = 30.0) -> Any:
        """Send a command and wait for its reply (error replies raise :class:`RespError`)."""
        return await asyncio.wait_for(self.request(resp_command(*args)), timeout)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
