// Logical row blocks (spec key blocks=rows:K): a fused matrix whose K blocks of rows are
// separate linear maps (a GLU fc1 [gate; up]) is K matrices to the optimizer for its sphere,
// radius, tangent projection and base update, while its gains are the fused matrix's: row
// gains per row, one column-gain vector and one scalar gain shared by the K blocks (per
// expert of a stack), their gradients summed over every block's rows. Held here to a float64
// reference of the fused tensor (fused_reference.h, LayoutRef: only Newton-Schulz and the
// gain parametrisation come from the library). Checked for both engines, Muon and Adam bases,
// with and without gains, 2-D and 3-D (an expert stack of GLU fc1s), preserve_init (the
// initial norms into each block's row gains), radius=fan_in and radius_scale:
//   - every block's weights equal the reference's (kernels=reference: 1e-12; kernels=fast:
//     float32, 5e-6, the tolerances of crosscheck_test), and so do the gains;
//   - the column and scalar gains of a matrix's blocks stay bitwise equal;
//   - every block's bare direction (W over the effective gains) has Frobenius norm equal to
//     its own radius after every step;
//   - the same model without blocks does NOT keep the blocks on their spheres (the failure
//     the key exists for), and bad values or combinations are INVALID_ARGUMENT errors naming
//     the key.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <ostream>
#include <string>
#include <vector>

#include "dist_opt/crc32c.h"
#include "dist_opt/group_spec.h"
#include "dist_opt/shard_plan.h"
#include "kernels/common/gain_param.h"
#include "kernels/reference/reference.h"
#include "nlohmann/json.hpp"
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

constexpr int kSteps = 8;
constexpr uint64_t kSeed = 5;

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
  std::string extra = "";      // more spec keys (preserve_init=1, radius=fan_in)
  double radius_scale = 0.0;   // mdopt_param_desc.radius_scale (0: not given, 1)
  std::string Name() const {
    std::string s = preset + "_" + extra + "_" + engine.substr(8) + "_";
    for (int64_t x : shape) s += std::to_string(x) + "x";
    s += "_rows" + std::to_string(blocks);
    if (radius_scale > 0) s += "_scale" + std::to_string(static_cast<int>(radius_scale * 100));
    for (char& c : s)
      if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
    return s;
  }
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.Name(); }

class Blocks : public ::testing::TestWithParam<Case> {};

TEST_P(Blocks, BlocksShareColumnAndScalarGains) {
  const Case& c = GetParam();
  const bool stack = c.shape.size() == 3;
  const int64_t E = stack ? c.shape[0] : 1, K = c.blocks;
  const int64_t f = c.shape[stack ? 1 : 0] / K, d = c.shape.back();
  const int64_t slots = E * K, numel = slots * f * d, mat = K * f * d;
  const std::string spec = "preset=" + c.preset + " " + c.extra;
  TensorSpec t{"fc1", c.shape};
  t.radius_scale = c.radius_scale;
  AbiHarness h(c.engine + " threads=1", spec + " blocks=rows:" + std::to_string(K), {t}, kSeed);
  const std::vector<double> w0 = h.Model(0);
  MDOPT_ASSERT_OK(mdopt_finalize(h.opt()));

  absl::StatusOr<GroupSpec> parsed = ParseGroupSpec(spec);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  const kernels::UpdateRule rule = parsed->rule;
  ASSERT_TRUE(rule.sphere == Sphere::kFrobenius || rule.sphere == Sphere::kNone);
  const double scale = c.radius_scale > 0 ? c.radius_scale : 1.0;
  const bool fan_in = rule.radius_mode == kernels::RadiusMode::kFanIn;
  ASSERT_TRUE(fan_in || rule.radius_mode == kernels::RadiusMode::kAuto);
  // radius=auto: sqrt(max(f, d)); fan_in: sqrt(f), of the block's own shape, times the scale.
  const double block_radius =
      scale * std::sqrt(static_cast<double>(fan_in ? f : std::max(f, d)));
  std::vector<LayoutRef> ref(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; ++e) {
    ref[e].Init(rule, BlockRows(1, std::vector<int64_t>(static_cast<size_t>(K), f)), d,
                std::vector<double>(w0.begin() + e * mat, w0.begin() + (e + 1) * mat),
                parsed->preserve_init, [&](int64_t, double) { return block_radius; });
  }
  const double tol = c.engine == "kernels=fast" ? 5e-6 : 1e-12;
  const bool sphere = rule.sphere != Sphere::kNone;
  const kernels::Gains gk = rule.gains;
  double worst_norm = 0.0, worst_w = 0.0, worst_gain = 0.0;
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
    // Effective gains as the ABI gives them: row gains along the fused tensor's rows
    // (slots * f), column gains and the scalar per block slot (slots * d, slots): the
    // blocks' copies of their matrix's shared gains. Ones where the rule has none.
    std::vector<double> grow(slots * f, 1.0), gcol(slots * d, 1.0), gsc(slots, 1.0), radius;
    if (kernels::HasRowGains(gk)) grow = h.State(0, "gain_row");
    if (kernels::HasColGains(gk)) gcol = h.State(0, "gain_col");
    if (kernels::HasScalarGain(gk)) gsc = h.State(0, "gain_scalar");
    ASSERT_EQ(static_cast<int64_t>(grow.size()), slots * f);
    ASSERT_EQ(static_cast<int64_t>(gcol.size()), slots * d);
    ASSERT_EQ(static_cast<int64_t>(gsc.size()), slots);
    if (sphere) {
      radius = h.State(0, "radius");
      ASSERT_EQ(static_cast<int64_t>(radius.size()), slots);
    }
    for (int64_t e = 0; e < E; ++e) {
      LayoutRef& fr = ref[e];
      fr.Step(std::vector<double>(g.begin() + e * mat, g.begin() + (e + 1) * mat), rule.lr,
              rule.gain_lr, step);
      const std::vector<double> mine(w.begin() + e * mat, w.begin() + (e + 1) * mat);
      const double err = RelMaxError(mine, fr.w);
      worst_w = std::max(worst_w, err);
      EXPECT_LE(err, tol) << "step " << step << " expert " << e;
      // The shared gains: bitwise one value over the matrix's blocks, the reference's value.
      std::vector<double> mine_col(gcol.begin() + e * K * d, gcol.begin() + (e * K + 1) * d);
      std::vector<double> ref_col(static_cast<size_t>(d)), ref_row(static_cast<size_t>(K * f));
      for (int64_t j = 0; j < d; ++j) ref_col[j] = fr.col.Value(rule, static_cast<size_t>(j));
      for (int64_t i = 0; i < K * f; ++i) ref_row[i] = fr.row.Value(rule, static_cast<size_t>(i));
      for (int64_t k = 1; k < K; ++k) {
        for (int64_t j = 0; j < d; ++j)
          ASSERT_EQ(gcol[(e * K + k) * d + j], gcol[e * K * d + j])
              << "step " << step << " expert " << e << " block " << k << " column " << j;
        ASSERT_EQ(gsc[e * K + k], gsc[e * K]) << "step " << step << " expert " << e << " block " << k;
      }
      const std::vector<double> mine_row(grow.begin() + e * K * f, grow.begin() + (e + 1) * K * f);
      const double gerr = std::max({RelMaxError(mine_col, ref_col), RelMaxError(mine_row, ref_row),
                                    std::abs(gsc[e * K] - fr.scalar.Value(rule, 0))});
      worst_gain = std::max(worst_gain, gerr);
      EXPECT_LE(gerr, tol) << "step " << step << " expert " << e;
      if (!sphere) continue;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t s = e * K + k;
        double sq = 0.0;
        for (int64_t i = 0; i < f; ++i)
          for (int64_t j = 0; j < d; ++j) {
            const double bare = w[(s * f + i) * d + j] / (grow[s * f + i] * gcol[s * d + j] * gsc[s]);
            sq += bare * bare;
          }
        const double rel = std::abs(std::sqrt(sq) - radius[s]) / radius[s];
        worst_norm = std::max(worst_norm, rel);
        EXPECT_LE(rel, 1e-5) << "step " << step << " block " << s;
        // The radius is the block's own (its shape, its param's radius_scale).
        EXPECT_NEAR(radius[s], block_radius, 1e-6 * block_radius);
      }
    }
  }
  std::printf("[ measured ] %s: worst |block norm - radius| / radius %.2e, worst weights vs "
              "fused reference %.2e, worst gains %.2e\n",
              c.Name().c_str(), worst_norm, worst_w, worst_gain);
}

std::vector<Case> Cases() {
  std::vector<Case> out;
  for (const char* preset : {"md-muon", "muonh", "md-adamw", "adamh",
                             "md-muon gains=scalar tangent=1", "md-adamw gains=col"})
    for (const char* engine : {"kernels=reference", "kernels=fast"}) {
      out.push_back({preset, engine, {12, 10}, 2});  // a GLU fc1 [gate; up], f < d
      out.push_back({preset, engine, {3, 16, 5}, 2});  // a 3-D expert stack of GLU fc1s
      out.push_back({preset, engine, {9, 7}, 3});  // three blocks of 3 x 7
    }
  for (const char* engine : {"kernels=reference", "kernels=fast"}) {
    // preserve_init: each block's initial norm into its rows' gains (frobenius, row gains).
    out.push_back({"md-muon", engine, {12, 10}, 2, "preserve_init=1"});
    out.push_back({"md-adamw gains=row", engine, {3, 16, 5}, 2, "preserve_init=1"});
    // radius=fan_in (sqrt of the block's rows) and a param's radius_scale, alone and together.
    out.push_back({"md-muon", engine, {12, 10}, 2, "radius=fan_in"});
    out.push_back({"md-adamw", engine, {3, 16, 5}, 2, "", 0.5});
    out.push_back({"md-muon gains=scalar", engine, {9, 7}, 3, "radius=fan_in", 0.25});
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

// preserve_init puts each block's initial norm into the gains; the shared column and scalar
// gains cannot hold K different factors, so the specs that would put them there are refused
// (naming the key), and those that put them into the row gains are taken.
TEST(BlocksSpec, PreserveInitNeedsRowGains) {
  for (const char* bad : {"preset=md-muon gains=col", "preset=md-adamw gains=scalar",
                          "preset=md-adamw sphere=col gains=col",
                          "preset=md-muon sphere=col gains=rowcol"}) {
    const std::string spec = std::string(bad) + " preserve_init=1 blocks=rows:2";
    absl::StatusOr<GroupSpec> s = ParseGroupSpec(spec);
    ASSERT_FALSE(s.ok()) << spec;
    EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument) << spec;
    EXPECT_NE(s.status().message().find("'blocks'"), std::string::npos) << s.status();
    EXPECT_NE(s.status().message().find("preserve_init"), std::string::npos) << s.status();
    // The same without blocks, or with one block, is fine.
    EXPECT_TRUE(ParseGroupSpec(std::string(bad) + " preserve_init=1").ok()) << bad;
    EXPECT_TRUE(ParseGroupSpec(std::string(bad) + " preserve_init=1 blocks=rows:1").ok()) << bad;
  }
  for (const char* good : {"preset=md-muon", "preset=md-adamw gains=row", "preset=router",
                           "preset=md-muon sphere=row gains=rowcol"}) {
    const std::string spec = std::string(good) + " preserve_init=1 blocks=rows:2";
    EXPECT_TRUE(ParseGroupSpec(spec).ok()) << spec << ": " << ParseGroupSpec(spec).status();
  }
}

// The plan keeps the K blocks of a matrix where their shared gains' gradient is summed: in
// one bucket (a stack split over buckets is split at whole matrices) and, in the owner
// layout, on one owner; the matrices themselves still spread over the ranks.
TEST(BlocksPlan, AMatrixsBlocksShareBucketAndOwner) {
  for (const char* layout : {"owner", "rows"}) {
    absl::StatusOr<GroupSpec> spec =
        ParseGroupSpec(std::string("preset=md-muon blocks=rows:2 layout=") + layout);
    ASSERT_TRUE(spec.ok());
    std::vector<Group> groups(1);
    groups[0].name = "g";
    groups[0].spec = *spec;
    std::vector<ParamEntry> params(2);
    params[0].name = "fc1";
    params[0].ndim = 2;
    params[0].experts = 2, params[0].matrix_m = 48, params[0].n = 16;
    params[1].name = "experts";
    params[1].ndim = 3;
    params[1].experts = 7 * 2, params[1].matrix_m = 16, params[1].n = 16;
    for (ParamEntry& p : params) {
      p.blocks = 2;
      p.block_m = {p.matrix_m / 2, p.matrix_m / 2};
      p.block_row0 = {0, p.matrix_m / 2};
      p.rule = spec->rule;
    }
    for (int world : {1, 2, 3, 4, 7}) {
      for (int64_t bytes : {int64_t{1}, int64_t{2100}, int64_t{32} << 20}) {
        PlanOptions o;
        o.world = world;
        o.bucket_bytes = bytes;
        const ShardPlan plan = BuildShardPlan(params, groups, o);
        std::vector<int> owners_used(static_cast<size_t>(world), 0);
        for (size_t k = 0; k < plan.slots.size(); ++k) {
          const SlotPlan& s = plan.slots[k];
          if (s.expert % 2 == 0) {
            ++owners_used[s.owner];
            continue;
          }
          const SlotPlan& first = plan.slots[k - 1];
          EXPECT_EQ(s.bucket, first.bucket) << layout << " N=" << world << " bytes=" << bytes;
          EXPECT_EQ(s.bucket_pos, first.bucket_pos + 1);
          if (s.layout == Layout::kOwner) {
            EXPECT_EQ(s.owner, first.owner) << "N=" << world;
          }
        }
        if (std::string(layout) == "owner") {
          int used = 0;
          for (int c : owners_used) used += c > 0;
          EXPECT_EQ(used, std::min(world, 8)) << "N=" << world;
        }
      }
    }
  }
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

// A checkpoint of blocks with column or scalar gains written before those gains were shared
// (its manifest lacks "block_gains": "shared") holds per-block gains whose copies differ: it
// is refused, naming the group, and the state is left as it was.
TEST(BlocksSpec, CheckpointsOfPerBlockGainsAreRefused) {
  const std::string dir = ::testing::TempDir() + "/mdopt_blocks_ckpt_old";
  std::filesystem::remove_all(dir);
  const std::string spec = "preset=md-muon blocks=rows:2";
  AbiHarness saver("threads=1", spec, {TensorSpec{"fc1", {12, 10}}}, kSeed);
  MDOPT_ASSERT_OK(mdopt_finalize(saver.opt()));
  saver.StepChecked(kSeed, 1);
  MDOPT_ASSERT_OK(mdopt_save(saver.opt(), dir.c_str()));
  const std::string path = dir + "/manifest.json";
  nlohmann::json m = nlohmann::json::parse(testing::ReadBytes(path));
  ASSERT_EQ(m["groups"][0]["block_gains"], "shared");
  m["groups"][0].erase("block_gains");
  m.erase("crc32c");
  const std::string body = m.dump();
  char hex[9];
  std::snprintf(hex, sizeof hex, "%08x", Crc32c(0, body.data(), body.size()));
  m["crc32c"] = hex;
  testing::WriteBytes(path, m.dump(2));
  AbiHarness loader("threads=1", spec, {TensorSpec{"fc1", {12, 10}}}, kSeed + 1);
  MDOPT_ASSERT_OK(mdopt_finalize(loader.opt()));
  const std::vector<double> before = loader.State(0, "gain_col");
  EXPECT_EQ(mdopt_load(loader.opt(), dir.c_str()), MDOPT_IO_ERROR);
  EXPECT_NE(std::string(mdopt_last_error()).find("gains of its own"), std::string::npos)
      << mdopt_last_error();
  EXPECT_EQ(loader.State(0, "gain_col"), before);
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
