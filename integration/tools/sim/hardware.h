// The machine mdopt-sim prices a step on: a key = value file (docs/mdopt-sim.md, "Hardware
// file"), every key required, so that a figure left out is an error and never a silent
// default. Units are in the key names.
#ifndef MDOPT_INTEGRATION_TOOLS_SIM_HARDWARE_H_
#define MDOPT_INTEGRATION_TOOLS_SIM_HARDWARE_H_

#include <string>

namespace mdopt_sim {

enum class Algo { kRing, kTree };

struct Hardware {
  std::string name;
  double hbm_gbps = 0;            // achieved memory bandwidth of the elementwise passes, GB/s
  double gemm_tflops_small = 0;   // achieved GEMM rate, min(m, n) < 1024, TFLOP/s
  double gemm_tflops_medium = 0;  // 1024 <= min(m, n) < 4096
  double gemm_tflops_large = 0;   // min(m, n) >= 4096
  double peak_tflops = 0;         // dense peak: the trainer's MFU is a fraction of it
  double intra_busbw_gbps = 0;    // collective bus bandwidth within a node, GB/s per GPU
  double intra_latency_us = 0;    // per ring step within a node
  double inter_busbw_gbps = 0;    // collective bus bandwidth across nodes, GB/s per GPU
  double inter_latency_us = 0;    // per ring step (or tree level) across nodes
  double intra_p2p_gbps = 0;      // one GPU's send or receive bandwidth within a node
  double inter_p2p_gbps = 0;      // one GPU's NIC, each way
  double kernel_us = 0;           // fixed cost of one kernel launch or collective call
  Algo all_reduce = Algo::kRing;  // NCCL's all-reduce algorithm (reduce-scatter and
                                  // all-gather are rings whatever this says)
  int host_cores = 0;  // 0: every rank its own device; else ranks share this many cores
};

// Reads `path`. False with *error naming the file, the line and what is wrong: an unknown
// key, a value that is not a positive number (host_cores: >= 0), all_reduce not ring|tree,
// or a missing key.
bool ReadHardware(const std::string& path, Hardware* hw, std::string* error);
// The same from text (tests); `where` names it in errors.
bool ParseHardware(const std::string& text, const std::string& where, Hardware* hw,
                   std::string* error);

}  // namespace mdopt_sim

#endif  // MDOPT_INTEGRATION_TOOLS_SIM_HARDWARE_H_
