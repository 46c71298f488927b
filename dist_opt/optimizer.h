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
#include "dist_opt/param_registry.h"

namespace mdopt {

struct OptimizerOptions {
  enum class Kernels { kFast, kReference };
  Kernels kernels = Kernels::kFast;
  int threads = 0;           // 0: leave OpenMP's default
  bool ns_bf16 = false;      // ns_dtype=bf16: Newton-Schulz products in bf16 (fast engine)
  bool ns_comm_bf16 = false; // ns_comm_dtype=bf16: the NS gather/scatter moves bf16
  bool grads_reduced = false;   // grads=reduced (default grads=local)
  bool gather_deferred = false; // gather=deferred (default eager)
  int64_t bucket_bytes = int64_t{16} << 20;  // bucket_mb=
  double comm_timeout_s = 600;  // comm_timeout_s=
  bool update_norms = false;    // update_norms=1
};

// mdopt_group_info.
struct GroupInfo {
  int64_t matrices = 0, orthogonalized = 0, projected = 0, gain_stepped = 0, skipped = 0;
  double mean_relative_update = 0.0;
};

// "device=cpu threads=2 kernels=fast ns_dtype=f32"; device=cuda:K is Unimplemented in a
// CPU-only build, ns_dtype=bf16 in a build without oneDNN.
absl::StatusOr<OptimizerOptions> ParseOptimizerOptions(absl::string_view options);

struct StepResult {
  int64_t step = 0;
  bool skipped = false;
  double grad_norm = 0.0;
  double seconds = 0.0;
  double exposed_comm_seconds = 0.0;  // time this call waited on communication
  double comm_seconds = 0.0;          // time with communication in flight during the call
  int64_t bytes_sent = 0;             // by this rank during the call (CommStats formulas)
  std::string skip_reason;  // which param held a non-finite gradient
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
  absl::Status SetPointers(int64_t index, void* param, const void* grad);
  absl::Status Finalize();
  absl::StatusOr<StepResult> Step(double lr_scale, void* stream);
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

  int64_t steps_taken() const { return step_; }
  const std::vector<Group>& groups() const { return groups_; }
  const ParamRegistry& registry() const { return registry_; }

 private:
  absl::Status RequireFinalized(const char* call) const;
  absl::StatusOr<int> FindGroup(const char* call, absl::string_view name) const;

  Communicator* comm_;
  OptimizerOptions options_;
  std::vector<Group> groups_;
  ParamRegistry registry_;
  std::unique_ptr<Engine> engine_;  // set by Finalize
  std::vector<double> grad_sumsq_;  // per param x rank, sized at Finalize: a step allocates nothing
  std::vector<int64_t> sumsq_counts_;
  int64_t step_ = 0;
  bool stepped_ = false, last_skipped_ = false;
};

}  // namespace mdopt

#endif  // MDOPT_DIST_OPT_OPTIMIZER_H_
