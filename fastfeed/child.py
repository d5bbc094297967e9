"""The process a frame source runs in: the WebSocket session, a pub/sub source, a replay.

Each is a spawned process that attaches the rings by name and writes frames into them.
The parent sees it through this one interface: live counters in a shared array (the
child refreshes them), a stop event, and a pipe on which the child sends ``("ok", None)``
when it finishes or ``("error", one_line)`` when it stops on a fatal error (bad
credentials, a refused token, an unreadable capture).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing as mp
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .logs import ChildLogging, configure_child_logging
from .supervisor import ignore_stop_signals, watch_parent

__all__ = ["ChildProcess", "serve"]


async def serve(runner: Any, values: Callable[[], Iterable[int]], counters: Any | None,
                stop_event: Any | None) -> None:
    """Inside the child: ``await runner.run()`` while publishing ``values()`` into the shared
    counters every 50 ms and turning the parent's stop event into ``runner.stop()``. The last
    counters are published on the way out. SIGINT and SIGTERM are the parent's to handle (see
    :mod:`fastfeed.supervisor`): the child stops when the parent says so, or dies with it."""

    def publish() -> None:
        if counters is not None:
            for i, v in enumerate(values()):
                counters[i] = v

    async def publisher() -> None:
        while True:
            publish()
            if stop_event is not None and stop_event.is_set():
                runner.stop()
            await asyncio.sleep(0.05)

    task = asyncio.ensure_future(publisher())
    try:
        await runner.run()
    finally:
        task.cancel()
        publish()


def _child_main(target: Callable[..., None], parent_pid: int, log: ChildLogging | None,
                extras: dict[str, Any], *args: Any) -> None:
    ignore_stop_signals()
    watch_parent(parent_pid)
    configure_child_logging(log)
    if extras.get("control"):
        from . import control

        control.attach(extras["control"])
    # What the child imported to get here lives as long as it does: freezing it keeps the
    # garbage collector's full passes, whose pauses land on the latency tail, short.
    gc.freeze()
    target(*args)


class ChildProcess:
    """``target(*args, counters, stop_event, conn, log_level)`` in a spawned process."""

    def __init__(self, target: Callable[..., None], args: Sequence[Any],
                 counter_names: Sequence[str], *, name: str,
                 log_level: int = logging.WARNING, log: ChildLogging | None = None) -> None:
        ctx = mp.get_context("spawn")
        self._names = tuple(counter_names)
        self._counters = ctx.Array("q", len(self._names), lock=False)
        self._stop = ctx.Event()
        self._recv, send = ctx.Pipe(duplex=False)
        if log is not None:
            log_level = log.level
        # Set before start() (pickled then): see send_control_to().
        self._extras: dict[str, Any] = {}
        self._proc = ctx.Process(target=_child_main, name=name, daemon=True,
                                 args=(target, os.getpid(), log, self._extras, *args,
                                       self._counters, self._stop, send, log_level))
        self._send = send
        self._log = log
        self.error: str | None = None
        self.finished = False

    def send_control_to(self, ring_name: str) -> None:
        """Before :meth:`start`: publish control messages to this ring (see
        :mod:`fastfeed.control`)."""
        self._extras["control"] = ring_name

    def start(self) -> ChildProcess:
        """Start the process; returns self."""
        self._proc.start()
        self._send.close()
        if self._log is not None:
            self._log.started()
        return self

    @property
    def pid(self) -> int | None:
        """The process id (None before start)."""
        return self._proc.pid

    @property
    def exitcode(self) -> int | None:
        """0 after a requested stop, 1 after a fatal error (see :attr:`error`), None if running."""
        return self._proc.exitcode

    def is_alive(self) -> bool:
        return self._proc.is_alive()

    @property
    def sentinel(self) -> int:
        """Readable once the process has ended (for :func:`multiprocessing.connection.wait`)."""
        return self._proc.sentinel

    def request_stop(self) -> None:
        """Ask the child to stop, without waiting (see :meth:`stop`)."""
        self._stop.set()

    def counters(self) -> dict[str, int]:
        """The child's counters (as last refreshed by the child)."""
        return dict(zip(self._names, self._counters[:], strict=True))

    def _collect(self) -> None:
        while self._recv.poll():
            try:
                kind, msg = self._recv.recv()
            except EOFError:
                break
            self.finished = True
            if kind == "error":
                self.error = msg

    def join(self, timeout: float | None = None) -> int | None:
        """Wait for the process to end; returns its exit code (None if still running)."""
        self._proc.join(timeout)
        self._collect()
        return self._proc.exitcode

    def stop(self, timeout: float = 10.0) -> int | None:
        """Ask the child to stop, wait for it, kill it past ``timeout``."""
        self._stop.set()
        if self._proc.pid is None:
            return None
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5.0)  # SIGKILL cannot be refused; the bound is for a stuck kernel
        self._collect()
        return self._proc.exitcode

    def kill(self) -> None:
        """SIGKILL the child (tests: a crash in the middle of a stream)."""
        if self._proc.is_alive():
            self._proc.kill()
        self._proc.join(5.0)

    def __enter__(self) -> ChildProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
