"""Misuse is one clear error: a lambda handler, a stopped feed, a script without the
``__main__`` guard, a missing optional dependency, an unwritable directory, a bad keyword."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fastfeed.feed import Feed
from tests.feedcheck import write_capture

ROOT = Path(__file__).resolve().parent.parent


def _env(extra_path: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, str(ROOT)) if p)
    return env


@pytest.fixture
def small_capture(tmp_path: Path) -> Path:
    return write_capture(tmp_path / "small.ffcap", (
        f'{{"c":"X:{i % 5}","t":1.5,"p":1.0,"v":1.0}}'.encode() for i in range(500)))


def module_level_handler(worker: int, batch: object) -> None:
    pass


def test_an_unpicklable_handler_is_a_type_error_naming_the_fix(small_capture):
    with pytest.raises(TypeError, match="module-level function or a functools.partial"):
        Feed(replay=str(small_capture), handler=lambda w, b: None)

    def nested(w: int, b: object) -> None:
        pass

    feed = Feed(replay=str(small_capture), workers=1)
    with pytest.raises(TypeError, match="cannot be sent to the worker processes"):
        feed.run(nested)
    # what can be pickled is accepted; inline (workers=0) nothing is pickled
    Feed(replay=str(small_capture), handler=functools.partial(module_level_handler))
    Feed(replay=str(small_capture), workers=0, handler=lambda w, b: None)


def test_a_stopped_feed_says_so(small_capture):
    feed = Feed(replay=str(small_capture), workers=1)
    first = feed.run()
    assert first["frames"] == 500
    for use in (feed.run, feed.start, lambda: next(iter(feed)), lambda: feed.poll(),
                lambda: feed.__enter__()):
        with pytest.raises(RuntimeError, match="the feed has stopped: a Feed runs once"):
            use()
    with Feed(replay=str(small_capture), workers=0) as feed2:
        assert sum(len(b.ticks) for b in feed2) == 500
    with pytest.raises(RuntimeError, match="has stopped"):
        list(feed2)


NO_GUARD = """\
import sys
from fastfeed.feed import Feed

print("side effect", flush=True)
Feed(replay=sys.argv[1], workers=2).run()
print("after run", flush=True)
"""

GUARDED = """\
import sys
from fastfeed.feed import Feed

def main():
    return Feed(replay=sys.argv[1], workers=2).run()

print("side effect", flush=True)
if __name__ == "__main__":
    s = main()
    print("frames", s["frames"], flush=True)
"""


def test_a_script_without_the_main_guard_is_one_clear_error(tmp_path, small_capture):
    script = tmp_path / "noguard.py"
    script.write_text(NO_GUARD)
    r = subprocess.run([sys.executable, str(script), str(small_capture)], capture_output=True,
                       text=True, timeout=120, env=_env(), cwd=tmp_path)
    assert r.returncode == 1
    assert r.stdout == "side effect\n"  # once: nothing of the script ran again in a child
    last = r.stderr.strip().splitlines()[-1]
    assert 'needs `if __name__ == "__main__":`' in last and "noguard.py, line 5" in last
    assert len(r.stderr.splitlines()) < 12  # not hundreds of lines of spawn tracebacks
    # with the guard: runs, and the script's top level runs again in no child either way
    # except as the module __mp_main__ (the guard keeps it from starting anything)
    script = tmp_path / "guarded.py"
    script.write_text(GUARDED)
    r = subprocess.run([sys.executable, str(script), str(small_capture)], capture_output=True,
                       text=True, timeout=120, env=_env(), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "frames 500"


def test_a_spawned_child_importing_a_script_without_guard_stops_at_once(tmp_path):
    """The check in the child: were the parent's check bypassed, a child that meets a Feed
    while importing the parent's script prints one line and exits, starting nothing."""
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent("""\
        import multiprocessing as mp, sys
        from fastfeed.feed import _check_main_guard

        def target():
            pass

        if __name__ == "__mp_main__":  # the child's import of this script
            print("child imported the script", flush=True)
            _check_main_guard()
            print("not reached", flush=True)
        if __name__ == "__main__":
            p = mp.get_context("spawn").Process(target=target)
            p.start()
            p.join(60)
            print("exit", p.exitcode, flush=True)
        """))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       timeout=120, env=_env(), cwd=tmp_path)
    assert r.stdout.splitlines() == ["child imported the script", "exit 1"], r
    assert r.stderr.strip().splitlines() == [
        'fastfeed: error: a script that starts a Feed needs `if __name__ == "__main__":` '
        "around the code that runs it: its worker processes are spawned and import the "
        "script again"]


BLOCK_PYARROW = """\
import sys
sys.modules["pyarrow"] = None  # as if it were not installed
"""


def test_record_parquet_without_pyarrow_is_one_line(tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(BLOCK_PYARROW)
    r = subprocess.run([sys.executable, "-m", "fastfeed", "record", "--out", str(tmp_path / "o"),
                        "--format", "parquet", "--host", "http://127.0.0.1:9", "--email", "a@b",
                        "--duration", "1"], capture_output=True, text=True, timeout=60,
                       env=_env(str(hook)), cwd=ROOT)
    assert r.returncode == 2, r.stderr
    assert r.stderr == ("fastfeed: error: --format parquet needs pyarrow: "
                        "pip install 'fastfeed[parquet]'\n")


def test_record_to_an_unwritable_place_is_one_line():
    r = subprocess.run([sys.executable, "-m", "fastfeed", "record", "--out", "/proc/forbidden",
                        "--host", "http://127.0.0.1:9", "--email", "a@b", "--duration", "1"],
                       capture_output=True, text=True, timeout=60, env=_env(), cwd=ROOT)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert r.stderr.startswith("fastfeed: error: --out /proc/forbidden: cannot write there")


def test_bad_keywords_and_values_name_the_setting():
    with pytest.raises(TypeError, match=r"'wrokers' \(did you mean 'workers'\?\)"):
        Feed(source="redis://127.0.0.1:6379/0?channel=x", wrokers=2)
    for kw in (dict(workers=2.5), dict(workers="2"), dict(ring_capacity=1000),
               dict(full_policy="x")):
        with pytest.raises(ValueError, match=next(iter(kw))):
            Feed(source="redis://127.0.0.1:6379/0?channel=x", **kw)
