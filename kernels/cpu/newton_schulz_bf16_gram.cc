// The Gram form of Newton-Schulz (newton_schulz.cc has its derivation) on oneDNN bf16
// matmuls: A_0 = X_0 X_0^T once, the iteration on s x s matrices, O = Q_K X_0 once (tall:
// X_0^T X_0 and X_0 Q_K). Every product takes bf16 inputs (M~ below is M rounded) and
// returns float32; A_k, P_k and Q_k are kept in float32 between products, as the standard
// bf16 form keeps X, A and B.
//
// Rounding points. The standard form corrects itself: iteration k+1 takes the Gram matrix of
// whatever X_k came out of iteration k, rounding included. The Gram form cannot: A_k stands
// for the Gram matrix of Q_k X_0 and is never recomputed from it, so what costs accuracy is
// not a product's own rounding but A_k, P_k and Q_k ceasing to describe one and the same
// iterate. Hence every rounded matrix is used the same way everywhere it appears:
// - X_0 is rounded once; X~_0 is both factors of A_0 and the factor of O, so A_0 is exactly
//   (to float32 accumulation) the Gram matrix of the X~_0 that O multiplies.
// - P_k = a I + b A~_k + c A~_k^2 is a polynomial in exactly the A~_k it then multiplies
//   (not in the float32 A_k), and is rounded whole, once: the same P~_k goes into
//   A_{k+1} = (P~_k A~_k) P~_k and into Q_{k+1} = P~_k Q~_k.
// - Q_k is rounded only as a GEMM input; Q_K once, for O.
// Measured on the shapes of ns_bf16_gram_test (aspect 2 to 8, three coefficient sets,
// Gaussian and spread singular values, 5 steps): 0.57x the bf16 standard form's error at
// the median, at most 0.97x. The obvious alternative, the standard form's split (round only
// B = b A + c A^2 and add the a terms in float32, each product more accurate on its own),
// was 1.2x at the median and up to 2.4x: its float32 a A and a Q terms are not the rounded
// A~ and Q~ that the B terms multiply. The final product rounds X_0 instead of adding a X
// in float32, so the Gram form has a floor of about one bf16 rounding (2e-3 relative at one
// step, where the standard form gets 2e-4); from three steps on NS's own amplification is
// larger. A_{k+1} and Q_{k+1} are symmetric in exact arithmetic but not after bf16 products;
// they are symmetrised ((M + M^T) / 2, float32), which measured up to 1.4x less error at 9
// and 15 steps.
#ifdef MDOPT_HAVE_DNNL  // without oneDNN, Bf16NewtonSchulz cannot run (newton_schulz_bf16.cc)

#include <algorithm>
#include <utility>

#include "kernels/common/ns_coeffs.h"
#include "kernels/cpu/newton_schulz_bf16_impl.h"

namespace mdopt::kernels::fast {
namespace {

constexpr int64_t kParallelMin = 1 << 16;  // elements below which a pass stays serial

// M = (M + M^T) / 2 for a square s x s M.
void Symmetrise(float* mat, int64_t s) {
#pragma omp parallel for schedule(static) if (s * s >= kParallelMin)
  for (int64_t i = 0; i < s; ++i) {
    for (int64_t j = i + 1; j < s; ++j) {
      const float v = 0.5f * (mat[i * s + j] + mat[j * s + i]);
      mat[i * s + j] = v;
      mat[j * s + i] = v;
    }
  }
}

}  // namespace

float* Bf16NewtonSchulz::Impl::GramNs(NsCoeffSet set, int steps, int64_t m, int64_t n,
                                      float* x) {
  if (steps == 0) return x;
  const bool tall = m > n;
  const int64_t s = std::min(m, n), ss = s * s;
  float* A = a.data();   // A_k
  float* T = a2.data();  // A~_k^2, then P~_k A~_k, then P~_k Q~_k
  float* P = p.data();   // P_k
  float* Q = q.data();   // Q_k
  ToBf16(x, m * n, xb.data());  // X_0, rounded once for A_0 and O
  if (tall) {
    MatMul(Get(n, m, n, true, false), xb.data(), xb.data(), A);  // A_0 = X~_0^T X~_0
  } else {
    MatMul(Get(m, n, m, false, true), xb.data(), xb.data(), A);  // A_0 = X~_0 X~_0^T
  }
  Plan& sq = Get(s, s, s, false, false);
  for (int k = 0; k < steps; ++k) {
    const NsTuple c = NsCoefficients(set, k);
    const float ca = static_cast<float>(c.a), cb = static_cast<float>(c.b),
                cc = static_cast<float>(c.c);
    ToBf16(A, ss, ab.data());             // A~_k
    MatMul(sq, ab.data(), ab.data(), T);  // A~_k^2
    // P_k = a I + b A~_k + c A~_k^2: a polynomial in exactly the A~_k multiplied below.
    const uint16_t* at = ab.data();
#pragma omp parallel for simd schedule(static) if (ss >= kParallelMin)
    for (int64_t e = 0; e < ss; ++e) P[e] = cb * Bf16ToFloat(at[e]) + cc * T[e];
    for (int64_t i = 0; i < s; ++i) P[i * s + i] += ca;
    ToBf16(P, ss, bb.data());  // P~_k, the one P_k of both updates
    if (k + 1 < steps) {
      MatMul(sq, bb.data(), ab.data(), T);  // T = P~_k A~_k
      ToBf16(T, ss, ab.data());
      MatMul(sq, ab.data(), bb.data(), A);  // A_{k+1} = (P~_k A~_k) P~_k
      Symmetrise(A, s);
    }
    if (k == 0) {
      std::copy(P, P + ss, Q);  // Q_1 = P_0 (rounded as Q~_1 in the next product)
    } else {
      ToBf16(Q, ss, ab.data());
      MatMul(sq, bb.data(), ab.data(), T);  // T = P~_k Q~_k
      std::swap(Q, T);
      Symmetrise(Q, s);
    }
  }
  ToBf16(Q, ss, ab.data());  // Q_K, rounded once for O
  if (tall) {
    MatMul(Get(m, n, n, false, false), xb.data(), ab.data(), x);  // O = X~_0 Q~_K
  } else {
    MatMul(Get(m, m, n, false, false), ab.data(), xb.data(), x);  // O = Q~_K X~_0
  }
  return x;
}

}  // namespace mdopt::kernels::fast

#endif  // MDOPT_HAVE_DNNL
