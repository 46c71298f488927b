// Newton-Schulz orthogonalisation in float32 on a BLAS (OpenBLAS): the symmetric products
// X X^T and A A go through ssyrk (half the flops of a GEMM) and X <- (a I + b A + c A^2) X
// through sgemm with the a X term on B's diagonal. Tall matrices are handled as
// X <- X (a I + b A + c A^2) with A = X^T X, so nothing is transposed. Every product runs on
// the fixed tiles of fixed_tiles.h, so the result does not depend on the thread count.
#ifndef MDOPT_KERNELS_CPU_NEWTON_SCHULZ_H_
#define MDOPT_KERNELS_CPU_NEWTON_SCHULZ_H_

#include <cstdint>
#include <vector>

#include "kernels/common/update_rule.h"

namespace mdopt::kernels::fast {

// Reusable buffers, grown to the largest matrix seen; one per concurrent caller.
class NsWorkspace {
 public:
  // Bytes currently held.
  int64_t bytes() const;
  // Makes room for an m x n matrix.
  void Reserve(int64_t m, int64_t n);

 private:
  friend float* NewtonSchulz(NsCoeffSet, int, int64_t, int64_t, float*, NsWorkspace*);
  std::vector<float> y_, a_, b_;
};

// X /= ||X||_F + 1e-7, the first step of every Newton-Schulz variant.
void NormalizeForNs(float* x, int64_t numel);

// Runs NS on x (m x n, overwritten). Returns where O is: x itself or a workspace buffer.
float* NewtonSchulz(NsCoeffSet set, int steps, int64_t m, int64_t n, float* x, NsWorkspace* ws);

}  // namespace mdopt::kernels::fast

#endif  // MDOPT_KERNELS_CPU_NEWTON_SCHULZ_H_
