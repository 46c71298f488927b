// Logical row blocks (spec key blocks=rows:K): a fused matrix whose K blocks of rows are
// separate linear maps (a GLU fc1 [gate; up]) is K matrices to the optimizer. Held here to an
// oracle that knows nothing of blocks: the float64 reference (kernels/reference) run on each
// block alone, as if the block were a parameter of its own. Checked for both engines, Muon
// and Adam bases, with and without gains, 2-D and 3-D (an expert stack of GLU fc1s):
//   - every block's bare direction (W over its effective gains) has Frobenius norm equal to
//     its radius after every step;
//   - every block's weights equal the reference's for that block alone (kernels=reference:
//     1e-12; kernels=fast: float32, 5e-6, the tolerances of crosscheck_test);
//   - the same model without blocks does NOT keep the blocks on their spheres (the failure
//     the key exists for), and bad values are INVALID_ARGUMENT errors naming the key.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "dist_opt/group_spec.h"
#include "kernels/reference/reference.h"
#include "test_util.h"

namespace mdopt {
namespace {

using testing::AbiHarness;
using testing::RelMaxError;
using testing::TensorSpec;

constexpr int kSteps = 8;
constexpr uint64_t kSeed = 5;

// The block (e, b) of a tensor of E experts of K blocks of f x d, row-major.
std::vector<double> Block(const std::vector<double>& t, int64_t slot, int64_t f, int64_t d) {
  return std::vector<double>(t.begin() + slot * f * d, t.begin() + (slot + 1) * f * d);
}

// Gradients whose first block of every matrix is 10x larger than the others: one sphere and
// one Newton-Schulz over the fused matrix would give the small blocks a sliver of the update.
std::vector<double> Gradient(int64_t numel, int64_t slot_elems, int64_t blocks, uint64_t seed) {
  std::vector<double> g = testing::RandomNormal(static_cast<size_t>(numel), seed, 0.1);
  for (int64_t k = 0; k < numel; ++k)
    if ((k / slot_elems) % blocks == 0) g[k] *= 10.0;
  return g;
}

struct Case {
  std::string preset;
  std::string engine;
  std::vector<int64_t> shape;  // 2-D [K f, d] or 3-D [E, K f, d]
  int64_t blocks;
  std::string Name() const {
    std::string s = preset + "_" + engine.substr(8) + "_";
    for (int64_t x : shape) s += std::to_string(x) + "x";
    s += "_rows" + std::to_string(blocks);
    for (char& c : s)
      if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
    return s;
  }
};

class Blocks : public ::testing::TestWithParam<Case> {};

TEST_P(Blocks, EachBlockIsItsOwnMatrix) {
  const Case& c = GetParam();
  const bool stack = c.shape.size() == 3;
  const int64_t E = stack ? c.shape[0] : 1, K = c.blocks;
  const int64_t f = c.shape[stack ? 1 : 0] / K, d = c.shape.back();
  const int64_t slots = E * K, numel = slots * f * d;
  const std::string spec = "preset=" + c.preset + " blocks=rows:" + std::to_string(K);
  AbiHarness h(c.engine + " threads=1", spec, {TensorSpec{"fc1", c.shape}}, kSeed);
  const std::vector<double> w0 = h.Model(0);
  MDOPT_ASSERT_OK(mdopt_finalize(h.opt()));

  absl::StatusOr<GroupSpec> parsed = ParseGroupSpec("preset=" + c.preset);
  ASSERT_TRUE(parsed.ok());
  const kernels::UpdateRule rule = parsed->rule;
  std::vector<kernels::ref::MatrixState> ref(static_cast<size_t>(slots));
  for (int64_t s = 0; s < slots; ++s) {
    const std::vector<double> b = Block(w0, s, f, d);
    ASSERT_EQ(kernels::ref::Init(rule, f, d, b.data(), /*project=*/true, &ref[s]), -1);
  }
  const double tol = c.engine == "kernels=fast" ? 5e-6 : 1e-12;
  const bool sphere = rule.sphere != kernels::Sphere::kNone;
  double worst_norm = 0.0, worst_w = 0.0;
  for (int step = 1; step <= kSteps; ++step) {
    std::vector<double> g = Gradient(numel, f * d, K, kSeed * 977 + step);
    for (int64_t k = 0; k < numel; ++k) {
      h.buffers(0).grad_f32[k] = static_cast<float>(g[k]);
      g[k] = h.buffers(0).grad_f32[k];  // the reference sees the gradients mdopt sees
    }
    mdopt_step_info info = MDOPT_STEP_INFO_INIT;
    MDOPT_ASSERT_OK(mdopt_step(h.opt(), 1.0, nullptr, &info));
    ASSERT_EQ(info.skipped, 0);
    // The master weights: float64 on the reference engine, float32 on the fast one.
    const std::vector<double> w = h.State(0, "master");
    ASSERT_EQ(static_cast<int64_t>(w.size()), numel);
    // Effective gains: row gains along the fused tensor's rows (slots * f of them), column
    // gains per block (slots * d), a scalar per block; ones where the rule has none.
    std::vector<double> grow(slots * f, 1.0), gcol(slots * d, 1.0), gsc(slots, 1.0), radius;
    const kernels::Gains gk = rule.gains;
    if (gk == kernels::Gains::kRow || gk == kernels::Gains::kRowCol) grow = h.State(0, "gain_row");
    if (gk == kernels::Gains::kCol || gk == kernels::Gains::kRowCol) gcol = h.State(0, "gain_col");
    if (gk == kernels::Gains::kScalar) gsc = h.State(0, "gain_scalar");
    ASSERT_EQ(static_cast<int64_t>(grow.size()), slots * f);
    ASSERT_EQ(static_cast<int64_t>(gcol.size()), slots * d);
    ASSERT_EQ(static_cast<int64_t>(gsc.size()), slots);
    if (sphere) {
      radius = h.State(0, "radius");
      ASSERT_EQ(static_cast<int64_t>(radius.size()), slots);
    }
    for (int64_t s = 0; s < slots; ++s) {
      const std::vector<double> g_block = Block(g, s, f, d);
      kernels::ref::Step(rule, g_block.data(), rule.lr, rule.gain_lr, step, &ref[s]);
      const std::vector<double> mine = Block(w, s, f, d);
      const double err = RelMaxError(mine, ref[s].w);
      worst_w = std::max(worst_w, err);
      EXPECT_LE(err, tol) << "step " << step << " block " << s;
      if (!sphere) continue;
      double sq = 0.0;
      for (int64_t i = 0; i < f; ++i)
        for (int64_t j = 0; j < d; ++j) {
          const double bare = mine[i * d + j] / (grow[s * f + i] * gcol[s * d + j] * gsc[s]);
          sq += bare * bare;
        }
      const double rel = std::abs(std::sqrt(sq) - radius[s]) / radius[s];
      worst_norm = std::max(worst_norm, rel);
      EXPECT_LE(rel, 1e-5) << "step " << step << " block " << s;
      // The radius is the block's own: sqrt(max(f, d)) (radius=auto).
      EXPECT_NEAR(radius[s], std::sqrt(static_cast<double>(std::max(f, d))), 1e-6);
    }
  }
  std::printf("[ measured ] %s: worst |block norm - radius| / radius %.2e, worst block "
              "weights vs per-block reference %.2e\n",
              c.Name().c_str(), worst_norm, worst_w);
}

std::vector<Case> Cases() {
  std::vector<Case> out;
  for (const char* preset : {"md-muon", "muonh", "md-adamw", "adamh",
                             "md-muon gains=scalar tangent=1"})
    for (const char* engine : {"kernels=reference", "kernels=fast"}) {
      out.push_back({preset, engine, {12, 10}, 2});  // a GLU fc1 [gate; up], f < d
      out.push_back({preset, engine, {3, 16, 5}, 2});  // a 3-D expert stack of GLU fc1s
      out.push_back({preset, engine, {9, 7}, 3});  // three blocks of 3 x 7
    }
  return out;
}

INSTANTIATE_TEST_SUITE_P(Glu, Blocks, ::testing::ValuesIn(Cases()),
                         [](const ::testing::TestParamInfo<Case>& i) { return i.param.Name(); });

// The failure blocks fix: without them the fused [gate; up] has one sphere, and under a 10x
// gradient imbalance the halves drift apart in norm.
TEST(BlocksControl, FusedMatrixLeavesBlocksOffTheirSpheres) {
  const int64_t f = 6, d = 10;
  AbiHarness h("kernels=reference threads=1", "preset=muonh", {TensorSpec{"fc1", {2 * f, d}}},
               kSeed);
  MDOPT_ASSERT_OK(mdopt_finalize(h.opt()));
  for (int step = 1; step <= kSteps; ++step) {
    const std::vector<double> g = Gradient(2 * f * d, f * d, 2, kSeed * 977 + step);
    for (int64_t k = 0; k < 2 * f * d; ++k) h.buffers(0).grad_f32[k] = static_cast<float>(g[k]);
    mdopt_step_info info = MDOPT_STEP_INFO_INIT;
    MDOPT_ASSERT_OK(mdopt_step(h.opt(), 1.0, nullptr, &info));
  }
  const std::vector<double> w = h.Model(0);
  double n[2] = {0, 0};
  for (int64_t k = 0; k < 2 * f * d; ++k) n[k / (f * d)] += w[k] * w[k];
  const double radius = std::sqrt(static_cast<double>(std::max(f, d)));
  std::printf("[ measured ] fused: block norms %.3f %.3f (each block's own radius %.3f)\n",
              std::sqrt(n[0]), std::sqrt(n[1]), radius);
  EXPECT_GT(std::abs(std::sqrt(n[0]) - radius), 0.05 * radius);
}

TEST(BlocksSpec, BadValuesNameTheKey) {
  for (const char* v : {"rows:0", "rows:", "rows:x", "cols:2", "2", "rows:65537"}) {
    absl::StatusOr<GroupSpec> s = ParseGroupSpec(std::string("preset=md-muon blocks=") + v);
    ASSERT_FALSE(s.ok()) << v;
    EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(s.status().message().find("'blocks'"), std::string::npos) << s.status();
  }
  absl::StatusOr<GroupSpec> s = ParseGroupSpec("preset=md-muon blocks=rows:2");
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->row_blocks, 2);
  // The canonical spec carries the key (checkpoints compare it) and parses back to it.
  const std::string canon = CanonicalSpec(*s);
  EXPECT_NE(canon.find("blocks=rows:2"), std::string::npos) << canon;
  EXPECT_EQ(ParseGroupSpec(canon)->row_blocks, 2);
  EXPECT_EQ(CanonicalSpec(*ParseGroupSpec("preset=md-muon blocks=none")).find("blocks"),
            std::string::npos);
}

TEST(BlocksSpec, RowsNotAMultipleAreRefused) {
  mdopt_comm* comm = nullptr;
  mdopt_optimizer* opt = nullptr;
  ASSERT_EQ(mdopt_comm_create_local(&comm), MDOPT_SUCCESS);
  ASSERT_EQ(mdopt_create(comm, "", &opt), MDOPT_SUCCESS);
  ASSERT_EQ(mdopt_add_group(opt, "glu", "preset=md-adamw blocks=rows:2"), MDOPT_SUCCESS);
  std::vector<float> w(7 * 4), g(7 * 4);
  mdopt_param_desc odd = testing::DescFor("odd", "glu", {7, 4}, MDOPT_DTYPE_F32, w.data(),
                                          MDOPT_DTYPE_F32, g.data());
  EXPECT_EQ(mdopt_add_param(opt, &odd, nullptr), MDOPT_INVALID_ARGUMENT);
  EXPECT_NE(std::string(mdopt_last_error()).find("'blocks'"), std::string::npos)
      << mdopt_last_error();
  mdopt_param_desc vec = testing::DescFor("vec", "glu", {8}, MDOPT_DTYPE_F32, w.data(),
                                          MDOPT_DTYPE_F32, g.data());
  EXPECT_EQ(mdopt_add_param(opt, &vec, nullptr), MDOPT_INVALID_ARGUMENT);
  EXPECT_NE(std::string(mdopt_last_error()).find("'blocks'"), std::string::npos)
      << mdopt_last_error();
  mdopt_param_desc ok = testing::DescFor("ok", "glu", {8, 4}, MDOPT_DTYPE_F32, w.data(),
                                         MDOPT_DTYPE_F32, g.data());
  EXPECT_EQ(mdopt_add_param(opt, &ok, nullptr), MDOPT_SUCCESS) << mdopt_last_error();
  mdopt_destroy(opt);
  mdopt_comm_destroy(comm);
}

// A checkpoint keeps its blocks: loading it where the same tensor has other blocks (or none)
// is refused, with the optimizer's state untouched, instead of reading one block's state as
// another's.
TEST(BlocksSpec, CheckpointsRefuseOtherBlocks) {
  const std::string dir = ::testing::TempDir() + "/mdopt_blocks_ckpt";
  std::filesystem::remove_all(dir);
  AbiHarness saver("threads=1", "preset=md-muon blocks=rows:2", {TensorSpec{"fc1", {12, 10}}},
                   kSeed);
  MDOPT_ASSERT_OK(mdopt_finalize(saver.opt()));
  saver.StepChecked(kSeed, 1);
  MDOPT_ASSERT_OK(mdopt_save(saver.opt(), dir.c_str()));
  for (const char* other : {"preset=md-muon", "preset=md-muon blocks=rows:3"}) {
    AbiHarness loader("threads=1", other, {TensorSpec{"fc1", {12, 10}}}, kSeed);
    MDOPT_ASSERT_OK(mdopt_finalize(loader.opt()));
    const std::vector<double> before = loader.State(0, "master");
    EXPECT_NE(mdopt_load(loader.opt(), dir.c_str()), MDOPT_SUCCESS) << other;
    EXPECT_EQ(loader.State(0, "master"), before) << other;
  }
  AbiHarness same("threads=1", "preset=md-muon blocks=rows:2", {TensorSpec{"fc1", {12, 10}}},
                  kSeed + 1);
  MDOPT_ASSERT_OK(mdopt_finalize(same.opt()));
  MDOPT_ASSERT_OK(mdopt_load(same.opt(), dir.c_str()));
  EXPECT_EQ(same.State(0, "master"), saver.State(0, "master"));
  EXPECT_EQ(same.State(0, "gain_col"), saver.State(0, "gain_col"));
  std::filesystem::remove_all(dir);
}

TEST(BlocksSpec, AZeroBlockIsNamedAtFinalize) {
  mdopt_comm* comm = nullptr;
  mdopt_optimizer* opt = nullptr;
  ASSERT_EQ(mdopt_comm_create_local(&comm), MDOPT_SUCCESS);
  ASSERT_EQ(mdopt_create(comm, "", &opt), MDOPT_SUCCESS);
  ASSERT_EQ(mdopt_add_group(opt, "glu", "preset=md-muon blocks=rows:2"), MDOPT_SUCCESS);
  // Expert 1's up half (block 1 of expert 1) is zero: it has no direction to project.
  std::vector<float> w(2 * 4 * 3, 0.5f), g(2 * 4 * 3, 0.0f);
  for (int k = 18; k < 24; ++k) w[k] = 0.0f;
  mdopt_param_desc d = testing::DescFor("fc1", "glu", {2, 4, 3}, MDOPT_DTYPE_F32, w.data(),
                                        MDOPT_DTYPE_F32, g.data());
  ASSERT_EQ(mdopt_add_param(opt, &d, nullptr), MDOPT_SUCCESS) << mdopt_last_error();
  EXPECT_EQ(mdopt_finalize(opt), MDOPT_INVALID_ARGUMENT);
  EXPECT_NE(std::string(mdopt_last_error()).find("of expert 1 block 1"), std::string::npos)
      << mdopt_last_error();
  mdopt_destroy(opt);
  mdopt_comm_destroy(comm);
}

}  // namespace
}  // namespace mdopt
