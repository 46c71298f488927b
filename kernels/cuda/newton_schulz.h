// Newton-Schulz (DESIGN.md section 1, step 4) for a batch of same-shape m x n matrices on
// one CUDA device: bf16 operands, float32 accumulation, cuBLASLt strided-batched GEMMs.
// Per iteration, with Z the wide orientation of X (r x c, r = min(m, n)):
//   A = Z Z^T                 (the symmetric product, once)
//   B = c A A + b A           (one GEMM with A as its C operand)
//   Z <- B Z + a Z            (one GEMM with Z as its C operand)
// Row-major X is column-major X^T, so both orientations run without a transpose: only the
// operands' op flags differ (tall matrices iterate on X^T by construction).
// The input is float32 (what the fused pass writes); it is normalised by ||X||_F + 1e-7 per
// matrix (a fixed-order reduction) while it is rounded to bf16.
#ifndef MDOPT_KERNELS_CUDA_NEWTON_SCHULZ_H_
#define MDOPT_KERNELS_CUDA_NEWTON_SCHULZ_H_

#include <cstdint>
#include <memory>

#include "kernels/common/update_rule.h"
#include "kernels/cuda/device_status.h"

namespace mdopt::kernels::cuda {

class BatchedNewtonSchulz {
 public:
  // Allocates every buffer and chooses the GEMM algorithms (cuBLASLt heuristics) once.
  static DeviceStatus Create(int64_t batch, int64_t m, int64_t n, NsCoeffSet set, int steps,
                             std::unique_ptr<BatchedNewtonSchulz>* out);
  ~BatchedNewtonSchulz();
  BatchedNewtonSchulz(const BatchedNewtonSchulz&) = delete;
  BatchedNewtonSchulz& operator=(const BatchedNewtonSchulz&) = delete;

  // batch x m x n float32, row-major, matrix k at k * m * n: written by the caller.
  float* input() const;
  // batch x m x n bf16 (uint16_t), row-major: NS(input) after Run.
  const uint16_t* output() const;

  // Queues the whole iteration on `stream` (a cudaStream_t). Allocates nothing.
  DeviceStatus Run(void* stream);

  int64_t batch() const;
  int64_t device_bytes() const;
  // GEMM floating-point operations of one Run (for the benchmarks' TFLOP/s).
  double flops() const;
  // Launches per Run: 2 (normalise) + 3 per iteration.
  int launches() const;

  struct Impl;

 private:
  explicit BatchedNewtonSchulz(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace mdopt::kernels::cuda

#endif  // MDOPT_KERNELS_CUDA_NEWTON_SCHULZ_H_
