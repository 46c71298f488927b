#include "comm/op_state.h"

namespace mdopt {

bool OpState::BeginFinish() {
  absl::MutexLock l(&mu_);
  if (phase_ != Phase::kPending) return false;
  phase_ = Phase::kFinishing;
  return true;
}

bool OpState::Complete(absl::Status s) {
  absl::MutexLock l(&mu_);
  if (phase_ == Phase::kDone) return false;
  phase_ = Phase::kDone;
  status_ = std::move(s);
  return true;
}

bool OpState::Fail(absl::Status s) {
  absl::MutexLock l(&mu_);
  if (phase_ != Phase::kPending) return false;
  phase_ = Phase::kDone;
  status_ = std::move(s);
  return true;
}

bool OpState::WaitUntil(absl::Time deadline) const {
  absl::MutexLock l(&mu_);
  auto is_done = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return phase_ == Phase::kDone; };
  return mu_.AwaitWithDeadline(absl::Condition(&is_done), deadline);
}

bool OpState::done() const {
  absl::MutexLock l(&mu_);
  return phase_ == Phase::kDone;
}

absl::Status OpState::status() const {
  absl::MutexLock l(&mu_);
  return status_;
}

}  // namespace mdopt
