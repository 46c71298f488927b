// A peer that fails mid-run, for tests/dist/fault_test.cmake: 3 ranks step an md-muon
// optimizer with comm_timeout_s=3; at step 3 the last rank either exits (`exit`: the process
// dies without finalising MPI) or stops participating (`hang`: it sleeps). The survivors
// must not hang: each returns MDOPT_COMM_ERROR within the timeout (then exits 2) or is ended
// by mpirun, which ends the whole job once a rank has exited with an error (Open MPI 4.1 has
// no ULFM, so survivors are never told and re-formed; mpirun's job teardown is what ends them).
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "dist_opt/optimizer.h"

int main(int argc, char** argv) {
  using namespace mdopt;
  const std::string mode = argc > 1 ? argv[1] : "exit";
  absl::StatusOr<std::unique_ptr<Communicator>> comm = MakeMpiCommunicator(nullptr);
  if (!comm.ok()) {
    std::fprintf(stderr, "fault_peer: %s\n", std::string(comm.status().message()).c_str());
    return 1;
  }
  const int rank = (*comm)->rank(), size = (*comm)->size();
  Optimizer opt(comm->get(), *ParseOptimizerOptions("threads=1 comm_timeout_s=3 bucket_mb=0.001"));
  if (!opt.AddGroup("g", "preset=md-muon layout=rows").ok()) return 1;
  std::vector<std::vector<float>> w(4, std::vector<float>(64 * 48)), g(4, std::vector<float>(64 * 48));
  for (size_t i = 0; i < w.size(); ++i) {
    for (size_t k = 0; k < w[i].size(); ++k) w[i][k] = static_cast<float>(((k * 7 + i * 13) % 17) - 8) * 0.01f;
    ParamDescription d;
    d.name = "w" + std::to_string(i);
    d.group = "g";
    d.ndim = 2;
    d.shape[0] = 64;
    d.shape[1] = 48;
    d.param = w[i].data();
    d.grad = g[i].data();
    if (!opt.AddParam(d).ok()) return 1;
  }
  if (!opt.Finalize().ok()) return 1;
  for (int step = 1; step <= 5; ++step) {
    for (size_t i = 0; i < g.size(); ++i)
      for (size_t k = 0; k < g[i].size(); ++k) g[i][k] = static_cast<float>((k + step + rank) % 5) * 0.01f;
    if (step == 3 && rank == size - 1) {
      std::fprintf(stderr, "fault_peer: rank %d %s at step %d\n", rank, mode == "hang" ? "hangs" : "exits", step);
      if (mode == "hang") sleep(120);
      _exit(3);
    }
    const auto t0 = std::chrono::steady_clock::now();
    absl::StatusOr<StepResult> r = opt.Step(1.0, nullptr);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (!r.ok()) {
      std::fprintf(stderr, "fault_peer: rank %d step %d: %s after %.2f s\n", rank, step,
                   std::string(r.status().ToString()).c_str(), s);
      _exit(2);
    }
  }
  std::fprintf(stderr, "fault_peer: rank %d finished all steps (unexpected)\n", rank);
  return 0;
}
