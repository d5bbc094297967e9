"""Is a change to the decoder faster where it counts, in the extension a user imports?

This checkout's ``fastfeed._decoder`` against another revision's, both built the way
``setup.py`` builds them, timed by ``Decoder.decode`` on bench_decode.py's corpora, in one
run: each round starts one process per build, in turn, so that a slower minute on a shared
machine hits both alike; the table gives the best round of each and their ratio.

Why not ``bench_decode_c.py`` (``ff_decode_frame`` alone, built by hand)?  The two builds
inline differently: inside the large unit Cython makes, GCC left small ``static inline``
helpers out of line that the small ``decode_c.c`` unit inlined, and a change measured
there as neutral was 5-8% either way here (session 11).  Use that one to look inside the C,
this one to decide.  Needs git, a C compiler and Cython (the build's own requirements).

    python benchmarks/bench_decode_ab.py [--against REV] [--kinds ticks,mixed]
                                         [--layouts compact,reordered] [--rounds 3]
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import bench_decode  # noqa: E402  (the corpora: one definition for every decoder benchmark)

SO_GLOB = "_decoder.*.so"


def build_revision(rev: str, into: str) -> str:
    """The decoder extension of ``rev``, built in a scratch tree; the path of its .so."""
    tree = os.path.join(into, "tree")
    os.mkdir(tree)
    r = subprocess.run(["git", "-C", ROOT, "archive", "--format=tar", rev, "setup.py", "pyproject.toml",
                        "ext", "fastfeed", "benchmarks"], capture_output=True, timeout=120)
    if r.returncode:
        raise SystemExit(f"bench_decode_ab: git archive {rev}: {r.stderr.decode().strip()}")
    with tarfile.open(fileobj=io.BytesIO(r.stdout)) as tar:
        tar.extractall(tree, filter="data")
    env = dict(os.environ, FASTFEED_ONLY="fastfeed._decoder")
    b = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree, env=env,
                       capture_output=True, text=True, timeout=900)
    found = glob.glob(os.path.join(tree, "fastfeed", SO_GLOB))
    if b.returncode or not found:
        raise SystemExit(f"bench_decode_ab: building {rev} failed:\n{(b.stdout + b.stderr)[-3000:]}")
    return found[0]


def this_build() -> str:
    found = glob.glob(os.path.join(ROOT, "fastfeed", SO_GLOB))
    if not found:
        raise SystemExit("bench_decode_ab: no built extension in this checkout "
                         "(python setup.py build_ext --inplace)")
    return found[0]


def time_one(so: str, corpora: str, names: list[str], repeat: int) -> dict[str, float]:
    """In a child process: ns a message, best of ``repeat`` decodes, for each corpus."""
    spec = importlib.util.spec_from_file_location("fastfeed._decoder", so)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fastfeed._decoder"] = mod
    spec.loader.exec_module(mod)
    with open(corpora, "rb") as f:
        frames = pickle.load(f)
    out = {}
    for name in names:
        dec = mod.Decoder()  # one per corpus: a stream
        dec.decode(frames[name], recv_ts=0)  # warm: tables, learned bytes, caches
        best = float("inf")
        for _ in range(repeat):
            t = time.perf_counter_ns()
            dec.decode(frames[name], recv_ts=0)
            best = min(best, (time.perf_counter_ns() - t) / len(frames[name]))
        out[name] = best
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", default="HEAD", help="the git revision to compare with (default HEAD)")
    ap.add_argument("--kinds", default=",".join(bench_decode.KINDS))
    ap.add_argument("--layouts", default="compact,reordered,realistic")
    ap.add_argument("--messages", type=int, default=50_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=7, help="decodes of each corpus a round (best taken)")
    ap.add_argument("--child", nargs=3, metavar=("SO", "CORPORA", "NAMES"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        so, corpora, names = args.child
        print(json.dumps(time_one(so, corpora, names.split(","), args.repeat)))
        return 0
    if not shutil.which("git"):
        print("bench_decode_ab: needs git", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="bench_decode_ab.") as tmp:
        builds = {args.against: build_revision(args.against, tmp), "this checkout": this_build()}
        frames = {f"{kind}/{layout}": fr for kind, layout, fr in
                  bench_decode.corpora(args.kinds.split(","), args.layouts.split(","), args.messages)}
        names = list(frames)
        corpora = os.path.join(tmp, "corpora.pickle")
        with open(corpora, "wb") as f:
            pickle.dump(frames, f)
        best = {b: {n: float("inf") for n in names} for b in builds}
        for _ in range(args.rounds):
            for b, so in builds.items():
                r = subprocess.run([sys.executable, os.path.abspath(__file__), "--repeat", str(args.repeat),
                                    "--child", so, corpora, ",".join(names)],
                                   capture_output=True, text=True, timeout=1800)
                if r.returncode:
                    raise SystemExit(f"bench_decode_ab: timing {b} failed:\n{r.stderr[-3000:]}")
                for n, ns in json.loads(r.stdout).items():
                    best[b][n] = min(best[b][n], ns)

    a, b = args.against, "this checkout"
    print(f"machine: {bench_decode.machine()}")
    print(f"Decoder.decode, {args.messages} messages per corpus, best of {args.rounds} rounds x "
          f"{args.repeat} decodes\n")
    print(f"| kind | layout | {a} ns/msg | this checkout ns/msg | vs. {a} | {a} vs. compact "
          f"| this checkout vs. compact |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for n in names:
        kind, layout = n.split("/")
        base = f"{kind}/compact"
        rel = ((f"{best[a][n] / best[a][base]:.2f}x", f"{best[b][n] / best[b][base]:.2f}x")
               if base in best[a] else ("", ""))
        print(f"| {kind} | {layout} | {best[a][n]:.1f} | {best[b][n]:.1f} | {best[a][n] / best[b][n]:.2f}x "
              f"| {rel[0]} | {rel[1]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
