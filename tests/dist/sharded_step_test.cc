// The sharded step under mpirun (N = 2, 3, 4): for every preset, both layouts, both
// gradient contracts and one or many buckets, 20 steps on N ranks give the weights of the
// same optimizer on one rank (an in-process local communicator fed the mean gradient) within
// kTolerance, on shapes that do not divide evenly (m < N, odd m, 1 x n, m x 1, 1-D, a 3-D
// stack, one matrix larger than all others together). Every rank checks its whole model
// tensor after each run (the weight all-gather) and the collective mdopt_get_state fields.
// Also: state bytes per rank against the layout's bound, and a NaN on one rank only makes
// every rank skip the same step with identical state.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "dist_opt/optimizer.h"
#include "kernels/common/bf16.h"

namespace mdopt {
namespace {

// f32 state on both sides; the only differences are the order of cross-rank sums and the
// mean's rounding. Measured worst case 3.0e-7 (N = 4, 2026-12-01).
constexpr double kTolerance = 5e-6;
constexpr int kSteps = 20;

// Worst error seen (f32 cases), printed at the end for the tolerance table.
double g_worst = 0.0;
struct ReportWorst : ::testing::Environment {
  void TearDown() override { std::printf("sharded_step_test: worst relative error vs one rank %.3g\n", g_worst); }
};
const auto* const kReport = ::testing::AddGlobalTestEnvironment(new ReportWorst);

Communicator* World() {
  static std::unique_ptr<Communicator> world = [] {
    absl::StatusOr<std::unique_ptr<Communicator>> c = MakeMpiCommunicator(nullptr);
    if (!c.ok()) {
      ADD_FAILURE() << c.status();
      return std::unique_ptr<Communicator>();
    }
    return *std::move(c);
  }();
  return world.get();
}

std::vector<double> Normal(size_t n, uint64_t seed, double scale) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> d(0.0, scale);
  std::vector<double> v(n);
  for (double& x : v) x = d(rng);
  return v;
}

struct Tensor {
  std::string name;
  std::vector<int64_t> shape;
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    return n;
  }
};

std::vector<Tensor> Tensors(bool adam) {
  std::vector<Tensor> t = {{"odd", {7, 19}}, {"small", {2, 9}},   {"row1", {1, 11}},
                           {"col1", {9, 1}}, {"experts", {3, 5, 8}}, {"big", {40, 90}}};
  if (adam) t.push_back({"vec", {13}});
  return t;
}

// One optimizer over the test's tensors with its own weight and gradient buffers.
class OptRun {
 public:
  OptRun(Communicator* comm, const std::string& options, const std::string& spec, bool bf16)
      : bf16_(bf16) {
    absl::StatusOr<OptimizerOptions> o = ParseOptimizerOptions(options);
    EXPECT_TRUE(o.ok()) << o.status();
    opt_ = std::make_unique<Optimizer>(comm, *o);
    EXPECT_TRUE(opt_->AddGroup("g", spec).ok());
    const bool adam = ParseGroupSpec(spec)->rule.base == kernels::Base::kAdamW;
    tensors_ = Tensors(adam);
    w_.resize(tensors_.size());
    wb_.resize(tensors_.size());
    g_.resize(tensors_.size());
    for (size_t i = 0; i < tensors_.size(); ++i) {
      const Tensor& t = tensors_[i];
      const std::vector<double> w0 = Normal(t.numel(), 17 + i, 1.0 / std::sqrt(double(t.shape.back())));
      w_[i].assign(w0.begin(), w0.end());
      for (float f : w_[i]) wb_[i].push_back(kernels::FloatToBf16(f));
      g_[i].assign(t.numel(), 0.0f);
      ParamDescription d;
      d.name = t.name;
      d.group = "g";
      d.ndim = static_cast<int>(t.shape.size());
      for (size_t k = 0; k < t.shape.size(); ++k) d.shape[k] = t.shape[k];
      d.param_dtype = bf16 ? 1 : 0;
      d.param = bf16 ? static_cast<void*>(wb_[i].data()) : w_[i].data();
      d.grad_dtype = 0;
      d.grad = g_[i].data();
      EXPECT_TRUE(opt_->AddParam(d).ok());
    }
  }

  Optimizer& opt() { return *opt_; }
  size_t size() const { return tensors_.size(); }

  // Gradient of `rank` at `step`: a shared part plus a rank's own part; mean() is their mean.
  static std::vector<double> Grad(const Tensor& t, size_t i, int step, int rank) {
    std::vector<double> g = Normal(t.numel(), 1000 * step + i, 0.1);
    const std::vector<double> own = Normal(t.numel(), 77 + 1000 * step + 31 * i + 7919 * rank, 0.05);
    for (size_t k = 0; k < g.size(); ++k) g[k] += own[k];
    return g;
  }
  void SetLocal(int step, int rank) {
    for (size_t i = 0; i < size(); ++i) {
      const std::vector<double> g = Grad(tensors_[i], i, step, rank);
      std::copy(g.begin(), g.end(), g_[i].begin());
    }
  }
  void SetMean(int step, int world) {
    for (size_t i = 0; i < size(); ++i) {
      std::vector<double> mean(tensors_[i].numel(), 0.0);
      for (int r = 0; r < world; ++r) {
        const std::vector<double> g = Grad(tensors_[i], i, step, r);
        for (size_t k = 0; k < g.size(); ++k) mean[k] += g[k] / world;
      }
      std::copy(mean.begin(), mean.end(), g_[i].begin());
    }
  }
  void Poison(size_t i) { g_[i][g_[i].size() / 2] = NAN; }

  std::vector<double> Model(size_t i) const {
    std::vector<double> v;
    if (bf16_) {
      for (uint16_t h : wb_[i]) v.push_back(kernels::Bf16ToFloat(h));
    } else {
      v.assign(w_[i].begin(), w_[i].end());
    }
    return v;
  }

 private:
  bool bf16_;
  std::unique_ptr<Optimizer> opt_;
  std::vector<Tensor> tensors_;
  std::vector<std::vector<float>> w_, g_;
  std::vector<std::vector<uint16_t>> wb_;
};

double RelMaxError(const std::vector<double>& a, const std::vector<double>& b) {
  double err = 0.0, ref = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    err = std::max(err, std::abs(a[i] - b[i]));
    ref = std::max(ref, std::abs(b[i]));
  }
  return ref > 0 ? err / ref : err;
}

struct Case {
  std::string spec;
  std::string layout;    // rows | owner
  bool reduced;          // grads=reduced
  bool many_buckets;     // one bucket per parameter
  bool bf16 = false;     // bf16 weights (f32 master and grads)
  bool ns_comm_bf16 = false;
  double tolerance = kTolerance;
  bool deferred = false;  // gather=deferred + GatherParams before comparing
  std::string Name() const {
    std::string n = spec + " layout=" + layout + (reduced ? " grads=reduced" : " grads=local") +
                    (many_buckets ? " bucket_mb=0.0001" : "") + (bf16 ? " bf16" : "") +
                    (ns_comm_bf16 ? " ns_comm_dtype=bf16" : "") + (deferred ? " gather=deferred" : "");
    return n;
  }
};

std::vector<Case> Cases() {
  std::vector<Case> c;
  const std::vector<std::string> specs = {
      "preset=md-muon",    "preset=md-adamw", "preset=muon",      "preset=adamw",
      "preset=muonh",      "preset=adamh",    "preset=router",    "preset=embedding",
      "preset=vector",     "preset=md-muon sphere=col tangent=1 gains=scalar",
      "preset=md-adamw tangent=1 gains=col"};
  for (const std::string& s : specs)
    for (const char* layout : {"rows", "owner"})
      for (bool reduced : {false, true}) c.push_back({s, layout, reduced, !reduced});
  c.push_back({"preset=md-muon", "rows", false, false, true});
  c.push_back({"preset=md-adamw", "rows", false, true, true});
  // bf16 NS traffic: X and O rounded to bf16 on the wire (bf16's own error, not reassociation).
  c.push_back({"preset=md-muon", "rows", false, true, false, true, 2e-2});
  // The weight all-gather left to mdopt_gather_params (before each forward).
  for (const char* layout : {"rows", "owner"}) {
    Case d{"preset=md-muon", layout, false, true};
    d.deferred = true;
    c.push_back(d);
    Case e{"preset=md-adamw", layout, false, false};
    e.deferred = true;
    c.push_back(e);
  }
  return c;
}

void Compare(const Case& c) {
  SCOPED_TRACE(c.Name());
  Communicator* world = World();
  ASSERT_NE(world, nullptr);
  const int N = world->size(), rank = world->rank();
  std::string options = std::string("threads=1 update_norms=1 grads=") + (c.reduced ? "reduced" : "local");
  if (c.many_buckets) options += " bucket_mb=0.0001";
  if (c.ns_comm_bf16) options += " ns_comm_dtype=bf16";
  if (c.deferred) options += " gather=deferred";
  const std::string spec = c.spec + " layout=" + c.layout;
  std::unique_ptr<Communicator> local = MakeLocalCommunicator();
  OptRun sharded(world, options, spec, c.bf16);
  OptRun single(local.get(), "threads=1 update_norms=1", spec, c.bf16);
  ASSERT_TRUE(sharded.opt().Finalize().ok());
  ASSERT_TRUE(single.opt().Finalize().ok());
  for (size_t i = 0; i < sharded.size(); ++i)
    ASSERT_LE(RelMaxError(sharded.Model(i), single.Model(i)), 1e-6) << "after finalize, tensor " << i;
  for (int step = 1; step <= kSteps; ++step) {
    if (c.reduced) {
      sharded.SetMean(step, N);
    } else {
      sharded.SetLocal(step, rank);
    }
    single.SetMean(step, N);
    absl::StatusOr<StepResult> a = sharded.opt().Step(1.0, nullptr);
    absl::StatusOr<StepResult> b = single.opt().Step(1.0, nullptr);
    ASSERT_TRUE(a.ok()) << a.status();
    ASSERT_TRUE(b.ok()) << b.status();
    if (c.deferred) {
      ASSERT_TRUE(sharded.opt().GatherParams(nullptr).ok());
    }
    ASSERT_FALSE(a->skipped);
    ASSERT_EQ(a->step, step);
    ASSERT_NEAR(a->grad_norm, b->grad_norm, 1e-5 * b->grad_norm);
  }
  for (size_t i = 0; i < sharded.size(); ++i) {
    const double err = RelMaxError(sharded.Model(i), single.Model(i));
    if (!c.ns_comm_bf16) g_worst = std::max(g_worst, err);
    EXPECT_LE(err, c.tolerance) << "tensor " << i;
    for (const char* field : {"master", "gain_row", "gain_col", "gain_scalar", "radius"}) {
      absl::StatusOr<std::vector<double>> x = sharded.opt().GetState(static_cast<int64_t>(i), field);
      absl::StatusOr<std::vector<double>> y = single.opt().GetState(static_cast<int64_t>(i), field);
      ASSERT_EQ(x.ok(), y.ok()) << field;
      if (!x.ok()) continue;
      ASSERT_EQ(x->size(), y->size()) << field;
      EXPECT_LE(RelMaxError(*x, *y), c.tolerance) << "tensor " << i << " " << field;
    }
  }
  // mdopt_group_info: every matrix counted once over the ranks, as on one rank; the relative
  // update (measured over every rank's rows) as on one rank.
  absl::StatusOr<GroupInfo> gi = sharded.opt().LastStepOfGroup("g");
  absl::StatusOr<GroupInfo> gj = single.opt().LastStepOfGroup("g");
  ASSERT_TRUE(gi.ok() && gj.ok());
  EXPECT_EQ(gi->matrices, gj->matrices);
  EXPECT_EQ(gi->orthogonalized, gj->orthogonalized);
  EXPECT_EQ(gi->projected, gj->projected);
  EXPECT_EQ(gi->gain_stepped, gj->gain_stepped);
  EXPECT_EQ(gi->skipped, 0);
  const kernels::UpdateRule rule = ParseGroupSpec(spec)->rule;
  const int64_t vectors = rule.base == kernels::Base::kAdamW ? 1 : 0;  // "vec": no sphere, no gains
  EXPECT_EQ(gi->orthogonalized, rule.base == kernels::Base::kMuon ? gi->matrices : 0);
  EXPECT_EQ(gi->projected, rule.sphere != kernels::Sphere::kNone ? gi->matrices - vectors : 0);
  EXPECT_EQ(gi->gain_stepped, rule.gains != kernels::Gains::kNone ? gi->matrices - vectors : 0);
  EXPECT_GT(gi->mean_relative_update, 0.0);
  EXPECT_NEAR(gi->mean_relative_update, gj->mean_relative_update,
              std::max(1e-4, c.tolerance) * gj->mean_relative_update);

  // State bytes: owner layout holds every byte once; rows layout 1/N of every matrix's
  // per-element state plus one padded row, replicated column and scalar gains and radii.
  absl::StatusOr<int64_t> mine = sharded.opt().StateBytes();
  absl::StatusOr<int64_t> all = single.opt().StateBytes();
  ASSERT_TRUE(mine.ok() && all.ok());
  std::vector<double> per_rank(static_cast<size_t>(N), 0.0);
  per_rank[rank] = static_cast<double>(*mine);
  ASSERT_TRUE(AllReduceSum(*world, absl::MakeSpan(per_rank)).ok());
  const ShardPlan& plan = *sharded.opt().plan();
  double slack = 0.0, replicated = 0.0;
  for (const SlotPlan& s : plan.slots) {
    const double per_elem = c.bf16 ? 12 : 8;  // at most: f32 master + two moments
    if (s.layout == Layout::kRows) {
      slack += per_elem * s.n + 12.0 * 2 + 4.0;  // one padded row, its row gains and radius
      replicated += 12.0 * s.n + 12.0 + 4.0 * s.n + 4.0;  // column/scalar gains, radii
    }
  }
  double sum = 0.0;
  for (double b : per_rank) sum += b;
  if (c.layout == "owner") {
    EXPECT_NEAR(sum, static_cast<double>(*all), 0.0) << "owner layout keeps every byte once";
  } else {
    EXPECT_LE(static_cast<double>(*mine), static_cast<double>(*all) / N + slack + replicated);
  }
}

class Sharded : public ::testing::TestWithParam<Case> {};

TEST_P(Sharded, EqualsOneRank) { Compare(GetParam()); }

INSTANTIATE_TEST_SUITE_P(Presets, Sharded, ::testing::ValuesIn(Cases()),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           std::string n;
                           for (char ch : info.param.Name()) n += std::isalnum(static_cast<unsigned char>(ch)) ? ch : '_';
                           return n + "_" + std::to_string(info.index);
                         });

// A NaN in one rank's local gradient: the mean is NaN on the rows' owner only, yet every rank
// skips the step, and the state stays identical to a run that never saw that step.
TEST(ShardedSkip, NanOnOneRankSkipsEverywhere) {
  Communicator* world = World();
  ASSERT_NE(world, nullptr);
  const int N = world->size(), rank = world->rank();
  for (const char* layout : {"rows", "owner"}) {
    SCOPED_TRACE(layout);
    const std::string spec = std::string("preset=md-muon layout=") + layout;
    OptRun a(world, "threads=1 bucket_mb=0.0001", spec, false);
    std::unique_ptr<Communicator> local = MakeLocalCommunicator();
    OptRun b(local.get(), "threads=1", spec, false);
    ASSERT_TRUE(a.opt().Finalize().ok());
    ASSERT_TRUE(b.opt().Finalize().ok());
    int taken = 0;
    for (int step = 1; step <= 4; ++step) {
      a.SetLocal(step, rank);
      if (step == 2 && rank == N - 1) a.Poison(5);
      absl::StatusOr<StepResult> r = a.opt().Step(1.0, nullptr);
      ASSERT_TRUE(r.ok()) << r.status();
      EXPECT_EQ(r->skipped, step == 2);
      if (step != 2) {
        b.SetMean(step, N);
        ASSERT_TRUE(b.opt().Step(1.0, nullptr).ok());
        ++taken;
      }
      EXPECT_EQ(r->step, taken);
    }
    for (size_t i = 0; i < a.size(); ++i) EXPECT_LE(RelMaxError(a.Model(i), b.Model(i)), kTolerance);
  }
}

}  // namespace
}  // namespace mdopt
