// The float64 engine: kernels/reference/reference.h on whole matrices, one plain pass per step of
// the math. It is the oracle the fast engine is tested against and the baseline mdopt-bench
// reports ratios to. One rank only: it never shards.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <iterator>
#include <vector>

#include "absl/strings/str_cat.h"
#include "dist_opt/engine.h"
#include "kernels/common/bf16.h"
#include "kernels/reference/reference.h"

namespace mdopt {
namespace {

namespace ref = kernels::ref;

class ReferenceEngine final : public Engine {
 public:
  ReferenceEngine(const std::vector<ParamEntry>* params, const std::vector<Group>* groups,
                  Communicator* comm)
      : params_(*params), groups_(*groups), comm_(comm) {}

  absl::Status Init() override;
  absl::Status Step(double lr_scale, void* stream) override;
  absl::Status CheckStream(void* stream) const override {
    if (stream != nullptr) return absl::InvalidArgumentError("stream must be NULL with device=cpu");
    return absl::OkStatus();
  }
  absl::Status Outcome(StepOutcome* out) override {
    *out = outcome_;
    out->steps_taken = t_;
    return absl::OkStatus();
  }
  void SetStepsTaken(int64_t t) override { t_ = t; }
  absl::Status ReadParamSteps(int64_t* host) override {
    std::copy(param_t_.begin(), param_t_.end(), host);
    return absl::OkStatus();
  }
  absl::Status WriteParamSteps(const int64_t* host) override {
    std::copy(host, host + param_t_.size(), param_t_.begin());
    return absl::OkStatus();
  }
  std::vector<StateArray> State(int64_t index, int64_t expert) override;
  absl::Status ReadState(int64_t index, int64_t expert, size_t array, int64_t first, int64_t count,
                         void* host) override;
  absl::Status WriteState(int64_t index, int64_t expert, size_t array, const void* host) override;
  absl::Status WriteModels() override;
  absl::Status GradsReady(int64_t, int64_t, void*) override { return absl::OkStatus(); }
  absl::Status GatherParams(void*) override { return absl::OkStatus(); }
  int64_t WorkspaceBytes() const override { return 0; }
  void LastStep(int group, int64_t counts[4], std::vector<double>* norms) const override;
  const char* name() const override { return "reference"; }
  const ShardPlan* plan() const override { return &plan_; }

 private:
  // Element q of expert e of a param's tensor (model or gradient) as double.
  static double Load(const void* base, Dtype dt, int64_t q) {
    return dt == Dtype::kF32 ? static_cast<const float*>(base)[q]
                             : kernels::Bf16ToFloat(static_cast<const uint16_t*>(base)[q]);
  }
  // Element q of a param in block order -> its index in the tensor (kernels/common/row_map.h).
  static int64_t At(const ParamEntry& p, int64_t q) { return p.row_map.TensorElement(q, p.n); }
  void WriteModel(int64_t index, int64_t expert);
  double GradSumSq(int64_t index) const;
  // The non-empty state arrays of a matrix, in State's order.
  std::vector<std::vector<double>*> Arrays(int64_t index, int64_t expert);

  const std::vector<ParamEntry>& params_;
  const std::vector<Group>& groups_;
  Communicator* comm_;
  ShardPlan plan_;
  std::vector<std::vector<ref::MatrixState>> st_;  // [param][expert]
  std::vector<double> g_;                          // gradient of one matrix, as double
  std::vector<uint8_t> skipped_;  // per param: no gradient at the last step (sized at Init)
  std::vector<int64_t> param_t_;  // per param: the steps it took, its bias-correction count
  StepOutcome outcome_;
  int64_t t_ = 0;
};

absl::Status ReferenceEngine::Init() {
  if (comm_->size() != 1) {
    return absl::UnimplementedError("kernels=reference runs on one rank only");
  }
  std::vector<std::vector<ref::MatrixState>> st(params_.size());
  std::vector<double> w0;
  for (size_t i = 0; i < params_.size(); ++i) {
    const ParamEntry& p = params_[i];
    st[i].resize(static_cast<size_t>(p.experts));
    for (int64_t e = 0; e < p.experts; ++e) {
      const int64_t mn = p.SlotM(e) * p.n, off = p.SlotRow0(e) * p.n;
      w0.resize(static_cast<size_t>(mn));
      for (int64_t q = 0; q < mn; ++q) w0[q] = Load(p.param, p.param_dtype, At(p, off + q));
      const int64_t bad = ref::Init(p.rule, p.SlotM(e), p.n, w0.data(), !p.preserve_init, &st[i][e]);
      if (bad >= 0) return absl::InvalidArgumentError(ZeroSliceMessage(p, e, bad));
    }
  }
  st_ = std::move(st);
  skipped_.assign(params_.size(), 0);
  param_t_.assign(params_.size(), 0);
  plan_ = BuildShardPlan(params_, groups_, PlanOptions{});
  return WriteModels();
}

double ReferenceEngine::GradSumSq(int64_t index) const {
  const ParamEntry& p = params_[index];
  double total = 0.0;
  if (p.grad == nullptr) return total;  // no gradient: skipped, counts nothing
  for (int64_t q = 0; q < p.numel(); ++q) {
    const double g = Load(p.grad, p.grad_dtype, q);
    total += g * g;
  }
  return total;
}

absl::Status ReferenceEngine::Step(double lr_scale, void*) {
  // The finite check first: a NaN/Inf anywhere skips the whole step.
  outcome_ = StepOutcome{};
  double total = 0.0;
  for (size_t i = 0; i < params_.size(); ++i) {
    const double sq = GradSumSq(static_cast<int64_t>(i));
    total += sq;
    if (!std::isfinite(sq) && !outcome_.skipped) {
      outcome_.skipped = true;
      outcome_.bad_param = static_cast<int64_t>(i);
    }
  }
  outcome_.grad_norm = std::sqrt(total);
  if (outcome_.skipped) return absl::OkStatus();
  ++t_;
  for (size_t i = 0; i < params_.size(); ++i) {
    const ParamEntry& p = params_[i];
    // A NULL gradient: the param has none this step and is left as it was, state and step
    // count included; a param that has one is bias-corrected with its own count.
    skipped_[i] = p.grad == nullptr;
    if (skipped_[i]) continue;
    const int64_t t = ++param_t_[i];
    const int64_t mn = p.matrix_m * p.n;  // one matrix, every block
    // A matrix of K row blocks (blocks=) is K matrices here that share its column and
    // scalar gains: each keeps a copy, stepped with the gradient summed over the K blocks
    // (each block's taken before any block steps).
    const int64_t K = std::max<int64_t>(1, p.blocks);
    const bool share = K > 1 && (kernels::HasColGains(p.rule.gains) ||
                                 kernels::HasScalarGain(p.rule.gains));
    g_.resize(static_cast<size_t>(mn));
    for (int64_t e0 = 0; e0 < p.experts; e0 += K) {
      const int64_t base = (e0 / K) * mn;
      for (int64_t q = 0; q < mn; ++q) g_[q] = Load(p.grad, p.grad_dtype, At(p, base + q));
      auto block = [&](int64_t k) { return g_.data() + p.block_row0[static_cast<size_t>(k)] * p.n; };
      ref::ColScalarGrads sum;
      if (share) {
        for (int64_t k = 0; k < K; ++k) {
          const ref::ColScalarGrads b = ref::ColScalarGradients(p.rule, block(k), st_[i][e0 + k]);
          if (k == 0) {
            sum = b;
            continue;
          }
          for (size_t j = 0; j < sum.col.size(); ++j) sum.col[j] += b.col[j];
          sum.scalar += b.scalar;
        }
      }
      for (int64_t k = 0; k < K; ++k) {
        ref::Step(p.rule, block(k), p.rule.lr * lr_scale, p.rule.gain_lr * lr_scale, t,
                  &st_[i][e0 + k], share ? &sum : nullptr);
        WriteModel(static_cast<int64_t>(i), e0 + k);
      }
    }
  }
  return absl::OkStatus();
}

void ReferenceEngine::WriteModel(int64_t index, int64_t e) {
  const ParamEntry& p = params_[index];
  const std::vector<double>& w = st_[index][e].w;
  const int64_t off = p.SlotRow0(e) * p.n;
  for (size_t q = 0; q < w.size(); ++q) {
    const float f = static_cast<float>(w[q]);
    const int64_t at = At(p, off + static_cast<int64_t>(q));
    if (p.param_dtype == Dtype::kF32) {
      static_cast<float*>(p.param)[at] = f;
    } else {
      static_cast<uint16_t*>(p.param)[at] = kernels::FloatToBf16(f);
    }
  }
}

absl::Status ReferenceEngine::WriteModels() {
  for (size_t i = 0; i < params_.size(); ++i)
    for (int64_t e = 0; e < params_[i].experts; ++e) WriteModel(static_cast<int64_t>(i), e);
  return absl::OkStatus();
}

std::vector<std::vector<double>*> ReferenceEngine::Arrays(int64_t index, int64_t e) {
  ref::MatrixState& s = st_[index][e];
  std::vector<std::vector<double>*> out;
  for (std::vector<double>* v : {&s.w, &s.momentum, &s.exp_avg, &s.exp_avg_sq, &s.row.raw,
                                 &s.row.exp_avg, &s.row.exp_avg_sq, &s.col.raw, &s.col.exp_avg,
                                 &s.col.exp_avg_sq, &s.scalar.raw, &s.scalar.exp_avg,
                                 &s.scalar.exp_avg_sq, &s.radius}) {
    if (!v->empty()) out.push_back(v);
  }
  return out;
}

std::vector<StateArray> ReferenceEngine::State(int64_t index, int64_t e) {
  static const char* const kNames[] = {
      "master",     "momentum",    "exp_avg",        "exp_avg_sq",        "row_raw",
      "row_exp_avg", "row_exp_avg_sq", "col_raw",   "col_exp_avg",       "col_exp_avg_sq",
      "scalar_raw", "scalar_exp_avg", "scalar_exp_avg_sq", "radius"};
  ref::MatrixState& s = st_[index][e];
  const std::vector<double>* all[] = {&s.w, &s.momentum, &s.exp_avg, &s.exp_avg_sq, &s.row.raw,
                                      &s.row.exp_avg, &s.row.exp_avg_sq, &s.col.raw, &s.col.exp_avg,
                                      &s.col.exp_avg_sq, &s.scalar.raw, &s.scalar.exp_avg,
                                      &s.scalar.exp_avg_sq, &s.radius};
  std::vector<StateArray> out;
  for (size_t k = 0; k < std::size(all); ++k) {
    if (!all[k]->empty()) out.push_back({kNames[k], static_cast<int64_t>(all[k]->size()), 8, false});
  }
  return out;
}

absl::Status ReferenceEngine::ReadState(int64_t index, int64_t e, size_t array, int64_t first,
                                        int64_t count, void* host) {
  const std::vector<std::vector<double>*> arrays = Arrays(index, e);
  if (array >= arrays.size() || first < 0 || count < 0 ||
      first + count > static_cast<int64_t>(arrays[array]->size())) {
    return absl::InvalidArgumentError(absl::StrCat("state array ", array, " of param ", index,
                                                   ": elements out of range"));
  }
  std::memcpy(host, arrays[array]->data() + first, static_cast<size_t>(count) * sizeof(double));
  return absl::OkStatus();
}

absl::Status ReferenceEngine::WriteState(int64_t index, int64_t e, size_t array, const void* host) {
  const std::vector<std::vector<double>*> arrays = Arrays(index, e);
  if (array >= arrays.size()) {
    return absl::InvalidArgumentError(absl::StrCat("param ", index, " has no state array ", array));
  }
  std::memcpy(arrays[array]->data(), host, arrays[array]->size() * sizeof(double));
  return absl::OkStatus();
}

void ReferenceEngine::LastStep(int group, int64_t counts[4], std::vector<double>* norms) const {
  // One rank, whole matrices: every matrix of the group took the step its rule describes,
  // unless its param had no gradient.
  counts[0] = counts[1] = counts[2] = counts[3] = 0;
  norms->clear();
  for (size_t i = 0; i < params_.size(); ++i) {
    const ParamEntry& p = params_[i];
    if (p.group != group) continue;
    const bool skipped = skipped_[i] != 0;
    for (int64_t e = 0; e < p.experts; ++e) norms->insert(norms->end(), {0.0, 0.0, skipped ? 1.0 : 0.0});
    if (skipped) {
      counts[3] += p.experts;
      continue;
    }
    counts[0] += p.rule.base == kernels::Base::kMuon ? p.experts : 0;
    counts[1] += p.rule.sphere != kernels::Sphere::kNone ? p.experts : 0;
    counts[2] += p.rule.gains != kernels::Gains::kNone ? p.experts : 0;
  }
}

}  // namespace

std::unique_ptr<Engine> MakeReferenceEngine(const std::vector<ParamEntry>* params,
                                            const std::vector<Group>* groups,
                                            Communicator* comm) {
  return std::make_unique<ReferenceEngine>(params, groups, comm);
}

}  // namespace mdopt
