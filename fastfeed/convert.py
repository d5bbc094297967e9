"""Decoded arrays to pandas, Arrow and Polars, with symbol codes and datetimes.

Each function takes one structured array (ticks, quotes or bars, as a batch gives
them) and the tables that map its ids to codes (``feed.symbols``, ``feed.statuses``,
``feed.bar_types``, or a Decoder's).  ``sym``/``status``/``bar_type`` become
categorical (dictionary) columns of codes; every int64 µs time column becomes a
datetime64[us] (NaT where the feed sent none).  pandas, pyarrow and polars are
optional: install the one you use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["to_arrow", "to_pandas", "to_polars"]

TIME_FIELDS = ("ts", "bar_end", "last_update", "recv_ts")
CODE_FIELDS = ("sym", "status", "bar_type")


def _tables(symbols: Sequence[str] | None, statuses: Sequence[str] | None,
            bar_types: Sequence[str] | None) -> dict[str, list[str] | None]:
    return {"sym": list(symbols) if symbols is not None else None,
            "status": list(statuses) if statuses is not None else None,
            "bar_type": list(bar_types) if bar_types is not None else None}


def to_pandas(arr: np.ndarray, symbols: Sequence[str] | None = None,
              statuses: Sequence[str] | None = None, bar_types: Sequence[str] | None = None) -> Any:
    """A pandas DataFrame of the rows (copies the data)."""
    import pandas as pd

    tables = _tables(symbols, statuses, bar_types)
    cols: dict[str, Any] = {}
    for name in arr.dtype.names:
        col = arr[name]
        if name in TIME_FIELDS:
            cols[name] = col.view("M8[us]").copy()
        elif name in CODE_FIELDS and tables[name] is not None:
            # interned tables hold each code once, as categories must
            cols[name] = pd.Categorical.from_codes(col.astype(np.int64), categories=tables[name])
        else:
            cols[name] = col.copy()
    return pd.DataFrame(cols)


def to_arrow(arr: np.ndarray, symbols: Sequence[str] | None = None,
             statuses: Sequence[str] | None = None, bar_types: Sequence[str] | None = None) -> Any:
    """A pyarrow Table of the rows: timestamp[us] times, dictionary-encoded codes."""
    import pyarrow as pa

    tables = _tables(symbols, statuses, bar_types)
    cols, names = [], []
    for name in arr.dtype.names:
        col = np.ascontiguousarray(arr[name])
        if name in TIME_FIELDS:
            a = pa.array(col.view("M8[us]"), type=pa.timestamp("us"))
        elif name in CODE_FIELDS and tables[name] is not None:
            a = pa.DictionaryArray.from_arrays(pa.array(col.astype(np.int32)), pa.array(tables[name], pa.string()))
        else:
            a = pa.array(col)
        cols.append(a)
        names.append(name)
    return pa.Table.from_arrays(cols, names=names)


def to_polars(arr: np.ndarray, symbols: Sequence[str] | None = None,
              statuses: Sequence[str] | None = None, bar_types: Sequence[str] | None = None) -> Any:
    """A polars DataFrame of the rows (through Arrow)."""
    import polars as pl

    return pl.from_arrow(to_arrow(arr, symbols, statuses, bar_types))
