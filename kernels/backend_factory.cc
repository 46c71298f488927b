#include "kernels/backend_factory.h"

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "kernels/cpu/cpu_backend.h"
#ifdef MDOPT_HAVE_CUDA_BACKEND
#include "kernels/cuda/cuda_backend.h"
#endif

namespace mdopt::kernels {

absl::StatusOr<std::unique_ptr<StepBackend>> MakeBackend(const BackendRequest& request) {
  if (request.device == "cpu") return MakeCpuBackend(request.threads);
  absl::string_view ordinal = request.device;
  int device = -1;
  if (!absl::ConsumePrefix(&ordinal, "cuda:") || !absl::SimpleAtoi(ordinal, &device) || device < 0)
    return absl::InvalidArgumentError(absl::StrCat("device '", request.device, "' (cpu or cuda:K)"));
#ifdef MDOPT_HAVE_CUDA_BACKEND
  return MakeCudaBackend(device);
#else
  return absl::UnimplementedError(
      absl::StrCat("option device=", request.device, ": this build of mdopt has no CUDA backend"));
#endif
}

bool CudaBackendBuilt() {
#ifdef MDOPT_HAVE_CUDA_BACKEND
  return true;
#else
  return false;
#endif
}

std::string Bf16NsUnavailableReason() { return CpuBf16NsUnavailableReason(); }

std::string BackendRuntimeInfo() {
#ifdef MDOPT_HAVE_CUDA_BACKEND
  return absl::StrCat(CpuRuntimeInfo(), " ", CudaRuntimeInfo());
#else
  return absl::StrCat(CpuRuntimeInfo(), " cuda=no");
#endif
}

}  // namespace mdopt::kernels
