#!/usr/bin/env bash
# The whole verification of mdopt's CUDA side on one GPU (an H100 or H200), from the folder
# launch/build-cuda.sh made on a machine without one (carried along with the working tree),
# in under 300 s. Writes under ${OUT:-device-check-out}: summary.md (ending in one table:
# every part with its pass/fail/skip counts and time against its cap, every MDOPT_METRIC
# line of every test against its tolerance, MDOPT_INFO lines as they are, the benchmark
# ratios against their goals),
# tests.log, sanitizer.log, python.log, bench.json, bench_kernels.json.
#
#   launch/device-check.sh [--force] [DEVICE_BIN]      (default build-cuda/device-bin)
#
# Exit status: 0 when every part passed, 1 when one failed, 2 when there is no GPU (checked
# first, in a second or two; nothing else runs then). --force runs every part even without a
# GPU, to try this script's logic elsewhere (every part that needs the GPU then fails).
#
# Parts, in order, each stopped at its cap (seconds). The caps add up to 290, and each is
# also cut to what is left of MDOPT_CHECK_BUDGET_S (default 295) from the start, so the
# check ends within 300 s whatever hangs:
#   setup        20  the GPU (nvidia-smi 5); the libraries the folder's programs lack here,
#                    linked from its syslibs.tar.xz (Debian's; unpacking 5) or the CUDA /
#                    pip folders (cuBLASLt, NCCL; 3); wheels in DEVICE_BIN/wheels
#                    (megatron-core) installed into a temp folder (6)
#   tests        84  each CUDA test program: cuda_backend_test 25, cuda_step_test 25,
#                    cuda_newton_schulz_test 12, nccl_comm_test 12 (these four are required:
#                    a missing one fails), any other *_test in the folder 10 in all. On a
#                    GPU a skipped test is a failure
#   memcheck     30  compute-sanitizer memcheck on a subset (gtest filter): backend 12,
#                    step 10, Newton-Schulz 8
#   racecheck    18  racecheck on the shared-memory kernels: backend 12, Newton-Schulz 6
#   two-ranks    45  two ranks on the one GPU against one rank, host-staged collectives
#                    (integration/python/tests/cuda_two_ranks.py): an MPI probe 10 (does
#                    libmdopt's MPI load and start under this machine's mpirun?), then the
#                    reference and the 2-rank run side by side 30, compare 5. Without a
#                    working MPI the 2 ranks run under torchrun on gloo, and the summary
#                    says why
#   python       50  pytest test_cuda.py test_megatron_cuda.py test_nccl_comm.py (a skip
#                    is a failure, but for megatron-core not installed)
#   benchmark    40  optimizer_bench.py 30 (md-adamw vs fused AdamW, md-muon vs Muon,
#                    DESIGN.md section 8), mdopt-cuda-bench 10 (Newton-Schulz alone)
#   summary       3
# Filters: MEMCHECK_FILTER / RACECHECK_FILTER below name the subset per program; a program
# without one gets the first test of each of its first suites (--gtest_list_tests).
# MDOPT_CHECK_PARTS=tests,memcheck,... runs only the parts named (setup and the summary
# always run): a rerun of what failed. To try the script without a GPU: --force, and
# MDOPT_CHECK_TWO_RANKS_DEVICE=cpu (the two ranks on the CPU backend),
# MDOPT_CHECK_BENCH_ARGS="--device cpu --d 128 --layers 2".
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
force=0
if [ "${1:-}" = "--force" ]; then force=1; shift; fi
bin="${1:-$root/build-cuda/device-bin}"
case "$bin" in /*) ;; *) bin="$PWD/$bin" ;; esac
out="${OUT:-$root/device-check-out}"
mkdir -p "$out"
summary="$out/summary.md"
t_start=$(date +%s)
deadline=$(( t_start + ${MDOPT_CHECK_BUDGET_S:-295} ))
work="$(mktemp -d "${TMPDIR:-/tmp}/mdopt-check.XXXXXX")"
trap 'rm -rf "$work"' EXIT
results="$work/results.tsv"  # part, item, PASS|FAIL|INFO, pass, fail, skip, secs, cap, note
: >"$results"

required_tests=(cuda_backend_test cuda_step_test cuda_newton_schulz_test nccl_comm_test)
declare -A TEST_CAP=([cuda_backend_test]=25 [cuda_step_test]=25 [cuda_newton_schulz_test]=12
                     [nccl_comm_test]=12)
other_tests_cap=10
memcheck_runs=(cuda_backend_test:12 cuda_step_test:10 cuda_newton_schulz_test:8)
racecheck_runs=(cuda_backend_test:12 cuda_newton_schulz_test:6)
# memcheck: every stage kernel once, with bf16 tensors and the tangent passes (the most
# pointer arithmetic), the skip flag, the host-pointer refusal, and one whole step of bf16
# params with f32 grads through the ABI. racecheck: the tile kernels' shared-memory row and
# tile sums and the combine's block sum, on a rule that uses every channel.
declare -A MEMCHECK_FILTER=(
  [cuda_backend_test]='Rules/CudaStages.EachStageMatchesTheCpuBackend/tangent_col_bf16p_bf16g:CudaStagesSkip.*:CudaStagesPointers.*'
  [cuda_step_test]='Presets/CudaStep.MatchesDeviceCpu/md_muon_bf16p_f32g_ns_f32:CudaStepAbi.HostPointersStreamsAndState'
)
declare -A RACECHECK_FILTER=(
  [cuda_backend_test]='Rules/CudaStages.EachStageMatchesTheCpuBackend/tangent_frobenius_f32p_f32g'
)
auto_filter_tests=3  # tests per program when no filter is given

parts="${MDOPT_CHECK_PARTS:-tests,memcheck,racecheck,two-ranks,python,benchmark}"
want() { [[ ",$parts," == *",$1,"* ]]; }
record() { printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$results"; }
now() { date +%s; }
# The cap of a part: its own, cut to what is left of the budget (3 s kept for the summary);
# at least 1 (timeout 0 would mean no limit).
cap() {
  local secs=$1 left
  left=$(( deadline - $(now) - 3 ))
  [ "$left" -lt "$secs" ] && secs=$left
  [ "$secs" -lt 1 ] && secs=1
  echo "$secs"
}
# gtest counts of a log: passed failed skipped
gtest_counts() {
  local p f s
  p=$(grep -c '^\[       OK \] ' "$1")
  f=$(grep -cE '^\[  FAILED  \] [A-Za-z_].* \([0-9]+ ms\)$' "$1")
  s=$(grep -cE '^\[  SKIPPED \] [A-Za-z_].* \([0-9]+ ms\)$' "$1")
  echo "$p $f $s"
}
reason_of() {  # rc log: what a failed run's log says most about it
  local r
  r="$({ grep -E 'Error|error:|FAIL|Traceback|not found|Abort' "$2" || grep -v '^[[:space:]-]*$' "$2"; } | tail -1 | cut -c1-160)"
  local w
  w="$(why_rc "$1")"
  echo "$w${w:+${r:+: }}$r"
}
why_rc() {  # a note for an exit status
  case "$1" in
    0) echo "" ;;
    124|137) echo "stopped at its cap" ;;
    127) echo "not found or not loadable" ;;
    *) echo "exit $1" ;;
  esac
}

# --- setup: the GPU -------------------------------------------------------------------------
gpu="$(timeout 5 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)"
if [ -z "$gpu" ] && compgen -G '/dev/nvidia[0-9]*' >/dev/null; then
  gpu="a GPU device file (/dev/nvidia0), but nvidia-smi did not answer"
fi
if [ -z "$gpu" ] && [ "$force" -eq 0 ]; then
  {
    echo "# mdopt device check, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo
    echo "no GPU: nvidia-smi lists none and there is no /dev/nvidia*; nothing was run"
    echo "(launch/device-check.sh --force runs every part anyway, to try the script)."
  } | tee "$summary"
  exit 2
fi
[ -n "$gpu" ] || gpu="none (--force)"
for f in tests.log sanitizer.log python.log; do : >"$out/$f"; done
rm -f "$out/bench.json" "$out/bench_kernels.json"
record setup GPU INFO - - - "$(( $(now) - t_start ))" 5 "$gpu"

# --- setup: libraries -------------------------------------------------------------------------
t0=$(now)
# The interpreter by its path: a launcher's ranks must get this one (with torch), not
# whatever python3 a shim or another PATH would pick for them.
py="$(python3 -c 'import sys; print(sys.executable)' 2>/dev/null || command -v python3)"
libdir="$work/lib"
mkdir -p "$libdir" "$work/syslibs"
setup_note=()
setup_ok=PASS
if [ ! -d "$bin" ]; then
  setup_ok=FAIL
  setup_note+=("no folder $bin (launch/build-cuda.sh makes it)")
else
  # The folder's own libmdopt.so.1 for the programs that link it (their RUNPATH names the
  # build tree they were linked in, which is not here).
  [ -f "$bin/libmdopt.so.1" ] && ln -s "$bin/libmdopt.so.1" "$libdir/libmdopt.so.1"
  export LD_LIBRARY_PATH="$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  if [ -f "$bin/syslibs.tar.xz" ]; then
    timeout 5 tar -xJf "$bin/syslibs.tar.xz" -C "$work/syslibs" || setup_note+=("syslibs.tar.xz did not unpack")
  fi
  missing() { ldd "$bin"/* 2>/dev/null | awk '/=> not found/ {print $1}' | sort -u; }
  from_syslibs=()
  added_cuda_dirs=0
  for _ in 1 2 3 4; do
    m="$(missing)"
    [ -n "$m" ] || break
    progress=0
    for so in $m; do
      if [ -e "$work/syslibs/$so" ] && [ ! -e "$libdir/$so" ]; then
        ln -s "$work/syslibs/$so" "$libdir/$so"
        from_syslibs+=("$so")
        progress=1
      fi
    done
    if [ "$added_cuda_dirs" -eq 0 ] && grep -qE '^lib(cublas|nccl|cudart|nvJitLink)' <<<"$m"; then
      # cuBLASLt and NCCL: the toolkit's, else the pip wheels' that torch brings.
      dirs="$(timeout 3 "$py" - <<'PY' 2>/dev/null
import glob, os
dirs = []
for d in ("/usr/local/cuda/lib64", "/usr/local/cuda/lib", "/usr/local/cuda/targets/x86_64-linux/lib"):
    if os.path.isdir(d):
        dirs.append(d)
try:
    import nvidia
    for base in list(nvidia.__path__):
        dirs += sorted(glob.glob(os.path.join(base, "*", "lib")))
except Exception:
    pass
print(":".join(dirs))
PY
)"
      [ -n "$dirs" ] && export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$dirs"
      added_cuda_dirs=1
      setup_note+=("LD_LIBRARY_PATH += CUDA/pip folders")
      progress=1
    fi
    [ "$progress" -eq 1 ] || break
  done
  [ "${#from_syslibs[@]}" -eq 0 ] || setup_note+=("from syslibs.tar.xz: ${from_syslibs[*]}")
  still="$(missing | tr '\n' ' ')"
  if [ -n "$still" ]; then
    setup_ok=FAIL
    setup_note+=("still missing: $still")
  fi
fi
# Python: the package of this working tree on the folder's libmdopt; carried wheels.
export PYTHONPATH="$root/integration/python${PYTHONPATH:+:$PYTHONPATH}"
export MDOPT_LIBRARY="$bin/libmdopt.so.1" PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
export MDOPT_METRICS_FILE="$work/python_metrics.txt"
if compgen -G "$bin/wheels/*.whl" >/dev/null; then
  if timeout "$(cap 6)" "$py" -m pip install -q --no-index --no-deps --no-compile \
      --no-cache-dir --target "$work/site" "$bin"/wheels/*.whl >"$work/pip.log" 2>&1; then
    export PYTHONPATH="$PYTHONPATH:$work/site"
    wheels=("$bin"/wheels/*.whl)
    setup_note+=("wheels: ${wheels[*]##*/}")
  else
    setup_note+=("wheels did not install: $(tail -1 "$work/pip.log")")
  fi
fi
note="$(IFS='; '; echo "${setup_note[*]:-nothing missing}")"
record setup libraries "$setup_ok" - - - "$(( $(now) - t0 ))" 15 "$note"
[ -f "$bin/BUILD_INFO" ] && cp "$bin/BUILD_INFO" "$work/BUILD_INFO"

# --- tests ---------------------------------------------------------------------------------
if want tests; then
  tests=("${required_tests[@]}")
  for f in "$bin"/*_test; do
    [ -x "$f" ] || continue
    t="$(basename "$f")"
    [[ " ${required_tests[*]} " == *" $t "* ]] || tests+=("$t")
  done
  others_left=$other_tests_cap
  for t in "${tests[@]}"; do
    tcap="${TEST_CAP[$t]:-$others_left}"
    if [ ! -x "$bin/$t" ]; then
      record tests "$t" FAIL 0 0 0 0 "$tcap" "missing from $bin"
      continue
    fi
    c="$(cap "$tcap")"
    t0=$(now)
    timeout -k 2 "$c" "$bin/$t" --gtest_color=no >"$work/$t.log" 2>&1
    rc=$?
    secs=$(( $(now) - t0 ))
    [ -n "${TEST_CAP[$t]:-}" ] || others_left=$(( others_left > secs ? others_left - secs : 0 ))
    read -r p f s < <(gtest_counts "$work/$t.log")
    { echo "===== $t: exit $rc after ${secs}s (cap ${c}s)"; cat "$work/$t.log"; } >>"$out/tests.log"
    st=PASS
    n="$(why_rc "$rc")"
    if [ "$rc" -ne 0 ] || [ "$f" -gt 0 ] || [ "$s" -gt 0 ] || [ "$p" -eq 0 ]; then st=FAIL; fi
    [ "$s" -gt 0 ] && n="${n:+$n; }$s skipped (a skip on a GPU is a failure): $(grep -m1 -B1 -E '^\[  SKIPPED \] ' "$work/$t.log" | head -1 | cut -c1-160)"
    [ "$p" -eq 0 ] && [ "$s" -eq 0 ] && n="${n:+$n; }no test passed"
    [ "$f" -gt 0 ] && n="${n:+$n; }failed: $(grep -E '^\[  FAILED  \] [A-Za-z_].* \([0-9]+ ms\)$' "$work/$t.log" | head -3 | sed 's/^\[  FAILED  \] //; s/ ([0-9]* ms)$//' | tr '\n' ' ')"
    record tests "$t" "$st" "$p" "$f" "$s" "$secs" "$c" "$n"
  done
fi

# --- compute-sanitizer ------------------------------------------------------------------------
cs="$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)"
auto_filter() {  # the first test of each of a program's first suites
  "$bin/$1" --gtest_list_tests 2>/dev/null | awk -v n="$2" '
    /^[^ ]/ { suite = $1; taken = 0; next }
    /^  [^ ]/ { if (!taken && count < n) { printf "%s%s%s", sep, suite, $1; sep = ":"; count++; taken = 1 } }'
}
sanitize() {  # tool program:cap
  local tool=$1 t=${2%%:*} tcap=${2#*:} filter c rc secs errs p f s st n
  if [ -z "$cs" ]; then
    record "$tool" "$t" FAIL 0 0 0 0 "$tcap" "compute-sanitizer not found"
    return
  fi
  if [ ! -x "$bin/$t" ]; then
    record "$tool" "$t" FAIL 0 0 0 0 "$tcap" "missing from $bin"
    return
  fi
  if [ "$tool" = memcheck ]; then filter="${MEMCHECK_FILTER[$t]:-}"; else filter="${RACECHECK_FILTER[$t]:-}"; fi
  [ -n "$filter" ] || filter="$(auto_filter "$t" "$auto_filter_tests")"
  c="$(cap "$tcap")"
  t0=$(now)
  echo "===== $tool $t --gtest_filter=$filter (cap ${c}s)" >>"$out/sanitizer.log"
  timeout -k 2 "$c" "$cs" --tool "$tool" --error-exitcode 99 --print-limit 20 \
    "$bin/$t" --gtest_color=no "--gtest_filter=${filter:-*}" >"$work/san.log" 2>&1
  rc=$?
  secs=$(( $(now) - t0 ))
  cat "$work/san.log" >>"$out/sanitizer.log"
  read -r p f s < <(gtest_counts "$work/san.log")
  errs="$(grep -oE '(ERROR SUMMARY: [0-9]+ error|RACECHECK SUMMARY: [0-9]+ hazard)' "$work/san.log" | tail -1 | grep -oE '[0-9]+' || true)"
  st=PASS
  n="$(why_rc "$rc")"
  [ "$rc" -eq 99 ] && n="the sanitizer reported errors"
  if [ "$rc" -ne 0 ] || [ -z "$errs" ] || [ "${errs:-1}" -ne 0 ] || [ "$f" -gt 0 ] || [ "$s" -gt 0 ] || [ "$p" -eq 0 ]; then st=FAIL; fi
  n="${n:+$n; }${errs:-no} sanitizer $( [ "$tool" = memcheck ] && echo errors || echo hazards); filter ${filter:-*}"
  record "$tool" "$t" "$st" "$p" "$f" "$s" "$secs" "$c" "$n"
}
if want memcheck; then
  for spec in "${memcheck_runs[@]}"; do sanitize memcheck "$spec"; done
fi
if want racecheck; then
  for spec in "${racecheck_runs[@]}"; do sanitize racecheck "$spec"; done
fi

# --- two ranks on one GPU --------------------------------------------------------------------
if want two-ranks; then
  t0=$(now)
  tr="$root/integration/python/tests/cuda_two_ranks.py"
  route="" route_note=""
  mpirun_bin="$(command -v mpirun || true)"
  launch=()
  if [ -n "$mpirun_bin" ]; then
    launch=("$mpirun_bin" -np 2)
    if "$mpirun_bin" --version 2>&1 | grep -qE 'Open MPI|OpenRTE'; then
      [ "$(id -u)" -ne 0 ] || launch+=(--allow-run-as-root)
      launch+=(--oversubscribe --bind-to none)
      for v in LD_LIBRARY_PATH PYTHONPATH MDOPT_LIBRARY PYTHONDONTWRITEBYTECODE PYTHONUNBUFFERED; do
        [ -n "${!v:-}" ] && launch+=(-x "$v")
      done
    fi
    echo "===== two ranks: MPI probe: ${launch[*]} $py cuda_two_ranks.py --probe" >>"$out/python.log"
    timeout -k 2 "$(cap 10)" "${launch[@]}" "$py" "$tr" --probe >"$work/probe.log" 2>&1
    rc=$?
    cat "$work/probe.log" >>"$out/python.log"
    if [ "$(grep -c '^probe: rank [01] of 2' "$work/probe.log")" -eq 2 ]; then
      route=mpi
      route_note="$("$mpirun_bin" --version 2>&1 | head -1)"
    else
      route_note="MPI unusable here ($(reason_of "$rc" "$work/probe.log")); ran under torchrun on gloo"
    fi
  else
    route_note="no mpirun here; ran under torchrun on gloo"
  fi
  if [ -z "$route" ]; then
    route=torch
    launch=("$py" -m torch.distributed.run --standalone --nproc-per-node 2)
  fi
  c="$(cap 30)"
  echo "===== two ranks: reference (1 rank) and 2 ranks ($route), cap ${c}s" >>"$out/python.log"
  tr_device="${MDOPT_CHECK_TWO_RANKS_DEVICE:-cuda:0}"
  timeout -k 2 "$c" "$py" "$tr" --ranks 1 --device "$tr_device" --out "$work/tr/ref" >"$work/tr_ref.log" 2>&1 &
  ref_pid=$!
  timeout -k 2 "$c" "${launch[@]}" "$py" "$tr" --comm "$route" --device "$tr_device" --out "$work/tr/two" >"$work/tr_two.log" 2>&1
  rc_two=$?
  wait "$ref_pid"
  rc_ref=$?
  cat "$work/tr_ref.log" "$work/tr_two.log" >>"$out/python.log"
  st=FAIL
  n="route $route${route_note:+ ($route_note)}"
  if [ "$rc_ref" -ne 0 ] || [ "$rc_two" -ne 0 ]; then
    [ "$rc_ref" -eq 0 ] || n="$n; reference: $(reason_of "$rc_ref" "$work/tr_ref.log")"
    [ "$rc_two" -eq 0 ] || n="$n; 2 ranks: $(reason_of "$rc_two" "$work/tr_two.log")"
  else
    timeout -k 2 "$(cap 5)" "$py" "$tr" --compare "$work/tr/ref" "$work/tr/two" >"$work/tr_cmp.log" 2>&1
    rc=$?
    cat "$work/tr_cmp.log" >>"$out/python.log"
    [ "$rc" -eq 0 ] && st=PASS
    n="$n; compare: $(reason_of "$rc" "$work/tr_cmp.log")"
  fi
  record two-ranks "2 ranks vs 1 on one GPU" "$st" - - - "$(( $(now) - t0 ))" 45 "$n"
fi

# --- Python CUDA tests ------------------------------------------------------------------------
if want python; then
  t0=$(now)
  c="$(cap 50)"
  python_tests=(tests/test_cuda.py tests/test_megatron_cuda.py tests/test_nccl_comm.py)
  echo "===== pytest ${python_tests[*]} (cap ${c}s)" >>"$out/python.log"
  (cd "$root/integration/python" && timeout -k 2 "$c" "$py" -m pytest -q -rs -p no:cacheprovider \
    "${python_tests[@]}") >"$work/pytest.log" 2>&1
  rc=$?
  secs=$(( $(now) - t0 ))
  cat "$work/pytest.log" >>"$out/python.log"
  [ -f "$MDOPT_METRICS_FILE" ] && cat "$MDOPT_METRICS_FILE" >>"$out/python.log"
  last="$(grep -E '[0-9]+ (passed|failed|skipped|error)' "$work/pytest.log" | tail -1)"
  p=$(grep -oE '[0-9]+ passed' <<<"$last" | grep -oE '[0-9]+' || echo 0)
  f=$(( $(grep -oE '[0-9]+ failed' <<<"$last" | grep -oE '[0-9]+' || echo 0) + $(grep -oE '[0-9]+ errors?' <<<"$last" | grep -oE '[0-9]+' || echo 0) ))
  s=$(grep -oE '[0-9]+ skipped' <<<"$last" | grep -oE '[0-9]+' || echo 0)
  bad_skips="$(grep -E '^SKIPPED \[' "$work/pytest.log" | grep -v 'megatron-core is not installed' || true)"
  st=PASS
  n="$(why_rc "$rc")"
  if [ "$rc" -ne 0 ] || [ "$f" -gt 0 ] || [ "$p" -eq 0 ] || [ -n "$bad_skips" ]; then st=FAIL; fi
  [ -n "$bad_skips" ] && n="${n:+$n; }skipped on a GPU: $(head -1 <<<"$bad_skips" | cut -c1-200)"
  grep -q 'megatron-core is not installed' "$work/pytest.log" && n="${n:+$n; }megatron-core not installed: its GPU test skipped"
  record python "${python_tests[*]##*/}" "$st" "$p" "$f" "$s" "$secs" "$c" "$n"
fi

# --- benchmarks -----------------------------------------------------------------------------
if want benchmark; then
  t0=$(now)
  c="$(cap 30)"
  echo "===== optimizer_bench.py (cap ${c}s)" >>"$out/python.log"
  # shellcheck disable=SC2086  # MDOPT_CHECK_BENCH_ARGS: words on purpose
  timeout -k 2 "$c" "$py" "$root/kernels/cuda/bench/optimizer_bench.py" --json "$out/bench.json" \
    ${MDOPT_CHECK_BENCH_ARGS:-} >>"$out/python.log" 2>&1
  rc=$?
  st=PASS
  n="$(why_rc "$rc")"
  if [ "$rc" -ne 0 ] || [ ! -s "$out/bench.json" ]; then st=FAIL
  elif grep -q '"skipped"' "$out/bench.json"; then st=FAIL; n="skipped: $("$py" -c 'import json,sys; print(json.load(open(sys.argv[1]))["skipped"])' "$out/bench.json" 2>/dev/null | cut -c1-200)"
  fi
  record benchmark optimizer_bench.py "$st" - - - "$(( $(now) - t0 ))" "$c" "$n"
  t0=$(now)
  if [ -x "$bin/mdopt-cuda-bench" ]; then
    c="$(cap 10)"
    # torch's bf16 Newton-Schulz over the same matrices, as optimizer_bench.py timed it.
    tns="$("$py" -c 'import json, sys; print(json.load(open(sys.argv[1]))["results"]["torch-ns-bf16"]["device_ms_mean"])' "$out/bench.json" 2>/dev/null)"
    timeout -k 2 "$c" "$bin/mdopt-cuda-bench" ${tns:+--torch-ns-ms "$tns"} \
      >"$out/bench_kernels.json" 2>>"$out/python.log"
    rc=$?
    st=PASS
    n="$(why_rc "$rc")"
    [ "$rc" -eq 0 ] && [ -s "$out/bench_kernels.json" ] || st=FAIL
    if grep -q '"skipped"' "$out/bench_kernels.json" 2>/dev/null; then
      st=FAIL
      n="skipped: $(cut -c1-200 "$out/bench_kernels.json")"
    fi
    record benchmark mdopt-cuda-bench "$st" - - - "$(( $(now) - t0 ))" "$c" "$n"
  else
    record benchmark mdopt-cuda-bench INFO - - - 0 10 "not in $bin: no Newton-Schulz-alone ratio"
  fi
fi

# --- summary ------------------------------------------------------------------------------
"$py" - "$results" "$out" "$work/BUILD_INFO" "$gpu" "$(( $(now) - t_start ))" \
  "${MDOPT_CHECK_BUDGET_S:-295}" "$parts" <<'PY' >"$summary"
import json, math, os, re, sys
results, out, build_info, gpu, elapsed, budget, parts = sys.argv[1:8]
rows = [l.rstrip("\n").split("\t") for l in open(results) if l.strip()]
print("# mdopt device check")
print()
print("GPU: %s. Folder built from %s. Took %s s (budget %s s)." % (
    gpu, next((l.strip()[8:] for l in open(build_info) if l.startswith("commit: ")), "?")
    if os.path.exists(build_info) else "? (no BUILD_INFO)", elapsed, budget))
print("Parts run: setup, %s. Logs: tests.log, sanitizer.log, python.log (two ranks, pytest, "
      "benchmarks), bench.json, bench_kernels.json." % parts.replace(",", ", "))
print()

# Every MDOPT_METRIC line of every log: the largest value per name, against its tolerance.
# MDOPT_INFO <name> <text> lines: shown, not judged (the last of each name).
metrics = {}
infos = {}
for log in ("tests.log", "sanitizer.log", "python.log"):
    path = os.path.join(out, log)
    if not os.path.exists(path):
        continue
    for line in open(path, errors="replace"):
        m = re.match(r"\s*MDOPT_INFO\s+(\S+)\s+(.*\S)\s*$", line)
        if m:
            infos[m.group(1)] = (m.group(2), log)
            continue
        m = re.match(r"\s*MDOPT_METRIC\s+(\S+)\s+(\S+)\s+(\S+)\s*$", line)
        if not m:
            continue
        try:
            v, tol = float(m.group(2)), float(m.group(3))
        except ValueError:
            continue
        old = metrics.get(m.group(1))
        if old is None or not (v <= old[0]):
            metrics[m.group(1)] = (v, tol, log)

def load(name):
    try:
        return json.load(open(os.path.join(out, name)))
    except Exception:
        return None

bench, kern = load("bench.json"), load("bench_kernels.json")
table = []
failed = False
for part, item, st, p, f, s, secs, cap, note in rows:
    counts = "" if p == "-" else "%s / %s / %s" % (p, f, s)
    table.append((part, item, st, counts, note, "%s / %s" % (secs, cap)))
    failed |= st == "FAIL"
for name, (v, tol, log) in sorted(metrics.items()):
    ok = math.isfinite(v) and v <= tol
    failed |= not ok
    table.append(("metric", name, "PASS" if ok else "FAIL", "", "%.3g (tolerance %.3g; %s)" % (v, tol, log), ""))
for name, (text, log) in sorted(infos.items()):
    table.append(("info", name, "", "", "%s (%s)" % (text, log), ""))
if bench and "results" in bench:
    res = bench["results"]
    for r in bench.get("ratios", []):
        table.append(("ratio", r["name"], "met" if r["met"] else "NOT met", "",
                      "%.2fx (goal <= %.2fx), device ms %.3f vs %.3f; host time %.2fx" % (
                          r["ratio"], r["goal"],
                          res[r["name"].split(" / ")[0]]["device_ms_mean"],
                          res[r["name"].split(" / ")[1]]["device_ms_mean"], r["host_ratio"]), ""))
    ns = (kern or {}).get("ns_ms")
    tns = res.get("torch-ns-bf16", {}).get("device_ms_mean")
    if ns and tns:
        table.append(("ratio", "Newton-Schulz alone / torch bf16 NS", "met" if ns / tns <= 0.6 else "NOT met",
                      "", "%.2fx (goal <= 0.60x), %.3f vs %.3f ms" % (ns / tns, ns, tns), ""))
    for name, r in res.items():
        if "state_bytes_per_param" in r or "host_ms_mean" in r:
            table.append(("bench", name, "", "", "device %.3f ms (min %.3f), host %.3f ms%s" % (
                r["device_ms_mean"], r["device_ms_min"], r["host_ms_mean"],
                "" if "state_bytes_per_param" not in r else
                ", state %.2f B/param" % r["state_bytes_per_param"]), ""))
    table.append(("bench", "set", "", "", "%s, %s matrices, %s params, %s" % (
        bench.get("shapes"), bench.get("matrices"), bench.get("params"), bench.get("device")), ""))
table.append(("overall", "", "FAIL" if failed else "PASS", "",
              "ratios are reported, not judged: a goal not met fails nothing",
              "%s / %s" % (elapsed, budget)))
print("| part | item | result | pass / fail / skip | measured, notes | s / cap |")
print("|---|---|---|---|---|---|")
for r in table:
    print("| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in r) + " |")
PY
cat "$summary"
if grep -q '^| overall |  | PASS |' "$summary"; then exit 0; fi
exit 1
