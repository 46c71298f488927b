// The optimizer's options string ("device=cpu threads=2 kernels=fast ..."), parsed apart from
// the optimizer's life cycle: what each key means is documented in docs/ABI.md (mdopt_create).
#ifndef MDOPT_DIST_OPT_OPTIONS_H_
#define MDOPT_DIST_OPT_OPTIONS_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kernels/common/ns_coeffs.h"

namespace mdopt {

struct OptimizerOptions {
  enum class Kernels { kFast, kReference };
  Kernels kernels = Kernels::kFast;
  std::string device = "cpu";  // device=: "cpu" or "cuda:K"
  int threads = 0;           // 0: leave OpenMP's default
  bool ns_bf16 = false;      // ns_dtype=bf16: Newton-Schulz products in bf16 (default on a GPU)
  bool ns_comm_bf16 = false; // ns_comm_dtype=bf16: the NS gather/scatter moves bf16
  bool grad_comm_bf16 = false;  // grad_comm_dtype=bf16: the gradient reduce-scatter moves bf16
  kernels::NsForm ns_form = kernels::NsForm::kAuto;  // ns_form=auto|standard|gram
  bool grads_reduced = false;   // grads=reduced (default grads=local)
  bool gather_deferred = false; // gather=deferred (default eager)
  int64_t bucket_bytes = int64_t{16} << 20;  // bucket_mb=
  double comm_timeout_s = 600;  // comm_timeout_s=
  bool update_norms = false;    // update_norms=1
  // comm_pad=: pad every rank's segment of a bucket to equal counts. kAuto: when the
  // communicator takes equal counts only (Communicator::equal_counts_only, NCCL).
  enum class CommPad { kAuto, kOn, kOff };
  CommPad comm_pad = CommPad::kAuto;
};

// Keys: device, threads, kernels, ns_dtype, ns_form, ns_comm_dtype, grad_comm_dtype, grads,
// gather, bucket_mb, comm_timeout_s, update_norms, comm_pad; each at most once, every key optional. InvalidArgument for
// malformed text (key_values.h), an unknown key or a bad value, naming the key;
// Unimplemented for a valid request this build or CPU cannot serve: device=cuda:K (no CUDA
// backend in this build), ns_dtype=bf16 on the CPU without oneDNN or without a bf16 matmul,
// kernels=reference with a CUDA device. ns_dtype defaults to bf16 with device=cuda:K, f32
// with device=cpu.
absl::StatusOr<OptimizerOptions> ParseOptimizerOptions(absl::string_view options);

}  // namespace mdopt

#endif  // MDOPT_DIST_OPT_OPTIONS_H_
