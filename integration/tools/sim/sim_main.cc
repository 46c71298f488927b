// mdopt-sim: mdopt's optimizer step priced at cluster sizes on a hardware file. For each
// model, rank count and layout it builds the shard plan the library would build
// (BuildShardPlan), times every bucket's collectives, elementwise passes and Newton-Schulz
// with the cost model (collective_cost.h), plays the five-stage wave schedule after a
// trainer backward (step_sim.h), and sets the iteration against AdamW sharded the same way.
// Nothing is allocated for the model and nothing is communicated. docs/mdopt-sim.md.
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "dist_opt/shard_plan.h"
#include "../bench/model_shapes.h"
#include "../scale/plan_model.h"
#include "hardware.h"
#include "model_config.h"
#include "step_sim.h"

#ifndef MDOPT_SIM_PLOT_SCRIPT
#define MDOPT_SIM_PLOT_SCRIPT "plot_sim.py"
#endif

namespace {

struct Model {
  std::string name;
  std::vector<mdopt_bench::TensorShape> shapes;
};

std::string Basename(const std::string& path) {
  std::string b = path.substr(path.find_last_of('/') + 1);
  const size_t dot = b.rfind('.');
  return dot == std::string::npos ? b : b.substr(0, dot);
}

int Fail(const std::string& what) {
  std::fprintf(stderr, "mdopt-sim: %s\n", what.c_str());
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"mdopt-sim: mdopt's step schedule priced at cluster sizes on a hardware file"};
  std::vector<std::string> shapes_paths;
  mdopt_sim::ModelConfig cfg;
  std::string hardware_path, preset = "md-muon", baseline = "adamw", ns_form = "auto";
  std::string grad_comm = "f32", ns_comm = "f32", gather = "eager", grads = "local";
  std::string csv_path, plot_dir, model_name = "config";
  std::vector<std::string> layouts = {"rows", "owner"};
  std::vector<int> ranks = {8, 256, 1024, 4096};
  int per_node = 8;
  double bucket_mb = 32.0;
  bool comm_pad = true, f32_weights = false, step_only = false, ns_batched = false;
  bool rank_bytes = false;
  mdopt_sim::SimOptions so;
  app.add_option("--shapes", shapes_paths, "shapes files (docs/shapes/*.txt), one model each");
  app.add_option("--layers", cfg.layers, "GPT/MoE config instead of --shapes: layers");
  app.add_option("--d-model", cfg.d_model, "model width");
  app.add_option("--heads", cfg.heads, "attention heads");
  app.add_option("--kv-groups", cfg.kv_groups, "key/value heads (GQA groups)");
  app.add_option("--ffn", cfg.ffn, "MLP (or expert) hidden size, SwiGLU");
  app.add_option("--experts", cfg.experts, "experts per layer (1: dense)");
  app.add_option("--vocab", cfg.vocab, "vocabulary");
  app.add_option("--name", model_name, "the config model's name in the table and CSV");
  app.add_option("--hardware", hardware_path, "hardware file (integration/tools/sim/hardware/*.conf)")
      ->required();
  app.add_option("--ranks", ranks, "GPU counts")->delimiter(',');
  app.add_option("--gpus-per-node", per_node, "GPUs per node (NVLink domain)");
  app.add_option("--preset", preset, "mdopt preset grouping (mdopt-bench's --presets)");
  app.add_option("--baseline", baseline, "the preset the overhead is against ('' for none)");
  app.add_option("--layouts", layouts, "layouts of the matrix and table groups: rows, owner")
      ->delimiter(',');
  app.add_option("--bucket-mb", bucket_mb, "bucket_mb");
  app.add_option("--ns-form", ns_form, "auto | standard | gram");
  app.add_option("--grad-comm", grad_comm, "grad_comm_dtype: f32 | bf16");
  app.add_option("--ns-comm", ns_comm, "ns_comm_dtype: f32 | bf16");
  app.add_option("--gather", gather, "eager | deferred");
  app.add_option("--grads", grads, "local | reduced");
  app.add_option("--comm-pad", comm_pad, "equal segments (NCCL): 1 | 0 (MPI)");
  app.add_flag("--ns-batched", ns_batched, "one NS launch per (owner, shape), not per matrix");
  app.add_option("--tokens-per-gpu", so.tokens_per_gpu, "trainer tokens per GPU per step");
  app.add_option("--mfu", so.mfu, "trainer model FLOPs utilisation (of peak_tflops)");
  app.add_option("--moe-top-k", so.moe_top_k, "experts each token visits");
  app.add_flag("--step-only", step_only, "no trainer: the step alone, reduce-scatter included");
  app.add_flag("--f32-weights", f32_weights, "f32 weights and gradients (default bf16)");
  app.add_flag("--rank-bytes", rank_bytes, "print the bytes every rank sends per step and stop");
  app.add_option("--csv", csv_path, "write the rows as CSV");
  app.add_option("--plot", plot_dir, "write PNG plots there (python3 + matplotlib)");
  CLI11_PARSE(app, argc, argv);

  mdopt_sim::Hardware hw;
  std::string error;
  if (!mdopt_sim::ReadHardware(hardware_path, &hw, &error)) return Fail(error);
  for (int n : ranks)
    if (n < 1) return Fail("--ranks: a GPU count must be >= 1, got " + std::to_string(n));
  if (per_node < 1) return Fail("--gpus-per-node must be >= 1");
  if (so.mfu <= 0 || so.mfu > 1) return Fail("--mfu must be in (0, 1]");
  if (so.tokens_per_gpu <= 0) return Fail("--tokens-per-gpu must be > 0");
  if (so.moe_top_k < 1) return Fail("--moe-top-k must be >= 1");
  if (bucket_mb <= 0) return Fail("--bucket-mb must be > 0");
  for (const std::string& l : layouts)
    if (l != "rows" && l != "owner") return Fail("--layouts: '" + l + "' is not rows or owner");
  auto pick = [&](const std::string& v, const char* a, const char* b, const char* what,
                  bool* second) {
    if (v != a && v != b) {
      error = std::string(what) + " must be " + a + " or " + b + ", got '" + v + "'";
      return false;
    }
    *second = v == b;
    return true;
  };
  bool ok = pick(grad_comm, "f32", "bf16", "--grad-comm", &so.grad_comm_bf16) &&
            pick(ns_comm, "f32", "bf16", "--ns-comm", &so.ns_comm_bf16) &&
            pick(gather, "eager", "deferred", "--gather", &so.gather_deferred) &&
            pick(grads, "local", "reduced", "--grads", &so.grads_reduced);
  if (!ok) return Fail(error);
  if (ns_form == "auto") so.ns_form = mdopt::kernels::NsForm::kAuto;
  else if (ns_form == "standard") so.ns_form = mdopt::kernels::NsForm::kStandard;
  else if (ns_form == "gram") so.ns_form = mdopt::kernels::NsForm::kGram;
  else return Fail("--ns-form must be auto, standard or gram, got '" + ns_form + "'");
  so.ns_batched = ns_batched;
  so.with_backward = !step_only;
  so.bucket_bytes = static_cast<int64_t>(bucket_mb * (1 << 20));

  std::vector<Model> models;
  for (const std::string& p : shapes_paths) {
    Model m{Basename(p), {}};
    if (!mdopt_bench::ReadShapesFile(p, &m.shapes, &error)) return Fail(error);
    models.push_back(std::move(m));
  }
  if (cfg.layers > 0 || cfg.d_model > 0) {
    Model m{model_name, {}};
    if (!mdopt_sim::ConfigShapes(cfg, &m.shapes, &error)) return Fail(error);
    models.push_back(std::move(m));
  }
  if (models.empty()) return Fail("no model: give --shapes or --layers/--d-model/...");

  std::FILE* csv = nullptr;
  if (!csv_path.empty() || !plot_dir.empty()) {
    if (csv_path.empty()) csv_path = plot_dir + "/mdopt-sim.csv";
    csv = std::fopen(csv_path.c_str(), "w");
    if (csv == nullptr) return Fail(csv_path + ": cannot write");
    std::fprintf(csv, "model,gpus,preset,layout,step_ms,compute_ms,exposed_comm_ms,comm_ms,"
                      "bytes_per_gpu,bytes_per_gpu_max,state_bytes_per_gpu,ns_gflop,"
                      "fwd_bwd_ms,iteration_ms,overhead_pct\n");
  }
  std::printf("hardware %s (%s); %d GPUs per node; preset %s against %s; bucket_mb %g; grads %s, "
              "grad_comm %s, ns_comm %s, ns_form %s, gather %s; trainer: %g tokens/GPU, MFU %.2f, "
              "top-%d experts%s\n",
              hw.name.c_str(), hw.all_reduce == mdopt_sim::Algo::kRing ? "ring" : "tree", per_node,
              preset.c_str(), baseline.empty() ? "nothing" : baseline.c_str(), bucket_mb,
              grads.c_str(), grad_comm.c_str(), ns_comm.c_str(), ns_form.c_str(), gather.c_str(),
              so.tokens_per_gpu, so.mfu, so.moe_top_k, step_only ? " (step only)" : "");
  for (const Model& model : models) {
    std::printf("\nmodel %s: %zu tensors, %.3g parameters\n\n", model.name.c_str(),
                model.shapes.size(), static_cast<double>(mdopt_bench::TotalNumel(model.shapes)));
    if (!rank_bytes) {
      std::printf("| GPUs | preset | layout | step ms | compute ms | exposed comm ms | comm ms | "
                  "bytes/GPU | state/GPU | fwd+bwd ms | iteration ms | overhead vs %s |\n",
                  baseline.c_str());
      std::printf("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    }
    struct Run {
      std::string preset, layout;
    };
    std::vector<Run> runs;
    if (!baseline.empty()) runs.push_back({baseline, "rows"});
    for (const std::string& l : layouts) runs.push_back({preset, l});
    for (int N : ranks) {
      so.topo = {N, per_node};
      double base_iter = 0;
      for (const Run& run : runs) {
        mdopt_tools::PlanModel pm;
        if (!mdopt_tools::BuildPlanModel(model.shapes, run.preset, run.layout, &pm, &error,
                                         !f32_weights)) {
          return Fail(error);
        }
        mdopt::PlanOptions po;
        po.world = N;
        po.bucket_bytes = so.bucket_bytes;
        po.equal_segments = comm_pad && N > 1;
        po.grad_comm_bytes = so.grads_reduced || N == 1 ? 0 : so.grad_comm_bf16 ? 2 : 4;
        const mdopt::ShardPlan plan = mdopt::BuildShardPlan(pm.registry.params(), pm.groups, po);
        if (rank_bytes) {
          double sum = 0;
          for (int r = 0; r < N; ++r) {
            const int64_t b = mdopt_sim::RankBytesSent(plan, pm.registry.params(), so, r);
            sum += static_cast<double>(b);
            std::printf("bytes %s %s N=%d rank=%d %lld\n", run.preset.c_str(), run.layout.c_str(), N,
                        r, static_cast<long long>(b));
          }
          std::printf("bytes %s %s N=%d mean %.0f\n", run.preset.c_str(), run.layout.c_str(), N, sum / N);
          continue;
        }
        const mdopt_sim::StepEstimate e = mdopt_sim::SimulateStep(plan, pm.registry.params(), hw, so);
        const bool is_base = !baseline.empty() && &run == &runs[0];
        if (is_base) base_iter = e.iteration;
        const double overhead = base_iter > 0 ? 100.0 * (e.iteration / base_iter - 1.0) : 0.0;
        char over[32] = "–";
        if (!is_base && base_iter > 0) std::snprintf(over, sizeof(over), "%+.2f %%", overhead);
        std::printf("| %d | %s | %s | %.2f | %.2f | %.2f | %.2f | %.4g GB | %.4g GB | %.1f | %.1f | %s |\n",
                    N, run.preset.c_str(), run.layout.c_str(), 1e3 * e.step, 1e3 * e.compute,
                    1e3 * e.exposed_comm, 1e3 * e.comm_total, e.bytes_mean / 1e9, e.state_max / 1e9,
                    1e3 * e.forward_backward, 1e3 * e.iteration, over);
        if (csv != nullptr) {
          std::fprintf(csv, "%s,%d,%s,%s,%.4f,%.4f,%.4f,%.4f,%.0f,%.0f,%.0f,%.3f,%.4f,%.4f,%.4f\n",
                       model.name.c_str(), N, run.preset.c_str(), run.layout.c_str(), 1e3 * e.step,
                       1e3 * e.compute, 1e3 * e.exposed_comm, 1e3 * e.comm_total, e.bytes_mean,
                       e.bytes_max, e.state_max, e.ns_flops_max / 1e9, 1e3 * e.forward_backward,
                       1e3 * e.iteration, is_base ? 0.0 : overhead);
        }
      }
    }
  }
  if (csv != nullptr) std::fclose(csv);
  if (!plot_dir.empty()) {
    const std::string cmd = "python3 '" + std::string(MDOPT_SIM_PLOT_SCRIPT) + "' '" + csv_path +
                            "' '" + plot_dir + "'";
    if (std::system(cmd.c_str()) != 0) return Fail("plotting failed: " + cmd);
  }
  if (!rank_bytes) {
    std::printf("\nstep: end of backward to the last weight in place; exposed comm: the step's "
                "compute queue idle on collectives; comm: every collective of the iteration "
                "(backward's reduce-scatters included); bytes/GPU: sent per step, mean over GPUs; "
                "state/GPU: the fullest sampled GPU's optimizer state; overhead: iteration time "
                "against the baseline's\n");
  }
  return 0;
}
