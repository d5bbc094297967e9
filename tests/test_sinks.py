"""The Parquet sink's bounds, against a real stuck file: a FIFO nobody reads, in place of the
sink's next file, holds the writer thread in open() as a hung mount would."""

from __future__ import annotations

import os
import threading
import time

import pytest

from fastfeed import Decoder

pytest.importorskip("pyarrow")


def test_close_returns_within_its_bound_when_the_writer_is_stuck(tmp_path):
    from fastfeed.sinks import ParquetSink

    sink = ParquetSink(tmp_path, max_queue=2, put_timeout=0.05, row_group_rows=1,
                       flush_seconds=0.0)
    sink.close_timeout = 2.0
    fifo = tmp_path / "ticks-000001.parquet"
    os.mkfifo(fifo)  # the writer's first file: open() waits for a reader
    batch = Decoder().decode([b'{"c":"X","t":1749462520.5,"p":1.5,"v":100.0}'] * 10)
    try:
        for _ in range(8):  # the queue fills behind the stuck writer; the rest is dropped
            sink.write(batch)
        assert sink.dropped > 0
        outcome: list[BaseException | None] = []

        def close() -> None:
            try:
                sink.close()
                outcome.append(None)
            except BaseException as e:  # noqa: BLE001 - the test reads it
                outcome.append(e)

        t0 = time.monotonic()
        closer = threading.Thread(target=close, daemon=True)
        closer.start()
        closer.join(15.0)
        took = time.monotonic() - t0
        assert not closer.is_alive(), "close() did not return"
        assert took < 5.0, took
        assert isinstance(outcome[0], RuntimeError) and "did not finish within 2 s" in str(
            outcome[0]), outcome
    finally:
        # let the writer thread go: a reader opens the FIFO, the writer's open() returns
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        time.sleep(0.2)
        os.close(fd)
