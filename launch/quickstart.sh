#!/usr/bin/env bash
# The main job: install what mdopt needs, build it, and run a short demo that trains-steps a
# GPT-shaped parameter set with md-muon, muon, md-adamw and adamw and prints the speed of
# each against the float64 reference engine, plus optimizer-state bytes per parameter.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${MDOPT_BUILD_DIR:-$root/build}"
"$root/launch/install-deps.sh"
MDOPT_BUILD_DIR="$build" "$root/launch/build.sh" -DMDOPT_BUILD_TESTS=OFF
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "mdopt: a GPU is present, but this build has no CUDA backend yet; running on the CPU."
fi
threads="$(nproc 2>/dev/null || echo 2)"
"$build/integration/tools/mdopt-bench" --d-model 256 --layers 2 --vocab 8192 \
  --presets md-muon,muon,md-adamw,adamw --steps 5 --warmup 1 --threads "$threads" --reference
