// Failure semantics of the MPI backend, in a program of its own (its communicators end
// broken or aborted): the last rank skips an all-reduce that the others start with a 1 s
// timeout; they must get DeadlineExceeded after 1 to 5 s, and then fail fast. Then one rank
// aborts a communicator while a receive is pending on it. Afterwards the skipper completes
// the all-reduce it skipped and the aborted receive is cancelled at destruction, so that no
// MPI request is left and the job ends cleanly; a watchdog ends it with MPI_Abort if
// anything hangs instead.
#include <mpi.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include "comm/communicator.h"

namespace {

using Clock = std::chrono::steady_clock;

bool g_ok = true;
int g_rank = -1;

void Check(bool cond, const std::string& what) {
  if (!cond) {
    g_ok = false;
    std::fprintf(stderr, "rank %d: FAILED: %s\n", g_rank, what.c_str());
  }
}

double Since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

bool Contains(const absl::Status& s, const std::string& text) {
  return s.message().find(text) != absl::string_view::npos;
}

}  // namespace

int main() {
  absl::StatusOr<std::unique_ptr<mdopt::Communicator>> made = mdopt::MakeMpiCommunicator(nullptr);
  if (!made.ok()) {
    std::fprintf(stderr, "MakeMpiCommunicator: %s\n", made.status().ToString().c_str());
    return 1;
  }
  std::unique_ptr<mdopt::Communicator> c = *std::move(made);
  std::thread([] {
    std::this_thread::sleep_for(std::chrono::seconds(60));
    std::fprintf(stderr, "watchdog: the timeout test hung; MPI_Abort\n");
    MPI_Abort(MPI_COMM_WORLD, 3);
  }).detach();
  const int n = c->size();
  g_rank = c->rank();
  const int skipper = n - 1;
  c->SetTimeout(absl::Seconds(1));
  std::vector<double> buf(16, 1.0);

  if (g_rank != skipper) {
    const auto t0 = Clock::now();
    absl::StatusOr<mdopt::RequestPtr> r =
        c->AllReduce(buf.data(), buf.data(), 16, mdopt::DataType::kF64, mdopt::ReduceOp::kSum);
    Check(r.ok(), "the all-reduce starts");
    const absl::Status s = r.ok() ? (*r)->Wait() : r.status();
    const double waited = Since(t0);
    std::printf("rank %d: all-reduce skipped by rank %d: %s after %.3f s\n", g_rank, skipper,
                s.ToString().c_str(), waited);
    Check(s.code() == absl::StatusCode::kDeadlineExceeded, "DeadlineExceeded");
    Check(Contains(s, "all-reduce") && Contains(s, "comm_timeout_s=1"),
          "the message names the op and comm_timeout_s");
    Check(waited >= 1.0 && waited <= 5.0, "timed out within 1 to 5 s");
    // Broken: later operations fail at once.
    const auto t1 = Clock::now();
    absl::StatusOr<mdopt::RequestPtr> later = c->Barrier();
    Check(!later.ok() && later.status().code() == absl::StatusCode::kUnavailable &&
              Contains(later.status(), "communicator is broken") &&
              Contains(later.status(), "DEADLINE_EXCEEDED"),
          "later operations fail fast with Unavailable(communicator is broken: ...)");
    Check(Since(t1) < 0.5, "fail fast");
  }
  MPI_Barrier(MPI_COMM_WORLD);  // every rank is past its timeout
  if (g_rank == skipper) {
    // The late all-reduce matches the requests the others abandoned, so they complete.
    absl::StatusOr<mdopt::RequestPtr> r =
        c->AllReduce(buf.data(), buf.data(), 16, mdopt::DataType::kF64, mdopt::ReduceOp::kSum);
    Check(r.ok() && (*r)->Wait().ok(), "the skipper's late all-reduce completes");
  }

  // Abort while an operation is pending: rank 0 waits for a message rank 1 sends only later.
  absl::StatusOr<std::unique_ptr<mdopt::Communicator>> made2 = mdopt::MakeMpiCommunicator(nullptr);
  Check(made2.ok(), "a second communicator");
  std::unique_ptr<mdopt::Communicator> c2 = *std::move(made2);
  c2->SetTimeout(absl::Seconds(30));
  float msg[4] = {0, 0, 0, 0};
  if (g_rank == 0 && n > 1) {
    const mdopt::P2P recv[] = {{1, false, msg, 4, mdopt::DataType::kF32}};
    absl::StatusOr<mdopt::RequestPtr> r = c2->SendRecv(recv, 5);
    Check(r.ok(), "the receive starts");
    std::thread aborter([&] {
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
      c2->Abort("aborted by the test");
    });
    const auto t0 = Clock::now();
    const absl::Status s = (*r)->Wait();
    const double waited = Since(t0);
    aborter.join();
    std::printf("rank 0: pending receive after Abort: %s after %.3f s\n", s.ToString().c_str(),
                waited);
    Check(s.code() == absl::StatusCode::kAborted && Contains(s, "aborted by the test"),
          "a pending op fails with Aborted");
    Check(waited < 5.0, "Abort does not wait for the op");
    absl::StatusOr<mdopt::RequestPtr> later = c2->Barrier();
    Check(!later.ok() && later.status().code() == absl::StatusCode::kAborted,
          "later operations fail with Aborted");
  }

  int ok = g_ok ? 1 : 0, all_ok = 0;
  MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  // Destroying the aborted communicator cancels its receive (nobody sends it); destroying
  // the broken one drains the all-reduce the skipper matched late. Both promptly: a request
  // left behind would hold them for a second and then keep MPI from finalising cleanly.
  const auto t0 = Clock::now();
  c2.reset();
  c.reset();
  const double destroyed = Since(t0);
  std::printf("rank %d: communicators destroyed in %.3f s; %s\n", g_rank, destroyed,
              all_ok ? "PASS" : "FAIL");
  if (destroyed > 0.9) {
    std::fprintf(stderr, "rank %d: FAILED: destruction waited for requests\n", g_rank);
    return 1;
  }
  return all_ok ? 0 : 1;
}
