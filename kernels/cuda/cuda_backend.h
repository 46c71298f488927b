// The CUDA backend of the step schedule (kernels/backend.h) on one device: the optimizer's
// state, the collectives' buffers and every workspace in one device arena allocated at
// Setup; the stages as multi-tensor kernels (stage_kernels.h) and Newton-Schulz on cuBLASLt
// (newton_schulz.h), all queued on the backend's own stream, which is joined to and released
// back to the caller's stream at each ABI call. Only ReadOutcome and the state calls wait
// for the device. Built only with CUDA (MDOPT_WITH_CUDA); reached through backend_factory.h.
#ifndef MDOPT_KERNELS_CUDA_CUDA_BACKEND_H_
#define MDOPT_KERNELS_CUDA_CUDA_BACKEND_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "kernels/backend.h"

namespace mdopt::kernels {

// A backend on CUDA device `device`; Unimplemented (with the runtime's reason) when this
// machine has no such device.
absl::StatusOr<std::unique_ptr<StepBackend>> MakeCudaBackend(int device);

// "cuda=13.0 driver=13.0 devices=1 (NVIDIA H100 80GB HBM3, sm_90)" or "cuda=no-device (...)".
std::string CudaRuntimeInfo();

}  // namespace mdopt::kernels

#endif  // MDOPT_KERNELS_CUDA_CUDA_BACKEND_H_
