#include "kernels/cpu/newton_schulz.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/cpu/fixed_tiles.h"

namespace mdopt::kernels::fast {
namespace {

// P = a I + b A + c A A^T (all of it; A symmetric s x s, so A A = A A^T and one ssyrk gives
// A^2). Used by both forms: the standard one's B, the Gram form's P_k.
// On each of `batch` matrices (as every function below). `block`: the tiles of A^2.
void NsPolynomial(const NsTuple& c, const float* a, int64_t s, float* p, int64_t batch,
                  int64_t block) {
  SyrkUpperTiled(false, s, s, static_cast<float>(c.c), a, s, p, s, batch, block);
  const float cb = static_cast<float>(c.b), ca = static_cast<float>(c.a);
#pragma omp parallel for schedule(static) if (batch * s >= 256)
  for (int64_t r = 0; r < batch * s; ++r) {
    const int64_t i = r % s;  // row r of the stack is row i of its matrix
    float* prow = p + r * s;
    const float* arow = a + r * s;
    for (int64_t j = i; j < s; ++j) prow[j] += cb * arow[j];
    prow[i] += ca;
  }
  MirrorUpper(p, s, batch);
}

// The standard form: X_{k+1} = P_k X_k (wide) or X_k P_k (tall), P_k from A_k = X_k X_k^T.
float* StandardNs(NsCoeffSet set, int steps, int64_t batch, int64_t m, int64_t n, float* x,
                  float* y, float* a, float* b) {
  const bool tall = m > n;
  const int64_t s = tall ? n : m;  // side of the Gram matrix
  float* cur = x;
  float* next = y;
  for (int k = 0; k < steps; ++k) {
    // A = X X^T (wide) or X^T X (tall), upper triangle, then mirrored.
    SyrkUpperTiled(tall, s, tall ? m : n, 1.0f, cur, n, a, s, batch);
    MirrorUpper(a, s, batch);
    // B = a I + b A + c A^2: folding a X into B X saves a pass over X per iteration.
    NsPolynomial(NsCoefficients(set, k), a, s, b, batch, kTileRows);
    // next = B X (wide) or X B (tall).
    if (tall) {
      GemmTiled(m, n, n, cur, b, next, batch);
    } else {
      GemmTiled(m, n, m, b, cur, next, batch);
    }
    std::swap(cur, next);
  }
  return cur;
}

// The Gram form. With X_{k+1} = P_k X_k and A_k = X_k X_k^T, every P_k is a polynomial in
// A_0, so all of them (and every product of them) are symmetric and commute. Hence
//   X_K = Q_K X_0,  Q_K = P_{K-1} ... P_1 P_0,
//   A_{k+1} = P_k X_k X_k^T P_k = P_k A_k P_k,
// and X is touched twice: A_0 = X_0 X_0^T (ssyrk, s^2 l) and O = Q_K X_0 (sgemm, 2 s^2 l).
// Iteration k, on s x s matrices only:
//   P_k     = a_k I + b_k A_k + c_k A_k^2   ssyrk of A_k                      s^3
//   A_{k+1} = (P_k A_k) P_k                 two symmetric products, k < K-1   2 s^3
//   Q_{k+1} = P_k Q_k                       one symmetric product, k >= 1     s^3
// where Q_1 = P_0 is no product and the last iteration needs no A_K. A "symmetric product"
// (GemmUpperTiled) is a GEMM known to give a symmetric matrix (two commuting symmetric
// factors: P_k A_k, (P_k A_k) P_k = P_k A_k P_k, P_k Q_k), of which only the upper blocks
// are computed and then mirrored: half a GEMM's flops, and exactly symmetric iterates.
// The s x s products use kSymTile blocks (the A_0 and O products the usual tiles).
// Total 3 s^2 l + (4K - 3) s^3 against K (3 s^2 l + s^3) for the standard form.
// Tall X (m > n) is the same with A_0 = X_0^T X_0 and O = X_0 Q_K: X_0 P_0 ... P_{K-1} is
// X_0 times the same product, as the factors commute.
// Buffers: a = A_k, p = P_k, q = Q_k, t = a scratch for P_k A_k and then P_k Q_k.
float* GramNs(NsCoeffSet set, int steps, int64_t batch, int64_t m, int64_t n, float* x, float* y,
              float* a, float* p, float* q, float* t) {
  if (steps == 0) return x;
  const bool tall = m > n;
  const int64_t s = tall ? n : m, l = tall ? m : n;
  SyrkUpperTiled(tall, s, l, 1.0f, x, n, a, s, batch);
  MirrorUpper(a, s, batch);
  for (int k = 0; k < steps; ++k) {
    NsPolynomial(NsCoefficients(set, k), a, s, p, batch, kSymTile);
    if (k + 1 < steps) {
      GemmUpperTiled(s, s, p, a, t, batch);  // t = P_k A_k
      MirrorUpper(t, s, batch);
      GemmUpperTiled(s, s, t, p, a, batch);  // A_{k+1} = (P_k A_k) P_k
      MirrorUpper(a, s, batch);
    }
    if (k == 0) {
      std::swap(q, p);  // Q_1 = P_0; p's old buffer is free for P_1
    } else {
      GemmUpperTiled(s, s, p, q, t, batch);  // Q_{k+1} = P_k Q_k
      MirrorUpper(t, s, batch);
      std::swap(q, t);
    }
  }
  if (tall) {
    GemmTiled(m, n, n, x, q, y, batch);  // O = X_0 Q_K
  } else {
    GemmTiled(m, n, m, q, x, y, batch);  // O = Q_K X_0
  }
  return y;
}

}  // namespace

NsForm ResolveNsForm(NsForm form, int64_t m, int64_t n) {
  if (form != NsForm::kAuto) return form;
  return std::max(m, n) >= 2 * std::min(m, n) ? NsForm::kGram : NsForm::kStandard;
}

int64_t NsWorkspace::bytes() const {
  return static_cast<int64_t>(sizeof(float) * (y_.capacity() + a_.capacity() + b_.capacity() +
                                               q_.capacity() + t_.capacity()));
}

void NsWorkspace::Reserve(int64_t m, int64_t n, NsForm form, int64_t batch) {
  const size_t s = static_cast<size_t>(std::min(m, n)), nb = static_cast<size_t>(batch);
  const size_t numel = static_cast<size_t>(m * n) * nb;
  if (y_.size() < numel) y_.resize(numel);
  if (a_.size() < s * s * nb) a_.resize(s * s * nb);
  if (b_.size() < s * s * nb) b_.resize(s * s * nb);
  if (ResolveNsForm(form, m, n) == NsForm::kGram) {
    if (q_.size() < s * s * nb) q_.resize(s * s * nb);
    if (t_.size() < s * s * nb) t_.resize(s * s * nb);
  }
}

void NormalizeForNs(float* x, int64_t numel) {
  double sq = 0.0;
#pragma omp simd reduction(+ : sq)
  for (int64_t e = 0; e < numel; ++e) sq += static_cast<double>(x[e]) * x[e];
  const float inv = static_cast<float>(1.0 / (std::sqrt(sq) + kNsNormEps));
#pragma omp simd
  for (int64_t e = 0; e < numel; ++e) x[e] *= inv;
}

float* NewtonSchulz(NsCoeffSet set, int steps, int64_t m, int64_t n, float* x, NsWorkspace* ws,
                    NsForm form) {
  return NewtonSchulzBatch(set, steps, 1, m, n, x, ws, form);
}

float* NewtonSchulzBatch(NsCoeffSet set, int steps, int64_t batch, int64_t m, int64_t n,
                         float* x, NsWorkspace* ws, NsForm form) {
  form = ResolveNsForm(form, m, n);
  ws->Reserve(m, n, form, batch);
  const int64_t numel = m * n;
  if (batch == 1) {
    NormalizeForNs(x, numel);
  } else {
    // Each matrix's norm is summed by the same serial loop as alone.
#pragma omp parallel for schedule(static)
    for (int64_t e = 0; e < batch; ++e) NormalizeForNs(x + e * numel, numel);
  }
  if (form == NsForm::kGram) {
    return GramNs(set, steps, batch, m, n, x, ws->y_.data(), ws->a_.data(), ws->b_.data(),
                  ws->q_.data(), ws->t_.data());
  }
  return StandardNs(set, steps, batch, m, n, x, ws->y_.data(), ws->a_.data(), ws->b_.data());
}

}  // namespace mdopt::kernels::fast
