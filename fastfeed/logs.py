"""Logging across processes: every child logs into the parent's own handlers.

Each child process (the network process, each worker, each restart of one) writes its log
records to a pipe of its own; a thread in the parent waits on all of them and hands each record
to the parent's logger of the same name, so the parent's configuration (handlers, format,
level, filters) applies to every line, whichever process wrote it. ``%(processName)s`` tells
them apart (``fastfeed-session``, ``fastfeed-pool0-w1``, ...). The children log at the level
the parent's ``fastfeed`` logger has when the feed starts, so ``-v`` (or
``logging.getLogger("fastfeed").setLevel(...)``) reaches every process.

A pipe per child, not one queue for all: children that share a channel share its write lock,
and one killed while holding it (in the middle of a record larger than the pipe's buffer)
would silence every other child for good, and leave the reader waiting for the rest of the
record. With a pipe each, a child killed mid-record costs only its own unsent lines: the
reader meets the end of that pipe in the middle of a record, says so in one warning, and goes
on with the others.

In a child a log call never waits on the parent: the record is queued in memory (at most
:data:`MAX_QUEUED` records and :data:`MAX_QUEUED_BYTES` of text; more are dropped, counted,
and the count sent as a warning) and a thread writes it; at exit what is still queued is
sent, for at most :data:`FLUSH_AT_EXIT_S`. The parent reads each pipe
without waiting for the rest of a record, so a child stopped in the middle of one (SIGSTOP,
a debugger) holds back no other child's records.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import logging.handlers
import os
import pickle
import queue
import struct
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_ready
from typing import Any

__all__ = ["FLUSH_AT_EXIT_S", "FORMAT", "MAX_QUEUED", "MAX_QUEUED_BYTES", "ChildLogging", "LogRelay",
           "configure_child_logging"]

#: The format the CLI uses; the process name is in every line.
FORMAT = "%(asctime)s %(processName)s %(name)s %(levelname)s %(message)s"

#: How long a child's exit waits for its queued records to reach the parent.
FLUSH_AT_EXIT_S = 2.0

#: Records a child keeps queued for the parent at most; more are dropped and counted, and
#: the count is sent as a warning once the queue moves again.
MAX_QUEUED = 10_000
MAX_QUEUED_BYTES = 64 << 20

log = logging.getLogger("fastfeed.logs")

_SOMEONE = "a child process"  # a pipe's child until its first record names it


@dataclass(frozen=True)
class ChildLogging:
    """What one child needs to log into the parent: the write end of its own pipe, and the
    level. Made by :meth:`LogRelay.config` for each process start, never shared."""

    conn: Any
    level: int

    def started(self) -> None:
        """In the parent, once the child has started (and holds its own copy): close the
        parent's copy, so that the child's end is the end of the pipe for the reader."""
        with contextlib.suppress(OSError):
            self.conn.close()


#: Each record on a pipe: its pickle's length, then the pickle. A length of 0 is the end mark,
#: the child's last write at exit: what it had queued was all sent.
_HEADER = struct.Struct("<Q")


def _write_fully(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class _PipeHandler(logging.handlers.QueueHandler):
    """In a child: records are queued in memory (a log call never blocks) and written to the
    child's pipe by a thread; what is queued at exit is sent within FLUSH_AT_EXIT_S."""

    def __init__(self, conn: Any) -> None:
        super().__init__(queue.SimpleQueue())
        self._conn = conn
        self.dropped = 0  # records not queued: the queue held its most already
        self._told = 0
        # bytes of text queued, and written: each counter has one thread that writes it
        self._in_bytes = self._out_bytes = 0
        self._writer = threading.Thread(target=self._write_all, name="fastfeed-log-writer",
                                        daemon=True)
        self._writer.start()
        atexit.register(self.flush_at_exit)

    def enqueue(self, record: logging.LogRecord) -> None:
        # a parent that does not read must not make the child's memory grow without end
        if (self.queue.qsize() >= MAX_QUEUED
                or self._in_bytes - self._out_bytes >= MAX_QUEUED_BYTES):
            self.dropped += 1
        else:
            self._in_bytes += len(record.msg)
            self.queue.put(record)

    def _write_all(self) -> None:
        fd = self._conn.fileno()
        try:
            while True:
                record = self.queue.get()
                if self.dropped > self._told:  # ahead of what comes next, the exit included
                    n, self._told = self.dropped - self._told, self.dropped
                    self._send(fd, logging.makeLogRecord({
                        "name": "fastfeed.logs", "levelno": logging.WARNING,
                        "levelname": "WARNING",
                        "msg": f"{n} log record(s) of this process were dropped: the parent "
                               f"did not read them as fast as they came"}))
                if record is None:
                    _write_fully(fd, _HEADER.pack(0))  # the end mark: everything was sent
                    return
                self._out_bytes += len(record.msg)
                self._send(fd, record)
        except OSError:
            return  # the parent is gone

    @staticmethod
    def _send(fd: int, record: logging.LogRecord) -> None:
        try:
            data = pickle.dumps(record)
        except Exception:
            # something of the record's own (an `extra=` value) does not pickle: send its
            # text, which is what the parent's handlers format anyway
            data = pickle.dumps(logging.makeLogRecord({k: getattr(record, k) for k in (
                "name", "levelno", "levelname", "msg", "pathname", "lineno", "funcName",
                "created", "msecs", "relativeCreated", "process", "processName", "thread",
                "threadName")}))
        _write_fully(fd, _HEADER.pack(len(data)) + data)

    def flush_at_exit(self) -> None:
        self.queue.put(None)
        self._writer.join(FLUSH_AT_EXIT_S)


def configure_child_logging(cfg: ChildLogging | None) -> None:
    """In a child: send every record to the parent (replacing any handler)."""
    if cfg is None:
        return
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(_PipeHandler(cfg.conn))
    root.setLevel(cfg.level)


class LogRelay:
    """In the parent: the read ends of the children's pipes, and the thread that empties them.

    ``cut`` counts the children whose records broke off in the middle of one, ``unended``
    those whose pipe ended between records but without the end mark a child sends last at
    exit (killed, or its exit did not wait for the parent to read its last records), and
    ``abandoned`` those whose pipe was still open, without the end mark, when :meth:`close`
    gave up waiting (a child still running past the stop: what it logs later is lost): each
    is also logged as a warning from ``fastfeed.logs``."""

    def __init__(self, ctx: Any, level: int | None = None) -> None:
        if level is None:
            level = logging.getLogger("fastfeed").getEffectiveLevel()
        self.level = level
        self.cut = 0
        self.unended = 0
        self.abandoned = 0
        self._ctx = ctx
        self._lock = threading.Lock()
        self._readers: dict[Any, str] = {}  # read end -> the child it is from, once known
        self._pending: dict[Any, bytearray] = {}  # read end -> the start of a record
        self._ended: set[Any] = set()  # read ends whose end mark came
        self._configs: dict[Any, ChildLogging] = {}  # read end -> what its child was given
        self._quiet: set[Any] = set()  # read ends whose process did not start (discard())
        self._closing: float | None = None  # the deadline close() set
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._thread = threading.Thread(target=self._run, name="fastfeed-log-relay", daemon=True)
        self._thread.start()

    def config(self) -> ChildLogging:
        """A pipe for one child to be started (call :meth:`ChildLogging.started` once it is)."""
        r, w = self._ctx.Pipe(duplex=False)
        os.set_blocking(r.fileno(), False)  # see _receive
        cfg = ChildLogging(w, self.level)
        with self._lock:
            self._readers[r] = _SOMEONE
            self._pending[r] = bytearray()
            self._configs[r] = cfg
        self._wake()
        return cfg

    def discard(self, cfg: ChildLogging) -> None:
        """The process ``cfg`` was made for did not start (its start raised): close the
        parent's write end now, and drop the pipe without a word once it ends. Without this
        both ends stayed open until :meth:`close`: two descriptors for each failed start, a
        supervisor's restarts included."""
        with self._lock:
            self._quiet.update(r for r, c in self._configs.items() if c is cfg)
        cfg.started()  # the parent's copy was the only one: the pipe ends for the reader
        self._wake()

    @property
    def open_pipes(self) -> int:
        """Children's pipes still read (configured, not yet ended)."""
        with self._lock:
            return len(self._readers)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full: it is awake already
            os.write(self._wake_w, b"\0")

    def _drop(self, r: Any) -> None:
        with self._lock:
            self._readers.pop(r, None)
            self._pending.pop(r, None)
            self._ended.discard(r)
            self._configs.pop(r, None)
            self._quiet.discard(r)
        with contextlib.suppress(OSError):
            r.close()

    def _run(self) -> None:
        while True:
            with self._lock:
                readers = list(self._readers)
                deadline = self._closing
                # a pipe whose process never started holds no one up at the stop
                waiting = [r for r in readers if not self._never_started(r)]
            if deadline is not None and (not waiting or time.monotonic() >= deadline):
                for r in readers:
                    self._abandon(r)
                return
            for r in wait_ready([*readers, self._wake_r], timeout=0.2):
                if r == self._wake_r:
                    with contextlib.suppress(OSError):
                        os.read(self._wake_r, 4096)
                    continue
                self._receive(r)

    def _never_started(self, r: Any) -> bool:
        """The parent still holds the pipe's write end: its process never started (under
        self._lock; every reader has its config)."""
        return not self._configs[r].conn.closed

    def _abandon(self, r: Any) -> None:
        """close() stops waiting for this pipe: hand over what it holds now, and say so if
        its child had not sent the end mark (it is still running, or hung)."""
        self._receive(r)
        with self._lock:
            if r not in self._readers:  # it ended just now, and _receive told what it had to
                return
            who, pending, ended = self._readers[r], len(self._pending[r]), r in self._ended
            never = self._never_started(r)
        if never:  # nothing was or will be logged through it (the caller reported the failure)
            self._configs[r].started()
        elif not ended:
            self.abandoned += 1
            log.warning("stopped reading the log records of %s, still running at the stop "
                        "(%d bytes of a record pending): what it logs from now on is lost",
                        who, pending)
        self._drop(r)

    def _receive(self, r: Any) -> None:
        """Read what this pipe holds now, without waiting for the rest of a record (a child
        stopped mid-record must not hold the others' records back), and hand over every
        record that is whole."""
        try:
            chunk = os.read(r.fileno(), 1 << 20)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        buf = self._pending[r]
        if not chunk:  # the child ended: every copy of the write end is closed
            if r in self._quiet:  # it never started (discard): its caller told the failure
                pass
            elif buf:
                who = self._readers[r]
                self.cut += 1
                log.warning("the log records of %s broke off in the middle of one (%d bytes "
                            "of it came): it was killed while writing; what it had not sent "
                            "is lost", who, len(buf))
            elif r not in self._ended:
                self.unended += 1
                log.warning("the log records of %s ended without the mark a process sends "
                            "last at exit: it was killed, or exited before the parent read its "
                            "last records (it waits %.0f s); any it had not sent are lost",
                            self._readers[r], FLUSH_AT_EXIT_S)
            self._drop(r)
            return
        buf += chunk
        while len(buf) >= _HEADER.size:
            (n,) = _HEADER.unpack_from(buf)
            if n == 0:
                del buf[:_HEADER.size]
                self._ended.add(r)
                continue
            if len(buf) < _HEADER.size + n:
                return
            data = bytes(buf[_HEADER.size:_HEADER.size + n])
            del buf[:_HEADER.size + n]
            try:
                record = pickle.loads(data)
            except Exception as e:  # whole, but it does not unpickle here
                log.warning("a log record from %s could not be read: %r", self._readers[r], e)
                continue
            with self._lock:
                self._readers[r] = f"{record.processName} (pid {record.process})"
            logger = logging.getLogger(record.name)
            if logger.isEnabledFor(record.levelno):
                logger.handle(record)

    def close(self, timeout: float = 2.0) -> None:
        """Hand over what the children sent until each of their pipes ends (they have
        exited), for at most ``timeout`` seconds; then stop the thread."""
        with self._lock:
            if self._closing is None:
                self._closing = time.monotonic() + timeout
        self._wake()
        self._thread.join(timeout + 1.0)
        if not self._thread.is_alive():  # else a handler holds it: leave it what it uses
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
