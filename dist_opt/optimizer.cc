#include "dist_opt/optimizer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <new>
#include <tuple>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "comm/communicator.h"
#include "comm/host_staged_communicator.h"
#include "dist_opt/checkpoint.h"
#include "kernels/backend_factory.h"
#include "kernels/common/gain_param.h"

namespace mdopt {
namespace {

// Brackets one public call with the engine's Enter/Leave (a CPU backend sets its thread
// count for the call and restores the caller's after it).
class EngineScope {
 public:
  explicit EngineScope(Engine* engine) : engine_(engine) {
    if (engine_ != nullptr) engine_->Enter();
  }
  ~EngineScope() {
    if (engine_ != nullptr) engine_->Leave();
  }
  EngineScope(const EngineScope&) = delete;
  EngineScope& operator=(const EngineScope&) = delete;

 private:
  Engine* engine_;
};

// Array `name` of a matrix's state, read through the engine (which stages a device's
// memory), as doubles; empty when the matrix has no such array here.
absl::Status ReadArray(Engine& engine, int64_t index, int64_t expert,
                       const std::vector<StateArray>& arrays, absl::string_view name,
                       std::vector<double>* out) {
  out->clear();
  for (size_t k = 0; k < arrays.size(); ++k) {
    const StateArray& a = arrays[k];
    if (a.name != name) continue;
    out->resize(static_cast<size_t>(a.count));
    if (a.elem_size == 8) return engine.ReadState(index, expert, k, 0, a.count, out->data());
    std::vector<float> f(static_cast<size_t>(a.count));
    if (absl::Status s = engine.ReadState(index, expert, k, 0, a.count, f.data()); !s.ok()) return s;
    std::copy(f.begin(), f.end(), out->begin());
    return absl::OkStatus();
  }
  return absl::OkStatus();
}

// Runs body, turning a failed allocation into ResourceExhausted (MDOPT_OUT_OF_MEMORY). The
// calls wrapped here allocate only before they change anything, so the optimizer is as it
// was when this returns the error.
template <typename F>
absl::Status CatchOutOfMemory(const char* call, F&& body) {
  try {
    return body();
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(
        absl::StrCat(call, ": out of memory; the optimizer is unchanged"));
  }
}

// The message of a skipped step, around the param's name.
constexpr char kSkipPrefix[] = "step skipped: the gradient of param '";
constexpr char kSkipSuffix[] = "' holds NaN or Inf; no state changed";

}  // namespace

Optimizer::Optimizer(Communicator* comm, OptimizerOptions options)
    : comm_(comm), options_(options) {
  comm_->SetTimeout(absl::Seconds(options_.comm_timeout_s));
}

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
  Group g{name, *std::move(parsed)};
  g.spec_lr = g.spec.rule.lr;
  g.spec_gain_lr = g.spec.rule.gain_lr;
  groups_.push_back(std::move(g));
  return absl::OkStatus();
}

absl::StatusOr<int> Optimizer::FindGroup(const char* call, absl::string_view name) const {
  for (size_t g = 0; g < groups_.size(); ++g)
    if (groups_[g].name == name) return static_cast<int>(g);
  return absl::InvalidArgumentError(absl::StrCat(call, ": group '", name, "' was not added"));
}

absl::Status Optimizer::SetGroupLr(absl::string_view group, double lr) {
  absl::StatusOr<int> g = FindGroup("mdopt_set_group_lr", group);
  if (!g.ok()) return g.status();
  if (!std::isfinite(lr) || lr < 0) {
    return absl::InvalidArgumentError(absl::StrCat("mdopt_set_group_lr: group '", group,
                                                   "': lr = ", lr, " must be finite and >= 0"));
  }
  Group& G = groups_[*g];
  // gain_lr moves with lr by the same factor (the paper decays every group together); a
  // spec with lr=0 gives no factor, so its gain_lr stays as the spec set it.
  const double gain_lr = G.spec_lr > 0 ? G.spec_gain_lr * (lr / G.spec_lr) : G.spec_gain_lr;
  G.spec.rule.lr = lr;
  G.spec.rule.gain_lr = gain_lr;
  registry_.SetGroupLr(*g, lr, gain_lr);
  return absl::OkStatus();
}

absl::Status Optimizer::SetGroupHparam(absl::string_view group, absl::string_view key,
                                      double value) {
  absl::StatusOr<int> g = FindGroup("mdopt_set_group_hparam", group);
  if (!g.ok()) return g.status();
  if (key == "lr") return SetGroupLr(group, value);
  Group& G = groups_[*g];
  if (absl::Status s = SetSpecNumber(&G.spec, key, value); !s.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("mdopt_set_group_hparam: group '", group, "': ", s.message()));
  }
  registry_.SetGroupScalars(*g, G.spec.rule);
  if (engine_ != nullptr) engine_->RulesChanged();
  return absl::OkStatus();
}

absl::Status Optimizer::GetGroupHparam(absl::string_view group, absl::string_view key,
                                      double* value) const {
  absl::StatusOr<int> g = FindGroup("mdopt_get_group_hparam", group);
  if (!g.ok()) return g.status();
  const kernels::UpdateRule& r = groups_[*g].spec.rule;
  const double v = key == "lr" ? r.lr : key == "gain_lr" ? r.gain_lr : key == "beta1" ? r.beta1
                 : key == "beta2" ? r.beta2 : key == "eps" ? r.eps : key == "momentum" ? r.momentum
                 : key == "weight_decay" ? r.weight_decay : std::nan("");
  if (std::isnan(v)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "mdopt_get_group_hparam: key '", key,
        "' is not readable (lr, gain_lr, beta1, beta2, eps, momentum, weight_decay)"));
  }
  if (value != nullptr) *value = v;
  return absl::OkStatus();
}

absl::Status Optimizer::GetGroupLr(absl::string_view group, double* lr, double* gain_lr) const {
  absl::StatusOr<int> g = FindGroup("mdopt_get_group_lr", group);
  if (!g.ok()) return g.status();
  if (lr != nullptr) *lr = groups_[*g].spec.rule.lr;
  if (gain_lr != nullptr) *gain_lr = groups_[*g].spec.rule.gain_lr;
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
  return CatchOutOfMemory("mdopt_finalize", [&]() -> absl::Status {
    EngineOptions eo;
    eo.ns_bf16 = options_.ns_bf16;
    eo.ns_comm_bf16 = options_.ns_comm_bf16;
    eo.ns_form = options_.ns_form;
    eo.grads_reduced = options_.grads_reduced;
    eo.gather_deferred = options_.gather_deferred;
    eo.bucket_bytes = options_.bucket_bytes;
    eo.update_norms = options_.update_norms;
    eo.grad_comm_bf16 = options_.grad_comm_bf16;
    eo.comm_pad = options_.comm_pad;
    std::unique_ptr<Communicator> staged;  // before engine: it must outlive it
    std::unique_ptr<Engine> engine;
    if (options_.kernels == OptimizerOptions::Kernels::kFast) {
      kernels::BackendRequest request;
      request.device = options_.device;
      request.threads = options_.threads;
      absl::StatusOr<std::unique_ptr<kernels::StepBackend>> backend = kernels::MakeBackend(request);
      if (!backend.ok()) return backend.status();
      // A device backend over a host communicator (MPI, callbacks): the step's collectives
      // go through pinned host staging (comm/host_staged_communicator.h).
      Communicator* comm = comm_;
      if ((*backend)->device_memory() && !comm_->device_memory_ok()) {
        absl::StatusOr<std::unique_ptr<Communicator>> s = MakeHostStagedCommunicator(comm_);
        if (!s.ok()) return s.status();
        staged = *std::move(s);
        comm = staged.get();
      }
      engine = MakeScheduledEngine(&registry_.params(), &groups_, comm, eo, *std::move(backend));
    } else {
      engine = MakeReferenceEngine(&registry_.params(), &groups_, comm_);
    }
    size_t longest = 0;
    for (const ParamEntry& p : registry_.params()) longest = std::max(longest, p.name.size());
    std::string reason;
    reason.reserve(sizeof(kSkipPrefix) + longest + sizeof(kSkipSuffix));
    EngineScope scope(engine.get());
    if (absl::Status s = engine->Init(); !s.ok()) return s;
    staged_comm_ = std::move(staged);
    engine_ = std::move(engine);
    skip_reason_ = std::move(reason);
    return absl::OkStatus();
  });
}

absl::StatusOr<StepResult> Optimizer::Step(double lr_scale, void* stream, bool want_info) {
  if (absl::Status s = RequireFinalized("mdopt_step"); !s.ok()) return s;
  if (!std::isfinite(lr_scale) || lr_scale < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("lr_scale = ", lr_scale, " must be finite and >= 0"));
  }
  if (absl::Status s = engine_->CheckStream(stream); !s.ok()) return s;
  // A param whose gradient pointer is NULL has no gradient this step: the engine skips it
  // (at several ranks: when no rank has one; with grads=reduced the ranks must agree).
  const auto t0 = std::chrono::steady_clock::now();
  const CommStats c0 = comm_->size() > 1 ? comm_->stats() : CommStats{};
  EngineScope scope(engine_.get());
  // The engine decides the skip itself (the finite check is a stage of the step): the host
  // learns of it from the outcome, read here only when it costs no wait or is asked for.
  if (absl::Status s = engine_->Step(lr_scale, stream); !s.ok()) return s;
  outcome_pending_ = true;
  // With grads=reduced at several ranks the ranks may disagree on which params have a
  // gradient; the step is then a no-op everywhere, and this call must say so on every rank,
  // so the outcome is read here even from a device (one wait per step in that mode).
  const bool agree = options_.grads_reduced && comm_->size() > 1;
  StepResult r;
  if (want_info || agree || engine_->HostSynchronous()) {
    if (absl::Status s = SyncOutcome(); !s.ok()) return s;
  }
  stepped_ = true;
  if (want_info || engine_->HostSynchronous()) {
    r.skipped = last_skipped_;
    r.grad_norm = last_grad_norm_;
    r.skip_reason = skip_reason_;
  }
  r.step = step_;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (comm_->size() > 1) {
    const CommStats c1 = comm_->stats();
    r.exposed_comm_seconds = c1.wait_seconds - c0.wait_seconds;
    r.comm_seconds = c1.busy_seconds - c0.busy_seconds;
    r.bytes_sent = c1.bytes_sent - c0.bytes_sent;
  }
  return r;
}

absl::Status Optimizer::SyncOutcome() const {
  if (!outcome_pending_) return absl::OkStatus();
  StepOutcome o;
  if (absl::Status s = engine_->Outcome(&o); !s.ok()) return s;
  outcome_pending_ = false;
  step_ = o.steps_taken;
  if (o.disagree_param >= 0) {
    // The step changed nothing: what the step before it did still stands.
    return absl::InvalidArgumentError(absl::StrCat(
        "param '", registry_.params()[o.disagree_param].name,
        "' has a gradient on some ranks and a NULL one on others; with grads=reduced every "
        "rank passes the same mean gradient (or NULL on every rank to skip the param); the "
        "step changed nothing"));
  }
  last_skipped_ = o.skipped;
  last_grad_norm_ = o.grad_norm;
  if (o.skipped && o.bad_param >= 0) {
    skip_reason_.assign(kSkipPrefix).append(registry_.params()[o.bad_param].name).append(kSkipSuffix);
  } else {
    skip_reason_.clear();
  }
  return absl::OkStatus();
}

absl::StatusOr<GroupInfo> Optimizer::LastStepOfGroup(absl::string_view name) const {
  if (absl::Status s = RequireFinalized("mdopt_group_info"); !s.ok()) return s;
  int group = -1;
  for (size_t g = 0; g < groups_.size(); ++g)
    if (groups_[g].name == name) group = static_cast<int>(g);
  if (group < 0) return absl::InvalidArgumentError(absl::StrCat("group '", name, "' was not added"));
  GroupInfo info;
  for (const ParamEntry& p : registry_.params())
    if (p.group == group) info.matrices += p.experts;
  if (!stepped_) return info;
  if (absl::Status s = SyncOutcome(); !s.ok()) return s;
  if (last_skipped_) {
    info.skipped = info.matrices;
    return info;
  }
  int64_t counts[4];
  std::vector<double> norms;
  engine_->LastStep(group, counts, &norms);
  // counts and norms of every rank, added in rank order.
  std::vector<double> mine(norms.size() + 4);
  for (int k = 0; k < 4; ++k) mine[k] = static_cast<double>(counts[k]);
  std::copy(norms.begin(), norms.end(), mine.begin() + 4);
  const int world = comm_->size();
  std::vector<double> all(mine.size() * world);
  if (world > 1) {
    std::vector<int64_t> lens(static_cast<size_t>(world), static_cast<int64_t>(mine.size()));
    absl::StatusOr<RequestPtr> req = comm_->AllGather(mine.data(), all.data(), lens, DataType::kF64);
    if (!req.ok()) return req.status();
    if (absl::Status st = (*req)->Wait(); !st.ok()) return st;
  } else {
    all = mine;
  }
  std::vector<double> sum(mine.size(), 0.0);
  for (int q = 0; q < world; ++q)
    for (size_t k = 0; k < mine.size(); ++k) sum[k] += all[q * mine.size() + k];
  info.orthogonalized = static_cast<int64_t>(sum[0]);
  info.projected = static_cast<int64_t>(sum[1]);
  info.gain_stepped = static_cast<int64_t>(sum[2]);
  info.skipped = static_cast<int64_t>(sum[3]);
  if (!options_.update_norms || options_.kernels != OptimizerOptions::Kernels::kFast) {
    info.mean_relative_update = std::nan("");
  } else {
    // Over the matrices that stepped: a skipped one did not move for want of a gradient.
    double acc = 0.0;
    size_t m = 0;
    for (size_t k = 0; k < norms.size() / 3; ++k) {
      const double d = sum[4 + 3 * k], w = sum[5 + 3 * k], skipped = sum[6 + 3 * k];
      if (skipped > 0) continue;
      acc += w > 0 ? std::sqrt(d / w) : 0.0;
      ++m;
    }
    info.mean_relative_update = m > 0 ? acc / static_cast<double>(m) : 0.0;
  }
  return info;
}

absl::Status Optimizer::GradsReady(int64_t first, int64_t count, void* stream) {
  if (absl::Status s = RequireFinalized("mdopt_grads_ready"); !s.ok()) return s;
  if (absl::Status s = engine_->CheckStream(stream); !s.ok()) return s;
  EngineScope scope(engine_.get());
  return engine_->GradsReady(first, count, stream);
}

absl::Status Optimizer::GatherParams(void* stream) {
  if (absl::Status s = RequireFinalized("mdopt_gather_params"); !s.ok()) return s;
  if (absl::Status s = engine_->CheckStream(stream); !s.ok()) return s;
  EngineScope scope(engine_.get());
  return engine_->GatherParams(stream);
}

absl::Status Optimizer::Save(const std::string& dir) {
  if (absl::Status s = RequireFinalized("mdopt_save"); !s.ok()) return s;
  if (absl::Status s = SyncOutcome(); !s.ok()) return s;
  EngineScope scope(engine_.get());
  CheckpointLayout layout{engine_->name(), comm_->size(), step_, &groups_, &registry_.params()};
  return CatchOutOfMemory("mdopt_save", [&] { return SaveCheckpoint(dir, layout, engine_.get(), comm_); });
}

absl::Status Optimizer::Load(const std::string& dir) {
  if (absl::Status s = RequireFinalized("mdopt_load"); !s.ok()) return s;
  if (absl::Status s = SyncOutcome(); !s.ok()) return s;
  EngineScope scope(engine_.get());
  CheckpointLayout layout{engine_->name(), comm_->size(), step_, &groups_, &registry_.params()};
  return CatchOutOfMemory("mdopt_load", [&] {
    int64_t step = 0;
    if (absl::Status s = LoadCheckpoint(dir, layout, engine_.get(), comm_, &step); !s.ok()) return s;
    step_ = step;
    engine_->SetStepsTaken(step);
    return absl::OkStatus();
  });
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
  if (absl::Status s = SyncOutcome(); !s.ok()) return s;
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
  // The param's own step count (the t of its bias corrections): the same on every rank, so
  // no collective.
  if (field == "step") {
    std::vector<int64_t> counts(static_cast<size_t>(registry_.size()));
    if (absl::Status s = engine_->ReadParamSteps(counts.data()); !s.ok()) return s;
    return std::vector<double>{static_cast<double>(counts[static_cast<size_t>(index)])};
  }
  // The moments: Muon's momentum buffer, Adam's exp_avg / exp_avg_sq (one per element).
  const bool moment = field == "momentum" || field == "exp_avg" || field == "exp_avg_sq";
  const bool known = field == "master" || field == "direction" || field == "gain_row" ||
                     field == "gain_col" || field == "gain_scalar" || field == "radius" || moment;
  if (!known) {
    return absl::InvalidArgumentError(absl::StrCat(
        "field '", field,
        "' is unknown (master, direction, gain_row, gain_col, gain_scalar, radius, momentum, "
        "exp_avg, exp_avg_sq, step)"));
  }
  if (field == "momentum" && r.base != kernels::Base::kMuon) return missing("momentum buffer (not Muon)");
  if ((field == "exp_avg" || field == "exp_avg_sq") && r.base == kernels::Base::kMuon)
    return missing("Adam moments (Muon)");
  if (field == "gain_row" && !kernels::HasRowGains(r.gains)) return missing("row gains");
  if (field == "gain_col" && !kernels::HasColGains(r.gains)) return missing("column gains");
  if (field == "gain_scalar" && !kernels::HasScalarGain(r.gains)) return missing("scalar gain");
  if (field == "radius" && r.sphere == kernels::Sphere::kNone) return missing("sphere");

  auto gains = [&](const std::vector<double>& raw, int64_t k) {
    return raw.empty() ? 1.0 : kernels::GainValue<double>(r.gain_param, raw[static_cast<size_t>(k)]);
  };
  // Each rank reads its own rows; with several ranks the rows are all-gathered (in rank
  // order, which is row order) and the per-matrix values broadcast from their owner, so the
  // call is collective there.
  const ShardPlan& plan = *engine_->plan();
  const int world = comm_->size(), rank = comm_->rank();
  const bool per_row = field == "master" || field == "direction" || field == "gain_row" ||
                       moment || (field == "radius" && r.sphere == kernels::Sphere::kRow);
  std::vector<double> out, local, master, row, col, scalar, radius, moments;
  const std::string field_name(field);
  for (int64_t e = 0; e < p.experts; ++e) {
    const SlotPlan& sp = plan.slot(index, e);
    const int64_t rows = sp.Rows(rank);
    const std::vector<StateArray> arrays = engine_->State(index, e);
    // Only the arrays the field is made of.
    const bool direction = field == "direction";
    for (const auto& [name, dst, needed] :
         {std::tuple<const char*, std::vector<double>*, bool>{"master", &master, direction || field == "master"},
          {"row_raw", &row, direction || field == "gain_row"},
          {"col_raw", &col, direction || field == "gain_col"},
          {"scalar_raw", &scalar, direction || field == "gain_scalar"},
          {"radius", &radius, field == "radius"},
          {field_name.c_str(), &moments, moment}}) {
      if (!needed) continue;
      if (absl::Status s = ReadArray(*engine_, index, e, arrays, name, dst); !s.ok()) return s;
    }
    const bool holds = rows > 0 || sp.layout == Layout::kRows;
    local.clear();
    if (field == "master" || field == "direction") {
      for (int64_t i = 0; i < rows; ++i) {
        for (int64_t j = 0; j < p.n; ++j) {
          double w = master[static_cast<size_t>(i * p.n + j)];
          if (field == "direction") w /= gains(scalar, 0) * gains(row, i) * gains(col, j);
          local.push_back(w);
        }
      }
    } else if (moment) {
      if (moments.size() < static_cast<size_t>(rows * p.n)) return missing(field_name.c_str());
      local.assign(moments.begin(), moments.begin() + rows * p.n);
    } else if (field == "gain_row") {
      for (int64_t i = 0; i < rows; ++i) local.push_back(gains(row, i));
    } else if (field == "gain_col") {
      if (holds) for (int64_t j = 0; j < p.n; ++j) local.push_back(gains(col, j));
    } else if (field == "gain_scalar") {
      if (holds) local.push_back(gains(scalar, 0));
    } else {
      local.insert(local.end(), radius.begin(), radius.end());
    }
    if (world == 1) {
      out.insert(out.end(), local.begin(), local.end());
      continue;
    }
    if (per_row) {
      // Every rank's rows in equal segments of the longest (a communicator may take equal
      // counts only: NCCL), then packed in rank order, which is row order.
      const int64_t width = field == "master" || field == "direction" || moment ? p.n : 1;
      int64_t longest = 0;
      for (int q = 0; q < world; ++q) longest = std::max(longest, sp.Rows(q) * width);
      local.resize(static_cast<size_t>(longest));
      std::vector<double> all(static_cast<size_t>(longest * world));
      const std::vector<int64_t> counts(static_cast<size_t>(world), longest);
      absl::StatusOr<RequestPtr> req =
          comm_->AllGather(local.data(), all.data(), counts, DataType::kF64);
      if (!req.ok()) return req.status();
      if (absl::Status st = (*req)->Wait(); !st.ok()) return st;
      for (int q = 0; q < world; ++q) {
        const auto from = all.begin() + q * longest;
        out.insert(out.end(), from, from + sp.Rows(q) * width);
      }
    } else {
      // Replicated on every rank of a rows-layout matrix; on the owner alone otherwise.
      const int64_t count = field == "gain_col" ? p.n : field == "gain_scalar" ? 1
                            : r.sphere == kernels::Sphere::kCol ? p.n : 1;
      local.resize(static_cast<size_t>(count));
      if (sp.layout == Layout::kOwner) {
        absl::StatusOr<RequestPtr> req = comm_->Broadcast(local.data(), count, DataType::kF64, sp.owner);
        if (!req.ok()) return req.status();
        if (absl::Status st = (*req)->Wait(); !st.ok()) return st;
      }
      out.insert(out.end(), local.begin(), local.end());
    }
  }
  // Per-row fields come out in the tensor's row order: blocks=groups:G keeps the rows in
  // block order inside (kernels/common/row_map.h), the user sees the model's layout.
  if (per_row && !p.row_map.identity()) {
    const int64_t width = static_cast<int64_t>(out.size()) / (p.numel() / p.n);
    std::vector<double> tensor_order(out.size());
    for (int64_t l = 0; l < p.numel() / p.n; ++l) {
      const int64_t t = p.row_map.TensorRow(l);
      std::copy(out.begin() + l * width, out.begin() + (l + 1) * width,
                tensor_order.begin() + t * width);
    }
    out = std::move(tensor_order);
  }
  return out;
}

}  // namespace mdopt
