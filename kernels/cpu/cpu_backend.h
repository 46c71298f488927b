// The CPU backend of the step schedule: the float32 fused passes of fast_matrix.h, the
// Newton-Schulz of newton_schulz.h (OpenBLAS) or newton_schulz_bf16.h (oneDNN), OpenMP
// threads. Its stream is the calling thread: every call runs to completion.
#ifndef MDOPT_KERNELS_CPU_CPU_BACKEND_H_
#define MDOPT_KERNELS_CPU_CPU_BACKEND_H_

#include <memory>
#include <string>

#include "kernels/backend.h"

namespace mdopt::kernels {

// threads: OpenMP threads of every call (0: leave the caller's setting).
std::unique_ptr<StepBackend> MakeCpuBackend(int threads);

// Whether ns_dtype=bf16 can run here, and why not ("" when it can).
std::string CpuBf16NsUnavailableReason();

// "blas=OpenBLAS-0.3.21/Zen threads=2 isa=avx512 onednn_bf16=yes" for mdopt_runtime_info.
std::string CpuRuntimeInfo();

}  // namespace mdopt::kernels

#endif  // MDOPT_KERNELS_CPU_CPU_BACKEND_H_
