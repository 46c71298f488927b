// The optimizer behind the C ABI: life cycle (register -> finalize -> step), the
// non-finite gradient check, step info, state inspection and checkpoints. The math lives in
// an Engine; collectives in a Communicator.
#ifndef MDOPT_DIST_OPT_OPTIMIZER_H_
#define MDOPT_DIST_OPT_OPTIMIZER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "comm/communicator.h"
#include "dist_opt/engine.h"
#include "dist_opt/group_spec.h"
#include "dist_opt/options.h"
#include "dist_opt/param_registry.h"

namespace mdopt {

// mdopt_group_info.
struct GroupInfo {
  int64_t matrices = 0, orthogonalized = 0, projected = 0, gain_stepped = 0, skipped = 0;
  double mean_relative_update = 0.0;
};

struct StepResult {
  int64_t step = 0;
  bool skipped = false;
  double grad_norm = 0.0;
  double seconds = 0.0;
  double exposed_comm_seconds = 0.0;  // time this call waited on communication
  double comm_seconds = 0.0;          // time with communication in flight during the call
  int64_t bytes_sent = 0;             // by this rank during the call (CommStats formulas)
  // Which param held a non-finite gradient; points into the optimizer, valid until its next
  // Step (the message is built in a buffer sized at Finalize: a skipped step allocates nothing).
  absl::string_view skip_reason;
};

class Optimizer {
 public:
  Optimizer(Communicator* comm, OptimizerOptions options);

  absl::Status AddGroup(const std::string& name, absl::string_view spec);
  absl::StatusOr<int64_t> AddParam(const ParamDescription& d);
  // mdopt_set_group_lr / mdopt_get_group_lr: the group's current lr, gain_lr following it
  // by the factor lr / (the spec's lr).
  absl::Status SetGroupLr(absl::string_view group, double lr);
  absl::Status GetGroupLr(absl::string_view group, double* lr, double* gain_lr) const;
  // mdopt_set_group_hparam / mdopt_get_group_hparam: beta1, beta2, eps, momentum,
  // weight_decay (and lr, gain_lr to read; lr to set, as SetGroupLr).
  absl::Status SetGroupHparam(absl::string_view group, absl::string_view key, double value);
  absl::Status GetGroupHparam(absl::string_view group, absl::string_view key, double* value) const;
  absl::Status SetPointers(int64_t index, void* param, const void* grad);
  absl::Status Finalize();
  // want_info: the caller reads the result (mdopt_step with info): a device backend then
  // waits for the step; without it, skipped/grad_norm are filled only where that is free.
  absl::StatusOr<StepResult> Step(double lr_scale, void* stream, bool want_info = true);
  // mdopt_grads_ready / mdopt_gather_params.
  absl::Status GradsReady(int64_t first, int64_t count, void* stream);
  absl::Status GatherParams(void* stream);
  const ShardPlan* plan() const { return engine_ == nullptr ? nullptr : engine_->plan(); }
  // What the last step did to a group (collective at several ranks).
  absl::StatusOr<GroupInfo> LastStepOfGroup(absl::string_view group) const;
  absl::Status Save(const std::string& dir);
  absl::Status Load(const std::string& dir);

  absl::StatusOr<int64_t> StateBytes() const;
  absl::StatusOr<int64_t> WorkspaceBytes() const;
  // The fields of mdopt_get_state.
  absl::StatusOr<std::vector<double>> GetState(int64_t index, absl::string_view field) const;

  int64_t steps_taken() const {
    (void)SyncOutcome();
    return step_;
  }
  // Bytes this rank sent in the last step by purpose (nullptr before finalize or for the
  // reference engine).
  const StepTraffic* last_traffic() const { return engine_ == nullptr ? nullptr : engine_->Traffic(); }
  const std::vector<Group>& groups() const { return groups_; }
  const ParamRegistry& registry() const { return registry_; }

 private:
  absl::Status RequireFinalized(const char* call) const;
  // Reads the outcome of the last step from the engine if it has not been read (waits for a
  // device step).
  absl::Status SyncOutcome() const;
  absl::StatusOr<int> FindGroup(const char* call, absl::string_view name) const;

  Communicator* comm_;
  OptimizerOptions options_;
  std::vector<Group> groups_;
  ParamRegistry registry_;
  // The engine's communicator when it is not comm_: comm_ wrapped in the host-staged adapter
  // for a device backend over a host communicator (declared first: it outlives engine_).
  std::unique_ptr<Communicator> staged_comm_;
  std::unique_ptr<Engine> engine_;  // set by Finalize
  // What the last step did, as read from the engine (SyncOutcome; mutable: reading it is not
  // a change of the optimizer).
  mutable std::string skip_reason_;  // StepResult::skip_reason's text, capacity reserved at Finalize
  mutable int64_t step_ = 0;
  mutable bool last_skipped_ = false, outcome_pending_ = false;
  mutable double last_grad_norm_ = 0.0;
  bool stepped_ = false;
};

}  // namespace mdopt

#endif  // MDOPT_DIST_OPT_OPTIMIZER_H_
