// preserve_init=1: the initial weights are kept and their magnitude goes into the gains
// (docs/ARCHITECTURE.md, "The math"): each sphere slice's factor c = ||W_slice|| / R is put
// into the gains along the slice's axis (frobenius: the row gains, else the column gains,
// else the scalar gain, every entry c; row sphere: row gain i = c_i; col sphere: column gain
// j = c_j), so that the direction W / gains is on its sphere and W = gains (x) D is W0.
//
// Checked on the float64 reference and the float32 fast path (1 and 2 threads), f32 and
// bf16 weights, through the C ABI: finalize leaves the model bitwise as registered; the
// effective gains equal the factors computed here from W0 (1e-13 relative in float64, 1e-6
// in float32: the raw gain is stored in float32, phi of it is c to a few ulps); a step at
// lr = 0 and gain_lr = 0 leaves the weights where they were (1e-14 / 1e-6 relative, the
// float32 path moving them by the float32 rounding of the gains only; before this rule the
// first step moved them by tens of percent); and after steps at lr > 0 the direction
// W / gains is on its sphere (1e-12 / 1e-5).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "dist_opt/group_spec.h"
#include "test_util.h"

namespace mdopt {
namespace {

using kernels::Gains;
using kernels::RadiusMode;
using kernels::Sphere;
using testing::AbiHarness;
using testing::TensorSpec;

struct Engine {
  const char* options;
  bool f64;
};
const Engine kEngines[] = {{"kernels=reference", true},
                           {"kernels=fast threads=1", false},
                           {"kernels=fast threads=2", false}};

const char* const kSpecs[] = {
    "preset=md-muon",                                      // frobenius, row gains take c
    "preset=md-adamw gain_param=exp",                      // frobenius, exp
    "preset=md-muon gains=col gain_param=direct",          // frobenius, column gains
    "preset=md-muon gains=scalar radius=2.5",              // frobenius, scalar gain
    "preset=router",                                       // row sphere, row gains c_i
    "preset=md-muon sphere=col gains=col tangent=1",       // col sphere, column gains c_j
    "preset=md-adamw sphere=row gains=rowcol radius=init", // c = 1
};

const std::vector<TensorSpec> kTensors = {{"wide", {7, 19}}, {"tall", {30, 12}}, {"experts", {3, 5, 8}}};

double Radius(const kernels::UpdateRule& r, int64_t m, int64_t n, double slice_norm) {
  switch (r.radius_mode) {
    case RadiusMode::kAuto: return r.sphere == Sphere::kFrobenius ? std::sqrt(static_cast<double>(std::max(m, n))) : 1.0;
    case RadiusMode::kInit: return slice_norm;
    case RadiusMode::kValue: return r.radius_value;
    case RadiusMode::kFanIn:  // sqrt(fan_out) for a sphere of the whole matrix, per column sqrt(m / n)
      return r.sphere == Sphere::kFrobenius ? std::sqrt(static_cast<double>(m))
             : r.sphere == Sphere::kCol     ? std::sqrt(static_cast<double>(m) / n)
                                            : 1.0;
  }
  return 0.0;
}

// The effective gains preserve_init must give one m x n matrix w (row-major), computed here.
struct Want {
  std::vector<double> row, col;
  double scalar = 1.0;
};
Want Expected(const kernels::UpdateRule& r, int64_t m, int64_t n, const double* w) {
  Want g;
  g.row.assign(m, 1.0);
  g.col.assign(n, 1.0);
  if (r.sphere == Sphere::kFrobenius) {
    double sq = 0.0;
    for (int64_t k = 0; k < m * n; ++k) sq += w[k] * w[k];
    const double c = std::sqrt(sq) / Radius(r, m, n, std::sqrt(sq));
    if (r.gains == Gains::kRow || r.gains == Gains::kRowCol) {
      g.row.assign(m, c);
    } else if (r.gains == Gains::kCol) {
      g.col.assign(n, c);
    } else {
      g.scalar = c;
    }
  } else if (r.sphere == Sphere::kRow) {
    for (int64_t i = 0; i < m; ++i) {
      double sq = 0.0;
      for (int64_t j = 0; j < n; ++j) sq += w[i * n + j] * w[i * n + j];
      g.row[i] = std::sqrt(sq) / Radius(r, m, n, std::sqrt(sq));
    }
  } else if (r.sphere == Sphere::kCol) {
    for (int64_t j = 0; j < n; ++j) {
      double sq = 0.0;
      for (int64_t i = 0; i < m; ++i) sq += w[i * n + j] * w[i * n + j];
      g.col[j] = std::sqrt(sq) / Radius(r, m, n, std::sqrt(sq));
    }
  }
  return g;
}

double MaxRel(const std::vector<double>& a, const std::vector<double>& b) {
  double e = 0.0, s = 0.0;
  for (size_t k = 0; k < a.size(); ++k) {
    e = std::max(e, std::abs(a[k] - b[k]));
    s = std::max(s, std::abs(b[k]));
  }
  return e / s;
}

class PreserveInit : public ::testing::TestWithParam<std::tuple<int, int, bool>> {};

TEST_P(PreserveInit, GainsTakeTheInitialNorm) {
  const Engine& eng = kEngines[std::get<0>(GetParam())];
  const std::string spec = kSpecs[std::get<1>(GetParam())];
  const bool bf16 = std::get<2>(GetParam());
  if (bf16 && eng.f64) GTEST_SKIP() << "the reference engine holds float64 weights";
  SCOPED_TRACE(spec + " | " + eng.options + (bf16 ? " | bf16" : ""));
  const kernels::UpdateRule rule = ParseGroupSpec(spec)->rule;
  std::vector<TensorSpec> tensors = kTensors;
  for (TensorSpec& t : tensors) t.param_dtype = t.grad_dtype = bf16 ? MDOPT_DTYPE_BF16 : MDOPT_DTYPE_F32;
  const double gain_tol = eng.f64 ? 1e-13 : 1e-6, still_tol = eng.f64 ? 1e-14 : 1e-6,
               sphere_tol = eng.f64 ? 1e-12 : 1e-5;

  // At lr = 0 and gain_lr = 0 a step changes nothing.
  {
    AbiHarness h(eng.options, spec + " preserve_init=1 lr=0 gain_lr=0", tensors, 11);
    std::vector<std::vector<double>> w0;
    for (size_t i = 0; i < h.size(); ++i) w0.push_back(h.Model(i));
    MDOPT_ASSERT_OK(mdopt_finalize(h.opt()));
    for (size_t i = 0; i < h.size(); ++i) {
      EXPECT_EQ(h.Model(i), w0[i]) << "finalize moved " << h.tensor(i).name;
      const std::vector<int64_t>& sh = h.tensor(i).shape;
      const int64_t experts = sh.size() == 3 ? sh[0] : 1, m = sh[sh.size() - 2], n = sh.back();
      std::vector<double> row, col, scalar;
      for (int64_t e = 0; e < experts; ++e) {
        const Want g = Expected(rule, m, n, w0[i].data() + e * m * n);
        row.insert(row.end(), g.row.begin(), g.row.end());
        col.insert(col.end(), g.col.begin(), g.col.end());
        scalar.push_back(g.scalar);
      }
      if (rule.gains == Gains::kRow || rule.gains == Gains::kRowCol) {
        EXPECT_LE(MaxRel(h.State(i, "gain_row"), row), gain_tol) << h.tensor(i).name;
      }
      if (rule.gains == Gains::kCol || rule.gains == Gains::kRowCol) {
        EXPECT_LE(MaxRel(h.State(i, "gain_col"), col), gain_tol) << h.tensor(i).name;
      }
      if (rule.gains == Gains::kScalar) {
        EXPECT_LE(MaxRel(h.State(i, "gain_scalar"), scalar), gain_tol) << h.tensor(i).name;
      }
    }
    for (int step = 1; step <= 2; ++step) {
      ASSERT_NO_FATAL_FAILURE(h.StepChecked(5, step));
      for (size_t i = 0; i < h.size(); ++i) {
        const double moved = MaxRel(h.Model(i), w0[i]);
        // bf16 weights: the float32 master moves by its rounding; the model copy may round
        // the other way by one bf16 ulp of the largest weight.
        EXPECT_LE(moved, bf16 ? 1.0 / 128 : still_tol) << h.tensor(i).name << " step " << step;
        std::printf("%s %s %s: lr=0 step %d moved %.3g\n", spec.c_str(), eng.options,
                    h.tensor(i).name.c_str(), step, moved);
      }
    }
  }
  // At lr > 0 the direction is on its sphere after every step.
  {
    AbiHarness h(eng.options, spec + " preserve_init=1", tensors, 11);
    MDOPT_ASSERT_OK(mdopt_finalize(h.opt()));
    for (int step = 1; step <= 3; ++step) {
      ASSERT_NO_FATAL_FAILURE(h.StepChecked(5, step));
      for (size_t i = 0; i < h.size(); ++i) {
        const std::vector<int64_t>& sh = h.tensor(i).shape;
        const int64_t experts = sh.size() == 3 ? sh[0] : 1, m = sh[sh.size() - 2], n = sh.back();
        const std::vector<double> d = h.State(i, "direction"), radius = h.State(i, "radius");
        const int64_t slices = radius.size() / experts;
        for (int64_t e = 0; e < experts; ++e) {
          const double* de = d.data() + e * m * n;
          for (int64_t q = 0; q < slices; ++q) {
            double sq = 0.0;
            if (rule.sphere == Sphere::kFrobenius) {
              for (int64_t k = 0; k < m * n; ++k) sq += de[k] * de[k];
            } else if (rule.sphere == Sphere::kRow) {
              for (int64_t j = 0; j < n; ++j) sq += de[q * n + j] * de[q * n + j];
            } else {
              for (int64_t a = 0; a < m; ++a) sq += de[a * n + q] * de[a * n + q];
            }
            const double r = radius[e * slices + q];
            EXPECT_NEAR(std::sqrt(sq), r, sphere_tol * r) << h.tensor(i).name << " slice " << q;
          }
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(All, PreserveInit,
                         ::testing::Combine(::testing::Range(0, 3),
                                            ::testing::Range(0, static_cast<int>(std::size(kSpecs))),
                                            ::testing::Bool()));

// Where the gains cannot hold the initial norm, the spec is refused naming the key.
TEST(PreserveInitSpec, RefusedWithoutGainsAlongTheSphere) {
  for (const char* spec : {"preset=muonh preserve_init=1", "preset=embedding preserve_init=1",
                           "preset=router gains=col preserve_init=1",
                           "preset=md-muon sphere=col gains=row preserve_init=1",
                           "preset=md-muon sphere=row gains=scalar preserve_init=1"}) {
    auto g = ParseGroupSpec(spec);
    ASSERT_FALSE(g.ok()) << spec;
    EXPECT_EQ(g.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(g.status().message().find("'preserve_init'"), std::string::npos) << g.status();
  }
  for (const char* spec : {"preset=muon preserve_init=1", "preset=vector preserve_init=1",
                           "preset=muonh radius=init gains=scalar preserve_init=1"}) {
    EXPECT_TRUE(ParseGroupSpec(spec).ok()) << spec;
  }
}

}  // namespace
}  // namespace mdopt
