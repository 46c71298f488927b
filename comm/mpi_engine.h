// Drives mdopt's MPI requests. Internal: includes mpi.h.
//
// Two progress modes, chosen by the thread level MPI provides:
//  - "thread" (MPI_THREAD_MULTIPLE): a progress thread owns every MPI call on mdopt's
//    communicator. It takes submitted operations from a queue in submission order (so the
//    order of MPI calls is the order of submission, the same on every rank), starts them and
//    drives all in-flight requests with MPI_Testsome; when nothing completed it spins a few
//    rounds, then sleeps ~30 us, and it blocks on a condition variable when idle, so it does
//    not burn a core. Waiters block on the tracker's mutex with a condition on their
//    operation. Communication overlaps whatever the caller computes meanwhile.
//  - "caller" (FUNNELED, SERIALIZED or SINGLE, when the host initialised MPI so): operations
//    start when submitted and make progress only inside Wait and Test (MPI_Testsome over all
//    in-flight requests), under a mutex. Every call into the communicator (submission, Wait,
//    Test, destruction) must then come from a thread the host's level allows to call MPI
//    (the main thread for FUNNELED). Overlap depends on MPI's own asynchronous progress.
//
// Shutdown drains: up to the timeout when healthy, up to min(timeout, 1 s) when broken or
// aborted (pending receives are then cancelled; collectives cannot be). Requests that still
// have not completed are abandoned with their buffers (and the tracker that holds their
// count arrays is kept alive for good), the progress thread is detached if it does not stop,
// and MPI is then not finalised at exit (see mpi_runtime.h); a job in that state should end
// with MPI_Abort.
//
// Nothing here allocates per operation: an operation is plain data (Op) in its record's
// scratch block, the submission queue is a list threaded through those blocks, and the flat
// arrays of in-flight MPI requests are reserved, at submission, for the most MPI requests
// the tracker's live records have ever counted (OpTracker::handles_high_water), which bounds
// what can be in flight however fast MPI completes.
#ifndef MDOPT_COMM_MPI_ENGINE_H_
#define MDOPT_COMM_MPI_ENGINE_H_

#include <mpi.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "comm/communicator.h"
#include "comm/op_state.h"
#include "comm/op_tracker.h"

namespace mdopt::mpi {

enum class OpKind : uint8_t {
  kReduceScatterBlock,
  kReduceScatterV,
  kAllGather,
  kAllGatherV,
  kAllReduce,
  kBroadcast,
  kSendRecv,
  kBarrier,
  // More elements (or displacements) than one MPI call takes (mpi_max_count.h): `chunks`
  // calls of at most `limit` elements, each a request of the op. Reduce-scatter and
  // all-gather split the rank-major concatenation of every rank's segment into consecutive
  // ranges of `limit` elements (a rank's share of a range is where its segment meets it), so
  // each chunk is the same collective over a contiguous range and reduces every element in
  // the same order as one call would.
  kReduceScatterChunked,
  kAllGatherChunked,
  kAllReduceChunked,
  kBroadcastChunked,
};

// One operation as plain data, placed in its record's scratch block by the communicator,
// with the arrays MPI reads until the requests complete (counts, displacements, a group)
// after it in the same block. Never destroyed: the block is simply recycled.
struct Op {
  OpState* state = nullptr;
  OpKind kind = OpKind::kBarrier;
  const void* send = nullptr;  // MPI_IN_PLACE already substituted
  void* recv = nullptr;
  int count = 0;  // elements per rank (block forms), or of the all-reduce / broadcast
  MPI_Datatype type = MPI_DATATYPE_NULL;
  MPI_Op reduce = MPI_OP_NULL;
  int root = 0;
  int tag = 0;
  const int* counts = nullptr;  // the v-forms: size() ints each
  const int* displs = nullptr;
  const P2P* group = nullptr;   // send/recv
  int group_size = 0;
  // Chunked forms (and send/recv, whose messages are split at `limit` too): the element
  // size, the whole count (all-reduce, broadcast), and for reduce-scatter / all-gather
  // per chunk j the ranks' counts and displacements within the chunk at chunk_ints + 2pj
  // (p ints each) and this rank's offset in its own segment at chunk_offsets[j].
  int64_t limit = 0;
  size_t elem_bytes = 0;
  int64_t total = 0;
  int chunks = 0;
  int nranks = 0;
  int rank = 0;
  const int* chunk_ints = nullptr;
  const int64_t* chunk_offsets = nullptr;
  // Runs once after every request completed successfully: a mean's division.
  int divide_by = 0;  // 0: nothing to do
  int64_t divide_count = 0;
  DataType divide_dtype = DataType::kF32;
  // How many MPI requests Post makes (the record's handles), and how many of the first of
  // them are receives: MPI can cancel those (not collectives), which lets a broken
  // communicator's destruction drain them.
  int requests = 0;
  int receives = 0;
  int pending = 0;      // requests not yet complete; engine-owned
  bool failed = false;  // an MPI error ended it; engine-owned
  Op* next = nullptr;   // the submission queue; engine-owned
};

// MPI's type for a dtype (bf16 travels as MPI_UINT16_T).
MPI_Datatype ToMpi(DataType dtype);

class Engine : public std::enable_shared_from_this<Engine> {
 public:
  enum class Mode { kThread, kCaller };

  // Takes ownership of `comm` and `bf16_sum`.
  Engine(MPI_Comm comm, MPI_Op bf16_sum, Mode mode, std::shared_ptr<OpTracker> tracker);
  ~Engine();

  void StartThread();  // thread mode, once

  // Queues (thread) or starts (caller) `op`, whose record the tracker already began.
  absl::StatusOr<RequestPtr> Submit(Op& op);
  absl::Status Wait(OpState& op);
  absl::StatusOr<bool> Test(OpState& op);
  // Drains, stops the thread and frees the MPI objects (see above). Called once.
  void Shutdown();

  Mode mode() const { return mode_; }
  MPI_Op bf16_sum() const { return bf16_sum_; }
  OpTracker& tracker() { return *tracker_; }

 private:
  void Run();
  static void DriveThunk(void* self);
  void ReserveLocked(int64_t handles) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mpi_mu_);
  int PostLocked(Op& op) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mpi_mu_);  // an MPI error code
  void StartLocked(Op& op) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mpi_mu_);
  bool ProgressLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mpi_mu_);  // true when something completed
  void FinishLocked(Op& op) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mpi_mu_);
  void FailLocked(Op& op, absl::Status s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mpi_mu_);
  bool Drain(absl::Duration limit);  // caller mode; true when nothing is left in flight
  void FreeMpiObjects();
  void AbandonInflight() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mpi_mu_);
  // Broken or aborted, shutting down: cancels the receives of failed ops (their sender may
  // never come), so that only collectives can keep the drain waiting.
  void CancelReceivesLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mpi_mu_);
  bool HasWork() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(queue_mu_) {
    return queue_head_ != nullptr || stop_ || abandon_;
  }

  MPI_Comm comm_;
  MPI_Op bf16_sum_;
  const Mode mode_;
  std::shared_ptr<OpTracker> tracker_;

  // The in-flight MPI requests, flat for MPI_Testsome, with the op each belongs to; all five
  // arrays have capacity for `reserved_` requests.
  absl::Mutex mpi_mu_;
  std::vector<MPI_Request> reqs_ ABSL_GUARDED_BY(mpi_mu_);
  std::vector<Op*> owners_ ABSL_GUARDED_BY(mpi_mu_);
  std::vector<uint8_t> cancellable_ ABSL_GUARDED_BY(mpi_mu_);  // a receive not yet cancelled
  std::vector<int> done_ ABSL_GUARDED_BY(mpi_mu_);  // MPI_Testsome's outputs, reused
  std::vector<MPI_Status> statuses_ ABSL_GUARDED_BY(mpi_mu_);
  std::atomic<int64_t> reserved_{0};  // written under mpi_mu_

  // Thread mode: submissions not yet started (in order), and the stop protocol.
  absl::Mutex queue_mu_;
  Op* queue_head_ ABSL_GUARDED_BY(queue_mu_) = nullptr;
  Op* queue_tail_ ABSL_GUARDED_BY(queue_mu_) = nullptr;
  bool stop_ ABSL_GUARDED_BY(queue_mu_) = false;     // drain, then exit
  bool abandon_ ABSL_GUARDED_BY(queue_mu_) = false;  // exit now
  bool inflight_ ABSL_GUARDED_BY(queue_mu_) = false;  // requests left when the thread exited
  std::thread thread_;
  absl::Notification thread_exited_;
  bool shut_down_ = false;
};

}  // namespace mdopt::mpi

#endif  // MDOPT_COMM_MPI_ENGINE_H_
