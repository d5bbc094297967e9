"""Decoded arrays to pandas, Arrow and Polars: codes as categoricals, times as UTC datetimes.

Each function takes one structured array (ticks, quotes or bars, as a batch gives them) and
the tables that map its ids to codes (``feed.symbols``, ``feed.statuses``,
``feed.bar_types``, or a Decoder's). Most callers use the methods of a batch instead
(``batch.to_pandas()``), which know their tables.

- ``sym``, ``status`` and ``bar_type`` become categorical (Arrow: dictionary) columns whose
  categories are the whole table, in id order, so that the frames of successive batches
  share them and concatenate cheaply. An absent status or bar type (id 0) is missing (NA /
  null), not a category ``""``.
- Every int64 µs time column (``ts``, ``bar_end``, ``last_update``, ``recv_ts``) becomes a
  timezone-aware UTC datetime (``tz=None``: naive, as NumPy's ``datetime64[us]``; any other
  zone name converts to that zone). A time the feed did not send is NaT / null.
- A price or size the feed did not send is NaN in the arrays; it is NaN in pandas (its missing
  value for float64) and null in Arrow and Polars.

pandas, pyarrow and polars are optional: install the one you use (polars goes through Arrow
and needs pyarrow too). Every conversion copies the rows: the result stays valid after the
batch is released.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from ._decoder import BAR_DTYPE, NAT, QUOTE_DTYPE, TICK_DTYPE

__all__ = ["KIND_DTYPES", "Kind", "kind_of", "to_arrow", "to_pandas", "to_polars"]

Kind = Literal["ticks", "quotes", "bars"]
KIND_DTYPES: dict[Kind, np.dtype[np.void]] = {"ticks": TICK_DTYPE, "quotes": QUOTE_DTYPE,
                                              "bars": BAR_DTYPE}
TIME_FIELDS = ("ts", "bar_end", "last_update", "recv_ts")
# Fields that are ids into a table; for the last two, id 0 means "absent".
CODE_FIELDS = ("sym", "status", "bar_type")
_ABSENT_ZERO = ("status", "bar_type")


def kind_of(arr: npt.NDArray[Any]) -> Kind:
    """Which kind of rows ``arr`` holds, from its dtype."""
    for kind, dt in KIND_DTYPES.items():
        if arr.dtype == dt:
            return kind
    raise TypeError(f"not a fastfeed row array (ticks, quotes or bars): dtype {arr.dtype}")


def _tables(symbols: Iterable[str] | None, statuses: Iterable[str] | None,
            bar_types: Iterable[str] | None) -> dict[str, list[str] | None]:
    return {"sym": list(symbols) if symbols is not None else None,
            "status": list(statuses) if statuses is not None else None,
            "bar_type": list(bar_types) if bar_types is not None else None}


def _codes(name: str, col: npt.NDArray[Any], table: list[str]) -> tuple[npt.NDArray[np.int32],
                                                                       list[str]]:
    """(codes into the categories, categories): -1 is missing. Statuses and bar types drop
    their id 0 ("", absent) so that it is missing rather than a category."""
    codes = col.astype(np.int32)
    if name in _ABSENT_ZERO:
        return codes - 1, table[1:]
    return codes, table


def to_pandas(arr: npt.NDArray[Any], symbols: Iterable[str] | None = None,
              statuses: Iterable[str] | None = None, bar_types: Iterable[str] | None = None,
              *, tz: str | None = "UTC") -> Any:
    """A pandas DataFrame of the rows (a copy). See the module's notes for the types."""
    import pandas as pd

    tables = _tables(symbols, statuses, bar_types)
    cols: dict[str, Any] = {}
    for name in arr.dtype.names or ():
        col = arr[name]
        table = tables.get(name)
        if name in TIME_FIELDS:
            idx = pd.DatetimeIndex(col.view("M8[us]"))  # NaT where the feed sent no time
            if tz is not None:
                idx = idx.tz_localize("UTC")
                if tz != "UTC":
                    idx = idx.tz_convert(tz)
            cols[name] = idx
        elif table is not None:
            codes, cats = _codes(name, col, table)
            cols[name] = pd.Categorical.from_codes(codes, categories=cats)
        else:
            cols[name] = col.copy()
    return pd.DataFrame(cols)


def to_arrow(arr: npt.NDArray[Any], symbols: Iterable[str] | None = None,
             statuses: Iterable[str] | None = None, bar_types: Iterable[str] | None = None,
             *, tz: str | None = "UTC") -> Any:
    """A pyarrow Table of the rows: ``timestamp[us, tz]`` times, dictionary-encoded codes,
    nulls for absent values. See the module's notes."""
    import pyarrow as pa

    tables = _tables(symbols, statuses, bar_types)
    cols, names = [], []
    for name in arr.dtype.names or ():
        col = np.ascontiguousarray(arr[name])
        table = tables.get(name)
        if name in TIME_FIELDS:
            a = pa.array(col, pa.int64(), mask=col == NAT).cast(pa.timestamp("us", tz=tz))
        elif table is not None:
            codes, cats = _codes(name, col, table)
            a = pa.DictionaryArray.from_arrays(pa.array(codes, pa.int32(), mask=codes < 0),
                                               pa.array(cats, pa.string()))
        elif col.dtype.kind == "f":
            a = pa.array(col, from_pandas=True)  # NaN (not sent) -> null
        else:
            a = pa.array(col)
        cols.append(a)
        names.append(name)
    return pa.Table.from_arrays(cols, names=names)


def to_polars(arr: npt.NDArray[Any], symbols: Iterable[str] | None = None,
              statuses: Iterable[str] | None = None, bar_types: Iterable[str] | None = None,
              *, tz: str | None = "UTC") -> Any:
    """A polars DataFrame of the rows (through Arrow): Categorical codes, ``Datetime("us",
    tz)`` times, nulls for absent values."""
    import polars as pl

    return pl.from_arrow(to_arrow(arr, symbols, statuses, bar_types, tz=tz))
