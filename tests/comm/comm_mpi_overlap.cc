// Is communication hidden behind computation? Each rank times a large all-gather alone, a
// fixed amount of arithmetic alone, and both together (start the all-gather, compute, then
// Wait). With a progress thread the overlapped time should be below the sum. Prints the
// numbers; asserts only that everything completed (timings on a shared machine flake).
// Arguments: [floats per rank] [--host-init=funneled: caller-driven progress, to compare]
// [--compute=sleep: the caller sleeps instead of computing, as a host thread does while an
// accelerator computes; this isolates the progress mechanism from the competition for
// cores, which on a machine with few cores hides little whatever the mode].
#include <mpi.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "comm/communicator.h"

namespace {

using Clock = std::chrono::steady_clock;

double Since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// `iters` rounds of dependent floating-point work; returns something so it is not elided.
double Compute(int64_t iters) {
  double x = 1.0;
  for (int64_t i = 0; i < iters; ++i) x = std::sqrt(x * 1.0000001 + 1e-9) + 1e-12;
  return x;
}

}  // namespace

int main(int argc, char** argv) {
  int64_t per_rank = int64_t{1} << 23;  // floats: 32 MiB per rank
  bool host_init = false, sleep = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--host-init=funneled") == 0) {
      host_init = true;
    } else if (std::strcmp(argv[i], "--compute=sleep") == 0) {
      sleep = true;
    } else {
      per_rank = std::atoll(argv[i]);
    }
  }
  if (host_init) {
    int provided = 0;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  }
  absl::StatusOr<std::unique_ptr<mdopt::Communicator>> made = mdopt::MakeMpiCommunicator(nullptr);
  if (!made.ok()) {
    std::fprintf(stderr, "%s\n", made.status().ToString().c_str());
    return 1;
  }
  mdopt::Communicator& c = **made;
  const int n = c.size(), me = c.rank();
  std::vector<float> mine(per_rank, static_cast<float>(me)), all(per_rank * n);
  std::vector<int64_t> counts(n, per_rank);
  auto gather = [&]() -> absl::StatusOr<mdopt::RequestPtr> {
    return c.AllGather(mine.data(), all.data(), counts, mdopt::DataType::kF32);
  };
  auto check = [](const absl::Status& s) {
    if (!s.ok()) {
      std::fprintf(stderr, "%s\n", s.ToString().c_str());
      std::exit(1);
    }
  };
  auto wait = [&](absl::StatusOr<mdopt::RequestPtr> r) {
    check(r.status());
    check((*r)->Wait());
  };
  wait(gather());  // warm-up: connections, page faults

  double comm = 1e30;
  for (int k = 0; k < 3; ++k) {
    check(mdopt::BarrierBlocking(c));
    const auto t0 = Clock::now();
    wait(gather());
    comm = std::min(comm, Since(t0));
  }
  // Calibrate the arithmetic to take about as long as the all-gather.
  int64_t iters = 1 << 16;
  double compute = 0, sink = 0;
  const auto work = [&](int64_t n) {
    if (sleep) {
      std::this_thread::sleep_for(std::chrono::duration<double>(comm));
    } else {
      sink += Compute(n);
    }
  };
  for (; !sleep;) {
    const auto t0 = Clock::now();
    sink += Compute(iters);
    compute = Since(t0);
    if (compute >= comm || iters > (int64_t{1} << 34)) break;
    iters *= 2;
  }
  if (!sleep) iters = static_cast<int64_t>(iters * comm / compute);
  {
    const auto t0 = Clock::now();
    work(iters);
    compute = Since(t0);
  }
  double both = 1e30;
  double exposed = 0;
  for (int k = 0; k < 3; ++k) {
    check(mdopt::BarrierBlocking(c));
    const mdopt::CommStats s0 = c.stats();
    const auto t0 = Clock::now();
    absl::StatusOr<mdopt::RequestPtr> r = gather();
    check(r.status());
    work(iters);
    check((*r)->Wait());
    const double t = Since(t0);
    if (t < both) {
      both = t;
      exposed = c.stats().wait_seconds - s0.wait_seconds;
    }
  }
  for (int r = 0; r < n; ++r) {
    if (all[static_cast<size_t>(r) * per_rank + per_rank - 1] != static_cast<float>(r)) {
      std::fprintf(stderr, "rank %d: wrong data from rank %d\n", me, r);
      return 1;
    }
  }
  std::printf(
      "rank %d/%d progress=%s %s all-gather %.1f MiB: comm alone %.1f ms, compute alone %.1f ms, "
      "sum %.1f ms, overlapped %.1f ms (exposed wait %.1f ms), hidden %.0f%% of the shorter "
      "[sink %.3g]\n",
      me, n, c.progress_mode().c_str(), sleep ? "sleep" : "arithmetic", per_rank * n * 4.0 / (1 << 20), comm * 1e3,
      compute * 1e3, (comm + compute) * 1e3, both * 1e3, exposed * 1e3,
      100.0 * (comm + compute - both) / std::min(comm, compute), sink);
  made->reset();
  if (host_init) MPI_Finalize();
  return 0;
}
