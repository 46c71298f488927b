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
#   --hostfile FILE      ranks over the hosts of FILE (Open MPI's hostfile: "host slots=K" lines)
#                        instead of this node; the default T then divides a node's cores by
#                        the ranks per host (ranks over the file's hosts, rounded up)
#   --rsh-agent CMD      how mpirun starts its daemon on a host (plm_rsh_agent; default ssh),
#                        e.g. launch/netns-hosts.sh agent for network namespaces
#   --tcp CIDR           ranks talk over TCP on that subnet only (btl tcp,self and both
#                        btl_tcp_if_include and oob_tcp_if_include set to CIDR): no shared
#                        memory between ranks, as between real hosts, and no other interface
#   --survive            a failed host or rank does not end the job at once (see below)
#   --dry-run            print the mpirun command instead of running it
#   -h, --help           this text
#
# Environment passed to every rank: OMP_NUM_THREADS, MDOPT_THREADS, OMP_PLACES=cores,
# OMP_PROC_BIND=close, OMP_WAIT_POLICY (passive unless set: waiting threads sleep instead of
# spinning against other ranks' threads), and any UCX_*, NCCL_*, MDOPT_* variable already
# set. As root, --allow-run-as-root is added. Multi-node runs belong to a scheduler (see
# launch/slurm.sbatch) or to --hostfile.
#
# --survive: by default Open MPI ends every rank as soon as one rank exits with an error or a
# host's daemon is lost, so the survivors never report anything. --enable-recovery keeps the
# job up when a daemon is lost, and --mca orte_abort_on_non_zero_status 0 when a rank exits
# with a non-zero status (or without MPI_Finalize): each survivor then sees MDOPT_COMM_ERROR
# from its own step within comm_timeout_s and can report it and exit. mpirun itself may then
# wait for the lost host for good: the job's supervisor ends it (docs/integration.md, "Faults
# across hosts").
#
# Example: launch/mpirun.sh -n 4 -t 2 -- build/tests/dist/c_abi_sharded
set -euo pipefail

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

ranks="${MDOPT_RANKS:-2}"
threads="${MDOPT_THREADS:-}"
bind=auto
dry=0
extra=()
hostfile=""
agent=""
tcp=""
survive=0
while [ $# -gt 0 ]; do
  case "$1" in
    -n|--ranks) ranks="$2"; shift 2 ;;
    -t|--threads) threads="$2"; shift 2 ;;
    --bind) bind="$2"; shift 2 ;;
    --mpirun) extra+=("$2"); shift 2 ;;
    --hostfile) hostfile="$2"; shift 2 ;;
    --rsh-agent) agent="$2"; shift 2 ;;
    --tcp) tcp="$2"; shift 2 ;;
    --survive) survive=1; shift ;;
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
per_host="$ranks"
if [ -n "$hostfile" ]; then
  [ -r "$hostfile" ] || { echo "launch/mpirun.sh: cannot read the hostfile '$hostfile'" >&2; exit 2; }
  hosts="$(grep -cvE '^[[:space:]]*(#|$)' "$hostfile" || true)"
  [ "$hosts" -ge 1 ] || { echo "launch/mpirun.sh: no host in '$hostfile'" >&2; exit 2; }
  per_host=$(( (ranks + hosts - 1) / hosts ))
fi
if [ -z "$threads" ]; then
  threads=$(( cores / per_host ))
  [ "$threads" -ge 1 ] || threads=1
fi
case "$threads" in ''|*[!0-9]*|0) echo "launch/mpirun.sh: --threads must be a positive integer, not '$threads'" >&2; exit 2 ;; esac
if [ "$bind" = auto ]; then
  if [ $(( per_host * threads )) -le "$cores" ]; then bind=core; else bind=none; fi
fi

mpirun_bin="${MPIRUN:-mpirun}"
cmd=("$mpirun_bin" -np "$ranks")
[ "$(id -u)" -ne 0 ] || cmd+=(--allow-run-as-root)
case "$bind" in
  core) cmd+=(--map-by "slot:PE=$threads" --bind-to core) ;;
  none) cmd+=(--bind-to none --oversubscribe) ;;
  *) echo "launch/mpirun.sh: --bind must be core, none or auto, not '$bind'" >&2; exit 2 ;;
esac
[ -z "$hostfile" ] || cmd+=(--hostfile "$hostfile")
[ -z "$agent" ] || cmd+=(--mca plm_rsh_agent "$agent")
[ -z "$tcp" ] || cmd+=(--mca btl tcp,self --mca btl_tcp_if_include "$tcp" --mca oob_tcp_if_include "$tcp")
[ "$survive" -eq 0 ] || cmd+=(--enable-recovery --mca orte_abort_on_non_zero_status 0)

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
