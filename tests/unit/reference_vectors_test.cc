// The float64 reference against md-vectors.json: 30 trajectories from an independent
// implementation that agrees with the authors' code. Also checks that each preset (with
// the case's overrides) parses to exactly the spec the vectors were made with, and holds
// the float32 fast engine to the same trajectories.
#include <gtest/gtest.h>

#include <cctype>
#include <cstdio>
#include <string>

#include "dist_opt/group_spec.h"
#include "kernels/reference/reference.h"
#include "test_util.h"

namespace mdopt {
namespace {

using nlohmann::json;

std::string SpecOf(const json& c) { return testing::VectorsSpecOf(c); }
std::vector<double> Flatten(const json& m) { return testing::FlattenRows(m); }

class ReferenceVectors : public ::testing::TestWithParam<int> {};

TEST_P(ReferenceVectors, PresetParsesToTheVectorsSpec) {
  static const json vectors = testing::LoadVectors();
  const json& c = vectors["cases"][GetParam()];
  absl::StatusOr<GroupSpec> g = ParseGroupSpec(SpecOf(c));
  ASSERT_TRUE(g.ok()) << g.status();
  const kernels::UpdateRule& r = g->rule;
  const json& s = c["spec"];
  EXPECT_EQ(ToString(r.base), s["base"].get<std::string>());
  EXPECT_EQ(ToString(r.sphere), s["sphere"].get<std::string>());
  EXPECT_EQ(ToString(r.gains), s["gains"].get<std::string>());
  EXPECT_EQ(ToString(r.gain_param), s["gain_param"].get<std::string>());
  EXPECT_EQ(ToString(r.ns_coeffs), s["ns_coeffs"].get<std::string>());
  const std::string radius = s["radius"].get<std::string>();
  if (radius == "auto") {
    EXPECT_EQ(r.radius_mode, kernels::RadiusMode::kAuto);
  } else {
    EXPECT_EQ(r.radius_mode, kernels::RadiusMode::kValue);
    EXPECT_EQ(r.radius_value, std::stod(radius));
  }
  EXPECT_EQ(r.lr, s["lr"].get<double>());
  // gain_lr only matters with gains (the vectors write 0 for gainless presets, mdopt keeps
  // the default 1e-3 there so that turning gains on does not freeze them).
  if (r.gains != kernels::Gains::kNone) {
    EXPECT_EQ(r.gain_lr, s["gain_lr"].get<double>());
  }
  EXPECT_EQ(r.beta1, s["beta1"].get<double>());
  EXPECT_EQ(r.beta2, s["beta2"].get<double>());
  EXPECT_EQ(r.eps, s["eps"].get<double>());
  EXPECT_EQ(r.weight_decay, s["weight_decay"].get<double>());
  if (r.base == kernels::Base::kMuon) {
    EXPECT_EQ(ToString(r.muon_scale), s["muon_scale"].get<std::string>());
    EXPECT_EQ(r.momentum, s["momentum"].get<double>());
    EXPECT_EQ(r.nesterov, s["nesterov"].get<bool>());
    EXPECT_EQ(r.ns_steps, s["ns_steps"].get<int>());
  }
}

// Tolerance: two float64 implementations of the same formulas differ by reassociation only
// (measured: at most 1e-15 relative over all 30 cases).
constexpr double kReferenceTolerance = 1e-13;

TEST_P(ReferenceVectors, Float64ReferenceFollowsTheTrajectory) {
  static const json vectors = testing::LoadVectors();
  const json& c = vectors["cases"][GetParam()];
  const kernels::UpdateRule rule = ParseGroupSpec(SpecOf(c))->rule;
  const int64_t m = c["shape"][0], n = c["shape"][1];
  kernels::ref::MatrixState st;
  const std::vector<double> w0 = Flatten(c["W0"]);
  ASSERT_EQ(kernels::ref::Init(rule, m, n, w0.data(), /*project=*/true, &st), -1);
  for (size_t t = 0; t < c["grads"].size(); ++t) {
    const std::vector<double> g = Flatten(c["grads"][t]);
    kernels::ref::Step(rule, g.data(), rule.lr, rule.gain_lr, static_cast<int64_t>(t + 1), &st);
    const double err = testing::RelMaxError(st.w, Flatten(c["W"][t]));
    EXPECT_LE(err, kReferenceTolerance) << SpecOf(c) << " " << m << "x" << n << " step " << t + 1;
  }
}

// The float32 engine through the C ABI, from the float32-rounded W0: float32 rounding of
// inputs and state, nothing else (measured: at most 4.6e-7 relative after 10 steps).
constexpr double kFastTolerance = 5e-6;

TEST_P(ReferenceVectors, FastEngineFollowsTheTrajectory) {
  static const json vectors = testing::LoadVectors();
  const json& c = vectors["cases"][GetParam()];
  const int64_t m = c["shape"][0], n = c["shape"][1];
  std::vector<float> w, g(static_cast<size_t>(m * n));
  for (double x : Flatten(c["W0"])) w.push_back(static_cast<float>(x));
  mdopt_comm* comm = nullptr;
  mdopt_optimizer* opt = nullptr;
  MDOPT_ASSERT_OK(mdopt_comm_create_local(&comm));
  MDOPT_ASSERT_OK(mdopt_create(comm, "kernels=fast", &opt));
  MDOPT_ASSERT_OK(mdopt_add_group(opt, "g", SpecOf(c).c_str()));
  mdopt_param_desc d = MDOPT_PARAM_DESC_INIT;
  d.name = "w";
  d.group = "g";
  d.ndim = 2;
  d.shape[0] = m;
  d.shape[1] = n;
  d.param = w.data();
  d.grad = g.data();
  MDOPT_ASSERT_OK(mdopt_add_param(opt, &d, nullptr));
  MDOPT_ASSERT_OK(mdopt_finalize(opt));
  for (size_t t = 0; t < c["grads"].size(); ++t) {
    const std::vector<double> gd = Flatten(c["grads"][t]);
    for (size_t k = 0; k < gd.size(); ++k) g[k] = static_cast<float>(gd[k]);
    MDOPT_ASSERT_OK(mdopt_step(opt, 1.0, nullptr, nullptr));
    std::vector<double> got(w.begin(), w.end());
    const double err = testing::RelMaxError(got, Flatten(c["W"][t]));
    EXPECT_LE(err, kFastTolerance) << SpecOf(c) << " " << m << "x" << n << " step " << t + 1;
  }
  mdopt_destroy(opt);
  mdopt_comm_destroy(comm);
}

// case07_preset_md_muon_gains_row_24x16, ...: the case's index, spec and shape.
INSTANTIATE_TEST_SUITE_P(AllCases, ReferenceVectors, ::testing::Range(0, 30),
                         [](const ::testing::TestParamInfo<int>& info) {
                           static const json vectors = testing::LoadVectors();
                           const json& c = vectors["cases"][info.param];
                           char index[8];
                           std::snprintf(index, sizeof index, "case%02d_", info.param);
                           std::string name = index + SpecOf(c) + "_" +
                                              std::to_string(c["shape"][0].get<int64_t>()) + "x" +
                                              std::to_string(c["shape"][1].get<int64_t>());
                           for (char& ch : name)
                             if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
                           return name;
                         });

}  // namespace
}  // namespace mdopt
