#include "dist_opt/optimizer.h"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "dist_opt/checkpoint.h"
#include "kernels/cpu/gain_param.h"
#include "kernels/cpu/newton_schulz_bf16.h"

namespace mdopt {
namespace {

// Sets the OpenMP thread count of the calling thread for one call and restores it after,
// so that the host program's own setting is left alone. OpenBLAS (OpenMP build) follows it.
class ThreadsGuard {
 public:
  explicit ThreadsGuard(int threads) : active_(threads > 0) {
    if (active_) {
      previous_ = omp_get_max_threads();
      omp_set_num_threads(threads);
    }
  }
  ~ThreadsGuard() {
    if (active_) omp_set_num_threads(previous_);
  }
  ThreadsGuard(const ThreadsGuard&) = delete;
  ThreadsGuard& operator=(const ThreadsGuard&) = delete;

 private:
  bool active_;
  int previous_ = 0;
};

const StateArray* FindArray(const std::vector<StateArray>& arrays, absl::string_view name) {
  for (const StateArray& a : arrays)
    if (a.name == name) return &a;
  return nullptr;
}

}  // namespace

absl::StatusOr<OptimizerOptions> ParseOptimizerOptions(absl::string_view options) {
  OptimizerOptions o;
  std::vector<absl::string_view> seen;
  for (absl::string_view tok : absl::StrSplit(options, absl::ByAnyChar(" \t\n"), absl::SkipEmpty())) {
    const size_t eq = tok.find('=');
    if (eq == absl::string_view::npos) {
      return absl::InvalidArgumentError(absl::StrCat("option '", tok, "' is not key=value"));
    }
    const absl::string_view key = tok.substr(0, eq), value = tok.substr(eq + 1);
    if (std::find(seen.begin(), seen.end(), key) != seen.end()) {
      return absl::InvalidArgumentError(absl::StrCat("option '", key, "' is given twice"));
    }
    seen.push_back(key);
    if (key == "device") {
      if (value == "cpu") continue;
      int device;
      absl::string_view ordinal = value;
      if (absl::ConsumePrefix(&ordinal, "cuda:") && absl::SimpleAtoi(ordinal, &device) &&
          device >= 0) {
        return absl::UnimplementedError(absl::StrCat(
            "option device=cuda:", device, ": this build of mdopt has no CUDA backend"));
      }
      return absl::InvalidArgumentError(
          absl::StrCat("option 'device': bad value '", value, "' (cpu or cuda:K)"));
    } else if (key == "threads") {
      if (!absl::SimpleAtoi(value, &o.threads) || o.threads < 1 || o.threads > 4096) {
        return absl::InvalidArgumentError(
            absl::StrCat("option 'threads': bad value '", value, "' (an integer in [1, 4096])"));
      }
    } else if (key == "kernels") {
      if (value == "fast") {
        o.kernels = OptimizerOptions::Kernels::kFast;
      } else if (value == "reference") {
        o.kernels = OptimizerOptions::Kernels::kReference;
      } else {
        return absl::InvalidArgumentError(
            absl::StrCat("option 'kernels': bad value '", value, "' (fast or reference)"));
      }
    } else if (key == "ns_dtype") {
      if (value == "f32") {
        o.ns_bf16 = false;
      } else if (value == "bf16") {
        if (!kernels::fast::Bf16NewtonSchulz::Available()) {
#ifdef MDOPT_BUILT_WITH_DNNL
          return absl::UnimplementedError(
              "option ns_dtype=bf16: this CPU has no bf16 matmul (needs AVX512_BF16 or AMX)");
#else
          return absl::UnimplementedError(
              "option ns_dtype=bf16: this build has no oneDNN (install libdnnl-dev and rebuild)");
#endif
        }
        o.ns_bf16 = true;
      } else {
        return absl::InvalidArgumentError(
            absl::StrCat("option 'ns_dtype': bad value '", value, "' (f32 or bf16)"));
      }
    } else {
      return absl::InvalidArgumentError(absl::StrCat(
          "option '", key, "' is unknown (known: device, threads, kernels, ns_dtype)"));
    }
  }
  return o;
}

Optimizer::Optimizer(Communicator* comm, OptimizerOptions options)
    : comm_(comm), options_(options) {}

absl::Status Optimizer::RequireFinalized(const char* call) const {
  if (engine_ == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat(call, " before mdopt_finalize"));
  }
  return absl::OkStatus();
}

absl::Status Optimizer::AddGroup(const std::string& name, absl::string_view spec) {
  if (engine_ != nullptr) {
    return absl::FailedPreconditionError("mdopt_add_group after mdopt_finalize");
  }
  if (absl::Status s = ValidateName("group", name); !s.ok()) return s;
  for (const Group& g : groups_)
    if (g.name == name) return absl::InvalidArgumentError(absl::StrCat("group '", name, "' already exists"));
  absl::StatusOr<GroupSpec> parsed = ParseGroupSpec(spec);
  if (!parsed.ok()) {
    return absl::Status(parsed.status().code(),
                        absl::StrCat("group '", name, "': ", parsed.status().message()));
  }
  groups_.push_back({name, *std::move(parsed)});
  return absl::OkStatus();
}

absl::StatusOr<int64_t> Optimizer::AddParam(const ParamDescription& d) {
  if (engine_ != nullptr) {
    return absl::FailedPreconditionError("mdopt_add_param after mdopt_finalize");
  }
  return registry_.Add(d, groups_);
}

absl::Status Optimizer::SetPointers(int64_t index, void* param, const void* grad) {
  return registry_.SetPointers(index, param, grad);
}

absl::Status Optimizer::Finalize() {
  if (engine_ != nullptr) return absl::FailedPreconditionError("mdopt_finalize was already called");
  if (registry_.size() == 0) {
    return absl::FailedPreconditionError("mdopt_finalize with no parameters added");
  }
  ThreadsGuard threads(options_.threads);
  std::unique_ptr<Engine> engine =
      options_.kernels == OptimizerOptions::Kernels::kFast
          ? MakeFastEngine(&registry_.params(), comm_, options_.ns_bf16)
          : MakeReferenceEngine(&registry_.params(), comm_);
  if (absl::Status s = engine->Init(); !s.ok()) return s;
  engine_ = std::move(engine);
  return absl::OkStatus();
}

absl::StatusOr<StepResult> Optimizer::Step(double lr_scale, void* stream) {
  if (absl::Status s = RequireFinalized("mdopt_step"); !s.ok()) return s;
  if (!std::isfinite(lr_scale) || lr_scale < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("lr_scale = ", lr_scale, " must be finite and >= 0"));
  }
  if (stream != nullptr) {
    return absl::InvalidArgumentError("stream must be NULL with device=cpu");
  }
  const std::vector<ParamEntry>& params = registry_.params();
  for (const ParamEntry& p : params) {
    if (p.grad == nullptr) {
      return absl::FailedPreconditionError(absl::StrCat(
          "param '", p.name, "' has no gradient buffer (give one to mdopt_set_pointers)"));
    }
  }
  const auto t0 = std::chrono::steady_clock::now();
  ThreadsGuard threads(options_.threads);

  // The finite check: one sum of squares per param, summed over ranks so that every rank
  // sees the same verdict and skips the same steps.
  std::vector<double> sumsq(params.size());
  for (size_t i = 0; i < params.size(); ++i) sumsq[i] = engine_->GradSumSq(static_cast<int64_t>(i));
  if (absl::Status s = comm_->AllReduceSum(absl::MakeSpan(sumsq)); !s.ok()) return s;
  StepResult r;
  double total = 0.0;
  for (size_t i = 0; i < params.size(); ++i) {
    total += sumsq[i];
    if (!std::isfinite(sumsq[i]) && r.skip_reason.empty()) {
      r.skip_reason = absl::StrCat("step skipped: the gradient of param '", params[i].name,
                                   "' holds NaN or Inf; no state changed");
    }
  }
  r.grad_norm = std::sqrt(total);
  r.skipped = !r.skip_reason.empty();
  if (!r.skipped) {
    if (absl::Status s = engine_->Step(lr_scale, step_ + 1); !s.ok()) return s;
    ++step_;
  }
  r.step = step_;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  r.exposed_comm_seconds = 0.0;  // one rank: nothing to hide
  return r;
}

absl::Status Optimizer::Save(const std::string& dir) {
  if (absl::Status s = RequireFinalized("mdopt_save"); !s.ok()) return s;
  CheckpointLayout layout{engine_->name(), comm_->size(), step_, &groups_, &registry_.params()};
  return SaveCheckpoint(dir, layout, engine_.get(), comm_);
}

absl::Status Optimizer::Load(const std::string& dir) {
  if (absl::Status s = RequireFinalized("mdopt_load"); !s.ok()) return s;
  ThreadsGuard threads(options_.threads);
  CheckpointLayout layout{engine_->name(), comm_->size(), step_, &groups_, &registry_.params()};
  int64_t step = 0;
  if (absl::Status s = LoadCheckpoint(dir, layout, engine_.get(), comm_, &step); !s.ok()) return s;
  step_ = step;
  return absl::OkStatus();
}

absl::StatusOr<int64_t> Optimizer::StateBytes() const {
  if (absl::Status s = RequireFinalized("mdopt_state_bytes"); !s.ok()) return s;
  int64_t bytes = 0;
  for (int64_t i = 0; i < registry_.size(); ++i)
    for (int64_t e = 0; e < registry_.params()[i].experts; ++e)
      for (const StateArray& a : engine_->State(i, e))
        if (!a.is_model) bytes += a.bytes();
  return bytes;
}

absl::StatusOr<int64_t> Optimizer::WorkspaceBytes() const {
  if (absl::Status s = RequireFinalized("mdopt_workspace_bytes"); !s.ok()) return s;
  return engine_->WorkspaceBytes();
}

absl::StatusOr<std::vector<double>> Optimizer::GetState(int64_t index,
                                                        absl::string_view field) const {
  if (absl::Status s = RequireFinalized("mdopt_get_state"); !s.ok()) return s;
  if (index < 0 || index >= registry_.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("param index ", index, " is out of range [0, ", registry_.size(), ")"));
  }
  const ParamEntry& p = registry_.params()[index];
  const kernels::UpdateRule& r = p.rule;
  auto missing = [&](const char* what) {
    return absl::InvalidArgumentError(absl::StrCat("param '", p.name, "' has no ", what,
                                                   " (group '", groups_[p.group].name, "')"));
  };
  const bool known = field == "master" || field == "direction" || field == "gain_row" ||
                     field == "gain_col" || field == "gain_scalar" || field == "radius";
  if (!known) {
    return absl::InvalidArgumentError(absl::StrCat(
        "field '", field,
        "' is unknown (master, direction, gain_row, gain_col, gain_scalar, radius)"));
  }
  if (field == "gain_row" && !kernels::HasRowGains(r.gains)) return missing("row gains");
  if (field == "gain_col" && !kernels::HasColGains(r.gains)) return missing("column gains");
  if (field == "gain_scalar" && !kernels::HasScalarGain(r.gains)) return missing("scalar gain");
  if (field == "radius" && r.sphere == kernels::Sphere::kNone) return missing("sphere");

  auto gains = [&](const StateArray* raw, int64_t k) {
    return raw == nullptr ? 1.0 : kernels::GainValue<double>(r.gain_param, raw->Get(k));
  };
  std::vector<double> out;
  for (int64_t e = 0; e < p.experts; ++e) {
    const std::vector<StateArray> arrays = engine_->State(index, e);
    const StateArray* master = FindArray(arrays, "master");
    const StateArray* row = FindArray(arrays, "row_raw");
    const StateArray* col = FindArray(arrays, "col_raw");
    const StateArray* scalar = FindArray(arrays, "scalar_raw");
    if (field == "master" || field == "direction") {
      for (int64_t i = 0; i < p.m; ++i) {
        for (int64_t j = 0; j < p.n; ++j) {
          double w = master->Get(i * p.n + j);
          if (field == "direction") w /= gains(scalar, 0) * gains(row, i) * gains(col, j);
          out.push_back(w);
        }
      }
    } else if (field == "gain_row") {
      for (int64_t i = 0; i < p.m; ++i) out.push_back(gains(row, i));
    } else if (field == "gain_col") {
      for (int64_t j = 0; j < p.n; ++j) out.push_back(gains(col, j));
    } else if (field == "gain_scalar") {
      out.push_back(gains(scalar, 0));
    } else {
      const StateArray* radius = FindArray(arrays, "radius");
      for (int64_t k = 0; k < radius->count; ++k) out.push_back(radius->Get(k));
    }
  }
  return out;
}

}  // namespace mdopt
