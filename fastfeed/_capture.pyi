"""Type stub for the extension fastfeed._capture (source: ext/capture.pyx)."""

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from typing_extensions import Buffer

DONE: int
FULL: int
PACED: int
BUDGET: int

def route_frame(frame: Buffer) -> int: ...
def routes(data: Buffer, offsets: npt.ArrayLike, lengths: npt.ArrayLike) -> npt.NDArray[np.int32]: ...
def scan(
    data: Buffer, pos: int = 8, max_records: int = ..., last_seq: int = -1
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64], int, int, int, int]: ...

class CaptureReader:
    frames: int
    bytes: int
    control: int
    ring_drops: int
    repeats: int
    torn: int
    def __init__(self, buffers: Sequence[Buffer]) -> None: ...
    @property
    def next_ts(self) -> int | None: ...
    def pump(self, addresses: Sequence[int], max_frames: int, until_ts: int, pause: bool,
             control_address: int = 0) -> int: ...
