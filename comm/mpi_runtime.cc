#include "comm/mpi_runtime.h"

#include <atomic>
#include <cstdlib>
#include <functional>
#include <utility>
#include <vector>

#include "absl/base/const_init.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"

namespace mdopt::mpi {
namespace {

ABSL_CONST_INIT absl::Mutex g_init_mu(absl::kConstInit);
std::atomic<int> g_held{0};
std::atomic<bool> g_leaked{false};

ABSL_CONST_INIT absl::Mutex g_live_mu(absl::kConstInit);
// Never destroyed (process-lifetime, read by the atexit handler whatever the order of static
// destructors).
std::vector<std::pair<const void*, std::function<void()>>>& Live()
    ABSL_EXCLUSIVE_LOCKS_REQUIRED(g_live_mu) {
  static auto* live = new std::vector<std::pair<const void*, std::function<void()>>>();
  return *live;
}

void FinalizeAtExit() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized) return;  // the host did it
  // Communicators nobody destroyed: drain and free them now, newest first (their progress
  // threads stop), so that MPI can be finalised.
  std::vector<std::pair<const void*, std::function<void()>>> live;
  {
    absl::MutexLock l(&g_live_mu);
    live.swap(Live());
  }
  for (auto it = live.rbegin(); it != live.rend(); ++it) it->second();
  if (g_held.load() != 0 || g_leaked.load()) return;  // see Leak(): finalising would be erroneous
  MPI_Finalize();
}

}  // namespace

absl::Status EnsureInitialised(int* provided) {
  absl::MutexLock l(&g_init_mu);
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized) {
    return absl::FailedPreconditionError("MPI was already finalised; it cannot be restarted");
  }
  int initialised = 0;
  MPI_Initialized(&initialised);
  if (!initialised) {
    const int rc = MPI_Init_thread(nullptr, nullptr, MPI_THREAD_MULTIPLE, provided);
    if (rc != MPI_SUCCESS) {
      return absl::UnavailableError(absl::StrCat("MPI_Init_thread failed: ", ErrorString(rc)));
    }
    // Only what mdopt initialised is finalised by it.
    std::atexit(FinalizeAtExit);
    return absl::OkStatus();
  }
  MPI_Query_thread(provided);
  return absl::OkStatus();
}

void RegisterForExit(const void* key, std::function<void()> shutdown) {
  absl::MutexLock l(&g_live_mu);
  Live().emplace_back(key, std::move(shutdown));
}

void Unregister(const void* key) {
  absl::MutexLock l(&g_live_mu);
  auto& live = Live();
  for (auto it = live.begin(); it != live.end(); ++it) {
    if (it->first == key) {
      live.erase(it);
      return;
    }
  }
}

void Acquire() { g_held.fetch_add(1); }
void Release() { g_held.fetch_sub(1); }
void Leak() {
  g_leaked.store(true);
  g_held.fetch_sub(1);
}

std::string ErrorString(int code) {
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(code, text, &len) != MPI_SUCCESS) return absl::StrCat("MPI error ", code);
  return absl::StrCat(std::string(text, static_cast<size_t>(len)), " (MPI error ", code, ")");
}

}  // namespace mdopt::mpi
