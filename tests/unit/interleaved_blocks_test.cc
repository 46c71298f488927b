// Interleaved and unequal blocks (spec key blocks=groups:G:h0,h1,...): a fused weight whose
// rows are G groups of pieces of h0, h1, ... rows, block j being piece j of every group in
// group order. A GQA linear_qkv is groups:G:qD,D,D (per query group its q query heads, one key
// and one value head of D rows), MLA's kv_up groups:H:dk,dv, its kv_down groups:1:L,P (two
// contiguous pieces of unequal height). Each block is a matrix of its own for its sphere,
// radius (from its own shape), tangent projection and base update; row gains are per row of
// the tensor, the column and scalar gains shared by the blocks.
//
// Held to a float64 reference written here in the tensor's own row order (LayoutRef: each
// block gathered from its rows, stepped, scattered back; only Newton-Schulz and the gain
// parametrisation come from the library), on both engines, Muon and Adam bases, with and
// without gains, 2-D and 3-D, f32 and bf16 weights:
//   - the weights (mdopt_get_state "master", in the tensor's row order) and the gains equal
//     the reference's (reference engine 1e-12, fast engine 5e-6; bf16 weights: the float32
//     master to 5e-6, the bf16 model to one bf16 rounding);
//   - every block's bare direction, gathered from its strided rows, has Frobenius norm equal
//     to its own radius after every step, and so does its bf16 model copy within bf16;
//   - the same weight as one matrix (no blocks) leaves Q, K and V far off their radii;
//   - bad specs and shapes are INVALID_ARGUMENT naming the key.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "dist_opt/group_spec.h"
#include "kernels/common/gain_param.h"
#include "kernels/common/row_map.h"
#include "kernels/reference/reference.h"
#include "fused_reference.h"
#include "numeric_util.h"
#include "test_util.h"

namespace mdopt {
namespace {

using kernels::Base;
using kernels::Sphere;
using testing::AbiHarness;
using testing::BlockRows;
using testing::LayoutRef;
using testing::RelMaxError;
using testing::TensorSpec;

constexpr int kSteps = 6;
constexpr uint64_t kSeed = 11;

struct Case {
  std::string preset;
  std::string engine;
  std::vector<int64_t> shape;  // 2-D [M, d] or 3-D [E, M, d]
  int64_t groups;
  std::vector<int64_t> heights;
  bool bf16 = false;
  std::string Blocks() const {
    std::string s = "groups:" + std::to_string(groups) + ":";
    for (size_t j = 0; j < heights.size(); ++j) s += (j ? "," : "") + std::to_string(heights[j]);
    return s;
  }
  std::string Name() const {
    std::string s = preset + "_" + engine.substr(8) + "_" + Blocks() + "_";
    for (int64_t x : shape) s += std::to_string(x) + "x";
    if (bf16) s += "_bf16";
    for (char& c : s)
      if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
    return s;
  }
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.Name(); }

class Interleaved : public ::testing::TestWithParam<Case> {};

TEST_P(Interleaved, EveryBlockIsAMatrixOfItsOwn) {
  const Case& c = GetParam();
  const bool stack = c.shape.size() == 3;
  const int64_t E = stack ? c.shape[0] : 1, M = c.shape[stack ? 1 : 0], d = c.shape.back();
  const int64_t K = static_cast<int64_t>(c.heights.size()), mat = M * d, numel = E * mat;
  const std::string spec = "preset=" + c.preset;
  TensorSpec t{"qkv", c.shape};
  if (c.bf16) t.param_dtype = MDOPT_DTYPE_BF16;
  AbiHarness h(c.engine + " threads=1", spec + " blocks=" + c.Blocks(), {t}, kSeed);
  const std::vector<double> w0 = h.Model(0);
  MDOPT_ASSERT_OK(mdopt_finalize(h.opt()));

  absl::StatusOr<GroupSpec> parsed = ParseGroupSpec(spec);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  const kernels::UpdateRule rule = parsed->rule;
  const std::vector<std::vector<int64_t>> rows = BlockRows(c.groups, c.heights);
  std::vector<LayoutRef> ref(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; ++e)
    ref[e].Init(rule, rows, d, std::vector<double>(w0.begin() + e * mat, w0.begin() + (e + 1) * mat));
  const double tol = c.engine == "kernels=fast" ? 5e-6 : 1e-12;
  const bool sphere = rule.sphere != Sphere::kNone;
  double worst_w = 0.0, worst_gain = 0.0, worst_norm = 0.0, worst_model = 0.0;
  for (int step = 1; step <= kSteps; ++step) {
    // Gradients 10x larger on the first block's rows (the query heads): one sphere and one
    // Newton-Schulz over the fused matrix would give K and V a sliver of the update.
    std::vector<double> g = testing::RandomNormal(static_cast<size_t>(numel), kSeed * 131 + step, 0.1);
    for (int64_t e = 0; e < E; ++e)
      for (int64_t i : rows[0])
        for (int64_t j = 0; j < d; ++j) g[e * mat + i * d + j] *= 10.0;
    for (int64_t k = 0; k < numel; ++k) {
      h.buffers(0).grad_f32[k] = static_cast<float>(g[k]);
      g[k] = h.buffers(0).grad_f32[k];
    }
    mdopt_step_info info = MDOPT_STEP_INFO_INIT;
    MDOPT_ASSERT_OK(mdopt_step(h.opt(), 1.0, nullptr, &info));
    ASSERT_EQ(info.skipped, 0);
    const std::vector<double> w = h.State(0, "master");  // the tensor's row order
    const std::vector<double> model = h.Model(0);
    ASSERT_EQ(static_cast<int64_t>(w.size()), numel);
    std::vector<double> grow(static_cast<size_t>(E * M), 1.0), gcol(static_cast<size_t>(E * K * d), 1.0),
        gsc(static_cast<size_t>(E * K), 1.0), radius;
    if (kernels::HasRowGains(rule.gains)) grow = h.State(0, "gain_row");
    if (kernels::HasColGains(rule.gains)) gcol = h.State(0, "gain_col");
    if (kernels::HasScalarGain(rule.gains)) gsc = h.State(0, "gain_scalar");
    if (sphere) radius = h.State(0, "radius");
    for (int64_t e = 0; e < E; ++e) {
      LayoutRef& fr = ref[e];
      fr.Step(std::vector<double>(g.begin() + e * mat, g.begin() + (e + 1) * mat), rule.lr,
              rule.gain_lr, step);
      const std::vector<double> mine(w.begin() + e * mat, w.begin() + (e + 1) * mat);
      const double err = RelMaxError(mine, fr.w);
      worst_w = std::max(worst_w, err);
      EXPECT_LE(err, tol) << "step " << step << " expert " << e;
      if (c.bf16) {
        // The model copy is the master rounded to bf16, at the tensor's own rows.
        for (int64_t q = 0; q < mat; ++q)
          ASSERT_EQ(model[e * mat + q], kernels::Bf16ToFloat(kernels::FloatToBf16(static_cast<float>(mine[q]))))
              << "step " << step << " element " << q;
      } else {
        worst_model = std::max(worst_model, RelMaxError(std::vector<double>(model.begin() + e * mat,
                                                                            model.begin() + (e + 1) * mat),
                                                        mine));
      }
      std::vector<double> ref_row(static_cast<size_t>(M)), ref_col(static_cast<size_t>(d));
      for (int64_t i = 0; i < M; ++i) ref_row[i] = fr.row.Value(rule, static_cast<size_t>(i));
      for (int64_t j = 0; j < d; ++j) ref_col[j] = fr.col.Value(rule, static_cast<size_t>(j));
      const std::vector<double> mine_row(grow.begin() + e * M, grow.begin() + (e + 1) * M);
      const std::vector<double> mine_col(gcol.begin() + e * K * d, gcol.begin() + (e * K + 1) * d);
      const double gerr = std::max({RelMaxError(mine_row, ref_row), RelMaxError(mine_col, ref_col),
                                    std::abs(gsc[e * K] - fr.scalar.Value(rule, 0))});
      worst_gain = std::max(worst_gain, gerr);
      EXPECT_LE(gerr, tol) << "step " << step << " expert " << e;
      for (int64_t k = 1; k < K; ++k) {
        for (int64_t j = 0; j < d; ++j) ASSERT_EQ(gcol[(e * K + k) * d + j], gcol[e * K * d + j]);
        ASSERT_EQ(gsc[e * K + k], gsc[e * K]);
      }
      if (!sphere) continue;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t s = e * K + k;
        double sq = 0.0;
        for (int64_t i : rows[k])
          for (int64_t j = 0; j < d; ++j) {
            const double bare = mine[i * d + j] / (mine_row[i] * gcol[s * d + j] * gsc[s]);
            sq += bare * bare;
          }
        const double own = std::sqrt(static_cast<double>(std::max<int64_t>(rows[k].size(), d)));
        EXPECT_NEAR(radius[s], own, 1e-6 * own) << "block " << k;
        const double rel = std::abs(std::sqrt(sq) - own) / own;
        worst_norm = std::max(worst_norm, rel);
        EXPECT_LE(rel, 1e-5) << "step " << step << " expert " << e << " block " << k;
      }
    }
  }
  // f32 weights: the model tensor holds the float32 master, row for row (the reference
  // engine's master is float64).
  if (c.engine == "kernels=fast") {
    EXPECT_EQ(worst_model, 0.0);
  }
  std::printf("[ measured ] %s: worst weights vs reference %.2e, gains %.2e, "
              "|block norm - radius| / radius %.2e\n",
              c.Name().c_str(), worst_w, worst_gain, worst_norm);
}

std::vector<Case> Cases() {
  std::vector<Case> out;
  for (const char* engine : {"kernels=reference", "kernels=fast"}) {
    for (const char* preset : {"md-muon", "md-adamw", "md-muon gains=scalar tangent=1",
                               "md-adamw gains=col", "muonh"}) {
      // GQA linear_qkv: 3 query groups of 2 query heads, 1 key, 1 value head of 2 rows.
      out.push_back({preset, engine, {24, 10}, 3, {4, 2, 2}});
      // MLA kv_down: two contiguous pieces of unequal height.
      out.push_back({preset, engine, {11, 6}, 1, {8, 3}});
    }
    // A gated GQA projection (Q, gate, K, V per group), bf16 weights, an expert stack.
    out.push_back({"md-muon", engine, {18, 7}, 2, {3, 3, 2, 1}, true});
    out.push_back({"md-adamw", engine, {2, 15, 6}, 5, {2, 1}});
  }
  return out;
}

INSTANTIATE_TEST_SUITE_P(Layouts, Interleaved, ::testing::ValuesIn(Cases()),
                         [](const ::testing::TestParamInfo<Case>& i) { return i.param.Name(); });

// The failure the layout exists for: linear_qkv as one matrix under a 10x gradient
// imbalance leaves Q, K and V far from the radii they have on their own.
TEST(InterleavedControl, FusedQkvLeavesBlocksOffTheirSpheres) {
  const int64_t G = 3, d = 10;
  const std::vector<int64_t> heights = {4, 2, 2};
  const std::vector<std::vector<int64_t>> rows = BlockRows(G, heights);
  for (const bool split : {false, true}) {
    AbiHarness h("kernels=reference threads=1",
                 std::string("preset=muonh") + (split ? " blocks=groups:3:4,2,2" : ""),
                 {TensorSpec{"qkv", {24, d}}}, kSeed);
    MDOPT_ASSERT_OK(mdopt_finalize(h.opt()));
    for (int step = 1; step <= kSteps; ++step) {
      std::vector<double> g = testing::RandomNormal(24 * d, kSeed * 131 + step, 0.1);
      for (int64_t i : rows[0])
        for (int64_t j = 0; j < d; ++j) g[i * d + j] *= 10.0;
      for (int64_t k = 0; k < 24 * d; ++k) h.buffers(0).grad_f32[k] = static_cast<float>(g[k]);
      mdopt_step_info info = MDOPT_STEP_INFO_INIT;
      MDOPT_ASSERT_OK(mdopt_step(h.opt(), 1.0, nullptr, &info));
    }
    const std::vector<double> w = h.Model(0);
    double worst = 0.0;
    for (const std::vector<int64_t>& b : rows) {
      double sq = 0.0;
      for (int64_t i : b)
        for (int64_t j = 0; j < d; ++j) sq += w[i * d + j] * w[i * d + j];
      const double own = std::sqrt(static_cast<double>(std::max<int64_t>(b.size(), d)));
      worst = std::max(worst, std::abs(std::sqrt(sq) - own) / own);
    }
    std::printf("[ measured ] linear_qkv %s: worst |block norm - own radius| / radius %.3f\n",
                split ? "with blocks=groups:3:4,2,2" : "as one matrix", worst);
    if (split) {
      EXPECT_LE(worst, 1e-6);
    } else {
      EXPECT_GT(worst, 0.05);
    }
  }
}

// An f32 weight is its own master copy unless its blocks interleave: then mdopt keeps a
// float32 master in block order, exactly 4 bytes per element more state.
TEST(InterleavedMemory, AnInterleavedF32WeightKeepsAMaster) {
  int64_t bytes[2] = {0, 0};
  for (int k = 0; k < 2; ++k) {
    // Same block heights (12 rows, 6, 6): contiguous in the tensor, or interleaved.
    AbiHarness h("threads=1",
                 std::string("preset=md-muon blocks=") + (k == 0 ? "groups:1:12,6,6" : "groups:3:4,2,2"),
                 {TensorSpec{"qkv", {24, 10}}}, kSeed);
    MDOPT_ASSERT_OK(mdopt_finalize(h.opt()));
    MDOPT_ASSERT_OK(mdopt_state_bytes(h.opt(), &bytes[k]));
  }
  EXPECT_EQ(bytes[1] - bytes[0], 4 * 24 * 10);
}

TEST(InterleavedSpec, BadValuesNameTheKey) {
  for (const char* v : {"groups:0:2,1", "groups:2:", "groups:2:0,1", "groups:2:1,x", "groups:2",
                        "groups:x:1", "groups:2:1,1,1,1,1,1,1,1,1", "groups:1048577:1"}) {
    absl::StatusOr<GroupSpec> s = ParseGroupSpec(std::string("preset=md-muon blocks=") + v);
    ASSERT_FALSE(s.ok()) << v;
    EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(s.status().message().find("'blocks'"), std::string::npos) << s.status();
  }
  absl::StatusOr<GroupSpec> s = ParseGroupSpec("preset=md-muon blocks=groups:4:256,64,64");
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->row_blocks, 3);
  EXPECT_EQ(s->block_groups, 4);
  EXPECT_EQ(s->block_heights, (std::vector<int64_t>{256, 64, 64}));
  const std::string canon = CanonicalSpec(*s);
  EXPECT_NE(canon.find("blocks=groups:4:256,64,64"), std::string::npos) << canon;
  EXPECT_EQ(CanonicalSpec(*ParseGroupSpec(canon)), canon);
  // preserve_init with the shared column gains is refused as for rows:K.
  EXPECT_FALSE(ParseGroupSpec("preset=md-muon gains=col preserve_init=1 blocks=groups:2:2,1").ok());
  EXPECT_TRUE(ParseGroupSpec("preset=md-muon preserve_init=1 blocks=groups:2:2,1").ok());
}

TEST(InterleavedSpec, RowsThatDoNotFitAreRefused) {
  mdopt_comm* comm = nullptr;
  mdopt_optimizer* opt = nullptr;
  ASSERT_EQ(mdopt_comm_create_local(&comm), MDOPT_SUCCESS);
  ASSERT_EQ(mdopt_create(comm, "", &opt), MDOPT_SUCCESS);
  ASSERT_EQ(mdopt_add_group(opt, "qkv", "preset=md-muon blocks=groups:3:4,2,2"), MDOPT_SUCCESS);
  std::vector<float> w(25 * 4), g(25 * 4);
  mdopt_param_desc bad = testing::DescFor("bad", "qkv", {25, 4}, MDOPT_DTYPE_F32, w.data(),
                                          MDOPT_DTYPE_F32, g.data());
  EXPECT_EQ(mdopt_add_param(opt, &bad, nullptr), MDOPT_INVALID_ARGUMENT);
  const std::string msg = mdopt_last_error();
  EXPECT_NE(msg.find("'blocks'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("3 x 8 = 24"), std::string::npos) << msg;
  mdopt_param_desc ok = testing::DescFor("ok", "qkv", {24, 4}, MDOPT_DTYPE_F32, w.data(),
                                         MDOPT_DTYPE_F32, g.data());
  EXPECT_EQ(mdopt_add_param(opt, &ok, nullptr), MDOPT_SUCCESS) << mdopt_last_error();
  mdopt_destroy(opt);
  mdopt_comm_destroy(comm);
}

}  // namespace
}  // namespace mdopt
