#include "kernels/cuda/cublaslt_api.h"

#include <dlfcn.h>

#include <string>

namespace mdopt::kernels::cuda {
namespace {

struct Loaded {
  CublasLtApi api;
  bool ok = false;
  std::string error;
};

template <typename F>
bool Resolve(void* lib, const char* name, F* out, std::string* error) {
  void* sym = dlsym(lib, name);
  if (sym == nullptr) {
    *error = std::string("cuBLASLt has no symbol ") + name;
    return false;
  }
  *out = reinterpret_cast<F>(sym);
  return true;
}

Loaded Load() {
  Loaded l;
  const std::string soname = "libcublasLt.so." + std::to_string(CUBLAS_VER_MAJOR);
  void* lib = dlopen(soname.c_str(), RTLD_NOW | RTLD_LOCAL);
  std::string tried = soname;
#ifdef MDOPT_CUDA_LIBRARY_DIR
  if (lib == nullptr) {
    const std::string path = std::string(MDOPT_CUDA_LIBRARY_DIR) + "/" + soname;
    lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    tried += " and " + path;
  }
#endif
  if (lib == nullptr) {
    const char* why = dlerror();
    l.error = "cannot open cuBLASLt (tried " + tried + "): " + (why != nullptr ? why : "") +
              "; put the CUDA toolkit's library folder on LD_LIBRARY_PATH";
    return l;
  }
  CublasLtApi& a = l.api;
  std::string* e = &l.error;
  l.ok = Resolve(lib, "cublasLtGetVersion", &a.GetVersion, e) &&
         Resolve(lib, "cublasLtCreate", &a.Create, e) &&
         Resolve(lib, "cublasLtDestroy", &a.Destroy, e) &&
         Resolve(lib, "cublasLtMatmul", &a.Matmul, e) &&
         Resolve(lib, "cublasLtMatmulAlgoGetHeuristic", &a.MatmulAlgoGetHeuristic, e) &&
         Resolve(lib, "cublasLtMatmulDescCreate", &a.MatmulDescCreate, e) &&
         Resolve(lib, "cublasLtMatmulDescDestroy", &a.MatmulDescDestroy, e) &&
         Resolve(lib, "cublasLtMatmulDescSetAttribute", &a.MatmulDescSetAttribute, e) &&
         Resolve(lib, "cublasLtMatmulPreferenceCreate", &a.MatmulPreferenceCreate, e) &&
         Resolve(lib, "cublasLtMatmulPreferenceDestroy", &a.MatmulPreferenceDestroy, e) &&
         Resolve(lib, "cublasLtMatmulPreferenceSetAttribute", &a.MatmulPreferenceSetAttribute, e) &&
         Resolve(lib, "cublasLtMatrixLayoutCreate", &a.MatrixLayoutCreate, e) &&
         Resolve(lib, "cublasLtMatrixLayoutDestroy", &a.MatrixLayoutDestroy, e) &&
         Resolve(lib, "cublasLtMatrixLayoutSetAttribute", &a.MatrixLayoutSetAttribute, e);
  // An older major with the same soname cannot happen; a newer minor is fine. The headers'
  // major must match the library's, or the struct layouts of the calls could differ.
  if (l.ok && a.GetVersion() / 10000 != CUBLAS_VER_MAJOR) {
    l.ok = false;
    l.error = "cuBLASLt " + std::to_string(a.GetVersion()) + " is not of major version " +
              std::to_string(CUBLAS_VER_MAJOR) + ", which mdopt was built with";
  }
  return l;
}

}  // namespace

const CublasLtApi* LoadCublasLt(std::string* error) {
  static const Loaded* loaded = new Loaded(Load());  // once, thread-safe; never freed
  if (!loaded->ok) {
    if (error != nullptr) *error = loaded->error;
    return nullptr;
  }
  return &loaded->api;
}

}  // namespace mdopt::kernels::cuda
