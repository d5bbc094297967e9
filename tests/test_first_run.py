"""The README's first command as a new user runs it: from a clone's root, after installing.

``pip install . && fastfeed demo`` run in the clone's root leaves the source tree (no
compiled extensions) in the working directory. Every process fastfeed starts must import the
installed package, never that tree. A test that makes a venv and builds the extensions takes
minutes; this one stands in for it exactly: the "installed" package is this checkout (built
in place, on PYTHONPATH, as site-packages would be), the entry point is a script outside the
tree (as pip's console script is), and the working directory is a copy of the source tree
without any ``.so``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

ENTRY = """\
import sys
from fastfeed.cli import main
if __name__ == "__main__":
    sys.exit(main())
"""


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    """A copy of the source tree as a fresh clone has it: sources, no built extensions."""
    dst = tmp_path / "clone"
    shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(
        "*.so", "build", ".git", "__pycache__", "*.c", ".pytest_cache", "*.egg-info"))
    assert not list((dst / "fastfeed").glob("*.so"))
    # Here the tree without extensions may still import (an editable install elsewhere can
    # serve the missing modules); on a fresh machine it fails. Make it fail here too, and
    # say why: any process that imports the tree in its working directory ends with this.
    init = dst / "fastfeed" / "__init__.py"
    init.write_text("raise ImportError('imported the source tree in the working directory, "
                    "not the installed package')\n" + init.read_text())
    return dst


def _installed_cli(tmp_path: Path, clone: Path, *args: str, timeout: float = 120,
                   env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    entry = bindir / "fastfeed"
    entry.write_text(ENTRY)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)  # the installed package
    env.update(env_extra or {})
    return subprocess.run([sys.executable, str(entry), *args], cwd=clone, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_the_shadowing_tree_really_shadows(tmp_path, clone):
    """The copy is a real trap: a plain ``python -m fastfeed`` run there imports it and fails."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    r = subprocess.run([sys.executable, "-m", "fastfeed", "sim", "--help"], cwd=clone, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "not the installed package" in r.stderr


def test_demo_from_a_clone_root_runs(tmp_path, clone):
    r = _installed_cli(tmp_path, clone, "demo", "--duration", "3", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["frames"] > 1000 and out["errors"] == 0 and out["ticks"] > 0


def test_demo_plain_display_says_units_quotes_and_how_it_ends(tmp_path, clone):
    r = _installed_cli(tmp_path, clone, "demo", "--duration", "3")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "runs for 3 s" in out  # says how long, up front
    assert "frames/s" in out and "µs" in out  # units on the live line
    assert "bid" in out and "ask" in out  # the latest quotes
    assert "fastfeed[live]" in out  # how to get the rich table
    assert "stopped after 3 s (--duration)" in out  # why it ended
    assert "next:" in out  # what to try next
    assert "Traceback" not in r.stderr


SITE_HOOK = """\
import os, sys
if "sim" in sys.orig_argv:  # only the simulator's process fails, as a broken import would
    sys.stderr.write("Traceback (most recent call last):\\n  File \\"x.py\\", line 1\\n"
                     "ModuleNotFoundError: boom: the simulator cannot start\\n")
    sys.stderr.flush()
    os._exit(1)
"""


def test_a_child_that_cannot_start_shows_its_whole_error_once(tmp_path, clone):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITE_HOOK)
    r = _installed_cli(tmp_path, clone, "demo", "--duration", "2",
                       env_extra={"PYTHONPATH": f"{hook}{os.pathsep}{ROOT}"})
    assert r.returncode == 1, r.stderr
    err = r.stderr
    assert err.startswith("fastfeed: error: the simulator did not start"), err
    assert err.count("boom: the simulator cannot start") == 1, err
    assert "Traceback (most recent call last)" in err  # its last lines, whole


@pytest.mark.timeout(900)  # a package build with its own build environment
@pytest.mark.skipif(not os.environ.get("FASTFEED_VENV_TEST"),
                    reason="builds the package in a fresh venv (about 2 min, needs the package "
                           "index): set FASTFEED_VENV_TEST=1")
def test_pip_install_then_demo_in_a_fresh_venv_from_the_clone_root(tmp_path):
    """The README's first command, for real: a clean clone, a new venv, ``pip install .``,
    then ``fastfeed demo`` run in the clone's root."""
    clone, venv = tmp_path / "clone", tmp_path / "venv"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "."], cwd=clone, env=env,
                   check=True, timeout=900)
    r = subprocess.run([str(venv / "bin" / "fastfeed"), "demo", "--duration", "5", "--json"],
                       cwd=clone, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["frames"] > 1000
