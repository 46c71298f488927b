// Times one preset on one engine through the C ABI: register the model, finalize, step
// warm-up then timed steps with fresh gradients generated outside the timed region.
#ifndef MDOPT_INTEGRATION_TOOLS_BENCH_BENCH_RUNNER_H_
#define MDOPT_INTEGRATION_TOOLS_BENCH_BENCH_RUNNER_H_

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "mdopt/mdopt.h"
#include "model_shapes.h"
#include "preset_groups.h"
#include "tensor_data.h"

namespace mdopt_bench {

// A failed mdopt_* call. Thrown (inside the tool only; nothing is thrown across the ABI)
// so that every call site stays one line and main reports it once, with exit code 1.
class AbiError : public std::runtime_error {
 public:
  AbiError(const std::string& call, mdopt_status status, const std::string& message)
      : std::runtime_error(call + ": " + mdopt_status_string(status) + ": " + message) {}
};

enum class EngineKind { kFast, kReference };
const char* EngineName(EngineKind engine);

struct RunConfig {
  const PresetGrouping* preset = nullptr;
  EngineKind engine = EngineKind::kFast;
  int threads = 0;  // 0: leave the OpenMP default alone
  std::string ns_dtype = "f32";  // fast engine only
  int warmup = 0;
  int steps = 1;
  uint64_t seed = 0;
  std::string extra_options;  // appended to mdopt_create's options (--options)
  std::string layout;         // appended to every group spec as layout=... (--layout); empty: none
  bool print_plan = false;    // print mdopt_describe_plan after finalize (--plan)
};

// One row of the report.
struct BenchRow {
  std::string preset, engine;
  int64_t tensors = 0, params = 0;
  int warmup = 0, steps = 0;
  std::vector<double> step_seconds;  // mdopt_step_info.seconds of each timed step
  std::vector<double> wall_seconds;  // wall time around each timed mdopt_step
  std::vector<double> comm_seconds, exposed_seconds;  // per timed step (mdopt_step_info)
  std::vector<int64_t> bytes_sent;                    // per timed step, this rank
  // From the plan (mdopt_plan_json): elements of the matrices whose X is gathered to a
  // Newton-Schulz owner and O scattered back (rows-layout Muon matrices), and the world.
  int64_t ns_gathered_elements = 0;
  int world = 1;
  // Per bucket of the plan, at several ranks: doubles of the cross-row record (summed over
  // ranks by one all-reduce per bucket and step) and of the tangent=1 radial record, the sum
  // of the plan's per-slot "cross" and "radial"; empty at one rank.
  std::vector<int64_t> cross_record, radial_record;
  int64_t state_bytes = 0, workspace_bytes = 0;
  double ratio_to_reference = 0.0;   // median fast / median reference; 0: not measured
  int64_t model_bytes = 0;           // ModelStepBytes (memory_traffic.h); 0: not modelled

  double median_ms() const;
  double mean_ms() const;
  double wall_median_ms() const;
  double wall_mean_ms() const;
  double ns_per_param() const;  // median step time / params
  double state_bytes_per_param() const;
  double model_bytes_per_param() const;
  double achieved_gbps() const;  // model_bytes / median step time
};

// Runs cfg on the tensors, resetting the weights in `buffers` first. Throws AbiError.
BenchRow RunBenchmark(mdopt_comm* comm, const std::vector<TensorShape>& shapes,
                      ModelBuffers* buffers, const RunConfig& cfg);

}  // namespace mdopt_bench

#endif  // MDOPT_INTEGRATION_TOOLS_BENCH_BENCH_RUNNER_H_
