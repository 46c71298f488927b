// mdopt-scale: what a model's shard plan costs at cluster sizes, with no cluster. For each
// rank count it builds the plan every rank would build, describes a few ranks' parts of it as
// their backends would be told (the most loaded ones), and prints per-rank state and buffer
// bytes, the plan's own memory and build time, the collectives per bucket and the imbalance.
// Nothing is allocated for the model and nothing is communicated.
//
// Unlike mdopt-bench this program links the library's internals (the planner and the
// per-rank description): a plan for 4,096 ranks cannot be asked of a communicator of one.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <numeric>
#include <sstream>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "dist_opt/backend_config.h"
#include "dist_opt/group_spec.h"
#include "dist_opt/param_registry.h"
#include "dist_opt/shard_plan.h"
#include "../bench/model_shapes.h"
#include "../bench/preset_groups.h"
#include "plan_model.h"

namespace {

using mdopt::Layout;
using mdopt::ShardPlan;
using mdopt::SlotPlan;

using Model = mdopt_tools::PlanModel;

bool BuildModel(const std::vector<mdopt_bench::TensorShape>& shapes, const std::string& preset,
                const std::string& layout, Model* m, std::string* error) {
  return mdopt_tools::BuildPlanModel(shapes, preset, layout, m, error);
}

using mdopt_tools::PerElement;
using mdopt_tools::RankBytes;
using mdopt_tools::StateOf;

std::string Human(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (bytes >= 1024.0 && u < 4) {
    bytes /= 1024.0;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof(buf), u == 0 ? "%.0f %s" : "%.2f %s", bytes, units[u]);
  return buf;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"mdopt-scale: a model's shard plan at cluster sizes, computed, not allocated"};
  std::string shapes_path, preset = "md-muon", layout = "rows";
  std::vector<int> ranks = {8, 64, 512, 1024, 4096};
  double bucket_mb = 32.0;
  bool comm_pad = true;
  app.add_option("--shapes", shapes_path, "shapes file (docs/shapes/*.txt)")->required();
  app.add_option("--preset", preset, "preset grouping, as mdopt-bench's --presets");
  app.add_option("--layout", layout, "layout of the matrix and table groups: rows | owner | '' (preset)");
  app.add_option("--ranks", ranks, "rank counts")->delimiter(',');
  app.add_option("--bucket-mb", bucket_mb, "bucket_mb");
  app.add_option("--comm-pad", comm_pad, "equal segments (what NCCL takes): 1 | 0");
  CLI11_PARSE(app, argc, argv);

  std::vector<mdopt_bench::TensorShape> shapes;
  std::string error;
  if (!mdopt_bench::ReadShapesFile(shapes_path, &shapes, &error)) {
    std::fprintf(stderr, "mdopt-scale: %s\n", error.c_str());
    return 2;
  }
  Model m;
  if (!BuildModel(shapes, preset, layout, &m, &error)) {
    std::fprintf(stderr, "mdopt-scale: %s\n", error.c_str());
    return 2;
  }
  const std::vector<mdopt::ParamEntry>& params = m.registry.params();
  double total_state = 0.0, elements = 0.0;
  for (const mdopt::ParamEntry& p : params) {
    elements += static_cast<double>(p.numel());
    total_state += static_cast<double>(p.numel()) * PerElement(p);
  }
  int64_t slots = 0;
  for (const mdopt::ParamEntry& p : params) slots += p.experts;
  std::printf("model %s: %zu tensors, %lld matrices, %.3g parameters; preset %s, layout %s, "
              "bucket_mb %g, comm_pad %d\n",
              shapes_path.c_str(), params.size(), static_cast<long long>(slots), elements,
              preset.c_str(), layout.empty() ? "(preset)" : layout.c_str(), bucket_mb,
              comm_pad ? 1 : 0);
  std::printf("optimizer state of the whole model: %s (f32 master + Muon momentum / Adam moments)\n\n",
              Human(total_state).c_str());
  std::printf("| ranks | plan | plan build | buckets | windows (max) | state / rank (max) | "
              "state total / N | replicated / rank | reduced grads / rank | bucket buffers / rank (max) | "
              "collectives / bucket (max) | imbalance state, NS |\n");
  std::printf("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
  mdopt::EngineOptions eo;
  eo.bucket_bytes = static_cast<int64_t>(bucket_mb * (1 << 20));
  eo.ns_bf16 = true;
  for (int N : ranks) {
    mdopt::PlanOptions po;
    po.world = N;
    po.bucket_bytes = eo.bucket_bytes;
    po.equal_segments = comm_pad && N > 1;
    const auto t0 = std::chrono::steady_clock::now();
    const ShardPlan plan = mdopt::BuildShardPlan(params, m.groups, po);
    const double build_ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    std::vector<double> state, ns;
    plan.Loads(&state, &ns);
    auto argmax = [](const std::vector<double>& v) {
      return static_cast<int>(std::max_element(v.begin(), v.end()) - v.begin());
    };
    auto imbalance = [](const std::vector<double>& v) {
      const double mean = std::accumulate(v.begin(), v.end(), 0.0) / static_cast<double>(v.size());
      return mean > 0 ? *std::max_element(v.begin(), v.end()) / mean : 1.0;
    };
    // The ranks worth describing: the first, the one with the most state, the one with the
    // most Newton-Schulz (it holds whole matrices for NS), the last.
    std::vector<int> sample = {0, argmax(state), argmax(ns), N - 1};
    std::sort(sample.begin(), sample.end());
    sample.erase(std::unique(sample.begin(), sample.end()), sample.end());
    RankBytes worst;
    double buffers = 0.0, grad_rows = 0.0;
    int windows = 1;
    for (const mdopt::BucketPlan& b : plan.buckets) windows = std::max(windows, b.Windows());
    for (int r : sample) {
      const RankBytes rb = StateOf(plan, params, r);
      if (rb.state > worst.state) worst = rb;
      const mdopt::kernels::BackendConfig c = mdopt::DescribeRank(plan, params, m.groups, eo, r);
      // The reduced gradient rows (4 B per element the rank holds: they scale as 1 / N) apart
      // from the buffers bucket_mb bounds.
      double rows = 0.0;
      for (const mdopt::kernels::BucketDesc& bd : c.buckets) rows += 4.0 * static_cast<double>(bd.seg);
      grad_rows = std::max(grad_rows, rows);
      buffers = std::max(buffers, static_cast<double>(mdopt::kernels::BucketBufferBytes(c)) - rows);
    }
    // Per bucket: a reduce-scatter and an all-gather per window, an all-reduce of the cross
    // record when a row-split matrix is in it, an NS gather and scatter when one is Muon.
    int most = 0;
    for (const mdopt::BucketPlan& b : plan.buckets) {
      bool cross = false, gather = false;
      for (int k : b.slots) {
        cross = cross || plan.slots[k].cross > 0;
        gather = gather || (plan.slots[k].muon && plan.slots[k].layout == Layout::kRows && N > 1);
      }
      const int count = N > 1 ? 2 * b.Windows() + (cross ? 1 : 0) + (gather ? 2 : 0) : 0;
      most = std::max(most, count);
    }
    std::printf("| %d | %s | %.1f ms | %zu | %d | %s | %s | %s | %s | %s | %d | %.2f, %.2f |\n", N,
                Human(static_cast<double>(plan.Bytes())).c_str(), build_ms, plan.buckets.size(),
                windows, Human(worst.state).c_str(), Human(total_state / N).c_str(),
                Human(worst.replicated).c_str(), Human(grad_rows).c_str(), Human(buffers).c_str(), most,
                imbalance(state), imbalance(ns));
  }
  std::printf("\nstate / rank counts its rows' f32 master and moments plus per-row gains; "
              "replicated: column gains, scalar gain and radius of every matrix it holds rows of; "
              "reduced grads: the float32 mean gradient of its rows (grads=local); bucket "
              "buffers: the step's collective and stage buffers, bounded by bucket_mb and the "
              "largest matrix it runs Newton-Schulz on (NS scratch comes on top)\n");
  return 0;
}
