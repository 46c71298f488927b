// A float64 reference of one fused weight with logical blocks, in the tensor's own row order,
// written from the method's formulas for the block tests (blocks_test, interleaved_blocks_test):
// only Newton-Schulz and the gain parametrisation come from the library. W = gs * g_row (x) D
// (x) g_col with g_row per tensor row, g_col and gs shared by the blocks; each block of D
// (its rows listed in block order) on its own Frobenius sphere with its own tangent
// projection and base update.
#ifndef MDOPT_TESTS_UNIT_FUSED_REFERENCE_H_
#define MDOPT_TESTS_UNIT_FUSED_REFERENCE_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

#include "kernels/common/gain_param.h"
#include "kernels/common/update_rule.h"
#include "kernels/reference/reference.h"

namespace mdopt::testing {

// Adam on raw gains, given the gradient with respect to the gains.
struct GainAdam {
  std::vector<double> raw, m, v;
  void Init(size_t count, double raw0) {
    raw.assign(count, raw0);
    m.assign(count, 0.0);
    v.assign(count, 0.0);
  }
  void Step(const kernels::UpdateRule& r, const std::vector<double>& grad, double lr, int t) {
    const double bc1 = 1.0 - std::pow(r.beta1, t), bc2 = 1.0 - std::pow(r.beta2, t);
    for (size_t k = 0; k < raw.size(); ++k) {
      const double g = grad[k] * kernels::GainDerivative(r.gain_param, raw[k]);
      m[k] = r.beta1 * m[k] + (1.0 - r.beta1) * g;
      v[k] = r.beta2 * v[k] + (1.0 - r.beta2) * g * g;
      raw[k] -= lr * (m[k] / bc1) / (std::sqrt(v[k] / bc2) + r.eps);
    }
  }
  double Value(const kernels::UpdateRule& r, size_t k) const {
    return raw.empty() ? 1.0 : kernels::GainValue(r.gain_param, raw[k]);
  }
};

// The tensor rows of each block of one matrix of G groups of pieces `h`, in block order:
// written out from the definition (not through the library's row map).
std::vector<std::vector<int64_t>> BlockRows(int64_t G, const std::vector<int64_t>& h) {
  int64_t H = 0;
  for (int64_t x : h) H += x;
  std::vector<std::vector<int64_t>> out(h.size());
  for (size_t j = 0, start = 0; j < h.size(); start += static_cast<size_t>(h[j]), ++j)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t i = 0; i < h[j]; ++i) out[j].push_back(g * H + static_cast<int64_t>(start) + i);
  return out;
}

// Float64 reference of one fused matrix (M x d, tensor row order) with blocks given by their
// rows: W = gs * g_row (x) D (x) g_col, g_row per tensor row, g_col and gs shared, each block
// of D on its own Frobenius sphere (radius sqrt(max(rows, d))) with its own base update.
struct LayoutRef {
  kernels::UpdateRule r;
  int64_t M = 0, d = 0;
  std::vector<std::vector<int64_t>> blocks;
  std::vector<double> w, mom, m, v, radius;
  GainAdam row, col, scalar;

  // Sets the weights w0; each block's radius radius_of(its rows, its norm) (default: auto,
  // sqrt(max(rows, d))); projects every block onto its sphere or (preserve_init) leaves w0
  // and puts each block's factor ||W_k|| / R_k into its rows' gains.
  void Init(const kernels::UpdateRule& rule, std::vector<std::vector<int64_t>> b, int64_t cols,
            const std::vector<double>& w0, bool preserve_init = false,
            const std::function<double(int64_t, double)>& radius_of = nullptr) {
    r = rule;
    blocks = std::move(b);
    d = cols;
    w = w0;
    M = static_cast<int64_t>(w.size()) / d;
    mom.assign(w.size(), 0.0);
    m.assign(w.size(), 0.0);
    v.assign(w.size(), 0.0);
    const double one = kernels::GainRawForOne(r.gain_param);
    if (kernels::HasRowGains(r.gains)) row.Init(static_cast<size_t>(M), one);
    if (kernels::HasColGains(r.gains)) col.Init(static_cast<size_t>(d), one);
    if (kernels::HasScalarGain(r.gains)) scalar.Init(1, one);
    radius.assign(blocks.size(), 0.0);
    if (r.sphere == kernels::Sphere::kNone) return;
    for (size_t k = 0; k < blocks.size(); ++k) {
      const int64_t rows = static_cast<int64_t>(blocks[k].size());
      const double norm = Norm(w, k);
      radius[k] = radius_of ? radius_of(rows, norm) : std::sqrt(static_cast<double>(std::max(rows, d)));
      if (preserve_init) {
        for (int64_t i : blocks[k]) row.raw[i] = kernels::GainRawFor(r.gain_param, norm / radius[k]);
        continue;
      }
      const double s = radius[k] / norm;
      for (int64_t i : blocks[k])
        for (int64_t j = 0; j < d; ++j) w[i * d + j] *= s;
    }
  }

  double Norm(const std::vector<double>& x, size_t k) const {
    double sq = 0.0;
    for (int64_t i : blocks[k])
      for (int64_t j = 0; j < d; ++j) sq += x[i * d + j] * x[i * d + j];
    return std::sqrt(sq);
  }

  void Step(const std::vector<double>& g, double lr, double gain_lr, int t) {
    std::vector<double> gd(w.size()), D(w.size()), a_row(static_cast<size_t>(M), 0.0),
        a_col(static_cast<size_t>(d), 0.0), a_s(1, 0.0);
    const double gs = scalar.Value(r, 0);
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < d; ++j) {
        const double gr = row.Value(r, i), gc = col.Value(r, j);
        const size_t q = static_cast<size_t>(i * d + j);
        D[q] = w[q] / (gs * gr * gc);
        const double dg = D[q] * g[q];
        a_row[i] += gs * dg * gc;
        a_col[j] += gs * dg * gr;
        a_s[0] += dg * gr * gc;
        gd[q] = g[q] * gs * gr * gc;
      }
    for (size_t k = 0; k < blocks.size(); ++k) {
      const std::vector<int64_t>& rows = blocks[k];
      const int64_t f = static_cast<int64_t>(rows.size());
      // The block gathered in block order: element (a, j) is tensor element rows[a] * d + j.
      auto at = [&](int64_t a, int64_t j) { return static_cast<size_t>(rows[a] * d + j); };
      if (r.tangent && r.sphere != kernels::Sphere::kNone) {
        double dot = 0.0, dd = 0.0;
        for (int64_t a = 0; a < f; ++a)
          for (int64_t j = 0; j < d; ++j) dot += gd[at(a, j)] * D[at(a, j)], dd += D[at(a, j)] * D[at(a, j)];
        for (int64_t a = 0; a < f; ++a)
          for (int64_t j = 0; j < d; ++j) gd[at(a, j)] -= dot / dd * D[at(a, j)];
      }
      std::vector<double> u(static_cast<size_t>(f * d));
      if (r.base == kernels::Base::kMuon) {
        std::vector<double> x(u.size());
        for (int64_t a = 0; a < f; ++a)
          for (int64_t j = 0; j < d; ++j) {
            const size_t q = at(a, j);
            mom[q] = r.momentum * mom[q] + gd[q];
            x[a * d + j] = r.nesterov ? gd[q] + r.momentum * mom[q] : mom[q];
          }
        kernels::ref::NewtonSchulz(r.ns_coeffs, r.ns_steps, f, d, x.data(), u.data());
        for (double& e : u) e *= kernels::MuonScaleFactor(r.muon_scale, f, d);
      } else {
        const double bc1 = 1.0 - std::pow(r.beta1, t), bc2 = 1.0 - std::pow(r.beta2, t);
        for (int64_t a = 0; a < f; ++a)
          for (int64_t j = 0; j < d; ++j) {
            const size_t q = at(a, j);
            m[q] = r.beta1 * m[q] + (1.0 - r.beta1) * gd[q];
            v[q] = r.beta2 * v[q] + (1.0 - r.beta2) * gd[q] * gd[q];
            u[a * d + j] = (m[q] / bc1) / (std::sqrt(v[q] / bc2) + r.eps);
          }
      }
      for (int64_t a = 0; a < f; ++a)
        for (int64_t j = 0; j < d; ++j) D[at(a, j)] = D[at(a, j)] * (1.0 - lr * r.weight_decay) - lr * u[a * d + j];
      if (r.sphere != kernels::Sphere::kNone) {
        const double s = radius[k] / Norm(D, k);
        for (int64_t a = 0; a < f; ++a)
          for (int64_t j = 0; j < d; ++j) D[at(a, j)] *= s;
      }
    }
    if (!row.raw.empty()) row.Step(r, a_row, gain_lr, t);
    if (!col.raw.empty()) col.Step(r, a_col, gain_lr, t);
    if (!scalar.raw.empty()) scalar.Step(r, a_s, gain_lr, t);
    const double gs2 = scalar.Value(r, 0);
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < d; ++j)
        w[i * d + j] = gs2 * row.Value(r, i) * D[i * d + j] * col.Value(r, j);
  }
};

}  // namespace mdopt::testing

#endif  // MDOPT_TESTS_UNIT_FUSED_REFERENCE_H_
