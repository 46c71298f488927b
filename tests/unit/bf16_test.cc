// kernels/common/bf16.h, the project's one float32 -> bf16 rounding: hand-worked values
// (ties to even, signed zero, infinities, overflow, NaN payloads, subnormals) and a sweep of
// float32 bit patterns against an independent rounding that picks the nearer of the two
// neighbouring bf16 values in float64.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels/common/bf16.h"

namespace mdopt::kernels {
namespace {

float FromBits(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

TEST(Bf16, HandWorkedValues) {
  struct Case {
    uint32_t in;
    uint16_t want;
  };
  const Case cases[] = {
      {0x3f800000u, 0x3f80},  // 1
      {0x3f808000u, 0x3f80},  // 1 + 2^-8: a tie, 0x3f80 is even
      {0x3f818000u, 0x3f82},  // 1 + 3 * 2^-8: a tie, 0x3f81 is odd -> up
      {0x3f808001u, 0x3f81},  // just above the tie
      {0x3f807fffu, 0x3f80},  // just below it
      {0xbf818000u, 0xbf82},  // the same for negative numbers
      {0x80000000u, 0x8000},  // -0 keeps its sign
      {0x7f800000u, 0x7f80},  // +inf
      {0xff800000u, 0xff80},  // -inf
      {0x7f7fffffu, 0x7f80},  // FLT_MAX rounds to +inf
      {0x7f7f7fffu, 0x7f7f},  // the largest that stays finite
      {0x7fc00000u, 0x7fc0},  // quiet NaN
      {0x7f800001u, 0x7fc0},  // a NaN whose payload is all in the dropped half stays NaN
      {0xff800001u, 0xffc0},
      {0x7fbfffffu, 0x7fff},  // NaN: truncated and made quiet, never rounded into inf
      {0x00000001u, 0x0000},  // the smallest subnormal
      {0x00008000u, 0x0000},  // a subnormal tie, to even
      {0x00018000u, 0x0002},
      {0x40490fdbu, 0x4049},  // pi
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(testing::Message() << std::hex << c.in);
    EXPECT_EQ(FloatToBf16(FromBits(c.in)), c.want);
  }
  EXPECT_EQ(Bf16ToFloat(0x4049), 3.140625f);
  EXPECT_EQ(Bf16ToFloat(0xc000), -2.0f);
  EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(std::nanf("")))));
}

// Every bf16 value converts to a float and back to itself (NaNs: to a NaN).
TEST(Bf16, EveryValueRoundTrips) {
  for (uint32_t h = 0; h <= 0xffffu; ++h) {
    const float f = Bf16ToFloat(static_cast<uint16_t>(h));
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(f)))) << h;
    } else {
      ASSERT_EQ(FloatToBf16(f), h) << h;
    }
  }
}

// Nearest of the two bf16 neighbours in float64, ties to the even one; past the largest
// finite bf16 a value rounds to inf when it is at least halfway to 2^128 (IEEE's rule).
uint16_t NearestBf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  const uint32_t sign = bits & 0x80000000u, mag = bits & 0x7fffffffu;
  const uint32_t lo = mag & 0xffff0000u;
  const double x = std::fabs(static_cast<double>(f));
  const double below = static_cast<double>(FromBits(lo));
  const double above = lo == 0x7f7f0000u ? std::ldexp(1.0, 128) : static_cast<double>(FromBits(lo + 0x10000u));
  uint32_t pick;
  if (x - below < above - x) {
    pick = lo;
  } else if (x - below > above - x) {
    pick = lo + 0x10000u;
  } else {
    pick = ((lo >> 16) & 1u) ? lo + 0x10000u : lo;
  }
  return static_cast<uint16_t>((sign | pick) >> 16);
}

TEST(Bf16, MatchesNearestEvenOnASweepOfFloats) {
  int64_t checked = 0;
  for (uint64_t b = 0; b <= 0xffffffffu; b += 4093) {
    // The pattern itself, then its upper half with the low halves around a tie.
    const uint32_t high = static_cast<uint32_t>(b) & 0xffff0000u;
    for (uint32_t v : {static_cast<uint32_t>(b), high | 0x7fffu, high | 0x8000u, high | 0x8001u}) {
      const float f = FromBits(v);
      if (std::isnan(f) || std::isinf(f)) continue;
      ASSERT_EQ(FloatToBf16(f), NearestBf16(f)) << std::hex << v;
      ++checked;
    }
  }
  EXPECT_GT(checked, 4000000);
}

}  // namespace
}  // namespace mdopt::kernels
