// The float32 step of DESIGN.md section 1 on one CUDA device, for a bucket of matrices that
// share one update rule: every pass is one launch over all of the bucket's matrices (a
// tensor-list metadata array, as apex's multi_tensor_apply), every workspace is allocated
// once at Create, and every sum is a fixed-order tree over fixed tiles of rows, so results
// do not depend on scheduling (no atomics).
//
// The arithmetic of each element is kernels/common/md_elementwise.h, the same functions the
// CPU fast passes call. Muon's Newton-Schulz runs batched over same-shape matrices in bf16
// on cuBLASLt (newton_schulz.h).
//
// This is the single-device step: every row of every matrix is local. The cross-row sums a
// sharded caller would all-reduce (column-gain gradients, slice norms, scalar-gain
// gradients) are formed by ReduceTiles between the passes, where an NCCL all-reduce would go.
//
// The header needs no CUDA headers: streams are void* (a cudaStream_t).
#ifndef MDOPT_KERNELS_CUDA_FUSED_PASSES_H_
#define MDOPT_KERNELS_CUDA_FUSED_PASSES_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "kernels/common/dtype.h"
#include "kernels/common/update_rule.h"
#include "kernels/cuda/device_status.h"

namespace mdopt::kernels::cuda {

// Device pointers of one m x n matrix and its state, all rows on this device. Gains and
// their Adam moments are float32 (raw values); `radius` holds the sphere's slices (1, m or
// n values). A null `model` means w is the model's own float32 tensor.
struct MatrixBuffers {
  int64_t m = 0, n = 0;
  float* w = nullptr;
  float* state0 = nullptr;  // muon momentum | adam exp_avg
  float* state1 = nullptr;  // adam exp_avg_sq
  float* row_raw = nullptr;
  float* row_exp_avg = nullptr;
  float* row_exp_avg_sq = nullptr;
  float* col_raw = nullptr;
  float* col_exp_avg = nullptr;
  float* col_exp_avg_sq = nullptr;
  float* scalar_raw = nullptr;
  float* scalar_exp_avg = nullptr;
  float* scalar_exp_avg_sq = nullptr;
  const float* radius = nullptr;
  const void* grad = nullptr;
  Dtype grad_dtype = Dtype::kF32;
  void* model = nullptr;
  Dtype model_dtype = Dtype::kF32;
};

// The schedule applied to the rule for one step.
struct StepNumbers {
  double lr = 0.0;       // rule.lr * lr_scale
  double gain_lr = 0.0;  // rule.gain_lr * lr_scale
  int64_t t = 1;         // 1-based count of taken steps
};

class FusedBucket {
 public:
  // Checks the rule and shapes, plans the launches and allocates every workspace (Newton-
  // Schulz's included) on the current device. Refused: tangent=1 (no CUDA kernel yet).
  static DeviceStatus Create(const UpdateRule& rule, const std::vector<MatrixBuffers>& mats,
                             std::unique_ptr<FusedBucket>* out);
  ~FusedBucket();
  FusedBucket(const FusedBucket&) = delete;
  FusedBucket& operator=(const FusedBucket&) = delete;

  // One step of every matrix, queued on `stream` (a cudaStream_t; null: the legacy default
  // stream). Allocates nothing. Returns launch errors; errors of the kernels themselves
  // surface at the caller's next synchronisation.
  DeviceStatus Step(const StepNumbers& s, void* stream);

  // Bytes of device memory this bucket allocated (workspaces and Newton-Schulz buffers).
  int64_t workspace_bytes() const;
  // Kernel launches (and cuBLASLt calls) one Step makes: it does not grow with the number
  // of matrices.
  int launches_per_step() const;

  struct Impl;

 private:
  explicit FusedBucket(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace mdopt::kernels::cuda

#endif  // MDOPT_KERNELS_CUDA_FUSED_PASSES_H_
