#include "comm/mpi_engine.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "comm/mpi_runtime.h"

namespace mdopt::mpi {
namespace {

// Testsome rounds without a completion before the progress thread starts sleeping: long
// enough to catch the quick completions of small messages, short enough not to hog a core.
constexpr int kSpinRounds = 64;

class MpiRequest final : public Request {
 public:
  MpiRequest(std::shared_ptr<Engine> engine, std::shared_ptr<Op> op)
      : engine_(std::move(engine)), op_(std::move(op)) {}
  absl::Status Wait() override { return engine_->Wait(op_); }
  absl::StatusOr<bool> Test() override { return engine_->Test(op_); }

 private:
  std::shared_ptr<Engine> engine_;
  std::shared_ptr<Op> op_;
};

}  // namespace

Engine::Engine(MPI_Comm comm, MPI_Op bf16_sum, Mode mode, std::shared_ptr<OpTracker> tracker)
    : comm_(comm), bf16_sum_(bf16_sum), mode_(mode), tracker_(std::move(tracker)) {}

Engine::~Engine() = default;

void Engine::StartThread() {
  thread_ = std::thread([self = shared_from_this()] { self->Run(); });
}

absl::StatusOr<RequestPtr> Engine::Submit(std::shared_ptr<Op> op) {
  RequestPtr req = std::make_shared<MpiRequest>(shared_from_this(), op);
  if (mode_ == Mode::kThread) {
    absl::MutexLock l(&queue_mu_);
    queue_.push_back(std::move(op));
  } else {
    absl::MutexLock l(&mpi_mu_);
    StartLocked(op);
  }
  return req;
}

absl::Status Engine::Wait(const std::shared_ptr<Op>& op) {
  if (mode_ == Mode::kThread) return tracker_->Wait(op->state, nullptr);
  return tracker_->Wait(op->state, [this] {
    absl::MutexLock l(&mpi_mu_);
    ProgressLocked();
  });
}

absl::StatusOr<bool> Engine::Test(const std::shared_ptr<Op>& op) {
  if (mode_ == Mode::kCaller) {
    absl::MutexLock l(&mpi_mu_);
    ProgressLocked();
  }
  if (!op->state->done()) return false;
  if (absl::Status s = op->state->status(); !s.ok()) return s;
  return true;
}

void Engine::Run() {
  int idle_rounds = 0;
  for (;;) {
    bool mpi_idle;
    {
      absl::MutexLock l(&mpi_mu_);
      mpi_idle = reqs_.empty();
    }
    std::deque<std::shared_ptr<Op>> fresh;
    bool stopping = false;
    {
      absl::MutexLock l(&queue_mu_);
      // Nothing in flight: sleep until a submission or the stop request.
      if (mpi_idle) queue_mu_.Await(absl::Condition(this, &Engine::HasWork));
      if (abandon_) {
        inflight_ = !mpi_idle;  // queued ops hold no MPI resources
        break;
      }
      fresh.swap(queue_);
      if (stop_ && fresh.empty() && mpi_idle) break;
      stopping = stop_;
    }
    bool progressed = !fresh.empty();
    {
      absl::MutexLock l(&mpi_mu_);
      for (const std::shared_ptr<Op>& op : fresh) StartLocked(op);
      if (stopping && !tracker_->healthy()) CancelReceivesLocked();
      progressed = ProgressLocked() || progressed;
    }
    if (progressed) {
      idle_rounds = 0;
    } else if (++idle_rounds > kSpinRounds) {
      absl::SleepFor(absl::Microseconds(30));
    }
  }
  thread_exited_.Notify();
}

void Engine::StartLocked(const std::shared_ptr<Op>& op) {
  // Broken or aborted since submission: the peers cannot be relied on to match it.
  if (absl::Status h = tracker_->health(); !h.ok()) {
    tracker_->Fail(*op->state, h);
    return;
  }
  std::vector<MPI_Request> started;
  const int rc = op->start(comm_, &started);
  for (size_t i = 0; i < started.size(); ++i) {
    reqs_.push_back(started[i]);
    owners_.push_back(op);
    cancellable_.push_back(static_cast<int>(i) < op->receives);
  }
  op->pending = static_cast<int>(started.size());
  if (rc != MPI_SUCCESS) {
    FailLocked(*op, absl::UnavailableError(absl::StrCat(op->state->name(), ": ", ErrorString(rc))));
    return;
  }
  if (op->pending == 0) FinishLocked(op);
}

void Engine::FailLocked(Op& op, absl::Status s) {
  if (op.failed) return;
  op.failed = true;
  tracker_->Fail(*op.state, s);
  tracker_->Break(s);
}

void Engine::FinishLocked(const std::shared_ptr<Op>& op) {
  if (!op->state->BeginFinish()) return;  // failed meanwhile (timeout, abort): leave the buffer
  if (op->finish) op->finish();
  tracker_->Complete(*op->state, absl::OkStatus());
}

bool Engine::ProgressLocked() {
  if (reqs_.empty()) return false;
  const int n = static_cast<int>(reqs_.size());
  // Reused: the progress thread calls this every few tens of microseconds.
  done_.resize(n);
  statuses_.resize(n);
  int outcount = 0;
  const int rc = MPI_Testsome(n, reqs_.data(), &outcount, done_.data(), statuses_.data());
  if (rc != MPI_SUCCESS && rc != MPI_ERR_IN_STATUS) {
    // MPI cannot say which request failed: everything in flight is lost.
    const absl::Status s = absl::UnavailableError(
        absl::StrCat("MPI_Testsome failed on ", tracker_->where(), ": ", ErrorString(rc)));
    for (const std::shared_ptr<Op>& op : owners_) FailLocked(*op, s);
    AbandonInflight();
    return true;
  }
  if (outcount == MPI_UNDEFINED) outcount = 0;
  for (int k = 0; k < outcount; ++k) {
    const std::shared_ptr<Op>& op = owners_[done_[k]];
    if (rc == MPI_ERR_IN_STATUS && statuses_[k].MPI_ERROR != MPI_SUCCESS) {
      FailLocked(*op, absl::UnavailableError(
                          absl::StrCat(op->state->name(), ": ", ErrorString(statuses_[k].MPI_ERROR))));
    }
    if (--op->pending == 0 && !op->failed) FinishLocked(op);
  }
  // MPI nulls the handles of completed requests; keep only the live ones.
  size_t w = 0;
  for (size_t i = 0; i < reqs_.size(); ++i) {
    if (reqs_[i] == MPI_REQUEST_NULL) continue;
    reqs_[w] = reqs_[i];
    owners_[w] = std::move(owners_[i]);
    cancellable_[w] = cancellable_[i];
    ++w;
  }
  reqs_.resize(w);
  owners_.resize(w);
  cancellable_.resize(w);
  return outcount > 0;
}

void Engine::AbandonInflight() {
  // MPI may still read and write through these requests: their count arrays (owned by the
  // ops) must outlive them, so the ops are leaked on purpose.
  new std::vector<std::shared_ptr<Op>>(std::move(owners_));
  owners_.clear();
  reqs_.clear();
  cancellable_.clear();
}

void Engine::CancelReceivesLocked() {
  for (size_t i = 0; i < reqs_.size(); ++i) {
    if (!cancellable_[i] || !owners_[i]->state->done()) continue;
    cancellable_[i] = false;
    MPI_Cancel(&reqs_[i]);  // completes the request (as cancelled, or received after all)
  }
}

bool Engine::Drain(absl::Duration limit) {
  const absl::Time deadline = absl::Now() + limit;
  for (;;) {
    {
      absl::MutexLock l(&mpi_mu_);
      if (!tracker_->healthy()) CancelReceivesLocked();
      ProgressLocked();
      if (reqs_.empty()) return true;
    }
    if (absl::Now() >= deadline) return false;
    absl::SleepFor(absl::Microseconds(20));
  }
}

void Engine::FreeMpiObjects() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized) return;  // the host finalised first; MPI freed everything
  MPI_Op_free(&bf16_sum_);
  MPI_Comm_free(&comm_);
}

void Engine::Shutdown() {
  if (shut_down_) return;
  shut_down_ = true;
  const absl::Duration limit = tracker_->healthy()
                                   ? tracker_->timeout()
                                   : std::min(tracker_->timeout(), absl::Seconds(1));
  const absl::Status late = absl::DeadlineExceededError(absl::StrCat(
      "the communicator was destroyed with operations that did not complete within ",
      absl::ToDoubleSeconds(limit), " s"));
  bool clean = false;
  if (mode_ == Mode::kThread && thread_.joinable()) {
    {
      absl::MutexLock l(&queue_mu_);
      stop_ = true;
    }
    if (!thread_exited_.WaitForNotificationWithTimeout(limit)) {
      {
        absl::MutexLock l(&queue_mu_);
        abandon_ = true;
      }
      if (!thread_exited_.WaitForNotificationWithTimeout(absl::Milliseconds(200))) {
        // Stuck inside an MPI call: it holds a reference to this engine, so detaching is
        // safe; its requests, communicator and MPI itself are left as they are.
        tracker_->Break(late);
        thread_.detach();
        Leak();
        return;
      }
    }
    thread_.join();
    absl::MutexLock l(&queue_mu_);
    clean = !inflight_;
  } else {
    clean = Drain(limit);
  }
  if (!clean) {
    tracker_->Break(late);
    absl::MutexLock l(&mpi_mu_);
    AbandonInflight();
    Leak();
    return;
  }
  FreeMpiObjects();
  Release();
}

}  // namespace mdopt::mpi
