"""Type stub for the extension fastfeed._decoder (sources: ext/decoder.pyx, ext/decode.h,
ext/symtab.h)."""

from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from typing_extensions import Buffer

TICK_DTYPE: np.dtype[np.void]
QUOTE_DTYPE: np.dtype[np.void]
BAR_DTYPE: np.dtype[np.void]
NAT: int
DEFAULT_MAX_SYMBOLS: int
DEFAULT_MAX_BAR_TYPES: int
MAX_STATUSES: int
MAX_BAR_TYPES: int
MAX_CODE_BYTES: int
SIMD_LEVELS: tuple[str, ...]

def now_us() -> int:
    """The current CLOCK_REALTIME time in int64 microseconds, as stamped on frames."""

class SymbolTable:
    """An append-only table of codes to int ids, private or laid over shared memory."""

    def __init__(self, buffer: Buffer | None = None, *, capacity: int = 65536,
                 reserve_empty: bool = False) -> None: ...
    @staticmethod
    def nbytes(capacity: int = 65536) -> int: ...
    @property
    def capacity(self) -> int: ...
    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> str: ...
    def __iter__(self) -> Iterator[str]: ...
    def intern(self, code: str) -> int: ...
    def to_list(self) -> list[str]: ...

class Batch:
    """What one decode call of the extension produced; the arrays belong to the batch.
    Internal: the package's :class:`fastfeed.Batch` (``fastfeed.batch``) wraps it, and is what
    ``fastfeed.Decoder``, a Feed and a handler give."""

    @property
    def ticks(self) -> npt.NDArray[np.void]: ...
    @property
    def quotes(self) -> npt.NDArray[np.void]: ...
    @property
    def bars(self) -> npt.NDArray[np.void]: ...
    @property
    def errors(self) -> list[tuple[int, str]]: ...
    @property
    def control(self) -> list[bytes]: ...
    gaps: int
    """Frames dropped before this batch's (a dropping full policy); 0 when lossless."""
    @property
    def frames(self) -> int: ...
    @property
    def rows(self) -> int: ...

class Decoder:
    """Configure once, decode many batches.  A frame that fails adds no code to the tables."""

    symbols: SymbolTable
    statuses: SymbolTable
    bar_types: SymbolTable
    last_errors: deque[tuple[str, bytes]]
    frames_total: int
    errors_total: int
    control_total: int
    """Control messages (valid JSON that is not market data), counted per message: an array
    frame counts each such element, ``[]`` none."""
    symbols_full_total: int
    """Frames that failed because the symbol, status or bar-type table they needed a new
    code in was full (each also counts in ``errors_total``)."""
    rows_total: int

    def __init__(self, *, symbols: SymbolTable | None = None, statuses: SymbolTable | None = None,
                 bar_types: SymbolTable | None = None, error_store: int = 100,
                 max_symbols: int = 65536, max_statuses: int = 256, max_bar_types: int = 4096,
                 ) -> None: ...
    def decode(self, frames: Iterable[Buffer], recv_ts: int | Sequence[int] | npt.ArrayLike | None = None,
               ) -> Batch: ...
    def decode_buffer(self, data: Buffer, recv_ts: int | None = None) -> Batch: ...
    def decode_region(self, buffer: Buffer, offsets: npt.ArrayLike, lengths: npt.ArrayLike,
                      recv_ts: npt.ArrayLike, count: int = -1) -> Batch: ...
    def stats(self) -> dict[str, Any]: ...
    @property
    def simd(self) -> str:
        """The vector unit the structure-first paths use: one of ``SIMD_LEVELS``, the best
        the CPU has or at most what ``FASTFEED_SIMD`` names."""
        ...

def record_latency(counts: npt.NDArray[np.int64], now: int, rows: npt.NDArray[np.void],
                   log_growth: float, field: str = "recv_ts") -> tuple[int, int]:
    """Add ``now - rows[field]`` of every row to log-spaced latency buckets; (rows, max)."""
