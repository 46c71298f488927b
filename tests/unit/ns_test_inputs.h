// Inputs and case names shared by the Newton-Schulz form tests (ns_gram_test: float32,
// ns_bf16_gram_test: bf16): both compare a form against the float64 reference on the same
// matrices, and a case should mean the same input in either.
#ifndef MDOPT_TESTS_UNIT_NS_TEST_INPUTS_H_
#define MDOPT_TESTS_UNIT_NS_TEST_INPUTS_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <ostream>
#include <string>
#include <tuple>
#include <vector>

#include <gtest/gtest.h>

#include "kernels/common/update_rule.h"
#include "test_util.h"

namespace mdopt::testing {

struct NsShape {
  int m, n;
};

// Gaussian m x n, its short side's rows (wide) or columns (tall) scaled geometrically from
// 1 down to 10^-decades: singular values spread over that many decades, as in a gradient.
inline std::vector<double> SpreadInput(int m, int n, double decades, uint64_t seed) {
  std::vector<double> x = RandomNormal(static_cast<size_t>(m) * n, seed);
  const int s = std::min(m, n);
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j)
      x[static_cast<size_t>(i) * n + j] *= std::pow(10.0, -decades * (m <= n ? i : j) / (s - 1));
  return x;
}

inline const char* NsSetName(kernels::NsCoeffSet set) {
  return set == kernels::NsCoeffSet::kQuintic  ? "quintic"
         : set == kernels::NsCoeffSet::kJordan ? "jordan"
                                               : "polar_express";
}

// Test-case name "m<m>_n<n>_<set>_spread<decades>" of a (shape, set, decades) parameter.
template <typename Param>
std::string NsCaseName(const ::testing::TestParamInfo<Param>& info) {
  const NsShape shape = std::get<0>(info.param);
  return "m" + std::to_string(shape.m) + "_n" + std::to_string(shape.n) + "_" +
         NsSetName(std::get<1>(info.param)) + "_spread" + std::to_string(std::get<2>(info.param));
}

// gtest prints parameters with these (instead of their bytes) in test lists and failures.
inline void PrintTo(const NsShape& s, std::ostream* os) { *os << s.m << "x" << s.n; }

}  // namespace mdopt::testing

namespace mdopt::kernels {
inline void PrintTo(NsCoeffSet set, std::ostream* os) { *os << testing::NsSetName(set); }
}  // namespace mdopt::kernels

#endif  // MDOPT_TESTS_UNIT_NS_TEST_INPUTS_H_
