"""Converters on the batch and the feed: categoricals, UTC times, nulls for absent values."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import numpy as np
import pytest

from fastfeed import NAT, Decoder
from fastfeed.config import load_settings
from fastfeed.convert import kind_of, to_arrow
from fastfeed.feed import Feed
from fastfeed.sim.process import SimulatorProcess

pd = pytest.importorskip("pandas")
pa = pytest.importorskip("pyarrow")
pl = pytest.importorskip("polars")

FRAMES = [
    b'{"c":"NASDAQ:AAPL","t":1749462520.177003,"p":242.89,"v":200.0}',
    b'{"c":"NASDAQ:MSFT","t":1749462521.5,"p":470.1}',  # no volume
    # a quote with a status, one without (and without bid/ask)
    b'{"c":"NASDAQ:AAPL","ss":"OPEN","lt":1733432340.0,"v":533779.0,"lp":243.08,"a":243.09,'
    b'"b":243.08,"as":520.0,"bs":430.0}',
    b'{"c":"NASDAQ:MSFT","lt":1733432341.0,"lp":470.0}',
    # bars with a type and end, and without
    b'{"c":"NASDAQ:AAPL","be":1733432399.0,"lu":1733432399820,"bt":"1m","s":[{"t":1733432340.0,'
    b'"o":242.89,"h":243.09,"l":242.82,"c":243.08,"v":533779.0}]}',
    b'{"c":"NASDAQ:MSFT","s":[{"t":1733432340.0,"c":470.0}]}',
]
RECV = 1_749_462_530_000_000


@pytest.fixture(scope="module")
def batch():
    b = Decoder().decode(FRAMES, recv_ts=RECV)
    assert (len(b.ticks), len(b.quotes), len(b.bars), len(b.errors)) == (2, 2, 2, 0)
    return b


def test_pandas_utc_times_and_categorical_codes(batch):
    t = batch.to_pandas("ticks")
    assert str(t["ts"].dtype) == "datetime64[us, UTC]"
    assert t["ts"][0] == pd.Timestamp("2025-06-09 09:48:40.177003", tz="UTC")
    assert t["recv_ts"][0] == pd.Timestamp(RECV, unit="us", tz="UTC")
    assert isinstance(t["sym"].dtype, pd.CategoricalDtype)
    assert t["sym"].tolist() == ["NASDAQ:AAPL", "NASDAQ:MSFT"]
    assert np.isnan(t["volume"][1])  # not sent: NA
    q = batch.to_pandas("quotes")
    assert q["status"].tolist()[0] == "OPEN" and pd.isna(q["status"][1])  # absent: NA, not ""
    assert "" not in q["status"].cat.categories
    assert pd.isna(q["bid"][1]) and pd.isna(q["ask"][1])
    b = batch.to_pandas("bars")
    assert b["bar_type"].tolist()[0] == "1m" and pd.isna(b["bar_type"][1])
    assert pd.isna(b["bar_end"][1]) and b["bar_end"][0] == pd.Timestamp(1733432399, unit="s",
                                                                      tz="UTC")
    # all three kinds at once, as a named tuple
    all3 = batch.to_pandas()
    assert [len(x) for x in all3] == [2, 2, 2] and all3.quotes.equals(q)


def test_pandas_naive_and_other_zones(batch):
    t = batch.to_pandas("ticks", tz=None)
    assert str(t["ts"].dtype) == "datetime64[us]"
    assert t["ts"][0] == pd.Timestamp("2025-06-09 09:48:40.177003")
    ny = batch.to_pandas("ticks", tz="America/New_York")
    assert ny["ts"][0] == pd.Timestamp("2025-06-09 05:48:40.177003", tz="America/New_York")


def test_arrow_has_nulls_for_absent_fields(batch):
    q = batch.to_arrow("quotes")
    assert q.schema.field("ts").type == pa.timestamp("us", tz="UTC")
    assert pa.types.is_dictionary(q.schema.field("sym").type)
    assert q.column("status").to_pylist() == ["OPEN", None]
    assert q.column("bid").to_pylist()[1] is None and q.column("bid").null_count == 1
    b = batch.to_arrow("bars")
    assert b.column("bar_end").to_pylist()[1] is None
    assert b.column("bar_type").to_pylist() == ["1m", None]
    assert b.column("open").to_pylist()[1] is None
    t = batch.to_arrow("ticks")
    assert t.column("ts").to_pylist()[0] == dt.datetime(2025, 6, 9, 9, 48, 40, 177003,
                                                         tzinfo=dt.UTC)
    assert t.column("volume").to_pylist() == [200.0, None]
    assert batch.to_arrow("ticks", tz=None).schema.field("ts").type == pa.timestamp("us")


def test_polars_categoricals_utc_and_nulls(batch):
    q = batch.to_polars("quotes")
    assert q.schema["sym"] == pl.Categorical
    assert q.schema["ts"] == pl.Datetime("us", "UTC")
    assert q["status"].to_list() == ["OPEN", None]
    assert q["bid"].null_count() == 1
    assert batch.to_polars("bars")["bar_type"].to_list() == ["1m", None]
    assert [len(x) for x in batch.to_polars()] == [2, 2, 2]


def test_times_the_feed_did_not_send_are_null_everywhere():
    b = Decoder().decode([b'{"c":"X","p":1}'], recv_ts=RECV)  # a tick with no time
    assert b.ticks["ts"][0] == NAT
    assert pd.isna(b.to_pandas("ticks")["ts"][0])
    assert b.to_arrow("ticks").column("ts").null_count == 1
    assert b.to_polars("ticks")["ts"].null_count() == 1


def test_kind_is_known_from_the_dtype(batch):
    assert [kind_of(a) for _k, a in batch.items()] == ["ticks", "quotes", "bars"]
    with pytest.raises(TypeError, match="not a fastfeed row array"):
        kind_of(np.zeros(3))
    # categories are the whole table: frames of successive batches share them
    assert to_arrow(batch.ticks, ["NASDAQ:AAPL", "NASDAQ:MSFT", "Z"]).column(
        "sym").chunk(0).dictionary.to_pylist() == ["NASDAQ:AAPL", "NASDAQ:MSFT", "Z"]


def test_the_feed_converts_rows_kept_past_its_batches(tmp_path: Path):
    with SimulatorProcess("--rate", "0", "--count", "3000", "--symbols", "10") as sim:
        settings = load_settings(sim.settings_args(token_cache=str(tmp_path / "t.json")), env={})
        kept = []
        with Feed(settings, workers=1) as feed:
            got, deadline = 0, time.monotonic() + 60
            while got < 3000 and time.monotonic() < deadline:
                b = feed.poll(0.5)
                if b is not None:
                    got += b.frames
                    kept.append(b.ticks.copy())
        sim.stop()
    rows = np.concatenate(kept)
    df = feed.to_pandas(rows)  # after stop: the codes outlive the shared tables
    assert len(df) == len(rows) > 0 and df["sym"].notna().all()
    assert set(df["sym"].astype(str)) <= set(feed.symbols)
    assert str(df["ts"].dtype) == "datetime64[us, UTC]"
    assert feed.to_polars(rows).height == len(rows)
    assert feed.to_arrow(rows).num_rows == len(rows)
