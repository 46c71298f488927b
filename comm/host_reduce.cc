#include "comm/host_reduce.h"

#include "kernels/common/bf16.h"

namespace mdopt {

void Bf16SumInto(const uint16_t* in, uint16_t* inout, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    inout[i] = kernels::FloatToBf16(kernels::Bf16ToFloat(in[i]) + kernels::Bf16ToFloat(inout[i]));
  }
}

void DivideInPlace(void* data, int64_t count, DataType dtype, int divisor) {
  switch (dtype) {
    case DataType::kF32: {
      float* p = static_cast<float*>(data);
      const float d = static_cast<float>(divisor);
      for (int64_t i = 0; i < count; ++i) p[i] /= d;
      return;
    }
    case DataType::kF64: {
      double* p = static_cast<double*>(data);
      const double d = divisor;
      for (int64_t i = 0; i < count; ++i) p[i] /= d;
      return;
    }
    case DataType::kBf16: {
      uint16_t* p = static_cast<uint16_t*>(data);
      const float d = static_cast<float>(divisor);
      for (int64_t i = 0; i < count; ++i) p[i] = kernels::FloatToBf16(kernels::Bf16ToFloat(p[i]) / d);
      return;
    }
    case DataType::kBytes: return;  // refused before it gets here
  }
}

}  // namespace mdopt
