#!/usr/bin/env bash
# Installs what mdopt needs, builds it with its tests, and runs the whole suite (ctest prints
# the summary; GoogleTest and the smoke tests print their own). Tests that need a GPU skip.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${MDOPT_BUILD_DIR:-$root/build}"
"$root/launch/install-deps.sh"
MDOPT_BUILD_DIR="$build" "$root/launch/build.sh" -DMDOPT_BUILD_TESTS=ON
# One test at a time: every test already runs OpenMP on all cores, and two at once make
# their threads spin against each other (the suite takes ~25 s serially on 2 cores,
# over twice that with -j2).
ctest --test-dir "$build" --output-on-failure --timeout 900
