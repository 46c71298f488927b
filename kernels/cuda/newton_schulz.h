// Newton-Schulz (DESIGN.md section 1, step 4) on one CUDA device, for every shape through one
// runner: one cuBLASLt handle, GEMM algorithms chosen once per (batch, m, n, form, dtype), and
// all device memory from the caller (one arena). Run allocates nothing and never waits on
// the host.
//
// A batch of same-shape m x n float32 matrices is normalised by ||X||_F + 1e-7 each (a
// fixed-order float64 reduction) and then iterated in one of two forms, with s = min(m, n),
// l = max(m, n) and Z the wide orientation of X (tall matrices iterate on X^T through the
// GEMMs' op flags, nothing is transposed):
//   standard:  A = Z Z^T;  B = c A A + b A (A is the GEMM's C operand);
//              Z <- B Z + a Z (Z is the GEMM's C operand)
//   Gram:      the sequence of kernels/cpu/newton_schulz.cc on s x s matrices only:
//              A_0 = Z Z^T; per iteration P = a I + b A + c A A, A <- (P A) P, Q <- P Q
//              (Q_1 = P_0); O = Q Z once at the end
// Products are bf16 operands with float32 accumulation (CUBLAS_COMPUTE_32F) or, with
// bf16 = false, float32 operands on CUBLAS_COMPUTE_32F without TF32 (to compare a step
// tightly with the CPU backend's float32 Newton-Schulz). Where the bf16 mode rounds, and
// why, is at the top of newton_schulz.cu; docs/cuda.md has the workspace formula.
#ifndef MDOPT_KERNELS_CUDA_NEWTON_SCHULZ_H_
#define MDOPT_KERNELS_CUDA_NEWTON_SCHULZ_H_

#include <cstdint>
#include <memory>

#include "kernels/common/ns_coeffs.h"
#include "kernels/common/update_rule.h"
#include "kernels/cuda/device_status.h"

namespace mdopt::kernels::cuda {

// Newton-Schulz for the CUDA backend: one cuBLASLt handle for every shape; device memory
// comes from the caller (one arena), nothing is allocated in Run. Not thread-safe: one
// runner per host thread that enqueues work.
class NewtonSchulzRunner {
 public:
  // cuBLASLt's batch count is an int32 and a grid's y dimension at most 65,535: larger
  // batches are run as several calls of at most this many matrices.
  static constexpr int64_t kMaxBatchPerCall = 65535;

  static DeviceStatus Create(std::unique_ptr<NewtonSchulzRunner>* out);  // cublasLtCreate only
  ~NewtonSchulzRunner();
  NewtonSchulzRunner(const NewtonSchulzRunner&) = delete;
  NewtonSchulzRunner& operator=(const NewtonSchulzRunner&) = delete;

  // kStandard or kGram for m x n under `form` (kAuto: Gram when max(m,n) >= 2 min(m,n), as
  // kernels/cpu/newton_schulz.h ResolveNsForm does).
  static NsForm Resolve(NsForm form, int64_t m, int64_t n);

  // Device bytes of workspace Run needs for `batch` m x n matrices (bf16 or f32 products),
  // cuBLASLt's own workspace included. Pure arithmetic (no device call), so it can size an
  // arena. A batch larger than MaxBatchPerCall() needs only one call's worth.
  static int64_t WorkspaceBytes(int64_t batch, int64_t m, int64_t n, NsForm form, bool bf16);

  // Chooses the GEMM algorithms for this (batch, m, n, form, dtype) once (host-side
  // descriptors, cuBLASLt heuristics); Run of an unprepared key prepares it (still no device
  // allocation). Call at setup so that a step does no heuristic search. The final product of
  // the Gram form writes the caller's matrices directly, so its algorithm also depends on
  // their alignment: Prepare assumes stride = m * n from a 256-byte aligned base.
  DeviceStatus Prepare(int64_t batch, int64_t m, int64_t n, NsForm form, bool bf16);

  // NS of `batch` float32 row-major m x n matrices, matrix k at x + k * stride (stride >= m*n
  // elements), in place: O replaces X (bf16 products: in the standard form O is the bf16
  // result widened to f32; in the Gram form O = Q X is the float32 output of its last
  // product). Normalises each matrix by ||X||_F + kNsNormEps (kernels/common/ns_coeffs.h) with
  // a fixed-order float64 reduction (deterministic, no atomics). Coefficients:
  // NsCoefficients(set, k) (kernels/common/ns_coeffs.h). `workspace` is
  // >= WorkspaceBytes(batch, m, n, form, bf16) bytes, 256-byte aligned. Enqueued on `stream`
  // (a cudaStream_t); no allocation, no host synchronisation. steps >= 1.
  DeviceStatus Run(NsCoeffSet set, int steps, int64_t batch, int64_t m, int64_t n, float* x,
                   int64_t stride, NsForm form, bool bf16, void* workspace,
                   int64_t workspace_bytes, void* stream);

  // GEMM flops of one Run (for TFLOP/s in benchmarks): standard K (4 s^2 l + 2 s^3), Gram
  // 4 s^2 l + (8K - 6) s^3, per matrix (every product a full GEMM).
  static double Flops(int steps, int64_t batch, int64_t m, int64_t n, NsForm form);

  // Kernel launches and cuBLASLt calls of one Run (for the benchmarks).
  static int64_t Launches(int steps, int64_t batch, int64_t m, int64_t n, NsForm form, bool bf16);

  // The largest batch one call takes: kMaxBatchPerCall, or what a test set (so that the
  // split is tested without 65,536 matrices). Tests only; 0 restores the default.
  static int64_t MaxBatchPerCall();
  static void SetMaxBatchPerCallForTesting(int64_t max_batch);

  struct Impl;

 private:
  explicit NewtonSchulzRunner(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace mdopt::kernels::cuda

#endif  // MDOPT_KERNELS_CUDA_NEWTON_SCHULZ_H_
