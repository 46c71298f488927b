#include "kernels/cpu/newton_schulz.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/cpu/ns_coeffs.h"

namespace mdopt::kernels::fast {
namespace {

// ssyrk fills the upper triangle only; the A^2 product reads whole rows, so mirror it.
// Tiled so that both the rows read and the columns written stay in cache.
void MirrorUpper(float* a, int64_t s) {
  constexpr int64_t kTile = 64;
  const int64_t tiles = (s + kTile - 1) / kTile;
#pragma omp parallel for schedule(dynamic) if (s >= 256)
  for (int64_t bi = 0; bi < tiles; ++bi) {
    for (int64_t bj = bi; bj < tiles; ++bj) {
      const int64_t i_end = std::min(s, (bi + 1) * kTile), j_end = std::min(s, (bj + 1) * kTile);
      for (int64_t i = bi * kTile; i < i_end; ++i)
        for (int64_t j = std::max(i + 1, bj * kTile); j < j_end; ++j) a[j * s + i] = a[i * s + j];
    }
  }
}

}  // namespace

int64_t NsWorkspace::bytes() const {
  return static_cast<int64_t>(sizeof(float) * (y_.capacity() + a_.capacity() + b_.capacity()));
}

void NsWorkspace::Reserve(int64_t m, int64_t n) {
  const size_t s = static_cast<size_t>(std::min(m, n));
  const size_t numel = static_cast<size_t>(m * n);
  if (y_.size() < numel) y_.resize(numel);
  if (a_.size() < s * s) a_.resize(s * s);
  if (b_.size() < s * s) b_.resize(s * s);
}

void NormalizeForNs(float* x, int64_t numel) {
  double sq = 0.0;
#pragma omp simd reduction(+ : sq)
  for (int64_t e = 0; e < numel; ++e) sq += static_cast<double>(x[e]) * x[e];
  const float inv = static_cast<float>(1.0 / (std::sqrt(sq) + kNsNormEps));
#pragma omp simd
  for (int64_t e = 0; e < numel; ++e) x[e] *= inv;
}

float* NewtonSchulz(NsCoeffSet set, int steps, int64_t m, int64_t n, float* x, NsWorkspace* ws) {
  ws->Reserve(m, n);
  const bool tall = m > n;
  const int64_t s = tall ? n : m;  // side of the Gram matrix
  const int64_t numel = m * n;

  NormalizeForNs(x, numel);

  float* cur = x;
  float* next = ws->y_.data();
  float* a = ws->a_.data();
  float* b = ws->b_.data();
  const int mi = static_cast<int>(m), ni = static_cast<int>(n), si = static_cast<int>(s);
  for (int k = 0; k < steps; ++k) {
    const NsTuple c = NsCoefficients(set, k);
    // A = X X^T (wide) or X^T X (tall), upper triangle, then mirrored.
    cblas_ssyrk(CblasRowMajor, CblasUpper, tall ? CblasTrans : CblasNoTrans, si, tall ? mi : ni,
                1.0f, cur, ni, 0.0f, a, si);
    MirrorUpper(a, s);
    // B = a I + b A + c A A^T (A is symmetric, so A A = A A^T), upper triangle: folding
    // a X into B X saves a copy of X per iteration.
    cblas_ssyrk(CblasRowMajor, CblasUpper, CblasNoTrans, si, si, static_cast<float>(c.c), a, si,
                0.0f, b, si);
    const float cb = static_cast<float>(c.b), ca = static_cast<float>(c.a);
#pragma omp parallel for schedule(static) if (s >= 256)
    for (int64_t i = 0; i < s; ++i) {
      float* brow = b + i * s;
      const float* arow = a + i * s;
      for (int64_t j = i; j < s; ++j) brow[j] += cb * arow[j];
      brow[i] += ca;
    }
    // next = B X (wide) or X B (tall); ssymm reads B's upper triangle only.
    if (tall) {
      cblas_ssymm(CblasRowMajor, CblasRight, CblasUpper, mi, ni, 1.0f, b, si, cur, ni, 0.0f,
                  next, ni);
    } else {
      cblas_ssymm(CblasRowMajor, CblasLeft, CblasUpper, mi, ni, 1.0f, b, si, cur, ni, 0.0f,
                  next, ni);
    }
    std::swap(cur, next);
  }
  return cur;
}

}  // namespace mdopt::kernels::fast
