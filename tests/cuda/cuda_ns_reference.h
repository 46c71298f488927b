// The plain-loop twin of kernels/cuda/newton_schulz.cu: the same sequence of products in
// both forms, rounded to bf16 exactly where the kernel stores a bf16 matrix, and nothing
// else rounded. With float64 accumulation (NsAccum::kDouble) it is the oracle of
// cuda_newton_schulz_test: the GPU differs from it only by accumulating each product in
// float32 before the same rounding, which moves a rounded value by one bf16 ulp where the
// float32 and float64 sums fall on either side of a rounding boundary. The float32
// accumulation models (kFloat, kFloatBlocked) are that difference made visible on the CPU:
// the test measures how far they land from the oracle to show the bound has room.
//
// Sequence (row-major; R(.) = rounded to bf16 in the bf16 mode, the identity in float32;
// wide: m <= n; a, b, c the tuple of the iteration):
//   Z_0 = R(X * s), s = float(1 / (||X||_F + 1e-7)), the norm summed in float64
//   standard, per iteration:   A = R(Z Z^T)          (tall: R(Z^T Z))
//                              B = R(c A A + b A)
//                              Z = R(a Z + B Z)      (tall: R(a Z + Z B))
//                              O = Z_K
//   Gram:  A = U(R(Z_0 Z_0^T))                       (tall: Z_0^T Z_0)
//          per iteration k:    P = R(a I + b A + c A A)
//                              k < K-1:  A = U(R(R(P A) P))
//                              k = 0: Q = P;  k > 0: Q = U(R(P Q))
//          O = Q Z_0 (tall: Z_0 Q), float32, not rounded to bf16
// where U(M) copies M's upper triangle onto its lower one (exact symmetry). The Gram
// sequence is the CPU's (kernels/cpu/newton_schulz.cc), rounded where its bf16 path
// (newton_schulz_bf16_gram.cc) rounds.
#ifndef MDOPT_TESTS_CUDA_CUDA_NS_REFERENCE_H_
#define MDOPT_TESTS_CUDA_CUDA_NS_REFERENCE_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "kernels/common/bf16.h"
#include "kernels/common/ns_coeffs.h"
#include "kernels/common/update_rule.h"

namespace mdopt::testing {

// How each product is summed: float64 (the oracle), or float32 in k order, or float32 in
// blocks of 16 terms added into a float32 total (a tensor core's k-tiles).
enum class NsAccum { kDouble, kFloat, kFloatBlocked };

struct NsRefOptions {
  kernels::NsForm form = kernels::NsForm::kStandard;  // kStandard or kGram (resolved)
  bool bf16 = true;
  // Mutations the bounds must catch: iteration k uses tuple k + tuple_offset.
  int tuple_offset = 0;
  NsAccum accum = NsAccum::kDouble;
};

namespace ns_ref_detail {

struct Mat {
  int64_t rows = 0, cols = 0;
  std::vector<double> v;
  Mat() = default;
  Mat(int64_t r, int64_t c) : rows(r), cols(c), v(static_cast<size_t>(r * c), 0.0) {}
  double& at(int64_t i, int64_t j) { return v[static_cast<size_t>(i * cols + j)]; }
  double at(int64_t i, int64_t j) const { return v[static_cast<size_t>(i * cols + j)]; }
};

inline Mat Transposed(const Mat& x) {
  Mat t(x.cols, x.rows);
  for (int64_t i = 0; i < x.rows; ++i)
    for (int64_t j = 0; j < x.cols; ++j) t.at(j, i) = x.at(i, j);
  return t;
}

// Round to nearest even through float32, as a float32 accumulator is rounded by the GPU.
inline double RoundBf16(double v) {
  return kernels::Bf16ToFloat(kernels::FloatToBf16(static_cast<float>(v)));
}

inline void RoundAll(Mat* x) {
  for (double& e : x->v) e = RoundBf16(e);
}

inline void MirrorUpper(Mat* x) {
  for (int64_t i = 0; i < x->rows; ++i)
    for (int64_t j = i + 1; j < x->cols; ++j) x->at(j, i) = x->at(i, j);
}

// alpha L R + beta C, L and R given already in the orientation multiplied (the caller
// transposes), C optional. The sum over k is in `acc`'s type and order; the epilogue is
// float64 for kDouble, float32 otherwise (the GEMM's alpha acc + beta C).
inline Mat Gemm(const Mat& l, const Mat& r, double alpha, const Mat* c, double beta,
                NsAccum acc) {
  Mat out(l.rows, r.cols);
  const Mat rt = Transposed(r);  // rows of rt are columns of r: both operands contiguous
  const int64_t kk = l.cols;
  for (int64_t i = 0; i < l.rows; ++i) {
    const double* li = &l.v[static_cast<size_t>(i * kk)];
    for (int64_t j = 0; j < r.cols; ++j) {
      const double* rj = &rt.v[static_cast<size_t>(j * kk)];
      const double cij = c ? c->at(i, j) : 0.0;
      if (acc == NsAccum::kDouble) {
        double s4[4] = {0.0, 0.0, 0.0, 0.0};  // four chains: any float64 order will do
        int64_t k = 0;
        for (; k + 4 <= kk; k += 4)
          for (int u = 0; u < 4; ++u) s4[u] += li[k + u] * rj[k + u];
        for (; k < kk; ++k) s4[0] += li[k] * rj[k];
        out.at(i, j) = alpha * ((s4[0] + s4[1]) + (s4[2] + s4[3])) + beta * cij;
      } else {
        float s = 0.0f;
        if (acc == NsAccum::kFloat) {
          for (int64_t k = 0; k < kk; ++k) s += static_cast<float>(li[k]) * static_cast<float>(rj[k]);
        } else {
          for (int64_t k0 = 0; k0 < kk; k0 += 16) {
            float part = 0.0f;
            for (int64_t k = k0; k < std::min(kk, k0 + 16); ++k)
              part += static_cast<float>(li[k]) * static_cast<float>(rj[k]);
            s += part;
          }
        }
        out.at(i, j) = static_cast<double>(static_cast<float>(alpha) * s +
                                           static_cast<float>(beta) * static_cast<float>(cij));
      }
    }
  }
  return out;
}

// P = a I + b A + c A A for symmetric A: the GEMM gives c A A + b A; the diagonal is then
// recomputed whole as a + b A_ii + c sum_j A_ij^2 (the kernel's diagonal pass), so that a
// enters before the one rounding.
inline Mat Polynomial(const kernels::NsTuple& t, const Mat& a, NsAccum acc) {
  Mat p = Gemm(a, a, t.c, &a, t.b, acc);
  for (int64_t i = 0; i < a.rows; ++i) {
    if (acc == NsAccum::kDouble) {
      double s = 0.0;
      for (int64_t j = 0; j < a.cols; ++j) s += a.at(i, j) * a.at(i, j);
      p.at(i, i) = t.a + t.b * a.at(i, i) + t.c * s;
    } else {
      float s = 0.0f;
      for (int64_t j = 0; j < a.cols; ++j)
        s += static_cast<float>(a.at(i, j)) * static_cast<float>(a.at(i, j));
      p.at(i, i) = static_cast<float>(t.a) + static_cast<float>(t.b) * static_cast<float>(a.at(i, i)) +
                   static_cast<float>(t.c) * s;
    }
  }
  return p;
}

}  // namespace ns_ref_detail

// NS of one row-major m x n float32 matrix as the CUDA kernel computes it (see the top of
// this file). Returns O, m x n.
inline std::vector<double> NsMirror(kernels::NsCoeffSet set, int steps, int64_t m, int64_t n,
                                    const float* x, const NsRefOptions& o) {
  using ns_ref_detail::Gemm;
  using ns_ref_detail::Mat;
  const bool tall = m > n;
  const auto round = [&](Mat* z) {
    if (o.bf16) ns_ref_detail::RoundAll(z);
  };
  double sq = 0.0;
  for (int64_t e = 0; e < m * n; ++e) sq += static_cast<double>(x[e]) * x[e];
  const double inv = 1.0 / (std::sqrt(sq) + kernels::kNsNormEps);
  // The kernel scales in float32 (X is float32); only the exact variant (float32 mode,
  // float64 sums: the check against kernels/reference) keeps float64 throughout.
  const bool exact = !o.bf16 && o.accum == NsAccum::kDouble;
  Mat z(m, n);
  for (int64_t e = 0; e < m * n; ++e)
    z.v[static_cast<size_t>(e)] = exact ? x[e] * inv : x[e] * static_cast<float>(inv);
  round(&z);
  const auto coeffs = [&](int k) { return kernels::NsCoefficients(set, k + o.tuple_offset); };
  if (o.form == kernels::NsForm::kGram) {
    const Mat z0 = z, z0t = ns_ref_detail::Transposed(z0);
    Mat a = tall ? Gemm(z0t, z0, 1.0, nullptr, 0.0, o.accum) : Gemm(z0, z0t, 1.0, nullptr, 0.0, o.accum);
    round(&a);
    ns_ref_detail::MirrorUpper(&a);
    Mat q;
    for (int k = 0; k < steps; ++k) {
      Mat p = ns_ref_detail::Polynomial(coeffs(k), a, o.accum);
      round(&p);
      if (k + 1 < steps) {
        Mat t = Gemm(p, a, 1.0, nullptr, 0.0, o.accum);
        round(&t);
        a = Gemm(t, p, 1.0, nullptr, 0.0, o.accum);
        round(&a);
        ns_ref_detail::MirrorUpper(&a);
      }
      if (k == 0) {
        q = std::move(p);
      } else {
        q = Gemm(p, q, 1.0, nullptr, 0.0, o.accum);
        round(&q);
        ns_ref_detail::MirrorUpper(&q);
      }
    }
    return (tall ? Gemm(z0, q, 1.0, nullptr, 0.0, o.accum) : Gemm(q, z0, 1.0, nullptr, 0.0, o.accum)).v;
  }
  for (int k = 0; k < steps; ++k) {
    const kernels::NsTuple t = coeffs(k);
    const Mat zt = ns_ref_detail::Transposed(z);
    Mat a = tall ? Gemm(zt, z, 1.0, nullptr, 0.0, o.accum) : Gemm(z, zt, 1.0, nullptr, 0.0, o.accum);
    round(&a);
    Mat b = Gemm(a, a, t.c, &a, t.b, o.accum);
    round(&b);
    z = tall ? Gemm(z, b, 1.0, &z, t.a, o.accum) : Gemm(b, z, 1.0, &z, t.a, o.accum);
    round(&z);
  }
  return z.v;
}

// The singular values of a row-major m x n matrix, ascending: the square roots of the
// eigenvalues of its s x s Gram matrix, by cyclic Jacobi rotations in float64 (s <= a few
// hundred here). What the spectral comparison of cuda_newton_schulz_test reads.
inline std::vector<double> SingularValues(const std::vector<double>& o, int64_t m, int64_t n) {
  const bool tall = m > n;
  const int64_t s = tall ? n : m, l = tall ? m : n;
  const auto at = [&](int64_t i, int64_t k) {  // row i of the wide orientation
    return tall ? o[static_cast<size_t>(k * n + i)] : o[static_cast<size_t>(i * n + k)];
  };
  std::vector<double> g(static_cast<size_t>(s * s));
  for (int64_t i = 0; i < s; ++i)
    for (int64_t j = i; j < s; ++j) {
      double d = 0.0;
      for (int64_t k = 0; k < l; ++k) d += at(i, k) * at(j, k);
      g[static_cast<size_t>(i * s + j)] = g[static_cast<size_t>(j * s + i)] = d;
    }
  const auto G = [&](int64_t i, int64_t j) -> double& { return g[static_cast<size_t>(i * s + j)]; };
  double diag = 0.0;
  for (int64_t i = 0; i < s; ++i) diag += G(i, i) * G(i, i);
  for (int sweep = 0; sweep < 60; ++sweep) {
    double off = 0.0;
    for (int64_t i = 0; i < s; ++i)
      for (int64_t j = i + 1; j < s; ++j) off += G(i, j) * G(i, j);
    if (off <= 1e-30 * diag) break;
    for (int64_t p = 0; p < s; ++p)
      for (int64_t q = p + 1; q < s; ++q) {
        const double apq = G(p, q);
        if (apq == 0.0) continue;
        const double theta = (G(q, q) - G(p, p)) / (2.0 * apq);
        const double t = (theta >= 0 ? 1.0 : -1.0) / (std::abs(theta) + std::sqrt(theta * theta + 1.0));
        const double c = 1.0 / std::sqrt(t * t + 1.0), sn = t * c;
        for (int64_t k = 0; k < s; ++k) {
          const double kp = G(k, p), kq = G(k, q);
          G(k, p) = c * kp - sn * kq;
          G(k, q) = sn * kp + c * kq;
        }
        for (int64_t k = 0; k < s; ++k) {
          const double pk = G(p, k), qk = G(q, k);
          G(p, k) = c * pk - sn * qk;
          G(q, k) = sn * pk + c * qk;
        }
      }
  }
  std::vector<double> sv(static_cast<size_t>(s));
  for (int64_t i = 0; i < s; ++i) sv[static_cast<size_t>(i)] = std::sqrt(std::max(0.0, G(i, i)));
  std::sort(sv.begin(), sv.end());
  return sv;
}

}  // namespace mdopt::testing

#endif  // MDOPT_TESTS_CUDA_CUDA_NS_REFERENCE_H_
