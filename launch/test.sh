#!/usr/bin/env bash
# Installs what mdopt needs, then, in order:
#   1. builds it with its tests into build/ and runs the whole suite;
#   2. runs the whole suite again with OpenBLAS forced to its Haswell (AVX2) kernels;
#   3. builds it with AddressSanitizer + UndefinedBehaviorSanitizer into build-asan/ and
#      runs the whole suite there (launch/test-sanitizers.sh).
# Each step prints ctest's summary and a one-line count of skipped tests with their reasons;
# the first failing step stops the script. Tests that need a GPU skip.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${MDOPT_BUILD_DIR:-$root/build}"
elapsed() { echo "mdopt: $1 took $(( $(date +%s) - $2 )) s"; }
"$root/launch/install-deps.sh"
# Waiting OpenMP threads sleep instead of spinning. On shared or oversubscribed vCPUs (CI
# runners, a VM with neighbours) libgomp's spinning threads steal the time of the working
# ones: a checkpoint test that takes 0.2 s took 18 s next to another build. Results do not
# depend on it; only idle time does.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-passive}"

t0=$(date +%s)
MDOPT_BUILD_DIR="$build" "$root/launch/build.sh" -DMDOPT_BUILD_TESTS=ON
elapsed "build" "$t0"
# One test at a time: every test already runs OpenMP on all cores, and two at once make
# their threads spin against each other (serially a pass takes about ten minutes on 2
# cores; with -j2 it gets slower, not faster).
t0=$(date +%s)
echo "mdopt: [1/3] the suite"
ctest --test-dir "$build" --output-on-failure --timeout 900
python3 "$root/launch/skip-reasons.py" "$build"
elapsed "[1/3] the suite" "$t0"

# OpenBLAS picks its kernels for the CPU it runs on (AVX-512 ones on SkylakeX and later,
# AVX2 ones on Haswell/Zen). CI machines may be either, so the suite also runs with the
# AVX2 kernels forced: results that hold with one kernel family only would be a bug.
t0=$(date +%s)
echo "mdopt: [2/3] the suite with OPENBLAS_CORETYPE=Haswell (AVX2 kernels)"
OPENBLAS_CORETYPE=Haswell ctest --test-dir "$build" --output-on-failure --timeout 900
python3 "$root/launch/skip-reasons.py" "$build"
elapsed "[2/3] the suite with AVX2 kernels" "$t0"

t0=$(date +%s)
echo "mdopt: [3/3] the suite under AddressSanitizer + UndefinedBehaviorSanitizer"
"$root/launch/test-sanitizers.sh"
python3 "$root/launch/skip-reasons.py" "${MDOPT_SANITIZE_BUILD_DIR:-$root/build-asan}"
elapsed "[3/3] the sanitizer build and suite" "$t0"
echo "mdopt: all test steps passed"
