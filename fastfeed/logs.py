"""Logging across processes: every child logs into the parent's own handlers.

Child processes (the network process, the workers) put their log records on one
multiprocessing queue; a thread in the parent hands each record to the parent's logger of the
same name, so the parent's configuration (handlers, format, level, filters) applies to every
line, whichever process wrote it. ``%(processName)s`` tells them apart (``fastfeed-session``,
``fastfeed-pool0-w1``, ...). The children log at the level the parent's ``fastfeed`` logger
has when the feed starts, so ``-v`` (or ``logging.getLogger("fastfeed").setLevel(...)``)
reaches every process.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import threading
from dataclasses import dataclass
from typing import Any

__all__ = ["FORMAT", "ChildLogging", "LogRelay", "configure_child_logging"]

#: The format the CLI uses; the process name is in every line.
FORMAT = "%(asctime)s %(processName)s %(name)s %(levelname)s %(message)s"


@dataclass(frozen=True)
class ChildLogging:
    """What a child needs to log into the parent: the queue and the level."""

    queue: Any
    level: int


def configure_child_logging(cfg: ChildLogging | None) -> None:
    """In a child: send every record to the parent (replacing any handler)."""
    if cfg is None:
        return
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(logging.handlers.QueueHandler(cfg.queue))
    root.setLevel(cfg.level)


class LogRelay:
    """In the parent: the queue the children log to, and the thread that empties it."""

    def __init__(self, ctx: Any, level: int | None = None) -> None:
        if level is None:
            level = logging.getLogger("fastfeed").getEffectiveLevel()
        self.level = level
        self._queue = ctx.Queue()
        self._thread = threading.Thread(target=self._run, name="fastfeed-log-relay", daemon=True)
        self._thread.start()

    def config(self) -> ChildLogging:
        return ChildLogging(self._queue, self.level)

    def _run(self) -> None:
        while True:
            try:
                record = self._queue.get()
            except (EOFError, OSError):
                return
            if record is None:
                return
            logger = logging.getLogger(record.name)
            if logger.isEnabledFor(record.levelno):
                logger.handle(record)

    def close(self, timeout: float = 2.0) -> None:
        """Hand over what is queued, then stop the thread (bounded)."""
        with contextlib.suppress(Exception):
            self._queue.put(None)
        self._thread.join(timeout)
        with contextlib.suppress(Exception):
            self._queue.close()
            self._queue.cancel_join_thread()
