// What the CUDA tests that drive the C ABI share: a tensor of the test model, reproducible
// values in either dtype, and the check of an ABI call.
#ifndef MDOPT_TESTS_CUDA_ABI_MODEL_H_
#define MDOPT_TESTS_CUDA_ABI_MODEL_H_

#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "cuda_test_util.h"
#include "kernels/common/bf16.h"
#include "mdopt/mdopt.h"

#define ABI_OK(call) ASSERT_EQ((call), MDOPT_SUCCESS) << #call << ": " << mdopt_last_error()

namespace mdopt::testing {

struct AbiTensor {
  const char* name;
  int ndim;
  int64_t shape[3];
  int64_t numel() const {
    int64_t n = 1;
    for (int d = 0; d < ndim; ++d) n *= shape[d];
    return n;
  }
};

// A 2-D f32 parameter's description for mdopt_add_param.
inline mdopt_param_desc MatrixDesc(const char* name, const char* group, int64_t m, int64_t n,
                                   void* param, const void* grad) {
  mdopt_param_desc d = mdopt_param_desc_init();
  d.name = name;
  d.group = group;
  d.ndim = 2;
  d.shape[0] = m;
  d.shape[1] = n;
  d.param = param;
  d.grad = grad;
  return d;
}

inline size_t Elem(mdopt_dtype d) { return d == MDOPT_DTYPE_F32 ? 4 : 2; }

// count draws of N(0, scale^2) from seed, as dtype d (bf16 rounded to nearest even).
inline std::vector<uint8_t> Values(int64_t count, mdopt_dtype d, uint64_t seed, double scale) {
  const std::vector<double> v = RandomNormal(static_cast<size_t>(count), seed, scale);
  std::vector<uint8_t> out(static_cast<size_t>(count) * Elem(d));
  for (int64_t e = 0; e < count; ++e) {
    if (d == MDOPT_DTYPE_F32) {
      reinterpret_cast<float*>(out.data())[e] = static_cast<float>(v[e]);
    } else {
      reinterpret_cast<uint16_t*>(out.data())[e] = kernels::FloatToBf16(static_cast<float>(v[e]));
    }
  }
  return out;
}

inline std::vector<double> AsDouble(const std::vector<uint8_t>& b, mdopt_dtype d) {
  std::vector<double> out(b.size() / Elem(d));
  for (size_t e = 0; e < out.size(); ++e)
    out[e] = d == MDOPT_DTYPE_F32 ? reinterpret_cast<const float*>(b.data())[e]
                                  : kernels::Bf16ToFloat(reinterpret_cast<const uint16_t*>(b.data())[e]);
  return out;
}

}  // namespace mdopt::testing

#endif  // MDOPT_TESTS_CUDA_ABI_MODEL_H_
