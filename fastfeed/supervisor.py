"""One supervisor for every child process of a feed, and what each child does to die with it.

The parent side, :class:`Supervisor`, is one thread that waits on the sentinels of every child
(the network or source process and each decoder worker). When one ends, the child's own
``on_exit`` callback decides (it knows whether the death was a fatal error, a requested stop or
a crash); a crashed child is started again after a capped exponential back-off, so a child that
dies at once (a broken import, say) is not restarted in a tight loop.

The child side: :func:`watch_parent` ends a child within a quarter of a second of its parent's
death, whatever the child is doing (decoding, sleeping on a futex, blocked on a full output
ring), after removing the dead parent's shared-memory segments; :func:`ignore_stop_signals`
leaves SIGINT and SIGTERM to the parent, which drains the rings in order, so a signal sent to
the whole process group (Ctrl-C, systemd, Docker, Kubernetes) never kills a child mid-batch.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Supervisor", "exit_orphaned", "ignore_stop_signals", "set_affinity", "watch_parent"]

log = logging.getLogger("fastfeed.supervisor")

# Restart back-off: a child that lived less than QUICK_S seconds is "failing"; its n-th
# failure in a row waits FIRST_S * 2**n, at most CAP_S.
QUICK_S = 1.0
FIRST_S = 0.05
CAP_S = 5.0
# A child that dies this many times in a row right after starting will not start at all
# (a script without `if __name__ == "__main__":`, a handler that cannot be imported):
# the supervisor gives up and says so instead of retrying for ever.
GIVE_UP_AFTER = 6
# How often an orphaned child notices: the parent's death is also seen at once through the
# multiprocessing sentinel, this is the fallback.
_PARENT_POLL_S = 0.25


def set_affinity(pid: int, cpus: set[int], what: str) -> None:
    """``os.sched_setaffinity`` with an error that names the option and the machine's CPUs."""
    try:
        os.sched_setaffinity(pid, cpus)
    except (OSError, ValueError) as e:
        have = sorted(os.sched_getaffinity(0))
        raise ValueError(f"{what}={sorted(cpus)}: cannot pin to these CPUs ({e}); "
                         f"this process may use CPUs {have}") from None


def ignore_stop_signals() -> None:
    """In a child: SIGINT and SIGTERM are the parent's to handle (see the module docstring)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def watch_parent(parent_pid: int, on_orphaned: Callable[[], None] | None = None) -> None:
    """In a child: a daemon thread that, once ``parent_pid`` is no longer this process's parent,
    removes the segments of owners that died (:func:`fastfeed.shm.cleanup_stale`), runs
    ``on_orphaned`` and ends the process at once (``os._exit``: nothing of the child may run on
    after its parent, it would write into rings nobody reads)."""
    parent = mp.parent_process()
    sentinel = parent.sentinel if parent is not None else None

    def run() -> None:
        waiting_on = [sentinel] if sentinel is not None else []
        while os.getppid() == parent_pid:
            if waiting_on and mp.connection.wait(waiting_on, timeout=_PARENT_POLL_S):
                waiting_on = []  # readable for good: fall back to polling
            elif not waiting_on:
                time.sleep(_PARENT_POLL_S)
        exit_orphaned(on_orphaned)

    threading.Thread(target=run, name="fastfeed-parent-watch", daemon=True).start()


def exit_orphaned(on_orphaned: Callable[[], None] | None = None) -> None:
    """Remove the segments of owners that died, run ``on_orphaned`` and end this process at
    once. Also for a child whose start fails because its parent died meanwhile (its segments
    gone): it must finish the clean-up, not die of the exception halfway through it."""
    from fastfeed import shm

    with contextlib.suppress(Exception):
        shm.cleanup_stale()
    if on_orphaned is not None:
        with contextlib.suppress(Exception):
            on_orphaned()
    os._exit(3)


@dataclass
class _Slot:
    name: str
    spawn: Callable[[], Any]
    on_exit: Callable[[Any], bool]
    proc: Any = None
    started_at: float = 0.0
    failures: int = 0
    due: float | None = None


class Supervisor:
    """Watches child processes and restarts those that crash; see the module docstring.

    ``add(name, spawn, on_exit)`` starts a child with ``spawn()`` (which returns an object
    with ``sentinel``, ``join()`` and ``is_alive()``, such as a ``multiprocessing.Process``) and
    watches it. When it ends, ``on_exit(proc)`` runs in the supervisor's thread; if it returns
    True the child is started again (after the back-off); the caller counts restarts.
    :meth:`hold` stops all restarting (the feed is stopping): from then on the caller owns the
    children. A child that keeps dying right after it starts is given up on after
    :data:`GIVE_UP_AFTER` tries: :attr:`gave_up` then holds the one-line reason.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._slots: list[_Slot] = []
        self._lock = threading.RLock()
        self._holding = False
        self._wake_r, self._wake_w = mp.Pipe(duplex=False)
        self._thread: threading.Thread | None = None
        self.gave_up: str | None = None

    def add(self, name: str, spawn: Callable[[], Any], on_exit: Callable[[Any], bool]) -> int:
        """Start a child and watch it; returns its slot number."""
        with self._lock:
            slot = _Slot(name, spawn, on_exit)
            self._slots.append(slot)
            self._start(slot)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"{self.name}-supervisor",
                                                daemon=True)
                self._thread.start()
            else:
                self._wake()
            return len(self._slots) - 1

    def proc(self, slot: int) -> Any:
        """The slot's current process (None while it awaits a restart)."""
        return self._slots[slot].proc

    def _start(self, slot: _Slot) -> None:
        slot.proc = slot.spawn()
        slot.started_at = time.monotonic()
        slot.due = None

    def restart_now(self, slot: int) -> Any:
        """Start the slot's child again at once (the caller's own restart, after :meth:`hold`)."""
        with self._lock:
            s = self._slots[slot]
            self._start(s)
            return s.proc

    def forget(self, slot: int) -> None:
        """The caller joined the slot's dead process itself."""
        with self._lock:
            self._slots[slot].proc = None
            self._slots[slot].due = None

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send_bytes(b"x")

    def hold(self, timeout: float = 5.0) -> None:
        """Stop restarting and stop the thread; the children keep running."""
        with self._lock:
            self._holding = True
        self._wake()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)

    def close(self) -> None:
        self.hold()
        for c in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                c.close()

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._holding:
                    return
                live = {s.proc.sentinel: s for s in self._slots if s.proc is not None}
                due = [s.due for s in self._slots if s.due is not None]
            timeout = 0.5
            if due:
                timeout = max(0.0, min(min(due) - time.monotonic(), timeout))
            ready = mp.connection.wait([*live, self._wake_r], timeout=timeout)
            with self._lock:
                if self._holding:
                    return
                if self._wake_r in ready:
                    with contextlib.suppress(OSError, EOFError):
                        while self._wake_r.poll():
                            self._wake_r.recv_bytes()
                now = time.monotonic()
                for r in ready:
                    s = live.get(r)
                    if s is None or s.proc is None or s.proc.sentinel != r:
                        continue
                    proc = s.proc
                    proc.join(1.0)
                    # Another thread may reap the child first (stats() asks is_alive()):
                    # then this join's waitpid finds no child and returns before that
                    # thread has stored the exit code, and the log would say "exit code
                    # None" for a SIGKILL (seen once in CI). Give it a moment to land.
                    until = time.monotonic() + 1.0
                    while getattr(proc, "exitcode", 0) is None and time.monotonic() < until:
                        time.sleep(0.001)
                    s.proc = None
                    try:
                        again = s.on_exit(proc)
                    except Exception:
                        log.exception("%s: exit handler failed", s.name)
                        again = False
                    if not again:
                        continue
                    quick = now - s.started_at < QUICK_S
                    s.failures = s.failures + 1 if quick else 0
                    if s.failures >= GIVE_UP_AFTER:
                        code = getattr(proc, "exitcode", None)
                        self.gave_up = (f"{s.name} died {s.failures} times in a row right after "
                                        f"starting (last exit code {code}); see its log above. "
                                        f"A script that starts a feed needs "
                                        f"`if __name__ == \"__main__\":` (children are spawned)")
                        log.error("%s", self.gave_up)
                        continue
                    delay = min(CAP_S, FIRST_S * 2 ** s.failures) if s.failures else 0.0
                    s.due = now + delay
                    if delay:
                        log.warning("%s ended %d times in a row right after starting: next start "
                                    "in %.2fs", s.name, s.failures, delay)
                for s in self._slots:
                    if s.due is not None and s.due <= now and s.proc is None:
                        try:
                            self._start(s)
                        except Exception:
                            log.exception("%s: cannot start it again", s.name)
                            s.due = now + CAP_S
