#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/cpu/bf16.h"
#include "kernels/cpu/fast_matrix.h"
#include "kernels/cpu/gain_param.h"
#include "kernels/cpu/row_ranges.h"

namespace mdopt::kernels::fast {
namespace {

bool Direct(const UpdateRule& r) { return r.sphere == Sphere::kNone && r.gains == Gains::kNone; }

bool CrossRowSliceSums(const UpdateRule& r) {
  return r.sphere == Sphere::kFrobenius || r.sphere == Sphere::kCol;
}

int64_t LocalSlices(Sphere s, const MatrixView& v) {
  switch (s) {
    case Sphere::kFrobenius: return 1;
    case Sphere::kRow: return v.rows;
    case Sphere::kCol: return v.n;
    case Sphere::kNone: return 0;
  }
  return 0;
}

bool ParallelWorthIt(const MatrixView& v) { return v.rows * v.n >= kParallelMinElements; }

// The effective gains of the view at the current raw values.
struct GainValues {
  std::vector<float> row;      // `rows` entries (1 when the rule has no row gains)
  std::vector<float> col;      // n entries
  std::vector<float> inv_col;  // 1 / col
  double scalar = 1.0;
};

GainValues CurrentGains(const UpdateRule& r, const MatrixView& v) {
  GainValues g;
  g.row.assign(static_cast<size_t>(v.rows), 1.0f);
  g.col.assign(static_cast<size_t>(v.n), 1.0f);
  if (HasRowGains(r.gains))
    for (int64_t i = 0; i < v.rows; ++i)
      g.row[i] = static_cast<float>(GainValue<double>(r.gain_param, v.row.raw[i]));
  if (HasColGains(r.gains))
    for (int64_t j = 0; j < v.n; ++j)
      g.col[j] = static_cast<float>(GainValue<double>(r.gain_param, v.col.raw[j]));
  if (HasScalarGain(r.gains)) g.scalar = GainValue<double>(r.gain_param, v.scalar.raw[0]);
  g.inv_col.resize(g.col.size());
  for (size_t j = 0; j < g.col.size(); ++j) g.inv_col[j] = 1.0f / g.col[j];
  return g;
}

// The gradient row i as float32: the tensor itself, or converted into `scratch`.
const float* GradRow(const MatrixView& v, int64_t i, std::vector<float>* scratch) {
  if (v.grad_dtype == Dtype::kF32) return static_cast<const float*>(v.grad) + i * v.n;
  const uint16_t* src = static_cast<const uint16_t*>(v.grad) + i * v.n;
  scratch->resize(static_cast<size_t>(v.n));
  float* dst = scratch->data();
  for (int64_t j = 0; j < v.n; ++j) dst[j] = Bf16ToFloat(src[j]);
  return dst;
}

// Copies master row i into the model's tensor when that is a separate buffer.
void StoreModelRow(const MatrixView& v, int64_t i) {
  if (v.model == nullptr) return;
  const float* src = v.w + i * v.n;
  if (v.model_dtype == Dtype::kF32) {
    std::memcpy(static_cast<float*>(v.model) + i * v.n, src, sizeof(float) * v.n);
  } else {
    uint16_t* dst = static_cast<uint16_t*>(v.model) + i * v.n;
    for (int64_t j = 0; j < v.n; ++j) dst[j] = FloatToBf16(src[j]);
  }
}

// Per-range column partial sums, combined in range order.
struct ColumnPartials {
  int64_t n = 0;
  std::vector<double> data;  // ranges x n
  void Init(const RowRanges& rr, int64_t cols) {
    n = cols;
    data.assign(static_cast<size_t>(rr.count * cols), 0.0);
  }
  double* Range(int64_t k) { return data.data() + k * n; }
  void AddInto(double* out) const {
    const int64_t ranges = n > 0 ? static_cast<int64_t>(data.size()) / n : 0;
    for (int64_t k = 0; k < ranges; ++k)
      for (int64_t j = 0; j < n; ++j) out[j] += data[k * n + j];
  }
};

// ||D'||^2 bookkeeping shared by Pass1 (adamw) and Pass2 (muon).
struct SliceSqAccumulator {
  Sphere sphere;
  std::vector<double> frob;  // one per range
  ColumnPartials cols;
  void Init(Sphere s, const RowRanges& rr, int64_t n) {
    sphere = s;
    frob.assign(static_cast<size_t>(rr.count), 0.0);
    if (s == Sphere::kCol) cols.Init(rr, n);
  }
  void Combine(Partials* p) const {
    if (sphere == Sphere::kFrobenius)
      for (double f : frob) p->slice_sq[0] += f;
    if (sphere == Sphere::kCol) cols.AddInto(p->slice_sq.data());
  }
};

// Adds ||row||^2 of d' to the right slice partial.
inline void AccumulateRowSq(Sphere sphere, const float* dn, int64_t n, int64_t k, int64_t i,
                            SliceSqAccumulator* acc, Partials* p) {
  if (sphere == Sphere::kNone) return;
  if (sphere == Sphere::kCol) {
    double* c = acc->cols.Range(k);
    for (int64_t j = 0; j < n; ++j) c[j] += static_cast<double>(dn[j]) * dn[j];
    return;
  }
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += static_cast<double>(dn[j]) * dn[j];
  if (sphere == Sphere::kRow) {
    p->slice_sq[i] = s;
  } else {
    acc->frob[k] += s;
  }
}

}  // namespace

void ResetPartials(const UpdateRule& r, const MatrixView& v, Partials* p) {
  p->row_grad.assign(HasRowGains(r.gains) ? static_cast<size_t>(v.rows) : 0, 0.0);
  p->col_grad.assign(HasColGains(r.gains) ? static_cast<size_t>(v.n) : 0, 0.0);
  p->scalar_grad.assign(HasScalarGain(r.gains) ? 1 : 0, 0.0);
  const size_t slices = static_cast<size_t>(LocalSlices(r.sphere, v));
  p->slice_sq.assign(slices, 0.0);
  const bool tangent = r.tangent && r.sphere != Sphere::kNone;
  p->radial_dot.assign(tangent ? slices : 0, 0.0);
  p->radial_dd.assign(tangent ? slices : 0, 0.0);
}

int64_t CrossRowCount(const UpdateRule& r, const MatrixView& v) {
  int64_t c = (HasColGains(r.gains) ? v.n : 0) + (HasScalarGain(r.gains) ? 1 : 0);
  if (CrossRowSliceSums(r)) c += LocalSlices(r.sphere, v);
  return c;
}

void PackCrossRow(const UpdateRule& r, const Partials& p, std::vector<double>* out) {
  out->clear();
  out->insert(out->end(), p.col_grad.begin(), p.col_grad.end());
  out->insert(out->end(), p.scalar_grad.begin(), p.scalar_grad.end());
  if (CrossRowSliceSums(r)) out->insert(out->end(), p.slice_sq.begin(), p.slice_sq.end());
}

void UnpackCrossRow(const UpdateRule& r, const double* in, Partials* p) {
  for (double& x : p->col_grad) x = *in++;
  for (double& x : p->scalar_grad) x = *in++;
  if (CrossRowSliceSums(r))
    for (double& x : p->slice_sq) x = *in++;
}

void RadialDots(const UpdateRule& r, const MatrixView& v, Partials* p) {
  if (!r.tangent || r.sphere == Sphere::kNone) return;
  const GainValues gv = CurrentGains(r, v);
  const RowRanges rr(v.rows);
  const int64_t n = v.n;
  std::vector<double> frob_dot(static_cast<size_t>(rr.count), 0.0), frob_dd(frob_dot);
  ColumnPartials col_dot, col_dd;
  if (r.sphere == Sphere::kCol) {
    col_dot.Init(rr, n);
    col_dd.Init(rr, n);
  }
#pragma omp parallel for schedule(static) if (ParallelWorthIt(v))
  for (int64_t k = 0; k < rr.count; ++k) {
    std::vector<float> gbuf;
    for (int64_t i = rr.begin(k); i < rr.end(k); ++i) {
      const float* g = GradRow(v, i, &gbuf);
      const float* w = v.w + i * n;
      const float inv_row = static_cast<float>(1.0 / (gv.scalar * gv.row[i]));
      const float sr = static_cast<float>(gv.scalar * gv.row[i]);
      if (r.sphere == Sphere::kCol) {
        double* cd = col_dot.Range(k);
        double* cdd = col_dd.Range(k);
        for (int64_t j = 0; j < n; ++j) {
          const float d = w[j] * inv_row * gv.inv_col[j];
          const float gd = g[j] * sr * gv.col[j];
          cd[j] += static_cast<double>(gd) * d;
          cdd[j] += static_cast<double>(d) * d;
        }
      } else {
        double dot = 0.0, dd = 0.0;
        for (int64_t j = 0; j < n; ++j) {
          const float d = w[j] * inv_row * gv.inv_col[j];
          const float gd = g[j] * sr * gv.col[j];
          dot += static_cast<double>(gd) * d;
          dd += static_cast<double>(d) * d;
        }
        if (r.sphere == Sphere::kRow) {
          p->radial_dot[i] = dot;
          p->radial_dd[i] = dd;
        } else {
          frob_dot[k] += dot;
          frob_dd[k] += dd;
        }
      }
    }
  }
  if (r.sphere == Sphere::kFrobenius) {
    for (int64_t k = 0; k < rr.count; ++k) {
      p->radial_dot[0] += frob_dot[k];
      p->radial_dd[0] += frob_dd[k];
    }
  } else if (r.sphere == Sphere::kCol) {
    col_dot.AddInto(p->radial_dot.data());
    col_dd.AddInto(p->radial_dd.data());
  }
}

namespace {

// Row kernels of Pass1. Each is one branch-free loop so that it vectorises; the row stays
// in L1/L2 between them. D_ij = w_ij * inv_row * inv_col_j; the gains' gradients need
// dg = D (.) G; the direction's gradient is G_D = G * row_scale * col_j.

// Gain-gradient sums of one row: sum_j dg*col_j (row gain), sum_j dg (scalar gain) and, when
// col_acc is given, col_acc_j += dg * row_gain (column gains).
void GainGradRow(const float* __restrict w, const float* __restrict g,
                 const float* __restrict inv_col, const float* __restrict col, float inv_row,
                 float row_gain, int64_t n, double* __restrict col_acc, double* acc_row,
                 double* acc_scalar) {
  double ar = 0.0, as = 0.0;
  if (col_acc != nullptr) {
#pragma omp simd reduction(+ : ar, as)
    for (int64_t j = 0; j < n; ++j) {
      const float dg = w[j] * inv_row * inv_col[j] * g[j];
      ar += static_cast<double>(dg * col[j]);
      as += static_cast<double>(dg);
      col_acc[j] += static_cast<double>(dg * row_gain);
    }
  } else {
#pragma omp simd reduction(+ : ar, as)
    for (int64_t j = 0; j < n; ++j) {
      const float dg = w[j] * inv_row * inv_col[j] * g[j];
      ar += static_cast<double>(dg * col[j]);
      as += static_cast<double>(dg);
    }
  }
  *acc_row = ar;
  *acc_scalar = as;
}

// G_D of one row into gd, minus the radial part coef_row * coef_col_j * D_ij when tangent.
void DirectionGradRow(const float* __restrict w, const float* __restrict g,
                      const float* __restrict inv_col, const float* __restrict col,
                      float inv_row, float row_scale, const float* __restrict coef_col,
                      float coef_row, int64_t n, float* __restrict gd) {
  if (coef_col != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j)
      gd[j] = g[j] * row_scale * col[j] - coef_row * coef_col[j] * (w[j] * inv_row * inv_col[j]);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) gd[j] = g[j] * row_scale * col[j];
  }
}

// Muon momentum and the Newton-Schulz input.
void MuonRow(const float* __restrict gd, float mu, bool nesterov, int64_t n,
             float* __restrict buf, float* __restrict x) {
  if (nesterov) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float b = mu * buf[j] + gd[j];
      buf[j] = b;
      x[j] = gd[j] + mu * b;
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float b = mu * buf[j] + gd[j];
      buf[j] = b;
      x[j] = b;
    }
  }
}

struct AdamScalars {
  float b1, b2, omb1, omb2, ibc1, ibc2, eps, lr, wdf;
};

// Adam moments and D' = D (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps), written over w.
void AdamRow(const float* __restrict gd, const float* __restrict inv_col, float inv_row,
             const AdamScalars& a, int64_t n, float* __restrict m1, float* __restrict m2,
             float* __restrict w) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float d = w[j] * inv_row * inv_col[j];
    const float m = a.b1 * m1[j] + a.omb1 * gd[j];
    const float q = a.b2 * m2[j] + a.omb2 * gd[j] * gd[j];
    m1[j] = m;
    m2[j] = q;
    w[j] = d * a.wdf - a.lr * (m * a.ibc1) / (std::sqrt(q * a.ibc2) + a.eps);
  }
}

}  // namespace

void Pass1(const UpdateRule& r, const MatrixView& v, const StepScalars& s, float* x,
           Partials* p) {
  const GainValues gv = CurrentGains(r, v);
  const RowRanges rr(v.rows);
  const int64_t n = v.n;
  const bool muon = r.base == Base::kMuon;
  const bool direct = Direct(r);
  const bool want_col = HasColGains(r.gains);
  const bool want_row = HasRowGains(r.gains);
  const bool want_scalar = HasScalarGain(r.gains);
  const bool gain_grads = r.gains != Gains::kNone;
  const bool tangent = r.tangent && r.sphere != Sphere::kNone;

  // Tangent coefficient of element (i, j) = row_coef(i) * col_coef[j] (see RadialDots).
  std::vector<float> col_coef;
  if (tangent) {
    col_coef.assign(static_cast<size_t>(n), 1.0f);
    auto ratio = [](double dot, double dd) { return dd > 0.0 ? dot / dd : 0.0; };
    if (r.sphere == Sphere::kFrobenius)
      std::fill(col_coef.begin(), col_coef.end(),
                static_cast<float>(ratio(p->radial_dot[0], p->radial_dd[0])));
    if (r.sphere == Sphere::kCol)
      for (int64_t j = 0; j < n; ++j)
        col_coef[j] = static_cast<float>(ratio(p->radial_dot[j], p->radial_dd[j]));
  }
  auto row_coef = [&](int64_t i) -> float {
    if (r.sphere != Sphere::kRow) return 1.0f;
    return p->radial_dd[i] > 0.0 ? static_cast<float>(p->radial_dot[i] / p->radial_dd[i]) : 0.0f;
  };

  AdamScalars a;
  a.b1 = static_cast<float>(r.beta1);
  a.b2 = static_cast<float>(r.beta2);
  a.omb1 = static_cast<float>(1.0 - r.beta1);
  a.omb2 = static_cast<float>(1.0 - r.beta2);
  a.ibc1 = static_cast<float>(1.0 / (1.0 - std::pow(r.beta1, static_cast<double>(s.t))));
  a.ibc2 = static_cast<float>(1.0 / (1.0 - std::pow(r.beta2, static_cast<double>(s.t))));
  a.eps = static_cast<float>(r.eps);
  a.lr = static_cast<float>(s.lr);
  a.wdf = static_cast<float>(1.0 - s.lr * r.weight_decay);
  const float mu = static_cast<float>(r.momentum);

  ColumnPartials col_grad;
  if (want_col) col_grad.Init(rr, n);
  std::vector<double> scalar_grad(static_cast<size_t>(rr.count), 0.0);
  SliceSqAccumulator sq;
  sq.Init(r.sphere, rr, n);

#pragma omp parallel for schedule(static) if (ParallelWorthIt(v))
  for (int64_t k = 0; k < rr.count; ++k) {
    std::vector<float> gbuf, gd(static_cast<size_t>(n));
    double* cg = want_col ? col_grad.Range(k) : nullptr;
    for (int64_t i = rr.begin(k); i < rr.end(k); ++i) {
      const float* g = GradRow(v, i, &gbuf);
      float* w = v.w + i * n;
      const double row_scale = gv.scalar * gv.row[i];  // W_ij = D_ij * row_scale * col_j
      const float inv_row = static_cast<float>(1.0 / row_scale);
      if (gain_grads) {
        double acc_row = 0.0, acc_scalar = 0.0;
        GainGradRow(w, g, gv.inv_col.data(), gv.col.data(), inv_row,
                    static_cast<float>(row_scale), n, cg, &acc_row, &acc_scalar);
        if (want_row) p->row_grad[i] = acc_row * gv.scalar;
        if (want_scalar) scalar_grad[k] += acc_scalar;
      }
      DirectionGradRow(w, g, gv.inv_col.data(), gv.col.data(), inv_row,
                       static_cast<float>(row_scale), tangent ? col_coef.data() : nullptr,
                       tangent ? row_coef(i) : 0.0f, n, gd.data());
      if (muon) {
        MuonRow(gd.data(), mu, r.nesterov, n, v.state0 + i * n, x + i * n);
      } else {
        AdamRow(gd.data(), gv.inv_col.data(), inv_row, a, n, v.state0 + i * n,
                v.state1 + i * n, w);
        if (direct) {
          StoreModelRow(v, i);
        } else {
          AccumulateRowSq(r.sphere, w, n, k, i, &sq, p);
        }
      }
    }
  }
  if (want_col) col_grad.AddInto(p->col_grad.data());
  if (want_scalar)
    for (double sg : scalar_grad) p->scalar_grad[0] += sg;
  if (!muon) sq.Combine(p);
}

void Pass2(const UpdateRule& r, const MatrixView& v, const StepScalars& s, const float* o,
           Partials* p) {
  const GainValues gv = CurrentGains(r, v);
  const RowRanges rr(v.rows);
  const int64_t n = v.n;
  const bool direct = Direct(r);
  const float step = static_cast<float>(s.lr * MuonScaleFactor(r.muon_scale, v.m, v.n));
  const float wdf = static_cast<float>(1.0 - s.lr * r.weight_decay);
  SliceSqAccumulator sq;
  sq.Init(r.sphere, rr, n);
#pragma omp parallel for schedule(static) if (ParallelWorthIt(v))
  for (int64_t k = 0; k < rr.count; ++k) {
    for (int64_t i = rr.begin(k); i < rr.end(k); ++i) {
      float* w = v.w + i * n;
      const float* orow = o + i * n;
      const float inv_row = static_cast<float>(1.0 / (gv.scalar * gv.row[i]));
      for (int64_t j = 0; j < n; ++j) {
        const float d = w[j] * inv_row * gv.inv_col[j];
        w[j] = d * wdf - step * orow[j];
      }
      if (direct) {
        StoreModelRow(v, i);
      } else {
        AccumulateRowSq(r.sphere, w, n, k, i, &sq, p);
      }
    }
  }
  sq.Combine(p);
}

namespace {

void GainAdam(const UpdateRule& r, const StepScalars& s, const double* grad_gamma, int64_t count,
              const GainRefs& g) {
  const double bc1 = 1.0 - std::pow(r.beta1, static_cast<double>(s.t));
  const double bc2 = 1.0 - std::pow(r.beta2, static_cast<double>(s.t));
  for (int64_t k = 0; k < count; ++k) {
    const double raw = g.raw[k];
    const double grad = grad_gamma[k] * GainDerivative<double>(r.gain_param, raw);
    const double a = r.beta1 * g.exp_avg[k] + (1.0 - r.beta1) * grad;
    const double q = r.beta2 * g.exp_avg_sq[k] + (1.0 - r.beta2) * grad * grad;
    g.exp_avg[k] = static_cast<float>(a);
    g.exp_avg_sq[k] = static_cast<float>(q);
    g.raw[k] = static_cast<float>(raw - s.gain_lr * (a / bc1) / (std::sqrt(q / bc2) + r.eps));
  }
}

}  // namespace

void StepGains(const UpdateRule& r, const MatrixView& v, const StepScalars& s,
               const Partials& p) {
  if (HasRowGains(r.gains)) GainAdam(r, s, p.row_grad.data(), v.rows, v.row);
  if (HasColGains(r.gains)) GainAdam(r, s, p.col_grad.data(), v.n, v.col);
  if (HasScalarGain(r.gains)) GainAdam(r, s, p.scalar_grad.data(), 1, v.scalar);
}

void Finish(const UpdateRule& r, const MatrixView& v, const Partials& p) {
  const RowRanges rr(v.rows);
  const int64_t n = v.n;
  if (Direct(r)) return;  // Pass1/Pass2 wrote W and the model copy already
  const GainValues gv = CurrentGains(r, v);  // the new gains
  auto factor = [](double radius, double sq) { return sq > 0.0 ? radius / std::sqrt(sq) : 0.0; };
  // W_ij = D'_ij * row_mult[i] * col_mult[j]
  std::vector<float> col_mult(gv.col);
  if (r.sphere == Sphere::kCol)
    for (int64_t j = 0; j < n; ++j)
      col_mult[j] = static_cast<float>(gv.col[j] * factor(v.radius[j], p.slice_sq[j]));
  const double frob = r.sphere == Sphere::kFrobenius ? factor(v.radius[0], p.slice_sq[0]) : 1.0;
#pragma omp parallel for schedule(static) if (ParallelWorthIt(v))
  for (int64_t k = 0; k < rr.count; ++k) {
    for (int64_t i = rr.begin(k); i < rr.end(k); ++i) {
      double rm = gv.scalar * gv.row[i] * frob;
      if (r.sphere == Sphere::kRow) rm *= factor(v.radius[i], p.slice_sq[i]);
      const float rowm = static_cast<float>(rm);
      float* w = v.w + i * n;
      for (int64_t j = 0; j < n; ++j) w[j] = w[j] * rowm * col_mult[j];
      StoreModelRow(v, i);
    }
  }
}

void SliceSquares(const UpdateRule& r, const MatrixView& v, Partials* p) {
  const RowRanges rr(v.rows);
  SliceSqAccumulator sq;
  sq.Init(r.sphere, rr, v.n);
#pragma omp parallel for schedule(static) if (ParallelWorthIt(v))
  for (int64_t k = 0; k < rr.count; ++k)
    for (int64_t i = rr.begin(k); i < rr.end(k); ++i)
      AccumulateRowSq(r.sphere, v.w + i * v.n, v.n, k, i, &sq, p);
  sq.Combine(p);
}

void WriteModel(const MatrixView& v) {
  if (v.model == nullptr) return;
  const RowRanges rr(v.rows);
#pragma omp parallel for schedule(static) if (ParallelWorthIt(v))
  for (int64_t k = 0; k < rr.count; ++k)
    for (int64_t i = rr.begin(k); i < rr.end(k); ++i) StoreModelRow(v, i);
}

double GradSumSq(const MatrixView& v) {
  const RowRanges rr(v.rows);
  std::vector<double> part(static_cast<size_t>(rr.count), 0.0);
#pragma omp parallel for schedule(static) if (ParallelWorthIt(v))
  for (int64_t k = 0; k < rr.count; ++k) {
    double acc = 0.0;
    const int64_t b = rr.begin(k) * v.n, e = rr.end(k) * v.n;
    if (v.grad_dtype == Dtype::kF32) {
      const float* g = static_cast<const float*>(v.grad);
#pragma omp simd reduction(+ : acc)
      for (int64_t q = b; q < e; ++q) acc += static_cast<double>(g[q]) * g[q];
    } else {
      const uint16_t* g = static_cast<const uint16_t*>(v.grad);
#pragma omp simd reduction(+ : acc)
      for (int64_t q = b; q < e; ++q) {
        const double f = Bf16ToFloat(g[q]);
        acc += f * f;
      }
    }
    part[k] = acc;
  }
  double total = 0.0;
  for (double x : part) total += x;
  return total;
}

}  // namespace mdopt::kernels::fast
