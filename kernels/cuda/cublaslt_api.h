// cuBLASLt, opened at its first use instead of linked. A CUDA build's libmdopt.so is loaded by
// every process that uses mdopt, most of which never run the CUDA backend (CPU runs, the
// test programs): linking cuBLASLt made each of them pay its load-time initialisation,
// about 0.1 s a process, and made the library unloadable where the CUDA toolkit's libraries
// are absent. The table is filled once, thread-safely, by the first NewtonSchulzRunner.
// Internal to kernels/cuda (includes cuBLASLt's header for the function types).
#ifndef MDOPT_KERNELS_CUDA_CUBLASLT_API_H_
#define MDOPT_KERNELS_CUDA_CUBLASLT_API_H_

#include <cublasLt.h>

#include <string>

namespace mdopt::kernels::cuda {

// The cuBLASLt functions mdopt calls, with their own signatures.
struct CublasLtApi {
  decltype(&cublasLtGetVersion) GetVersion = nullptr;
  decltype(&cublasLtCreate) Create = nullptr;
  decltype(&cublasLtDestroy) Destroy = nullptr;
  decltype(&cublasLtMatmul) Matmul = nullptr;
  decltype(&cublasLtMatmulAlgoGetHeuristic) MatmulAlgoGetHeuristic = nullptr;
  decltype(&cublasLtMatmulDescCreate) MatmulDescCreate = nullptr;
  decltype(&cublasLtMatmulDescDestroy) MatmulDescDestroy = nullptr;
  decltype(&cublasLtMatmulDescSetAttribute) MatmulDescSetAttribute = nullptr;
  decltype(&cublasLtMatmulPreferenceCreate) MatmulPreferenceCreate = nullptr;
  decltype(&cublasLtMatmulPreferenceDestroy) MatmulPreferenceDestroy = nullptr;
  decltype(&cublasLtMatmulPreferenceSetAttribute) MatmulPreferenceSetAttribute = nullptr;
  decltype(&cublasLtMatrixLayoutCreate) MatrixLayoutCreate = nullptr;
  decltype(&cublasLtMatrixLayoutDestroy) MatrixLayoutDestroy = nullptr;
  decltype(&cublasLtMatrixLayoutSetAttribute) MatrixLayoutSetAttribute = nullptr;
};

// The loaded table, or nullptr with *error (when not null) saying which library or symbol was
// missing and where it was looked for. The library is `libcublasLt.so.<major>` of the headers
// mdopt was built with, looked up the dynamic loader's way (LD_LIBRARY_PATH, the loader's
// cache, libmdopt.so's run path), then in the toolkit folder of the build. Loaded once per
// process and never closed.
const CublasLtApi* LoadCublasLt(std::string* error);

}  // namespace mdopt::kernels::cuda

#endif  // MDOPT_KERNELS_CUDA_CUBLASLT_API_H_
