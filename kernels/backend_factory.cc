#include "kernels/backend_factory.h"

#include "absl/strings/str_cat.h"
#include "kernels/cpu/cpu_backend.h"

namespace mdopt::kernels {

absl::StatusOr<std::unique_ptr<StepBackend>> MakeBackend(const BackendRequest& request) {
  if (request.device == "cpu") return MakeCpuBackend(request.threads);
  return absl::UnimplementedError(
      absl::StrCat("option device=", request.device, ": this build of mdopt has no CUDA backend"));
}

std::string Bf16NsUnavailableReason() { return CpuBf16NsUnavailableReason(); }

std::string BackendRuntimeInfo() { return absl::StrCat(CpuRuntimeInfo(), " cuda=no"); }

}  // namespace mdopt::kernels
