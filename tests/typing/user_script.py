"""What a user writes, checked with ``mypy --strict`` by tests/test_typing.py: every name
here must be typed (no Any leaking from the package) and every call must check."""

from __future__ import annotations

import argparse

import numpy as np
import numpy.typing as npt

import fastfeed
from fastfeed import (
    Batch,
    BatchReleasedError,
    Decoder,
    Feed,
    FeedError,
    Kinds,
    Settings,
    load_settings,
)
from fastfeed.cli_common import add_settings_arguments, settings_from_args
from fastfeed.convert import Kind, to_arrow


def settings_from_cli(argv: list[str]) -> Settings:
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    return settings_from_args(parser.parse_args(argv))


def handle(worker: int, batch: Batch) -> None:
    prices: npt.NDArray[np.float64] = batch.ticks["price"]
    print(worker, batch.seq, float(prices.sum()) if len(prices) else 0.0)


def mean_price(batch: Batch) -> float:
    ticks = batch.ticks
    return float(ticks["price"].mean()) if len(ticks) else float("nan")


def consume(feed: Feed) -> list[Batch]:
    kept: list[Batch] = []
    for batch in feed:
        first, end = batch.seq
        n: int = batch.rows + batch.frames + batch.gaps + batch.worker + first + end
        for seq, reason in batch.errors:
            print(f"frame {seq}: {reason} ({n})")
        for message in batch.control:
            print(message.decode())
        kind: Kind
        for kind, rows in batch.items():
            print(kind, len(rows), mean_price(batch))
        kept.append(batch.copy())
        if batch.released:
            raise RuntimeError("unreachable")
    return kept


def convert(batch: Batch, feed: Feed) -> None:
    frames: Kinds[object] = batch.to_pandas()
    print(frames.ticks, batch.to_arrow("quotes"), batch.to_polars("bars", tz=None))
    print(feed.to_pandas(batch.ticks), to_arrow(batch.bars, feed.symbols))
    code: str = feed.symbols[0]
    print(code, len(feed.statuses), list(feed.bar_types))


def main() -> int:
    settings = load_settings({"host": "http://127.0.0.1:1", "email": "ops@example.com"})
    assert settings_from_cli(["--host", "http://127.0.0.1:1"]) is not None
    decoded: Batch = Decoder().decode([b'{"c":"A:B","t":1.5,"p":2,"v":3}'])
    try:
        decoded.release()
        print(len(decoded.ticks))
    except BatchReleasedError as exc:
        print(exc)
    try:
        with Feed(settings, workers=0, handler=handle, idle_timeout=5.0) as feed:
            kept = consume(feed)
            b = feed.poll(0.1)
            if b is not None:
                convert(b, feed)
            stats: dict[str, object] = feed.stats()
            print(len(kept), stats["frames"], feed.staleness(), fastfeed.__version__)
    except FeedError as exc:
        print(exc)
        return 1
    return 0
