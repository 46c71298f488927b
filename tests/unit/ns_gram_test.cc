// The Gram form of Newton-Schulz (ns_form=gram, kernels/cpu/newton_schulz.cc) against the
// float64 reference, next to the standard float32 form on the same input; its independence
// of the thread count; the optimizer with ns_form=gram against ns_form=standard; and the
// batched Newton-Schulz (both forms) against one call per matrix.
//
// Tolerance. Both float32 forms are float32 roundings (6e-8) amplified by NS along the
// small singular values. The Gram form rounds more often on that path (A_0 = X X^T carries
// X's rounding squared; A_{k+1} = P A P and Q_{k+1} = P Q are chains of s x s products) and
// measured 1.0-3.1x the standard form's relative Frobenius error at 5 steps, up to 4.6x at
// 9 steps (longer chains), max abs error up to 3.5x; at most 5.5e-6 relative Frobenius
// (1024 x 256), the same with AVX-512 and OPENBLAS_CORETYPE=Haswell kernels. Bounds: gram
// <= 4 x standard + 1e-6 (relative Frobenius and max abs; the worst case uses 80% of it)
// and gram <= 1e-4 relative Frobenius outright (18x margin).
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/common/ns_coeffs.h"
#include "kernels/cpu/newton_schulz.h"
#include "kernels/reference/reference.h"
#include "ns_test_inputs.h"
#include "test_util.h"

namespace mdopt {
namespace {

using kernels::NsCoeffSet;
using kernels::NsForm;
using testing::NsSetName;
using testing::NsShape;
using testing::SpreadInput;
using kernels::fast::ResolveNsForm;

constexpr double kRatio = 4.0, kFloor = 1e-6, kAbsRelFrob = 1e-4;

struct Errors {
  double rel_frob;  // ||got - want||_F / ||want||_F
  double max_abs;   // max |got - want|
};

Errors Compare(const std::vector<float>& got, const std::vector<double>& want) {
  double e = 0.0, r = 0.0, mx = 0.0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double d = got[i] - want[i];
    e += d * d;
    r += want[i] * want[i];
    mx = std::max(mx, std::abs(d));
  }
  return {std::sqrt(e / r), mx};
}

// The float32 NS in `form` on (a float32 copy of) x; returns O.
std::vector<float> RunNs(NsForm form, NsCoeffSet set, int steps, int64_t m, int64_t n,
                         const std::vector<double>& x) {
  std::vector<float> xf(x.begin(), x.end());
  kernels::fast::NsWorkspace ws;
  const float* o = kernels::fast::NewtonSchulz(set, steps, m, n, xf.data(), &ws, form);
  return std::vector<float>(o, o + xf.size());
}

// Checks the Gram form against the reference, bounded by the standard form's own error.
void ExpectGramNearReference(NsCoeffSet set, int steps, int m, int n,
                             const std::vector<double>& x) {
  std::vector<double> want(x.size());
  kernels::ref::NewtonSchulz(set, steps, m, n, x.data(), want.data());
  const Errors gram = Compare(RunNs(NsForm::kGram, set, steps, m, n, x), want);
  const Errors standard = Compare(RunNs(NsForm::kStandard, set, steps, m, n, x), want);
  EXPECT_LE(gram.rel_frob, kRatio * standard.rel_frob + kFloor) << "standard " << standard.rel_frob;
  EXPECT_LE(gram.max_abs, kRatio * standard.max_abs + kFloor) << "standard " << standard.max_abs;
  EXPECT_LE(gram.rel_frob, kAbsRelFrob);
}

class GramNs : public ::testing::TestWithParam<std::tuple<NsShape, NsCoeffSet, int>> {};

TEST_P(GramNs, MatchesFloat64ReferenceLikeStandardForm) {
  const auto [shape, set, decades] = GetParam();
  ExpectGramNearReference(set, 5, shape.m, shape.n,
                          SpreadInput(shape.m, shape.n, decades, shape.m * 131 + shape.n));
}

// Wide and tall, aspect 2, 3, 4 and 8; 264 x 528 has a 2 x 2 grid of Gram tiles with partial
// last ones (and 3 of the s x s products' 128-row tiles).
const NsShape kShapes[] = {{64, 256},  {256, 64},   {128, 256},  {300, 100},
                         {96, 384},  {128, 1024}, {1024, 256}, {264, 528}};

// A 3 x 3 grid of Gram tiles, once: the float64 reference on it takes seconds under the
// sanitizers, so it is not in the coefficient-set x spread grid above.
TEST(GramNsLarge, ThreeByThreeTilesMatchFloat64Reference) {
  ExpectGramNearReference(NsCoeffSet::kQuintic, 5, 520, 1040,
                          SpreadInput(520, 1040, 4, 520 * 131 + 1040));
}

INSTANTIATE_TEST_SUITE_P(Shapes, GramNs,
                         ::testing::Combine(::testing::ValuesIn(kShapes),
                                            ::testing::Values(NsCoeffSet::kQuintic,
                                                              NsCoeffSet::kJordan,
                                                              NsCoeffSet::kPolarExpress),
                                            ::testing::Values(0, 4)),
                         testing::NsCaseName<GramNs::ParamType>);

// Any step count: 0 (normalisation only), 1 (no s x s product but P_0), 2, and more steps
// than a set has tuples (the last one repeats).
TEST(GramNsSteps, AnyStepCount) {
  const std::vector<double> wide = SpreadInput(96, 384, 2, 5), tall = SpreadInput(384, 96, 2, 6);
  for (NsCoeffSet set : {NsCoeffSet::kQuintic, NsCoeffSet::kJordan, NsCoeffSet::kPolarExpress}) {
    for (int steps : {0, 1, 2, 3, 9}) {
      SCOPED_TRACE(std::string(NsSetName(set)) + " steps " + std::to_string(steps));
      ExpectGramNearReference(set, steps, 96, 384, wide);
      ExpectGramNearReference(set, steps, 384, 96, tall);
    }
  }
}

// The same bits at 1 and 3 threads: every product is on fixed tiles.
TEST(GramNsThreads, BitwiseAcrossThreadCounts) {
  const int saved = omp_get_max_threads();
  for (const NsShape shape : {NsShape{520, 1040}, NsShape{1040, 520}, NsShape{64, 256}}) {
    const std::vector<double> x = SpreadInput(shape.m, shape.n, 3, 11);
    omp_set_num_threads(1);
    const std::vector<float> one = RunNs(NsForm::kGram, NsCoeffSet::kQuintic, 5, shape.m, shape.n, x);
    omp_set_num_threads(3);
    const std::vector<float> three =
        RunNs(NsForm::kGram, NsCoeffSet::kQuintic, 5, shape.m, shape.n, x);
    EXPECT_TRUE(one == three) << shape.m << " x " << shape.n;
  }
  omp_set_num_threads(saved);
}

TEST(GramNsForm, AutoPicksGramFromAspectTwo) {
  EXPECT_EQ(ResolveNsForm(NsForm::kAuto, 128, 256), NsForm::kGram);
  EXPECT_EQ(ResolveNsForm(NsForm::kAuto, 256, 128), NsForm::kGram);
  EXPECT_EQ(ResolveNsForm(NsForm::kAuto, 1024, 4096), NsForm::kGram);
  EXPECT_EQ(ResolveNsForm(NsForm::kAuto, 128, 255), NsForm::kStandard);
  EXPECT_EQ(ResolveNsForm(NsForm::kAuto, 1024, 1024), NsForm::kStandard);
  EXPECT_EQ(ResolveNsForm(NsForm::kGram, 64, 64), NsForm::kGram);
  EXPECT_EQ(ResolveNsForm(NsForm::kStandard, 64, 512), NsForm::kStandard);
}

// After Reserve for a shape and form, NS on it allocates nothing (the workspace keeps its size).
TEST(GramNsForm, ReserveCoversTheCall) {
  for (NsForm form : {NsForm::kAuto, NsForm::kGram, NsForm::kStandard}) {
    kernels::fast::NsWorkspace ws;
    ws.Reserve(96, 384, form);
    const int64_t bytes = ws.bytes();
    std::vector<float> x(96 * 384, 0.5f);
    x[7] = 2.0f;
    kernels::fast::NewtonSchulz(NsCoeffSet::kQuintic, 5, 96, 384, x.data(), &ws, form);
    EXPECT_EQ(ws.bytes(), bytes);
  }
}

// The optimizer: md-muon steps with ns_form=gram and ns_form=standard. The update is O
// scaled by lr, so the weights differ by the NS difference times lr: measured 1.1e-7
// relative max after 5 steps (3.9e-7, Haswell 4.4e-7, on the square matrix, where the Gram
// form is not auto's choice); bound 2e-6. ns_form=auto gives the Gram form's bits at
// aspect 4 and the standard form's on a square matrix.
TEST(GramNsOptimizer, GramAgreesWithStandard) {
  const std::vector<testing::TensorSpec> t = {{"wide", {128, 512}}, {"tall", {512, 128}}, {"square", {96, 96}}};
  testing::AbiHarness gram("ns_form=gram", "preset=md-muon", t, 3);
  testing::AbiHarness standard("ns_form=standard", "preset=md-muon", t, 3);
  testing::AbiHarness automatic("", "preset=md-muon", t, 3);
  for (testing::AbiHarness* h : {&gram, &standard, &automatic}) MDOPT_ASSERT_OK(mdopt_finalize(h->opt()));
  for (int step = 1; step <= 5; ++step) {
    for (testing::AbiHarness* h : {&gram, &standard, &automatic}) {
      h->SetGradients(4, step);
      MDOPT_ASSERT_OK(mdopt_step(h->opt(), 1.0, nullptr, nullptr));
    }
  }
  for (size_t i = 0; i < t.size(); ++i) {
    const std::vector<double> g = gram.State(i, "master"), s = standard.State(i, "master"),
                              a = automatic.State(i, "master");
    EXPECT_LE(testing::RelMaxError(g, s), 2e-6) << t[i].name;
    EXPECT_TRUE(a == (i < 2 ? g : s)) << t[i].name;
  }
}

// NewtonSchulzBatch gives each matrix the bits NewtonSchulz gives it alone, in both forms,
// at 1 and 3 threads (single-tile Gram matrices, several tiles, tall, square, steps 0 and 5).
TEST(NsBatch, BitwiseEqualToOneCallPerMatrix) {
  const int saved = omp_get_max_threads();
  constexpr int64_t kBatch = 3;
  for (const NsShape shape : {NsShape{256, 1024}, NsShape{1024, 256}, NsShape{300, 600}, NsShape{96, 96}}) {
    const int64_t numel = int64_t{shape.m} * shape.n;
    const std::vector<double> x = SpreadInput(shape.m, shape.n * static_cast<int>(kBatch), 2, 21);
    for (NsForm form : {NsForm::kStandard, NsForm::kGram}) {
      for (int steps : {0, 5}) {
        std::vector<float> one(x.size());
        for (int64_t e = 0; e < kBatch; ++e) {
          const std::vector<double> xe(x.begin() + e * numel, x.begin() + (e + 1) * numel);
          const std::vector<float> o = RunNs(form, NsCoeffSet::kPolarExpress, steps, shape.m, shape.n, xe);
          std::copy(o.begin(), o.end(), one.begin() + e * numel);
        }
        for (int threads : {1, 3}) {
          omp_set_num_threads(threads);
          std::vector<float> xf(x.begin(), x.end());
          kernels::fast::NsWorkspace ws;
          const float* o = kernels::fast::NewtonSchulzBatch(NsCoeffSet::kPolarExpress, steps, kBatch,
                                                            shape.m, shape.n, xf.data(), &ws, form);
          EXPECT_TRUE(std::equal(one.begin(), one.end(), o))
              << shape.m << " x " << shape.n << (form == NsForm::kGram ? " gram" : " standard")
              << " steps " << steps << " threads " << threads;
        }
      }
    }
  }
  omp_set_num_threads(saved);
}

}  // namespace
}  // namespace mdopt
