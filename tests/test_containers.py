"""Shared memory as containers give it: a 64 MiB /dev/shm (Docker's default).

The test runs fastfeed in a private mount namespace (``unshare --mount``, root only) with
a real 64 MiB tmpfs on /dev/shm, as ``docker run`` without ``--shm-size`` has it: too many
workers are refused up front, in one line naming the size needed and how to give it;
fewer run. Where namespaces are not allowed, the same check is exercised through
FASTFEED_SHM_DIR on a small tmpfs, or skipped with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.feedcheck import write_capture

ROOT = Path(__file__).resolve().parent.parent


def _can_unshare() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                        "mount -t tmpfs -o size=1m tmpfs /dev/shm"], capture_output=True,
                       timeout=30)
    return r.returncode == 0


needs_unshare = pytest.mark.skipif(not _can_unshare(),
                                   reason="needs root and mount namespaces (unshare --mount)")


def in_small_shm(*cmd: str, size: str = "64m", timeout: float = 120
                 ) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` with a fresh ``size`` tmpfs on /dev/shm, visible to it and its children
    only."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    script = f'mount -t tmpfs -o size={size} tmpfs /dev/shm && exec "$@"'
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           script, "sh", *cmd], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture
def capture(tmp_path: Path) -> Path:
    return write_capture(tmp_path / "c.ffcap", (
        f'{{"c":"S:{i % 50}","t":1.5,"p":{i},"v":1.0}}'.encode() for i in range(20_000)))


@needs_unshare
def test_too_many_workers_for_a_64mib_shm_is_one_line_up_front(capture):
    r = in_small_shm(sys.executable, "-m", "fastfeed", "replay", str(capture), "--workers", "6",
                     "--json")
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    msg = lines[0]
    assert msg.startswith("fastfeed: error: shared memory: /dev/shm has ")
    assert "6 worker(s) (each a 4.0 MiB input ring and a 16.0 MiB output ring) need 124." in msg
    assert "--shm-size" in msg and "--workers" in msg and "ring_capacity" in msg
    assert "Traceback" not in r.stderr and r.stdout == ""


@needs_unshare
def test_what_fits_in_a_64mib_shm_runs(capture):
    r = in_small_shm(sys.executable, "-m", "fastfeed", "replay", str(capture), "--workers", "2",
                     "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["frames"] == 20_000 and out["worker_restarts"] == 0


@needs_unshare
def test_the_api_raises_shm_space_error(capture):
    code = ("import sys\nfrom fastfeed.feed import Feed\nfrom fastfeed.shm import ShmSpaceError\n"
            "if __name__ == '__main__':\n"
            "    try:\n        Feed(replay=sys.argv[1], workers=4, ring_capacity=1 << 24).start()\n"
            "    except ShmSpaceError as e:\n        print('refused:', e)\n")
    r = in_small_shm(sys.executable, "-c", code, str(capture))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("refused: shared memory: /dev/shm has ") and "4 worker(s) (each a 16.0 MiB input ring and a 16.0 MiB output ring) need 132." in r.stdout


def test_a_worker_restart_is_said_on_stderr(tmp_path, capture):
    script = tmp_path / "kill.py"
    script.write_text(
        "import os, signal, sys, time\nfrom fastfeed.feed import Feed\n"
        "if __name__ == '__main__':\n"
        "    with Feed(replay=sys.argv[1], workers=1, speed=0.5) as feed:\n"
        "        deadline = time.monotonic() + 60\n"
        "        while feed.stats()['frames'] == 0 and time.monotonic() < deadline:\n"
        "            feed.poll(0.05)\n"
        "        os.kill(feed._pool.pids()[0], signal.SIGKILL)\n"
        "        while feed.stats()['worker_restarts'] == 0 and time.monotonic() < deadline:\n"
        "            feed.poll(0.05)\n"
        "        print('restarts', feed.stats()['worker_restarts'])\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, str(script), str(capture)], capture_output=True,
                       text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "restarts 1"
    assert "worker 0 died (killed by signal 9); starting it again (restart 1)" in r.stderr
