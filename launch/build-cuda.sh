#!/usr/bin/env bash
# Builds, on a machine without a GPU, everything launch/device-check.sh runs on one, into ONE
# folder to copy to the GPU machine: ${MDOPT_CUDA_BUILD_DIR:-build-cuda}/device-bin/
#   - the CUDA test programs (cuda_backend_test, cuda_step_test, cuda_newton_schulz_test,
#     cuda_window_copy_test, cublaslt_api_test (cuBLASLt opened at first use),
#     nccl_comm_test) and mdopt-cuda-bench;
#   - libmdopt.so.1 with the CUDA backend, for the Python package (integration/python, which
#     travels with the working tree: device-check.sh puts it on PYTHONPATH and points
#     MDOPT_LIBRARY at this copy);
#   - syslibs.tar.xz: the Debian shared libraries those need beyond glibc, the C++ runtime,
#     the CUDA driver, cuBLASLt and NCCL (Abseil, OpenBLAS, OpenMP, oneDNN, Open MPI, ...),
#     xz'd; device-check.sh links in only those the GPU machine lacks;
#   - wheels/: megatron-core for the GPU machine's Python (MDOPT_DEVICE_WHEELS), when pip
#     can download it here;
#   - BUILD_INFO: the commit, the compiler, what each program needs.
# Hopper (sm_90) only, the CUDA runtime static, MPI when found (the 2-rank check). Abseil is
# linked shared and its libraries travel in syslibs.tar.xz: Debian's static archives cannot
# go into libmdopt.so (libabsl_cordz_functions.a holds initial-exec TLS relocations, which a
# shared object refuses), and one build tree serves the programs and the library alike.
# Prints the folder's size and fails above 56 MiB (what travels: the working tree plus this
# folder, 64 MiB). Needs nvcc, cuBLASLt, NCCL (MDOPT_CUDA=ON).
# A program listed above whose target does not exist yet is reported and left out; the
# device check then counts it as missing (a failure). Extra arguments go to cmake's configure
# step (e.g. -DCMAKE_CUDA_ARCHITECTURES=90a).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${MDOPT_CUDA_BUILD_DIR:-$root/build-cuda}"
case "$build" in /*) ;; *) build="$root/$build" ;; esac
jobs="$(nproc 2>/dev/null || echo 2)"
t0=$(date +%s)

cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DMDOPT_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES=90 -DMDOPT_STATIC_ABSL=OFF -DMDOPT_MPI=AUTO \
  -DMDOPT_BUILD_TESTS=ON -DMDOPT_BUILD_TOOLS=OFF "$@"

# The programs the check runs (launch/device-check.sh: required_tests) and where CMake puts them.
wanted=(cuda_backend_test cuda_step_test cuda_newton_schulz_test cuda_window_copy_test nccl_comm_test
        cublaslt_api_test mdopt-cuda-bench)
known="$(cmake --build "$build" --target help | sed -n 's/^\.\.\. \([^ ]*\).*/\1/p')"
targets=(mdopt)
absent=()
for t in "${wanted[@]}"; do
  if grep -qx -- "$t" <<<"$known"; then targets+=("$t"); else absent+=("$t"); fi
done
cmake --build "$build" -j "$jobs" --target "${targets[@]}"

bin="$build/device-bin"
rm -rf "$bin"
mkdir -p "$bin"
for t in "${targets[@]}"; do
  [ "$t" = mdopt ] && continue
  f="$(find "$build" -path "$bin" -prune -o -type f -name "$t" -perm -u+x -print | head -1)"
  [ -n "$f" ] || { echo "build-cuda: built $t but cannot find it under $build" >&2; exit 1; }
  cp "$f" "$bin/"
done
cp -L "$build/dist_opt/libmdopt.so.1" "$bin/libmdopt.so.1"

# The shared libraries beyond what every GPU machine has (glibc, the C++ runtime, the CUDA
# driver and toolkit libraries, NCCL): resolved here, packed once, linked in there only when
# missing. A program's RUNPATH into this build tree does not exist there, hence the copies.
is_base() {
  case "$1" in
    linux-vdso.so.*|ld-linux-x86-64.so.*|libc.so.*|libm.so.*|libpthread.so.*|libdl.so.*|\
    librt.so.*|libutil.so.*|libstdc++.so.*|libgcc_s.so.*|libcuda.so.*|libcudart.so.*|\
    libcublas*.so.*|libnccl.so.*|libnvidia*|libmdopt.so.*) return 0 ;;
  esac
  return 1
}
pack="$(mktemp -d)"
trap 'rm -rf "$pack"' EXIT
info="$bin/BUILD_INFO"
{
  echo "commit: $(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)$(git -C "$root" diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)')"
  echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -srm)"
  echo "nvcc: $(nvcc --version 2>/dev/null | tail -1 || echo unknown)"
  echo "cmake: -DCMAKE_CUDA_ARCHITECTURES=90 -DMDOPT_STATIC_ABSL=OFF -DMDOPT_MPI=AUTO $*"
  echo "absent (no such target yet): ${absent[*]:-none}"
} >"$info"
for f in "$bin"/*; do
  case "$f" in *BUILD_INFO) continue ;; esac
  needs=()
  while read -r name _ path _; do
    [ -n "$name" ] || continue
    needs+=("$name")
    is_base "$name" && continue
    case "$path" in /*) cp -Ln "$path" "$pack/$name" 2>/dev/null || true ;; esac
  done < <(ldd "$f" 2>/dev/null | grep '=>' | sed 's/^[[:space:]]*//')
  echo "$(basename "$f"): ${needs[*]}" >>"$info"
done
( cd "$pack" && ls >"$bin/syslibs.txt" && tar -cf - -- * | xz -T"$jobs" -6 >"$bin/syslibs.tar.xz" )
echo "syslibs.tar.xz: $(tr '\n' ' ' <"$bin/syslibs.txt")" >>"$info"

# Wheels for the GPU machine's Python (MDOPT_DEVICE_PYTHON, default 3.12), which cannot reach a
# package index: megatron-core for test_megatron_cuda.py (its dependencies, torch, numpy and
# packaging, are there). MDOPT_DEVICE_WHEELS="" takes none; without an index here none come.
wheels="${MDOPT_DEVICE_WHEELS-megatron-core==0.16.1}"
if [ -n "$wheels" ]; then
  mkdir -p "$bin/wheels"
  # shellcheck disable=SC2086  # a list of requirements
  if timeout 120 python3 -m pip download -q --no-deps --only-binary=:all: \
      --python-version "${MDOPT_DEVICE_PYTHON:-3.12}" --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d "$bin/wheels" $wheels >"$pack/pip.log" 2>&1; then
    echo "wheels: $(cd "$bin/wheels" && echo *.whl)" >>"$info"
  else
    rm -rf "$bin/wheels"
    echo "wheels: none ($wheels did not download: $(tail -1 "$pack/pip.log"))" >>"$info"
  fi
fi

cat "$info"
if [ "${#absent[@]}" -gt 0 ]; then
  echo "build-cuda: NOT built (no such target in this tree yet): ${absent[*]}" >&2
fi
size_kib="$(du -sk "$bin" | cut -f1)"
echo "build-cuda: $bin: $(( size_kib / 1024 )) MiB ($size_kib KiB), built in $(( $(date +%s) - t0 )) s"
if [ "$size_kib" -gt $(( 56 * 1024 )) ]; then
  echo "build-cuda: $bin is over 56 MiB: with the working tree it would not fit the 64 MiB that travel" >&2
  exit 1
fi
