#!/usr/bin/env bash
# The main job: install what mdopt needs, build it, and run two short demos.
#  1. mdopt-bench steps a GPT-shaped parameter set (5.8 M parameters) with md-muon, muon,
#     md-adamw and adamw and prints the time of each against the float64 reference engine,
#     what MD decoupling costs over plain Muon and AdamW, and optimizer-state bytes per
#     parameter, with a legend (14 s on 2 idle Zen 4 vCPUs).
#  2. integration/examples/train_gpt.py trains a 0.46 M-parameter byte-level GPT on Debian's
#     fortunes (real English text shipped by the distribution) for 300 steps with md-muon
#     through mdopt's Python package, and with torch's own AdamW and Muon as references, then
#     prints each one's validation loss (nats per byte) and writes a CSV and a PNG of the loss,
#     gradient norm and relative updates (75 s on 2 idle Zen 4 vCPUs: 24 s md-muon, 19 s
#     AdamW, 26 s Muon, plus loading torch; several times that on cores shared with other
#     work). Both come after the build, under 4 minutes on 2 vCPUs (and, on a fresh
#     machine, the installation of torch, a download of several GB). The demo builds into its own folder (build-demo,
# without tests), so that "Building by hand" in the README, into build/, still gets the
# test suite.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${MDOPT_DEMO_BUILD_DIR:-$root/build-demo}"
"$root/launch/install-deps.sh"
MDOPT_BUILD_DIR="$build" "$root/launch/build.sh" -DMDOPT_BUILD_TESTS=OFF
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "mdopt: a GPU is present; these demos run on the CPU (the GPU check and benchmarks:"
  echo "  launch/build-cuda.sh, then launch/device-check.sh; docs/cuda.md)."
fi
threads="$(nproc 2>/dev/null || echo 2)"
# 12 timed steps after 2 warm-up ones, medians: steady on a small shared VM.
"$build/integration/tools/mdopt-bench" --d-model 256 --layers 2 --vocab 8192 \
  --presets md-muon,muon,md-adamw,adamw --steps 12 --warmup 2 --threads "$threads" \
  --reference --reference-steps 2

echo
echo "mdopt: demo 2 of 2: training a small GPT on Debian's fortunes, md-muon (mdopt) against"
echo "torch.optim.AdamW and torch.optim.Muon, same model, data, seed and LR schedule (linear"
echo "decay, no warmup); losses in nats per byte (a uniform guess over bytes is 5.55)."
out="$build/train_gpt"
MDOPT_LIBRARY="$build/dist_opt/libmdopt.so.1" OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-passive}" \
  python3 "$root/integration/examples/train_gpt.py" \
  --optimizer md-muon,torch-adamw,torch-muon --threads "$(( threads < 4 ? threads : 4 ))" \
  --out-dir "$out"  # a model this small gains nothing from more threads
echo "mdopt: the plot is $out/train_gpt.png; docs/examples.md says how to read it, and how to"
echo "run the learning-rate sweep (integration/examples/lr_sweep.py)."
