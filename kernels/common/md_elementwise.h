// The per-element and per-row bodies of the float32 step (DESIGN.md section 1), written once
// for every device: the CPU fast passes (kernels/cpu/fast_passes.cc) and the CUDA passes
// (kernels/cuda/fused_passes.cu) call these same functions, so the CPU tests exercise the
// arithmetic the kernels run. Each function fixes its order of operations: the CPU results
// are bitwise those of the loops these replaced (the project builds with -std=c++17, so GCC
// does not contract a * b + c into an FMA; nvcc does by default on the device, which the
// CUDA tests' tolerances allow for).
//
// Float32 state and data; the few scalars that need it (gain values, projection factors,
// the raw gains' Adam) in float64, as the CPU path always had them.
#ifndef MDOPT_KERNELS_COMMON_MD_ELEMENTWISE_H_
#define MDOPT_KERNELS_COMMON_MD_ELEMENTWISE_H_

#include <cmath>
#include <cstdint>

#include "kernels/common/gain_param.h"
#include "kernels/common/host_device.h"
#include "kernels/common/update_rule.h"

namespace mdopt::kernels::md {

// --- Gains ---------------------------------------------------------------------------

// The float32 effective gain of a raw value (computed in float64, rounded once).
MDOPT_HD inline float EffectiveGain(GainParam p, float raw) {
  return static_cast<float>(GainValue<double>(p, static_cast<double>(raw)));
}

// 1 / (scalar gain * row gain): the factor that takes a row of W back to D.
MDOPT_HD inline float InverseRowScale(double row_scale) {
  return static_cast<float>(1.0 / row_scale);
}

// --- Step 1-3: direction, gain-gradient terms, direction gradient ----------------------

// D_ij = W_ij / (row_scale_i * col_j), as W_ij * inv_row * inv_col_j.
MDOPT_HD inline float Direction(float w, float inv_row, float inv_col) {
  return w * inv_row * inv_col;
}

// dg_ij = D_ij * G_ij: the term every gain gradient sums (row: dg * col_j; column:
// dg * row_scale_i; scalar: dg).
MDOPT_HD inline float GainGradTerm(float w, float inv_row, float inv_col, float g) {
  return w * inv_row * inv_col * g;
}

// G_D = G * row_scale * col_j.
MDOPT_HD inline float DirectionGrad(float g, float row_scale, float col) {
  return g * row_scale * col;
}

// tangent=1: G_D minus its radial part coef_row * coef_col_j * D_ij.
MDOPT_HD inline float TangentDirectionGrad(float g, float row_scale, float col, float coef_row,
                                           float coef_col, float d) {
  return g * row_scale * col - coef_row * coef_col * d;
}

// <G_D, D> / <D, D> of a slice, 0 for an empty one (the tangent coefficient).
MDOPT_HD inline double RadialRatio(double dot, double dd) { return dd > 0.0 ? dot / dd : 0.0; }

// --- Step 4-5: base optimizers ---------------------------------------------------------

// Muon: buf <- mu * buf + G_D.
MDOPT_HD inline float MuonMomentum(float mu, float buf, float gd) { return mu * buf + gd; }

// The Newton-Schulz input: G_D + mu * buf (nesterov) or buf.
MDOPT_HD inline float MuonInput(bool nesterov, float mu, float buf, float gd) {
  return nesterov ? gd + mu * buf : buf;
}

// D' = D (1 - lr wd) - lr * scale * O, with step = lr * scale.
MDOPT_HD inline float MuonApply(float d, float wd_factor, float step, float o) {
  return d * wd_factor - step * o;
}

// Step-wide Adam numbers in float32: betas, 1 - betas, inverse bias corrections, eps, lr
// and the weight-decay factor 1 - lr wd.
struct AdamScalars {
  float b1, b2, omb1, omb2, ibc1, ibc2, eps, lr, wdf;
};

// Host only (std::pow of the step count): the scalars of step t with learning rate lr.
inline AdamScalars MakeAdamScalars(const UpdateRule& r, double lr, int64_t t) {
  AdamScalars a;
  a.b1 = static_cast<float>(r.beta1);
  a.b2 = static_cast<float>(r.beta2);
  a.omb1 = static_cast<float>(1.0 - r.beta1);
  a.omb2 = static_cast<float>(1.0 - r.beta2);
  a.ibc1 = static_cast<float>(1.0 / (1.0 - std::pow(r.beta1, static_cast<double>(t))));
  a.ibc2 = static_cast<float>(1.0 / (1.0 - std::pow(r.beta2, static_cast<double>(t))));
  a.eps = static_cast<float>(r.eps);
  a.lr = static_cast<float>(lr);
  a.wdf = static_cast<float>(1.0 - lr * r.weight_decay);
  return a;
}

MDOPT_HD inline float AdamFirstMoment(const AdamScalars& a, float m1, float gd) {
  return a.b1 * m1 + a.omb1 * gd;
}

MDOPT_HD inline float AdamSecondMoment(const AdamScalars& a, float m2, float gd) {
  return a.b2 * m2 + a.omb2 * gd * gd;
}

// D' = D (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps) from the updated moments m, q.
MDOPT_HD inline float AdamApply(const AdamScalars& a, float d, float m, float q) {
  return d * a.wdf - a.lr * (m * a.ibc1) / (std::sqrt(q * a.ibc2) + a.eps);
}

// --- Step 6-8: projection, gains' Adam, rescale ----------------------------------------

// The factor that takes a slice of squared norm sq to radius R; 0 for an empty slice.
MDOPT_HD inline double ProjectionFactor(double radius, double sq) {
  return sq > 0.0 ? radius / std::sqrt(sq) : 0.0;
}

// W_ij = D'_ij * row_mult_i * col_mult_j (gains and projection together).
MDOPT_HD inline float Rescale(float d, float row_mult, float col_mult) {
  return d * row_mult * col_mult;
}

// Adam on the raw gains, in float64 with float32 state.
struct GainAdamScalars {
  double beta1, beta2, bc1, bc2, eps, lr;
};

// Host only: the scalars of step t with gain learning rate gain_lr.
inline GainAdamScalars MakeGainAdamScalars(const UpdateRule& r, double gain_lr, int64_t t) {
  return {r.beta1,
          r.beta2,
          1.0 - std::pow(r.beta1, static_cast<double>(t)),
          1.0 - std::pow(r.beta2, static_cast<double>(t)),
          r.eps,
          gain_lr};
}

// One raw gain: grad_gamma is d loss / d gamma (summed over every rank's rows).
MDOPT_HD inline void GainAdamElement(GainParam p, const GainAdamScalars& s, double grad_gamma,
                                     float* raw, float* exp_avg, float* exp_avg_sq) {
  const double r = *raw;
  const double grad = grad_gamma * GainDerivative<double>(p, r);
  const double a = s.beta1 * *exp_avg + (1.0 - s.beta1) * grad;
  const double q = s.beta2 * *exp_avg_sq + (1.0 - s.beta2) * grad * grad;
  *exp_avg = static_cast<float>(a);
  *exp_avg_sq = static_cast<float>(q);
  *raw = static_cast<float>(r - s.lr * (a / s.bc1) / (std::sqrt(q / s.bc2) + s.eps));
}

}  // namespace mdopt::kernels::md

#endif  // MDOPT_KERNELS_COMMON_MD_ELEMENTWISE_H_
