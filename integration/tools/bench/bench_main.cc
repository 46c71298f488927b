// mdopt-bench: times mdopt's presets on a GPT-shaped (or user-given) set of tensors through
// the public C ABI only, optionally next to the float64 reference engine, and prints a
// table and/or JSON. Exit codes: 0 done, 1 an mdopt call failed, 2 bad command line.
#include <algorithm>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <memory>
#include <new>
#include <set>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "bench_runner.h"
#ifdef MDOPT_BENCH_MPI
#include "dist_report.h"
#endif
#include "machine_info.h"
#include "memory_traffic.h"
#include "mdopt/mdopt.h"
#include "model_shapes.h"
#include "preset_groups.h"
#include "report.h"
#include "tensor_data.h"

namespace mdopt_bench {
namespace {

struct Options {
  GptSizes gpt;
  std::string shapes_file;
  std::string param_dtype = "f32";
  std::string grad_dtype;  // empty: the param dtype
  std::string ns_dtype = "f32";
  int steps = 10;
  int warmup = 2;
  std::vector<std::string> presets = {"md-muon", "md-adamw", "muon", "adamw"};
  int threads = 0;
  bool reference = false;
  int reference_steps = 2;
  std::string json;
  uint64_t seed = 0;
  bool mpi = false;
  bool plan = false;
  std::string layout;
  std::string extra_options;
  int stream_mib = 64;
};

std::string HelpFooter() {
  return "\n" + PresetTableHelp() +
         "Muon and AdamW baselines train embeddings, head and vectors with AdamW.\n\n" +
         ShapesFileFormatHelp() +
         "\nWithout --shapes the model is GPT-shaped: tok_emb (vocab x d), per layer q, k, v, o\n"
         "(d x d), fc1 (ffn*d x d), fc2 (d x ffn*d), norm1 and norm2 (d), then final_norm (d)\n"
         "and lm_head (vocab x d). Weights start N(0, 1/d_in) (vectors at 1); gradients are\n"
         "N(0, 1) from --seed, regenerated before each step outside the timed region.\n\n"
         "Output: one row per preset and engine: median and mean step time from\n"
         "mdopt_step_info.seconds, the median wall time around mdopt_step, ns per parameter,\n"
         "optimizer state bytes per parameter (mdopt_state_bytes / params), workspace bytes\n"
         "(mdopt_workspace_bytes), and fast/ref, the fast engine's median over the reference\n"
         "engine's (--reference). With --json - the JSON goes to stdout and the table to stderr.\n"
         "Exit codes: 0 success, 1 an mdopt call failed, 2 bad command line or shapes file.\n";
}

void DefineOptions(CLI::App* app, Options* o) {
  app->footer(HelpFooter());
  app->set_version_flag("--version", std::string("mdopt ") + mdopt_version_string());
  auto* d = app->add_option("--d-model", o->gpt.d_model, "GPT width d")
                ->capture_default_str()->check(CLI::Range(int64_t{1}, int64_t{1} << 20));
  auto* l = app->add_option("--layers", o->gpt.layers, "GPT layers")
                ->capture_default_str()->check(CLI::Range(int64_t{0}, int64_t{4096}));
  auto* v = app->add_option("--vocab", o->gpt.vocab, "vocabulary size (embedding and head rows)")
                ->capture_default_str()->check(CLI::Range(int64_t{1}, int64_t{1} << 30));
  auto* f = app->add_option("--ffn-mult", o->gpt.ffn_mult, "MLP width as a multiple of d")
                ->capture_default_str()->check(CLI::Range(int64_t{1}, int64_t{1024}));
  app->add_option("--shapes", o->shapes_file,
                  "read the tensors from FILE instead of the GPT sizes (format below)")
      ->check(CLI::ExistingFile)->excludes(d)->excludes(l)->excludes(v)->excludes(f);
  app->add_option("--param-dtype", o->param_dtype, "dtype of the model's weights")
      ->capture_default_str()->check(CLI::IsMember({"f32", "bf16"}));
  app->add_option("--grad-dtype", o->grad_dtype,
                  "dtype of the gradients (default: the param dtype; bf16 grads need bf16 "
                  "params)")
      ->check(CLI::IsMember({"f32", "bf16"}));
  app->add_option("--ns-dtype", o->ns_dtype,
                  "precision of the fast engine's Newton-Schulz products (mdopt_create ns_dtype=)")
      ->capture_default_str()->check(CLI::IsMember({"f32", "bf16"}));
  app->add_option("--steps", o->steps, "timed steps per preset (fast engine)")
      ->capture_default_str()->check(CLI::Range(1, 1000000));
  app->add_option("--warmup", o->warmup, "untimed steps before the timed ones (fast engine)")
      ->capture_default_str()->check(CLI::Range(0, 1000000));
  app->add_option("--presets", o->presets, "comma-separated presets to time")
      ->delimiter(',')->capture_default_str()->check(CLI::IsMember(PresetNames()));
  app->add_option("--threads", o->threads,
                  "OpenMP threads for mdopt (mdopt_create threads=N; default: the OpenMP default)")
      ->check(CLI::Range(1, 4096));
  app->add_flag("--reference,!--no-reference", o->reference,
                "also time the float64 unfused reference engine (kernels=reference) on the "
                "same tensors and print fast/ref (default: off; it is slow)");
  app->add_option("--reference-steps", o->reference_steps,
                  "timed steps of the reference engine (no warm-up)")
      ->capture_default_str()->check(CLI::Range(1, 1000000));
  app->add_option("--json", o->json, "also write the results as JSON to FILE ('-': stdout)");
  app->add_option("--seed", o->seed, "seed of the weights and gradients")->capture_default_str();
  app->add_flag("--mpi", o->mpi,
                "run on every rank of MPI_COMM_WORLD (under mpirun): the sharded step; rank 0 "
                "prints, with per-rank communication, bytes and imbalance");
  app->add_option("--stream-mib", o->stream_mib,
                  "MiB per array of the memory-bandwidth stream (4 arrays; 0: skip it)")
      ->capture_default_str()->check(CLI::Range(0, 1 << 16));
  app->add_flag("--plan", o->plan, "print the shard plan of each preset after finalize");
  app->add_option("--layout", o->layout, "layout= for every group (rows, owner, auto)")
      ->check(CLI::IsMember({"rows", "owner", "auto"}));
  app->add_option("--options", o->extra_options,
                  "more mdopt_create options, e.g. \"grads=reduced bucket_mb=4 ns_comm_dtype=bf16\"");
}

mdopt_dtype ToDtype(const std::string& name) {
  return name == "bf16" ? MDOPT_DTYPE_BF16 : MDOPT_DTYPE_F32;
}

// Checks what CLI11's per-option validators cannot see and loads the tensors. Throws
// CLI::ValidationError, which main turns into exit code 2 like any parse error.
std::vector<TensorShape> LoadShapes(const Options& o) {
  std::set<std::string> seen;
  for (const std::string& p : o.presets) {
    if (!seen.insert(p).second) {
      throw CLI::ValidationError("--presets", "preset '" + p + "' is listed twice");
    }
  }
  if (o.shapes_file.empty()) return GptShapes(o.gpt);
  std::vector<TensorShape> shapes;
  std::string error;
  if (!ReadShapesFile(o.shapes_file, &shapes, &error)) throw CLI::ValidationError("--shapes", error);
  return shapes;
}

// The value of key=value in mdopt_create options (the last one given wins, as in mdopt);
// empty when the key is absent.
std::string OptionValue(const std::string& options, const std::string& key) {
  std::string value;
  size_t at = 0;
  while (at < options.size()) {
    const size_t begin = options.find_first_not_of(" \t", at);
    if (begin == std::string::npos) break;
    const size_t end = std::min(options.find_first_of(" \t", begin), options.size());
    const std::string token = options.substr(begin, end - begin);
    if (token.compare(0, key.size() + 1, key + "=") == 0) value = token.substr(key.size() + 1);
    at = end;
  }
  return value;
}

struct CommDeleter {
  void operator()(mdopt_comm* c) const { mdopt_comm_destroy(c); }
};

int Run(const Options& o, const std::vector<TensorShape>& shapes, std::ostream* json) {
  if (mdopt_abi_version() != MDOPT_ABI_VERSION) {
    std::fprintf(stderr, "mdopt-bench: libmdopt has ABI %d, this program was built for %d\n",
                 mdopt_abi_version(), MDOPT_ABI_VERSION);
    return 1;
  }
  const MachineInfo machine = CollectMachineInfo(o.threads);
  BenchSetup setup;
  setup.model = o.shapes_file.empty() ? "gpt" : "shapes";
  setup.gpt = o.gpt;
  setup.shapes_file = o.shapes_file;
  setup.param_dtype = o.param_dtype;
  setup.grad_dtype = o.grad_dtype.empty() ? o.param_dtype : o.grad_dtype;
  setup.ns_dtype = o.ns_dtype;
  setup.tensors = static_cast<int64_t>(shapes.size());
  setup.params = TotalNumel(shapes);
  setup.warmup = o.warmup;
  setup.steps = o.steps;
  setup.reference = o.reference;
  setup.reference_steps = o.reference_steps;
  setup.seed = o.seed;

  mdopt_comm* raw_comm = nullptr;
  if (o.mpi) {
    if (mdopt_status s = mdopt_comm_create_mpi(nullptr, &raw_comm); s != MDOPT_SUCCESS) {
      throw AbiError("mdopt_comm_create_mpi", s, mdopt_last_error());
    }
  } else if (mdopt_status s = mdopt_comm_create_local(&raw_comm); s != MDOPT_SUCCESS) {
    throw AbiError("mdopt_comm_create_local", s, mdopt_last_error());
  }
  std::unique_ptr<mdopt_comm, CommDeleter> comm(raw_comm);
  int rank = 0, world = 1;
  mdopt_comm_rank(comm.get(), &rank);
  mdopt_comm_size(comm.get(), &world);
  ModelBuffers buffers(shapes, ToDtype(setup.param_dtype), ToDtype(setup.grad_dtype));
  if (o.stream_mib > 0) {
    const int threads = o.threads > 0 ? o.threads : std::max(1, machine.logical_cpus);
    setup.stream = MeasureStream(int64_t{o.stream_mib} << 18, threads, 5);
  }
  const int param_bytes = setup.param_dtype == "bf16" ? 2 : 4;
  const int grad_bytes = setup.grad_dtype == "bf16" ? 2 : 4;

  std::vector<BenchRow> rows;
  for (const std::string& name : o.presets) {
    RunConfig cfg;
    cfg.preset = FindPreset(name);
    cfg.threads = o.threads;
    cfg.ns_dtype = o.ns_dtype;
    cfg.seed = o.seed;
    cfg.engine = EngineKind::kFast;
    cfg.warmup = o.warmup;
    cfg.steps = o.steps;
    cfg.layout = o.layout;
    cfg.extra_options = o.extra_options;
    cfg.print_plan = o.plan;
    rows.push_back(RunBenchmark(comm.get(), shapes, &buffers, cfg));
    // The model is of one rank's passes over the whole model (at N ranks each moves ~1/N).
    if (world == 1) rows.back().model_bytes = ModelStepBytes(*cfg.preset, shapes, param_bytes, grad_bytes);
    if (o.reference && world == 1) {
      // The reference is plain single-pass loops with nothing to warm up, and a step of it
      // can take seconds; its first steps see the same gradients as the fast engine's.
      cfg.engine = EngineKind::kReference;
      cfg.warmup = 0;
      cfg.steps = o.reference_steps;
      rows.push_back(RunBenchmark(comm.get(), shapes, &buffers, cfg));
    }
  }
  FillReferenceRatios(&rows);

  if (world > 1) {
#ifdef MDOPT_BENCH_MPI
    DistSetup ds;
    ds.world = world;
    ds.rank = rank;
    ds.grads_local = OptionValue(o.extra_options, "grads") != "reduced";
    ds.gather_eager = OptionValue(o.extra_options, "gather") != "deferred";
    // Gradients are reduced in float32 whatever their dtype unless grad_comm_dtype=bf16.
    ds.grad_comm_bytes = OptionValue(o.extra_options, "grad_comm_dtype") == "bf16" ? 2 : 4;
    ds.param_bytes = setup.param_dtype == "bf16" ? 2 : 4;
    ds.ns_comm_bytes = OptionValue(o.extra_options, "ns_comm_dtype") == "bf16" ? 2 : 4;
    ds.params = setup.params;
    if (rank == 0) PrintTable(stdout, machine, setup, rows);
    PrintDistributed(stdout, ds, rows);
#endif
    return 0;
  }
  PrintTable(o.json == "-" ? stderr : stdout, machine, setup, rows);
  if (json != nullptr) {
    WriteJson(*json, machine, setup, rows);
    if (!*json) {
      std::fprintf(stderr, "mdopt-bench: writing the JSON to %s failed\n", o.json.c_str());
      return 1;
    }
  }
  return 0;
}

}  // namespace
}  // namespace mdopt_bench

int main(int argc, char** argv) {
  using namespace mdopt_bench;
  Options o;
  CLI::App app{"mdopt-bench: time mdopt optimizer steps per preset through the C ABI",
               "mdopt-bench"};
  DefineOptions(&app, &o);
  std::vector<TensorShape> shapes;
  std::ofstream json_file;
  try {
    app.parse(argc, argv);
    shapes = LoadShapes(o);
    // Opened before the (long) run so that a bad path fails at once.
    if (!o.json.empty() && o.json != "-") {
      json_file.open(o.json);
      if (!json_file) throw CLI::ValidationError("--json", "cannot open '" + o.json + "' for writing");
    }
  } catch (const CLI::ParseError& e) {
    const int code = app.exit(e);  // prints help, or the error with a usage hint
    return code == 0 ? 0 : 2;
  }
  std::ostream* json = o.json.empty() ? nullptr : o.json == "-" ? &std::cout : &json_file;
  try {
    return Run(o, shapes, json);
  } catch (const AbiError& e) {
    std::fprintf(stderr, "mdopt-bench: %s\n", e.what());
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "mdopt-bench: out of memory allocating the model's tensors\n");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "mdopt-bench: %s\n", e.what());
  }
  return 1;
}
