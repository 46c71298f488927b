// The one way into a backend (kernels/backend.h) from above: dist_opt and the C ABI shims ask
// here for a backend by device name and for what a device can do; they never include a
// backend's own headers, so OpenMP, BLAS and CUDA stay below this line.
#ifndef MDOPT_KERNELS_BACKEND_FACTORY_H_
#define MDOPT_KERNELS_BACKEND_FACTORY_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "kernels/backend.h"

namespace mdopt::kernels {

struct BackendRequest {
  std::string device = "cpu";  // "cpu" or "cuda:K" (builds with the CUDA backend)
  int threads = 0;             // CPU: OpenMP threads per call (0: the caller's setting)
};

// Unimplemented for a device this build or machine cannot serve (no CUDA backend built, no
// such CUDA device), with the reason.
absl::StatusOr<std::unique_ptr<StepBackend>> MakeBackend(const BackendRequest& request);

// Whether this build has the CUDA backend (device=cuda:K).
bool CudaBackendBuilt();

// Why ns_dtype=bf16 cannot run on the CPU here ("" when it can).
std::string Bf16NsUnavailableReason();

// One line about the backends' runtime for mdopt_runtime_info: BLAS and its kernel family,
// threads, ISA, whether oneDNN's bf16 matmul can run; the CUDA runtime and devices
// ("cuda=no" without the CUDA backend).
std::string BackendRuntimeInfo();

}  // namespace mdopt::kernels

#endif  // MDOPT_KERNELS_BACKEND_FACTORY_H_
