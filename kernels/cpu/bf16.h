// bfloat16 stored as uint16_t: the top half of an IEEE float32.
#ifndef MDOPT_KERNELS_CPU_BF16_H_
#define MDOPT_KERNELS_CPU_BF16_H_

#include <cstdint>
#include <cstring>

namespace mdopt::kernels {

inline float Bf16ToFloat(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Round to nearest, ties to even; NaN stays a (quiet) NaN, Inf stays Inf.
inline uint16_t FloatToBf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  if ((bits & 0x7f800000u) == 0x7f800000u && (bits & 0x007fffffu) != 0) {
    return static_cast<uint16_t>((bits >> 16) | 0x0040u);
  }
  const uint32_t lsb = (bits >> 16) & 1u;
  bits += 0x7fffu + lsb;
  return static_cast<uint16_t>(bits >> 16);
}

}  // namespace mdopt::kernels

#endif  // MDOPT_KERNELS_CPU_BF16_H_
