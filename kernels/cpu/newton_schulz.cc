#include "kernels/cpu/newton_schulz.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/cpu/ns_coeffs.h"

namespace mdopt::kernels::fast {
namespace {

// ssyrk fills the upper triangle only; mirror it so sgemm can read the whole matrix.
void MirrorUpper(float* a, int64_t s) {
  for (int64_t i = 0; i < s; ++i)
    for (int64_t j = i + 1; j < s; ++j) a[j * s + i] = a[i * s + j];
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
    // A = X X^T (wide) or X^T X (tall).
    cblas_ssyrk(CblasRowMajor, CblasUpper, tall ? CblasTrans : CblasNoTrans, si, tall ? mi : ni,
                1.0f, cur, ni, 0.0f, a, si);
    MirrorUpper(a, s);
    // B = b A + c A A^T (A is symmetric, so A A = A A^T).
    cblas_ssyrk(CblasRowMajor, CblasUpper, CblasNoTrans, si, si, static_cast<float>(c.c), a, si,
                0.0f, b, si);
    for (int64_t i = 0; i < s; ++i)
      for (int64_t j = i; j < s; ++j) b[i * s + j] += static_cast<float>(c.b) * a[i * s + j];
    MirrorUpper(b, s);
    // next = a X + B X (wide) or a X + X B (tall).
    std::memcpy(next, cur, sizeof(float) * numel);
    if (tall) {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, mi, ni, ni, 1.0f, cur, ni, b, ni,
                  static_cast<float>(c.a), next, ni);
    } else {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, mi, ni, mi, 1.0f, b, mi, cur, ni,
                  static_cast<float>(c.a), next, ni);
    }
    std::swap(cur, next);
  }
  return cur;
}

}  // namespace mdopt::kernels::fast
