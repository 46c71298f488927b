// An engine holds the optimizer state of this rank and runs the math on it. Two exist:
// FastEngine (float32 state, fused OpenMP passes, BLAS Newton-Schulz) and ReferenceEngine
// (float64 state, the unfused reference of kernels/cpu/reference.h), chosen by
// mdopt_create's kernels= option. The optimizer around them owns the life cycle, the
// non-finite check, checkpoints and the C ABI.
#ifndef MDOPT_DIST_OPT_ENGINE_H_
#define MDOPT_DIST_OPT_ENGINE_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "comm/communicator.h"
#include "dist_opt/param_registry.h"
#include "dist_opt/shard_plan.h"
#include "kernels/common/ns_coeffs.h"

namespace mdopt {

// One named array of a parameter's state for one expert matrix, pointing into live state.
struct StateArray {
  std::string name;      // "master", "momentum", "exp_avg", "exp_avg_sq", "row_raw", ...
  void* data = nullptr;  // elem_size * count bytes
  int64_t count = 0;
  int elem_size = 4;     // 4: float32, 8: float64
  bool is_model = false; // the model's own tensor (f32 weights serve as the master copy)

  double Get(int64_t k) const {
    return elem_size == 8 ? static_cast<const double*>(data)[k]
                          : static_cast<double>(static_cast<const float*>(data)[k]);
  }
  int64_t bytes() const { return count * elem_size; }
};

// How the engine runs (from mdopt_create's options).
struct EngineOptions {
  bool ns_bf16 = false;          // ns_dtype=bf16: Newton-Schulz products in bf16
  bool ns_comm_bf16 = false;     // ns_comm_dtype=bf16: the NS gather/scatter moves bf16
  kernels::NsForm ns_form = kernels::NsForm::kAuto;  // ns_form: of the float32 NS
  bool grads_reduced = false;    // grads=reduced: every rank passes the mean gradient
  bool gather_deferred = false;  // gather=deferred: weights are all-gathered by GatherParams
  bool update_norms = false;     // update_norms=1: measure ||dW|| / ||W|| per matrix
  int64_t bucket_bytes = int64_t{16} << 20;
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
  virtual absl::Status GradsReady(int64_t first, int64_t count) = 0;
  // Starts what GradsReady has not and waits for every gradient reduction; afterwards
  // GradSumSq reads this rank's reduced rows.
  virtual absl::Status ReduceGradients() = 0;

  // Sum of squares of this rank's rows of a param's (reduced) gradient (NaN/Inf propagate).
  virtual double GradSumSq(int64_t index) = 0;

  // One step; lr_scale multiplies lr and gain_lr; t counts taken steps including this one.
  virtual absl::Status Step(double lr_scale, int64_t t) = 0;

  // gather=deferred: the weight all-gather the last step left to do (mdopt_gather_params).
  virtual absl::Status GatherParams() = 0;

  // The state arrays of this rank's part of a param's expert matrix e, in a fixed order.
  virtual std::vector<StateArray> State(int64_t index, int64_t expert) = 0;

  // Writes the model tensors from the master copies (after a checkpoint load; collective).
  virtual absl::Status WriteModels() = 0;

  // What the last step did to the matrices of `group`, as seen by this rank: counts[0..2] =
  // matrices orthogonalised, projected, gain-stepped (each matrix counted by exactly one
  // rank), and per matrix of the group (in slot order) this rank's partial sums of
  // ||W' - W||^2 and ||W'||^2 (zeros unless update_norms). Filled only by the fast engine.
  virtual void LastStep(int group, int64_t counts[3], std::vector<double>* norms) const = 0;

  virtual int64_t WorkspaceBytes() const = 0;
  virtual const char* name() const = 0;
  virtual const ShardPlan* plan() const = 0;
};

std::unique_ptr<Engine> MakeFastEngine(const std::vector<ParamEntry>* params,
                                       const std::vector<Group>* groups, Communicator* comm,
                                       const EngineOptions& options);
std::unique_ptr<Engine> MakeReferenceEngine(const std::vector<ParamEntry>* params,
                                            const std::vector<Group>* groups,
                                            Communicator* comm);

// Message for a slice that cannot go onto its sphere.
std::string ZeroSliceMessage(const ParamEntry& p, int64_t expert, int64_t slice);

}  // namespace mdopt

#endif  // MDOPT_DIST_OPT_ENGINE_H_
