"""The decoder's benchmark scripts still run and still measure what they say, on tiny corpora.

Benchmarks never gate on speed (that is benchmarks/RESULTS.md's business); these only keep
the scripts from rotting between the sessions that run them: every kind and layout is in
the table, every time is a positive number, and bench_decode_c's two builds of the C core
agree on every frame's outcome.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
LAYOUTS = ("compact", "spaced", "sorted", "reordered", "pretty")


def _run(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_bench_decode_measures_every_kind_and_layout():
    out = json.loads(_run("bench_decode.py", "--messages", "300", "--repeat", "1", "--kinds",
                          "ticks,bars,mixed", "--json"))
    from fastfeed import Decoder

    assert f"decoder's vector unit {Decoder().simd}" in out["machine"]
    got = {(r["kind"], r["layout"]) for r in out["results"]}
    want = {(k, lay) for k in ("ticks", "bars", "mixed") for lay in LAYOUTS} | {("mixed", "realistic")}
    assert got == want
    for r in out["results"]:
        for contender in ("fastfeed", "orjson + arrays", "msgspec"):
            assert math.isfinite(r[contender]) and r[contender] > 0, r


@pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("git") is None
                    or not (ROOT / ".git").exists(), reason="needs gcc and a git checkout")
def test_bench_decode_c_builds_both_revisions_and_they_agree():
    """It exits non-zero when the two builds of ff_decode_frame disagree on a corpus."""
    out = _run("bench_decode_c.py", "--messages", "300", "--rounds", "1", "--passes", "1",
               "--kinds", "ticks,mixed", "--layouts", "compact,reordered")
    rows = [line for line in out.splitlines() if line.startswith("| ticks") or line.startswith("| mixed")]
    assert len(rows) == 4, out
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert float(cells[2]) > 0 and float(cells[3]) > 0, line
