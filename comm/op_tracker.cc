#include "comm/op_tracker.h"

#include <vector>

#include "absl/strings/str_cat.h"

namespace mdopt {

void OpTracker::SetTimeout(absl::Duration timeout) {
  absl::MutexLock l(&mu_);
  timeout_ = timeout;
}

absl::Duration OpTracker::timeout() const {
  absl::MutexLock l(&mu_);
  return timeout_;
}

absl::Status OpTracker::health() const {
  absl::MutexLock l(&mu_);
  if (aborted_) return absl::AbortedError(absl::StrCat("communicator aborted: ", abort_reason_));
  if (!broken_.ok()) {
    return absl::UnavailableError(absl::StrCat("communicator is broken: ", broken_.ToString()));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<OpState>> OpTracker::Begin(absl::string_view what,
                                                          absl::string_view detail,
                                                          int64_t bytes) {
  if (absl::Status s = health(); !s.ok()) return s;
  absl::MutexLock l(&mu_);
  const uint64_t seq = next_seq_++;
  auto op = std::make_shared<OpState>(seq, absl::StrCat(what, " #", seq, detail, " on ", where_));
  if (pending_.empty()) busy_since_ = absl::Now();
  pending_.emplace(seq, op);
  stats_.ops += 1;
  stats_.bytes_sent += bytes;
  return op;
}

void OpTracker::Ended(uint64_t seq) {
  absl::MutexLock l(&mu_);
  if (pending_.erase(seq) == 1 && pending_.empty()) {
    stats_.busy_seconds += absl::ToDoubleSeconds(absl::Now() - busy_since_);
  }
}

bool OpTracker::Complete(OpState& op, absl::Status s) {
  if (!op.Complete(std::move(s))) return false;
  Ended(op.seq());
  return true;
}

bool OpTracker::Fail(OpState& op, absl::Status s) {
  if (!op.Fail(std::move(s))) return false;
  Ended(op.seq());
  return true;
}

absl::Status OpTracker::Wait(const std::shared_ptr<OpState>& op,
                             const std::function<void()>& drive) {
  const absl::Time start = absl::Now();
  const absl::Duration limit = timeout();
  const absl::Time deadline = start + limit;
  bool done = false;
  if (!drive) {
    done = op->WaitUntil(deadline);
  } else {
    // Spin briefly (most waits end within microseconds once the peers arrive), then back off
    // so that a caller waiting on slow peers does not take a core from them.
    for (int round = 0;; ++round) {
      drive();
      if ((done = op->done())) break;
      if (absl::Now() >= deadline) break;
      if (round > 200) absl::SleepFor(absl::Microseconds(20));
    }
  }
  if (!done) {
    absl::Status late = absl::DeadlineExceededError(absl::StrCat(
        op->name(), " did not complete within comm_timeout_s=", absl::ToDoubleSeconds(limit),
        " (a peer may have skipped it, called another operation or died); the communicator "
        "is now broken"));
    if (Fail(*op, late)) {
      Break(late);
    } else {
      op->WaitUntil(absl::InfiniteFuture());  // being finished right now: a matter of microseconds
    }
  }
  {
    absl::MutexLock l(&mu_);
    stats_.wait_seconds += absl::ToDoubleSeconds(absl::Now() - start);
  }
  return op->status();
}

void OpTracker::FailAllPending() {
  const absl::Status why = health();
  std::vector<std::shared_ptr<OpState>> ops;
  {
    absl::MutexLock l(&mu_);
    for (auto& [seq, op] : pending_) ops.push_back(op);
  }
  for (auto& op : ops) Fail(*op, why);
}

void OpTracker::Break(const absl::Status& cause) {
  {
    absl::MutexLock l(&mu_);
    if (!broken_.ok()) return;
    broken_ = cause;
  }
  FailAllPending();
}

void OpTracker::Abort(absl::string_view reason) {
  {
    absl::MutexLock l(&mu_);
    if (aborted_) return;
    aborted_ = true;
    abort_reason_ = std::string(reason);
  }
  FailAllPending();
}

CommStats OpTracker::stats() const {
  absl::MutexLock l(&mu_);
  CommStats s = stats_;
  if (!pending_.empty()) s.busy_seconds += absl::ToDoubleSeconds(absl::Now() - busy_since_);
  return s;
}

}  // namespace mdopt
