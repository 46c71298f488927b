// mdopt_group_info through the C ABI on one rank: before any step, after a step for every
// preset (what ran: Newton-Schulz, projection, gain steps, matrices of 3-D stacks counted
// one by one), after a skipped step, the relative update against one computed here from the
// weights before and after, NaN without update_norms=1, and bad arguments.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "dist_opt/group_spec.h"
#include "test_util.h"

namespace mdopt {
namespace {

using testing::AbiHarness;
using testing::TensorSpec;

mdopt_group_stats Info(mdopt_optimizer* opt, const char* group = "g") {
  mdopt_group_stats info = MDOPT_GROUP_STATS_INIT;
  EXPECT_EQ(mdopt_group_info(opt, group, &info), MDOPT_SUCCESS) << mdopt_last_error();
  return info;
}

class GroupInfoPresets : public ::testing::TestWithParam<const char*> {};

TEST_P(GroupInfoPresets, CountsWhatTheStepDid) {
  const std::string spec = GetParam();
  const kernels::UpdateRule r = ParseGroupSpec(spec)->rule;
  const bool adam = r.base == kernels::Base::kAdamW;
  std::vector<TensorSpec> t = {{"a", {7, 19}}, {"b", {30, 12}}, {"experts", {3, 5, 8}}};
  if (adam) t.push_back({"vec", {13}});
  AbiHarness h("threads=1 update_norms=1", spec, t, 3);
  MDOPT_ASSERT_OK(mdopt_finalize(h.opt()));
  const int64_t matrices = 5 + (adam ? 1 : 0), vectors = adam ? 1 : 0;
  mdopt_group_stats before = Info(h.opt());
  EXPECT_EQ(before.matrices, matrices);
  EXPECT_EQ(before.orthogonalized + before.projected + before.gain_stepped + before.skipped, 0);

  std::vector<std::vector<double>> w0;
  for (size_t i = 0; i < t.size(); ++i) w0.push_back(h.Model(i));
  ASSERT_NO_FATAL_FAILURE(h.StepChecked(3, 1));
  const mdopt_group_stats info = Info(h.opt());
  EXPECT_EQ(info.matrices, matrices);
  EXPECT_EQ(info.orthogonalized, adam ? 0 : matrices);
  EXPECT_EQ(info.projected, r.sphere != kernels::Sphere::kNone ? matrices - vectors : 0);
  EXPECT_EQ(info.gain_stepped, r.gains != kernels::Gains::kNone ? matrices - vectors : 0);
  EXPECT_EQ(info.skipped, 0);
  // The relative update ||W' - W|| / ||W|| (W before the step), matrix by matrix.
  double acc = 0.0;
  for (size_t i = 0; i < t.size(); ++i) {
    const std::vector<double> w1 = h.Model(i);
    const int64_t experts = t[i].shape.size() == 3 ? t[i].shape[0] : 1;
    const size_t per = w1.size() / static_cast<size_t>(experts);
    for (int64_t e = 0; e < experts; ++e) {
      double d = 0.0, q = 0.0;
      for (size_t k = e * per; k < (e + 1) * per; ++k) {
        d += (w1[k] - w0[i][k]) * (w1[k] - w0[i][k]);
        q += w0[i][k] * w0[i][k];  // divided by the weight before the step
      }
      acc += std::sqrt(d / q);
    }
  }
  EXPECT_NEAR(info.mean_relative_update, acc / matrices, 1e-6 * acc / matrices);
}

INSTANTIATE_TEST_SUITE_P(Presets, GroupInfoPresets,
                         ::testing::Values("preset=md-muon", "preset=md-adamw", "preset=muon",
                                           "preset=adamw", "preset=router", "preset=embedding",
                                           "preset=muonh", "preset=adamh", "preset=vector"),
                         [](const ::testing::TestParamInfo<const char*>& info) {
                           std::string n = info.param;
                           for (char& c : n) c = std::isalnum(static_cast<unsigned char>(c)) ? c : '_';
                           return n;
                         });

TEST(GroupInfo, SkippedStepAndNoNorms) {
  std::vector<TensorSpec> t = {{"a", {7, 19}}, {"experts", {3, 5, 8}}};
  AbiHarness h("threads=1", "preset=md-muon", t, 4);
  MDOPT_ASSERT_OK(mdopt_finalize(h.opt()));
  ASSERT_NO_FATAL_FAILURE(h.StepChecked(4, 1));
  mdopt_group_stats info = Info(h.opt());
  EXPECT_EQ(info.orthogonalized, 4);
  EXPECT_TRUE(std::isnan(info.mean_relative_update)) << "update_norms is off";
  h.SetGradients(4, 2);
  h.buffers(0).grad_f32[3] = NAN;
  mdopt_step_info s = MDOPT_STEP_INFO_INIT;
  MDOPT_ASSERT_OK(mdopt_step(h.opt(), 1.0, nullptr, &s));
  ASSERT_EQ(s.skipped, 1);
  info = Info(h.opt());
  EXPECT_EQ(info.skipped, 4);
  EXPECT_EQ(info.orthogonalized + info.projected + info.gain_stepped, 0);
}

TEST(GroupInfo, BadArguments) {
  std::vector<TensorSpec> t = {{"a", {7, 19}}};
  AbiHarness h("threads=1", "preset=md-muon", t, 5);
  mdopt_group_stats info = MDOPT_GROUP_STATS_INIT;
  EXPECT_EQ(mdopt_group_info(h.opt(), "g", &info), MDOPT_INVALID_STATE);  // before finalize
  MDOPT_ASSERT_OK(mdopt_finalize(h.opt()));
  EXPECT_EQ(mdopt_group_info(nullptr, "g", &info), MDOPT_INVALID_ARGUMENT);
  EXPECT_EQ(mdopt_group_info(h.opt(), nullptr, &info), MDOPT_INVALID_ARGUMENT);
  EXPECT_EQ(mdopt_group_info(h.opt(), "g", nullptr), MDOPT_INVALID_ARGUMENT);
  EXPECT_EQ(mdopt_group_info(h.opt(), "nope", &info), MDOPT_INVALID_ARGUMENT);
  EXPECT_NE(std::string(mdopt_last_error()).find("nope"), std::string::npos);
  info.struct_size = MDOPT_GROUP_STATS_SIZE_V1 - 1;
  EXPECT_EQ(mdopt_group_info(h.opt(), "g", &info), MDOPT_INVALID_ARGUMENT);
  EXPECT_NE(std::string(mdopt_last_error()).find("mdopt_group_info"), std::string::npos);
}

}  // namespace
}  // namespace mdopt
