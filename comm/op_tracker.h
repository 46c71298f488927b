// The book-keeping every backend shares: the operations in flight, the communicator's
// health (ok, broken, aborted), the timeout, and CommStats. A backend builds and drives the
// operations; this decides how they end.
#ifndef MDOPT_COMM_OP_TRACKER_H_
#define MDOPT_COMM_OP_TRACKER_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "comm/communicator.h"
#include "comm/op_state.h"

namespace mdopt {

class OpTracker {
 public:
  // `where` names the communicator in messages, e.g. "mpi rank 1 of 4".
  explicit OpTracker(std::string where) : where_(std::move(where)) {}

  void SetTimeout(absl::Duration timeout);
  absl::Duration timeout() const;

  // Registers a new operation ("all-reduce", " (1024 x f32, sum)"): counts it in the stats
  // and opens its busy interval. Fails fast when the communicator is broken or aborted.
  absl::StatusOr<std::shared_ptr<OpState>> Begin(absl::string_view what,
                                                 absl::string_view detail, int64_t bytes);
  // Ends `op` (see OpState); true when this call ended it.
  bool Complete(OpState& op, absl::Status s);
  bool Fail(OpState& op, absl::Status s);

  // Blocks until `op` is done or the timeout (counted from now) passes. `drive`, when set, is
  // called repeatedly to make progress (caller-driven backends); otherwise another thread
  // completes the op. A timeout fails the op with DeadlineExceeded and breaks the
  // communicator. The time spent here is wait_seconds.
  absl::Status Wait(const std::shared_ptr<OpState>& op, const std::function<void()>& drive);

  // Marks the communicator broken (the first cause is kept) and fails every pending op.
  void Break(const absl::Status& cause);
  // Marks it aborted and fails every pending op with Aborted.
  void Abort(absl::string_view reason);
  // OK, or the error every later operation gets.
  absl::Status health() const;
  bool healthy() const { return health().ok(); }

  CommStats stats() const;
  const std::string& where() const { return where_; }

 private:
  void Ended(uint64_t seq);
  void FailAllPending();

  const std::string where_;
  mutable absl::Mutex mu_;
  absl::Duration timeout_ ABSL_GUARDED_BY(mu_) = absl::Seconds(600);
  uint64_t next_seq_ ABSL_GUARDED_BY(mu_) = 0;
  std::map<uint64_t, std::shared_ptr<OpState>> pending_ ABSL_GUARDED_BY(mu_);
  absl::Status broken_ ABSL_GUARDED_BY(mu_);
  bool aborted_ ABSL_GUARDED_BY(mu_) = false;
  std::string abort_reason_ ABSL_GUARDED_BY(mu_);
  CommStats stats_ ABSL_GUARDED_BY(mu_);
  absl::Time busy_since_ ABSL_GUARDED_BY(mu_);
};

}  // namespace mdopt

#endif  // MDOPT_COMM_OP_TRACKER_H_
