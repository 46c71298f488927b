// What mdopt promises about threads= (docs/ARCHITECTURE.md, "Determinism"):
//  - ns_dtype=f32 (the default) and every Adam group: results do not depend on the thread
//    count, by construction: every reduction runs over a fixed partition of rows combined in
//    order, and every Newton-Schulz product is a fixed grid of tiles, each computed by one
//    single-threaded BLAS call (kernels/cpu/fixed_tiles.h). Two optimizers that differ only
//    in threads= agree bit for bit, on any CPU and with any OpenBLAS kernel family.
//  - ns_dtype=bf16 (oneDNN): oneDNN promises the same results only at the same thread count;
//    two runs at one thread count agree bit for bit, and 1 vs 3 threads agree within the bf16
//    trajectory tolerance of ns_bf16_test.
#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

#include "kernels/cpu/newton_schulz_bf16.h"
#include "numeric_util.h"
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

// A checkpoint saved at threads=1 and resumed at threads=3 continues bit for bit like the
// run that never stopped.
TEST_P(ThreadCount, CheckpointResumedAtAnotherThreadCountIsBitwise) {
  const std::string spec = GetParam();
  std::vector<TensorSpec> t = {{"wide", {97, 701}}, {"tall", {733, 61}}};
  if (spec.find("adam") != std::string::npos) t.push_back({"vec", {5000}});
  AbiHarness straight("threads=1", spec, t, 5);
  AbiHarness first("threads=1", spec, t, 5);
  AbiHarness resumed("threads=3", spec, t, 5);
  for (AbiHarness* h : {&straight, &first, &resumed}) MDOPT_ASSERT_OK(mdopt_finalize(h->opt()));
  for (int step = 1; step <= 5; ++step) ASSERT_NO_FATAL_FAILURE(straight.StepChecked(9, step));
  for (int step = 1; step <= 3; ++step) ASSERT_NO_FATAL_FAILURE(first.StepChecked(9, step));
  testing::TempDir dir;
  MDOPT_ASSERT_OK(mdopt_save(first.opt(), dir.Sub("ckpt").c_str()));
  MDOPT_ASSERT_OK(mdopt_load(resumed.opt(), dir.Sub("ckpt").c_str()));
  for (int step = 4; step <= 5; ++step) ASSERT_NO_FATAL_FAILURE(resumed.StepChecked(9, step));
  for (size_t i = 0; i < t.size(); ++i) {
    const std::vector<double> x = straight.Model(i), y = resumed.Model(i);
    ASSERT_EQ(0, std::memcmp(x.data(), y.data(), x.size() * sizeof(double))) << t[i].name;
  }
}

// oneDNN's bf16 GEMMs: bitwise at a fixed thread count, within tolerance across them.
TEST(ThreadCountBf16Ns, SameThreadsBitwiseOtherThreadsWithinTolerance) {
  if (!kernels::fast::Bf16NewtonSchulz::Available()) {
    GTEST_SKIP() << "ns_dtype=bf16 unavailable: this build has no oneDNN or this CPU has no bf16 "
                    "matmul (needs AVX512_BF16 or AMX)";
  }
  std::vector<TensorSpec> t = {{"wide", {97, 701}}, {"tall", {733, 61}}, {"experts", {2, 131, 257}}};
  AbiHarness a("threads=3 ns_dtype=bf16", "preset=md-muon", t, 5);
  AbiHarness b("threads=3 ns_dtype=bf16", "preset=md-muon", t, 5);
  RunAndCompare(a, b, t);
  AbiHarness one("threads=1 ns_dtype=bf16", "preset=md-muon", t, 5);
  MDOPT_ASSERT_OK(mdopt_finalize(one.opt()));
  for (int step = 1; step <= 5; ++step) ASSERT_NO_FATAL_FAILURE(one.StepChecked(9, step));
  for (size_t i = 0; i < t.size(); ++i) {
    // The 20-step bf16 trajectory tolerance of ns_bf16_test (measured 8e-4 there).
    EXPECT_LE(testing::RelMaxError(one.State(i, "master"), a.State(i, "master")), 5e-3) << t[i].name;
  }
}

INSTANTIATE_TEST_SUITE_P(Presets, ThreadCount,
                         ::testing::Values("preset=md-muon", "preset=md-adamw", "preset=router",
                                           "preset=md-muon sphere=col tangent=1 gains=scalar",
                                           "preset=muon", "preset=adamw"));

}  // namespace
}  // namespace mdopt
