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

FloorTerms Floor(const DistSetup& s, const BenchRow& row) {
  FloorTerms t;
  if (s.world <= 1) return t;
  const int64_t n = s.world;
  const double share = static_cast<double>(n - 1) / static_cast<double>(n);
  const double p = static_cast<double>(s.params);
  t.grads = s.grads_local ? share * p * s.grad_comm_bytes : 0.0;
  t.weights = s.gather_eager ? share * p * s.param_bytes : 0.0;
  t.ns = 2.0 * share / static_cast<double>(n) * static_cast<double>(row.ns_gathered_elements) *
         s.ns_comm_bytes;
  // comm/traffic.h's all-reduce: 2 (N - 1) x count x 8 / N bytes, rounded down, per call.
  auto all_reduce = [n](int64_t doubles) { return 2 * (n - 1) * doubles * 8 / n; };
  for (size_t b = 0; b < row.cross_record.size(); ++b) {
    if (row.cross_record[b] > 0) {
      t.cross += all_reduce(row.cross_record[b]);
      t.cross_as_allgather += (n - 1) * 8 * row.cross_record[b];
    }
    if (b < row.radial_record.size() && row.radial_record[b] > 0) {
      t.cross += all_reduce(row.radial_record[b]);
      t.cross_as_allgather += (n - 1) * 8 * row.radial_record[b];
    }
  }
  t.check = all_reduce(2 * row.tensors);  // a sum of squares and a gradient presence per param
  return t;
}

double FloorBytesPerRank(const DistSetup& s, const BenchRow& row) { return Floor(s, row).total(); }

void PrintDistributed(std::FILE* out, const DistSetup& s, const std::vector<BenchRow>& rows) {
  if (s.rank == 0) {
    std::fprintf(out,
                 "\n%d ranks: medians over the timed steps, then over ranks (mean; max/mean is "
                 "the imbalance)\n",
                 s.world);
    std::fprintf(out, "%-10s %9s %7s %9s %9s %12s %12s %7s %10s %9s\n", "preset", "step ms",
                 "max/mn", "comm ms", "exposed", "bytes/rank", "floor", "ratio", "cross B",
                 "state max/mn");
  }
  std::vector<double> sent(rows.size(), 0.0);
  for (size_t i = 0; i < rows.size(); ++i) {
    const BenchRow& r = rows[i];
    std::vector<double> bytes(r.bytes_sent.begin(), r.bytes_sent.end());
    double lo, step, step_hi, comm_lo, comm, comm_hi, ex_lo, ex, ex_hi, b_lo, b, b_hi;
    double st_lo, st, st_hi;
    OverRanks(MedianOf(r.step_seconds), s.world, &lo, &step, &step_hi);
    OverRanks(MedianOf(r.comm_seconds), s.world, &comm_lo, &comm, &comm_hi);
    OverRanks(MedianOf(r.exposed_seconds), s.world, &ex_lo, &ex, &ex_hi);
    OverRanks(MedianOf(bytes), s.world, &b_lo, &b, &b_hi);
    OverRanks(static_cast<double>(r.state_bytes), s.world, &st_lo, &st, &st_hi);
    if (s.rank != 0) continue;
    sent[i] = b;
    const FloorTerms f = Floor(s, r);
    const double floor = f.total();
    std::fprintf(out, "%-10s %9.2f %7.3f %9.2f %9.2f %12.0f %12.0f %7.4f %10lld %9.3f\n",
                 r.preset.c_str(), 1e3 * step, step > 0 ? step_hi / step : 1.0, 1e3 * comm,
                 1e3 * ex, b, floor, floor > 0 ? b / floor : 0.0,
                 static_cast<long long>(f.cross), st > 0 ? st_hi / st : 1.0);
  }
  if (s.rank != 0) return;
  std::fprintf(out,
               "comm ms: time with communication in flight; exposed: time the step waited on\n"
               "  it (the rest overlapped compute). bytes/rank: bytes a rank put on the wire\n"
               "  per step (mdopt_step_info.bytes_sent), mean over ranks; floor: the sum of the\n"
               "  terms below; ratio = bytes/floor (the padding of uneven row blocks on top);\n"
               "  cross B: the cross-row sums' bytes per rank per step.\n");
  std::fprintf(out, "\nfloor terms, bytes per rank per step:\n");
  std::fprintf(out, "%-10s %12s %12s %12s %10s %8s %12s %12s\n", "preset", "grads", "weights",
               "ns", "cross", "check", "bytes-floor", "cross as AG");
  for (size_t i = 0; i < rows.size(); ++i) {
    const FloorTerms f = Floor(s, rows[i]);
    std::fprintf(out, "%-10s %12.0f %12.0f %12.0f %10lld %8lld %12.0f %12lld\n",
                 rows[i].preset.c_str(), f.grads, f.weights, f.ns,
                 static_cast<long long>(f.cross), static_cast<long long>(f.check),
                 sent[i] - f.total(), static_cast<long long>(f.cross_as_allgather));
  }
  std::fprintf(out,
               "grads = (N-1)/N x params x g (grads=local; g = 4 B, float32 whatever the\n"
               "  gradient dtype, 2 B with grad_comm_dtype=bf16); weights = (N-1)/N x params\n"
               "  x weight bytes (gather=eager); ns = 2 (N-1)/N^2 x rows-layout Muon elements\n"
               "  x ns_comm_dtype bytes (X to the Newton-Schulz owner, O back); cross = sum\n"
               "  over buckets of floor(2 (N-1) x 8 L_b / N): one float64 all-reduce of the\n"
               "  bucket's record of L_b doubles (per rows-layout matrix: n with column gains,\n"
               "  1 with a scalar gain, 1 with a frobenius sphere, n with a column sphere;\n"
               "  tangent=1 adds 2 or 2n); check = floor(2 (N-1) x 16 T / N) for T params: the\n"
               "  finite check's all-reduce (per param a sum of squares and a gradient count). cross as AG: (N-1) x 8 x L_b per bucket, what an\n"
               "  all-gather of every rank's record would send.\n");
}

}  // namespace mdopt_bench
