#include "dist_report.h"

#include <mpi.h>

#include <algorithm>
#include <numeric>

namespace mdopt_bench {
namespace {

double MedianOf(std::vector<double> v) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  const size_t h = v.size() / 2;
  return v.size() % 2 == 1 ? v[h] : 0.5 * (v[h - 1] + v[h]);
}

// {min, mean, max} of x over ranks.
void OverRanks(double x, int world, double* lo, double* mean, double* hi) {
  MPI_Allreduce(&x, lo, 1, MPI_DOUBLE, MPI_MIN, MPI_COMM_WORLD);
  MPI_Allreduce(&x, hi, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  double sum = 0.0;
  MPI_Allreduce(&x, &sum, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
  *mean = sum / world;
}

}  // namespace

double FloorBytesPerRank(const DistSetup& s, const BenchRow& row) {
  const double n = s.world;
  const double share = (n - 1) / n;
  const double collectives =
      share * static_cast<double>(s.params) * ((s.grads_local ? s.grad_bytes : 0) + s.param_bytes);
  const double newton_schulz = 2.0 * share / n * static_cast<double>(row.ns_gathered_elements) *
                               s.ns_comm_bytes;
  return collectives + newton_schulz;
}

void PrintDistributed(std::FILE* out, const DistSetup& s, const std::vector<BenchRow>& rows) {
  if (s.rank == 0) {
    std::fprintf(out,
                 "\n%d ranks: medians over the timed steps, then over ranks (mean; max/mean is "
                 "the imbalance)\n",
                 s.world);
    std::fprintf(out, "%-10s %9s %7s %9s %9s %12s %12s %7s %9s\n", "preset", "step ms",
                 "max/mn", "comm ms", "exposed", "bytes/rank", "floor", "ratio", "state max/mn");
  }
  for (const BenchRow& r : rows) {
    std::vector<double> bytes(r.bytes_sent.begin(), r.bytes_sent.end());
    double lo, step, step_hi, comm_lo, comm, comm_hi, ex_lo, ex, ex_hi, b_lo, b, b_hi, st_lo, st, st_hi;
    OverRanks(MedianOf(r.step_seconds), s.world, &lo, &step, &step_hi);
    OverRanks(MedianOf(r.comm_seconds), s.world, &comm_lo, &comm, &comm_hi);
    OverRanks(MedianOf(r.exposed_seconds), s.world, &ex_lo, &ex, &ex_hi);
    OverRanks(MedianOf(bytes), s.world, &b_lo, &b, &b_hi);
    OverRanks(static_cast<double>(r.state_bytes), s.world, &st_lo, &st, &st_hi);
    if (s.rank != 0) continue;
    const double floor = FloorBytesPerRank(s, r);
    std::fprintf(out, "%-10s %9.2f %7.3f %9.2f %9.2f %12.0f %12.0f %7.3f %9.3f\n",
                 r.preset.c_str(), 1e3 * step, step > 0 ? step_hi / step : 1.0, 1e3 * comm,
                 1e3 * ex, b, floor, floor > 0 ? b / floor : 0.0, st > 0 ? st_hi / st : 1.0);
  }
  if (s.rank == 0) {
    std::fprintf(out,
                 "comm ms: time with communication in flight; exposed: time the step waited on "
                 "it (the rest overlapped compute).\nbytes/rank: bytes this rank sent per step "
                 "(mdopt_step_info.bytes_sent); floor = (N-1)/N x params x (grad bytes "
                 "[grads=local] + weight bytes) + 2 (N-1)/N^2 x rows-layout Muon elements x "
                 "NS comm bytes: the reduce-scatter, the all-gather and the Newton-Schulz "
                 "gather/scatter; ratio = bytes/floor (padding, cross-row sums on top).\n");
  }
}

}  // namespace mdopt_bench
