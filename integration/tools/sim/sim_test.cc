// mdopt-sim's cost model against hand-computed cases: one collective (latency- and
// bandwidth-bound, ring vs tree, within and across nodes), Newton-Schulz FLOPs of both forms,
// one bucket through the wave schedule step by step, pipelining of several, the hardware
// file's errors, and the plan's bytes in closed form against comm/traffic.h window by window.
#include <cmath>
#include <string>
#include <vector>

#include "comm/traffic.h"
#include "gtest/gtest.h"
#include "integration/tools/bench/model_shapes.h"
#include "integration/tools/scale/plan_model.h"
#include "integration/tools/sim/collective_cost.h"
#include "integration/tools/sim/hardware.h"
#include "integration/tools/sim/step_sim.h"

namespace mdopt_sim {
namespace {

Hardware Simple() {
  Hardware hw;
  hw.hbm_gbps = 1000;
  hw.gemm_tflops_small = hw.gemm_tflops_medium = hw.gemm_tflops_large = 100;
  hw.peak_tflops = 100;
  hw.intra_busbw_gbps = 100;  // 1e11 B/s
  hw.intra_latency_us = 10;
  hw.inter_busbw_gbps = 25;
  hw.inter_latency_us = 20;
  hw.intra_p2p_gbps = 50;
  hw.inter_p2p_gbps = 10;
  hw.kernel_us = 0;
  return hw;
}

TEST(CollectiveCost, OneNodeRingReduceScatter) {
  const Hardware hw = Simple();
  // 4 ranks in a node, 1 MB each: 3 steps of 10 us, 3 MB at 100 GB/s = 30 us.
  EXPECT_NEAR(ReduceScatterTime(hw, {4, 8}, 1e6), 60e-6, 1e-12);
  EXPECT_NEAR(AllGatherTime(hw, {4, 8}, 1e6), 60e-6, 1e-12);
  EXPECT_EQ(ReduceScatterTime(hw, {1, 8}, 1e6), 0.0);  // one rank: nothing moves
}

TEST(CollectiveCost, AcrossNodesHierarchicalRing) {
  const Hardware hw = Simple();
  // 32 ranks, 8 to a node: 7 NVLink steps (70 us) + 3 network steps (60 us); 31 x 1 MB at
  // the network's 25 GB/s = 1240 us.
  EXPECT_NEAR(ReduceScatterTime(hw, {32, 8}, 1e6), 130e-6 + 1240e-6, 1e-12);
}

TEST(CollectiveCost, LatencyBoundVersusBandwidthBound) {
  const Hardware hw = Simple();
  const Topology t{4, 8};
  // 8 bytes: 2 x 3 x 10 us of latency against 2 x 3/4 x 8 B / 1e11 (0.12 ns).
  const double tiny = AllReduceTime(hw, t, 8);
  EXPECT_NEAR(tiny, 60e-6 + 1.2e-10, 1e-15);
  EXPECT_GT(60e-6 / tiny, 0.999);
  // 1 GB: 2 x 3/4 x 1e9 / 1e11 = 15 ms, the latency 0.4 % of it.
  const double big = AllReduceTime(hw, t, 1e9);
  EXPECT_NEAR(big, 60e-6 + 15e-3, 1e-12);
  EXPECT_LT(60e-6 / big, 0.005);
}

TEST(CollectiveCost, RingVersusTree) {
  Hardware ring = Simple(), tree = Simple();
  tree.all_reduce = Algo::kTree;
  const Topology t{64, 8};  // 8 nodes
  // Ring: 2 x (7 x 10 + 7 x 20) us = 420 us; tree: 2 x (7 x 10 + log2(8) x 20) us = 260 us.
  EXPECT_NEAR(AllReduceTime(ring, t, 8), 420e-6 + 2 * 63.0 / 64 * 8 / 25e9, 1e-12);
  EXPECT_NEAR(AllReduceTime(tree, t, 8), 260e-6 + 2 * 63.0 / 64 * 8 / 25e9, 1e-12);
  // The same bandwidth term: at 1 GB they differ by the latency alone.
  EXPECT_NEAR(AllReduceTime(ring, t, 1e9) - AllReduceTime(tree, t, 1e9), 160e-6, 1e-9);
  // Within one node the tree is a chain: the same as the ring.
  EXPECT_NEAR(AllReduceTime(ring, {8, 8}, 8), AllReduceTime(tree, {8, 8}, 8), 1e-15);
}

TEST(CollectiveCost, PointToPointTakesTheSlowerLink) {
  const Hardware hw = Simple();
  // 1 MB over NVLink at 50 GB/s (20 us), 1 MB over the NIC at 10 GB/s (100 us), together.
  EXPECT_NEAR(PointToPointTime(hw, {16, 8}, 1e6, 1e6), 20e-6 + 100e-6, 1e-12);
  EXPECT_NEAR(PointToPointTime(hw, {8, 8}, 1e6, 0), 10e-6 + 20e-6, 1e-12);
}

TEST(NewtonSchulz, FlopsOfBothForms) {
  using mdopt::kernels::NsForm;
  const double s = 1024;
  // Square: standard, K (3 s^2 l + s^3) = 5 x 4 s^3; auto keeps it (l < 2 s).
  EXPECT_DOUBLE_EQ(NsFlops(1024, 1024, 5, NsForm::kAuto), 20 * s * s * s);
  // 1024 x 4096: Gram, 3 s^2 l + (4K - 3) s^3 = 29 s^3, against 65 s^3 standard (2.2x).
  EXPECT_DOUBLE_EQ(NsFlops(1024, 4096, 5, NsForm::kAuto), 29 * s * s * s);
  EXPECT_DOUBLE_EQ(NsFlops(4096, 1024, 5, NsForm::kStandard), 65 * s * s * s);
  Hardware hw = Simple();
  hw.gemm_tflops_small = 1, hw.gemm_tflops_medium = 2, hw.gemm_tflops_large = 3;
  EXPECT_EQ(GemmRate(hw, 1023), 1);
  EXPECT_EQ(GemmRate(hw, 1024), 2);
  EXPECT_EQ(GemmRate(hw, 4096), 3);
}

BucketCost OneBucket() {
  BucketCost c;
  c.reduce_scatter = 1, c.check = 0.5, c.pass1 = 1, c.gather = 2, c.scatter = 2, c.pass2 = 1;
  c.cross = 0.5, c.finish = 1, c.all_gather = 2, c.unpack = 0.5;
  c.ns_owners = {{0, 3.0}};
  return c;
}

TEST(Waves, OneBucketStepByStep) {
  double compute = 0, comm = 0;
  // RS ends at 1; check 1..1.5; its all-reduce 1.5..1.75; pass1 ..2.75; gather ..4.75; NS on
  // rank 0 ..7.75; scatter ..9.75; pass2 ..10.75; cross ..11.25; finish ..12.25; all-gather
  // ..14.25; unpack ..14.75. Rank 0 computes 0.5 + 1 + 3 + 1 + 1 + 0.5 = 7.
  const double step = PlayWaves({OneBucket()}, {0.0}, 0.0, 0.25, false, 2, &compute, &comm);
  EXPECT_DOUBLE_EQ(step, 14.75);
  EXPECT_DOUBLE_EQ(compute, 7.0);
  EXPECT_DOUBLE_EQ(comm, 1 + 0.25 + 2 + 2 + 0.5 + 2);
  // Deferred: the all-gather and unpack after the waves, the same total here.
  EXPECT_DOUBLE_EQ(PlayWaves({OneBucket()}, {0.0}, 0.0, 0.25, true, 2, &compute, &comm), 14.75);
  // The reduce-scatter hidden in backward (released at 0.5, done at 1.5): the step that
  // starts at 10 pays everything above but it, 14.75 - 1.
  EXPECT_DOUBLE_EQ(PlayWaves({OneBucket()}, {0.5}, 10.0, 0.25, false, 2, &compute, &comm), 13.75);
}

TEST(Waves, BucketsPipelineAndOwnersRunSideBySide) {
  double compute = 0, comm = 0;
  std::vector<BucketCost> b(4, OneBucket());
  for (int k = 0; k < 4; ++k) b[k].ns_owners = {{k, 3.0}};  // four owners
  const double one = PlayWaves({OneBucket()}, {0.0}, 0.0, 0.25, false, 4, &compute, &comm);
  const double four = PlayWaves(b, {0, 0, 0, 0}, 0.0, 0.25, false, 4, &compute, &comm);
  EXPECT_LT(four, 4 * one);  // overlapped, not four steps end to end
  // The communication queue is the bound: 4 x 7.5 s of collectives and the check's 0.25.
  EXPECT_DOUBLE_EQ(comm, 4 * 7.5 + 0.25);
  EXPECT_GE(four, comm);
  EXPECT_DOUBLE_EQ(compute, 4 * 4.0 + 3.0);  // each rank: its own NS only
}

TEST(Hardware, ErrorsNameWhatIsWrong) {
  Hardware hw;
  std::string error;
  EXPECT_FALSE(ParseHardware("name = x\nhbm_gbps = 3\n", "f", &hw, &error));
  EXPECT_NE(error.find("missing hardware field(s)"), std::string::npos) << error;
  EXPECT_NE(error.find("inter_latency_us"), std::string::npos) << error;
  EXPECT_FALSE(ParseHardware("warp_factor = 9\n", "f", &hw, &error));
  EXPECT_EQ(error, "f:1: unknown key 'warp_factor'");
  EXPECT_FALSE(ParseHardware("\n# c\nhbm_gbps = fast\n", "f", &hw, &error));
  EXPECT_EQ(error, "f:3: hbm_gbps must be a positive number, got 'fast'");
  EXPECT_FALSE(ParseHardware("all_reduce = star\n", "f", &hw, &error));
  EXPECT_EQ(error, "f:1: all_reduce must be ring or tree, got 'star'");
  EXPECT_FALSE(ParseHardware("hbm_gbps = 0\n", "f", &hw, &error));
  EXPECT_FALSE(ReadHardware("/nonexistent/hw.conf", &hw, &error));
  EXPECT_EQ(error, "/nonexistent/hw.conf: cannot open the hardware file");
}

TEST(Bytes, ClosedFormOfEqualSegmentsEqualsTheWindows) {
  mdopt_bench::GptSizes g;
  g.d_model = 64, g.layers = 2, g.vocab = 256;
  for (const char* layout : {"rows", "owner"}) {
    mdopt_tools::PlanModel m;
    std::string error;
    ASSERT_TRUE(mdopt_tools::BuildPlanModel(mdopt_bench::GptShapes(g), "md-muon", layout, &m,
                                            &error)) << error;
    for (int N : {3, 4}) {
      mdopt::PlanOptions po;
      po.world = N;
      po.bucket_bytes = 20000;  // windows in the larger matrices
      po.equal_segments = true;
      const mdopt::ShardPlan plan = mdopt::BuildShardPlan(m.registry.params(), m.groups, po);
      SimOptions o;
      o.ns_comm_bf16 = true;
      for (int r = 0; r < N; ++r) {
        // The schedule's calls, one per window, through comm/traffic.h; the finite check's
        // record holds two doubles per param (its sum of squares and its gradient presence).
        int64_t want = mdopt::AllReduceTraffic(2 * static_cast<int64_t>(m.registry.params().size()),
                                               N, mdopt::DataType::kF64);
        bool windows = false;
        for (const mdopt::BucketPlan& b : plan.buckets) {
          windows = windows || b.Windows() > 1;
          for (int w = 0; w < b.Windows(); ++w) {
            const std::vector<int64_t> c = b.WindowCounts(w, N);
            want += mdopt::ReduceScatterTraffic(c, r, mdopt::DataType::kF32);
            want += mdopt::AllGatherTraffic(c, r, mdopt::DataType::kBf16);
          }
          int64_t record = 0;
          for (int k : b.slots) {
            const mdopt::SlotPlan& s = plan.slots[k];
            record += s.cross + s.radial;
            if (s.muon && s.layout == mdopt::Layout::kRows)
              want += 2 * (r == s.owner ? (s.m - s.Rows(r)) * s.n : s.Rows(r) * s.n);
          }
          if (record > 0) want += mdopt::AllReduceTraffic(record, N, mdopt::DataType::kF64);
        }
        EXPECT_TRUE(windows);
        EXPECT_EQ(RankBytesSent(plan, m.registry.params(), o, r), want) << layout << " N=" << N;
      }
    }
  }
}

TEST(Step, OneRankMovesNothing) {
  mdopt_bench::GptSizes g;
  g.d_model = 64, g.layers = 1, g.vocab = 256;
  mdopt_tools::PlanModel m;
  std::string error;
  ASSERT_TRUE(mdopt_tools::BuildPlanModel(mdopt_bench::GptShapes(g), "md-muon", "rows", &m, &error));
  mdopt::PlanOptions po;
  const mdopt::ShardPlan plan = mdopt::BuildShardPlan(m.registry.params(), m.groups, po);
  SimOptions o;
  o.topo = {1, 8};
  o.with_backward = false;
  const StepEstimate e = SimulateStep(plan, m.registry.params(), Simple(), o);
  EXPECT_EQ(e.bytes_mean, 0.0);
  EXPECT_EQ(e.comm_total, 0.0);
  EXPECT_DOUBLE_EQ(e.exposed_comm, 0.0);
  EXPECT_NEAR(e.step, e.compute, 1e-12);
  EXPECT_GT(e.step, 0.0);
}

}  // namespace
}  // namespace mdopt_sim
