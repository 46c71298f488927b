// CUDA runtime and cuBLASLt errors as DeviceStatus, with the call that failed in the message.
// Internal to kernels/cuda (includes the CUDA headers).
#ifndef MDOPT_KERNELS_CUDA_CUDA_CHECK_H_
#define MDOPT_KERNELS_CUDA_CUDA_CHECK_H_

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <string>

#include "kernels/cuda/device_status.h"

namespace mdopt::kernels::cuda {

inline DeviceStatus FromCuda(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return {};
  return DeviceStatus::Error(std::string(what) + ": " + cudaGetErrorName(e) + " (" +
                             cudaGetErrorString(e) + ")");
}

inline DeviceStatus FromCublas(cublasStatus_t e, const char* what) {
  if (e == CUBLAS_STATUS_SUCCESS) return {};
  return DeviceStatus::Error(std::string(what) + ": cuBLAS status " + std::to_string(static_cast<int>(e)));
}

}  // namespace mdopt::kernels::cuda

// Returns the DeviceStatus of a failed call from the enclosing function.
#define MDOPT_CUDA_RETURN_IF_ERROR(call)                                   \
  do {                                                                     \
    const ::mdopt::kernels::cuda::DeviceStatus mdopt_cuda_s_ =             \
        ::mdopt::kernels::cuda::FromCuda((call), #call);                   \
    if (!mdopt_cuda_s_.ok()) return mdopt_cuda_s_;                         \
  } while (0)
#define MDOPT_CUBLAS_RETURN_IF_ERROR(call)                                 \
  do {                                                                     \
    const ::mdopt::kernels::cuda::DeviceStatus mdopt_cuda_s_ =             \
        ::mdopt::kernels::cuda::FromCublas((call), #call);                 \
    if (!mdopt_cuda_s_.ok()) return mdopt_cuda_s_;                         \
  } while (0)

#endif  // MDOPT_KERNELS_CUDA_CUDA_CHECK_H_
