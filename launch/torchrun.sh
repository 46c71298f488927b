#!/usr/bin/env bash
# Runs a Python training script under torchrun (python3 -m torch.distributed.run) with the
# threads per rank mdopt's CPU engine wants. The script creates its communicator with
# mdopt.comm.torch_distributed() over the process group torchrun sets up (gloo on CPU).
#
# Usage: launch/torchrun.sh [options] [--] SCRIPT.py [ARGS...]
#   -n, --nproc N        ranks on this node (default: $MDOPT_RANKS, else 2)
#   -t, --threads T      OpenMP threads per rank (default: $MDOPT_THREADS, else the cores
#                        of this node divided by N, at least 1); exported as
#                        OMP_NUM_THREADS and MDOPT_THREADS (torchrun itself would set
#                        OMP_NUM_THREADS=1)
#   --nnodes N           nodes (default 1: --standalone, a rendezvous on this node)
#   --node-rank K        this node's index, with --nnodes > 1
#   --master ADDR:PORT   the rendezvous endpoint (c10d), with --nnodes > 1
#   --torchrun ARG       one more argument for torchrun (repeatable)
#   --dry-run            print the command instead of running it
#   -h, --help           this text
#
# Environment: OMP_PLACES=cores, OMP_PROC_BIND=close and OMP_WAIT_POLICY=passive unless
# set; NCCL_*, GLOO_SOCKET_IFNAME and UCX_* are inherited as they are (see
# docs/integration.md for the variables that matter on multi-node jobs).
#
# Example: launch/torchrun.sh -n 2 -t 1 -- integration/python/examples/train_tiny.py
set -euo pipefail

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

nproc_per_node="${MDOPT_RANKS:-2}"
threads="${MDOPT_THREADS:-}"
nnodes=1
node_rank=0
master=""
dry=0
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    -n|--nproc) nproc_per_node="$2"; shift 2 ;;
    -t|--threads) threads="$2"; shift 2 ;;
    --nnodes) nnodes="$2"; shift 2 ;;
    --node-rank) node_rank="$2"; shift 2 ;;
    --master) master="$2"; shift 2 ;;
    --torchrun) extra+=("$2"); shift 2 ;;
    --dry-run) dry=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) echo "launch/torchrun.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) break ;;
  esac
done
if [ $# -eq 0 ]; then
  echo "launch/torchrun.sh: no script given (see --help)" >&2
  exit 2
fi
for v in "$nproc_per_node" "$nnodes"; do
  case "$v" in ''|*[!0-9]*|0) echo "launch/torchrun.sh: counts must be positive integers, not '$v'" >&2; exit 2 ;; esac
done
# GNU nproc would answer OMP_NUM_THREADS if set: ask for the cores themselves.
cores="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc 2>/dev/null || echo 1)"
if [ -z "$threads" ]; then
  threads=$(( cores / nproc_per_node ))
  [ "$threads" -ge 1 ] || threads=1
fi
case "$threads" in ''|*[!0-9]*|0) echo "launch/torchrun.sh: --threads must be a positive integer, not '$threads'" >&2; exit 2 ;; esac

export OMP_NUM_THREADS="$threads" MDOPT_THREADS="$threads"
export OMP_PLACES="${OMP_PLACES:-cores}" OMP_PROC_BIND="${OMP_PROC_BIND:-close}"
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-passive}"

cmd=("${PYTHON:-python3}" -m torch.distributed.run --nproc-per-node "$nproc_per_node")
if [ "$nnodes" -eq 1 ]; then
  cmd+=(--standalone)
else
  if [ -z "$master" ]; then
    echo "launch/torchrun.sh: --nnodes $nnodes needs --master ADDR:PORT" >&2
    exit 2
  fi
  cmd+=(--nnodes "$nnodes" --node-rank "$node_rank" --rdzv-backend c10d --rdzv-endpoint "$master")
fi
cmd+=("${extra[@]}" "$@")

if [ "$dry" -eq 1 ]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
exec "${cmd[@]}"
