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

// The layout every segment follows, rebuilt the slow way (a table over ranks): the rows part
// (rows-layout slots' padded blocks, slot order), then rank r's whole matrices (slot order).
struct Expected {
  std::vector<int64_t> real;                 // per rank: real elements of its segment
  std::vector<std::vector<int64_t>> offset;  // [slot in bucket][rank]: where its rows sit (-1: none)
};
Expected Rebuild(const ShardPlan& plan, const BucketPlan& b) {
  const int N = plan.world;
  Expected e;
  e.real.assign(N, 0);
  e.offset.assign(b.slots.size(), std::vector<int64_t>(N, -1));
  for (size_t q = 0; q < b.slots.size(); ++q) {
    const SlotPlan& s = plan.slots[b.slots[q]];
    if (s.layout != Layout::kRows) continue;
    for (int r = 0; r < N; ++r) {
      e.offset[q][r] = e.real[r];
      e.real[r] += ((s.m + N - 1) / N) * s.n;
    }
  }
  for (size_t q = 0; q < b.slots.size(); ++q) {
    const SlotPlan& s = plan.slots[b.slots[q]];
    if (s.layout != Layout::kOwner) continue;
    e.offset[q][s.owner] = e.real[s.owner];
    e.real[s.owner] += s.m * s.n;
  }
  return e;
}

TEST(ShardPlanLayout, SegmentsFollowTheStatedLayoutWithoutATableOverRanks) {
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
      for (size_t k = 0; k < plain.slots.size(); ++k)
        EXPECT_EQ(plain.slots[k].seg_pos, padded.slots[k].seg_pos);
      for (size_t b = 0; b < plain.buckets.size(); ++b) {
        const BucketPlan& u = plain.buckets[b];
        const BucketPlan& p = padded.buckets[b];
        EXPECT_EQ(u.slots, p.slots);
        const Expected e = Rebuild(plain, u);
        const kernels::SegmentView uv = u.map.view(), pv = p.map.view();
        int64_t start = 0;
        const int64_t longest = *std::max_element(e.real.begin(), e.real.end());
        EXPECT_EQ(u.longest, longest);
        EXPECT_EQ(p.longest, longest);
        for (int r = 0; r < world; ++r) {
          EXPECT_EQ(uv.Real(r), e.real[r]) << "rank " << r;
          EXPECT_EQ(uv.Len(r), e.real[r]);
          EXPECT_EQ(uv.Start(r), start);
          EXPECT_EQ(pv.Real(r), e.real[r]);
          EXPECT_EQ(pv.Len(r), world > 1 ? longest : e.real[r]);
          EXPECT_EQ(pv.Start(r), r * pv.Len(r));
          start += e.real[r];
          for (size_t q = 0; q < u.slots.size(); ++q) {
            const SlotPlan& s = plain.slots[u.slots[q]];
            if (e.offset[q][r] < 0) continue;
            EXPECT_EQ(s.seg_pos, e.offset[q][r]) << "slot " << u.slots[q] << " rank " << r;
          }
        }
        EXPECT_EQ(u.total, start);
        EXPECT_EQ(u.tail_pad, 0);
        EXPECT_EQ(p.total, world > 1 ? world * longest : start);
        EXPECT_EQ(p.tail_pad, p.total - start);
        if (world > 1 && p.tail_pad > 0) ++uneven;
        // (N - 1) x padding x (gradient f32 + weight bytes).
        const int64_t w = p.param_dtype == Dtype::kF32 ? 4 : 2;
        EXPECT_EQ(PaddingBytes(padded, p), (world - 1) * p.tail_pad * (4 + w));
        EXPECT_EQ(PaddingBytes(plain, u), 0);
        // The plan keeps one owned entry per rank holding whole matrices here, no more.
        int owners = 0;
        for (int r = 0; r < world; ++r) owners += e.real[r] > u.map.rows ? 1 : 0;
        EXPECT_EQ(static_cast<int>(u.map.owned.size()), owners);
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
