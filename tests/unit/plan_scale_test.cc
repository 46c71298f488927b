// The shard plan at cluster sizes, with no cluster: its memory does not grow with
// slots x ranks, owners are packed as a plain longest-first packing over every rank would
// pack them (balancing state bytes and Newton-Schulz cost together), matrices with fewer
// rows than ranks are held whole, and no collective buffer grows past bucket_mb (expert
// stacks split by experts, a larger matrix's collectives cut into windows).
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

float g_unread = 0.0f;  // the plan reads shapes only; the registry wants a pointer

struct Model {
  std::vector<Group> groups;
  ParamRegistry registry;
  explicit Model(const std::string& muon_spec = "preset=md-muon layout=rows") {
    groups.push_back(Group{"muon", *ParseGroupSpec(muon_spec)});
    groups.push_back(Group{"adamw", *ParseGroupSpec("preset=md-adamw layout=owner")});
  }
  void Add(const std::string& name, const std::string& group, std::vector<int64_t> shape) {
    ParamDescription d;
    d.name = name;
    d.group = group;
    d.ndim = static_cast<int>(shape.size());
    for (size_t k = 0; k < shape.size(); ++k) d.shape[k] = shape[k];
    d.param = &g_unread;
    ASSERT_TRUE(registry.Add(d, groups).ok()) << name;
  }
  ShardPlan Plan(int world, int64_t bucket_bytes = int64_t{32} << 20, bool equal = false) const {
    PlanOptions o;
    o.world = world;
    o.bucket_bytes = bucket_bytes;
    o.equal_segments = equal;
    return BuildShardPlan(registry.params(), groups, o);
  }
};

// A MoE stack of 24 layers: attention, a router and a 64-expert stack of each of fc1, fc2,
// plus norms: 24 * (4 + 1 + 128 + 2) + 2 = 3,242 slots.
Model MoE() {
  Model m;
  for (int l = 0; l < 24; ++l) {
    const std::string p = "layer" + std::to_string(l) + ".";
    m.Add(p + "qkv", "muon", {6144, 4096});
    m.Add(p + "proj", "muon", {4096, 4096});
    m.Add(p + "q_norm", "adamw", {128});
    m.Add(p + "k_norm", "adamw", {128});
    m.Add(p + "router", "muon", {64, 4096});
    m.Add(p + "fc1", "muon", {64, 2816, 4096});
    m.Add(p + "fc2", "muon", {64, 4096, 1408});
    m.Add(p + "norm1", "adamw", {4096});
    m.Add(p + "norm2", "adamw", {4096});
  }
  m.Add("embedding", "muon", {128256, 4096});
  m.Add("final_norm", "adamw", {4096});
  return m;
}

TEST(PlanScale, PlanMemoryIsSlotsPlusRanksNotTheirProduct) {
  const Model m = MoE();
  const ShardPlan small = m.Plan(8), large = m.Plan(4096);
  const int64_t slots = static_cast<int64_t>(large.slots.size());
  ASSERT_GT(slots, 3000);
  // Bytes that depend on the rank count: the owned entries, at most one per (bucket, rank
  // holding whole matrices there), so at most one per slot.
  int64_t owned = 0;
  for (const BucketPlan& b : large.buckets) owned += static_cast<int64_t>(b.map.owned.size());
  EXPECT_LE(owned, slots);
  const int64_t table = slots * 4096 * static_cast<int64_t>(sizeof(int64_t));  // the old offsets
  EXPECT_LT(large.Bytes(), table / 100) << large.Bytes() << " B vs a slots x N table of " << table;
  EXPECT_LE(large.Bytes(), small.Bytes() + slots * static_cast<int64_t>(sizeof(kernels::OwnedPart)))
      << "plan at 4,096 ranks: " << large.Bytes() << " B, at 8: " << small.Bytes() << " B";
  // Per-rank loads in O(slots + N) still add up to the model.
  std::vector<double> state, ns;
  large.Loads(&state, &ns);
  double elems = 0.0;
  for (const ParamEntry& p : m.registry.params()) elems += static_cast<double>(p.numel());
  EXPECT_DOUBLE_EQ(std::accumulate(state.begin(), state.end(), 0.0), elems);
}

TEST(PlanScale, MatricesWithFewerRowsThanRanksAreHeldWhole) {
  Model m;
  m.Add("router", "muon", {64, 512});
  m.Add("wide", "muon", {1100, 64});
  for (int world : {4, 64, 1024}) {
    const ShardPlan p = m.Plan(world);
    const SlotPlan& router = p.slot(0, 0);
    const SlotPlan& wide = p.slot(1, 0);
    EXPECT_EQ(router.layout, world > 64 ? Layout::kOwner : Layout::kRows) << world;
    EXPECT_EQ(wide.layout, Layout::kRows) << world;
    // What crosses the wire for the router: its own elements (owner) or its padded blocks.
    // What crosses the wire for the router: its own elements (owner) or its padded blocks.
    const int64_t router_wire = router.layout == Layout::kOwner ? router.m * router.n
                                                                : world * router.block_rows * router.n;
    EXPECT_EQ(router_wire, 64 * 512) << world;
    // A split matrix pads under N rows, so less than itself: 1,100 rows at 1,024 ranks pad
    // 948 rows, not the 1,024 - 64 a 64-row matrix would.
    const int64_t wide_pad = (world * ((1100 + world - 1) / world) - 1100) * 64;
    EXPECT_LT(wide_pad, static_cast<int64_t>(world) * 64);
    EXPECT_LT(wide_pad, 1100 * 64);
    const int64_t router_pad = router.layout == Layout::kRows ? (world * router.block_rows - 64) * 512 : 0;
    EXPECT_EQ(p.buckets[wide.bucket].row_pad, wide_pad + router_pad) << world;
    // Equal segments: held whole, the router would pad every other segment to its size;
    // row blocks pad it to N rows instead.
    const ShardPlan eq = m.Plan(world, int64_t{32} << 20, true);
    EXPECT_EQ(eq.slot(0, 0).layout, Layout::kRows) << world;
  }
}

// Longest-first packing onto the least loaded rank, the plain O(items x N) way, with the
// weights the plan states: a matrix's share of all NS cost plus its share of all whole-matrix
// state.
std::vector<int> ReferenceOwners(const ShardPlan& plan) {
  double ns_total = 0.0, bytes_total = 0.0;
  for (const SlotPlan& s : plan.slots) {
    if (s.muon) ns_total += NsCost(s.m, s.n);
    if (s.layout == Layout::kOwner) bytes_total += static_cast<double>(s.m * s.n);
  }
  std::vector<int> items;
  std::vector<double> w(plan.slots.size(), 0.0);
  for (size_t k = 0; k < plan.slots.size(); ++k) {
    const SlotPlan& s = plan.slots[k];
    if (!s.muon && s.layout != Layout::kOwner) continue;
    if (s.muon) w[k] += NsCost(s.m, s.n) / ns_total;
    if (s.layout == Layout::kOwner) w[k] += static_cast<double>(s.m * s.n) / bytes_total;
    items.push_back(static_cast<int>(k));
  }
  std::stable_sort(items.begin(), items.end(), [&](int a, int b) { return w[a] > w[b]; });
  std::vector<double> load(static_cast<size_t>(plan.world), 0.0);
  std::vector<int> owner(plan.slots.size(), -1);
  for (int k : items) {
    const int r = static_cast<int>(std::min_element(load.begin(), load.end()) - load.begin());
    owner[k] = r;
    load[r] += w[k];
  }
  return owner;
}

TEST(PlanScale, OwnersBalanceStateBytesAndNewtonSchulzTogether) {
  // Whole matrices of many shapes (owner layout) and row-split Muon matrices (NS owners).
  Model m("preset=md-muon layout=owner");
  for (int i = 0; i < 300; ++i) {
    const int64_t a = 64 + (i * 37) % 700, b = 32 + (i * 53) % 900;
    m.Add("w" + std::to_string(i), i % 3 == 0 ? "adamw" : "muon", {a, b});
    if (i % 5 == 0) m.Add("v" + std::to_string(i), "adamw", {b});
  }
  for (int world : {3, 16, 64, 500}) {
    SCOPED_TRACE("world " + std::to_string(world));
    const ShardPlan p = m.Plan(world);
    const std::vector<int> ref = ReferenceOwners(p);
    double ns_total = 0.0, bytes_total = 0.0, top = 0.0;
    std::vector<double> load(static_cast<size_t>(world), 0.0);
    for (size_t k = 0; k < p.slots.size(); ++k) {
      const SlotPlan& s = p.slots[k];
      if (ref[k] < 0) continue;
      EXPECT_EQ(s.owner, ref[k]) << "slot " << k;
      ns_total += s.muon ? NsCost(s.m, s.n) : 0.0;
      bytes_total += s.layout == Layout::kOwner ? static_cast<double>(s.m * s.n) : 0.0;
    }
    for (size_t k = 0; k < p.slots.size(); ++k) {
      const SlotPlan& s = p.slots[k];
      if (ref[k] < 0) continue;
      const double w = (s.muon ? NsCost(s.m, s.n) / ns_total : 0.0) +
                       (s.layout == Layout::kOwner ? static_cast<double>(s.m * s.n) / bytes_total : 0.0);
      load[s.owner] += w;
      top = std::max(top, w);
    }
    // Longest-first's bound: no rank above the mean by more than the heaviest item.
    const double mean = 2.0 / world;  // both shares sum to 1
    EXPECT_LE(*std::max_element(load.begin(), load.end()), mean + top + 1e-12);
  }
}

TEST(PlanScale, NoCollectiveBufferGrowsPastTheBucket) {
  Model m;
  m.Add("experts", "muon", {16, 64, 64});  // 16 KiB of f32 state per expert
  m.Add("big", "muon", {512, 64});          // 128 KiB
  m.Add("small", "muon", {8, 64});
  const int64_t bucket_bytes = 4 * 64 * 64 * 4;  // four experts
  const int64_t elems = bucket_bytes / 4;
  for (int world : {1, 2, 3, 4}) {
    for (bool equal : {false, true}) {
      SCOPED_TRACE("world " + std::to_string(world) + (equal ? " equal" : ""));
      const ShardPlan p = m.Plan(world, bucket_bytes, equal);
      // The stack in runs of four experts, each a bucket of its own, in expert order.
      std::vector<int> stack_buckets;
      for (int64_t e = 0; e < 16; ++e) {
        const SlotPlan& s = p.slot(0, e);
        if (e % 4 == 0) stack_buckets.push_back(s.bucket);
        EXPECT_EQ(s.bucket, stack_buckets.back());
        EXPECT_EQ(s.bucket_pos, e % 4);
      }
      EXPECT_EQ(stack_buckets.size(), 4u);
      for (int b : stack_buckets) {
        EXPECT_EQ(p.buckets[b].first_param, 0);
        EXPECT_EQ(p.buckets[b].end_param, 1);
      }
      EXPECT_EQ(p.bucket_of_param[0], stack_buckets.front());
      for (const BucketPlan& b : p.buckets) {
        // Windows tile every segment, and one window of all ranks fits in the bucket.
        for (int w = 0; w < b.Windows(); ++w) {
          const std::vector<int64_t> counts = b.WindowCounts(w, world);
          const int64_t sum = std::accumulate(counts.begin(), counts.end(), int64_t{0});
          if (world > 1) {
            EXPECT_LE(sum, std::max(elems, b.total)) << "window " << w;
          }
          if (world > 1 && b.total > elems) {
            EXPECT_LE(sum, elems) << "window " << w;
          }
        }
        EXPECT_GE(static_cast<int64_t>(b.Windows()) * b.window, b.longest);
        EXPECT_LT(static_cast<int64_t>(b.Windows() - 1) * b.window, std::max<int64_t>(b.longest, 1));
      }
      const BucketPlan& big = p.buckets[p.slot(1, 0).bucket];
      EXPECT_EQ(big.slots.size(), 1u);
      if (world > 1) {
        EXPECT_GT(big.Windows(), 1);
        // The widest window whose staging fits: rows part on every rank.
        EXPECT_LE(world * big.window, elems);
        EXPECT_GT(world * (big.window + 1), elems);
      } else {
        EXPECT_EQ(big.Windows(), 1);  // one rank: no collectives to bound
      }
    }
  }
}

}  // namespace
}  // namespace mdopt
