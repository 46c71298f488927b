// The book-keeping every backend shares: the operations in flight, the communicator's
// health (ok, broken, aborted), the timeout, and CommStats. A backend builds and drives the
// operations; this decides how they end.
//
// It also owns every piece of memory an operation needs, recycled so that a steady stream of
// operations allocates nothing once the pools have grown to the stream's high-water mark
// (the first optimizer step): the operation records (OpState, on a free list), each record's
// scratch block (the backend's plain data: MPI arguments, count arrays, a point-to-point
// group; blocks of power-of-two sizes on per-size free lists), and the memory of the
// Requests themselves (std::allocate_shared with PoolAllocator: the shared_ptr's control
// block and the Request share one pooled block). A record is recycled when both its Request
// and its backend have let go of it. A successful operation's backend lets go in the same
// step that marks it done (Complete), before any waiter can see it done, so a record goes
// back exactly when its last Request is dropped: the pools' high-water mark is a property of
// the caller's program (how many requests it keeps at once), not of thread timing.
//
// One mutex guards all of it; waiters block on it with a condition on their record.
#ifndef MDOPT_COMM_OP_TRACKER_H_
#define MDOPT_COMM_OP_TRACKER_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "comm/communicator.h"
#include "comm/op_state.h"

namespace mdopt {

class OpTracker;

// Allocates from an OpTracker's block pool; keeps the tracker alive, so memory handed out
// (a Request's control block) can be given back after the communicator is gone.
template <typename T>
class PoolAllocator {
 public:
  using value_type = T;
  explicit PoolAllocator(std::shared_ptr<OpTracker> tracker) : tracker_(std::move(tracker)) {}
  template <typename U>
  PoolAllocator(const PoolAllocator<U>& other) : tracker_(other.tracker_) {}  // NOLINT: rebind

  T* allocate(std::size_t n);
  void deallocate(T* p, std::size_t n);

  template <typename U>
  bool operator==(const PoolAllocator<U>& o) const { return tracker_ == o.tracker_; }
  template <typename U>
  bool operator!=(const PoolAllocator<U>& o) const { return tracker_ != o.tracker_; }

 private:
  template <typename U>
  friend class PoolAllocator;
  std::shared_ptr<OpTracker> tracker_;
};

// Owned by a std::shared_ptr (Requests made by MakeRequest hold it through their allocator).
class OpTracker : public std::enable_shared_from_this<OpTracker> {
 public:
  // `where` names the communicator in messages, e.g. "mpi rank 1 of 4".
  explicit OpTracker(std::string where) : where_(std::move(where)) {}
  ~OpTracker();
  OpTracker(const OpTracker&) = delete;
  OpTracker& operator=(const OpTracker&) = delete;

  void SetTimeout(absl::Duration timeout);
  absl::Duration timeout() const;

  // Registers a new operation: counts it in the stats, opens its busy interval, and hands out
  // a record held by the user and the backend, with `scratch_bytes` of scratch storage and
  // `handles` transport handles counted against it (see handles_high_water). Fails fast when
  // the communicator is broken or aborted.
  absl::StatusOr<OpState*> Begin(const OpLabel& label, int64_t bytes, size_t scratch_bytes = 0,
                                 int64_t handles = 0);
  // The most transport handles that records not yet recycled have counted at once. A backend
  // that keeps its in-flight handles in flat arrays sizes them by this, so that how fast the
  // transport completes requests never makes them grow.
  int64_t handles_high_water() const;

  // A Request of type R built from `args`, in a pooled block.
  template <typename R, typename... Args>
  RequestPtr MakeRequest(Args&&... args) {
    return std::allocate_shared<R>(PoolAllocator<R>(shared_from_this()),
                                   std::forward<Args>(args)...);
  }

  // Pending -> finishing; false when it already failed or finished (the backend must then
  // still Release it).
  bool BeginFinish(OpState& op);
  // Pending or finishing -> done with `s`, and the backend lets go of the record (in the same
  // step: see above). True when this call ended the op.
  bool Complete(OpState& op, absl::Status s);
  // Pending -> done with `s` (an error); false when finishing or done. The holders keep it.
  bool Fail(OpState& op, absl::Status s);
  // `who` lets go; the record is recycled once nobody holds it.
  void Release(OpState& op, OpHolder who);

  bool done(const OpState& op) const;
  absl::Status status(const OpState& op) const;  // meaningful once done
  // "all-reduce #3 (16 x f64, sum) on mpi rank 0 of 2", for messages.
  std::string Name(const OpState& op) const;

  // Blocks until `op` is done or the timeout (counted from now) passes. `drive`, when set, is
  // called repeatedly with `arg` to make progress (caller-driven backends); otherwise another
  // thread completes the op. A timeout fails the op with DeadlineExceeded and breaks the
  // communicator. The time spent here is wait_seconds.
  absl::Status Wait(OpState& op, void (*drive)(void*) = nullptr, void* arg = nullptr);

  // Marks the communicator broken (the first cause is kept) and fails every pending op.
  void Break(const absl::Status& cause);
  // Marks it aborted and fails every pending op with Aborted.
  void Abort(absl::string_view reason);
  // OK, or the error every later operation gets.
  absl::Status health() const;
  bool healthy() const;

  CommStats stats() const;
  const std::string& where() const { return where_; }

 private:
  template <typename T>
  friend class PoolAllocator;
  void* AllocateBlock(size_t bytes);
  void FreeBlock(void* p, size_t bytes);

  absl::Status HealthLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void* PopBlockLocked(int cls) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void PushBlockLocked(void* p, int cls) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void EndLocked(OpState& op, absl::Status s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RecycleLocked(OpState& op) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void FailAllPendingLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Block sizes are 2^kMinClass .. 2^(kClasses - 1) bytes.
  static constexpr int kMinClass = 6, kClasses = 48;

  const std::string where_;
  mutable absl::Mutex mu_;
  absl::Duration timeout_ ABSL_GUARDED_BY(mu_) = absl::Seconds(600);
  uint64_t next_seq_ ABSL_GUARDED_BY(mu_) = 0;
  OpState* pending_ ABSL_GUARDED_BY(mu_) = nullptr;  // not yet done, most recent first
  int64_t pending_count_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<std::unique_ptr<OpState>> records_ ABSL_GUARDED_BY(mu_);
  OpState* free_records_ ABSL_GUARDED_BY(mu_) = nullptr;
  std::vector<void*> blocks_ ABSL_GUARDED_BY(mu_);  // every block, freed at destruction
  void* free_blocks_[kClasses] ABSL_GUARDED_BY(mu_) = {};
  int64_t live_handles_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t handles_high_water_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Status broken_ ABSL_GUARDED_BY(mu_);
  bool aborted_ ABSL_GUARDED_BY(mu_) = false;
  std::string abort_reason_ ABSL_GUARDED_BY(mu_);
  CommStats stats_ ABSL_GUARDED_BY(mu_);
  absl::Time busy_since_ ABSL_GUARDED_BY(mu_);
};

template <typename T>
T* PoolAllocator<T>::allocate(std::size_t n) {
  static_assert(alignof(T) <= __STDCPP_DEFAULT_NEW_ALIGNMENT__, "pool blocks are new-aligned");
  return static_cast<T*>(tracker_->AllocateBlock(n * sizeof(T)));
}

template <typename T>
void PoolAllocator<T>::deallocate(T* p, std::size_t n) {
  tracker_->FreeBlock(p, n * sizeof(T));
}

}  // namespace mdopt

#endif  // MDOPT_COMM_OP_TRACKER_H_
