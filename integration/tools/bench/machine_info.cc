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
  return m;
}

}  // namespace mdopt_bench
