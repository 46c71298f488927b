// Newton-Schulz orthogonalisation in float32 on a BLAS (OpenBLAS), in two forms.
//
// Standard: per iteration the symmetric products X X^T and A A go through ssyrk (half the
// flops of a GEMM) and X <- (a I + b A + c A^2) X through sgemm with the a X term on B's
// diagonal. Tall matrices are handled as X <- X (a I + b A + c A^2) with A = X^T X, so
// nothing is transposed. Cost per iteration, s = min(m, n), l = max(m, n): 3 s^2 l + s^3.
//
// Gram: the Gram matrix A0 = X X^T (s x s) is formed once and the iteration runs on s x s
// matrices only; X itself is multiplied once at the end (the sequence is in
// newton_schulz.cc). Cost for K iterations: 3 s^2 l + (4K - 3) s^3, so it wins when l is a
// few times s (2.2x fewer flops at l = 4s, K = 5) and breaks even at l = s.
//
// Every product of both forms runs on the fixed tiles of fixed_tiles.h, so the result does
// not depend on the thread count.
#ifndef MDOPT_KERNELS_CPU_NEWTON_SCHULZ_H_
#define MDOPT_KERNELS_CPU_NEWTON_SCHULZ_H_

#include <cstdint>
#include <vector>

#include "kernels/common/ns_coeffs.h"
#include "kernels/common/update_rule.h"

namespace mdopt::kernels::fast {

// kStandard or kGram for an m x n matrix: kAuto picks the Gram form when
// max(m, n) >= 2 min(m, n) (below that its s^3 terms cost more than it saves).
NsForm ResolveNsForm(NsForm form, int64_t m, int64_t n);

// Reusable buffers, grown to the largest matrix seen; one per concurrent caller.
class NsWorkspace {
 public:
  // Bytes currently held.
  int64_t bytes() const;
  // Makes room for `batch` m x n matrices in the given form (kAuto: the one it resolves to).
  void Reserve(int64_t m, int64_t n, NsForm form = NsForm::kStandard, int64_t batch = 1);

 private:
  friend float* NewtonSchulzBatch(NsCoeffSet, int, int64_t, int64_t, int64_t, float*,
                                  NsWorkspace*, NsForm);
  std::vector<float> y_, a_, b_;  // both forms: an m x n result, two s x s matrices
  std::vector<float> q_, t_;      // Gram form only: two more s x s matrices
};

// X /= ||X||_F + 1e-7, the first step of every Newton-Schulz variant.
void NormalizeForNs(float* x, int64_t numel);

// Runs NS on x (m x n, overwritten) in the given form (kAuto: ResolveNsForm). Returns where
// O is: x itself or a workspace buffer. Allocates only when ws has no room for this shape and
// form yet.
float* NewtonSchulz(NsCoeffSet set, int steps, int64_t m, int64_t n, float* x, NsWorkspace* ws,
                    NsForm form = NsForm::kStandard);

// The same on `batch` m x n matrices stored one after the other in x, each product's tiles
// of all of them shared out as one list (fixed_tiles.h): a batch of small matrices keeps
// every thread busy where one of them alone has a single Gram tile. Each matrix's O is
// bitwise NewtonSchulz's on it alone. Returns where the O are (x or a workspace buffer,
// matrix b at b m n).
float* NewtonSchulzBatch(NsCoeffSet set, int steps, int64_t batch, int64_t m, int64_t n,
                         float* x, NsWorkspace* ws, NsForm form = NsForm::kStandard);

}  // namespace mdopt::kernels::fast

#endif  // MDOPT_KERNELS_CPU_NEWTON_SCHULZ_H_
