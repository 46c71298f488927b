#!/usr/bin/env bash
# Builds mdopt with AddressSanitizer and UndefinedBehaviorSanitizer into
# ${MDOPT_SANITIZE_BUILD_DIR:-build-asan} (every target, -O1 -g1) and runs the whole ctest
# suite there. Any ASan report or UB fails the test that triggered it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${MDOPT_SANITIZE_BUILD_DIR:-$root/build-asan}"
jobs="$(nproc 2>/dev/null || echo 2)"
# Leak checking is off: libgomp's thread pool and OpenBLAS's per-thread buffers are
# allocated once per process and deliberately never freed, and LeakSanitizer reports them
# (from uninstrumented libraries, at exit of every test program, including gtest's test
# discovery at build time). Use-after-free, overflows and UB are still fatal.
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=0:abort_on_error=0:halt_on_error=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
# Sleeping rather than spinning OpenMP waits (see launch/test.sh).
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-passive}"
# No CUDA here: ASan's shadow memory and the CUDA driver only coexist with
# protect_shadow_gap=0, and the CUDA targets (whose tests skip without a GPU anyway) would
# add minutes to the build; the normal build compiles and runs them (docs/cuda.md).
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DMDOPT_BUILD_TESTS=ON \
  -DMDOPT_SANITIZE=address,undefined -DMDOPT_CUDA=OFF "$@"
cmake --build "$build" -j "$jobs"
# One test at a time, as in launch/test.sh.
ctest --test-dir "$build" --output-on-failure --timeout 1800
