// Which rows of each matrix this rank owns (DESIGN.md section 3): block r of N contiguous
// blocks of ceil(m / N) rows. With one rank that is every row.
#ifndef MDOPT_DIST_OPT_SHARD_PLAN_H_
#define MDOPT_DIST_OPT_SHARD_PLAN_H_

#include <algorithm>
#include <cstdint>

namespace mdopt {

struct RowBlock {
  int64_t begin = 0, end = 0;
  int64_t rows() const { return end - begin; }
};

inline RowBlock OwnedRows(int64_t m, int rank, int world) {
  const int64_t per = (m + world - 1) / world;
  const int64_t b = std::min<int64_t>(m, per * rank);
  return {b, std::min<int64_t>(m, b + per)};
}

}  // namespace mdopt

#endif  // MDOPT_DIST_OPT_SHARD_PLAN_H_
