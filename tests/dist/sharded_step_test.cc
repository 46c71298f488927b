// The sharded step under mpirun (N = 2, 3, 4): for every preset, both layouts, both
// gradient contracts and one or many buckets, 20 steps on N ranks give the weights of the
// same optimizer on one rank (an in-process local communicator fed the mean gradient) within
// kTolerance, on shapes that do not divide evenly (m < N, odd m, 1 x n, m x 1, 1-D, a 3-D
// stack, one matrix larger than all others together). Every rank checks its whole model
// tensor after each run (the weight all-gather) and the collective mdopt_get_state fields.
// Also: state bytes per rank against the layout's bound, and a NaN on one rank only makes
// every rank skip the same step with identical state.
#include <gtest/gtest.h>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "dist_opt/group_spec.h"
#include "dist_opt/optimizer.h"
#include "tests/dist/dist_harness.h"

namespace mdopt::dist_test {
namespace {

// f32 state on both sides; the only differences are the order of cross-rank sums and the
// mean's rounding. Measured worst case 3.5e-7 (N = 4, 2026-12-07).
constexpr double kTolerance = 5e-6;
constexpr int kSteps = 20;

WorstError* const g_worst = AddWorstErrorReport("sharded_step_test");

struct Case {
  std::string spec;
  std::string layout;    // rows | owner
  bool reduced;          // grads=reduced
  bool many_buckets;     // one bucket per parameter
  bool bf16 = false;     // bf16 weights (f32 master and grads)
  bool ns_comm_bf16 = false;
  double tolerance = kTolerance;
  bool deferred = false;  // gather=deferred + GatherParams before comparing
  std::vector<Tensor> tensors = {};  // empty: Tensors(adam)
  std::string Name() const {
    std::string n = spec + " layout=" + layout + (reduced ? " grads=reduced" : " grads=local") +
                    (many_buckets ? " bucket_mb=0.0001" : "") + (bf16 ? " bf16" : "") +
                    (ns_comm_bf16 ? " ns_comm_dtype=bf16" : "") + (deferred ? " gather=deferred" : "");
    return n;
  }
};
void PrintTo(const Case& c, std::ostream* os) { *os << c.Name(); }

std::vector<Case> Cases() {
  std::vector<Case> c;
  const std::vector<std::string> specs = {
      "preset=md-muon",    "preset=md-adamw", "preset=muon",      "preset=adamw",
      "preset=muonh",      "preset=adamh",    "preset=router",    "preset=embedding",
      "preset=vector",     "preset=md-muon sphere=col tangent=1 gains=scalar",
      "preset=md-adamw tangent=1 gains=col",
      // preserve_init: the initial norms (summed over ranks) into the gains on every rank
      "preset=md-muon preserve_init=1", "preset=router preserve_init=1 gain_param=exp",
      "preset=md-adamw sphere=col gains=col preserve_init=1",
      // radius=fan_in from each matrix's global shape, not a rank's rows
      "preset=md-adamw radius=fan_in", "preset=md-muon sphere=col radius=fan_in"};
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
  // Logical row blocks (a GLU fc1 and an expert stack of them, blocks of 1 row, of fewer rows
  // than ranks, of odd heights): every block a slot of its own for its sphere and update,
  // the column and scalar gains shared by a matrix's blocks, in both layouts, in one bucket
  // and in one bucket per matrix (a stack split over buckets, windows), with preserve_init
  // (each block's norm into its row gains) and radius=fan_in.
  const std::vector<Tensor> glu = {{"fc1", {14, 19}},        {"small", {2, 9}},
                                   {"experts", {3, 10, 8}},  {"big", {40, 90}}};
  for (const char* s : {"preset=md-muon blocks=rows:2", "preset=md-adamw blocks=rows:2",
                        "preset=md-muon gains=scalar tangent=1 blocks=rows:2",
                        "preset=md-adamw gains=col blocks=rows:2",
                        "preset=md-muon preserve_init=1 blocks=rows:2",
                        "preset=md-adamw radius=fan_in blocks=rows:2"})
    for (const char* layout : {"rows", "owner"})
      for (bool many : {false, true}) {
        Case b{s, layout, false, many};
        b.tensors = glu;
        c.push_back(b);
      }
  // Interleaved and unequal blocks (blocks=groups:G:h0,h1,...): a GQA linear_qkv of 4 query
  // groups (3 query rows, 2 key rows, 2 value rows each), a stack of them and a wide one, and
  // MLA kv_down-like contiguous blocks of 17 and 11 rows; the model's rows are read and
  // written through the row map on every rank.
  const std::vector<Tensor> qkv = {{"qkv", {28, 19}}, {"stack", {3, 28, 8}}, {"wide", {28, 90}}};
  for (const char* s : {"preset=md-muon blocks=groups:4:3,2,2",
                        "preset=md-adamw gains=col blocks=groups:4:3,2,2",
                        "preset=md-muon gains=scalar tangent=1 blocks=groups:1:17,11"})
    for (const char* layout : {"rows", "owner"})
      for (bool many : {false, true}) {
        Case b{s, layout, false, many};
        b.tensors = qkv;
        c.push_back(b);
      }
  Case bf{"preset=md-muon blocks=groups:4:3,2,2", "rows", false, true};
  bf.bf16 = true;
  bf.tensors = qkv;
  c.push_back(bf);
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
  TestModel sharded(world, options, spec, c.bf16, c.tensors);
  TestModel single(local.get(), "threads=1 update_norms=1", spec, c.bf16, c.tensors);
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
  // A bf16 model copy is held to one bf16 ulp of its largest weight: where the ranks' cross-row
  // sums (added in another order than one rank adds them) move a master weight by a float32
  // ulp across a bf16 rounding boundary, that element differs by a whole bf16 ulp (seen: 7.2e-4
  // at 4 ranks). The float32 master itself is compared at c.tolerance below.
  const double model_tolerance = c.bf16 ? std::max(c.tolerance, 1.0 / 256) : c.tolerance;
  for (size_t i = 0; i < sharded.size(); ++i) {
    const double err = RelMaxError(sharded.Model(i), single.Model(i));
    if (!c.ns_comm_bf16 && !c.bf16) g_worst->Record(err);
    EXPECT_LE(err, model_tolerance) << "tensor " << i;
    for (const char* field : kStateFields) {
      absl::StatusOr<std::vector<double>> x = sharded.opt().GetState(static_cast<int64_t>(i), field);
      absl::StatusOr<std::vector<double>> y = single.opt().GetState(static_cast<int64_t>(i), field);
      ASSERT_EQ(x.ok(), y.ok()) << field;
      if (!x.ok()) continue;
      ASSERT_EQ(x->size(), y->size()) << field;
      EXPECT_LE(RelMaxError(*x, *y), c.tolerance) << "tensor " << i << " " << field;
    }
  }
  // blocks=rows:K: the column and scalar gains a matrix's blocks share are bitwise one value
  // (each block slot holds a copy) on N ranks as on one.
  if (c.spec.find("blocks=") != std::string::npos) {
    const int64_t K = ParseGroupSpec(c.spec)->row_blocks;
    for (size_t i = 0; i < sharded.size(); ++i) {
      const int64_t n = c.tensors[i].shape.back();
      for (const char* field : {"gain_col", "gain_scalar"}) {
        absl::StatusOr<std::vector<double>> x = sharded.opt().GetState(static_cast<int64_t>(i), field);
        if (!x.ok()) continue;
        const int64_t per = std::string(field) == "gain_col" ? n : 1;
        const int64_t slots = static_cast<int64_t>(x->size()) / per;
        ASSERT_EQ(slots % K, 0) << field;
        for (int64_t s = 0; s < slots; ++s)
          for (int64_t j = 0; j < per; ++j)
            ASSERT_EQ((*x)[s * per + j], (*x)[(s - s % K) * per + j])
                << "tensor " << i << " " << field << " slot " << s << " entry " << j;
      }
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
  const int64_t vectors = rule.base == kernels::Base::kAdamW && c.tensors.empty() ? 1 : 0;  // "vec": no sphere, no gains
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
                           return TestNameOf(info.param.Name()) + "_" + std::to_string(info.index);
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
    TestModel a(world, "threads=1 bucket_mb=0.0001", spec, false);
    std::unique_ptr<Communicator> local = MakeLocalCommunicator();
    TestModel b(local.get(), "threads=1", spec, false);
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
}  // namespace mdopt::dist_test
