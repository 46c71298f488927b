#!/usr/bin/env bash
# The launchers' interfaces: --help prints their usage, --dry-run the exact command they
# would run (threads per rank, binding, the bootstrap of each launcher), bad arguments are
# refused with a message; and launch/mpirun.sh really runs 2 ranks with the threads asked
# for. Usage: launchers_test.sh SOURCE_DIR
set -uo pipefail
src="$(cd "${1:?source dir}" && pwd)"
failures=0
expect() {  # expect NAME PATTERN COMMAND...: COMMAND succeeds and its output matches PATTERN
  local name="$1" pattern="$2"
  shift 2
  local out
  if ! out="$("$@" 2>&1)"; then
    echo "FAILED: $name: non-zero exit from: $*"; echo "$out"; failures=$((failures + 1)); return
  fi
  if ! grep -Eq -- "$pattern" <<<"$out"; then
    echo "FAILED: $name: output does not match '$pattern':"; echo "$out"; failures=$((failures + 1)); return
  fi
  echo "ok: $name"
}
refuse() {  # refuse NAME PATTERN COMMAND...: COMMAND fails and says PATTERN
  local name="$1" pattern="$2"
  shift 2
  local out
  if out="$("$@" 2>&1)"; then
    echo "FAILED: $name: succeeded: $*"; failures=$((failures + 1)); return
  fi
  grep -Eq -- "$pattern" <<<"$out" || { echo "FAILED: $name: message '$out' lacks '$pattern'"; failures=$((failures + 1)); return; }
  echo "ok: $name"
}

m="$src/launch/mpirun.sh"
t="$src/launch/torchrun.sh"
s="$src/launch/slurm.sbatch"
expect "mpirun.sh --help" "^Usage: launch/mpirun.sh" "$m" --help
expect "torchrun.sh --help" "^Usage: launch/torchrun.sh" "$t" --help
expect "slurm.sbatch --help" "NCCL_SOCKET_IFNAME" bash "$s" --help
expect "mpirun.sh binds T cores per rank" "-np 3 .*--map-by slot:PE=1 --bind-to core .*-x OMP_NUM_THREADS .* prog arg" \
  env MDOPT_THREADS= "$m" --dry-run -n 3 -t 1 --bind core -- prog arg
expect "mpirun.sh oversubscribes without binding" "--bind-to none --oversubscribe" "$m" --dry-run -n 4 -t 4096 -- prog
expect "torchrun.sh standalone" "torch.distributed.run --nproc-per-node 2 --standalone train.py --x" \
  "$t" --dry-run -n 2 -t 1 -- train.py --x
expect "torchrun.sh multi-node" "--nnodes 2 --node-rank 1 --rdzv-backend c10d --rdzv-endpoint h:29400" \
  "$t" --dry-run --nnodes 2 --node-rank 1 --master h:29400 -- train.py
expect "slurm.sbatch srun" "srun --mpi=pmix --ntasks=4 --cpus-per-task=3 .* prog" \
  env SLURM_NTASKS=4 SLURM_CPUS_PER_TASK=3 bash "$s" --dry-run -- prog
expect "slurm.sbatch mpirun" "mpirun -np 4 .*--map-by slot:PE=3 --bind-to core" \
  env SLURM_NTASKS=4 SLURM_CPUS_PER_TASK=3 bash "$s" --dry-run --launcher mpirun -- prog
expect "slurm.sbatch torchrun" "srun --ntasks=2 --ntasks-per-node=1 --cpus-per-task=6 .*--nnodes=2 --nproc-per-node=2 --rdzv-backend=c10d" \
  env SLURM_NTASKS=4 SLURM_NNODES=2 SLURM_CPUS_PER_TASK=3 bash "$s" --dry-run --launcher torchrun -- train.py
hf="$(mktemp)"
printf '10.9.9.11 slots=1\n10.9.9.12 slots=1\n# a comment\n' >"$hf"
expect "mpirun.sh over hosts, TCP only, surviving a lost host" \
  "-np 4 .*--map-by slot:PE=1 --bind-to core --hostfile $hf --mca plm_rsh_agent .*agent --mca btl tcp.{1,2}self --mca btl_tcp_if_include 10.9.9.0/24 --mca oob_tcp_if_include 10.9.9.0/24 --enable-recovery --mca orte_abort_on_non_zero_status 0 .* prog" \
  env MDOPT_THREADS= "$m" --dry-run -n 4 --hostfile "$hf" --rsh-agent "launch/netns-hosts.sh agent" --tcp 10.9.9.0/24 --survive -- prog
refuse "mpirun.sh unreadable hostfile" "cannot read the hostfile" "$m" --hostfile /nonexistent -- prog
rm -f "$hf"
refuse "mpirun.sh without a command" "no command given" "$m"
refuse "mpirun.sh bad rank count" "positive integer" "$m" -n x -- prog
refuse "slurm.sbatch outside Slurm" "not inside a Slurm job" env -u SLURM_JOB_ID bash "$s" -- prog
refuse "slurm.sbatch bad launcher" "must be srun, mpirun or torchrun" env SLURM_JOB_ID=1 bash "$s" --launcher x -- prog
# A real run: 2 ranks, one thread each, as the environment each rank sees.
if command -v mpirun >/dev/null 2>&1; then
  out="$("$m" -n 2 -t 1 -- bash -c 'echo "rank $OMPI_COMM_WORLD_RANK threads $OMP_NUM_THREADS $MDOPT_THREADS"' 2>&1 | sort | tr '\n' ' ')"
  if [ "$out" = "rank 0 threads 1 1 rank 1 threads 1 1 " ]; then
    echo "ok: mpirun.sh runs 2 ranks with OMP_NUM_THREADS=MDOPT_THREADS=1"
  else
    echo "FAILED: mpirun.sh -n 2 -t 1 printed: $out"; failures=$((failures + 1))
  fi
fi
[ "$failures" -eq 0 ] && echo "launchers_test: ok"
exit $(( failures != 0 ))
