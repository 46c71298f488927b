// Results must not depend on the number of OpenMP threads (docs/ARCHITECTURE.md,
// "Determinism"): every reduction runs over a fixed partition of rows, combined in order,
// and Newton-Schulz's BLAS calls split work over rows and columns of the output only.
// Two optimizers that differ only in threads= must agree bit for bit.
#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

#include "kernels/cpu/newton_schulz_bf16.h"
#include "test_util.h"

namespace mdopt {
namespace {

using testing::AbiHarness;
using testing::TensorSpec;

void RunAndCompare(AbiHarness& one, AbiHarness& three, const std::vector<TensorSpec>& t) {
  MDOPT_ASSERT_OK(mdopt_finalize(one.opt()));
  MDOPT_ASSERT_OK(mdopt_finalize(three.opt()));
  for (int step = 1; step <= 5; ++step) {
    one.SetGradients(9, step);
    three.SetGradients(9, step);
    mdopt_step_info a{}, b{};
    a.struct_size = b.struct_size = sizeof(mdopt_step_info);
    MDOPT_ASSERT_OK(mdopt_step(one.opt(), 1.0, nullptr, &a));
    MDOPT_ASSERT_OK(mdopt_step(three.opt(), 1.0, nullptr, &b));
    ASSERT_EQ(a.grad_norm, b.grad_norm);
  }
  for (size_t i = 0; i < t.size(); ++i) {
    const std::vector<double> x = one.Model(i), y = three.Model(i);
    ASSERT_EQ(0, std::memcmp(x.data(), y.data(), x.size() * sizeof(double))) << t[i].name;
  }
}

class ThreadCount : public ::testing::TestWithParam<const char*> {};

TEST_P(ThreadCount, OneAndThreeThreadsAgreeBitwise) {
  const std::string spec = GetParam();
  // Big enough that passes and BLAS run in parallel, odd sizes so partitions are uneven.
  std::vector<TensorSpec> t = {{"wide", {97, 701}}, {"tall", {733, 61}}, {"experts", {2, 131, 257}}};
  if (spec.find("adam") != std::string::npos) t.push_back({"vec", {5000}});
  AbiHarness one("threads=1", spec, t, 5);
  AbiHarness three("threads=3", spec, t, 5);
  RunAndCompare(one, three, t);
}

// oneDNN's bf16 GEMMs must not change results with the thread count either.
TEST(ThreadCountBf16Ns, OneAndThreeThreadsAgreeBitwise) {
  if (!kernels::fast::Bf16NewtonSchulz::Available()) GTEST_SKIP() << "no oneDNN bf16 matmul in this build or on this CPU";
  std::vector<TensorSpec> t = {{"wide", {97, 701}}, {"tall", {733, 61}}, {"experts", {2, 131, 257}}};
  AbiHarness one("threads=1 ns_dtype=bf16", "preset=md-muon", t, 5);
  AbiHarness three("threads=3 ns_dtype=bf16", "preset=md-muon", t, 5);
  RunAndCompare(one, three, t);
}

INSTANTIATE_TEST_SUITE_P(Presets, ThreadCount,
                         ::testing::Values("preset=md-muon", "preset=md-adamw", "preset=router",
                                           "preset=md-muon sphere=col tangent=1 gains=scalar",
                                           "preset=muon", "preset=adamw"));

}  // namespace
}  // namespace mdopt
