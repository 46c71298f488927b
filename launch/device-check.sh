#!/usr/bin/env bash
# Runs, on a machine with a CUDA GPU, everything of mdopt's CUDA backend that needs one, from
# programs built elsewhere by launch/build-cuda.sh (sm_90, Abseil static, no MPI), and writes
# a summary under ${OUT:-device-check-out}:
#   1. every CUDA test (fused passes and Newton-Schulz against the float64 reference, the
#      NCCL communicator at one rank); on a GPU a skipped test counts as a failure;
#   2. compute-sanitizer memcheck and racecheck over the CUDA kernels' tests (a subset of
#      the cases: every kernel and both dtypes, at a fraction of the full run's time);
#   3. the benchmarks: mdopt-cuda-bench and torch's baselines (kernels/cuda/bench), with the
#      ratios of DESIGN.md section 8.
# Files under $OUT: summary.md, tests.log, sanitizer.log, bench_mdopt.json, bench_torch.json.
# Exit status: 0 when every test passed and the sanitizers found nothing. Meant to finish in
# a few minutes on an H100/H200.
#
#   launch/device-check.sh [device-bin folder, default build-cuda/device-bin]
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="${1:-$root/build-cuda/device-bin}"
out="${OUT:-$root/device-check-out}"
mkdir -p "$out"
summary="$out/summary.md"
: >"$summary"
say() { echo "$*" | tee -a "$summary"; }
status=0

# cuBLASLt and NCCL: the toolkit's when the loader finds them, else the pip wheels' (torch's).
missing="$(ldd "$bin"/* 2>/dev/null | grep 'not found' | awk '{print $1}' | sort -u | tr '\n' ' ')"
if [ -n "$missing" ]; then
  extra="$(python3 - <<'PY' 2>/dev/null
import glob, os
dirs = set()
try:
    import nvidia
    for base in list(nvidia.__path__):
        for lib in glob.glob(os.path.join(base, "*", "lib")):
            dirs.add(lib)
except Exception:
    pass
for d in ("/usr/local/cuda/lib64", "/usr/local/cuda/lib", "/usr/local/cuda/targets/x86_64-linux/lib"):
    if os.path.isdir(d):
        dirs.add(d)
print(":".join(sorted(dirs)))
PY
)"
  export LD_LIBRARY_PATH="${extra}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  say "libraries not on the loader's path ($missing); LD_LIBRARY_PATH += $extra"
  still="$(ldd "$bin"/* 2>/dev/null | grep 'not found' | sort -u)"
  [ -n "$still" ] && say "still missing: $still"
fi

say "# mdopt device check, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
say ""
say "GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo 'nvidia-smi unavailable')"
say ""

# --- 1. tests -----------------------------------------------------------------------------
say "## tests"
: >"$out/tests.log"
for t in cuda_fused_passes_test cuda_newton_schulz_test nccl_comm_test; do
  if [ ! -x "$bin/$t" ]; then
    say "- $t: MISSING from $bin"
    status=1
    continue
  fi
  start=$(date +%s)
  timeout 300 "$bin/$t" --gtest_color=no >"$out/$t.part" 2>&1
  rc=$?
  secs=$(( $(date +%s) - start ))
  cat "$out/$t.part" >>"$out/tests.log"
  passed=$(grep -c '^\[       OK \] ' "$out/$t.part" || true)
  failed=$(grep -E '^\[  FAILED  \] [A-Za-z].* \([0-9]+ ms\)$' "$out/$t.part" | wc -l)
  skipped=$(grep -E '^\[  SKIPPED \] [A-Za-z].* \([0-9]+ ms\)$' "$out/$t.part" | wc -l)
  rm -f "$out/$t.part"
  say "- $t: exit $rc in ${secs}s: $passed passed, $failed failed, $skipped skipped"
  [ "$rc" -ne 0 ] && status=1
done
if grep -qE '^\[  SKIPPED \] [A-Za-z].* \([0-9]+ ms\)$' "$out/tests.log"; then
  say "- SKIPPED tests on a GPU machine (a failure of this check):"
  grep -E -B1 '^\[  SKIPPED \] [A-Za-z].* \([0-9]+ ms\)$' "$out/tests.log" | head -20 | sed 's/^/    /' | tee -a "$summary"
  status=1
fi
if grep -q '^\[  FAILED  \]' "$out/tests.log"; then
  say "- failures:"
  grep -E '^\[  FAILED  \] [A-Za-z].* \([0-9]+ ms\)$' "$out/tests.log" | head -40 | sed 's/^/    /' | tee -a "$summary"
  grep -B2 -A6 'Failure$' "$out/tests.log" | head -120 >>"$summary"
fi
say ""

# --- 2. compute-sanitizer -------------------------------------------------------------------
say "## compute-sanitizer"
cs="$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)"
: >"$out/sanitizer.log"
if [ -z "$cs" ]; then
  say "- compute-sanitizer not found: not run"
  status=1
else
  fused_filter='Presets/CudaFused.*/md_muon:Presets/CudaFused.*/md_adamw:Presets/CudaFused.*/router:Presets/CudaFused.*/adamw_col_sphere_col_gains:Presets/CudaFused.*/adamw:Presets/CudaFused.*/muon_scalar_gain_exp'
  ns_filter='Shapes/CudaNs.*/m17_n40_quintic:Shapes/CudaNs.*/m300_n257_jordan:Shapes/CudaNs.*/m64_n257_polar_express'
  for tool in memcheck racecheck; do
    for spec in "cuda_fused_passes_test:$fused_filter" "cuda_newton_schulz_test:$ns_filter"; do
      t="${spec%%:*}"
      filter="${spec#*:}"
      start=$(date +%s)
      echo "=== $tool $t" >>"$out/sanitizer.log"
      timeout 400 "$cs" --tool "$tool" --error-exitcode 99 --print-limit 20 \
        "$bin/$t" --gtest_color=no "--gtest_filter=$filter" >>"$out/sanitizer.log" 2>&1
      rc=$?
      secs=$(( $(date +%s) - start ))
      summ="$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/sanitizer.log" | tail -1)"
      say "- $tool $t: exit $rc in ${secs}s; ${summ:-no summary line}"
      [ "$rc" -ne 0 ] && status=1
    done
  done
fi
say ""

# --- 3. benchmarks --------------------------------------------------------------------------
say "## benchmarks (d=2048, 8 layers, float32 params and grads; ms per step, mean of 10)"
timeout 300 "$bin/mdopt-cuda-bench" >"$out/bench_mdopt.json" 2>>"$out/tests.log" || say "- mdopt-cuda-bench failed (exit $?)"
timeout 300 python3 "$root/kernels/cuda/bench/torch_baselines.py" >"$out/bench_torch.json" 2>>"$out/tests.log" || say "- torch_baselines.py failed (exit $?)"
python3 - "$out/bench_mdopt.json" "$out/bench_torch.json" <<'PY' | tee -a "$summary"
import json, sys
try:
    m = json.load(open(sys.argv[1]))
    t = json.load(open(sys.argv[2]))
except Exception as e:
    print(f"- no benchmark numbers: {e}")
    sys.exit(0)
def row(name, ours, theirs, target):
    if ours is None or theirs is None:
        print(f"| {name} | {ours} | {theirs} | - | {target} |")
        return
    print(f"| {name} | {ours:.3f} | {theirs:.3f} | {ours / theirs:.2f}x | {target} |")
print(f"device: {m.get('device')}; torch {t.get('torch')}; {m.get('matrices')} matrices, {m.get('params')} params")
print()
print("| what | mdopt ms | torch ms | ratio | target |")
print("|---|---|---|---|---|")
row("md-adamw step vs fused AdamW", m.get("md_adamw_ms"), t.get("torch_fused_adamw_ms"), "<= 1.3x")
row("md-muon step vs torch.optim.Muon", m.get("md_muon_ms"), t.get("torch_muon_ms"), "<= 0.75x")
row("Newton-Schulz alone vs torch bf16 NS", m.get("ns_ms"), t.get("torch_ns_bf16_ms"), "<= 0.6x")
print()
print(f"NS: {m.get('ns_tflops')} TFLOP/s; launches per step: md-adamw {m.get('md_adamw_launches')}, "
      f"md-muon {m.get('md_muon_launches')}; workspace bytes: md-adamw {m.get('md_adamw_workspace_bytes')}, "
      f"md-muon {m.get('md_muon_workspace_bytes')}")
if t.get("torch_muon_note"):
    print(t["torch_muon_note"])
PY
say ""
say "overall: $([ "$status" -eq 0 ] && echo PASS || echo FAIL)"
exit "$status"
