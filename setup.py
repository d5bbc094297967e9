"""Build the Cython extensions of fastfeed. Everything else lives in pyproject.toml.

Environment switches (all off by default):
  FASTFEED_DEBUG=1      -O0 -g, Cython bounds and wraparound checks on, asserts kept
  FASTFEED_SANITIZE=1   AddressSanitizer + UndefinedBehaviorSanitizer (implies debug)
  FASTFEED_SANITIZE_RUNTIME=preload
                        ...with the sanitizer runtimes left unlinked: the process must
                        LD_PRELOAD one, as the fuzz targets do with atheris'
                        asan_with_fuzzer.so (see tests/fuzz/run_guard.sh)
  FASTFEED_ANNOTATE=1   write Cython's HTML annotation next to each .pyx
  FASTFEED_ONLY=a,b     build only these extension modules
"""

import os
import sys

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0", "false", "no")


SANITIZE = _flag("FASTFEED_SANITIZE")
DEBUG = _flag("FASTFEED_DEBUG") or SANITIZE
ANNOTATE = _flag("FASTFEED_ANNOTATE")

# Set once for every module: the hot loops index raw buffers whose bounds
# the code has already checked, so Cython's own checks are pure overhead.
DIRECTIVES = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "cdivision": True,
    "initializedcheck": DEBUG,
    "nonecheck": False,
    "embedsignature": True,
    "freethreading_compatible": False,
}

cflags = ["-std=gnu11"]
ldflags: list[str] = []
if DEBUG:
    cflags += ["-O0", "-g3", "-UNDEBUG"]
else:
    cflags += ["-O3", "-fno-strict-aliasing"]
if SANITIZE:
    san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
    cflags += san
    # "preload": no runtime linked (its symbols stay undefined), so that the one the
    # process preloads serves them, and no second ASan runtime comes in with the module.
    if os.environ.get("FASTFEED_SANITIZE_RUNTIME", "") != "preload":
        ldflags += san

MODULES = {
    "fastfeed._decoder": ["ext/decoder.pyx"],
    "fastfeed._ring": ["ext/ring.pyx"],
    "fastfeed._listener": ["ext/listener.pyx"],
    "fastfeed._capture": ["ext/capture.pyx"],
}
# C loops that only the benchmarks time (benchmarks/_loops.pyx): built in place for a source
# tree (`build_ext --inplace`, or FASTFEED_BENCH=1), never into a wheel, where they would land
# in site-packages as a top-level "benchmarks".
if "--inplace" in sys.argv or "-i" in sys.argv or os.environ.get("FASTFEED_BENCH") == "1":
    MODULES["benchmarks._loops"] = ["benchmarks/_loops.pyx"]
# FASTFEED_ONLY=fastfeed._ring,... builds a subset (handy while developing one module).
_only = [m for m in os.environ.get("FASTFEED_ONLY", "").split(",") if m]
if _only:
    MODULES = {k: v for k, v in MODULES.items() if k in _only}

extensions = [
    Extension(
        name,
        sources,
        include_dirs=["ext", numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_2_0_API_VERSION")],
        extra_compile_args=cflags,
        extra_link_args=ldflags,
    )
    for name, sources in MODULES.items()
    if all(os.path.exists(s) for s in sources)
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives=DIRECTIVES,
        annotate=ANNOTATE,
        include_path=["ext"],
        gdb_debug=DEBUG,
    ),
)
