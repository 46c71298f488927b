// cuBLASLt is opened at the first Newton-Schulz runner, not linked (kernels/cuda/cublaslt_api.h):
// a process is not charged for it until it uses the CUDA backend. Runs without a GPU: opening
// the library and resolving its functions needs none.
#include "kernels/cuda/cublaslt_api.h"

#include <fstream>
#include <sstream>
#include <string>

#include "gtest/gtest.h"

namespace mdopt::kernels::cuda {
namespace {

bool Mapped(const std::string& library) {
  std::ifstream maps("/proc/self/maps");
  std::stringstream text;
  text << maps.rdbuf();
  return text.str().find(library) != std::string::npos;
}

TEST(CublasLtApi, OpensAtFirstUseAndResolvesEveryFunction) {
  // Nothing in this program has used the CUDA backend yet: cuBLASLt is not in the process.
  EXPECT_FALSE(Mapped("libcublasLt.so")) << "cuBLASLt was loaded with the program";
  std::string error;
  const CublasLtApi* lt = LoadCublasLt(&error);
  ASSERT_NE(lt, nullptr) << error;
  EXPECT_TRUE(Mapped("libcublasLt.so"));
  for (const void* f : {reinterpret_cast<const void*>(lt->GetVersion),
                        reinterpret_cast<const void*>(lt->Create),
                        reinterpret_cast<const void*>(lt->Destroy),
                        reinterpret_cast<const void*>(lt->Matmul),
                        reinterpret_cast<const void*>(lt->MatmulAlgoGetHeuristic),
                        reinterpret_cast<const void*>(lt->MatmulDescCreate),
                        reinterpret_cast<const void*>(lt->MatmulDescDestroy),
                        reinterpret_cast<const void*>(lt->MatmulDescSetAttribute),
                        reinterpret_cast<const void*>(lt->MatmulPreferenceCreate),
                        reinterpret_cast<const void*>(lt->MatmulPreferenceDestroy),
                        reinterpret_cast<const void*>(lt->MatmulPreferenceSetAttribute),
                        reinterpret_cast<const void*>(lt->MatrixLayoutCreate),
                        reinterpret_cast<const void*>(lt->MatrixLayoutDestroy),
                        reinterpret_cast<const void*>(lt->MatrixLayoutSetAttribute)}) {
    EXPECT_NE(f, nullptr);
  }
  // The library opened is of the headers' major version (the calls' struct layouts).
  EXPECT_EQ(lt->GetVersion() / 10000, CUBLAS_VER_MAJOR);
  // Opened once: a second call returns the same table.
  EXPECT_EQ(LoadCublasLt(nullptr), lt);
  // A descriptor round trip needs no device.
  cublasLtMatrixLayout_t layout = nullptr;
  ASSERT_EQ(lt->MatrixLayoutCreate(&layout, CUDA_R_32F, 4, 3, 4), CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(lt->MatrixLayoutDestroy(layout), CUBLAS_STATUS_SUCCESS);
}

}  // namespace
}  // namespace mdopt::kernels::cuda
