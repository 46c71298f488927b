#include "comm/op_tracker.h"

#include <chrono>
#include <new>

#include "absl/strings/str_cat.h"

namespace mdopt {
namespace {

// The smallest class whose blocks hold `bytes`.
int ClassOf(size_t bytes, int min_class) {
  int c = min_class;
  while ((size_t{1} << c) < bytes) ++c;
  return c;
}

}  // namespace

OpTracker::~OpTracker() {
  for (void* b : blocks_) ::operator delete(b);
}

void OpTracker::SetTimeout(absl::Duration timeout) {
  absl::MutexLock l(&mu_);
  timeout_ = timeout;
}

absl::Duration OpTracker::timeout() const {
  absl::MutexLock l(&mu_);
  return timeout_;
}

absl::Status OpTracker::HealthLocked() const {
  if (aborted_) return absl::AbortedError(absl::StrCat("communicator aborted: ", abort_reason_));
  if (!broken_.ok()) {
    return absl::UnavailableError(absl::StrCat("communicator is broken: ", broken_.ToString()));
  }
  return absl::OkStatus();
}

absl::Status OpTracker::health() const {
  absl::MutexLock l(&mu_);
  return HealthLocked();
}

bool OpTracker::healthy() const {
  absl::MutexLock l(&mu_);
  return !aborted_ && broken_.ok();
}

void* OpTracker::PopBlockLocked(int cls) {
  if (void* b = free_blocks_[cls]) {
    free_blocks_[cls] = *static_cast<void**>(b);
    return b;
  }
  // Grows: the first time this many blocks of this size are out at once.
  blocks_.push_back(nullptr);
  void* b = ::operator new(size_t{1} << cls, std::nothrow);
  if (b == nullptr) {
    blocks_.pop_back();
    throw std::bad_alloc();
  }
  blocks_.back() = b;
  return b;
}

void OpTracker::PushBlockLocked(void* p, int cls) {
  *static_cast<void**>(p) = free_blocks_[cls];
  free_blocks_[cls] = p;
}

void* OpTracker::AllocateBlock(size_t bytes) {
  absl::MutexLock l(&mu_);
  return PopBlockLocked(ClassOf(bytes, kMinClass));
}

void OpTracker::FreeBlock(void* p, size_t bytes) {
  absl::MutexLock l(&mu_);
  PushBlockLocked(p, ClassOf(bytes, kMinClass));
}

absl::StatusOr<OpState*> OpTracker::Begin(const OpLabel& label, int64_t bytes,
                                          size_t scratch_bytes, int64_t handles) {
  absl::MutexLock l(&mu_);
  if (absl::Status s = HealthLocked(); !s.ok()) return s;
  // Storage first: running out of memory here leaves the tracker as it was.
  const int cls = scratch_bytes > 0 ? ClassOf(scratch_bytes, kMinClass) : -1;
  void* scratch = cls >= 0 ? PopBlockLocked(cls) : nullptr;
  if (free_records_ == nullptr) {
    try {
      records_.push_back(std::make_unique<OpState>());
    } catch (...) {
      if (scratch != nullptr) PushBlockLocked(scratch, cls);
      throw;
    }
    records_.back()->next_ = nullptr;
    free_records_ = records_.back().get();
  }
  OpState* op = free_records_;
  free_records_ = op->next_;
  op->seq_ = next_seq_++;
  op->label_ = label;
  op->phase_ = OpState::Phase::kPending;
  op->holders_ = kUserHolder | kBackendHolder;
  op->status_ = absl::OkStatus();
  op->handles_ = handles;
  op->scratch_class_ = cls;
  op->scratch_ = scratch;
  live_handles_ += handles;
  if (live_handles_ > handles_high_water_) handles_high_water_ = live_handles_;
  op->prev_ = nullptr;
  op->next_ = pending_;
  if (pending_ != nullptr) pending_->prev_ = op;
  pending_ = op;
  if (pending_count_++ == 0) busy_since_ = absl::Now();
  stats_.ops += 1;
  stats_.bytes_sent += bytes;
  return op;
}

int64_t OpTracker::handles_high_water() const {
  absl::MutexLock l(&mu_);
  return handles_high_water_;
}

void OpTracker::EndLocked(OpState& op, absl::Status s) {
  op.phase_ = OpState::Phase::kDone;
  op.status_ = std::move(s);
  if (op.prev_ != nullptr) {
    op.prev_->next_ = op.next_;
  } else {
    pending_ = op.next_;
  }
  if (op.next_ != nullptr) op.next_->prev_ = op.prev_;
  op.prev_ = op.next_ = nullptr;
  if (--pending_count_ == 0) stats_.busy_seconds += absl::ToDoubleSeconds(absl::Now() - busy_since_);
}

void OpTracker::RecycleLocked(OpState& op) {
  op.status_ = absl::OkStatus();
  if (op.scratch_ != nullptr) PushBlockLocked(op.scratch_, op.scratch_class_);
  op.scratch_ = nullptr;
  live_handles_ -= op.handles_;
  op.handles_ = 0;
  op.next_ = free_records_;
  free_records_ = &op;
}

bool OpTracker::BeginFinish(OpState& op) {
  absl::MutexLock l(&mu_);
  if (op.phase_ != OpState::Phase::kPending) return false;
  op.phase_ = OpState::Phase::kFinishing;
  return true;
}

bool OpTracker::Complete(OpState& op, absl::Status s) {
  absl::MutexLock l(&mu_);
  const bool ended = op.phase_ != OpState::Phase::kDone;
  if (ended) EndLocked(op, std::move(s));
  op.holders_ &= ~kBackendHolder;
  if (op.holders_ == 0) RecycleLocked(op);
  return ended;
}

bool OpTracker::Fail(OpState& op, absl::Status s) {
  absl::MutexLock l(&mu_);
  if (op.phase_ != OpState::Phase::kPending) return false;
  EndLocked(op, std::move(s));
  return true;
}

void OpTracker::Release(OpState& op, OpHolder who) {
  absl::MutexLock l(&mu_);
  op.holders_ &= ~who;
  if (op.holders_ != 0) return;
  // Both let go of an op nobody ended (a backend that gave up before starting it).
  if (op.phase_ != OpState::Phase::kDone) EndLocked(op, absl::CancelledError("released unfinished"));
  RecycleLocked(op);
}

bool OpTracker::done(const OpState& op) const {
  absl::MutexLock l(&mu_);
  return op.phase_ == OpState::Phase::kDone;
}

absl::Status OpTracker::status(const OpState& op) const {
  absl::MutexLock l(&mu_);
  return op.status_;
}

std::string OpTracker::Name(const OpState& op) const {
  OpLabel label;
  uint64_t seq;
  {
    absl::MutexLock l(&mu_);
    label = op.label_;
    seq = op.seq_;
  }
  return absl::StrCat(label.what, " #", seq, label.Format(), " on ", where_);
}

absl::Status OpTracker::Wait(OpState& op, void (*drive)(void*), void* arg) {
  const absl::Time start = absl::Now();
  const absl::Duration limit = timeout();
  // The limit is measured on the monotonic clock: absl's deadlines follow the wall clock,
  // which a time daemon may slew or step, and a wait that gives up early breaks the
  // communicator for nothing (seen: 0.995 s of a 1 s limit on a VM).
  const auto mono_start = std::chrono::steady_clock::now();
  auto elapsed = [&mono_start] {
    return absl::FromChrono(std::chrono::steady_clock::now() - mono_start);
  };
  auto is_done = [&op]() { return op.phase_ == OpState::Phase::kDone; };
  bool done_in_time = false;
  if (drive == nullptr) {
    absl::MutexLock l(&mu_);
    while (!(done_in_time = mu_.AwaitWithTimeout(absl::Condition(&is_done), limit - elapsed())) &&
           elapsed() < limit) {
    }
  } else {
    // Spin briefly (most waits end within microseconds once the peers arrive), then back off
    // so that a caller waiting on slow peers does not take a core from them.
    for (int round = 0;; ++round) {
      drive(arg);
      if ((done_in_time = done(op))) break;
      if (elapsed() >= limit) break;
      if (round > 200) absl::SleepFor(absl::Microseconds(20));
    }
  }
  if (!done_in_time) {
    absl::Status late = absl::DeadlineExceededError(absl::StrCat(
        Name(op), " did not complete within comm_timeout_s=", absl::ToDoubleSeconds(limit),
        " (a peer may have skipped it, called another operation or died); the communicator "
        "is now broken"));
    if (Fail(op, late)) {
      Break(late);
    } else {
      // Being finished right now: a matter of microseconds.
      absl::MutexLock l(&mu_);
      mu_.Await(absl::Condition(&is_done));
    }
  }
  absl::MutexLock l(&mu_);
  stats_.wait_seconds += absl::ToDoubleSeconds(absl::Now() - start);
  return op.status_;
}

void OpTracker::FailAllPendingLocked() {
  const absl::Status why = HealthLocked();
  for (OpState* op = pending_; op != nullptr;) {
    OpState* next = op->next_;
    if (op->phase_ == OpState::Phase::kPending) EndLocked(*op, why);
    op = next;
  }
}

void OpTracker::Break(const absl::Status& cause) {
  absl::MutexLock l(&mu_);
  if (!broken_.ok()) return;
  broken_ = cause;
  FailAllPendingLocked();
}

void OpTracker::Abort(absl::string_view reason) {
  absl::MutexLock l(&mu_);
  if (aborted_) return;
  aborted_ = true;
  abort_reason_ = std::string(reason);
  FailAllPendingLocked();
}

CommStats OpTracker::stats() const {
  absl::MutexLock l(&mu_);
  CommStats s = stats_;
  if (pending_count_ > 0) s.busy_seconds += absl::ToDoubleSeconds(absl::Now() - busy_since_);
  return s;
}

}  // namespace mdopt
