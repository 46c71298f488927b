#!/usr/bin/env bash
# The main job: install what mdopt needs, build it, and run a short demo that steps a
# GPT-shaped parameter set (5.8 M parameters) with md-muon, muon, md-adamw and adamw and
# prints the time of each against the float64 reference engine, what MD decoupling costs
# over plain Muon and AdamW, and optimizer-state bytes per parameter, with a legend. The
# demo itself takes about 25 s on 2 vCPUs (AMD EPYC Zen 3), after a build of a few minutes.
# The demo builds into its own folder (build-demo, without tests), so that
# "Building by hand" in the README, into build/, still gets the test suite.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${MDOPT_DEMO_BUILD_DIR:-$root/build-demo}"
"$root/launch/install-deps.sh"
MDOPT_BUILD_DIR="$build" "$root/launch/build.sh" -DMDOPT_BUILD_TESTS=OFF
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "mdopt: a GPU is present, but this version has no CUDA backend; running on the CPU."
fi
threads="$(nproc 2>/dev/null || echo 2)"
# 12 timed steps after 2 warm-up ones, medians: steady on a small shared VM.
"$build/integration/tools/mdopt-bench" --d-model 256 --layers 2 --vocab 8192 \
  --presets md-muon,muon,md-adamw,adamw --steps 12 --warmup 2 --threads "$threads" \
  --reference --reference-steps 2
