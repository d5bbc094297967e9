"""The one batch type: what a Feed hands over in every mode, a handler gets, a Decoder returns.

A :class:`Batch` holds the rows decoded from a run of consecutive frames of one ring (one
worker's share of the symbols), plus what those frames said that is not rows:

- ``ticks``, ``quotes``, ``bars``: NumPy structured arrays (``TICK_DTYPE``, ``QUOTE_DTYPE``,
  ``BAR_DTYPE``), set once when the batch is made: the same array object at every access.
  With workers they are read-only zero-copy views into the output ring's shared memory (a
  kind that arrived in several pieces is joined once, into an array of its own); inline and
  from a :class:`Decoder` the batch owns them.
- ``rows``, ``frames``: rows in all, frames they came from (every frame gives rows, an error
  or a control message).
- ``errors``: ``(seq, reason)`` per frame that failed to decode; ``control``: the raw bytes of
  each non-market message (status and error objects the server sent).
- ``worker``, ``seq``: the ring (worker) the frames came through and their half-open range of
  sequence numbers ``[first, end)`` in it; for a standalone decode, worker 0 and ``(0,
  frames)``, so an error's ``seq`` is the frame's index.
- ``gaps``: frames of this ring dropped just before these (a dropping ``full_policy``); 0 when
  lossless.

Control messages the network process took off the connection (they never enter a ring) ride
on the next batch the Feed hands over; when no rows come, on a batch of their own, with
``frames == 0``.

**Lifetime.** A batch from a Feed is valid until it is *released*: by the next
:meth:`Feed.poll` (the next step of ``for batch in feed``), by :meth:`Feed.stop`, or by
:meth:`Batch.release` (``with batch:``). With workers its arrays are views of ring memory that
the workers write the next rows into once it is released; so a released batch refuses to
give its arrays out (:class:`BatchReleasedError`) rather than show rows that are no longer
its own. ``batch.copy()`` gives a batch that owns its arrays and is never released: use the
views while you handle the batch, ``copy()`` what you keep past it. Arrays taken out of a
batch (``t = batch.ticks``) are the same views: they follow the same rule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, Protocol, TypeVar, overload

import numpy as np
import numpy.typing as npt

from . import _decoder
from ._decoder import BAR_DTYPE, QUOTE_DTYPE, TICK_DTYPE
from .convert import Kind, to_arrow, to_pandas, to_polars

if TYPE_CHECKING:
    # Only for the annotations: each library is optional (and pandas and pyarrow ship no
    # types; without their stubs these are Any).
    import pandas as pd
    import polars as pl
    import pyarrow as pa
    from typing_extensions import Buffer

__all__ = ["Batch", "BatchReleasedError", "Decoder", "Kinds", "Tables"]

T = TypeVar("T")
Rows = npt.NDArray[np.void]

# One shared empty array per kind for batches that lack it (zero rows: nothing to change).
_EMPTY: dict[str, Rows] = {"ticks": np.empty(0, TICK_DTYPE), "quotes": np.empty(0, QUOTE_DTYPE),
                           "bars": np.empty(0, BAR_DTYPE)}
for _a in _EMPTY.values():
    _a.flags.writeable = False


class BatchReleasedError(RuntimeError):
    """A released batch's arrays were asked for: its memory belongs to newer rows now."""


class Tables(Protocol):
    """Where a batch finds the codes its ids stand for (a Feed, a Decoder)."""

    @property
    def symbols(self) -> Iterable[str] | None: ...
    @property
    def statuses(self) -> Iterable[str] | None: ...
    @property
    def bar_types(self) -> Iterable[str] | None: ...


class Kinds(NamedTuple, Generic[T]):
    """One value per kind of rows (what the converters give without a ``kind``)."""

    ticks: T
    quotes: T
    bars: T


class Batch:
    """Decoded rows of consecutive frames of one ring, with their errors and control messages.

    See the module's notes for every field and the lifetime rule: valid until released
    (:attr:`released`); :meth:`copy` keeps the rows past that.
    """

    __slots__ = ("_ticks", "_quotes", "_bars", "rows", "frames", "errors", "control", "worker",
                 "_first", "_end", "gaps", "_tables", "_owner", "__weakref__")

    rows: int
    frames: int
    errors: list[tuple[int, str]]
    control: list[bytes]
    worker: int
    gaps: int

    def __init__(self, ticks: Rows | None = None, quotes: Rows | None = None,
                 bars: Rows | None = None, *, frames: int = 0,
                 errors: list[tuple[int, str]] | None = None,
                 control: list[bytes] | None = None, worker: int = 0,
                 seq: tuple[int, int] = (0, 0), gaps: int = 0, tables: Tables | None = None,
                 owner: Any = None) -> None:
        self._ticks: Rows | None = _EMPTY["ticks"] if ticks is None else ticks
        self._quotes: Rows | None = _EMPTY["quotes"] if quotes is None else quotes
        self._bars: Rows | None = _EMPTY["bars"] if bars is None else bars
        self.rows = len(self._ticks) + len(self._quotes) + len(self._bars)
        self.frames = frames
        self.errors = [] if errors is None else errors
        self.control = [] if control is None else control
        self.worker = worker
        self._first, self._end = seq
        self.gaps = gaps
        self._tables = tables
        # What gives the memory back when the batch is released (an output ring's read), or
        # None when the batch owns its arrays.
        self._owner = owner

    @classmethod
    def from_decoded(cls, res: _decoder.Batch, *, worker: int = 0,
                     seqs: npt.NDArray[np.uint64] | None = None, gaps: int = 0,
                     tables: Tables | None = None) -> Batch:
        """A batch of what a decoder returned (it owns the arrays). ``seqs``: the ring
        sequence number of each frame decoded, to number the errors and set ``seq``."""
        # Slots set directly: this runs once per batch on the consumer's path, and a call
        # with keywords would cost twice as much.
        b = cls.__new__(cls)
        b._ticks = t = res.ticks
        b._quotes = q = res.quotes
        b._bars = r = res.bars
        b.rows = len(t) + len(q) + len(r)
        b.frames = n = res.frames
        errors = res.errors
        if seqs is not None and n:
            if errors:
                errors = [(int(seqs[i]), reason) for i, reason in errors]
            b._first = int(seqs[0])
            b._end = int(seqs[n - 1]) + 1
        else:
            b._first, b._end = 0, n
        b.errors = errors
        b.control = res.control
        b.worker = worker
        b.gaps = gaps
        b._tables = tables
        b._owner = None
        return b

    @property
    def seq(self) -> tuple[int, int]:
        """``(first, end)``: the sequence numbers of the batch's frames in their ring."""
        return (self._first, self._end)

    # -- the arrays ---------------------------------------------------------------------------

    def _gone(self, what: str) -> BatchReleasedError:
        return BatchReleasedError(
            f"batch.{what}: this batch (worker {self.worker}, frames {self.seq[0]}..{self.seq[1]})"
            f" was released and its memory now holds newer rows; take batch.copy() before "
            f"the next poll to keep rows")

    @property
    def ticks(self) -> Rows:
        """Tick rows (``TICK_DTYPE``)."""
        a = self._ticks
        if a is None:
            raise self._gone("ticks")
        return a

    @property
    def quotes(self) -> Rows:
        """Quote rows (``QUOTE_DTYPE``)."""
        a = self._quotes
        if a is None:
            raise self._gone("quotes")
        return a

    @property
    def bars(self) -> Rows:
        """Bar rows (``BAR_DTYPE``)."""
        a = self._bars
        if a is None:
            raise self._gone("bars")
        return a

    def __getitem__(self, kind: Kind) -> Rows:
        """``batch["ticks"]`` is ``batch.ticks``."""
        if kind == "ticks":
            return self.ticks
        if kind == "quotes":
            return self.quotes
        if kind == "bars":
            return self.bars
        raise KeyError(f"{kind!r}: a batch holds 'ticks', 'quotes' and 'bars'")

    def items(self) -> Iterable[tuple[Kind, Rows]]:
        """``(kind, rows)`` for each kind, empty ones included."""
        return (("ticks", self.ticks), ("quotes", self.quotes), ("bars", self.bars))

    # -- lifetime -----------------------------------------------------------------------------

    @property
    def released(self) -> bool:
        """True once the batch has been released: its arrays are then refused."""
        return self._ticks is None

    @property
    def owned(self) -> bool:
        """True if the batch owns its arrays (inline, a decoder's, a copy); False while they
        are views into an output ring."""
        return self._owner is None

    def release(self) -> None:
        """Give the batch's memory back (the Feed does it at the next poll). Idempotent;
        ``errors``, ``control`` and the counts stay readable."""
        if self._ticks is None:
            return
        self._ticks = self._quotes = self._bars = None
        owner, self._owner = self._owner, None
        if owner is not None:
            owner.release()

    def copy(self) -> Batch:
        """A batch that owns copies of the arrays and is never released by the Feed: what
        to keep past the next poll."""
        if self._ticks is None:
            raise self._gone("copy()")
        assert self._quotes is not None and self._bars is not None
        return Batch(_owned(self._ticks), _owned(self._quotes), _owned(self._bars),
                     frames=self.frames, errors=list(self.errors), control=list(self.control),
                     worker=self.worker, seq=(self._first, self._end), gaps=self.gaps,
                     tables=self._tables)

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def __repr__(self) -> str:
        state = " released" if self._ticks is None else ""
        counts = ("" if self._ticks is None or self._quotes is None or self._bars is None else
                  f" ticks={len(self._ticks)} quotes={len(self._quotes)} bars={len(self._bars)}")
        return (f"<Batch worker={self.worker} seq={self.seq[0]}..{self.seq[1]} "
                f"frames={self.frames}{counts} errors={len(self.errors)} "
                f"control={len(self.control)} gaps={self.gaps}{state}>")

    # -- conversions --------------------------------------------------------------------------

    def _convert(self, fn: Callable[..., Any], kind: Kind | None, tz: str | None) -> Any:
        t = self._tables
        tables = (t.symbols, t.statuses, t.bar_types) if t is not None else (None, None, None)
        if kind is not None:
            return fn(self[kind], *tables, tz=tz)
        return Kinds(*(fn(a, *tables, tz=tz) for _k, a in self.items()))

    @overload
    def to_pandas(self, kind: Kind, *, tz: str | None = "UTC") -> pd.DataFrame: ...
    @overload
    def to_pandas(self, kind: None = None, *, tz: str | None = "UTC") -> Kinds[pd.DataFrame]: ...
    def to_pandas(self, kind: Kind | None = None, *, tz: str | None = "UTC") -> Any:
        """pandas DataFrames (copies): ``to_pandas("ticks")`` one, ``to_pandas()`` a
        :class:`Kinds` of three. Symbols, statuses and bar types are categoricals; times
        UTC-aware (``tz=None``: naive); absent values NA. See :mod:`fastfeed.convert`."""
        return self._convert(to_pandas, kind, tz)

    @overload
    def to_arrow(self, kind: Kind, *, tz: str | None = "UTC") -> pa.Table: ...
    @overload
    def to_arrow(self, kind: None = None, *, tz: str | None = "UTC") -> Kinds[pa.Table]: ...
    def to_arrow(self, kind: Kind | None = None, *, tz: str | None = "UTC") -> Any:
        """pyarrow Tables (copies), as :meth:`to_pandas`; absent values are null."""
        return self._convert(to_arrow, kind, tz)

    @overload
    def to_polars(self, kind: Kind, *, tz: str | None = "UTC") -> pl.DataFrame: ...
    @overload
    def to_polars(self, kind: None = None, *, tz: str | None = "UTC") -> Kinds[pl.DataFrame]: ...
    def to_polars(self, kind: Kind | None = None, *, tz: str | None = "UTC") -> Any:
        """polars DataFrames (copies), as :meth:`to_arrow`."""
        return self._convert(to_polars, kind, tz)


class Decoder(_decoder.Decoder):
    """Decodes the feed's JSON frames into a :class:`Batch`. Configure once, decode many.

    The extension's decoder with results wrapped as the package's one :class:`Batch` (it owns
    its arrays; ``seq`` is ``(0, frames)`` and an error's number is the frame's index), whose
    converters use this decoder's tables.
    """

    def decode(self, frames: Iterable[Buffer],  # type: ignore[override]
               recv_ts: int | Sequence[int] | npt.ArrayLike | None = None) -> Batch:
        """Decode a sequence of frames (``bytes`` or any bytes-like object). ``recv_ts``:
        the receive time stamped on every row, int64 µs since the epoch: ``None`` for now,
        one int for all frames, or one per frame."""
        return Batch.from_decoded(super().decode(frames, recv_ts), tables=self)

    def decode_buffer(self, data: Buffer, recv_ts: int | None = None) -> Batch:  # type: ignore[override]
        """Decode newline-delimited frames (a capture, a file); frame numbers count the
        non-blank lines from 0."""
        return Batch.from_decoded(super().decode_buffer(data, recv_ts), tables=self)

    def decode_region(self, buffer: Buffer, offsets: npt.ArrayLike,  # type: ignore[override]
                      lengths: npt.ArrayLike, recv_ts: npt.ArrayLike, count: int = -1) -> Batch:
        """Decode ``count`` frames laid in ``buffer`` at ``offsets``/``lengths`` (a ring's
        records, read in place)."""
        return Batch.from_decoded(super().decode_region(buffer, offsets, lengths, recv_ts, count),
                                  tables=self)


def _owned(a: np.ndarray) -> np.ndarray:
    """An owned, writable copy that keeps every byte: NumPy copies structured rows field by
    field and leaves their padding uninitialized (stale memory, different every run)."""
    return np.ascontiguousarray(a).view(np.uint8).copy().view(a.dtype)
