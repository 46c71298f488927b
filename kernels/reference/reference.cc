#include "kernels/reference/reference.h"

#include <algorithm>
#include <cmath>

#include "kernels/common/gain_param.h"
#include "kernels/common/ns_coeffs.h"

namespace mdopt::kernels::ref {
namespace {

// c (p x r) = a (p x q) * b (q x r), all row-major.
void MatMul(const std::vector<double>& a, const std::vector<double>& b, int64_t p, int64_t q,
            int64_t r, std::vector<double>* c) {
  c->assign(static_cast<size_t>(p * r), 0.0);
  for (int64_t i = 0; i < p; ++i) {
    for (int64_t k = 0; k < q; ++k) {
      const double aik = a[i * q + k];
      for (int64_t j = 0; j < r; ++j) (*c)[i * r + j] += aik * b[k * r + j];
    }
  }
}

std::vector<double> Transpose(const double* x, int64_t m, int64_t n) {
  std::vector<double> t(static_cast<size_t>(m * n));
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) t[j * m + i] = x[i * n + j];
  return t;
}

void InitGain(GainParam p, size_t size, GainState* g) {
  g->raw.assign(size, GainRawForOne(p));
  g->exp_avg.assign(size, 0.0);
  g->exp_avg_sq.assign(size, 0.0);
}

// Adam on raw gains given the gradient with respect to the gains (not the raw values).
void GainAdam(const UpdateRule& rule, const std::vector<double>& grad_gamma, double gain_lr,
              int64_t t, GainState* g) {
  const double bc1 = 1.0 - std::pow(rule.beta1, static_cast<double>(t));
  const double bc2 = 1.0 - std::pow(rule.beta2, static_cast<double>(t));
  for (size_t k = 0; k < g->raw.size(); ++k) {
    const double grad = grad_gamma[k] * GainDerivative(rule.gain_param, g->raw[k]);
    g->exp_avg[k] = rule.beta1 * g->exp_avg[k] + (1.0 - rule.beta1) * grad;
    g->exp_avg_sq[k] = rule.beta2 * g->exp_avg_sq[k] + (1.0 - rule.beta2) * grad * grad;
    const double mhat = g->exp_avg[k] / bc1;
    const double vhat = g->exp_avg_sq[k] / bc2;
    g->raw[k] -= gain_lr * mhat / (std::sqrt(vhat) + rule.eps);
  }
}

// The sphere slice element (i, j) belongs to.
int64_t SliceOf(Sphere s, int64_t i, int64_t j) {
  switch (s) {
    case Sphere::kRow: return i;
    case Sphere::kCol: return j;
    default: return 0;
  }
}

}  // namespace

std::vector<double> SliceNorms(Sphere sphere, int64_t m, int64_t n, const double* w) {
  std::vector<double> sq(static_cast<size_t>(SphereSlices(sphere, m, n)), 0.0);
  if (sq.empty()) return sq;
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) sq[SliceOf(sphere, i, j)] += w[i * n + j] * w[i * n + j];
  for (double& v : sq) v = std::sqrt(v);
  return sq;
}

void Project(Sphere sphere, const double* radius, int64_t m, int64_t n, double* d) {
  if (sphere == Sphere::kNone) return;
  const std::vector<double> norms = SliceNorms(sphere, m, n, d);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      const int64_t k = SliceOf(sphere, i, j);
      d[i * n + j] *= norms[k] > 0.0 ? radius[k] / norms[k] : 0.0;
    }
}

int64_t Init(const UpdateRule& rule, int64_t m, int64_t n, const double* w0, bool project,
             MatrixState* s) {
  s->m = m;
  s->n = n;
  const size_t numel = static_cast<size_t>(m * n);
  s->w.assign(w0, w0 + numel);
  s->momentum.clear();
  s->exp_avg.clear();
  s->exp_avg_sq.clear();
  if (rule.base == Base::kMuon) s->momentum.assign(numel, 0.0);
  if (rule.base == Base::kAdamW) {
    s->exp_avg.assign(numel, 0.0);
    s->exp_avg_sq.assign(numel, 0.0);
  }
  s->row = {};
  s->col = {};
  s->scalar = {};
  if (HasRowGains(rule.gains)) InitGain(rule.gain_param, static_cast<size_t>(m), &s->row);
  if (HasColGains(rule.gains)) InitGain(rule.gain_param, static_cast<size_t>(n), &s->col);
  if (HasScalarGain(rule.gains)) InitGain(rule.gain_param, 1, &s->scalar);

  const std::vector<double> norms = SliceNorms(rule.sphere, m, n, w0);
  s->radius.assign(norms.size(), 0.0);
  for (size_t k = 0; k < norms.size(); ++k) {
    s->radius[k] = SliceRadius(rule, m, n, norms[k]);
  }
  for (size_t k = 0; k < norms.size(); ++k)
    if (!(norms[k] > 0.0) || !std::isfinite(norms[k])) return static_cast<int64_t>(k);
  if (project) {
    Project(rule.sphere, s->radius.data(), m, n, s->w.data());
  } else if (rule.sphere != Sphere::kNone) {
    // preserve_init: W stays; the gains take c_k = ||W_k|| / R_k so that D = W / gains is
    // on its sphere.
    auto raw = [&](size_t k) { return GainRawFor(rule.gain_param, norms[k] / s->radius[k]); };
    switch (PreserveInitTarget(rule.sphere, rule.gains)) {
      case AbsorbInto::kRow:
        for (size_t i = 0; i < s->row.raw.size(); ++i)
          s->row.raw[i] = raw(rule.sphere == Sphere::kRow ? i : 0);
        break;
      case AbsorbInto::kCol:
        for (size_t j = 0; j < s->col.raw.size(); ++j)
          s->col.raw[j] = raw(rule.sphere == Sphere::kCol ? j : 0);
        break;
      case AbsorbInto::kScalar: s->scalar.raw[0] = raw(0); break;
      case AbsorbInto::kNone: break;
    }
  }
  return -1;
}

void NewtonSchulz(NsCoeffSet set, int steps, int64_t m, int64_t n, const double* x,
                  double* out) {
  const bool tall = m > n;
  const int64_t p = tall ? n : m;  // rows of the wide orientation
  const int64_t q = tall ? m : n;
  std::vector<double> xw = tall ? Transpose(x, m, n) : std::vector<double>(x, x + m * n);
  double sq = 0.0;
  for (double v : xw) sq += v * v;
  const double inv = 1.0 / (std::sqrt(sq) + kNsNormEps);
  for (double& v : xw) v *= inv;

  std::vector<double> xt, a, aa, b, bx;
  for (int k = 0; k < steps; ++k) {
    const NsTuple c = NsCoefficients(set, k);
    xt = Transpose(xw.data(), p, q);
    MatMul(xw, xt, p, q, p, &a);  // A = X X^T
    MatMul(a, a, p, p, p, &aa);   // A^2
    b.assign(static_cast<size_t>(p * p), 0.0);
    for (size_t e = 0; e < b.size(); ++e) b[e] = c.b * a[e] + c.c * aa[e];
    MatMul(b, xw, p, p, q, &bx);
    for (size_t e = 0; e < xw.size(); ++e) xw[e] = c.a * xw[e] + bx[e];
  }
  if (tall) {
    const std::vector<double> back = Transpose(xw.data(), p, q);
    std::copy(back.begin(), back.end(), out);
  } else {
    std::copy(xw.begin(), xw.end(), out);
  }
}

std::vector<double> RowGains(const UpdateRule& rule, const MatrixState& s) {
  std::vector<double> g(static_cast<size_t>(s.m), 1.0);
  if (HasRowGains(rule.gains))
    for (int64_t i = 0; i < s.m; ++i) g[i] = GainValue(rule.gain_param, s.row.raw[i]);
  return g;
}

std::vector<double> ColGains(const UpdateRule& rule, const MatrixState& s) {
  std::vector<double> g(static_cast<size_t>(s.n), 1.0);
  if (HasColGains(rule.gains))
    for (int64_t j = 0; j < s.n; ++j) g[j] = GainValue(rule.gain_param, s.col.raw[j]);
  return g;
}

double ScalarGain(const UpdateRule& rule, const MatrixState& s) {
  return HasScalarGain(rule.gains) ? GainValue(rule.gain_param, s.scalar.raw[0]) : 1.0;
}

ColScalarGrads ColScalarGradients(const UpdateRule& rule, const double* g, const MatrixState& s) {
  const int64_t m = s.m, n = s.n;
  const std::vector<double> gr = RowGains(rule, s);
  const std::vector<double> gc = ColGains(rule, s);
  const double gs = ScalarGain(rule, s);
  ColScalarGrads out;
  out.col.assign(static_cast<size_t>(n), 0.0);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      const double d = s.w[i * n + j] / (gs * gr[i] * gc[j]);
      const double dg = d * g[i * n + j];
      out.col[j] += dg * gs * gr[i];
      out.scalar += dg * gr[i] * gc[j];
    }
  return out;
}

void Step(const UpdateRule& rule, const double* g, double lr, double gain_lr, int64_t t,
          MatrixState* s, const ColScalarGrads* shared) {
  const int64_t m = s->m, n = s->n;
  const size_t numel = static_cast<size_t>(m * n);

  // 1. Recover the direction.
  const std::vector<double> gr = RowGains(rule, *s);
  const std::vector<double> gc = ColGains(rule, *s);
  const double gs = ScalarGain(rule, *s);
  std::vector<double> d(numel);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) d[i * n + j] = s->w[i * n + j] / (gs * gr[i] * gc[j]);

  // 2. Gradients with respect to the gains (chain rule on W = gs * g_row (x) D (x) g_col).
  std::vector<double> grad_row(static_cast<size_t>(m), 0.0), grad_col(static_cast<size_t>(n), 0.0);
  std::vector<double> grad_scalar(1, 0.0);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      const double dg = d[i * n + j] * g[i * n + j];
      grad_row[i] += dg * gs * gc[j];
      grad_col[j] += dg * gs * gr[i];
      grad_scalar[0] += dg * gr[i] * gc[j];
    }

  if (shared != nullptr) {
    grad_col = shared->col;
    grad_scalar[0] = shared->scalar;
  }

  // 3. The direction's gradient.
  std::vector<double> gd(numel);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) gd[i * n + j] = g[i * n + j] * gs * gr[i] * gc[j];

  // Optional: drop the radial part of gd, slice by slice.
  if (rule.tangent && rule.sphere != Sphere::kNone) {
    const int64_t slices = SphereSlices(rule.sphere, m, n);
    std::vector<double> dot(static_cast<size_t>(slices), 0.0), dd(static_cast<size_t>(slices), 0.0);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) {
        const int64_t k = SliceOf(rule.sphere, i, j);
        dot[k] += gd[i * n + j] * d[i * n + j];
        dd[k] += d[i * n + j] * d[i * n + j];
      }
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) {
        const int64_t k = SliceOf(rule.sphere, i, j);
        if (dd[k] > 0.0) gd[i * n + j] -= dot[k] / dd[k] * d[i * n + j];
      }
  }

  // 4. The base optimizer's update U of the direction.
  std::vector<double> u(numel);
  if (rule.base == Base::kMuon) {
    std::vector<double> x(numel);
    for (size_t e = 0; e < numel; ++e) {
      s->momentum[e] = rule.momentum * s->momentum[e] + gd[e];
      x[e] = rule.nesterov ? gd[e] + rule.momentum * s->momentum[e] : s->momentum[e];
    }
    NewtonSchulz(rule.ns_coeffs, rule.ns_steps, m, n, x.data(), u.data());
    const double scale = MuonScaleFactor(rule.muon_scale, m, n);
    for (double& v : u) v *= scale;
  } else {
    const double bc1 = 1.0 - std::pow(rule.beta1, static_cast<double>(t));
    const double bc2 = 1.0 - std::pow(rule.beta2, static_cast<double>(t));
    for (size_t e = 0; e < numel; ++e) {
      s->exp_avg[e] = rule.beta1 * s->exp_avg[e] + (1.0 - rule.beta1) * gd[e];
      s->exp_avg_sq[e] = rule.beta2 * s->exp_avg_sq[e] + (1.0 - rule.beta2) * gd[e] * gd[e];
      u[e] = (s->exp_avg[e] / bc1) / (std::sqrt(s->exp_avg_sq[e] / bc2) + rule.eps);
    }
  }

  // 5. Step the direction (decoupled weight decay first, as torch's AdamW and Muon do).
  for (size_t e = 0; e < numel; ++e) d[e] = d[e] * (1.0 - lr * rule.weight_decay) - lr * u[e];

  // 6. Back onto the sphere.
  Project(rule.sphere, s->radius.data(), m, n, d.data());

  // 7. Step the gains.
  if (HasRowGains(rule.gains)) GainAdam(rule, grad_row, gain_lr, t, &s->row);
  if (HasColGains(rule.gains)) GainAdam(rule, grad_col, gain_lr, t, &s->col);
  if (HasScalarGain(rule.gains)) GainAdam(rule, grad_scalar, gain_lr, t, &s->scalar);

  // 8. Reassemble W with the new gains.
  const std::vector<double> gr2 = RowGains(rule, *s);
  const std::vector<double> gc2 = ColGains(rule, *s);
  const double gs2 = ScalarGain(rule, *s);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) s->w[i * n + j] = gs2 * gr2[i] * d[i * n + j] * gc2[j];
}

}  // namespace mdopt::kernels::ref

