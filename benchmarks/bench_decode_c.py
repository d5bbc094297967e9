"""Is a change to the decoder's C core faster?  This checkout's ``ext/decode.h`` against
another revision's, on bench_decode.py's corpora, in one run.

``benchmarks/decode_c.c`` times ``ff_decode_frame`` alone (no Python objects, no arrays),
built twice with gcc: against this checkout's ``ext/`` and against ``git show REV:ext/...``.
The two binaries run in turn on every corpus (``--rounds`` times each, ``--passes`` passes a
run), so that a burst of load from elsewhere hits both alike; the table gives the best pass
of each and their ratio.  On a shared 2-core VM the speed drifts by 10-15 % within an hour:
only the ratio within one run means anything.  Needs gcc, git and the Python headers.

It looks inside the C; it does not decide.  ``decode_c.c`` is a small unit, and GCC inlines
there what it leaves out of line in the extension's large one: a change this measures as
neutral moved the extension by 5-8% (session 11).  ``bench_decode_ab.py`` times what users
import.

    python benchmarks/bench_decode_c.py [--against REV] [--kinds ticks,mixed]
                                        [--layouts compact,pretty] [--messages N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import struct
import subprocess
import sys
import sysconfig
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import bench_decode  # noqa: E402  (the corpora: one definition for both benchmarks)


def build(include: str, out: str) -> None:
    """decode_c.c against the decode.h and symtab.h in ``include``."""
    paths = sysconfig.get_paths()
    libdir = sysconfig.get_config_var("LIBDIR")
    ldlib = sysconfig.get_config_var("LDLIBRARY") or ""
    lib = ldlib[3:].split(".so")[0].split(".a")[0] if ldlib.startswith("lib") else "python3"
    # the flags the extension is built with (Python's NDEBUG and wrapv, setup.py's -O3)
    cmd = ["gcc", "-O3", "-DNDEBUG", "-fwrapv", "-fno-strict-aliasing", "-std=gnu11",
           f"-I{include}", f"-I{paths['include']}", os.path.join(HERE, "decode_c.c"), f"-L{libdir}", f"-l{lib}", f"-Wl,-rpath,{libdir}", "-o", out]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if r.returncode:
        raise SystemExit(f"bench_decode_c: building against {include} failed:\n{r.stderr[-2000:]}")


def checkout_headers(rev: str, into: str) -> None:
    for name in ("decode.h", "symtab.h"):
        r = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:ext/{name}"], capture_output=True, timeout=60)
        if r.returncode:
            raise SystemExit(f"bench_decode_c: git show {rev}:ext/{name}: {r.stderr.decode().strip()}")
        with open(os.path.join(into, name), "wb") as f:
            f.write(r.stdout)


def run(binary: str, corpus: str, passes: int) -> tuple[int, float, int, int]:
    """(frames, best ns/frame, frames failed, rows)"""
    r = subprocess.run([binary, corpus, str(passes)], capture_output=True, text=True, timeout=600)
    if r.returncode:
        raise SystemExit(f"bench_decode_c: {binary} {corpus}: exit {r.returncode} {r.stderr.strip()}")
    n, best, _median, failed, rows = r.stdout.split()
    return int(n), float(best), int(failed), int(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", default="HEAD", help="the git revision to compare with (default HEAD)")
    ap.add_argument("--kinds", default=",".join(bench_decode.KINDS))
    ap.add_argument("--layouts", default=",".join(bench_decode.LAYOUTS) + ",realistic")
    ap.add_argument("--messages", type=int, default=50_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--passes", type=int, default=11)
    args = ap.parse_args(argv)
    if not shutil.which("gcc"):
        print("bench_decode_c: needs gcc", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="bench_decode_c.") as tmp:
        old = os.path.join(tmp, "old")
        os.mkdir(old)
        checkout_headers(args.against, old)
        bins = {args.against: os.path.join(tmp, "decode_old"), "this checkout": os.path.join(tmp, "decode_new")}
        build(old, bins[args.against])
        build(os.path.join(ROOT, "ext"), bins["this checkout"])

        rows = []
        for kind, layout, frames in bench_decode.corpora(args.kinds.split(","), args.layouts.split(","),
                                                         args.messages):
            path = os.path.join(tmp, f"{kind}_{layout}.bin")
            with open(path, "wb") as f:
                for frame in frames:
                    f.write(struct.pack("<I", len(frame)) + frame)
            best = {name: float("inf") for name in bins}
            outcome = {}
            for _ in range(args.rounds):
                for name, binary in bins.items():
                    n, ns, failed, nrows = run(binary, path, args.passes)
                    best[name] = min(best[name], ns)
                    outcome[name] = (failed, nrows)
            if len(set(outcome.values())) != 1:
                raise SystemExit(f"bench_decode_c: {kind}/{layout}: the two decoders disagree: {outcome}")
            rows.append((kind, layout, best[args.against], best["this checkout"]))

    print(f"machine: {bench_decode.machine()}")
    print(f"ff_decode_frame alone, {args.messages} messages per corpus, best of {args.rounds} x "
          f"{args.passes} passes\n")
    print(f"| kind | layout | {args.against} ns/frame | this checkout ns/frame | vs. {args.against} |")
    print("|---|---|---:|---:|---:|")
    for kind, layout, a, b in rows:
        print(f"| {kind} | {layout} | {a:.1f} | {b:.1f} | {a / b:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
