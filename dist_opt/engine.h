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

class Engine {
 public:
  virtual ~Engine() = default;

  // Allocates this rank's state for every param, checks that every sphere slice can be
  // projected, then projects (unless preserve_init) and writes the model tensors. On error
  // nothing has been written.
  virtual absl::Status Init() = 0;

  // Sum of squares of this rank's part of a param's gradient (NaN/Inf propagate).
  virtual double GradSumSq(int64_t index) = 0;

  // One step; lr_scale multiplies lr and gain_lr; t counts taken steps including this one.
  virtual absl::Status Step(double lr_scale, int64_t t) = 0;

  // The state arrays of a param's expert matrix e, in a fixed order.
  virtual std::vector<StateArray> State(int64_t index, int64_t expert) = 0;

  // Writes the model tensors from the master copies (after a checkpoint load).
  virtual void WriteModels() = 0;

  virtual int64_t WorkspaceBytes() const = 0;
  virtual const char* name() const = 0;
};

// ns_bf16: Newton-Schulz with bf16 products (kernels/cpu/newton_schulz_bf16.h).
std::unique_ptr<Engine> MakeFastEngine(const std::vector<ParamEntry>* params, Communicator* comm,
                                       bool ns_bf16);
std::unique_ptr<Engine> MakeReferenceEngine(const std::vector<ParamEntry>* params,
                                            Communicator* comm);

// Message for a slice that cannot go onto its sphere.
std::string ZeroSliceMessage(const ParamEntry& p, int64_t expert, int64_t slice);

}  // namespace mdopt

#endif  // MDOPT_DIST_OPT_ENGINE_H_
