"""Run ``fastfeed sim`` as a child process: for ``fastfeed demo``, tests and benchmarks.

A subprocess rather than a thread or an in-process task: the simulator then has a core of its
own and its event loop never competes with the client's.

    with SimulatorProcess("--rate", "0", "--count", "100000") as sim:
        settings = load_settings(sim.settings_args(email="me@example.com"))
        ...
    sim.final_stats["frames_sent"]
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

__all__ = ["SIM_CLIENT_ID", "SIM_SCOPE", "SIM_SECRET", "SIM_TENANT", "SimulatorProcess"]

# The simulator's default credentials (fastfeed sim's --tenant/--client-id/--client-secret)
# and a scope it accepts.
SIM_TENANT = "fastfeed-sim"
SIM_CLIENT_ID = "fastfeed-sim"
SIM_SECRET = "fastfeed-sim-secret"
SIM_SCOPE = "api://fastfeed-sim/.default"

# How much of a failed simulator's output is shown (its traceback's end).
_ERROR_LINES = 25
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent.parent


def _die_with_parent() -> None:
    """In the simulator's process, before exec: SIGTERM when the process that started it dies
    (``fastfeed demo`` killed with -9 must not leave a simulator running)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class SimulatorProcess:
    """``python -m fastfeed sim --port 0 --json *args`` in a child process.

    The constructor returns once the simulator listens (its first line names the port);
    :meth:`stop` sends SIGTERM and returns the counters it prints on exit. stderr is drained
    in a background thread (kept in :attr:`stderr`) so a chatty simulator never blocks.
    """

    def __init__(self, *args: str, host: str = "127.0.0.1", timeout: float = 30.0,
                 ca_file: str | os.PathLike[str] | None = None) -> None:
        env = dict(os.environ)
        # Make the child import this same fastfeed, even from a source checkout; and never
        # the working directory's (-P): run from a clone's root after `pip install .`, the
        # source tree there (without built extensions) would shadow the installed package.
        env["PYTHONPATH"] = str(_PACKAGE_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        self.args = list(args)
        self.proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "fastfeed", "sim", "--host", host, "--port", "0", "--json",
             *self.args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
            preexec_fn=_die_with_parent)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._err: list[str] = []
        self._err_thread = threading.Thread(target=self._drain, daemon=True)
        self._err_thread.start()
        #: The CA that issued the simulator's certificate (--tls-cert), for stats() and
        #: settings_args(): trusted for this simulator only.
        self.ca_file = os.fspath(ca_file) if ca_file is not None else None
        first = self._readline(timeout)
        if not first.startswith(("listening on http://", "listening on https://")):
            self.proc.kill()
            self.proc.wait()
            self._err_thread.join(5)
            self.proc.stdout.close()
            self.proc.stderr.close()
            code = self.proc.returncode
            # The child's own last lines, whole: its traceback says why.
            # Its last line (the reason) first, then the lines before it (a traceback).
            tail = [ln.rstrip() for ln in (first + "".join(self._err)).splitlines()
                    if ln.strip()][-_ERROR_LINES:] or ["(no output)"]
            raise RuntimeError(f"the simulator did not start (exit code {code}): {tail[-1]}"
                               + "".join(f"\n  {ln}" for ln in tail[:-1]))
        self.url = first.split("listening on ", 1)[1].strip()
        self.port = int(self.url.rsplit(":", 1)[1])
        self.final_stats: dict[str, Any] | None = None

    def _readline(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()),  # type: ignore[union-attr]
                                  daemon=True)
        reader.start()
        reader.join(timeout)
        return box[0] if box else ""

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._err.append(line)

    @property
    def stderr(self) -> str:
        """What the simulator wrote to stderr so far."""
        return "".join(self._err)

    @property
    def ws_url(self) -> str:
        """``ws://HOST:PORT/ws`` (``wss://`` with TLS)."""
        return "ws" + self.url[4:] + "/ws"

    def stats(self) -> dict[str, Any]:
        """Live counters (``GET /stats``)."""
        ctx = None
        if self.url.startswith("https:"):
            ctx = ssl.create_default_context(cafile=self.ca_file)
            if "--tls-client-ca" in self.args:
                # a simulator that wants client certificates has no anonymous /stats
                raise RuntimeError("stats() over mutual TLS: read final_stats after stop()")
        with urllib.request.urlopen(self.url + "/stats", timeout=10, context=ctx) as resp:
            return json.loads(resp.read())

    def settings_args(self, **extra: Any) -> dict[str, Any]:
        """Arguments for :func:`fastfeed.config.load_settings` that point at this simulator
        with its default credentials (``extra`` overrides or adds)."""
        args: dict[str, Any] = {
            "host": self.url, "authority": self.url, "tenant_id": SIM_TENANT,
            "client_id": SIM_CLIENT_ID, "client_secret": SIM_SECRET, "scope": SIM_SCOPE,
            "email": "support@example.com"}
        if self.ca_file is not None:
            args["ca_file"] = self.ca_file
        args.update(extra)
        return args

    def stop(self, timeout: float = 20.0) -> dict[str, Any]:
        """SIGTERM, wait, and return the counters the simulator printed on exit."""
        if self.final_stats is not None:
            return self.final_stats
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        self._err_thread.join(5)
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        if not lines:
            raise RuntimeError(f"simulator printed no counters (exit {self.proc.returncode}): "
                               f"{self.stderr[-2000:]}")
        self.final_stats = json.loads(lines[-1])
        return self.final_stats

    def __enter__(self) -> SimulatorProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        except RuntimeError:
            pass
