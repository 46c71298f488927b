#!/usr/bin/env bash
# launch/device-check.sh's logic without a GPU: with none it writes "no GPU" and exits 2 in
# seconds, running nothing; with --force and MDOPT_CHECK_PARTS=tests it runs a folder of
# stand-in test programs (scripts printing gtest's lines and MDOPT_METRIC / MDOPT_INFO
# lines) and its summary table counts each one's tests, fails a skip, a failure, a missing
# program and a metric above its bound, and shows the info. Skips (77) where a GPU is.
# Usage: device_check_test.sh SOURCE_DIR
set -uo pipefail
src="$(cd "${1:?source dir}" && pwd)"
check="$src/launch/device-check.sh"
if timeout 5 nvidia-smi -L 2>/dev/null | grep -q '^GPU' || compgen -G '/dev/nvidia[0-9]*' >/dev/null; then
  echo "device_check_test: a GPU is here; the check would run for real"
  exit 77
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
failures=0
fail() { echo "FAILED: $*"; failures=$((failures + 1)); }

# 1. No GPU: exit 2 at once, a summary that says so, nothing else run.
start=$(date +%s)
OUT="$work/out1" bash "$check" "$work/nothing-here" >"$work/log1" 2>&1
rc=$?
secs=$(( $(date +%s) - start ))
[ "$rc" -eq 2 ] || fail "no GPU: exit $rc, not 2"
[ "$secs" -le 10 ] || fail "no GPU: took ${secs}s"
grep -q '^no GPU' "$work/out1/summary.md" || fail "no GPU: summary.md does not say so"
[ ! -e "$work/out1/tests.log" ] || fail "no GPU: tests.log written"
[ "$failures" -eq 0 ] && echo "ok: no GPU -> exit 2 in ${secs}s"

# 2. --force over stand-in programs, the tests part only.
bin="$work/bin"
mkdir -p "$bin"
gtest() {  # gtest NAME BODY: a stand-in program printing BODY (gtest's lines)
  printf '#!/usr/bin/env bash\ncat <<'\''OUT'\''\n%s\nOUT\n' "$2" >"$bin/$1"
  chmod +x "$bin/$1"
}
gtest cuda_backend_test '[ RUN      ] Stage.Pass1
MDOPT_METRIC backend.pass1.f32 1.2e-06 1e-05
MDOPT_INFO backend.workspace_bytes 1048576
[       OK ] Stage.Pass1 (3 ms)
[ RUN      ] Stage.Pass2
MDOPT_METRIC backend.pass2.f32 3.0e-04 1e-05
[       OK ] Stage.Pass2 (2 ms)'
gtest cuda_step_test '[ RUN      ] Step.Md
[       OK ] Step.Md (5 ms)
[ RUN      ] Step.NoGpu
needs no GPU
[  SKIPPED ] Step.NoGpu (0 ms)'
gtest cuda_newton_schulz_test '[ RUN      ] Ns.A
[  FAILED  ] Ns.A (1 ms)
[       OK ] Ns.B (1 ms)'
OUT="$work/out2" MDOPT_CHECK_PARTS=tests bash "$check" --force "$bin" >"$work/log2" 2>&1
rc=$?
[ "$rc" -eq 1 ] || fail "--force: exit $rc, not 1"
row() {  # row PATTERN: a line of the summary's table matching PATTERN
  grep -Eq -- "$1" "$work/out2/summary.md" || fail "summary lacks /$1/"
}
row '^\| tests \| cuda_backend_test \| PASS \| 2 / 0 / 0 \|'
row '^\| tests \| cuda_step_test \| FAIL \| 1 / 0 / 1 \| 1 skipped \(a skip on a GPU is a failure\)'
row '^\| tests \| cuda_newton_schulz_test \| FAIL \| 1 / 1 / 0 \| .*failed: Ns.A'
row '^\| tests \| nccl_comm_test \| FAIL \| 0 / 0 / 0 \| missing from'
row '^\| metric \| backend.pass1.f32 \| PASS \|'
row '^\| metric \| backend.pass2.f32 \| FAIL \| .*0.0003 \(tolerance 1e-05'
row '^\| info \| backend.workspace_bytes \| .*1048576'
row '^\| overall \|  \| FAIL \|'
[ "$(tail -1 "$work/out2/summary.md" | cut -c1-11)" = "| overall |" ] || fail "the summary does not end in its table"
grep -q 'memcheck\|two-ranks' "$work/out2/summary.md" && fail "parts not asked for ran"
if [ "$failures" -ne 0 ]; then
  echo "--- summary.md"; cat "$work/out2/summary.md"; echo "--- output"; cat "$work/log2"
  exit 1
fi
echo "ok: --force over stand-in programs: counts, skips, failures, missing, metrics, info"
