// The shard plan's equal segments (PlanOptions::equal_segments, the optimizer's comm_pad):
// every rank's segment of a bucket padded at its tail to the bucket's longest, nothing else
// of the plan changed (slots, offsets, the JSON checkpoints store), the padding counted and
// its bytes stated; at 1 to 5 ranks, one bucket or a bucket per param.
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <string>
#include <vector>

#include "dist_opt/group_spec.h"
#include "dist_opt/param_registry.h"
#include "dist_opt/shard_plan.h"

namespace mdopt {
namespace {

// Uneven on purpose: md-muon matrices whole on one rank (owner layout), md-adamw ones in row
// blocks of odd row counts, a 1-D vector (always whole), a 3-D stack, bf16 weights for the
// last two (a bucket of their own dtype).
// The plan reads shapes only; the registry wants a param pointer.
float g_unread = 0.0f;

struct Model {
  std::vector<Group> groups;
  ParamRegistry registry;

  Model() {
    groups.push_back(Group{"muon", *ParseGroupSpec("preset=md-muon")});
    groups.push_back(Group{"adamw", *ParseGroupSpec("preset=md-adamw")});
    struct T {
      const char* name;
      const char* group;
      std::vector<int64_t> shape;
      int dtype;
    };
    const T tensors[] = {{"q", "muon", {24, 16}, 0},   {"odd", "adamw", {7, 19}, 0},
                         {"vec", "adamw", {13}, 0},     {"experts", "muon", {3, 5, 8}, 0},
                         {"tall", "adamw", {33, 4}, 0}, {"o", "muon", {16, 24}, 0},
                         {"emb", "adamw", {11, 6}, 1},  {"bvec", "adamw", {5}, 1}};
    for (const T& t : tensors) {
      ParamDescription d;
      d.name = t.name;
      d.group = t.group;
      d.ndim = static_cast<int>(t.shape.size());
      for (size_t k = 0; k < t.shape.size(); ++k) d.shape[k] = t.shape[k];
      d.param_dtype = t.dtype;
      d.param = &g_unread;
      EXPECT_TRUE(registry.Add(d, groups).ok()) << t.name;
    }
  }
  ShardPlan Plan(int world, int64_t bucket_bytes, bool equal, int grad_bytes = 4) const {
    PlanOptions o;
    o.world = world;
    o.bucket_bytes = bucket_bytes;
    o.equal_segments = equal;
    o.grad_comm_bytes = grad_bytes;
    return BuildShardPlan(registry.params(), groups, o);
  }
};

TEST(ShardPlanPadding, EverySegmentIsTheLongestAndNothingElseMoves) {
  const Model m;
  int uneven = 0;
  for (int world = 1; world <= 5; ++world) {
    for (int64_t bucket_bytes : {int64_t{1} << 20, int64_t{1}}) {
      SCOPED_TRACE("world " + std::to_string(world) + ", bucket_bytes " + std::to_string(bucket_bytes));
      const ShardPlan plain = m.Plan(world, bucket_bytes, false);
      const ShardPlan padded = m.Plan(world, bucket_bytes, true);
      EXPECT_FALSE(plain.equal_segments);
      EXPECT_TRUE(padded.equal_segments);
      // Who holds what is the padding's business not at all: the saved plan is the same.
      EXPECT_EQ(plain.ToJson(), padded.ToJson());
      ASSERT_EQ(plain.buckets.size(), padded.buckets.size());
      for (size_t b = 0; b < plain.buckets.size(); ++b) {
        const BucketPlan& u = plain.buckets[b];
        const BucketPlan& p = padded.buckets[b];
        EXPECT_EQ(u.slots, p.slots);
        EXPECT_EQ(u.offset, p.offset);  // each slot at the same place in its rank's segment
        EXPECT_EQ(u.rows, u.seg);       // unpadded: the rows are the whole segment
        EXPECT_EQ(u.tail_pad, 0);
        EXPECT_EQ(p.rows, u.seg);
        const int64_t longest = *std::max_element(u.seg.begin(), u.seg.end());
        EXPECT_EQ(p.seg, std::vector<int64_t>(static_cast<size_t>(world), longest));
        EXPECT_EQ(p.total, world * longest);
        EXPECT_EQ(p.tail_pad, world * longest - u.total);
        // Each slot's rows end within the rows part of its rank's segment.
        for (size_t k = 0; k < p.slots.size(); ++k) {
          const SlotPlan& s = padded.slots[p.slots[k]];
          for (int r = 0; r < world; ++r)
            EXPECT_LE(p.Offset(k, r, world) + s.PackedRows(r) * s.n, p.rows[r]);
        }
        if (world > 1 && p.tail_pad > 0) ++uneven;
        // (N - 1) x padding x (gradient f32 + weight bytes).
        const int64_t w = p.param_dtype == Dtype::kF32 ? 4 : 2;
        EXPECT_EQ(PaddingBytes(padded, p), (world - 1) * p.tail_pad * (4 + w));
        EXPECT_EQ(PaddingBytes(plain, u), 0);
      }
    }
  }
  EXPECT_GT(uneven, 10);  // the model is uneven almost everywhere
}

TEST(ShardPlanPadding, AnEvenBucketIsLeftAsItWas) {
  // Two 8 x 4 adamw matrices in rows at 2 and 4 ranks: every segment the same already.
  std::vector<Group> groups = {Group{"adamw", *ParseGroupSpec("preset=md-adamw")}};
  ParamRegistry registry;
  for (const char* name : {"a", "b"}) {
    ParamDescription d;
    d.name = name;
    d.group = "adamw";
    d.ndim = 2;
    d.shape[0] = 8;
    d.shape[1] = 4;
    d.param = &g_unread;
    ASSERT_TRUE(registry.Add(d, groups).ok());
  }
  for (int world : {2, 4}) {
    PlanOptions o;
    o.world = world;
    o.equal_segments = true;
    const ShardPlan p = BuildShardPlan(registry.params(), groups, o);
    ASSERT_EQ(p.buckets.size(), 1u);
    EXPECT_EQ(p.buckets[0].tail_pad, 0);
    EXPECT_EQ(p.buckets[0].total, 64);
    EXPECT_EQ(PaddingBytes(p, p.buckets[0]), 0);
  }
}

TEST(ShardPlanPadding, DescribeStatesThePaddingAndItsBytes) {
  const Model m;
  const ShardPlan padded = m.Plan(3, int64_t{1} << 20, true, /*grad_bytes=*/2);
  int64_t pad = 0, bytes = 0;
  for (const BucketPlan& b : padded.buckets) {
    pad += b.tail_pad;
    bytes += PaddingBytes(padded, b);
    // grad_comm_dtype=bf16: 2 bytes per gradient element.
    EXPECT_EQ(PaddingBytes(padded, b), 2 * b.tail_pad * (2 + (b.param_dtype == Dtype::kF32 ? 4 : 2)));
  }
  ASSERT_GT(pad, 0);
  const std::string text = padded.Describe(m.registry.params());
  const std::string b0 = "tail padding " + std::to_string(padded.buckets[0].tail_pad) +
                         " elements (+" + std::to_string(PaddingBytes(padded, padded.buckets[0])) +
                         " B per step on the wire)";
  EXPECT_NE(text.find(b0), std::string::npos) << text;
  const std::string total = "segments padded to equal counts (comm_pad): " + std::to_string(pad) +
                            " elements of tail padding, +" + std::to_string(bytes) +
                            " B per step on the wire over all ranks";
  EXPECT_NE(text.find(total), std::string::npos) << text;
  // grads=reduced: only the weights' all-gather carries the padding.
  const ShardPlan reduced = m.Plan(3, int64_t{1} << 20, true, /*grad_bytes=*/0);
  for (const BucketPlan& b : reduced.buckets)
    EXPECT_EQ(PaddingBytes(reduced, b), 2 * b.tail_pad * (b.param_dtype == Dtype::kF32 ? 4 : 2));
  // Unpadded at several ranks it says so; at one rank there is nothing to say.
  EXPECT_NE(m.Plan(3, int64_t{1} << 20, false).Describe(m.registry.params()).find("segments not padded"),
            std::string::npos);
  const std::string one = m.Plan(1, int64_t{1} << 20, false).Describe(m.registry.params());
  EXPECT_EQ(one.find("padded"), std::string::npos) << one;
}

}  // namespace
}  // namespace mdopt
