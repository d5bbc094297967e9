#!/usr/bin/env bash
# The guard-page fuzz target (fuzz_guard.py) under an ASan + UBSan build of the decoder.
#
#   bash tests/fuzz/run_guard.sh [libFuzzer flags]      e.g. -runs=200000
#
# The sanitizer build goes to a scratch copy of the package (FASTFEED_SAN_DIR, default a
# new temporary directory, removed at the end unless given): the checkout's own build,
# the one the tests use, is left as it is.  The fuzzer works on a scratch copy of the
# seed corpus (libFuzzer adds what it finds to it); FASTFEED_FUZZ_CORPUS keeps it.
# Exits non-zero on a crash, a sanitizer report or a mismatch with the reference.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"

san="${FASTFEED_SAN_DIR:-}"
keep_san=1
if [ -z "$san" ]; then
  san="$(mktemp -d)"
  keep_san=0
fi
corpus="${FASTFEED_FUZZ_CORPUS:-}"
keep_corpus=1
if [ -z "$corpus" ]; then
  corpus="$(mktemp -d)"
  keep_corpus=0
fi
cleanup() {
  [ "$keep_san" = 1 ] || rm -rf "$san"
  [ "$keep_corpus" = 1 ] || rm -rf "$corpus"
}
trap cleanup EXIT

# The sanitizer runtime: atheris' own asan_with_fuzzer.so (LLVM's ASan and UBSan runtimes
# with libFuzzer in one library), preloaded, and the module built without a runtime of
# its own (FASTFEED_SANITIZE_RUNTIME=preload), whose __asan_*/__ubsan_* calls it serves.
# GCC's libasan.so would do for the sanitizers, but preloaded it also answers libFuzzer's
# coverage callbacks with its own stubs: atheris then sees no coverage at all and the
# corpus collapses to one input.  So it is only the fallback.
py="$(python3 -c 'import sys; print(sys.executable)')"  # the real one: a shim is a script
runtime="$("$py" -c 'import atheris, os; print(os.path.join(atheris.path(), "asan_with_fuzzer.so"))')"
link=preload
if [ ! -e "$runtime" ]; then
  runtime="$(gcc -print-file-name=libasan.so)"
  link=linked
  echo "run_guard: no asan_with_fuzzer.so; using $runtime (no coverage guidance)" >&2
fi

# The package's Python files and the checkout's built modules (fastfeed/__init__ imports
# _ring too), with _decoder rebuilt from a fresh Cython translation in debug mode.
if ! compgen -G "$root/fastfeed/_ring.*.so" >/dev/null; then
  echo "run_guard: build the package first (python3 setup.py build_ext --inplace)" >&2
  exit 1
fi
mkdir -p "$san" "$corpus"
cp -r "$root/setup.py" "$root/pyproject.toml" "$root/README.md" "$root/ext" "$root/fastfeed" "$san/"
rm -f "$san"/ext/*.c "$san"/fastfeed/_decoder.*.so
(cd "$san" && FASTFEED_SANITIZE=1 FASTFEED_SANITIZE_RUNTIME=$link FASTFEED_ONLY=fastfeed._decoder \
  "$py" setup.py -q build_ext --inplace >"$san/build.log" 2>&1) || {
  tail -n 40 "$san/build.log"
  exit 1
}
cp -n "$root"/tests/fuzz/corpus/* "$corpus"/ 2>/dev/null || true

# From the checkout's root: the target finds fastfeed on PYTHONPATH, the scratch copy
# first (a script's own folder, not the working directory, leads sys.path).
cd "$root"
env PYTHONPATH="$san${PYTHONPATH:+:$PYTHONPATH}" \
  FASTFEED_EXPECT_SANITIZED=1 \
  LD_PRELOAD="$runtime" \
  ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1" \
  UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1" \
  "$py" tests/fuzz/fuzz_guard.py -max_len=4096 -rss_limit_mb=4096 "$@" "$corpus"
