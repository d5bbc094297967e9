"""Shared fixtures: the feed simulator as a real subprocess on a loopback port.

``start_sim(*args)`` runs ``python -m fastfeed sim --port 0 --json *args``, waits for its
``listening on http://HOST:PORT`` line and returns a :class:`SimProcess`; every simulator a
test starts is stopped (SIGTERM) when the test ends.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The simulator's default credentials (fastfeed sim's --tenant/--client-id/--client-secret).
SIM_TENANT = "fastfeed-sim"
SIM_CLIENT_ID = "fastfeed-sim"
SIM_SECRET = "fastfeed-sim-secret"
SIM_SCOPE = "api://fastfeed-sim/.default"


class SimProcess:
    """A running ``fastfeed sim`` subprocess."""

    def __init__(self, args: list[str]) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        self.args = args
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastfeed", "sim", "--port", "0", "--json", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()
        if not first.startswith("listening on http://"):
            self.proc.kill()
            _, err = self.proc.communicate(timeout=10)
            raise RuntimeError(f"simulator did not start: {first!r} {err[-2000:]}")
        self.url = first.split("listening on ", 1)[1].strip()
        self.port = int(self.url.rsplit(":", 1)[1])
        self.final: dict[str, Any] | None = None
        self.stderr = ""
        # Drain stderr in the background so a chatty simulator can never block on a full pipe.
        self._err_chunks: list[str] = []
        self._err_thread = threading.Thread(target=self._drain, daemon=True)
        self._err_thread.start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._err_chunks.append(line)

    @property
    def ws_url(self) -> str:
        return "ws" + self.url[4:] + "/ws"

    def stats(self) -> dict[str, Any]:
        """Live counters from ``GET /stats``."""
        with urllib.request.urlopen(self.url + "/stats", timeout=10) as resp:
            return json.loads(resp.read())

    def settings_args(self, **extra: Any) -> dict[str, Any]:
        """Keyword arguments for :func:`fastfeed.config.load_settings` pointing at this sim."""
        args = {"host": self.url, "authority": self.url, "tenant_id": SIM_TENANT,
                "client_id": SIM_CLIENT_ID, "client_secret": SIM_SECRET, "scope": SIM_SCOPE,
                "email": "support@example.com"}
        args.update(extra)
        return args

    def stop(self) -> dict[str, Any]:
        """SIGTERM, wait, and return the JSON counters it prints on exit."""
        if self.final is not None:
            return self.final
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        self._err_thread.join(timeout=5)
        self.stderr = "".join(self._err_chunks)
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        if not lines:
            raise RuntimeError(f"simulator printed no JSON (rc={self.proc.returncode}): "
                               f"{out!r} {self.stderr[-2000:]}")
        self.final = json.loads(lines[-1])
        return self.final


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
