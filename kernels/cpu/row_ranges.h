// A fixed partition of a matrix's rows into contiguous ranges. Reductions accumulate one
// partial per range and combine them in range order, so every sum is the same whatever the
// number of OpenMP threads; the ranges are also the unit of parallel work.
#ifndef MDOPT_KERNELS_CPU_ROW_RANGES_H_
#define MDOPT_KERNELS_CPU_ROW_RANGES_H_

#include <algorithm>
#include <cstdint>

namespace mdopt::kernels {

// Up to this many ranges per matrix: enough to keep 32 threads busy, few enough that one
// column-sum partial per range stays small.
inline constexpr int64_t kMaxRowRanges = 32;

// Below this many elements a pass runs on one thread: waking a team costs more.
inline constexpr int64_t kParallelMinElements = 1 << 15;

struct RowRanges {
  int64_t rows = 0;
  int64_t count = 0;

  explicit RowRanges(int64_t r) : rows(r), count(std::min<int64_t>(std::max<int64_t>(r, 1), kMaxRowRanges)) {}
  int64_t begin(int64_t k) const { return rows * k / count; }
  int64_t end(int64_t k) const { return rows * (k + 1) / count; }
};

}  // namespace mdopt::kernels

#endif  // MDOPT_KERNELS_CPU_ROW_RANGES_H_
