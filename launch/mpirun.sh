#!/usr/bin/env bash
# Runs a command as N MPI ranks on this node (Open MPI's mpirun), with the threads per rank,
# OpenMP environment and core binding that mdopt's CPU engine wants.
#
# Usage: launch/mpirun.sh [options] [--] COMMAND [ARGS...]
#   -n, --ranks N        ranks (default: $MDOPT_RANKS, else 2)
#   -t, --threads T      OpenMP threads per rank (default: $MDOPT_THREADS, else the cores
#                        of this node divided by N, at least 1). Exported to every rank as
#                        OMP_NUM_THREADS and MDOPT_THREADS; mdopt's `threads=` option
#                        defaults to OpenMP's, i.e. to this
#   --bind MODE          core: each rank bound to its own T cores (--map-by slot:PE=T
#                        --bind-to core); none: no binding; auto (default): core when
#                        N x T fits in the node's cores, else none with --oversubscribe
#   --mpirun ARG         one more argument for mpirun (repeatable), e.g. --mpirun --report-bindings
#   --dry-run            print the mpirun command instead of running it
#   -h, --help           this text
#
# Environment passed to every rank: OMP_NUM_THREADS, MDOPT_THREADS, OMP_PLACES=cores,
# OMP_PROC_BIND=close, OMP_WAIT_POLICY (passive unless set: waiting threads sleep instead of
# spinning against other ranks' threads), and any UCX_*, NCCL_*, MDOPT_* variable already
# set. As root, --allow-run-as-root is added. Multi-node runs belong to a scheduler (see
# launch/slurm.sbatch) or to mpirun with a hostfile of your own.
#
# Example: launch/mpirun.sh -n 4 -t 2 -- build/tests/dist/c_abi_sharded
set -euo pipefail

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

ranks="${MDOPT_RANKS:-2}"
threads="${MDOPT_THREADS:-}"
bind=auto
dry=0
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    -n|--ranks) ranks="$2"; shift 2 ;;
    -t|--threads) threads="$2"; shift 2 ;;
    --bind) bind="$2"; shift 2 ;;
    --mpirun) extra+=("$2"); shift 2 ;;
    --dry-run) dry=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) echo "launch/mpirun.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) break ;;
  esac
done
if [ $# -eq 0 ]; then
  echo "launch/mpirun.sh: no command given (see --help)" >&2
  exit 2
fi
case "$ranks" in ''|*[!0-9]*|0) echo "launch/mpirun.sh: --ranks must be a positive integer, not '$ranks'" >&2; exit 2 ;; esac
# GNU nproc would answer OMP_NUM_THREADS if set: ask for the cores themselves.
cores="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc 2>/dev/null || echo 1)"
if [ -z "$threads" ]; then
  threads=$(( cores / ranks ))
  [ "$threads" -ge 1 ] || threads=1
fi
case "$threads" in ''|*[!0-9]*|0) echo "launch/mpirun.sh: --threads must be a positive integer, not '$threads'" >&2; exit 2 ;; esac
if [ "$bind" = auto ]; then
  if [ $(( ranks * threads )) -le "$cores" ]; then bind=core; else bind=none; fi
fi

mpirun_bin="${MPIRUN:-mpirun}"
cmd=("$mpirun_bin" -np "$ranks")
[ "$(id -u)" -ne 0 ] || cmd+=(--allow-run-as-root)
case "$bind" in
  core) cmd+=(--map-by "slot:PE=$threads" --bind-to core) ;;
  none) cmd+=(--bind-to none --oversubscribe) ;;
  *) echo "launch/mpirun.sh: --bind must be core, none or auto, not '$bind'" >&2; exit 2 ;;
esac

export OMP_NUM_THREADS="$threads" MDOPT_THREADS="$threads"
export OMP_PLACES="${OMP_PLACES:-cores}" OMP_PROC_BIND="${OMP_PROC_BIND:-close}"
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-passive}"
for v in OMP_NUM_THREADS MDOPT_THREADS OMP_PLACES OMP_PROC_BIND OMP_WAIT_POLICY; do cmd+=(-x "$v"); done
while IFS='=' read -r name _; do
  case "$name" in UCX_*|NCCL_*|MDOPT_*) [ "$name" = MDOPT_THREADS ] || cmd+=(-x "$name") ;; esac
done < <(env)
cmd+=("${extra[@]}" "$@")

if [ "$dry" -eq 1 ]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
exec "${cmd[@]}"
