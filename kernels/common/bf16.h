/* bfloat16 stored as uint16_t: the top half of an IEEE float32. The one float -> bf16
 * rounding of the project: the kernels, comm's bf16 reductions, the tools and the tests
 * (the C ones too, hence plain C here) all round through FloatToBf16, so none can drift. */
#ifndef MDOPT_KERNELS_COMMON_BF16_H_
#define MDOPT_KERNELS_COMMON_BF16_H_

#include <stdint.h>
#include <string.h>

#include "kernels/common/host_device.h"

#ifdef __cplusplus
#define MDOPT_BF16_INLINE MDOPT_HD inline
namespace mdopt::kernels {
#else
#define MDOPT_BF16_INLINE static inline
#endif

MDOPT_BF16_INLINE float Bf16ToFloat(uint16_t h) {
  const uint32_t bits = (uint32_t)h << 16;
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

/* Round to nearest, ties to even; NaN stays a (quiet) NaN, Inf stays Inf. */
MDOPT_BF16_INLINE uint16_t FloatToBf16(float f) {
  uint32_t bits;
  memcpy(&bits, &f, sizeof bits);
  if ((bits & 0x7f800000u) == 0x7f800000u && (bits & 0x007fffffu) != 0) {
    return (uint16_t)((bits >> 16) | 0x0040u);
  }
  const uint32_t lsb = (bits >> 16) & 1u;
  bits += 0x7fffu + lsb;
  return (uint16_t)(bits >> 16);
}

#ifdef __cplusplus
}  /* namespace mdopt::kernels */
#endif
#undef MDOPT_BF16_INLINE

#endif /* MDOPT_KERNELS_COMMON_BF16_H_ */
