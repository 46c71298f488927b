#include "kernels/cpu/newton_schulz.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/common/ns_coeffs.h"
#include "kernels/cpu/fixed_tiles.h"

namespace mdopt::kernels::fast {

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
  for (int k = 0; k < steps; ++k) {
    const NsTuple c = NsCoefficients(set, k);
    // A = X X^T (wide) or X^T X (tall), upper triangle, then mirrored.
    SyrkUpperTiled(tall, s, tall ? m : n, 1.0f, cur, n, a, s);
    MirrorUpper(a, s);
    // B = a I + b A + c A A^T (A is symmetric, so A A = A A^T): folding a X into B X saves
    // a pass over X per iteration.
    SyrkUpperTiled(false, s, s, static_cast<float>(c.c), a, s, b, s);
    const float cb = static_cast<float>(c.b), ca = static_cast<float>(c.a);
#pragma omp parallel for schedule(static) if (s >= 256)
    for (int64_t i = 0; i < s; ++i) {
      float* brow = b + i * s;
      const float* arow = a + i * s;
      for (int64_t j = i; j < s; ++j) brow[j] += cb * arow[j];
      brow[i] += ca;
    }
    MirrorUpper(b, s);
    // next = B X (wide) or X B (tall).
    if (tall) {
      GemmTiled(m, n, n, cur, b, next);
    } else {
      GemmTiled(m, n, m, b, cur, next);
    }
    std::swap(cur, next);
  }
  return cur;
}

}  // namespace mdopt::kernels::fast
