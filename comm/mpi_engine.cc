#include "comm/mpi_engine.h"

#include <algorithm>
#include <new>

#include "absl/strings/str_cat.h"
#include "comm/host_reduce.h"
#include "comm/mpi_runtime.h"

namespace mdopt::mpi {
namespace {

// Testsome rounds without a completion before the progress thread starts sleeping: long
// enough to catch the quick completions of small messages, short enough not to hog a core.
constexpr int kSpinRounds = 64;

// Lives in a pooled block of the tracker (OpTracker::MakeRequest); lets go of its record
// when the last copy of the RequestPtr is dropped.
class MpiRequest final : public Request {
 public:
  MpiRequest(std::shared_ptr<Engine> engine, OpState* op) : engine_(std::move(engine)), op_(op) {}
  ~MpiRequest() override { engine_->tracker().Release(*op_, kUserHolder); }
  absl::Status Wait() override { return engine_->Wait(*op_); }
  absl::StatusOr<bool> Test() override { return engine_->Test(*op_); }

 private:
  std::shared_ptr<Engine> engine_;
  OpState* op_;
};

}  // namespace

MPI_Datatype ToMpi(DataType dtype) {
  switch (dtype) {
    case DataType::kF32: return MPI_FLOAT;
    case DataType::kBf16: return MPI_UINT16_T;
    case DataType::kF64: return MPI_DOUBLE;
    case DataType::kBytes: return MPI_BYTE;
  }
  return MPI_DATATYPE_NULL;
}

Engine::Engine(MPI_Comm comm, MPI_Op bf16_sum, Mode mode, std::shared_ptr<OpTracker> tracker)
    : comm_(comm), bf16_sum_(bf16_sum), mode_(mode), tracker_(std::move(tracker)) {}

Engine::~Engine() = default;

void Engine::StartThread() {
  thread_ = std::thread([self = shared_from_this()] { self->Run(); });
}

void Engine::ReserveLocked(int64_t handles) {
  if (handles <= reserved_.load(std::memory_order_relaxed)) return;
  // Geometric, so that a slowly rising high-water mark reserves a few times only.
  const int64_t n = std::max<int64_t>({handles, 2 * reserved_.load(std::memory_order_relaxed), 16});
  const size_t c = static_cast<size_t>(n);
  reqs_.reserve(c);
  owners_.reserve(c);
  cancellable_.reserve(c);
  done_.reserve(c);
  statuses_.reserve(c);
  reserved_.store(n, std::memory_order_relaxed);
}

absl::StatusOr<RequestPtr> Engine::Submit(Op& op) {
  RequestPtr req;
  // Room for every request that can be in flight once this one is: at most what the live
  // records count, whose maximum only grows when the caller keeps more requests at once.
  const int64_t need = tracker_->handles_high_water();
  try {
    req = tracker_->MakeRequest<MpiRequest>(shared_from_this(), op.state);
    if (need > reserved_.load(std::memory_order_relaxed)) {
      absl::MutexLock l(&mpi_mu_);
      ReserveLocked(need);
    }
  } catch (const std::bad_alloc&) {
    // Nothing started: end the op and let go of it (the Request, if made, still holds it).
    tracker_->Fail(*op.state, absl::ResourceExhaustedError("out of memory"));
    tracker_->Release(*op.state, kBackendHolder);
    if (req == nullptr) tracker_->Release(*op.state, kUserHolder);
    throw;
  }
  if (mode_ == Mode::kThread) {
    absl::MutexLock l(&queue_mu_);
    op.next = nullptr;
    if (queue_tail_ != nullptr) {
      queue_tail_->next = &op;
    } else {
      queue_head_ = &op;
    }
    queue_tail_ = &op;
  } else {
    absl::MutexLock l(&mpi_mu_);
    StartLocked(op);
  }
  return req;
}

void Engine::DriveThunk(void* self) {
  Engine* e = static_cast<Engine*>(self);
  absl::MutexLock l(&e->mpi_mu_);
  e->ProgressLocked();
}

absl::Status Engine::Wait(OpState& op) {
  if (mode_ == Mode::kThread) return tracker_->Wait(op);
  return tracker_->Wait(op, &Engine::DriveThunk, this);
}

absl::StatusOr<bool> Engine::Test(OpState& op) {
  if (mode_ == Mode::kCaller) {
    absl::MutexLock l(&mpi_mu_);
    ProgressLocked();
  }
  if (!tracker_->done(op)) return false;
  if (absl::Status s = tracker_->status(op); !s.ok()) return s;
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
    Op* fresh = nullptr;
    bool stopping = false;
    {
      absl::MutexLock l(&queue_mu_);
      // Nothing in flight: sleep until a submission or the stop request.
      if (mpi_idle) queue_mu_.Await(absl::Condition(this, &Engine::HasWork));
      if (abandon_) {
        inflight_ = !mpi_idle;  // queued ops hold no MPI resources
        break;
      }
      fresh = queue_head_;
      queue_head_ = queue_tail_ = nullptr;
      if (stop_ && fresh == nullptr && mpi_idle) break;
      stopping = stop_;
    }
    bool progressed = fresh != nullptr;
    {
      absl::MutexLock l(&mpi_mu_);
      while (fresh != nullptr) {
        Op* op = fresh;
        fresh = op->next;  // read first: starting may end (and recycle) the op
        StartLocked(*op);
      }
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

int Engine::PostLocked(Op& op) {
  MPI_Request r = MPI_REQUEST_NULL;
  int rc = MPI_SUCCESS;
  auto posted = [&](bool receive) {
    reqs_.push_back(r);  // within the reserved capacity
    owners_.push_back(&op);
    cancellable_.push_back(receive ? 1 : 0);
    ++op.pending;
  };
  switch (op.kind) {
    case OpKind::kReduceScatterBlock:
      rc = MPI_Ireduce_scatter_block(op.send, op.recv, op.count, op.type, op.reduce, comm_, &r);
      break;
    case OpKind::kReduceScatterV:
      rc = MPI_Ireduce_scatter(op.send, op.recv, op.counts, op.type, op.reduce, comm_, &r);
      break;
    case OpKind::kAllGather:
      rc = MPI_Iallgather(op.send, op.count, op.type, op.recv, op.count, op.type, comm_, &r);
      break;
    case OpKind::kAllGatherV:
      rc = MPI_Iallgatherv(op.send, op.count, op.type, op.recv, op.counts, op.displs, op.type,
                           comm_, &r);
      break;
    case OpKind::kAllReduce:
      rc = MPI_Iallreduce(op.send, op.recv, op.count, op.type, op.reduce, comm_, &r);
      break;
    case OpKind::kBroadcast:
      rc = MPI_Ibcast(op.recv, op.count, op.type, op.root, comm_, &r);
      break;
    case OpKind::kBarrier:
      rc = MPI_Ibarrier(comm_, &r);
      break;
    case OpKind::kSendRecv:
      // Receives first, so that sends find them posted; MPI keeps the order among the sends
      // (and among the receives) of one peer and tag, which is the matching rule: a message
      // split at `limit` elements arrives chunk by chunk into the receive's chunks (a send
      // and its receive have the same count, so both split alike).
      for (int pass = 0; pass < 2; ++pass) {
        for (int k = 0; k < op.group_size; ++k) {
          const P2P& p = op.group[k];
          if (p.is_send != (pass == 1)) continue;
          const MPI_Datatype t = ToMpi(p.dtype);
          const size_t es = ElementSize(p.dtype);
          int64_t done = 0;
          do {
            const int n = static_cast<int>(std::min(p.count - done, op.limit));
            char* at = static_cast<char*>(p.data) + static_cast<size_t>(done) * es;
            rc = p.is_send ? MPI_Isend(at, n, t, p.peer, op.tag, comm_, &r)
                           : MPI_Irecv(at, n, t, p.peer, op.tag, comm_, &r);
            if (rc != MPI_SUCCESS) return rc;
            posted(!p.is_send);
            done += n;
          } while (done < p.count);
        }
      }
      return MPI_SUCCESS;
    case OpKind::kReduceScatterChunked:
    case OpKind::kAllGatherChunked:
      for (int j = 0; j < op.chunks; ++j) {
        const int* counts = op.chunk_ints + 2 * static_cast<size_t>(op.nranks) * j;
        const int* displs = counts + op.nranks;
        const size_t start = static_cast<size_t>(j * op.limit) * op.elem_bytes;
        const size_t mine = static_cast<size_t>(op.chunk_offsets[j]) * op.elem_bytes;
        if (op.kind == OpKind::kReduceScatterChunked) {
          rc = MPI_Ireduce_scatter(static_cast<const char*>(op.send) + start,
                                   static_cast<char*>(op.recv) + mine, counts, op.type,
                                   op.reduce, comm_, &r);
        } else {
          const void* send = op.send == MPI_IN_PLACE
                                 ? MPI_IN_PLACE
                                 : static_cast<const char*>(op.send) + mine;
          rc = MPI_Iallgatherv(send, counts[op.rank], op.type, static_cast<char*>(op.recv) + start,
                               counts, displs, op.type, comm_, &r);
        }
        if (rc != MPI_SUCCESS) return rc;
        posted(false);
      }
      return MPI_SUCCESS;
    case OpKind::kAllReduceChunked:
    case OpKind::kBroadcastChunked:
      for (int j = 0; j < op.chunks; ++j) {
        const int64_t first = j * op.limit;
        const int n = static_cast<int>(std::min(op.total - first, op.limit));
        const size_t at = static_cast<size_t>(first) * op.elem_bytes;
        char* recv = static_cast<char*>(op.recv) + at;
        if (op.kind == OpKind::kBroadcastChunked) {
          rc = MPI_Ibcast(recv, n, op.type, op.root, comm_, &r);
        } else {
          const void* send =
              op.send == MPI_IN_PLACE ? MPI_IN_PLACE : static_cast<const char*>(op.send) + at;
          rc = MPI_Iallreduce(send, recv, n, op.type, op.reduce, comm_, &r);
        }
        if (rc != MPI_SUCCESS) return rc;
        posted(false);
      }
      return MPI_SUCCESS;
  }
  if (rc == MPI_SUCCESS) posted(false);
  return rc;
}

void Engine::StartLocked(Op& op) {
  // Broken or aborted since submission: the peers cannot be relied on to match it.
  if (!tracker_->healthy()) {
    tracker_->Fail(*op.state, tracker_->health());
    tracker_->Release(*op.state, kBackendHolder);
    return;
  }
  op.pending = 0;
  op.failed = false;
  const int rc = PostLocked(op);
  if (rc != MPI_SUCCESS) {
    FailLocked(op, absl::UnavailableError(
                       absl::StrCat(tracker_->Name(*op.state), ": ", ErrorString(rc))));
    if (op.pending == 0) tracker_->Release(*op.state, kBackendHolder);
    return;
  }
  if (op.pending == 0) FinishLocked(op);
}

void Engine::FailLocked(Op& op, absl::Status s) {
  if (op.failed) return;
  op.failed = true;
  tracker_->Fail(*op.state, s);
  tracker_->Break(s);
}

void Engine::FinishLocked(Op& op) {
  OpState& state = *op.state;
  if (!tracker_->BeginFinish(state)) {  // failed meanwhile (timeout, abort): leave the buffer
    tracker_->Release(state, kBackendHolder);
    return;
  }
  if (op.divide_by > 0) DivideInPlace(op.recv, op.divide_count, op.divide_dtype, op.divide_by);
  // Ends the op and lets go of it at once; it may be recycled from here on.
  tracker_->Complete(state, absl::OkStatus());
}

bool Engine::ProgressLocked() {
  if (reqs_.empty()) return false;
  const int n = static_cast<int>(reqs_.size());
  // Within the reserved capacity: the progress thread calls this every few tens of
  // microseconds.
  done_.resize(n);
  statuses_.resize(n);
  int outcount = 0;
  const int rc = MPI_Testsome(n, reqs_.data(), &outcount, done_.data(), statuses_.data());
  if (rc != MPI_SUCCESS && rc != MPI_ERR_IN_STATUS) {
    // MPI cannot say which request failed: everything in flight is lost.
    const absl::Status s = absl::UnavailableError(
        absl::StrCat("MPI_Testsome failed on ", tracker_->where(), ": ", ErrorString(rc)));
    for (Op* op : owners_) FailLocked(*op, s);
    AbandonInflight();
    return true;
  }
  if (outcount == MPI_UNDEFINED) outcount = 0;
  for (int k = 0; k < outcount; ++k) {
    Op& op = *owners_[done_[k]];
    if (rc == MPI_ERR_IN_STATUS && statuses_[k].MPI_ERROR != MPI_SUCCESS) {
      FailLocked(op, absl::UnavailableError(absl::StrCat(
                         tracker_->Name(*op.state), ": ", ErrorString(statuses_[k].MPI_ERROR))));
    }
    if (--op.pending > 0) continue;
    // Its last request: after this the op may be recycled, and owners_ only keeps its
    // address in slots whose requests MPI has nulled (dropped below).
    if (op.failed) {
      tracker_->Release(*op.state, kBackendHolder);
    } else {
      FinishLocked(op);
    }
  }
  // MPI nulls the handles of completed requests; keep only the live ones.
  size_t w = 0;
  for (size_t i = 0; i < reqs_.size(); ++i) {
    if (reqs_[i] == MPI_REQUEST_NULL) continue;
    reqs_[w] = reqs_[i];
    owners_[w] = owners_[i];
    cancellable_[w] = cancellable_[i];
    ++w;
  }
  reqs_.resize(w);
  owners_.resize(w);
  cancellable_.resize(w);
  return outcount > 0;
}

void Engine::AbandonInflight() {
  // MPI may still read and write through these requests: their ops and count arrays live in
  // the tracker's records, so the tracker is kept alive for good and the ops never released.
  new std::shared_ptr<OpTracker>(tracker_);
  owners_.clear();
  reqs_.clear();
  cancellable_.clear();
}

void Engine::CancelReceivesLocked() {
  for (size_t i = 0; i < reqs_.size(); ++i) {
    if (!cancellable_[i] || !tracker_->done(*owners_[i]->state)) continue;
    cancellable_[i] = 0;
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
  Unregister(this);
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
    // Submissions the thread never took (it was told to abandon): end them here.
    for (Op* op = queue_head_; op != nullptr;) {
      Op* next = op->next;
      tracker_->Fail(*op->state, late);
      tracker_->Release(*op->state, kBackendHolder);
      op = next;
    }
    queue_head_ = queue_tail_ = nullptr;
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
