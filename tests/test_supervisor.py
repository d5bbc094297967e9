"""The supervisor's view of a child's death, with real processes."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time

from fastfeed.supervisor import Supervisor


def test_a_killed_child_reports_its_signal_while_another_thread_polls_it():
    """stats() asks each worker is_alive() from the consumer's thread; that may reap the child
    before the supervisor's thread does, whose join then returned with no exit code yet:
    "worker 0 died (exit code None)" in the log for a SIGKILL (seen in CI).  Twenty kills,
    each with a thread polling is_alive() all the while: every exit handler sees -9."""
    ctx = mp.get_context("spawn")
    seen: list[int | None] = []
    for _ in range(20):
        done = threading.Event()

        def on_exit(p, done=done):
            seen.append(p.exitcode)
            done.set()
            return False  # no restart

        sup = Supervisor("test")
        sup.add("sleeper", lambda: _start(ctx), on_exit)
        proc = sup.proc(0)
        stop = threading.Event()

        def poll(proc=proc, stop=stop):
            while not stop.is_set():
                proc.is_alive()

        t = threading.Thread(target=poll)
        t.start()
        try:
            os.kill(proc.pid, signal.SIGKILL)
            assert done.wait(10), "the supervisor never saw the child end"
        finally:
            stop.set()
            t.join(10)
            sup.close()
            proc.join(10)
    assert seen == [-signal.SIGKILL] * 20


def _start(ctx):
    p = ctx.Process(target=time.sleep, args=(60,), daemon=True)
    p.start()
    return p
