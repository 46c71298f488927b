// Radii from each matrix's global shape (radius=auto, fan_in, a number, init) and the
// per-parameter radius scale (mdopt_param_desc.radius_scale), through the C ABI on the
// float64 reference and the float32 fast path: the `radius` state equals the radius
// computed here from the shape (1e-15 / 1e-6 relative: float32 storage), and after finalize
// each sphere slice of the (float32) model tensor has that norm (1e-6). Bad scales are refused
// naming radius_scale. (Several ranks: sharded_step_test's radius=fan_in specs, which also
// scale every other matrix's radius.)
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "dist_opt/group_spec.h"
#include "test_util.h"

namespace mdopt {
namespace {

using kernels::RadiusMode;
using kernels::Sphere;
using testing::RandomNormal;

struct T {
  const char* name;
  std::vector<int64_t> shape;
  double scale;  // radius_scale given (0: none)
};
const std::vector<T> kTensors = {{"wide", {7, 19}, 0.0}, {"tall", {30, 12}, 0.25},
                                 {"experts", {3, 5, 8}, 3.0}};

// The radius of one slice, written out from the definitions in docs/ABI.md.
double Want(const kernels::UpdateRule& r, int64_t m, int64_t n, double scale, double norm) {
  const double s = scale == 0.0 ? 1.0 : scale;
  switch (r.radius_mode) {
    case RadiusMode::kAuto:
      return s * (r.sphere == Sphere::kFrobenius ? std::sqrt(double(std::max(m, n))) : 1.0);
    case RadiusMode::kFanIn:
      return s * (r.sphere == Sphere::kFrobenius ? std::sqrt(double(m))
                  : r.sphere == Sphere::kRow     ? 1.0
                                                 : std::sqrt(double(m) / double(n)));
    case RadiusMode::kValue: return s * r.radius_value;
    case RadiusMode::kInit: return norm;
  }
  return 0.0;
}

class Radius : public ::testing::TestWithParam<std::tuple<const char*, const char*>> {};

TEST_P(Radius, FromTheGlobalShapeTimesTheScale) {
  const std::string options = std::get<0>(GetParam()), spec = std::get<1>(GetParam());
  const bool f64 = options.find("reference") != std::string::npos;
  SCOPED_TRACE(spec + " | " + options);
  const kernels::UpdateRule rule = ParseGroupSpec(spec)->rule;
  mdopt_comm* comm = nullptr;
  mdopt_optimizer* opt = nullptr;
  ASSERT_EQ(mdopt_comm_create_local(&comm), MDOPT_SUCCESS);
  ASSERT_EQ(mdopt_create(comm, options.c_str(), &opt), MDOPT_SUCCESS) << mdopt_last_error();
  ASSERT_EQ(mdopt_add_group(opt, "g", spec.c_str()), MDOPT_SUCCESS) << mdopt_last_error();
  std::vector<std::vector<float>> w(kTensors.size()), g(kTensors.size());
  std::vector<std::vector<double>> w0(kTensors.size());
  for (size_t i = 0; i < kTensors.size(); ++i) {
    const T& t = kTensors[i];
    int64_t numel = 1;
    for (int64_t s : t.shape) numel *= s;
    w0[i] = RandomNormal(numel, 90 + i, 0.1);
    w[i].assign(w0[i].begin(), w0[i].end());
    w0[i].assign(w[i].begin(), w[i].end());  // the registered (float32) weights
    g[i].assign(numel, 0.0f);
    mdopt_param_desc d = MDOPT_PARAM_DESC_INIT;
    d.name = t.name;
    d.group = "g";
    d.ndim = static_cast<int>(t.shape.size());
    for (size_t k = 0; k < t.shape.size(); ++k) d.shape[k] = t.shape[k];
    d.param = w[i].data();
    d.grad = g[i].data();
    d.radius_scale = t.scale;
    ASSERT_EQ(mdopt_add_param(opt, &d, nullptr), MDOPT_SUCCESS) << mdopt_last_error();
  }
  ASSERT_EQ(mdopt_finalize(opt), MDOPT_SUCCESS) << mdopt_last_error();
  for (size_t i = 0; i < kTensors.size(); ++i) {
    const T& t = kTensors[i];
    const int64_t experts = t.shape.size() == 3 ? t.shape[0] : 1;
    const int64_t m = t.shape[t.shape.size() - 2], n = t.shape.back();
    int64_t count = 0;
    ASSERT_EQ(mdopt_get_state(opt, i, "radius", nullptr, 0, &count), MDOPT_SUCCESS);
    std::vector<double> radius(count);
    ASSERT_EQ(mdopt_get_state(opt, i, "radius", radius.data(), count, nullptr), MDOPT_SUCCESS);
    const int64_t slices = count / experts;
    ASSERT_EQ(slices, rule.sphere == Sphere::kFrobenius ? 1 : rule.sphere == Sphere::kRow ? m : n);
    for (int64_t e = 0; e < experts; ++e) {
      for (int64_t q = 0; q < slices; ++q) {
        auto norm_of = [&](auto get) {
          double sq = 0.0;
          if (rule.sphere == Sphere::kFrobenius) {
            for (int64_t k = 0; k < m * n; ++k) sq += get(k) * get(k);
          } else if (rule.sphere == Sphere::kRow) {
            for (int64_t j = 0; j < n; ++j) sq += get(q * n + j) * get(q * n + j);
          } else {
            for (int64_t a = 0; a < m; ++a) sq += get(a * n + q) * get(a * n + q);
          }
          return std::sqrt(sq);
        };
        const double before = norm_of([&](int64_t k) { return w0[i][e * m * n + k]; });
        const double after = norm_of([&](int64_t k) { return double(w[i][e * m * n + k]); });
        const double want = Want(rule, m, n, t.scale, before);
        EXPECT_NEAR(radius[e * slices + q], want, (f64 ? 1e-15 : 1e-6) * want) << t.name << " " << q;
        EXPECT_NEAR(after, want, 1e-6 * want) << t.name << " slice " << q;
      }
    }
  }
  mdopt_destroy(opt);
  mdopt_comm_destroy(comm);
}

INSTANTIATE_TEST_SUITE_P(
    All, Radius,
    ::testing::Combine(::testing::Values("kernels=reference", "kernels=fast threads=1"),
                       ::testing::Values("preset=md-muon", "preset=md-muon radius=fan_in",
                                         "preset=md-adamw sphere=row radius=fan_in",
                                         "preset=md-muon sphere=col radius=fan_in",
                                         "preset=md-muon radius=2.5", "preset=md-muon radius=init",
                                         "preset=router")));

TEST(RadiusSpec, ParsesAndRefuses) {
  auto g = ParseGroupSpec("preset=md-muon radius=fan_in");
  ASSERT_TRUE(g.ok());
  EXPECT_EQ(g->rule.radius_mode, RadiusMode::kFanIn);
  EXPECT_NE(CanonicalSpec(*g).find("radius=fan_in"), std::string::npos);
  auto bad = ParseGroupSpec("preset=md-muon radius=fanin");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("'radius'"), std::string::npos);
  EXPECT_NE(bad.status().message().find("fan_in"), std::string::npos);
}

TEST(RadiusScale, BadValuesAreRefusedNamingTheField) {
  mdopt_comm* comm = nullptr;
  mdopt_optimizer* opt = nullptr;
  ASSERT_EQ(mdopt_comm_create_local(&comm), MDOPT_SUCCESS);
  ASSERT_EQ(mdopt_create(comm, "threads=1", &opt), MDOPT_SUCCESS);
  ASSERT_EQ(mdopt_add_group(opt, "g", "preset=md-muon"), MDOPT_SUCCESS);
  ASSERT_EQ(mdopt_add_group(opt, "flat", "preset=muon"), MDOPT_SUCCESS);
  ASSERT_EQ(mdopt_add_group(opt, "v", "preset=vector"), MDOPT_SUCCESS);
  std::vector<float> w(35, 0.1f), gr(35, 0.0f);
  struct Bad {
    const char* group;
    int ndim;
    double scale;
  };
  for (const Bad b : {Bad{"g", 2, -1.0}, Bad{"g", 2, NAN}, Bad{"g", 2, INFINITY},
                      Bad{"flat", 2, 0.5}, Bad{"v", 1, 0.5}}) {
    mdopt_param_desc d = MDOPT_PARAM_DESC_INIT;
    d.name = "x";
    d.group = b.group;
    d.ndim = b.ndim;
    d.shape[0] = b.ndim == 1 ? 35 : 5;
    d.shape[1] = 7;
    d.param = w.data();
    d.grad = gr.data();
    d.radius_scale = b.scale;
    EXPECT_EQ(mdopt_add_param(opt, &d, nullptr), MDOPT_INVALID_ARGUMENT) << b.group << " " << b.scale;
    EXPECT_NE(std::string(mdopt_last_error()).find("radius_scale"), std::string::npos)
        << mdopt_last_error();
  }
  mdopt_destroy(opt);
  mdopt_comm_destroy(comm);
}

}  // namespace
}  // namespace mdopt
