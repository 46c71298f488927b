#include "bench_runner.h"

#include <algorithm>
#include <chrono>
#include <memory>
#include <numeric>
#include <cstdio>
#include <set>
#include <string>

#include <nlohmann/json.hpp>

// Under callgrind (--instr-atstart=no) only the mdopt_step calls are instrumented and the
// counts start after the warm-up, so a cache simulation counts the bytes a step moves and
// nothing of the gradient generation. Natively the macros cost a few instructions.
#if __has_include(<valgrind/callgrind.h>)
#include <valgrind/callgrind.h>
#else
#define CALLGRIND_START_INSTRUMENTATION
#define CALLGRIND_STOP_INSTRUMENTATION
#define CALLGRIND_ZERO_STATS
#endif

namespace mdopt_bench {
namespace {

void Check(mdopt_status status, const char* call) {
  // Copy the message at once: the pointer is only valid until the next mdopt_* call.
  if (status != MDOPT_SUCCESS) throw AbiError(call, status, mdopt_last_error());
}

struct OptimizerDeleter {
  void operator()(mdopt_optimizer* opt) const { mdopt_destroy(opt); }
};
using OptimizerPtr = std::unique_ptr<mdopt_optimizer, OptimizerDeleter>;

double Median(std::vector<double> v) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  const size_t h = v.size() / 2;
  return v.size() % 2 == 1 ? v[h] : 0.5 * (v[h - 1] + v[h]);
}

double Mean(const std::vector<double>& v) {
  if (v.empty()) return 0.0;
  return std::accumulate(v.begin(), v.end(), 0.0) / static_cast<double>(v.size());
}

std::string CreateOptions(const RunConfig& cfg) {
  std::string options = "device=cpu kernels=";
  options += cfg.engine == EngineKind::kFast ? "fast" : "reference";
  if (cfg.threads > 0) options += " threads=" + std::to_string(cfg.threads);
  if (cfg.engine == EngineKind::kFast) options += " ns_dtype=" + cfg.ns_dtype;
  if (!cfg.extra_options.empty()) options += " " + cfg.extra_options;
  return options;
}

// One timed or warm-up step; throws when the call fails or the library skipped it.
mdopt_step_info Step(mdopt_optimizer* opt, double* info_seconds, double* wall_seconds) {
  mdopt_step_info info = MDOPT_STEP_INFO_INIT;
  CALLGRIND_START_INSTRUMENTATION;
  const auto t0 = std::chrono::steady_clock::now();
  const mdopt_status status = mdopt_step(opt, 1.0, nullptr, &info);
  const auto t1 = std::chrono::steady_clock::now();
  CALLGRIND_STOP_INSTRUMENTATION;
  Check(status, "mdopt_step");
  // Finite N(0, 1) gradients never skip; a skipped step would time nothing, so it is an
  // error rather than a fast row.
  if (info.skipped) throw AbiError("mdopt_step", MDOPT_INTERNAL, mdopt_last_error());
  *info_seconds = info.seconds;
  *wall_seconds = std::chrono::duration<double>(t1 - t0).count();
  return info;
}

// Reads what the byte floor needs from the plan the library built: per slot its layout,
// shape and bucket, and the doubles it adds to its bucket's cross-row and radial records.
void ReadPlan(mdopt_optimizer* opt, BenchRow* row) {
  size_t needed = 0;
  Check(mdopt_plan_json(opt, nullptr, 0, &needed), "mdopt_plan_json");
  std::string text(needed, '\0');
  Check(mdopt_plan_json(opt, text.data(), text.size(), nullptr), "mdopt_plan_json");
  text.resize(needed - 1);
  const nlohmann::json plan = nlohmann::json::parse(text);
  row->world = plan.at("world").get<int>();
  int buckets = 0;
  for (const nlohmann::json& slot : plan.at("slots")) {
    buckets = std::max(buckets, slot.at("bucket").get<int>() + 1);
  }
  if (row->world > 1) {
    row->cross_record.assign(static_cast<size_t>(buckets), 0);
    row->radial_record.assign(static_cast<size_t>(buckets), 0);
  }
  for (const nlohmann::json& slot : plan.at("slots")) {
    const bool rows = slot.at("layout").get<std::string>() == "rows";
    const int64_t m = slot.at("m").get<int64_t>(), n = slot.at("n").get<int64_t>();
    if (slot.at("muon").get<bool>() && rows) row->ns_gathered_elements += m * n;
    if (row->world == 1) continue;
    const size_t b = slot.at("bucket").get<size_t>();
    row->cross_record[b] += slot.at("cross").get<int64_t>();
    row->radial_record[b] += slot.at("radial").get<int64_t>();
  }
}

}  // namespace

const char* EngineName(EngineKind engine) {
  return engine == EngineKind::kFast ? "fast" : "reference";
}

double BenchRow::median_ms() const { return 1e3 * Median(step_seconds); }
double BenchRow::mean_ms() const { return 1e3 * Mean(step_seconds); }
double BenchRow::wall_median_ms() const { return 1e3 * Median(wall_seconds); }
double BenchRow::wall_mean_ms() const { return 1e3 * Mean(wall_seconds); }
double BenchRow::ns_per_param() const {
  return params > 0 ? 1e9 * Median(step_seconds) / static_cast<double>(params) : 0.0;
}
double BenchRow::model_bytes_per_param() const {
  return params > 0 ? static_cast<double>(model_bytes) / static_cast<double>(params) : 0.0;
}
double BenchRow::achieved_gbps() const {
  const double s = Median(step_seconds);
  return s > 0.0 ? static_cast<double>(model_bytes) / s / 1e9 : 0.0;
}
double BenchRow::state_bytes_per_param() const {
  return params > 0 ? static_cast<double>(state_bytes) / static_cast<double>(params) : 0.0;
}

BenchRow RunBenchmark(mdopt_comm* comm, const std::vector<TensorShape>& shapes,
                      ModelBuffers* buffers, const RunConfig& cfg) {
  buffers->ResetWeights(cfg.seed);

  mdopt_optimizer* raw = nullptr;
  Check(mdopt_create(comm, CreateOptions(cfg).c_str(), &raw), "mdopt_create");
  OptimizerPtr opt(raw);

  // Only the roles the model has become groups.
  std::set<Role> roles;
  for (const TensorShape& s : shapes) roles.insert(RoleOf(s.kind));
  for (Role role : roles) {
    std::string spec = RoleSpec(*cfg.preset, role);
    if (!cfg.layout.empty()) spec += " layout=" + cfg.layout;
    Check(mdopt_add_group(opt.get(), RoleGroupName(role), spec.c_str()), "mdopt_add_group");
  }
  for (size_t i = 0; i < shapes.size(); ++i) {
    const TensorShape& s = shapes[i];
    mdopt_param_desc desc = MDOPT_PARAM_DESC_INIT;
    desc.name = s.name.c_str();
    desc.group = RoleGroupName(RoleOf(s.kind));
    desc.ndim = static_cast<int>(s.dims.size());
    for (size_t k = 0; k < s.dims.size(); ++k) desc.shape[k] = s.dims[k];
    desc.param_dtype = buffers->param_dtype();
    desc.param = buffers->param(i);
    desc.grad_dtype = buffers->grad_dtype();
    desc.grad = buffers->grad(i);
    Check(mdopt_add_param(opt.get(), &desc, nullptr), "mdopt_add_param");
  }
  Check(mdopt_finalize(opt.get()), "mdopt_finalize");
  if (cfg.print_plan) {
    size_t needed = 0;
    Check(mdopt_describe_plan(opt.get(), nullptr, 0, &needed), "mdopt_describe_plan");
    std::string text(needed, '\0');
    Check(mdopt_describe_plan(opt.get(), text.data(), text.size(), nullptr), "mdopt_describe_plan");
    int rank = 0;
    Check(mdopt_comm_rank(comm, &rank), "mdopt_comm_rank");
    if (rank == 0) std::printf("%s: %s", cfg.preset->preset, text.c_str());
  }

  BenchRow row;
  row.preset = cfg.preset->preset;
  row.engine = EngineName(cfg.engine);
  row.tensors = static_cast<int64_t>(shapes.size());
  row.params = TotalNumel(shapes);
  row.warmup = cfg.warmup;
  row.steps = cfg.steps;
  ReadPlan(opt.get(), &row);
  int64_t step = 0;
  for (int k = 0; k < cfg.warmup; ++k, ++step) {
    buffers->FillGradients(cfg.seed, step);
    double info_s, wall_s;
    Step(opt.get(), &info_s, &wall_s);
  }
  CALLGRIND_ZERO_STATS;
  for (int k = 0; k < cfg.steps; ++k, ++step) {
    buffers->FillGradients(cfg.seed, step);  // outside the timed region
    double info_s, wall_s;
    const mdopt_step_info info = Step(opt.get(), &info_s, &wall_s);
    row.step_seconds.push_back(info_s);
    row.wall_seconds.push_back(wall_s);
    row.comm_seconds.push_back(info.comm_seconds);
    row.exposed_seconds.push_back(info.exposed_comm_seconds);
    row.bytes_sent.push_back(info.bytes_sent);
  }
  // Queried after stepping: workspace may grow on the first step.
  Check(mdopt_state_bytes(opt.get(), &row.state_bytes), "mdopt_state_bytes");
  Check(mdopt_workspace_bytes(opt.get(), &row.workspace_bytes), "mdopt_workspace_bytes");
  return row;
}

}  // namespace mdopt_bench
