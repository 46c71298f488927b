#include "machine_info.h"

#include <cstdlib>
#include <ctime>
#include <fstream>
#include <thread>

#include "mdopt/mdopt.h"

namespace mdopt_bench {
namespace {

std::string CpuModel() {
  std::ifstream in("/proc/cpuinfo");
  for (std::string line; std::getline(in, line);) {
    if (line.compare(0, 10, "model name") != 0) continue;
    const size_t colon = line.find(':');
    if (colon == std::string::npos) continue;
    const size_t start = line.find_first_not_of(" \t", colon + 1);
    if (start != std::string::npos) return line.substr(start);
  }
  return "unknown";
}

// The value of `key=` in mdopt_runtime_info()'s line, "unknown" when absent.
std::string RuntimeValue(const std::string& info, const std::string& key) {
  const std::string needle = key + "=";
  size_t at = 0;
  while ((at = info.find(needle, at)) != std::string::npos) {
    if (at == 0 || info[at - 1] == ' ') {
      const size_t start = at + needle.size();
      return info.substr(start, info.find(' ', start) - start);
    }
    at += needle.size();
  }
  return "unknown";
}

std::string DateUtc() {
  const std::time_t now = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&now, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

}  // namespace

MachineInfo CollectMachineInfo(int threads) {
  MachineInfo m;
  m.cpu_model = CpuModel();
  m.logical_cpus = static_cast<int>(std::thread::hardware_concurrency());
  m.threads = threads;
  if (const char* env = std::getenv("OMP_NUM_THREADS")) m.omp_num_threads = env;
  m.date_utc = DateUtc();
  m.mdopt_version = mdopt_version_string();
  m.abi_version = mdopt_abi_version();
  m.runtime_info = mdopt_runtime_info();
  m.isa = RuntimeValue(m.runtime_info, "isa");
  m.blas = RuntimeValue(m.runtime_info, "blas");
  m.onednn_bf16 = RuntimeValue(m.runtime_info, "onednn_bf16");
  return m;
}

}  // namespace mdopt_bench
