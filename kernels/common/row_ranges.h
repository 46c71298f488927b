// A fixed partition of a matrix's rows into contiguous ranges. Reductions accumulate one
// partial per range and combine them in range order, so every sum is the same whatever the
// number of threads (OpenMP on the CPU, blocks on a GPU); the ranges are also the unit of
// parallel work.
#ifndef MDOPT_KERNELS_COMMON_ROW_RANGES_H_
#define MDOPT_KERNELS_COMMON_ROW_RANGES_H_

#include <cstdint>

#include "kernels/common/host_device.h"

namespace mdopt::kernels {

// Up to this many ranges per matrix: enough to keep 32 threads busy, few enough that one
// column-sum partial per range stays small.
inline constexpr int64_t kMaxRowRanges = 32;

// Below this many elements a pass runs on one thread: waking a team costs more.
inline constexpr int64_t kParallelMinElements = 1 << 15;

struct RowRanges {
  int64_t rows = 0;
  int64_t count = 0;

  // min(max(r, 1), kMaxRowRanges), without std::min/max: those are not device functions.
  MDOPT_HD explicit RowRanges(int64_t r)
      : rows(r), count(r < 1 ? 1 : (r > kMaxRowRanges ? kMaxRowRanges : r)) {}
  MDOPT_HD int64_t begin(int64_t k) const { return rows * k / count; }
  MDOPT_HD int64_t end(int64_t k) const { return rows * (k + 1) / count; }
};

}  // namespace mdopt::kernels

#endif  // MDOPT_KERNELS_COMMON_ROW_RANGES_H_
