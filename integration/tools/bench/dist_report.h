// mdopt-bench at several ranks (--mpi): the per-rank figures of every timed step reduced
// over ranks and printed by rank 0: step time, communication in flight and exposed (waited
// on), bytes sent per rank per step against the floor of the schedule's collectives, and
// the imbalance of step time and state over ranks.
#ifndef MDOPT_INTEGRATION_TOOLS_BENCH_DIST_REPORT_H_
#define MDOPT_INTEGRATION_TOOLS_BENCH_DIST_REPORT_H_

#include <cstdio>
#include <vector>

#include "bench_runner.h"

namespace mdopt_bench {

struct DistSetup {
  int world = 1, rank = 0;
  bool grads_local = true;
  int grad_bytes = 4, param_bytes = 4;  // element sizes
  int ns_comm_bytes = 4;                // 2 with ns_comm_dtype=bf16
  int64_t params = 0;
};

// The floor of bytes a rank sends per step, averaged over ranks, that the schedule implies:
// the gradient reduce-scatter (grads=local) and the weight all-gather each move (N - 1) / N
// of every element; a rows-layout Muon matrix's X gather to its Newton-Schulz owner and
// O scatter back move 2 (N - 1) / N^2 of its elements per rank on average. Cross-row sums,
// the finite check and the padding of uneven row blocks come on top.
double FloorBytesPerRank(const DistSetup& s, const BenchRow& row);

// Collective over MPI_COMM_WORLD; prints on rank 0. Built only with MPI.
void PrintDistributed(std::FILE* out, const DistSetup& setup, const std::vector<BenchRow>& rows);

}  // namespace mdopt_bench

#endif  // MDOPT_INTEGRATION_TOOLS_BENCH_DIST_REPORT_H_
