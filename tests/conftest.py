"""Shared fixtures: the feed simulator as a real subprocess on a loopback port.

``start_sim(*args)`` runs ``python -m fastfeed sim --port 0 --json *args``, waits for its
``listening on http://HOST:PORT`` line and returns a :class:`SimProcess`; every simulator a
test starts is stopped (SIGTERM) when the test ends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fastfeed.sim.process import (  # noqa: F401  (re-exported for the tests)
    SIM_CLIENT_ID,
    SIM_SCOPE,
    SIM_SECRET,
    SIM_TENANT,
    SimulatorProcess,
)

ROOT = Path(__file__).resolve().parent.parent


class SimProcess(SimulatorProcess):
    """A running ``fastfeed sim`` subprocess (the product's own helper, with test defaults)."""

    def __init__(self, args: list[str]) -> None:
        super().__init__(*args)


@pytest.fixture
def start_sim() -> Iterator[Callable[..., SimProcess]]:
    """Factory fixture: ``start_sim("--rate", "0", ...)`` -> a running :class:`SimProcess`."""
    sims: list[SimProcess] = []

    def start(*args: str) -> SimProcess:
        sim = SimProcess(list(args))
        sims.append(sim)
        return sim

    yield start
    for sim in sims:
        try:
            sim.stop()
        except RuntimeError:
            pass


@pytest.fixture
def sim(start_sim: Callable[..., SimProcess]) -> SimProcess:
    """One simulator with default settings (1000 frames/s)."""
    return start_sim()


@pytest.fixture
def token_cache(tmp_path: Path) -> Path:
    """A token cache path inside the test's own directory."""
    return tmp_path / "cache" / "token.json"
