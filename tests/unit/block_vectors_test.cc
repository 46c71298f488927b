// Both engines against md-block-vectors.json: float64 trajectories of MD steps on fused
// weights with logical blocks (blocks=rows:K and blocks=groups:G:h0,h1,...), made by
// tests/data/make_block_vectors.py, a numpy implementation written from the math in
// docs/ARCHITECTURE.md and independent of mdopt's code. 20 cases: md-muon, md-adamw,
// md-muon gains=scalar tangent=1 and muonh on a GLU fc1 (rows:2), a GQA linear_qkv
// (groups:3:4,2,2), a gated GQA projection (groups:2:3,3,2,1), MLA's kv_down (groups:1:8,3)
// and kv_up (groups:4:3,2), 8 steps each with the first block's gradient 10x the others'.
//
// Through the C ABI, from the case's W0 (exact in float32) and gradients (exact in float32):
//   - kernels=reference (float64 engine): mdopt_get_state "master" (float64, the tensor's
//     row order) after every step, 1e-12 relative max error;
//   - kernels=fast (float32 engine): the model's float32 tensor after every step, 5e-6.
#include <gtest/gtest.h>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "test_util.h"

namespace mdopt {
namespace {

using nlohmann::json;

const json& Vectors() {
  static const json vectors = testing::LoadVectors("md-block-vectors.json");
  return vectors;
}

// "preset=md-muon gains=scalar tangent=1 blocks=groups:3:4,2,2"
std::string SpecOf(const json& c) { return testing::VectorsSpecOf(c); }
std::vector<double> Flatten(const json& m) { return testing::FlattenRows(m); }

// Measured: at most 6.7e-16 relative over the 20 cases (two float64 implementations of the
// same formulas differ by reassociation only).
constexpr double kReferenceTolerance = 1e-12;
// Measured: at most 4.0e-7 (float32 rounding of the state and the arithmetic).
constexpr double kFastTolerance = 5e-6;

struct Engine {
  const char* options;
  double tolerance;
};

class BlockVectors : public ::testing::TestWithParam<int> {
 protected:
  // The case's trajectory on one engine; returns the worst relative max error over its steps.
  double Run(const Engine& e) {
    const json& c = Vectors()["cases"][GetParam()];
    const std::string spec = SpecOf(c);
    const int64_t m = c["shape"][0], n = c["shape"][1];
    const std::vector<double> w0 = Flatten(c["W0"]);
    std::vector<float> w, g(static_cast<size_t>(m * n));
    for (double x : w0) {
      w.push_back(static_cast<float>(x));
      EXPECT_EQ(static_cast<double>(w.back()), x) << "W0 must be exact in float32";
    }
    mdopt_comm* comm = nullptr;
    mdopt_optimizer* opt = nullptr;
    double worst = 0.0;
    [&] {
      MDOPT_ASSERT_OK(mdopt_comm_create_local(&comm));
      MDOPT_ASSERT_OK(mdopt_create(comm, e.options, &opt));
      MDOPT_ASSERT_OK(mdopt_add_group(opt, "g", spec.c_str()));
      mdopt_param_desc d = testing::DescFor("w", "g", {m, n}, MDOPT_DTYPE_F32, w.data(),
                                            MDOPT_DTYPE_F32, g.data());
      MDOPT_ASSERT_OK(mdopt_add_param(opt, &d, nullptr));
      MDOPT_ASSERT_OK(mdopt_finalize(opt));
      const bool reference = std::string(e.options).find("reference") != std::string::npos;
      for (size_t t = 0; t < c["grads"].size(); ++t) {
        const std::vector<double> gd = Flatten(c["grads"][t]);
        for (size_t k = 0; k < gd.size(); ++k) {
          g[k] = static_cast<float>(gd[k]);
          ASSERT_EQ(static_cast<double>(g[k]), gd[k]) << "gradients must be exact in float32";
        }
        mdopt_step_info info = MDOPT_STEP_INFO_INIT;
        MDOPT_ASSERT_OK(mdopt_step(opt, 1.0, nullptr, &info));
        ASSERT_EQ(info.skipped, 0);
        std::vector<double> got;
        if (reference) {
          // The float64 engine's own weights (the model copy is their float32 rounding).
          int64_t count = 0;
          MDOPT_ASSERT_OK(mdopt_get_state(opt, 0, "master", nullptr, 0, &count));
          ASSERT_EQ(count, m * n);
          got.resize(static_cast<size_t>(count));
          MDOPT_ASSERT_OK(mdopt_get_state(opt, 0, "master", got.data(), count, nullptr));
        } else {
          got.assign(w.begin(), w.end());
        }
        const double err = testing::RelMaxError(got, Flatten(c["W"][t]));
        worst = std::max(worst, err);
        EXPECT_LE(err, e.tolerance) << e.options << " " << spec << " " << m << "x" << n
                                    << " step " << t + 1;
      }
    }();
    if (opt != nullptr) mdopt_destroy(opt);
    if (comm != nullptr) mdopt_comm_destroy(comm);
    std::printf("[ measured ] %s %s %lldx%lld: worst weights vs the vectors %.2e (bound %.0e)\n",
                e.options, spec.c_str(), static_cast<long long>(m), static_cast<long long>(n),
                worst, e.tolerance);
    return worst;
  }
};

TEST_P(BlockVectors, Float64ReferenceEngineFollowsTheTrajectory) {
  Run({"kernels=reference threads=1", kReferenceTolerance});
}

TEST_P(BlockVectors, FastEngineFollowsTheTrajectory) {
  Run({"kernels=fast threads=1", kFastTolerance});
}

TEST(BlockVectorsFile, HoldsEveryLayoutAndSpec) {
  const json& cases = Vectors()["cases"];
  ASSERT_EQ(cases.size(), 20u);
  for (const json& c : cases) {
    EXPECT_EQ(c["spec"]["blocks"], c["overrides"]["blocks"]);
    EXPECT_EQ(c["grads"].size(), c["W"].size());
    EXPECT_GE(c["grads"].size(), 8u);
  }
}

// case03_preset_muonh_blocks_rows_2_12x10, ...: the case's index, spec and shape.
INSTANTIATE_TEST_SUITE_P(AllCases, BlockVectors, ::testing::Range(0, 20),
                         [](const ::testing::TestParamInfo<int>& info) {
                           const json& c = Vectors()["cases"][info.param];
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
