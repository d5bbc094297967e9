"""The package's types, as a user's type checker sees them (mypy, as msgspec's tests do)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "typing" / "user_script.py"

pytest.importorskip("mypy")


def _mypy(*args: str) -> subprocess.CompletedProcess[str]:
    # --follow-imports=silent: fastfeed's own modules are analysed (their types are what the
    # script sees) but not reported on, as for an installed package in site-packages.
    return subprocess.run([sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent",
                           "--no-incremental", "--cache-dir=/dev/null", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=170)


def test_a_user_script_passes_mypy_strict(tmp_path):
    r = _mypy(str(SCRIPT))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Success: no issues found" in r.stdout


def test_the_public_names_are_typed_not_any(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from fastfeed import Batch, Decoder, Feed, load_settings\n"
        "f = Feed(workers=0)\n"
        "reveal_type(f)\n"
        "reveal_type(f.poll(0.1))\n"
        "reveal_type(iter(f))\n"
        "reveal_type(f.symbols)\n"
        "reveal_type(Decoder().decode([b'']))\n"
        "reveal_type(Decoder().decode([b'']).ticks)\n"
        "reveal_type(load_settings)\n"
        "f.poll('soon')\n")
    r = _mypy(str(probe))
    out = r.stdout
    assert 'Revealed type is "fastfeed.feed.Feed"' in out, out
    assert 'Revealed type is "fastfeed.batch.Batch | None"' in out, out
    assert 'Revealed type is "typing.Iterator[fastfeed.batch.Batch]"' in out, out
    assert 'Revealed type is "fastfeed._decoder.SymbolTable | list[str]"' in out, out
    assert 'Revealed type is "fastfeed.batch.Batch"' in out, out
    assert "numpy.dtype[numpy.void]" in out, out
    assert "-> fastfeed.config.Settings" in out, out
    # a wrong call is caught: the signature is real, not Any
    assert 'Argument 1 to "poll" of "Feed" has incompatible type "str"' in out, out


def test_the_package_ships_its_types():
    assert (ROOT / "fastfeed" / "py.typed").exists()
    for ext in ("_decoder", "_ring", "_listener"):
        assert (ROOT / "fastfeed" / f"{ext}.pyi").exists(), ext
    import tomllib

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert set(cfg["tool"]["setuptools"]["package-data"]["fastfeed"]) >= {"py.typed", "*.pyi"}
