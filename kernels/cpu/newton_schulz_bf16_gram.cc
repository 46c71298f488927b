// The Gram form of Newton-Schulz (newton_schulz.cc has its derivation) on oneDNN bf16
// matmuls: A_0 = X_0 X_0^T once, the iteration on s x s matrices, O = Q_K X_0 once (tall:
// X_0^T X_0 and X_0 Q_K). As in the standard bf16 form, every product takes bf16 inputs
// (M~ below is M rounded to nearest even) and accumulates and returns float32, and a
// matrix is rounded only where it becomes a GEMM input. Here every iterate is nothing but
// a GEMM input (no a X term is added in float32), so each float32 product is rounded once,
// fused with its symmetrisation, and only the bf16 copies are kept: one float32 s x s
// buffer in all.
//
// Rounding points. The standard form corrects itself: iteration k+1 takes the Gram matrix of
// whatever X_k came out of iteration k, rounding included. The Gram form cannot: A_k stands
// for the Gram matrix of Q_k X_0 and is never recomputed from it, so what costs accuracy is
// less a product's own rounding than A_k, P_k and Q_k ceasing to describe one and the same
// iterate. Hence every rounded matrix is used the same way everywhere it appears:
// - X_0 is rounded once; X~_0 is both factors of A_0 and the factor of O, so A_0 is exactly
//   (to float32 accumulation) the Gram matrix of the X~_0 that O multiplies.
// - P_k = a I + b A~_k + c A~_k^2 is a polynomial in exactly the A~_k it then multiplies,
//   formed in float32 and rounded whole, once: the same P~_k goes into
//   A_{k+1} = (P~_k A~_k) P~_k and Q_{k+1} = P~_k Q~_k.
// - Q_K is rounded once, for O.
// Measured on the shapes of ns_bf16_gram_test (aspect 2 to 8, three coefficient sets,
// Gaussian and spread singular values, 5 steps): 0.57x the bf16 standard form's error at
// the median, at most 0.97x. The standard form's split instead (round only
// B = b A + c A^2, add the a terms in float32: each product more accurate on its own) was
// 1.2x at the median and up to 2.4x, as its float32 a A and a Q terms are not the A~ and Q~
// that the B terms multiply; P from the float32 A_k, rounded whole, was 0.95x and up to
// 1.4x. The final product rounds X_0 instead of adding a X in float32, so the Gram form has
// a floor of about one bf16 rounding (2e-3 relative at one step, where the standard form
// gets 2e-4); from three steps on NS's own amplification is larger. A_{k+1} and Q_{k+1} are
// symmetric in exact arithmetic but not after bf16 products; they are symmetrised
// ((M + M^T) / 2 in float32 before the rounding), which measured up to 1.4x less error at 9
// and 15 steps.
#ifdef MDOPT_HAVE_DNNL  // without oneDNN, Bf16NewtonSchulz cannot run (newton_schulz_bf16.cc)

#include <algorithm>
#include <utility>

#include "kernels/common/ns_coeffs.h"
#include "kernels/cpu/newton_schulz_bf16_impl.h"

namespace mdopt::kernels::fast {
namespace {

constexpr int64_t kParallelMin = 1 << 16;  // elements below which a pass stays serial
constexpr int64_t kBlock = 64;             // Symmetrised's blocks: M[j, i] read in cache

// out = bf16((M + M^T) / 2) for a square s x s float32 M, in blocks of kBlock x kBlock (a
// block and its mirror together), so that the column reads stay in cache.
void RoundSymmetrised(const float* mat, int64_t s, uint16_t* out) {
  const int64_t nb = (s + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static, 1) if (s * s >= kParallelMin)
  for (int64_t bi = 0; bi < nb; ++bi) {
    const int64_t i0 = bi * kBlock, i1 = std::min(s, i0 + kBlock);
    for (int64_t bj = bi; bj < nb; ++bj) {
      const int64_t j0 = bj * kBlock, j1 = std::min(s, j0 + kBlock);
      for (int64_t i = i0; i < i1; ++i) {
        for (int64_t j = std::max(j0, i); j < j1; ++j) {
          const uint16_t v = FloatToBf16(0.5f * (mat[i * s + j] + mat[j * s + i]));
          out[i * s + j] = v;
          out[j * s + i] = v;
        }
      }
    }
  }
}

}  // namespace

float* Bf16NewtonSchulz::Impl::GramNs(NsCoeffSet set, int steps, int64_t m, int64_t n,
                                      float* x) {
  if (steps == 0) return x;
  const bool tall = m > n;
  const int64_t s = std::min(m, n), ss = s * s;
  // Only bf16 copies are kept from one product to the next: A~_k (ab), P~_k (bb), P~_k A~_k
  // rounded (tb), Q~_k (qb); every product lands in the one float32 s x s buffer f.
  float* f = a.data();
  ToBf16(x, m * n, xb.data());  // X~_0, rounded once for A_0 and O
  if (tall) {
    MatMul(Get(n, m, n, true, false), xb.data(), xb.data(), f);  // A_0 = X~_0^T X~_0
  } else {
    MatMul(Get(m, n, m, false, true), xb.data(), xb.data(), f);  // A_0 = X~_0 X~_0^T
  }
  ToBf16(f, ss, ab.data());
  Plan& sq = Get(s, s, s, false, false);
  for (int k = 0; k < steps; ++k) {
    const NsTuple c = NsCoefficients(set, k);
    const float ca = static_cast<float>(c.a), cb = static_cast<float>(c.b),
                cc = static_cast<float>(c.c);
    MatMul(sq, ab.data(), ab.data(), f);  // A~_k^2
    // P~_k = bf16(a I + b A~_k + c A~_k^2): a polynomial in exactly the A~_k multiplied below.
    const uint16_t* at = ab.data();
    uint16_t* pt = bb.data();
#pragma omp parallel for schedule(static) if (ss >= kParallelMin)
    for (int64_t i = 0; i < s; ++i) {
      for (int64_t j = 0; j < s; ++j) {
        const int64_t e = i * s + j;
        pt[e] = FloatToBf16(cb * Bf16ToFloat(at[e]) + cc * f[e] + (i == j ? ca : 0.0f));
      }
    }
    if (k + 1 < steps) {
      MatMul(sq, bb.data(), ab.data(), f);  // P~_k A~_k
      ToBf16(f, ss, tb.data());
      MatMul(sq, tb.data(), bb.data(), f);  // A_{k+1} = (P~_k A~_k) P~_k
      RoundSymmetrised(f, s, ab.data());
    }
    if (k == 0) {
      std::copy(bb.begin(), bb.begin() + ss, qb.begin());  // Q~_1 = P~_0
    } else {
      MatMul(sq, bb.data(), qb.data(), f);  // Q_{k+1} = P~_k Q~_k
      RoundSymmetrised(f, s, qb.data());
    }
  }
  if (tall) {
    MatMul(Get(m, n, n, false, false), xb.data(), qb.data(), x);  // O = X~_0 Q~_K
  } else {
    MatMul(Get(m, m, n, false, false), qb.data(), xb.data(), x);  // O = Q~_K X~_0
  }
  return x;
}

}  // namespace mdopt::kernels::fast

#endif  // MDOPT_HAVE_DNNL
