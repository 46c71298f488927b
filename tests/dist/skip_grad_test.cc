// Params without a gradient (a NULL gradient pointer) under mpirun (N = 1, 2, 3), both
// layouts, both gradient contracts:
//   - params that no rank has a gradient for at some steps (a matrix, an expert stack, one
//     expert of a set of same-shape experts that share a Newton-Schulz batch) keep their
//     weights and every state field bit for bit through those steps, are counted as
//     skipped, and every other param ends where an optimizer that never held the skipped
//     ones puts it (one rank, the mean gradient), within the sharded tolerance; a skipped
//     param keeps its own step count (mdopt_get_state "step"), so that after the skips it
//     steps as a fresh one-rank optimizer fed only its gradients, at its own steps 1, 2, 3
//     (the same bias corrections);
//   - grads=local: a param only rank 0 has a gradient for steps with the mean in which the
//     other ranks' gradients are zeros (DDP's unused parameters);
//   - grads=reduced: ranks that disagree (rank 0 NULL, the others a gradient) get
//     InvalidArgument naming the param on every rank, and nothing changes anywhere.
#include <gtest/gtest.h>

#include <cstring>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "dist_opt/optimizer.h"
#include "tests/dist/dist_harness.h"

namespace mdopt::dist_test {
namespace {

// As sharded_step_test: f32 state on both sides, only the order of cross-rank sums differs.
constexpr double kTolerance = 5e-6;
constexpr int kSteps = 5;

WorstError* const g_worst = AddWorstErrorReport("skip_grad_test");

// Every state field of every param and the model tensors, as bit patterns (collective).
std::map<std::string, std::vector<uint64_t>> Bits(TestModel& m) {
  std::map<std::string, std::vector<uint64_t>> out;
  for (size_t i = 0; i < m.size(); ++i) {
    const std::string& name = m.tensors()[i].name;
    auto put = [&](const std::string& key, const std::vector<double>& v) {
      std::vector<uint64_t>& bits = out[key];
      for (double x : v) {
        uint64_t b;
        std::memcpy(&b, &x, sizeof b);
        bits.push_back(b);
      }
    };
    put(name + "/model", m.Model(i));
    for (const char* field : {"master", "gain_row", "gain_col", "gain_scalar", "radius", "momentum",
                              "exp_avg", "exp_avg_sq"}) {
      absl::StatusOr<std::vector<double>> x = m.opt().GetState(static_cast<int64_t>(i), field);
      if (x.ok()) put(name + "/" + field, *x);
    }
  }
  return out;
}

// Only the entries of the params named.
std::map<std::string, std::vector<uint64_t>> Of(const std::map<std::string, std::vector<uint64_t>>& all,
                                                const std::set<std::string>& names) {
  std::map<std::string, std::vector<uint64_t>> out;
  for (const auto& [key, bits] : all)
    if (names.count(key.substr(0, key.find('/')))) out[key] = bits;
  return out;
}

struct Case {
  std::string spec, layout;
  bool reduced;
  std::vector<Tensor> tensors;  // empty: Tensors(adam)
  std::set<std::string> skipped;  // without a gradient at steps 2 and 3, on every rank
  std::string Name() const {
    std::string n = spec + " layout=" + layout + (reduced ? " grads=reduced" : " grads=local");
    for (const std::string& s : skipped) n += " skip=" + s;
    return n;
  }
};
void PrintTo(const Case& c, std::ostream* os) { *os << c.Name(); }

// Four same-shape experts, each its own param (a module per expert): whole matrices of one
// shape, one after another, go through one batched Newton-Schulz call where a rank holds them.
std::vector<Tensor> Experts() {
  return {{"e0", {6, 10}}, {"e1", {6, 10}}, {"e2", {6, 10}}, {"e3", {6, 10}}, {"out", {9, 6}}};
}

std::vector<Case> Cases() {
  std::vector<Case> c;
  for (const char* spec : {"preset=md-muon", "preset=md-adamw sphere=col tangent=1 gains=col"})
    for (const char* layout : {"rows", "owner"})
      for (bool reduced : {false, true}) {
        c.push_back({spec, layout, reduced, {}, {"small", "experts"}});
        c.push_back({spec, layout, reduced, Experts(), {"e1"}});
      }
  return c;
}

class SkipGrad : public ::testing::TestWithParam<Case> {};

TEST_P(SkipGrad, SkippedParamsStayAndTheOthersStepAsWithoutThem) {
  const Case& c = GetParam();
  Communicator* world = World();
  ASSERT_NE(world, nullptr);
  const int N = world->size(), rank = world->rank();
  const std::string spec = c.spec + " layout=" + c.layout;
  const std::string options =
      std::string("threads=1 update_norms=1 bucket_mb=0.0001 grads=") + (c.reduced ? "reduced" : "local");
  TestModel a(world, options, spec, false, c.tensors);
  // The reference: one rank, the same tensors less the skipped ones, the mean gradient.
  std::vector<Tensor> kept;
  std::vector<size_t> from;  // kept[j] is a's tensor from[j]
  for (size_t i = 0; i < a.size(); ++i) {
    if (c.skipped.count(a.tensors()[i].name)) continue;
    kept.push_back(a.tensors()[i]);
    from.push_back(i);
  }
  std::unique_ptr<Communicator> local = MakeLocalCommunicator();
  TestModel b(local.get(), "threads=1 update_norms=1", spec, false, kept);
  for (size_t j = 0; j < kept.size(); ++j) b.InitAs(j, from[j]);
  // The skipped params alone, one rank, fed their mean gradients at the steps they take.
  std::vector<Tensor> alone;
  std::vector<size_t> alone_from;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!c.skipped.count(a.tensors()[i].name)) continue;
    alone.push_back(a.tensors()[i]);
    alone_from.push_back(i);
  }
  TestModel own(local.get(), "threads=1 update_norms=1", spec, false, alone);
  for (size_t j = 0; j < alone.size(); ++j) own.InitAs(j, alone_from[j]);
  ASSERT_TRUE(a.opt().Finalize().ok());
  ASSERT_TRUE(b.opt().Finalize().ok());
  ASSERT_TRUE(own.opt().Finalize().ok());
  int64_t skipped_matrices = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!c.skipped.count(a.tensors()[i].name)) continue;
    const std::vector<int64_t>& s = a.tensors()[i].shape;
    skipped_matrices += s.size() == 3 ? s[0] : 1;
  }

  for (int step = 1; step <= kSteps; ++step) {
    SCOPED_TRACE(step);
    const bool skipping = step == 2 || step == 3;
    if (c.reduced) {
      a.SetMean(step, N);
    } else {
      a.SetLocal(step, rank);
    }
    for (size_t i = 0; i < a.size(); ++i) {
      if (c.skipped.count(a.tensors()[i].name)) {
        ASSERT_TRUE(a.HasGrad(i, !skipping).ok());
      }
    }
    for (size_t j = 0; j < kept.size(); ++j) {
      std::vector<double> mean(static_cast<size_t>(kept[j].numel()), 0.0);
      for (int r = 0; r < N; ++r) {
        const std::vector<double> g = TestModel::Grad(a.tensors()[from[j]], from[j], step, r);
        for (size_t k = 0; k < g.size(); ++k) mean[k] += g[k] / N;
      }
      std::copy(mean.begin(), mean.end(), b.grad(j).begin());
    }
    const auto before = Of(Bits(a), c.skipped);
    absl::StatusOr<StepResult> ra = a.opt().Step(1.0, nullptr);
    absl::StatusOr<StepResult> rb = b.opt().Step(1.0, nullptr);
    ASSERT_TRUE(ra.ok()) << ra.status();
    ASSERT_TRUE(rb.ok()) << rb.status();
    ASSERT_FALSE(ra->skipped);
    ASSERT_EQ(ra->step, step);
    if (!skipping) {
      for (size_t j = 0; j < alone.size(); ++j) {
        std::vector<double> mean(static_cast<size_t>(alone[j].numel()), 0.0);
        for (int r = 0; r < N; ++r) {
          const std::vector<double> g = TestModel::Grad(a.tensors()[alone_from[j]], alone_from[j], step, r);
          for (size_t k = 0; k < g.size(); ++k) mean[k] += g[k] / N;
        }
        std::copy(mean.begin(), mean.end(), own.grad(j).begin());
      }
      absl::StatusOr<StepResult> ro = own.opt().Step(1.0, nullptr);
      ASSERT_TRUE(ro.ok()) << ro.status();
    }
    // Each param's own count: the steps it took.
    const int64_t own_steps = step <= 1 ? step : step <= 3 ? 1 : step - 2;
    for (size_t i = 0; i < a.size(); ++i) {
      absl::StatusOr<std::vector<double>> t = a.opt().GetState(static_cast<int64_t>(i), "step");
      ASSERT_TRUE(t.ok()) << t.status();
      ASSERT_EQ(t->size(), 1u);
      EXPECT_EQ((*t)[0], c.skipped.count(a.tensors()[i].name) ? own_steps : step) << a.tensors()[i].name;
    }
    const auto after = Of(Bits(a), c.skipped);
    if (skipping) {
      EXPECT_EQ(after, before) << "a param without a gradient changed";
      // The grad norm counts the gradients there are.
      EXPECT_NEAR(ra->grad_norm, rb->grad_norm, 1e-5 * rb->grad_norm);
    } else {
      for (const auto& [key, bits] : after) {
        if (key.find("/model") != std::string::npos) {
          EXPECT_NE(bits, before.at(key)) << key;
        }
      }
    }
    absl::StatusOr<GroupInfo> gi = a.opt().LastStepOfGroup("g");
    absl::StatusOr<GroupInfo> gj = b.opt().LastStepOfGroup("g");
    ASSERT_TRUE(gi.ok() && gj.ok());
    EXPECT_EQ(gi->skipped, skipping ? skipped_matrices : 0);
    if (skipping) {
      EXPECT_EQ(gi->matrices, gj->matrices + skipped_matrices);
      EXPECT_EQ(gi->orthogonalized, gj->orthogonalized);
      EXPECT_EQ(gi->projected, gj->projected);
      EXPECT_EQ(gi->gain_stepped, gj->gain_stepped);
      // Over the matrices that stepped, as the reference's over all of its.
      EXPECT_NEAR(gi->mean_relative_update, gj->mean_relative_update, 1e-4 * gj->mean_relative_update);
    }
  }
  for (size_t j = 0; j < kept.size(); ++j) {
    const double err = RelMaxError(a.Model(from[j]), b.Model(j));
    g_worst->Record(err);
    EXPECT_LE(err, kTolerance) << kept[j].name;
  }
  // The skipped params after their own steps 1..3 (global 1, 4, 5), as the fresh optimizer
  // puts them: weights and every state field, "step" included (3).
  for (size_t j = 0; j < alone.size(); ++j) {
    const double err = RelMaxError(a.Model(alone_from[j]), own.Model(j));
    g_worst->Record(err);
    EXPECT_LE(err, kTolerance) << alone[j].name << " (its own count)";
    for (const char* field : {"master", "gain_row", "gain_col", "gain_scalar", "radius", "momentum",
                              "exp_avg", "exp_avg_sq", "step"}) {
      absl::StatusOr<std::vector<double>> x = a.opt().GetState(static_cast<int64_t>(alone_from[j]), field);
      absl::StatusOr<std::vector<double>> y = own.opt().GetState(static_cast<int64_t>(j), field);
      ASSERT_EQ(x.ok(), y.ok()) << field;
      if (!x.ok()) continue;
      EXPECT_LE(RelMaxError(*x, *y), kTolerance) << alone[j].name << " " << field;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, SkipGrad, ::testing::ValuesIn(Cases()),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           return TestNameOf(info.param.Name()) + "_" + std::to_string(info.index);
                         });

// grads=local, a param only rank 0 has a gradient for at steps 2 and 3: it steps with the
// mean in which every other rank's gradient is zero, as DDP averages an unused parameter.
TEST(SkipGradLocal, OneRankWithAGradientStepsWithTheMeanOfZeros) {
  Communicator* world = World();
  ASSERT_NE(world, nullptr);
  const int N = world->size(), rank = world->rank();
  for (const char* layout : {"rows", "owner"}) {
    SCOPED_TRACE(layout);
    const std::string spec = std::string("preset=md-muon layout=") + layout;
    TestModel a(world, "threads=1 bucket_mb=0.0001", spec, false);
    std::unique_ptr<Communicator> local = MakeLocalCommunicator();
    TestModel b(local.get(), "threads=1", spec, false);
    ASSERT_TRUE(a.opt().Finalize().ok());
    ASSERT_TRUE(b.opt().Finalize().ok());
    const size_t lone = 0;  // "odd"
    for (int step = 1; step <= 4; ++step) {
      const bool only_rank0 = step == 2 || step == 3;
      a.SetLocal(step, rank);
      ASSERT_TRUE(a.HasGrad(lone, !only_rank0 || rank == 0).ok());
      b.SetMean(step, N);
      if (only_rank0) {
        const std::vector<double> g = TestModel::Grad(a.tensors()[lone], lone, step, 0);
        for (size_t k = 0; k < g.size(); ++k) b.grad(lone)[k] = static_cast<float>(g[k] / N);
      }
      absl::StatusOr<StepResult> ra = a.opt().Step(1.0, nullptr);
      ASSERT_TRUE(ra.ok()) << ra.status();
      ASSERT_TRUE(b.opt().Step(1.0, nullptr).ok());
      absl::StatusOr<GroupInfo> gi = a.opt().LastStepOfGroup("g");
      ASSERT_TRUE(gi.ok());
      EXPECT_EQ(gi->skipped, 0);
    }
    for (size_t i = 0; i < a.size(); ++i) {
      const double err = RelMaxError(a.Model(i), b.Model(i));
      g_worst->Record(err);
      EXPECT_LE(err, kTolerance) << "tensor " << i;
    }
  }
}

// grads=reduced: rank 0 passes NULL for a param the others have a gradient for. Every rank's
// step fails naming it, nothing changes on any rank, and the next agreed step is step 2.
TEST(SkipGradReduced, DisagreementFailsOnEveryRankAndChangesNothing) {
  Communicator* world = World();
  ASSERT_NE(world, nullptr);
  const int N = world->size(), rank = world->rank();
  if (N == 1) GTEST_SKIP() << "one rank cannot disagree with itself";
  for (const char* layout : {"rows", "owner"}) {
    SCOPED_TRACE(layout);
    const std::string spec = std::string("preset=md-adamw layout=") + layout;
    TestModel a(world, "threads=1 grads=reduced", spec, false);
    ASSERT_TRUE(a.opt().Finalize().ok());
    a.SetMean(1, N);
    ASSERT_TRUE(a.opt().Step(1.0, nullptr).ok());
    const auto before = Bits(a);
    absl::StatusOr<GroupInfo> g1 = a.opt().LastStepOfGroup("g");
    ASSERT_TRUE(g1.ok());
    a.SetMean(2, N);
    ASSERT_TRUE(a.HasGrad(3, rank != 0).ok());  // "col1"
    absl::StatusOr<StepResult> r = a.opt().Step(1.0, nullptr);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(r.status().message().find("'col1'"), absl::string_view::npos) << r.status();
    EXPECT_EQ(Bits(a), before) << "a refused step changed something";
    EXPECT_EQ(a.opt().steps_taken(), 1);
    absl::StatusOr<GroupInfo> g2 = a.opt().LastStepOfGroup("g");
    ASSERT_TRUE(g2.ok());
    EXPECT_EQ(g2->gain_stepped, g1->gain_stepped);  // still the first step's
    EXPECT_EQ(g2->skipped, 0);
    // Agreed again (every rank without it): it is skipped, the others step.
    ASSERT_TRUE(a.HasGrad(3, false).ok());
    r = a.opt().Step(1.0, nullptr);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->step, 2);
    const auto after = Bits(a);
    EXPECT_EQ(Of(after, {"col1"}), Of(before, {"col1"}));
    EXPECT_NE(Of(after, {"odd"}), Of(before, {"odd"}));
  }
}

}  // namespace
}  // namespace mdopt::dist_test
