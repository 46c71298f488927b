#include "comm/mpi_max_count.h"

#include <atomic>
#include <climits>
#include <cstdlib>

namespace mdopt::mpi {
namespace {

int64_t FromEnvironment() {
  const char* v = std::getenv("MDOPT_MPI_MAX_COUNT");
  if (v == nullptr || *v == '\0') return INT_MAX;
  char* end = nullptr;
  const long long n = std::strtoll(v, &end, 10);
  if (*end != '\0' || n < 1 || n > INT_MAX) return INT_MAX;
  return n;
}

std::atomic<int64_t> g_override{0};

}  // namespace

int64_t MaxCount() {
  static const int64_t from_env = FromEnvironment();
  const int64_t o = g_override.load(std::memory_order_relaxed);
  return o > 0 ? o : from_env;
}

void SetMaxCountForTesting(int64_t n) {
  g_override.store(n >= 1 && n <= INT_MAX ? n : 0, std::memory_order_relaxed);
}

}  // namespace mdopt::mpi
