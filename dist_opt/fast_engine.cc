// The float32 engine: this rank's rows of every matrix, stepped with the fused passes of
// kernels/cpu/fast_matrix.h and Newton-Schulz on the BLAS. Cross-row sums go through the
// communicator (the identity on one rank).
#include <algorithm>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "dist_opt/engine.h"
#include "dist_opt/shard_plan.h"
#include "kernels/cpu/bf16.h"
#include "kernels/cpu/fast_matrix.h"
#include "kernels/cpu/gain_param.h"
#include "kernels/cpu/newton_schulz.h"
#include "kernels/cpu/newton_schulz_bf16.h"

namespace mdopt {
namespace {

namespace fast = kernels::fast;
using kernels::Base;
using kernels::RadiusMode;
using kernels::Sphere;

struct FastParamState {
  RowBlock rows;  // owned rows of each expert matrix
  std::vector<float> master;  // empty when the model's f32 tensor is the master
  std::vector<float> state0, state1;
  std::vector<float> row_raw, row_m, row_v;
  std::vector<float> col_raw, col_m, col_v;
  std::vector<float> scalar_raw, scalar_m, scalar_v;
  std::vector<float> radius;
  int64_t slices = 0;  // sphere slices this rank holds per expert
};

class FastEngine final : public Engine {
 public:
  FastEngine(const std::vector<ParamEntry>* params, Communicator* comm, bool ns_bf16)
      : params_(*params), comm_(comm), ns_bf16_(ns_bf16) {}

  absl::Status Init() override;
  double GradSumSq(int64_t index) override;
  absl::Status Step(double lr_scale, int64_t t) override;
  std::vector<StateArray> State(int64_t index, int64_t expert) override;
  void WriteModels() override;
  int64_t WorkspaceBytes() const override {
    return static_cast<int64_t>(x_.capacity() * sizeof(float) + cross_.capacity() * sizeof(double)) +
           ns_.bytes() + ns_bf16_ws_.bytes() + scratch_.bytes();
  }
  const char* name() const override { return "fast"; }

 private:
  fast::MatrixView View(int64_t index, int64_t expert) const;
  // All-reduces the cross-row parts of p (no-op on one rank).
  absl::Status ReduceCrossRow(const kernels::UpdateRule& r, fast::Partials* p);

  const std::vector<ParamEntry>& params_;
  Communicator* comm_;
  const bool ns_bf16_;
  std::vector<FastParamState> st_;
  std::vector<float> x_;  // Newton-Schulz input of the largest Muon matrix
  fast::NsWorkspace ns_;
  fast::Bf16NewtonSchulz ns_bf16_ws_;
  fast::Partials partials_;
  std::vector<double> cross_;
  fast::Scratch scratch_;
};

bool AliasesModel(const ParamEntry& p) { return p.param_dtype == Dtype::kF32; }

fast::MatrixView FastEngine::View(int64_t index, int64_t e) const {
  const ParamEntry& p = params_[index];
  const FastParamState& s = st_[index];
  fast::MatrixView v;
  v.m = p.m;
  v.n = p.n;
  v.row_begin = s.rows.begin;
  v.rows = s.rows.rows();
  const int64_t model_off = e * p.m * p.n + s.rows.begin * p.n;  // elements into the tensor
  const int64_t state_off = e * v.rows * p.n;                    // elements into our state
  auto f = [](const std::vector<float>& vec, int64_t off) {
    return vec.empty() ? nullptr : const_cast<float*>(vec.data()) + off;
  };
  if (AliasesModel(p)) {
    v.w = static_cast<float*>(p.param) + model_off;
  } else {
    v.w = f(s.master, state_off);
    v.model = static_cast<uint16_t*>(p.param) + model_off;
    v.model_dtype = Dtype::kBf16;
  }
  v.state0 = f(s.state0, state_off);
  v.state1 = f(s.state1, state_off);
  v.row = {f(s.row_raw, e * v.rows), f(s.row_m, e * v.rows), f(s.row_v, e * v.rows)};
  v.col = {f(s.col_raw, e * p.n), f(s.col_m, e * p.n), f(s.col_v, e * p.n)};
  v.scalar = {f(s.scalar_raw, e), f(s.scalar_m, e), f(s.scalar_v, e)};
  v.radius = f(s.radius, e * s.slices);
  if (p.grad != nullptr) {
    v.grad = static_cast<const char*>(p.grad) + model_off * static_cast<int64_t>(p.grad_elem_bytes());
  }
  v.grad_dtype = p.grad_dtype;
  return v;
}

absl::Status FastEngine::ReduceCrossRow(const kernels::UpdateRule& r, fast::Partials* p) {
  if (comm_->size() == 1) return absl::OkStatus();
  fast::PackCrossRow(r, *p, &cross_);
  if (absl::Status s = AllReduceSum(*comm_, absl::MakeSpan(cross_)); !s.ok()) return s;
  fast::UnpackCrossRow(r, cross_.data(), p);
  return absl::OkStatus();
}

absl::Status FastEngine::Init() {
  if (comm_->size() != 1) {
    return absl::UnimplementedError("the fast engine runs Newton-Schulz on whole matrices and "
                                    "needs a one-rank communicator in this build");
  }
  st_.assign(params_.size(), FastParamState{});
  int64_t x_elems = 0;
  // Every buffer a step uses is sized here, before anything is written: a step allocates
  // nothing, and running out of memory surfaces from finalize with the optimizer unchanged.
  int64_t max_rows = 1, max_n = 1, max_cross = 1;
  for (const ParamEntry& p : params_) {
    const int64_t rows = OwnedRows(p.m, comm_->rank(), comm_->size()).rows();
    max_rows = std::max(max_rows, rows);
    max_n = std::max(max_n, p.n);
    max_cross = std::max(max_cross, p.n + 1 + std::max(rows, p.n));
  }
  scratch_.Reserve(max_rows, max_n);
  fast::ReservePartials(max_rows, max_n, &partials_);
  cross_.reserve(static_cast<size_t>(max_cross));
  // Phase A: allocate and check every slice; the model tensors are not written.
  std::vector<std::vector<fast::Partials>> norms(params_.size());
  for (size_t i = 0; i < params_.size(); ++i) {
    const ParamEntry& p = params_[i];
    const kernels::UpdateRule& r = p.rule;
    FastParamState& s = st_[i];
    s.rows = OwnedRows(p.m, comm_->rank(), comm_->size());
    const int64_t rows = s.rows.rows();
    const size_t numel = static_cast<size_t>(p.experts * rows * p.n);
    if (!AliasesModel(p)) {
      s.master.resize(numel);
      const uint16_t* src = static_cast<const uint16_t*>(p.param);
      for (int64_t e = 0; e < p.experts; ++e)
        for (int64_t q = 0; q < rows * p.n; ++q)
          s.master[e * rows * p.n + q] =
              kernels::Bf16ToFloat(src[e * p.m * p.n + s.rows.begin * p.n + q]);
    }
    s.state0.assign(numel, 0.0f);  // muon momentum | adam exp_avg
    if (r.base == Base::kMuon) {
      x_elems = std::max(x_elems, rows * p.n);
    } else {
      s.state1.assign(numel, 0.0f);
    }
    const float one = static_cast<float>(kernels::GainRawForOne(r.gain_param));
    auto gains = [&](bool has, int64_t count, std::vector<float>* raw, std::vector<float>* m1,
                     std::vector<float>* m2) {
      if (!has) return;
      raw->assign(static_cast<size_t>(count), one);
      m1->assign(static_cast<size_t>(count), 0.0f);
      m2->assign(static_cast<size_t>(count), 0.0f);
    };
    gains(kernels::HasRowGains(r.gains), p.experts * rows, &s.row_raw, &s.row_m, &s.row_v);
    gains(kernels::HasColGains(r.gains), p.experts * p.n, &s.col_raw, &s.col_m, &s.col_v);
    gains(kernels::HasScalarGain(r.gains), p.experts, &s.scalar_raw, &s.scalar_m, &s.scalar_v);
    s.slices = r.sphere == Sphere::kRow ? rows : kernels::SphereSlices(r.sphere, p.m, p.n);
    s.radius.assign(static_cast<size_t>(p.experts * s.slices), 0.0f);

    norms[i].resize(static_cast<size_t>(p.experts));
    if (r.sphere == Sphere::kNone) continue;
    for (int64_t e = 0; e < p.experts; ++e) {
      const fast::MatrixView v = View(static_cast<int64_t>(i), e);
      fast::Partials& np = norms[i][e];
      fast::ResetPartials(r, v, &np);
      fast::SliceSquares(r, v, &np, &scratch_);
      if (absl::Status st = ReduceCrossRow(r, &np); !st.ok()) return st;
      for (int64_t k = 0; k < static_cast<int64_t>(np.slice_sq.size()); ++k) {
        const double sq = np.slice_sq[k];
        if (!(sq > 0.0) || !std::isfinite(sq)) {
          const int64_t slice = r.sphere == Sphere::kRow ? s.rows.begin + k : k;
          return absl::InvalidArgumentError(ZeroSliceMessage(p, e, slice));
        }
        double radius = r.radius_value;
        if (r.radius_mode == RadiusMode::kAuto) radius = kernels::AutoRadius(r.sphere, p.m, p.n);
        if (r.radius_mode == RadiusMode::kInit) radius = std::sqrt(sq);
        s.radius[e * s.slices + k] = static_cast<float>(radius);
      }
    }
  }
  x_.assign(static_cast<size_t>(x_elems), 0.0f);
  // Newton-Schulz buffers for every Muon shape (the largest matrix need not have the largest
  // Gram side), and the bf16 path's GEMM plans, made here rather than in the first step.
  for (const ParamEntry& p : params_) {
    if (p.rule.base != Base::kMuon) continue;
    if (ns_bf16_) {
      ns_bf16_ws_.Reserve(p.m, p.n);
    } else {
      ns_.Reserve(p.m, p.n);
    }
  }

  // Phase B: project onto the spheres and write the model tensors.
  for (size_t i = 0; i < params_.size(); ++i) {
    const ParamEntry& p = params_[i];
    if (p.rule.sphere == Sphere::kNone || p.preserve_init) continue;
    for (int64_t e = 0; e < p.experts; ++e) {
      fast::Finish(p.rule, View(static_cast<int64_t>(i), e), norms[i][e], &scratch_);
    }
  }
  return absl::OkStatus();
}

double FastEngine::GradSumSq(int64_t index) {
  const ParamEntry& p = params_[index];
  double total = 0.0;
  for (int64_t e = 0; e < p.experts; ++e) total += fast::GradSumSq(View(index, e), &scratch_);
  return total;
}

absl::Status FastEngine::Step(double lr_scale, int64_t t) {
  for (size_t i = 0; i < params_.size(); ++i) {
    const ParamEntry& p = params_[i];
    const kernels::UpdateRule& r = p.rule;
    fast::StepScalars sc;
    sc.lr = r.lr * lr_scale;
    sc.gain_lr = r.gain_lr * lr_scale;
    sc.t = t;
    for (int64_t e = 0; e < p.experts; ++e) {
      const fast::MatrixView v = View(static_cast<int64_t>(i), e);
      fast::ResetPartials(r, v, &partials_);
      if (r.tangent && r.sphere != Sphere::kNone) {
        fast::RadialDots(r, v, &partials_, &scratch_);
        if (r.sphere != Sphere::kRow && comm_->size() > 1) {
          if (absl::Status s = AllReduceSum(*comm_, absl::MakeSpan(partials_.radial_dot)); !s.ok()) return s;
          if (absl::Status s = AllReduceSum(*comm_, absl::MakeSpan(partials_.radial_dd)); !s.ok()) return s;
        }
      }
      if (r.base == Base::kMuon) {
        fast::Pass1(r, v, sc, x_.data(), &partials_, &scratch_);
        const float* o =
            ns_bf16_ ? ns_bf16_ws_.Run(r.ns_coeffs, r.ns_steps, p.m, p.n, x_.data())
                     : fast::NewtonSchulz(r.ns_coeffs, r.ns_steps, p.m, p.n, x_.data(), &ns_);
        fast::Pass2(r, v, sc, o, &partials_, &scratch_);
      } else {
        fast::Pass1(r, v, sc, nullptr, &partials_, &scratch_);
      }
      if (absl::Status s = ReduceCrossRow(r, &partials_); !s.ok()) return s;
      fast::StepGains(r, v, sc, partials_);
      fast::Finish(r, v, partials_, &scratch_);
    }
  }
  return absl::OkStatus();
}

std::vector<StateArray> FastEngine::State(int64_t index, int64_t e) {
  const ParamEntry& p = params_[index];
  FastParamState& s = st_[index];
  const int64_t rows = s.rows.rows();
  std::vector<StateArray> out;
  auto add = [&](const char* name, std::vector<float>& vec, int64_t per_expert) {
    if (vec.empty()) return;
    out.push_back({name, vec.data() + e * per_expert, per_expert, 4, false});
  };
  if (AliasesModel(p)) {
    out.push_back({"master", static_cast<float*>(p.param) + e * p.m * p.n + s.rows.begin * p.n,
                   rows * p.n, 4, true});
  } else {
    add("master", s.master, rows * p.n);
  }
  const bool muon = p.rule.base == Base::kMuon;
  add(muon ? "momentum" : "exp_avg", s.state0, rows * p.n);
  add("exp_avg_sq", s.state1, rows * p.n);
  add("row_raw", s.row_raw, rows);
  add("row_exp_avg", s.row_m, rows);
  add("row_exp_avg_sq", s.row_v, rows);
  add("col_raw", s.col_raw, p.n);
  add("col_exp_avg", s.col_m, p.n);
  add("col_exp_avg_sq", s.col_v, p.n);
  add("scalar_raw", s.scalar_raw, 1);
  add("scalar_exp_avg", s.scalar_m, 1);
  add("scalar_exp_avg_sq", s.scalar_v, 1);
  add("radius", s.radius, s.slices);
  return out;
}

void FastEngine::WriteModels() {
  for (size_t i = 0; i < params_.size(); ++i)
    for (int64_t e = 0; e < params_[i].experts; ++e)
      fast::WriteModel(View(static_cast<int64_t>(i), e));
}

}  // namespace

std::string ZeroSliceMessage(const ParamEntry& p, int64_t expert, int64_t slice) {
  const char* kind = p.rule.sphere == Sphere::kRow   ? "row"
                     : p.rule.sphere == Sphere::kCol ? "column"
                                                     : "matrix";
  std::string where = p.experts > 1 ? absl::StrCat(" of expert ", expert) : "";
  if (p.rule.sphere == Sphere::kFrobenius) {
    return absl::StrCat("param '", p.name, "': the ", kind, where,
                        " has zero or non-finite norm and cannot be put on its sphere");
  }
  return absl::StrCat("param '", p.name, "': ", kind, " ", slice, where,
                      " has zero or non-finite norm and cannot be put on its sphere");
}

std::unique_ptr<Engine> MakeFastEngine(const std::vector<ParamEntry>* params, Communicator* comm,
                                       bool ns_bf16) {
  return std::make_unique<FastEngine>(params, comm, ns_bf16);
}

}  // namespace mdopt
