// Where a benchmark ran: printed above the table and written to the JSON, so numbers from
// different machines, thread counts and library versions are not compared by mistake.
#ifndef MDOPT_INTEGRATION_TOOLS_BENCH_MACHINE_INFO_H_
#define MDOPT_INTEGRATION_TOOLS_BENCH_MACHINE_INFO_H_

#include <string>

namespace mdopt_bench {

struct MachineInfo {
  std::string cpu_model;         // "model name" of /proc/cpuinfo, "unknown" without one
  int logical_cpus = 0;          // std::thread::hardware_concurrency (0: unknown)
  int threads = 0;               // --threads; 0 when the OpenMP default was left alone
  std::string omp_num_threads;   // the OMP_NUM_THREADS environment variable, "" if unset
  std::string date_utc;          // ISO 8601, when the run started
  std::string mdopt_version;     // mdopt_version_string()
  int abi_version = 0;           // mdopt_abi_version()
  std::string isa;               // "avx512", "avx2" or "baseline" (mdopt_runtime_info)
  std::string blas;              // OpenBLAS version/kernel family (mdopt_runtime_info)
  std::string onednn_bf16;       // yes | no-cpu | no-build (mdopt_runtime_info)
  std::string runtime_info;      // mdopt_runtime_info(), whole
};

MachineInfo CollectMachineInfo(int threads);

}  // namespace mdopt_bench

#endif  // MDOPT_INTEGRATION_TOOLS_BENCH_MACHINE_INFO_H_
