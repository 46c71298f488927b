// An engine holds the optimizer state of this rank and runs the math on it. Two exist: the
// scheduled engine (dist_opt/schedule.h: the step schedule over a device backend, the CPU's
// or a GPU's) and ReferenceEngine (float64 state, the unfused reference of
// kernels/reference/reference.h, one rank), chosen by mdopt_create's kernels= option. The
// optimizer around them owns the life cycle, step info, checkpoints and the C ABI.
#ifndef MDOPT_DIST_OPT_ENGINE_H_
#define MDOPT_DIST_OPT_ENGINE_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "comm/communicator.h"
#include "dist_opt/options.h"
#include "dist_opt/param_registry.h"
#include "dist_opt/schedule.h"
#include "dist_opt/shard_plan.h"
#include "kernels/backend.h"
#include "kernels/common/ns_coeffs.h"

namespace mdopt {

using kernels::StateArray;
using kernels::StepOutcome;

// How the engine runs (from mdopt_create's options).
struct EngineOptions {
  bool ns_bf16 = false;          // ns_dtype=bf16: Newton-Schulz products in bf16
  bool ns_comm_bf16 = false;     // ns_comm_dtype=bf16: the NS gather/scatter moves bf16
  kernels::NsForm ns_form = kernels::NsForm::kAuto;  // ns_form: of the float32 NS
  bool grads_reduced = false;    // grads=reduced: every rank passes the mean gradient
  bool gather_deferred = false;  // gather=deferred: weights are all-gathered by GatherParams
  bool update_norms = false;     // update_norms=1: measure ||dW|| / ||W|| per matrix
  bool grad_comm_bf16 = false;   // grad_comm_dtype=bf16: gradients reduced in bf16
  int64_t bucket_bytes = int64_t{16} << 20;
  // comm_pad: the plan pads buckets to equal segments (auto: when the communicator takes
  // equal counts only).
  OptimizerOptions::CommPad comm_pad = OptimizerOptions::CommPad::kAuto;
};

class Engine {
 public:
  virtual ~Engine() = default;

  // Builds the shard plan, allocates this rank's state, checks that every sphere slice can
  // be projected, then projects (unless preserve_init) and writes the model tensors. On error
  // nothing has been written.
  virtual absl::Status Init() = 0;

  // Gradients of params [first, first + count) are final (mdopt_grads_ready): starts the
  // reduce-scatter of every bucket, in bucket order, whose gradients are all final.
  virtual absl::Status GradsReady(int64_t first, int64_t count, void* stream) = 0;
  // InvalidArgument for a caller's stream this engine cannot use (the CPU's: only NULL).
  virtual absl::Status CheckStream(void* stream) const = 0;

  // One step, lr_scale multiplying lr and gain_lr: the finite check, then (unless a gradient
  // holds NaN/Inf anywhere) the update of every param that has a gradient (a NULL gradient
  // pointer: none; at several ranks, none on any rank). Enqueued on the backend's stream; what the step did
  // is known after Outcome.
  // `stream`: the caller's (mdopt_step's); the step is ordered after its work and its later
  // work after the step.
  virtual absl::Status Step(double lr_scale, void* stream) = 0;
  // Waits for the last step and tells what it did and how many steps were taken so far.
  virtual absl::Status Outcome(StepOutcome* out) = 0;
  // The count of taken steps (checkpoint load).
  virtual void SetStepsTaken(int64_t t) = 0;
  // Each param's own step count, the t of its bias corrections: the steps applied while it
  // had a gradient. `host` holds one int64 per param (host-synchronous). Every rank holds
  // the same counts.
  virtual absl::Status ReadParamSteps(int64_t* host) = 0;
  virtual absl::Status WriteParamSteps(const int64_t* host) = 0;

  // gather=deferred: the weight all-gather the last step left to do (mdopt_gather_params).
  virtual absl::Status GatherParams(void* stream) = 0;

  // The state arrays of this rank's part of a param's expert matrix e, in a fixed order, and
  // their contents (host-synchronous; a device engine stages them through host memory).
  virtual std::vector<StateArray> State(int64_t index, int64_t expert) = 0;
  virtual absl::Status ReadState(int64_t index, int64_t expert, size_t array, int64_t first,
                                 int64_t count, void* host) = 0;
  virtual absl::Status WriteState(int64_t index, int64_t expert, size_t array,
                                  const void* host) = 0;

  // Writes the model tensors from the master copies (after a checkpoint load; collective).
  virtual absl::Status WriteModels() = 0;

  // What the last step did to the matrices of `group`, as seen by this rank: counts[0..3] =
  // matrices orthogonalised, projected, gain-stepped, skipped for want of a gradient (each
  // matrix counted by exactly one rank), and per matrix of the group (in slot order) three
  // values: this rank's partial sums of ||W' - W||^2 and ||W||^2 (W before the step; zeros
  // unless update_norms), and 1 where this rank counts the matrix as skipped.
  virtual void LastStep(int group, int64_t counts[4], std::vector<double>* norms) const = 0;
  // The params' rules changed in their scalars (mdopt_set_group_hparam): beta1, beta2, eps,
  // momentum, weight_decay. Engines that read the registry's rules at every step need
  // nothing; the scheduled engine hands them to its backend for the next step.
  virtual void RulesChanged() {}

  virtual int64_t WorkspaceBytes() const = 0;
  // Bracket every public call of the optimizer (a CPU backend sets its thread count for the
  // call and gives the caller's back after it).
  virtual void Enter() {}
  virtual void Leave() {}
  // Whether Outcome can be read without waiting for queued work (a host backend).
  virtual bool HostSynchronous() const { return true; }
  // Bytes this rank sent in the last step, by purpose (nullptr: not counted).
  virtual const StepTraffic* Traffic() const { return nullptr; }
  virtual const char* name() const = 0;
  virtual const ShardPlan* plan() const = 0;
};

// The step schedule over `backend` (dist_opt/schedule.h).
std::unique_ptr<Engine> MakeScheduledEngine(const std::vector<ParamEntry>* params,
                                            const std::vector<Group>* groups, Communicator* comm,
                                            const EngineOptions& options,
                                            std::unique_ptr<kernels::StepBackend> backend);
std::unique_ptr<Engine> MakeReferenceEngine(const std::vector<ParamEntry>* params,
                                            const std::vector<Group>* groups,
                                            Communicator* comm);

// Message for a slice that cannot go onto its sphere.
std::string ZeroSliceMessage(const ParamEntry& p, int64_t expert, int64_t slice);

}  // namespace mdopt

#endif  // MDOPT_DIST_OPT_ENGINE_H_
