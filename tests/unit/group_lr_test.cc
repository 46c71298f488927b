// mdopt_set_group_lr / mdopt_get_group_lr through the C ABI on one rank: a run whose lr is
// set by the call equals the run with that lr (and the gain_lr it implies) written in the
// spec, bit for bit; a per-step schedule pushed with the call equals the same schedule as
// lr_scale; gain_lr follows lr by the spec's ratio (and stays put for a spec with lr=0);
// refused calls (unknown group, NaN, negative or infinite lr, NULLs) change nothing.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "test_util.h"

namespace mdopt {
namespace {

using testing::AbiHarness;
using testing::TensorSpec;

const std::vector<TensorSpec> kTensors = {{"w", {9, 14}}, {"tall", {20, 6}}, {"experts", {2, 5, 7}}};

struct Case {
  const char* preset;
  bool gains;
  const char* options;
};
void PrintTo(const Case& c, std::ostream* os) { *os << "preset=" << c.preset << " " << c.options; }

std::string Spec(const Case& c, const char* lr, const char* gain_lr) {
  std::string s = std::string("preset=") + c.preset + " lr=" + lr;
  if (c.gains) s += std::string(" gain_lr=") + gain_lr;
  return s;
}

std::vector<std::vector<double>> Models(AbiHarness& h) {
  std::vector<std::vector<double>> out;
  for (size_t i = 0; i < h.size(); ++i) out.push_back(h.Model(i));
  return out;
}

void Lrs(mdopt_optimizer* opt, double* lr, double* gain_lr) {
  ASSERT_EQ(mdopt_get_group_lr(opt, "g", lr, gain_lr), MDOPT_SUCCESS) << mdopt_last_error();
}

class GroupLr : public ::testing::TestWithParam<Case> {};

TEST_P(GroupLr, EqualsTheLrBakedIntoTheSpec) {
  const Case c = GetParam();
  // 0.004 = 0.008 / 2 exactly in binary, so gain_lr = 0.001 * (0.004 / 0.008) = 0.0005.
  AbiHarness set(c.options, Spec(c, "0.008", "0.001"), kTensors, 5);
  AbiHarness baked(c.options, Spec(c, "0.004", "0.0005"), kTensors, 5);
  MDOPT_ASSERT_OK(mdopt_set_group_lr(set.opt(), "g", 0.004));  // before finalize ...
  MDOPT_ASSERT_OK(mdopt_finalize(set.opt()));
  MDOPT_ASSERT_OK(mdopt_finalize(baked.opt()));
  double lr = 0, gain_lr = 0;
  Lrs(set.opt(), &lr, &gain_lr);
  EXPECT_EQ(lr, 0.004);
  EXPECT_EQ(gain_lr, 0.0005);  // also where the preset has no gains (1e-3 there, unused)
  for (int step = 1; step <= 4; ++step) {
    ASSERT_NO_FATAL_FAILURE(set.StepChecked(11, step));
    ASSERT_NO_FATAL_FAILURE(baked.StepChecked(11, step));
  }
  EXPECT_EQ(Models(set), Models(baked));
  // ... and after finalize: 0.002, gain_lr by the same ratio 0.00025.
  MDOPT_ASSERT_OK(mdopt_set_group_lr(set.opt(), "g", 0.002));
  AbiHarness baked2(c.options, Spec(c, "0.004", "0.0005"), kTensors, 5);
  MDOPT_ASSERT_OK(mdopt_finalize(baked2.opt()));
  for (int step = 1; step <= 4; ++step) ASSERT_NO_FATAL_FAILURE(baked2.StepChecked(11, step));
  MDOPT_ASSERT_OK(mdopt_set_group_lr(baked2.opt(), "g", 0.002));
  for (int step = 5; step <= 7; ++step) {
    ASSERT_NO_FATAL_FAILURE(set.StepChecked(11, step));
    ASSERT_NO_FATAL_FAILURE(baked2.StepChecked(11, step));
  }
  Lrs(set.opt(), &lr, &gain_lr);
  EXPECT_EQ(lr, 0.002);
  if (c.gains) {
    EXPECT_EQ(gain_lr, 0.00025);
  }
  EXPECT_EQ(Models(set), Models(baked2));
}

TEST_P(GroupLr, ScheduleEqualsLrScale) {
  const Case c = GetParam();
  AbiHarness pushed(c.options, Spec(c, "0.01", "0.002"), kTensors, 8);
  AbiHarness scaled(c.options, Spec(c, "0.01", "0.002"), kTensors, 8);
  MDOPT_ASSERT_OK(mdopt_finalize(pushed.opt()));
  MDOPT_ASSERT_OK(mdopt_finalize(scaled.opt()));
  const int steps = 8;
  for (int step = 1; step <= steps; ++step) {
    const double s = 1.0 - (1.0 - 1e-8) * (step - 1) / steps;  // the paper's linear decay
    MDOPT_ASSERT_OK(mdopt_set_group_lr(pushed.opt(), "g", 0.01 * s));
    pushed.SetGradients(3, step);
    scaled.SetGradients(3, step);
    mdopt_step_info a = MDOPT_STEP_INFO_INIT, b = MDOPT_STEP_INFO_INIT;
    MDOPT_ASSERT_OK(mdopt_step(pushed.opt(), 1.0, nullptr, &a));
    MDOPT_ASSERT_OK(mdopt_step(scaled.opt(), s, nullptr, &b));
  }
  // lr: (0.01 s) * 1 and 0.01 * s are the same double. gain_lr: 0.002 * ((0.01 s) / 0.01)
  // and 0.002 * s may differ in the last bit, hence a float32-level bound with gains.
  for (size_t i = 0; i < pushed.size(); ++i) {
    if (c.gains) {
      EXPECT_LT(testing::RelMaxError(pushed.Model(i), scaled.Model(i)), 1e-6) << i;
    } else {
      EXPECT_EQ(pushed.Model(i), scaled.Model(i)) << i;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Presets, GroupLr,
    ::testing::Values(Case{"md-muon", true, "threads=1"}, Case{"md-adamw", true, "threads=1"},
                      Case{"muon", false, "threads=1"}, Case{"adamw", false, "threads=1"},
                      Case{"router", true, "threads=1"},
                      Case{"md-muon", true, "threads=1 kernels=reference"},
                      Case{"adamw", false, "threads=1 kernels=reference"}),
    [](const ::testing::TestParamInfo<Case>& i) {
      std::string n = std::string(i.param.preset) +
                      (std::string(i.param.options).find("reference") != std::string::npos
                           ? "_reference" : "_fast");
      for (char& ch : n) if (ch == '-') ch = '_';
      return n;
    });

TEST(GroupLrDefaults, PresetValuesAndZeroSpecLr) {
  AbiHarness h("threads=1", "preset=md-muon", kTensors, 1);
  double lr = 0, gain_lr = 0;
  Lrs(h.opt(), &lr, &gain_lr);
  EXPECT_EQ(lr, 8e-3);
  EXPECT_EQ(gain_lr, 1e-3);
  EXPECT_EQ(mdopt_get_group_lr(h.opt(), "g", nullptr, nullptr), MDOPT_SUCCESS);
  AbiHarness z("threads=1", "preset=md-muon lr=0 gain_lr=0.003", kTensors, 1);
  MDOPT_ASSERT_OK(mdopt_set_group_lr(z.opt(), "g", 0.5));
  Lrs(z.opt(), &lr, &gain_lr);
  EXPECT_EQ(lr, 0.5);
  EXPECT_EQ(gain_lr, 0.003);  // no ratio from lr=0: gain_lr stays as the spec set it
}

TEST(GroupLrErrors, RefusedCallsChangeNothing) {
  AbiHarness h("threads=1", "preset=md-muon lr=0.008", kTensors, 2);
  AbiHarness ref("threads=1", "preset=md-muon lr=0.008", kTensors, 2);
  MDOPT_ASSERT_OK(mdopt_finalize(h.opt()));
  MDOPT_ASSERT_OK(mdopt_finalize(ref.opt()));
  ASSERT_NO_FATAL_FAILURE(h.StepChecked(4, 1));
  ASSERT_NO_FATAL_FAILURE(ref.StepChecked(4, 1));

  EXPECT_EQ(mdopt_set_group_lr(h.opt(), "nope", 0.1), MDOPT_INVALID_ARGUMENT);
  EXPECT_NE(std::string(mdopt_last_error()).find("'nope'"), std::string::npos) << mdopt_last_error();
  for (double bad : {std::nan(""), -1e-3, std::numeric_limits<double>::infinity()}) {
    EXPECT_EQ(mdopt_set_group_lr(h.opt(), "g", bad), MDOPT_INVALID_ARGUMENT) << bad;
    EXPECT_NE(std::string(mdopt_last_error()).find("lr ="), std::string::npos) << mdopt_last_error();
  }
  EXPECT_EQ(mdopt_set_group_lr(nullptr, "g", 0.1), MDOPT_INVALID_ARGUMENT);
  EXPECT_EQ(mdopt_set_group_lr(h.opt(), nullptr, 0.1), MDOPT_INVALID_ARGUMENT);
  EXPECT_NE(std::string(mdopt_last_error()).find("group is NULL"), std::string::npos);
  double lr = 0, gain_lr = 0;
  EXPECT_EQ(mdopt_get_group_lr(h.opt(), "nope", &lr, &gain_lr), MDOPT_INVALID_ARGUMENT);
  EXPECT_EQ(mdopt_get_group_lr(nullptr, "g", &lr, &gain_lr), MDOPT_INVALID_ARGUMENT);
  Lrs(h.opt(), &lr, &gain_lr);
  EXPECT_EQ(lr, 0.008);
  EXPECT_EQ(gain_lr, 1e-3);
  for (int step = 2; step <= 4; ++step) {
    ASSERT_NO_FATAL_FAILURE(h.StepChecked(4, step));
    ASSERT_NO_FATAL_FAILURE(ref.StepChecked(4, step));
  }
  EXPECT_EQ(Models(h), Models(ref));
}

}  // namespace
}  // namespace mdopt
