// The float32 fast path for one matrix's rows: the step of DESIGN.md section 1 split into
// the fused passes of section 3 so that a sharded caller can put communication between
// them. Each pass runs OpenMP over a fixed partition of the rows (row_ranges.h), and every
// sum is accumulated in float64 per range and combined in range order, so results do not
// depend on the number of threads and a checkpointed run continues bit for bit.
//
// Order for one step (the caller sums the "cross-row" partials over ranks in between):
//   [RadialDots]  (tangent=1 only)     -> cross-row: radial dot products
//   Pass1                               -> muon: X for Newton-Schulz; adamw: D' written to w
//   [NewtonSchulz on X, then Pass2]     (muon only) -> D' written to w
//   -> cross-row: column-gain and scalar-gain gradients, squared norms of frobenius/col slices
//   StepGains, then Finish              -> W = g_row (x) project(D') (x) g_col, model copy
#ifndef MDOPT_KERNELS_CPU_FAST_MATRIX_H_
#define MDOPT_KERNELS_CPU_FAST_MATRIX_H_

#include <cstdint>
#include <vector>

#include "kernels/common/dtype.h"
#include "kernels/common/row_map.h"
#include "kernels/common/update_rule.h"

namespace mdopt::kernels::fast {

using kernels::Dtype;

// Raw gains and their Adam moments (float32 state).
struct GainRefs {
  float* raw = nullptr;
  float* exp_avg = nullptr;
  float* exp_avg_sq = nullptr;
};

// Rows [row_begin, row_begin + rows) of one m x n matrix. Row-indexed pointers (w, states,
// row gains, row radii, model, grad) point at row_begin; column-indexed ones at column 0.
struct MatrixView {
  int64_t m = 0, n = 0;
  int64_t row_begin = 0, rows = 0;
  float* w = nullptr;       // master weights; may be the model's own f32 tensor
  float* state0 = nullptr;  // muon momentum | adam exp_avg
  float* state1 = nullptr;  // adam exp_avg_sq
  GainRefs row, col, scalar;
  const float* radius = nullptr;  // frobenius: 1 value; row: `rows`; col: n
  void* model = nullptr;          // the model's tensor when it is not w itself
  Dtype model_dtype = Dtype::kF32;
  const void* grad = nullptr;
  Dtype grad_dtype = Dtype::kF32;
  // blocks=groups:G (kernels/common/row_map.h): the view's rows are in block order and the
  // model's tensors interleave them. Then `model` (and `grad` when grad_in_model) point at
  // the tensor's start and row i is at model_map->TensorRow(map_row0 + i); else (nullptr)
  // they point at the view's first row and row i is i * n further.
  const RowMap* model_map = nullptr;
  int64_t map_row0 = 0;
  bool grad_in_model = false;
};

// Row i of the model's tensors (`model`, and `grad` when it is read in place) in elements
// from their pointers.
inline int64_t ModelRowOffset(const MatrixView& v, int64_t i) {
  return v.model_map == nullptr ? i * v.n : v.model_map->TensorRow(v.map_row0 + i) * v.n;
}
inline int64_t GradRowOffset(const MatrixView& v, int64_t i) {
  return v.grad_in_model ? ModelRowOffset(v, i) : i * v.n;
}

// Step-wide numbers of one matrix: the schedule applied to the rule.
struct StepScalars {
  double lr = 0.0;       // rule.lr * lr_scale
  double gain_lr = 0.0;  // rule.gain_lr * lr_scale
  int64_t t = 1;         // 1-based count of the steps the matrix's param took (this one
                         // included), for bias correction
};

// Buffers the passes work in, sized once (Reserve) for the largest view they will see, so
// that no pass allocates: nothing is allocated inside a parallel region (where a failed
// allocation could not be reported) and a step allocates nothing at all. One per caller
// thread; every pass below takes it.
struct Scratch {
  // Room for any view of at most `rows` rows and `n` columns.
  void Reserve(int64_t rows, int64_t n);
  int64_t bytes() const;

  std::vector<float> row, col, inv_col, col_aux;  // effective gains, tangent/projection factors
  std::vector<double> range_cols_a, range_cols_b; // per-range column partials (ranges x n)
  std::vector<double> range_a, range_b, range_c;  // per-range scalar partials
  std::vector<float> range_grad, range_gd;        // per-range row buffers (ranges x n)
};

// Sums one step accumulates. "Cross-row" entries are partial over this view's rows and
// must be summed over all row blocks of the matrix before they are used.
struct Partials {
  std::vector<double> row_grad;    // d loss / d gamma_row, `rows` entries (exact)
  std::vector<double> col_grad;    // d loss / d gamma_col, n entries (cross-row)
  std::vector<double> scalar_grad; // 1 entry (cross-row)
  std::vector<double> slice_sq;    // ||D'||^2 per slice: frobenius 1 / col n (cross-row), row `rows`
  std::vector<double> radial_dot;  // tangent: <G_D, D> per slice (frobenius/col cross-row)
  std::vector<double> radial_dd;   // tangent: <D, D> per slice
};

// Makes room in p for any view of at most `rows` rows and `n` columns (Reserve once; then
// ResetPartials never allocates).
void ReservePartials(int64_t rows, int64_t n, Partials* p);

// Sizes the partials for the rule and view, all zero.
void ResetPartials(const UpdateRule& rule, const MatrixView& v, Partials* p);

// The cross-row parts of p in one contiguous list (for one all-reduce), and back.
void PackCrossRow(const UpdateRule& rule, const Partials& p, std::vector<double>* out);
void UnpackCrossRow(const UpdateRule& rule, const double* in, Partials* p);
int64_t CrossRowCount(const UpdateRule& rule, const MatrixView& v);

// tangent=1: <G_D, D> and <D, D> per slice into p.
void RadialDots(const UpdateRule& rule, const MatrixView& v, Partials* p, Scratch* scratch);

// Recovers D, accumulates gain gradients, forms G_D (tangent-corrected when asked) and runs
// the base optimizer's elementwise part. muon: writes X (rows x n) for Newton-Schulz and
// updates the momentum. adamw: updates the moments and writes D' into v.w.
void Pass1(const UpdateRule& rule, const MatrixView& v, const StepScalars& s, float* x,
           Partials* p, Scratch* scratch);

// muon: D' = D (1 - lr wd) - lr * scale * O into v.w, where O (rows x n) is NS(X).
void Pass2(const UpdateRule& rule, const MatrixView& v, const StepScalars& s, const float* o,
           Partials* p, Scratch* scratch);

// Adam on the raw gains from the (all-reduced) gain gradients in p.
void StepGains(const UpdateRule& rule, const MatrixView& v, const StepScalars& s,
               const Partials& p);

// Projects D' (in v.w) with the (all-reduced) slice norms, multiplies the new gains back in
// and writes the master and the model copy. Does nothing to v.w when the rule has neither
// sphere nor gains (then Pass1/Pass2 already wrote W), but still writes a separate model copy.
void Finish(const UpdateRule& rule, const MatrixView& v, const Partials& p, Scratch* scratch);

// ||slice||^2 of v.w into p->slice_sq (frobenius/col: partial over this view's rows).
void SliceSquares(const UpdateRule& rule, const MatrixView& v, Partials* p, Scratch* scratch);

// Writes the model copy from v.w (after init or a checkpoint load).
void WriteModel(const MatrixView& v);

// sum (w - w_old)^2 and sum w_old^2 over the view's rows (w: v.w after Finish; w_old: the rows
// before the step, `rows x n`), in float64 over the fixed row partition.
void UpdateNorms(const MatrixView& v, const float* w_old, double* delta_sq, double* w_sq,
                 Scratch* scratch);

// Sum of squares of the gradient rows, in float64 (NaN/Inf propagate: the finite check).
double GradSumSq(const MatrixView& v, Scratch* scratch);

}  // namespace mdopt::kernels::fast

#endif  // MDOPT_KERNELS_CPU_FAST_MATRIX_H_
