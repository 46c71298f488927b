// Compiled, never run: every MDOPT_HD function of kernels/common called from device code, so
// that nvcc refuses a header that starts to use something the device lacks (std::min, a
// host-only library, OpenMP) before a CUDA kernel needs it.
#include <cstdint>

#include "kernels/common/bf16.h"
#include "kernels/common/dtype.h"
#include "kernels/common/gain_param.h"
#include "kernels/common/grad_presence.h"
#include "kernels/common/ns_coeffs.h"
#include "kernels/common/row_ranges.h"
#include "kernels/common/update_rule.h"

namespace mdopt::kernels {

__global__ void CommonHeadersCompileForDevice(const float* in, float* out, double* out64) {
  const float x = in[threadIdx.x];
  const uint16_t h = FloatToBf16(x);
  float y = Bf16ToFloat(h);
  const GainParam params[] = {GainParam::kSoftplus, GainParam::kDirect, GainParam::kExp};
  for (const GainParam p : params) {
    y += GainValue(p, x) + GainDerivative(p, x) + static_cast<float>(GainRawForOne(p));
    out64[threadIdx.x] += GainValue(p, static_cast<double>(x)) + GainDerivative(p, 0.5);
  }
  const RowRanges ranges(static_cast<int64_t>(threadIdx.x));
  const int64_t slices = SphereSlices(Sphere::kRow, ranges.begin(0), ranges.end(0));
  const bool gains = HasRowGains(Gains::kRowCol) && HasColGains(Gains::kCol) && !HasScalarGain(Gains::kRow);
  const Dtype d = gains ? Dtype::kBf16 : Dtype::kF32;
  const double presence = GradPresence(in) + GradPresence(nullptr);
  const bool mixed = SomeRankHasGrad(presence) && SomeRankLacksGrad(presence);
  out[threadIdx.x] = y + static_cast<float>(slices) + (d == Dtype::kBf16 ? 1.0f : 0.0f) +
                     static_cast<float>(kNsNormEps) + (mixed ? 1.0f : 0.0f);
}

}  // namespace mdopt::kernels
