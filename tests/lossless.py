"""Helpers for the lossless (backpressure) and broker-restart tests of the pub/sub sources.

They run a real :class:`~fastfeed.sources.SourceProcess` against rings this process creates
and reads itself, as a decoder worker would (:class:`RingReader`, slowly when asked), so that
every frame that reached a ring can be checked: numbered frames (``{"c":SYMBOL,"n":N}``) show
what arrived, what arrived twice, and whether each symbol kept its order.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import orjson

from fastfeed._ring import Ring
from fastfeed.sim.publish import _publisher
from fastfeed.sources import SourceProcess
from fastfeed.sources.url import SourceURL
from tests.brokers import unique

#: Symbols the numbered frames cycle through (several per ring, so that order is per symbol).
SYMBOLS = 16


def frames(start: int, count: int) -> list[bytes]:
    """Frames ``start`` .. ``start + count - 1``: ``{"c":"T:SYM","n":N}``, symbol N % 16."""
    return [b'{"c":"T:S%02d","n":%d,"p":1.5}' % (n % SYMBOLS, n)
            for n in range(start, start + count)]


def publish_frames(url: str, payloads: Sequence[bytes], chunk: int = 500) -> None:
    """Publish ``payloads`` to the broker at ``url`` with the simulator's publisher (Redis
    PUBLISH/XADD, NATS/JetStream with acks, RabbitMQ persistent with confirms and ids)."""
    async def run() -> None:
        pub = _publisher(SourceURL.parse(url), 1)
        await pub.open()
        try:
            for i in range(0, len(payloads), chunk):
                await pub.send(list(payloads[i:i + chunk]))
            await pub.flush()
        finally:
            await pub.close()
    asyncio.run(asyncio.wait_for(run(), 120))


class RingReader:
    """Reads the rings in a thread, as the decoder workers would; ``pause`` seconds between
    batches of at most ``max_records`` make it a slow consumer."""

    def __init__(self, rings: Sequence[Ring], *, max_records: int = 64,
                 pause: float = 0.0) -> None:
        self.rings = list(rings)
        self.max_records = max_records
        self.pause = pause
        self.got: list[list[bytes]] = [[] for _ in self.rings]
        self.gaps = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ring-reader", daemon=True)

    def start(self) -> RingReader:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive(), "the ring reader did not stop"

    def _run(self) -> None:
        while not self._stop.is_set():
            idle = True
            for i, ring in enumerate(self.rings):
                b = ring.read_batch(self.max_records, timeout=0)
                if b is None:
                    continue
                idle = False
                try:
                    self.gaps += b.gaps
                    self.got[i].extend(bytes(b.frame(j)) for j in range(b.count))
                finally:
                    b.release()
            if self.pause:
                time.sleep(self.pause)
            elif idle:
                time.sleep(0.001)

    def count(self) -> int:
        return sum(len(g) for g in self.got)

    def numbers(self) -> list[int]:
        """The frame numbers received, ring after ring, each ring in arrival order."""
        return [orjson.loads(p)["n"] for g in self.got for p in g]

    def check_order(self) -> None:
        """Each symbol's frames arrived in increasing order (duplicates would break it)."""
        last: dict[str, int] = {}
        for g in self.got:
            for p in g:
                m = orjson.loads(p)
                assert m["n"] > last.get(m["c"], -1), f"{m} after {last.get(m['c'])}"
                last[m["c"]] = m["n"]


@contextmanager
def source_on_rings(url: str, *, rings: int = 2, capacity: int = 1 << 12,
                    policy: str = "pause", pause: float = 0.0,
                    max_records: int = 64) -> Iterator[tuple[SourceProcess, RingReader]]:
    """A :class:`SourceProcess` for ``url`` writing into ``rings`` new rings of ``capacity``
    bytes under ``policy``, read by a :class:`RingReader`; stopped and freed at the end."""
    made = [Ring.create(unique("lossless"), capacity, full_policy=policy) for _ in range(rings)]
    reader = RingReader(made, max_records=max_records, pause=pause).start()
    proc = SourceProcess(url, [r.name for r in made])
    try:
        proc.start()
        yield proc, reader
    finally:
        try:
            assert proc.stop() == 0, proc.error
        finally:
            reader.stop()
            for r in made:
                assert r.dropped == 0, f"ring {r.name} dropped {r.dropped} frames"
                r.close()
                r.unlink()


def wait_for(predicate: object, timeout: float = 30.0, what: str = "condition",
             info: object = None) -> None:
    """Poll ``predicate()`` until true; fail after ``timeout`` s, with ``info()`` if given."""
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            extra = info() if callable(info) else ""
            raise AssertionError(f"timed out waiting for {what} {extra}")
        time.sleep(0.01)


def check_held_back_then_acked(url: str, n: int, *, pause: float, max_records: int) -> None:
    """Run an at-least-once source ``url`` on small rings read slower than it delivers (the
    rings fill): every one of the ``n`` published frames is written once, in order, and
    acknowledged; the source paused and dropped, handed back or repeated nothing."""
    with source_on_rings(url, pause=pause, max_records=max_records) as (proc, reader):
        wait_for(lambda: reader.count() >= n, 90, "every frame", proc.counters)
        wait_for(lambda: proc.counters()["acked"] >= n, what="acknowledgements")
    c = proc.counters()
    assert c["ring_drops"] == 0 and c["pauses"] >= 1 and c["backpressure_us"] > 0, c
    assert c["frames"] == n and c["acked"] == n, c
    assert c["nacked"] == 0 and c["duplicates"] == 0 and c["redelivered"] == 0, c
    assert sorted(reader.numbers()) == list(range(n)) and reader.gaps == 0
    reader.check_order()
