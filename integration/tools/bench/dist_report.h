// mdopt-bench at several ranks (--mpi): the per-rank figures of every timed step reduced
// over ranks and printed by rank 0: step time, communication in flight and exposed (waited
// on), bytes sent per rank per step against the floor of the schedule's collectives (with
// the cross-row sums' share of it on its own), and the imbalance of step time and state over
// ranks.
#ifndef MDOPT_INTEGRATION_TOOLS_BENCH_DIST_REPORT_H_
#define MDOPT_INTEGRATION_TOOLS_BENCH_DIST_REPORT_H_

#include <cstdint>
#include <cstdio>
#include <vector>

#include "bench_runner.h"

namespace mdopt_bench {

struct DistSetup {
  int world = 1, rank = 0;
  bool grads_local = true;
  bool gather_eager = true;  // gather=deferred: the weight all-gather is mdopt_gather_params'
  int grad_comm_bytes = 4;  // gradient reduce-scatter element: f32, 2 with grad_comm_dtype=bf16
  int param_bytes = 4;      // the weight all-gather's element: the param dtype
  int ns_comm_bytes = 4;    // 2 with ns_comm_dtype=bf16
  int64_t params = 0;       // elements
};

// The floor of the bytes a rank puts on the wire per step, averaged over ranks, term by term
// (the collectives of dist_opt/schedule.cc; N ranks, P elements in T params):
//   grads    (N - 1) / N x P x g: the gradient reduce-scatter (grads=local), g = 4 (float32,
//            whatever the gradient dtype) or 2 (grad_comm_dtype=bf16);
//   weights  (N - 1) / N x P x w: the weight all-gather, w the param dtype's size (0 with
//            gather=deferred, which leaves it to mdopt_gather_params, outside the step);
//   ns       2 (N - 1) / N^2 x P_ns x c: the X gather to the Newton-Schulz owner and the O
//            scatter back of the rows-layout Muon matrices (P_ns elements), c = ns_comm_dtype;
//   cross    sum over buckets of floor(2 (N - 1) x 8 L_b / N): one float64 all-reduce of the
//            bucket's cross-row record of L_b doubles (and of its tangent=1 radial record);
//   check    floor(2 (N - 1) x 8 T / N): the finite check's all-reduce of one double per param.
// The all-reduces are the same on every rank, so cross and check are exact per rank; grads,
// weights and ns leave out the padding of uneven row blocks, which comes on top. Zero at one
// rank.
struct FloorTerms {
  double grads = 0, weights = 0, ns = 0;
  int64_t cross = 0, check = 0;
  // What the cross-row sums cost as the all-gather of every rank's record that they were
  // before the all-reduce: (N - 1) x 8 x L_b per bucket and rank. For comparison only.
  int64_t cross_as_allgather = 0;
  double total() const { return grads + weights + ns + static_cast<double>(cross + check); }
};
FloorTerms Floor(const DistSetup& s, const BenchRow& row);
double FloorBytesPerRank(const DistSetup& s, const BenchRow& row);

// Collective over MPI_COMM_WORLD; prints on rank 0. Built only with MPI.
void PrintDistributed(std::FILE* out, const DistSetup& setup, const std::vector<BenchRow>& rows);

}  // namespace mdopt_bench

#endif  // MDOPT_INTEGRATION_TOOLS_BENCH_DIST_REPORT_H_
