#!/usr/bin/env bash
# Builds what launch/device-check.sh runs on a GPU machine, on a machine without one: the
# CUDA tests and mdopt-cuda-bench for Hopper (sm_90), with Abseil linked statically and no
# MPI, into ${MDOPT_CUDA_BUILD_DIR:-build-cuda}, then copies the programs into its
# device-bin/ (a few MiB: what travels to the GPU machine). Needs nvcc, cuBLASLt and NCCL.
# Extra arguments go to cmake's configure step (e.g. -DCMAKE_CUDA_ARCHITECTURES=90a).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${MDOPT_CUDA_BUILD_DIR:-$root/build-cuda}"
jobs="$(nproc 2>/dev/null || echo 2)"
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DMDOPT_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES=90 -DMDOPT_STATIC_ABSL=ON -DMDOPT_MPI=OFF \
  -DMDOPT_BUILD_TESTS=ON -DMDOPT_BUILD_TOOLS=OFF "$@"
targets=(cuda_fused_passes_test cuda_newton_schulz_test nccl_comm_test mdopt-cuda-bench)
cmake --build "$build" -j "$jobs" --target "${targets[@]}"
bin="$build/device-bin"
rm -rf "$bin"
mkdir -p "$bin"
cp "$build/tests/cuda/cuda_fused_passes_test" "$build/tests/cuda/cuda_newton_schulz_test" \
  "$build/tests/cuda/nccl_comm_test" "$build/kernels/cuda/mdopt-cuda-bench" "$bin/"
# What the GPU machine must provide: the CUDA driver, cuBLASLt, NCCL, the C++ runtime.
for f in "$bin"/*; do
  echo "$(basename "$f"): $(ldd "$f" | awk '{print $1}' | grep -v -E '^(linux-vdso|/lib64/ld-linux)' | sort | tr '\n' ' ')"
done
du -sh "$bin"
