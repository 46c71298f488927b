#!/usr/bin/env bash
# mdopt across four "hosts" (network namespaces on this machine, one veth each to a bridge,
# TCP only between them, one rank and one thread per host), launched by launch/mpirun.sh over
# launch/netns-hosts.sh's rsh agent:
#  1. link cut: at step 4 host 4's cable is pulled (its veth set down) while ranks 0-2 are in
#     the step waiting on rank 3. Every rank, the cut-off one included, must return
#     MDOPT_COMM_ERROR from that step within comm_timeout_s (3 s) plus a margin, measured by
#     the step's own clock and from the moment of the cut;
#  2. restart at 3 hosts from the last checkpoint (step 3, in a directory every namespace
#     sees): steps 4-8 must end within the sharded tolerance (5e-6) of an uninterrupted run;
#  3. lost host: at 3 hosts, every process of host 3 (its Open MPI daemon and its rank) is
#     killed with SIGKILL while ranks 0 and 1 wait on it in step 4; both survivors must
#     return MDOPT_COMM_ERROR within the same bound;
#  4. restart at 2 hosts from that run's last checkpoint, as in 2.
# Skips (exit 77) where namespaces cannot be made (not root, no CAP_NET_ADMIN, no iproute2)
# and in the sanitizer build. Cleans up its namespaces, veths and bridge on every exit.
#
# Usage: host_fault_test.sh SOURCE_DIR HOST_FAULT_PROGRAM [sanitized]
set -euo pipefail
src="$1"
prog="$2"
sanitized="${3:-}"

TIMEOUT=3     # comm_timeout_s of the training runs
MARGIN=3      # allowed beyond it: the step's own clock vs the wall clock, a loaded 2-core CI box
STEPS=8
FAULT_STEP=4

skip() {
  echo "host_fault_test.sh: Skipped"
  echo "$1"
  echo "[  SKIPPED ] host_fault_test"
  exit 77
}
if [ -n "$sanitized" ]; then
  skip "host faults across network namespaces: not in the sanitizer build (its bounds on the time to MDOPT_COMM_ERROR are wall-clock, and ASan's start-up of four ranks over rsh-launched daemons makes them flaky; the same timeout and abort paths run under the sanitizers in fault_peer_* and c_abi_abort_*)"
fi
command -v ip >/dev/null 2>&1 || skip "host faults across network namespaces: no 'ip' (iproute2) on this machine"
[ "$(id -u)" -eq 0 ] || skip "host faults across network namespaces: needs root (CAP_NET_ADMIN) to make namespaces and veths"

hosts_sh="$src/launch/netns-hosts.sh"
# Hosts left by a run that was killed outright (SIGKILL runs no trap): its process is gone.
for stale in $(ip netns list 2>/dev/null | awk '{print $1}' | sed -n 's/^mdh\([0-9]*\)-[0-9]*$/\1/p' | sort -u); do
  kill -0 "$stale" 2>/dev/null || bash "$hosts_sh" down "mdh$stale" || true
done
name="mdh$$"  # unique per run; at most 10 characters (interface names)
ip netns add "$name-probe" 2>/dev/null ||
  skip "host faults across network namespaces: 'ip netns add' is refused here (no CAP_NET_ADMIN)"
ip netns delete "$name-probe"

# A /24 no interface of this machine uses yet, derived from the process id.
a=$(( 100 + ($$ / 256) % 100 ))
b=$(( $$ % 256 ))
while ip -4 -o addr show | grep -q " inet 10\.$a\.$b\."; do b=$(( (b + 1) % 256 )); done
subnet="10.$a.$b"

work="$(mktemp -d "${TMPDIR:-/tmp}/mdopt_hostfault_XXXXXX")"
mpirun_pid=""
watchdog=""
cleanup() {
  local rc=$?
  [ -z "$mpirun_pid" ] || kill -9 "$mpirun_pid" 2>/dev/null || true
  kill "$watchdog" 2>/dev/null || true
  bash "$hosts_sh" down "$name" || true
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 77 ]; then
    for f in "$work"/*/log; do [ -f "$f" ] && { echo "---- $f"; tail -n 40 "$f"; }; done
  fi
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'echo "host_fault_test: FAIL: interrupted (or still running after 80 s)" >&2; exit 130' INT TERM
# Ends this script (and so cleans up) before ctest's 90 s timeout, which would SIGKILL it.
# Short sleeps, its output away from ctest's pipe: ending it leaves nothing that holds the pipe.
( exec >/dev/null 2>&1; for _ in $(seq 1 800); do sleep 0.1; kill -0 $$ || exit 0; done; kill -TERM $$ ) &
watchdog=$!

fail() { echo "host_fault_test: FAIL: $*" >&2; exit 1; }
now() { date +%s.%N; }
# awk does the arithmetic: bash has no floating point.
le() { awk -v x="$1" -v y="$2" 'BEGIN { exit !(x <= y) }'; }

bash "$hosts_sh" up "$name" "$subnet" 4 >"$work/hostfile"

# Every process left in the namespaces (daemons of a job whose mpirun was ended): killed one
# id at a time, and host 4's cable back in.
quiesce() {
  for k in 1 2 3 4; do
    for p in $(bash "$hosts_sh" pids "$name" "$k"); do kill -9 "$p" 2>/dev/null || true; done
  done
  bash "$hosts_sh" link "$name" 4 up
}

launch() {  # DIR HOSTS ARGS...: the job in the background, its output in DIR/log
  local dir="$1" n="$2"
  shift 2
  head -n "$n" "$work/hostfile" >"$dir/hosts"
  bash "$src/launch/mpirun.sh" -n "$n" -t 1 --bind none --hostfile "$dir/hosts" \
    --rsh-agent "$hosts_sh agent" --tcp "$subnet.0/24" --survive -- "$prog" "$@" \
    >"$dir/log" 2>&1 &
  mpirun_pid=$!
}

end_job() {  # ends mpirun: after a fault it may wait for the lost host for good
  kill -TERM "$mpirun_pid" 2>/dev/null || true
  for _ in $(seq 1 20); do kill -0 "$mpirun_pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$mpirun_pid" 2>/dev/null || true
  wait "$mpirun_pid" 2>/dev/null || true
  mpirun_pid=""
  quiesce
}

# fault_run LABEL HOSTS FAULT(cut|kill) REPORTERS: the victim is the last rank, on the last host.
fault_run() {
  local label="$1" n="$2" fault="$3" reporters="$4"
  local dir="$work/$label" victim=$(( $2 - 1 ))
  mkdir -p "$dir"
  local t0; t0=$(now)
  launch "$dir" "$n" train "$dir" "$STEPS" "$FAULT_STEP" "$victim" "$TIMEOUT"
  # The victim is at step FAULT_STEP, waiting for "go"; the others are entering the step.
  for _ in $(seq 1 300); do
    [ -f "$dir/victim-ready" ] && break
    kill -0 "$mpirun_pid" 2>/dev/null || fail "$label: the job ended before the fault"
    sleep 0.1
  done
  [ -f "$dir/victim-ready" ] || fail "$label: the victim never reached step $FAULT_STEP"
  # The victim's pid lives in host n's namespace: the fault hits the rank it means to.
  local vpid; vpid=$(cat "$dir/victim-ready")
  bash "$hosts_sh" pids "$name" "$n" | grep -qx "$vpid" || fail "$label: rank $victim (pid $vpid) is not on host $n"
  sleep 0.3  # ranks 0..n-2 are inside the step by now, waiting on the victim
  if [ "$fault" = cut ]; then
    bash "$hosts_sh" link "$name" "$n" down
  else
    for p in $(bash "$hosts_sh" pids "$name" "$n"); do kill -9 "$p" 2>/dev/null || true; done
  fi
  local tf; tf=$(now)
  touch "$dir/go"  # a cut-off victim steps too, into its dead link
  local deadline; deadline=$(awk -v t="$tf" -v d=$(( TIMEOUT + MARGIN + 10 )) 'BEGIN { printf "%.3f", t + d }')
  local r missing
  while :; do
    missing=""
    for r in $reporters; do [ -f "$dir/result-$r" ] || missing="$missing $r"; done
    [ -z "$missing" ] && break
    le "$(now)" "$deadline" || break
    sleep 0.05
  done
  end_job
  [ -z "$missing" ] || fail "$label: no result from rank(s)$missing $(( TIMEOUT + MARGIN + 10 )) s after the fault"
  local bound=$(( TIMEOUT + MARGIN ))
  for r in $reporters; do
    # "rank R step S status NAME elapsed SECONDS end EPOCH_SECONDS"
    read -r _ rr _ step _ status _ elapsed _ end <"$dir/result-$r"
    local after; after=$(awk -v e="$end" -v f="$tf" 'BEGIN { printf "%.3f", e - f }')
    echo "host_fault_test: $label: rank $rr: $status at step $step, step took $elapsed s, $after s after the fault (comm_timeout_s $TIMEOUT)"
    [ "$status" = MDOPT_COMM_ERROR ] || fail "$label: rank $r returned $status, not MDOPT_COMM_ERROR"
    [ "$step" -eq "$FAULT_STEP" ] || fail "$label: rank $r failed at step $step, not $FAULT_STEP"
    le "$elapsed" "$bound" || fail "$label: rank $r's step took $elapsed s > $bound s"
    le "$after" "$bound" || fail "$label: rank $r reported $after s after the fault > $bound s"
  done
  [ "$(cat "$dir/ckpt-step")" -eq $(( FAULT_STEP - 1 )) ] || fail "$label: last checkpoint at step $(cat "$dir/ckpt-step")"
  echo "host_fault_test: $label: job took $(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }') s"
}

restart() {  # LABEL HOSTS: from LABEL's last checkpoint at HOSTS hosts, to STEPS
  local dir="$work/$1" n="$2" t0; t0=$(now)
  mkdir -p "$dir/restart"
  launch "$dir/restart" "$n" resume "$dir" "$STEPS"
  local rc=0
  for _ in $(seq 1 300); do kill -0 "$mpirun_pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$mpirun_pid" 2>/dev/null && fail "$1: the restart at $n hosts did not end within 30 s"
  wait "$mpirun_pid" || rc=$?
  mpirun_pid=""
  [ "$rc" -eq 0 ] || fail "$1: the restart at $n hosts exited $rc"
  [ -f "$dir/resume-result" ] || fail "$1: the restart wrote no result"
  # "from S to T ranks N rel_err E moved M"
  local from ranks err
  read -r _ from _ _ _ ranks _ err _ _ <"$dir/resume-result"
  [ "$from" -eq $(( FAULT_STEP - 1 )) ] || fail "$1: resumed from step $from"
  [ "$ranks" -eq "$n" ] || fail "$1: resumed at $ranks ranks, not $n"
  le "$err" 5e-6 || fail "$1: the resumed run is $err away from the uninterrupted one"
  echo "host_fault_test: $1: restarted at $n hosts: $(cat "$dir/resume-result") (tolerance 5e-6; took $(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }') s)"
}

fault_run link_cut 4 cut "0 1 2 3"
restart link_cut 3
fault_run host_killed 3 kill "0 1"
restart host_killed 2
echo "host_fault_test: ok"
