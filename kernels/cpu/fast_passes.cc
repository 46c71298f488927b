#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include <omp.h>

#include "kernels/common/bf16.h"
#include "kernels/common/gain_param.h"
#include "kernels/common/md_elementwise.h"
#include "kernels/common/row_ranges.h"
#include "kernels/cpu/fast_matrix.h"

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

// Resizes v to count elements within the capacity Scratch::Reserve gave it (no allocation)
// and returns its data.
template <typename T>
T* Use(std::vector<T>* v, int64_t count, T fill) {
  v->assign(static_cast<size_t>(count), fill);
  return v->data();
}

// The effective gains of the view at the current raw values, in the scratch.
struct GainValues {
  const float* row;      // `rows` entries (1 when the rule has no row gains)
  const float* col;      // n entries
  const float* inv_col;  // 1 / col
  double scalar = 1.0;
};

GainValues CurrentGains(const UpdateRule& r, const MatrixView& v, Scratch* sc) {
  float* row = Use(&sc->row, v.rows, 1.0f);
  float* col = Use(&sc->col, v.n, 1.0f);
  float* inv_col = Use(&sc->inv_col, v.n, 1.0f);
  GainValues g{row, col, inv_col, 1.0};
  if (HasRowGains(r.gains))
    for (int64_t i = 0; i < v.rows; ++i) row[i] = md::EffectiveGain(r.gain_param, v.row.raw[i]);
  if (HasColGains(r.gains))
    for (int64_t j = 0; j < v.n; ++j) col[j] = md::EffectiveGain(r.gain_param, v.col.raw[j]);
  if (HasScalarGain(r.gains)) g.scalar = GainValue<double>(r.gain_param, v.scalar.raw[0]);
  for (int64_t j = 0; j < v.n; ++j) inv_col[j] = 1.0f / col[j];
  return g;
}

// The gradient row i as float32: the tensor itself, or converted into `scratch_row` (n
// floats owned by the calling range).
const float* GradRow(const MatrixView& v, int64_t i, float* scratch_row) {
  const int64_t at = GradRowOffset(v, i);
  if (v.grad_dtype == Dtype::kF32) return static_cast<const float*>(v.grad) + at;
  const uint16_t* src = static_cast<const uint16_t*>(v.grad) + at;
  for (int64_t j = 0; j < v.n; ++j) scratch_row[j] = Bf16ToFloat(src[j]);
  return scratch_row;
}

// Copies master row i into the model's tensor when that is a separate buffer.
void StoreModelRow(const MatrixView& v, int64_t i) {
  if (v.model == nullptr) return;
  const float* src = v.w + i * v.n;
  const int64_t at = ModelRowOffset(v, i);
  if (v.model_dtype == Dtype::kF32) {
    std::memcpy(static_cast<float*>(v.model) + at, src, sizeof(float) * v.n);
  } else {
    uint16_t* dst = static_cast<uint16_t*>(v.model) + at;
    for (int64_t j = 0; j < v.n; ++j) dst[j] = FloatToBf16(src[j]);
  }
}

// Per-range column partial sums (in scratch), combined in range order.
struct ColumnPartials {
  int64_t n = 0, ranges = 0;
  double* data = nullptr;  // ranges x n
  void Init(const RowRanges& rr, int64_t cols, std::vector<double>* storage) {
    n = cols;
    ranges = rr.count;
    data = Use(storage, rr.count * cols, 0.0);
  }
  double* Range(int64_t k) { return data + k * n; }
  void AddInto(double* out) const {
    for (int64_t k = 0; k < ranges; ++k)
      for (int64_t j = 0; j < n; ++j) out[j] += data[k * n + j];
  }
};

// ||D'||^2 bookkeeping shared by Pass1 (adamw), Pass2 (muon) and SliceSquares.
struct SliceSqAccumulator {
  Sphere sphere = Sphere::kNone;
  int64_t ranges = 0;
  double* frob = nullptr;  // one per range
  ColumnPartials cols;
  void Init(Sphere s, const RowRanges& rr, int64_t n, Scratch* sc) {
    sphere = s;
    ranges = rr.count;
    frob = Use(&sc->range_c, rr.count, 0.0);
    if (s == Sphere::kCol) cols.Init(rr, n, &sc->range_cols_b);
  }
  void Combine(Partials* p) const {
    if (sphere == Sphere::kFrobenius)
      for (int64_t k = 0; k < ranges; ++k) p->slice_sq[0] += frob[k];
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

void Scratch::Reserve(int64_t rows, int64_t n) {
  const size_t r = static_cast<size_t>(std::max<int64_t>(rows, 1));
  const size_t c = static_cast<size_t>(std::max<int64_t>(n, 1));
  const size_t ranges = static_cast<size_t>(kMaxRowRanges);
  row.reserve(std::max(row.capacity(), r));
  for (std::vector<float>* v : {&col, &inv_col, &col_aux}) v->reserve(std::max(v->capacity(), c));
  for (std::vector<double>* v : {&range_cols_a, &range_cols_b})
    v->reserve(std::max(v->capacity(), ranges * c));
  for (std::vector<double>* v : {&range_a, &range_b, &range_c})
    v->reserve(std::max(v->capacity(), ranges));
  for (std::vector<float>* v : {&range_grad, &range_gd})
    v->reserve(std::max(v->capacity(), ranges * c));
}

int64_t Scratch::bytes() const {
  size_t b = 0;
  for (const std::vector<float>* v : {&row, &col, &inv_col, &col_aux, &range_grad, &range_gd})
    b += v->capacity() * sizeof(float);
  for (const std::vector<double>* v : {&range_cols_a, &range_cols_b, &range_a, &range_b, &range_c})
    b += v->capacity() * sizeof(double);
  return static_cast<int64_t>(b);
}

void ReservePartials(int64_t rows, int64_t n, Partials* p) {
  const size_t most = static_cast<size_t>(std::max<int64_t>({rows, n, 1}));
  for (std::vector<double>* v : {&p->row_grad, &p->col_grad, &p->scalar_grad, &p->slice_sq,
                                 &p->radial_dot, &p->radial_dd})
    v->reserve(std::max(v->capacity(), most));
}

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

void RadialDots(const UpdateRule& r, const MatrixView& v, Partials* p, Scratch* sc) {
  if (!r.tangent || r.sphere == Sphere::kNone) return;
  const GainValues gv = CurrentGains(r, v, sc);
  const RowRanges rr(v.rows);
  const int64_t n = v.n;
  double* frob_dot = Use(&sc->range_a, rr.count, 0.0);
  double* frob_dd = Use(&sc->range_b, rr.count, 0.0);
  ColumnPartials col_dot, col_dd;
  if (r.sphere == Sphere::kCol) {
    col_dot.Init(rr, n, &sc->range_cols_a);
    col_dd.Init(rr, n, &sc->range_cols_b);
  }
  float* grad_rows = Use(&sc->range_grad, rr.count * n, 0.0f);
#pragma omp parallel for schedule(static) if (ParallelWorthIt(v))
  for (int64_t k = 0; k < rr.count; ++k) {
    float* gbuf = grad_rows + k * n;
    for (int64_t i = rr.begin(k); i < rr.end(k); ++i) {
      const float* g = GradRow(v, i, gbuf);
      const float* w = v.w + i * n;
      const float inv_row = md::InverseRowScale(gv.scalar * gv.row[i]);
      const float sr = static_cast<float>(gv.scalar * gv.row[i]);
      if (r.sphere == Sphere::kCol) {
        double* cd = col_dot.Range(k);
        double* cdd = col_dd.Range(k);
        for (int64_t j = 0; j < n; ++j) {
          const float d = md::Direction(w[j], inv_row, gv.inv_col[j]);
          const float gd = md::DirectionGrad(g[j], sr, gv.col[j]);
          cd[j] += static_cast<double>(gd) * d;
          cdd[j] += static_cast<double>(d) * d;
        }
      } else {
        double dot = 0.0, dd = 0.0;
        for (int64_t j = 0; j < n; ++j) {
          const float d = md::Direction(w[j], inv_row, gv.inv_col[j]);
          const float gd = md::DirectionGrad(g[j], sr, gv.col[j]);
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
      const float dg = md::GainGradTerm(w[j], inv_row, inv_col[j], g[j]);
      ar += static_cast<double>(dg * col[j]);
      as += static_cast<double>(dg);
      col_acc[j] += static_cast<double>(dg * row_gain);
    }
  } else {
#pragma omp simd reduction(+ : ar, as)
    for (int64_t j = 0; j < n; ++j) {
      const float dg = md::GainGradTerm(w[j], inv_row, inv_col[j], g[j]);
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
      gd[j] = md::TangentDirectionGrad(g[j], row_scale, col[j], coef_row, coef_col[j],
                                       md::Direction(w[j], inv_row, inv_col[j]));
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) gd[j] = md::DirectionGrad(g[j], row_scale, col[j]);
  }
}

// Muon momentum and the Newton-Schulz input.
void MuonRow(const float* __restrict gd, float mu, bool nesterov, int64_t n,
             float* __restrict buf, float* __restrict x) {
  if (nesterov) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float b = md::MuonMomentum(mu, buf[j], gd[j]);
      buf[j] = b;
      x[j] = md::MuonInput(true, mu, b, gd[j]);
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float b = md::MuonMomentum(mu, buf[j], gd[j]);
      buf[j] = b;
      x[j] = md::MuonInput(false, mu, b, gd[j]);
    }
  }
}

using md::AdamScalars;

// Adam moments and D' = D (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps), written over w.
void AdamRow(const float* __restrict gd, const float* __restrict inv_col, float inv_row,
             const AdamScalars& a, int64_t n, float* __restrict m1, float* __restrict m2,
             float* __restrict w) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float d = md::Direction(w[j], inv_row, inv_col[j]);
    const float m = md::AdamFirstMoment(a, m1[j], gd[j]);
    const float q = md::AdamSecondMoment(a, m2[j], gd[j]);
    m1[j] = m;
    m2[j] = q;
    w[j] = md::AdamApply(a, d, m, q);
  }
}

// md-adamw and its relatives in one pass over each row: the gain-gradient terms, G_D, Adam
// and ||D'||^2 together, so that G, W and the moments are read once and G_D never goes
// through memory (the split kernels above spend more time on instructions than on bytes).
// Row sums add float32 lanes over blocks of kSumBlock columns (32 terms per lane at AVX2's
// 8 lanes) before each block's total goes into float64, and the column-gain terms of a
// range add in float32 for kColFlushRows rows before going into the range's float64
// partials: float64 vector adds cost twice the float32 ones, and a block of 32 terms loses
// nothing the float32 terms themselves had not already lost. Order is fixed by the code, so
// results stay independent of the thread count.
inline constexpr int64_t kSumBlock = 256;
inline constexpr int64_t kColFlushRows = 16;

struct FusedRowSums {
  double row = 0.0;     // sum_j dg * col_j
  double scalar = 0.0;  // sum_j dg
  double sq = 0.0;      // sum_j D'^2
};

template <bool kGains, bool kColAcc, bool kSq>
void FusedAdamRow(const float* __restrict g, const float* __restrict inv_col,
                  const float* __restrict col, float inv_row, float row_scale,
                  const AdamScalars& a, int64_t n, float* __restrict m1, float* __restrict m2,
                  float* __restrict w, float* __restrict col_acc, FusedRowSums* out) {
  double ar = 0.0, as = 0.0, aq = 0.0;
  for (int64_t j0 = 0; j0 < n; j0 += kSumBlock) {
    const int64_t j1 = std::min(n, j0 + kSumBlock);
    float br = 0.0f, bs = 0.0f, bq = 0.0f;
#pragma omp simd reduction(+ : br, bs, bq)
    for (int64_t j = j0; j < j1; ++j) {
      const float d = md::Direction(w[j], inv_row, inv_col[j]);
      if constexpr (kGains) {
        const float dg = d * g[j];  // md::GainGradTerm, with D already formed
        br += dg * col[j];
        bs += dg;
        if constexpr (kColAcc) col_acc[j] += dg * row_scale;
      }
      const float gd = md::DirectionGrad(g[j], row_scale, col[j]);
      const float m = md::AdamFirstMoment(a, m1[j], gd);
      const float q = md::AdamSecondMoment(a, m2[j], gd);
      m1[j] = m;
      m2[j] = q;
      const float dn = md::AdamApply(a, d, m, q);
      w[j] = dn;
      if constexpr (kSq) bq += dn * dn;
    }
    ar += br;
    as += bs;
    aq += bq;
  }
  out->row = ar;
  out->scalar = as;
  out->sq = aq;
}

using FusedAdamRowFn = void (*)(const float*, const float*, const float*, float, float,
                                const AdamScalars&, int64_t, float*, float*, float*, float*,
                                FusedRowSums*);

FusedAdamRowFn PickFusedAdamRow(bool gains, bool col_acc, bool sq) {
  if (!gains) return sq ? FusedAdamRow<false, false, true> : FusedAdamRow<false, false, false>;
  if (col_acc) return sq ? FusedAdamRow<true, true, true> : FusedAdamRow<true, true, false>;
  return sq ? FusedAdamRow<true, false, true> : FusedAdamRow<true, false, false>;
}

// Adds the float32 column-gain terms of a range into its float64 partials and clears them.
void FlushColumnTerms(float* __restrict acc, double* __restrict out, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    out[j] += static_cast<double>(acc[j]);
    acc[j] = 0.0f;
  }
}

// Pass1 of an AdamW-based rule without the tangent correction or a column sphere.
void FusedAdamPass1(const UpdateRule& r, const MatrixView& v, const StepScalars& s,
                    const GainValues& gv, Partials* p, Scratch* sc) {
  const RowRanges rr(v.rows);
  const int64_t n = v.n;
  const bool direct = Direct(r);
  const bool want_col = HasColGains(r.gains);
  const bool want_row = HasRowGains(r.gains);
  const bool want_scalar = HasScalarGain(r.gains);
  const bool want_sq = r.sphere != Sphere::kNone;
  const FusedAdamRowFn row_fn = PickFusedAdamRow(r.gains != Gains::kNone, want_col, want_sq);
  const AdamScalars a = md::MakeAdamScalars(r, s.lr, s.t);

  ColumnPartials col_grad;
  if (want_col) col_grad.Init(rr, n, &sc->range_cols_a);
  double* scalar_grad = Use(&sc->range_a, rr.count, 0.0);
  double* frob = Use(&sc->range_c, rr.count, 0.0);
  float* grad_rows = Use(&sc->range_grad, rr.count * n, 0.0f);
  float* col_terms = Use(&sc->range_gd, want_col ? rr.count * n : 0, 0.0f);

#pragma omp parallel for schedule(static) if (ParallelWorthIt(v))
  for (int64_t k = 0; k < rr.count; ++k) {
    float* gbuf = grad_rows + k * n;
    float* cacc = want_col ? col_terms + k * n : nullptr;
    double* cg = want_col ? col_grad.Range(k) : nullptr;
    int64_t pending = 0;  // rows in cacc not yet flushed
    for (int64_t i = rr.begin(k); i < rr.end(k); ++i) {
      const float* g = GradRow(v, i, gbuf);
      const double row_scale = gv.scalar * gv.row[i];  // W_ij = D_ij * row_scale * col_j
      FusedRowSums sums;
      row_fn(g, gv.inv_col, gv.col, md::InverseRowScale(row_scale),
             static_cast<float>(row_scale), a, n, v.state0 + i * n, v.state1 + i * n,
             v.w + i * n, cacc, &sums);
      if (want_row) p->row_grad[i] = sums.row * gv.scalar;
      if (want_scalar) scalar_grad[k] += sums.scalar;
      if (r.sphere == Sphere::kRow) p->slice_sq[i] = sums.sq;
      if (r.sphere == Sphere::kFrobenius) frob[k] += sums.sq;
      if (direct) StoreModelRow(v, i);
      if (want_col && (++pending == kColFlushRows || i + 1 == rr.end(k))) {
        FlushColumnTerms(cacc, cg, n);
        pending = 0;
      }
    }
  }
  if (want_col) col_grad.AddInto(p->col_grad.data());
  if (want_scalar)
    for (int64_t k = 0; k < rr.count; ++k) p->scalar_grad[0] += scalar_grad[k];
  if (r.sphere == Sphere::kFrobenius)
    for (int64_t k = 0; k < rr.count; ++k) p->slice_sq[0] += frob[k];
}

}  // namespace

void Pass1(const UpdateRule& r, const MatrixView& v, const StepScalars& s, float* x,
           Partials* p, Scratch* sc) {
  const GainValues gv = CurrentGains(r, v, sc);
  const bool tangent = r.tangent && r.sphere != Sphere::kNone;
  if (r.base == Base::kAdamW && !tangent && r.sphere != Sphere::kCol) {
    FusedAdamPass1(r, v, s, gv, p, sc);
    return;
  }
  const RowRanges rr(v.rows);
  const int64_t n = v.n;
  const bool muon = r.base == Base::kMuon;
  const bool direct = Direct(r);
  const bool want_col = HasColGains(r.gains);
  const bool want_row = HasRowGains(r.gains);
  const bool want_scalar = HasScalarGain(r.gains);
  const bool gain_grads = r.gains != Gains::kNone;

  // Tangent coefficient of element (i, j) = row_coef(i) * col_coef[j] (see RadialDots).
  float* col_coef = nullptr;
  if (tangent) {
    col_coef = Use(&sc->col_aux, n, 1.0f);
    if (r.sphere == Sphere::kFrobenius)
      std::fill(col_coef, col_coef + n,
                static_cast<float>(md::RadialRatio(p->radial_dot[0], p->radial_dd[0])));
    if (r.sphere == Sphere::kCol)
      for (int64_t j = 0; j < n; ++j)
        col_coef[j] = static_cast<float>(md::RadialRatio(p->radial_dot[j], p->radial_dd[j]));
  }
  auto row_coef = [&](int64_t i) -> float {
    if (r.sphere != Sphere::kRow) return 1.0f;
    return static_cast<float>(md::RadialRatio(p->radial_dot[i], p->radial_dd[i]));
  };

  const AdamScalars a = md::MakeAdamScalars(r, s.lr, s.t);
  const float mu = static_cast<float>(r.momentum);

  ColumnPartials col_grad;
  if (want_col) col_grad.Init(rr, n, &sc->range_cols_a);
  double* scalar_grad = Use(&sc->range_a, rr.count, 0.0);
  SliceSqAccumulator sq;
  sq.Init(r.sphere, rr, n, sc);
  float* grad_rows = Use(&sc->range_grad, rr.count * n, 0.0f);
  float* gd_rows = Use(&sc->range_gd, rr.count * n, 0.0f);

#pragma omp parallel for schedule(static) if (ParallelWorthIt(v))
  for (int64_t k = 0; k < rr.count; ++k) {
    float* gbuf = grad_rows + k * n;
    float* gd = gd_rows + k * n;
    double* cg = want_col ? col_grad.Range(k) : nullptr;
    for (int64_t i = rr.begin(k); i < rr.end(k); ++i) {
      const float* g = GradRow(v, i, gbuf);
      float* w = v.w + i * n;
      const double row_scale = gv.scalar * gv.row[i];  // W_ij = D_ij * row_scale * col_j
      const float inv_row = md::InverseRowScale(row_scale);
      if (gain_grads) {
        double acc_row = 0.0, acc_scalar = 0.0;
        GainGradRow(w, g, gv.inv_col, gv.col, inv_row,
                    static_cast<float>(row_scale), n, cg, &acc_row, &acc_scalar);
        if (want_row) p->row_grad[i] = acc_row * gv.scalar;
        if (want_scalar) scalar_grad[k] += acc_scalar;
      }
      DirectionGradRow(w, g, gv.inv_col, gv.col, inv_row, static_cast<float>(row_scale),
                       tangent ? col_coef : nullptr, tangent ? row_coef(i) : 0.0f, n, gd);
      if (muon) {
        MuonRow(gd, mu, r.nesterov, n, v.state0 + i * n, x + i * n);
      } else {
        AdamRow(gd, gv.inv_col, inv_row, a, n, v.state0 + i * n,
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
    for (int64_t k = 0; k < rr.count; ++k) p->scalar_grad[0] += scalar_grad[k];
  if (!muon) sq.Combine(p);
}

void Pass2(const UpdateRule& r, const MatrixView& v, const StepScalars& s, const float* o,
           Partials* p, Scratch* sc) {
  const GainValues gv = CurrentGains(r, v, sc);
  const RowRanges rr(v.rows);
  const int64_t n = v.n;
  const bool direct = Direct(r);
  const float step = static_cast<float>(s.lr * MuonScaleFactor(r.muon_scale, v.m, v.n));
  const float wdf = static_cast<float>(1.0 - s.lr * r.weight_decay);
  SliceSqAccumulator sq;
  sq.Init(r.sphere, rr, n, sc);
#pragma omp parallel for schedule(static) if (ParallelWorthIt(v))
  for (int64_t k = 0; k < rr.count; ++k) {
    for (int64_t i = rr.begin(k); i < rr.end(k); ++i) {
      float* w = v.w + i * n;
      const float* orow = o + i * n;
      const float inv_row = md::InverseRowScale(gv.scalar * gv.row[i]);
      for (int64_t j = 0; j < n; ++j)
        w[j] = md::MuonApply(md::Direction(w[j], inv_row, gv.inv_col[j]), wdf, step, orow[j]);
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
  const md::GainAdamScalars gs = md::MakeGainAdamScalars(r, s.gain_lr, s.t);
  for (int64_t k = 0; k < count; ++k)
    md::GainAdamElement(r.gain_param, gs, grad_gamma[k], g.raw + k, g.exp_avg + k,
                        g.exp_avg_sq + k);
}

}  // namespace

void StepGains(const UpdateRule& r, const MatrixView& v, const StepScalars& s,
               const Partials& p) {
  if (HasRowGains(r.gains)) GainAdam(r, s, p.row_grad.data(), v.rows, v.row);
  if (HasColGains(r.gains)) GainAdam(r, s, p.col_grad.data(), v.n, v.col);
  if (HasScalarGain(r.gains)) GainAdam(r, s, p.scalar_grad.data(), 1, v.scalar);
}

void Finish(const UpdateRule& r, const MatrixView& v, const Partials& p, Scratch* sc) {
  const RowRanges rr(v.rows);
  const int64_t n = v.n;
  if (Direct(r)) return;  // Pass1/Pass2 wrote W and the model copy already
  const GainValues gv = CurrentGains(r, v, sc);  // the new gains
  // W_ij = D'_ij * row_mult[i] * col_mult[j]
  float* col_mult = Use(&sc->col_aux, n, 0.0f);
  std::copy(gv.col, gv.col + n, col_mult);
  if (r.sphere == Sphere::kCol)
    for (int64_t j = 0; j < n; ++j)
      col_mult[j] = static_cast<float>(gv.col[j] * md::ProjectionFactor(v.radius[j], p.slice_sq[j]));
  const double frob =
      r.sphere == Sphere::kFrobenius ? md::ProjectionFactor(v.radius[0], p.slice_sq[0]) : 1.0;
  // Element-wise, so any order gives the same bits. Rows forwards, as Pass1/Pass2 went: a
  // backward walk (to start on the rows the first pass wrote last, still in cache) measured
  // slower on Zen 4, 8.0-10.5 ms against 5.6-7.6 ms for this pass over 44 M parameters at 2
  // threads: the hardware prefetchers follow ascending streams, and what they gain is more
  // than the cache hits the backward walk finds.
#pragma omp parallel for schedule(static) if (ParallelWorthIt(v))
  for (int64_t k = 0; k < rr.count; ++k) {
    for (int64_t i = rr.begin(k); i < rr.end(k); ++i) {
      double rm = gv.scalar * gv.row[i] * frob;
      if (r.sphere == Sphere::kRow) rm *= md::ProjectionFactor(v.radius[i], p.slice_sq[i]);
      const float rowm = static_cast<float>(rm);
      float* w = v.w + i * n;
      for (int64_t j = 0; j < n; ++j) w[j] = md::Rescale(w[j], rowm, col_mult[j]);
      StoreModelRow(v, i);
    }
  }
}

void SliceSquares(const UpdateRule& r, const MatrixView& v, Partials* p, Scratch* sc) {
  const RowRanges rr(v.rows);
  SliceSqAccumulator sq;
  sq.Init(r.sphere, rr, v.n, sc);
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

void UpdateNorms(const MatrixView& v, const float* w_old, double* delta_sq, double* w_sq,
                 Scratch* sc) {
  const RowRanges rr(v.rows);
  double* d = Use(&sc->range_a, rr.count, 0.0);
  double* q = Use(&sc->range_b, rr.count, 0.0);
#pragma omp parallel for schedule(static) if (ParallelWorthIt(v))
  for (int64_t k = 0; k < rr.count; ++k) {
    double dk = 0.0, qk = 0.0;
    const int64_t b = rr.begin(k) * v.n, e = rr.end(k) * v.n;
#pragma omp simd reduction(+ : dk, qk)
    for (int64_t x = b; x < e; ++x) {
      const double w0 = w_old[x], diff = static_cast<double>(v.w[x]) - w0;
      dk += diff * diff;
      qk += w0 * w0;  // the weight before the step, as the method's relative update
    }
    d[k] = dk;
    q[k] = qk;
  }
  *delta_sq = 0.0;
  *w_sq = 0.0;
  for (int64_t k = 0; k < rr.count; ++k) {
    *delta_sq += d[k];
    *w_sq += q[k];
  }
}

double GradSumSq(const MatrixView& v, Scratch* sc) {
  const RowRanges rr(v.rows);
  double* part = Use(&sc->range_a, rr.count, 0.0);
#pragma omp parallel for schedule(static) if (ParallelWorthIt(v))
  for (int64_t k = 0; k < rr.count; ++k) {
    double acc = 0.0;
    const int64_t b = rr.begin(k) * v.n, e = rr.end(k) * v.n;
    if (v.grad_in_model && v.model_map != nullptr) {
      // Interleaved blocks read in place: row by row through the row map.
      for (int64_t i = rr.begin(k); i < rr.end(k); ++i) {
        const int64_t at = GradRowOffset(v, i);
        for (int64_t j = 0; j < v.n; ++j) {
          const double f = v.grad_dtype == Dtype::kF32
                               ? static_cast<const float*>(v.grad)[at + j]
                               : Bf16ToFloat(static_cast<const uint16_t*>(v.grad)[at + j]);
          acc += f * f;
        }
      }
    } else if (v.grad_dtype == Dtype::kF32) {
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
  for (int64_t k = 0; k < rr.count; ++k) total += part[k];
  return total;
}

}  // namespace mdopt::kernels::fast
