"""What the feed tests share: the simulator's settings, captures written by hand, and a
check that no test leaves a shared-memory segment behind.

A test module takes the check with ``from tests.feedcheck import no_segments_left`` (an
autouse fixture: importing it is enough).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fastfeed import shm
from fastfeed.capture import MAGIC, RECORD
from fastfeed.config import Settings, load_settings
from fastfeed.sim.process import SimulatorProcess


def our_segments() -> set[str]:
    """fastfeed segments owned by this process (commands run as subprocesses are checked
    by their own pid; other test runs on the machine may own segments too)."""
    return {n for n in os.listdir(shm.SHM_DIR) if n.startswith(f"fastfeed.{os.getpid()}.")}


@pytest.fixture(autouse=True)
def no_segments_left() -> Iterator[None]:
    before = our_segments()
    yield
    left = our_segments() - before
    shm.cleanup_stale()
    assert not left, f"shared-memory segments left behind: {left}"


def settings_for(sim: SimulatorProcess, tmp_path: Path, **extra: Any) -> Settings:
    """Settings for a simulator, with a token cache in the test's own directory."""
    return load_settings(sim.settings_args(token_cache=str(tmp_path / "token.json"), **extra),
                         env={})


def write_capture(path: Path, frames: Iterable[bytes], *, t0: int = 1_700_000_000_000_000,
                  step_us: int = 1) -> Path:
    """A capture file of ``frames`` in order: frame i received at ``t0 + i * step_us``,
    sequence number i."""
    with open(path, "wb") as f:
        f.write(MAGIC)
        for i, p in enumerate(frames):
            f.write(RECORD.pack(len(p), 0, t0 + i * step_us, i) + p)
    return path
