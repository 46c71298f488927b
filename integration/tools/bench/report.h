// The benchmark's output: a human-readable table and the same data as JSON.
#ifndef MDOPT_INTEGRATION_TOOLS_BENCH_REPORT_H_
#define MDOPT_INTEGRATION_TOOLS_BENCH_REPORT_H_

#include <cstdint>
#include <cstdio>
#include <ostream>
#include <string>
#include <vector>

#include "bench_runner.h"
#include "machine_info.h"
#include "memory_traffic.h"
#include "model_shapes.h"

namespace mdopt_bench {

// What was benchmarked, echoed in both outputs so a result file explains itself.
struct BenchSetup {
  std::string model;       // "gpt" or "shapes"
  GptSizes gpt;            // when model == "gpt"
  std::string shapes_file; // when model == "shapes"
  std::string param_dtype, grad_dtype;
  std::string ns_dtype;     // Newton-Schulz precision of the fast engine (mdopt ns_dtype=)
  int64_t tensors = 0, params = 0;
  int warmup = 0, steps = 0, reference_steps = 0;
  bool reference = false;
  uint64_t seed = 0;
  StreamBandwidth stream;   // elements == 0: not measured (--stream-mib 0)
};

// Sets ratio_to_reference on each fast row whose preset also has a reference row.
void FillReferenceRatios(std::vector<BenchRow>* rows);

void PrintTable(std::FILE* out, const MachineInfo& machine, const BenchSetup& setup,
                const std::vector<BenchRow>& rows);

// One object: {"tool", "machine", "setup", "rows": [...]}; times in ms, raw per-step
// times included.
void WriteJson(std::ostream& out, const MachineInfo& machine, const BenchSetup& setup,
               const std::vector<BenchRow>& rows);

}  // namespace mdopt_bench

#endif  // MDOPT_INTEGRATION_TOOLS_BENCH_REPORT_H_
