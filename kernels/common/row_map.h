// Where the rows of a fused weight's logical blocks sit in its tensor (spec key
// blocks=groups:G:h0,h1,...). A fused attention projection stores, per query group, its Q
// heads, then K, then V: the matrix is G groups of K pieces of h0, h1, ... rows. The
// optimizer's block j is piece j of every group, in group order (G * hj rows), a matrix of
// its own. Inside mdopt (master copy, moments, gains, every bucket buffer) a param's rows are
// in **block order** (block 0's rows, then block 1's, ...); only the reads and writes of the
// model's own tensors (weights and gradients) go through TensorRow. With G = 1 block order
// is the tensor's order and the map is the identity.
//
// Device-neutral: the CPU passes and the CUDA kernels share it (MDOPT_HD).
#ifndef MDOPT_KERNELS_COMMON_ROW_MAP_H_
#define MDOPT_KERNELS_COMMON_ROW_MAP_H_

#include <cstdint>

#include "kernels/common/host_device.h"

namespace mdopt::kernels {

// Pieces per group at most: a gated GQA projection has four (Q, gate, K, V).
inline constexpr int kMaxRowPieces = 8;

struct RowMap {
  int64_t groups = 1;      // G; 1: the identity
  int32_t pieces = 1;      // K
  int64_t group_rows = 0;  // H = h0 + h1 + ...: rows of one group
  int64_t height[kMaxRowPieces] = {};  // hj: rows of piece j in one group
  int64_t start[kMaxRowPieces] = {};   // its first row within a group

  MDOPT_HD bool identity() const { return groups <= 1 || pieces <= 1; }
  // Rows of one matrix (an expert of a stack): G * H.
  MDOPT_HD int64_t matrix_rows() const { return groups * group_rows; }

  // The tensor row of block-order row `l` (rows counted over the whole tensor, the experts of
  // a stack one after another). Also how many rows from `l` on are consecutive in the tensor
  // (`run`; the rest of the piece in its group), when asked.
  MDOPT_HD int64_t TensorRow(int64_t l, int64_t* run = nullptr) const {
    if (identity()) {
      if (run != nullptr) *run = INT64_MAX;
      return l;
    }
    const int64_t M = matrix_rows();
    const int64_t e = l / M, r = l - e * M;
    int j = 0;
    while (j + 1 < pieces && r >= groups * start[j + 1]) ++j;
    const int64_t within = r - groups * start[j];
    const int64_t g = within / height[j], i = within - g * height[j];
    if (run != nullptr) *run = height[j] - i;
    return e * M + g * group_rows + start[j] + i;
  }
  // The tensor element of block-order element `x` of a tensor with rows of `n` elements.
  MDOPT_HD int64_t TensorElement(int64_t x, int64_t n) const {
    if (identity()) return x;
    const int64_t l = x / n;
    return TensorRow(l) * n + (x - l * n);
  }
};

// Calls f(tensor_element, rel, len) for the pieces of elements [first, first + count) in
// block order (a row of `n` elements each) that are consecutive in the tensor: `rel` counts
// from `first`. The identity map gives one call.
template <typename F>
MDOPT_HD inline void ForEachTensorRun(const RowMap& map, int64_t n, int64_t first, int64_t count,
                                      F&& f) {
  if (map.identity()) {
    if (count > 0) f(first, int64_t{0}, count);
    return;
  }
  int64_t done = 0;
  while (done < count) {
    const int64_t x = first + done;
    const int64_t l = x / n, c = x - l * n;
    int64_t run = 0;
    const int64_t row = map.TensorRow(l, &run);
    int64_t len = run * n - c;
    if (len > count - done) len = count - done;
    f(row * n + c, done, len);
    done += len;
  }
}

}  // namespace mdopt::kernels

#endif  // MDOPT_KERNELS_COMMON_ROW_MAP_H_
