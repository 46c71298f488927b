// The callback backend. An operation either completes inside its callback (the caller was
// blocked for all of it: that time is wait_seconds) or is left pending with a handle of the
// caller's, completed by the wait callback from Request::Wait. Means are sums here, divided
// afterwards, so a transport only ever has to add.
//
// Requests are pooled: a request only the pool still holds, with nothing pending, is reused,
// so that steady-state steps allocate nothing here.
#include "comm/callback_communicator.h"

#include <cstring>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "comm/arg_checks.h"
#include "comm/host_reduce.h"
#include "comm/traffic.h"

namespace mdopt {
namespace {

constexpr int kOk = CallbackTransport::kOk;

// What the communicator and its requests share; requests may outlive the communicator.
class Shared {
 public:
  explicit Shared(const CallbackTransport& transport)
      : cb(transport),
        where(absl::StrCat("callback communicator rank ", transport.rank, " of ", transport.size)) {}

  const CallbackTransport cb;
  const std::string where;

  // The transport's description of its last failure (error_message), or a fallback.
  std::string ErrorText(int s) const {
    char buf[1024] = {0};
    if (cb.error_message != nullptr) cb.error_message(cb.user, buf, sizeof buf);
    buf[sizeof buf - 1] = '\0';
    if (buf[0] != '\0') return buf;
    return absl::StrCat("the callback returned status ", s, " and no error message");
  }

  absl::Status health() const {
    absl::MutexLock l(&mu_);
    return dead_;
  }
  absl::Duration timeout() const {
    absl::MutexLock l(&mu_);
    return timeout_;
  }
  void SetTimeout(absl::Duration t) {
    {
      absl::MutexLock l(&mu_);
      timeout_ = t;
    }
    if (cb.set_timeout != nullptr) cb.set_timeout(cb.user, absl::ToDoubleSeconds(t));
  }

  // The first failure or Abort kills the communicator for good; the transport's abort is
  // called once, outside the lock (it may call back into nothing of ours, but it may block
  // briefly on its own locks).
  void Kill(const absl::Status& cause, bool aborted) {
    std::string reason;
    {
      absl::MutexLock l(&mu_);
      if (!dead_.ok()) return;
      dead_ = aborted ? absl::AbortedError(absl::StrCat(where, ": aborted: ", cause.message()))
                      : absl::UnavailableError(absl::StrCat("communicator is broken: ",
                                                            cause.message()));
      reason = std::string(cause.message());
    }
    if (cb.abort != nullptr) cb.abort(cb.user, reason.c_str());
  }

  // Opens an operation: counts it, starts its busy interval. Fails when dead.
  absl::Status Begin(int64_t bytes) {
    absl::MutexLock l(&mu_);
    if (!dead_.ok()) return dead_;
    ++stats_.ops;
    stats_.bytes_sent += bytes;
    if (in_flight_++ == 0) busy_since_ = absl::Now();
    return absl::OkStatus();
  }
  void End(double waited_seconds) {
    absl::MutexLock l(&mu_);
    stats_.wait_seconds += waited_seconds;
    if (--in_flight_ == 0) stats_.busy_seconds += absl::ToDoubleSeconds(absl::Now() - busy_since_);
  }
  void AddWait(double seconds) {
    absl::MutexLock l(&mu_);
    stats_.wait_seconds += seconds;
  }
  CommStats stats() const {
    absl::MutexLock l(&mu_);
    CommStats s = stats_;
    if (in_flight_ > 0) s.busy_seconds += absl::ToDoubleSeconds(absl::Now() - busy_since_);
    return s;
  }

 private:
  mutable absl::Mutex mu_;
  absl::Status dead_ ABSL_GUARDED_BY(mu_);
  absl::Duration timeout_ ABSL_GUARDED_BY(mu_) = absl::Seconds(600);
  CommStats stats_ ABSL_GUARDED_BY(mu_);
  int in_flight_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Time busy_since_ ABSL_GUARDED_BY(mu_);
};

class CallbackRequest final : public Request {
 public:
  explicit CallbackRequest(std::shared_ptr<Shared> shared) : shared_(std::move(shared)) {}

  // Reset for a new operation; `what` is a static name ("all-reduce").
  void Reset(const char* what) {
    absl::MutexLock l(&mu_);
    what_ = what;
    pending_ = nullptr;
    status_ = absl::OkStatus();
    mean_data_ = nullptr;
    mean_count_ = 0;
  }
  // A mean to divide once the sum is in (recv, count elements).
  void DivideAfter(void* data, int64_t count, DataType dtype) {
    absl::MutexLock l(&mu_);
    mean_data_ = data;
    mean_count_ = count;
    mean_dtype_ = dtype;
  }
  // The callback completed the operation itself.
  void Completed() {
    absl::MutexLock l(&mu_);
    Finish();
  }
  void Pend(void* handle) {
    absl::MutexLock l(&mu_);
    pending_ = handle;
  }
  bool pending() const {
    absl::MutexLock l(&mu_);
    return pending_ != nullptr;
  }

  std::vector<P2P>& p2p() { return p2p_; }
  double* scratch() { return &scratch_; }

  absl::Status Wait() override {
    absl::MutexLock l(&mu_);
    if (pending_ == nullptr) return status_;
    // A dead communicator's pending operations fail without asking the transport (it may
    // never answer); their handles are left to the destroy callback.
    if (absl::Status h = shared_->health(); !h.ok()) {
      pending_ = nullptr;
      status_ = h;
      shared_->End(0.0);
      return status_;
    }
    const absl::Duration timeout = shared_->timeout();
    const absl::Time t0 = absl::Now();
    void* handle = pending_;
    const int s = shared_->cb.wait(shared_->cb.user, handle, absl::ToDoubleSeconds(timeout));
    const absl::Duration waited = absl::Now() - t0;
    pending_ = nullptr;
    if (s != kOk) {
      const std::string text = shared_->ErrorText(s);
      status_ = waited >= timeout
                    ? absl::DeadlineExceededError(absl::StrCat(
                          shared_->where, ": ", what_, " did not complete within comm_timeout_s = ",
                          absl::ToDoubleSeconds(timeout), " s: ", text))
                    : absl::UnavailableError(
                          absl::StrCat(shared_->where, ": ", what_, " failed: ", text));
      shared_->End(absl::ToDoubleSeconds(waited));
      shared_->Kill(status_, false);
      return status_;
    }
    if (absl::Status h = shared_->health(); !h.ok()) {
      status_ = h;  // aborted while we waited
    } else {
      Finish();
    }
    shared_->End(absl::ToDoubleSeconds(waited));
    return status_;
  }

  absl::StatusOr<bool> Test() override {
    void* handle = nullptr;
    {
      absl::MutexLock l(&mu_);
      if (pending_ == nullptr) {
        if (!status_.ok()) return status_;
        return true;
      }
      handle = pending_;
    }
    // Dead communicator, or no test callback (Test then waits, so that a poll loop still
    // ends): the outcome is Wait's.
    if (!shared_->health().ok() || shared_->cb.test == nullptr) {
      absl::Status s = Wait();
      if (!s.ok()) return s;
      return true;
    }
    bool done = false;
    const int s = shared_->cb.test(shared_->cb.user, handle, &done);
    if (s != kOk || done) {
      // Done, or failed: wait collects the outcome (and releases the handle).
      absl::Status w = Wait();
      if (!w.ok()) return w;
      return true;
    }
    return false;
  }

 private:
  void Finish() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (mean_data_ != nullptr && mean_count_ > 0) {
      DivideInPlace(mean_data_, mean_count_, mean_dtype_, shared_->cb.size);
    }
    mean_data_ = nullptr;
  }

  const std::shared_ptr<Shared> shared_;
  mutable absl::Mutex mu_;
  const char* what_ = "";
  void* pending_ ABSL_GUARDED_BY(mu_) = nullptr;
  absl::Status status_ ABSL_GUARDED_BY(mu_);
  void* mean_data_ = nullptr;
  int64_t mean_count_ = 0;
  DataType mean_dtype_ = DataType::kF32;
  std::vector<P2P> p2p_;             // the transport's view of a send/recv group
  double scratch_ = 0.0;             // the barrier's all-reduce buffer
};

class CallbackCommunicator final : public Communicator {
 public:
  explicit CallbackCommunicator(const CallbackTransport& cb)
      : shared_(std::make_shared<Shared>(cb)), shape_{cb.rank, cb.size, "callbacks", false} {}

  // Operations still pending are completed first (the transport may be writing their
  // buffers, and their handles are the caller's), unless the communicator is dead; then the
  // caller's destroy callback runs, last.
  ~CallbackCommunicator() override {
    std::vector<std::shared_ptr<CallbackRequest>> pool;
    {
      absl::MutexLock l(&pool_mu_);
      pool.swap(pool_);
    }
    for (const auto& r : pool) {
      if (r->pending()) r->Wait().IgnoreError();
    }
    if (shared_->cb.destroy != nullptr) shared_->cb.destroy(shared_->cb.user);
  }

  int rank() const override { return shape_.rank; }
  int size() const override { return shape_.size; }
  std::string backend() const override { return "callbacks"; }
  // Progress is the transport's business: its own threads, or inside the callbacks.
  std::string progress_mode() const override { return "callback"; }
  void SetTimeout(absl::Duration timeout) override { shared_->SetTimeout(timeout); }

  absl::StatusOr<RequestPtr> ReduceScatter(const void* send, void* recv,
                                           absl::Span<const int64_t> counts, DataType dtype,
                                           ReduceOp op, MemorySpace space, StreamSlot) override {
    int64_t total = 0;
    if (absl::Status s = CheckReduceScatter(shape_, send, recv, counts, dtype, op, space, &total);
        !s.ok()) {
      return s;
    }
    const int64_t mine = counts[static_cast<size_t>(shape_.rank)];
    return Run(
        "reduce-scatter", ReduceScatterTraffic(counts, shape_.rank, dtype),
        op == ReduceOp::kMean ? recv : nullptr, mine, dtype,
        [&](CallbackRequest&, void** pending) {
          return cb().reduce_scatter(cb().user, send, recv, counts.data(), dtype, pending);
        },
        [&] { return absl::StrCat(" (", total, " x ", DataTypeName(dtype), ", ", ReduceOpName(op), ")"); });
  }

  absl::StatusOr<RequestPtr> AllGather(const void* send, void* recv,
                                       absl::Span<const int64_t> counts, DataType dtype,
                                       MemorySpace space, StreamSlot) override {
    int64_t total = 0;
    if (absl::Status s = CheckAllGather(shape_, send, recv, counts, dtype, space, &total);
        !s.ok()) {
      return s;
    }
    if (send == nullptr) {  // in place: this rank's segment is already at its offset
      int64_t at = 0;
      for (int r = 0; r < shape_.rank; ++r) at += counts[static_cast<size_t>(r)];
      send = static_cast<const uint8_t*>(recv) + at * static_cast<int64_t>(ElementSize(dtype));
    }
    return Run(
        "all-gather", AllGatherTraffic(counts, shape_.rank, dtype), nullptr, 0, dtype,
        [&](CallbackRequest&, void** pending) {
          return cb().all_gather(cb().user, send, recv, counts.data(), dtype, pending);
        },
        [&] { return absl::StrCat(" (", total, " x ", DataTypeName(dtype), ")"); });
  }

  absl::StatusOr<RequestPtr> AllReduce(const void* send, void* recv, int64_t count,
                                       DataType dtype, ReduceOp op, MemorySpace space,
                                       StreamSlot) override {
    if (absl::Status s = CheckAllReduce(shape_, send, recv, count, dtype, op, space); !s.ok()) {
      return s;
    }
    return Run(
        "all-reduce", AllReduceTraffic(count, shape_.size, dtype),
        op == ReduceOp::kMean ? recv : nullptr, count, dtype,
        [&](CallbackRequest&, void** pending) {
          return cb().all_reduce(cb().user, send, recv, count, dtype, pending);
        },
        [&] { return absl::StrCat(" (", count, " x ", DataTypeName(dtype), ", ", ReduceOpName(op), ")"); });
  }

  absl::StatusOr<RequestPtr> Broadcast(void* data, int64_t count, DataType dtype, int root,
                                       MemorySpace space, StreamSlot) override {
    if (absl::Status s = CheckBroadcast(shape_, data, count, dtype, root, space); !s.ok()) {
      return s;
    }
    return Run(
        "broadcast", BroadcastTraffic(count, dtype, root, shape_.rank, shape_.size), nullptr, 0,
        dtype,
        [&](CallbackRequest&, void** pending) {
          return cb().broadcast(cb().user, data, count, dtype, root, pending);
        },
        [&] { return absl::StrCat(" (", count, " x ", DataTypeName(dtype), " from rank ", root, ")"); });
  }

  absl::StatusOr<RequestPtr> SendRecv(absl::Span<const P2P> ops, int tag, MemorySpace space,
                                      StreamSlot) override {
    if (absl::Status s = CheckSendRecv(shape_, ops, tag, space); !s.ok()) return s;
    // Halves to oneself are copied here (a transport may not loop back): the k-th send to
    // oneself feeds the k-th receive from oneself, as on the local backend.
    for (size_t i = 0, j = 0;; ++i, ++j) {
      while (i < ops.size() && !(ops[i].peer == shape_.rank && ops[i].is_send)) ++i;
      while (j < ops.size() && !(ops[j].peer == shape_.rank && !ops[j].is_send)) ++j;
      if (i == ops.size() && j == ops.size()) break;
      if (i == ops.size() || j == ops.size()) {
        return absl::InvalidArgumentError(
            "send/recv: the sends to oneself and the receives from oneself differ in number; "
            "each send to oneself needs its receive in the same group");
      }
      const int64_t sb = ops[i].count * static_cast<int64_t>(ElementSize(ops[i].dtype));
      const int64_t rb = ops[j].count * static_cast<int64_t>(ElementSize(ops[j].dtype));
      if (sb != rb) {
        return absl::InvalidArgumentError(absl::StrCat(
            "send/recv: a send to oneself has ", sb, " bytes, its receive ", rb));
      }
    }
    return Run(
        "send/recv", SendRecvTraffic(ops, shape_.rank), nullptr, 0, DataType::kBytes,
        [&](CallbackRequest& req, void** pending) -> int {
          std::vector<P2P>& v = req.p2p();
          v.clear();
          size_t next_recv = 0;  // sizes were checked above
          for (const P2P& p : ops) {
            if (p.peer != shape_.rank) {
              v.push_back(p);
            } else if (p.is_send) {
              while (ops[next_recv].peer != shape_.rank || ops[next_recv].is_send) ++next_recv;
              const P2P& r = ops[next_recv++];
              const size_t bytes = static_cast<size_t>(p.count) * ElementSize(p.dtype);
              if (bytes > 0) std::memmove(r.data, p.data, bytes);
            }
          }
          if (v.empty()) return kOk;
          return cb().send_recv(cb().user, v.data(), static_cast<int64_t>(v.size()), tag, pending);
        },
        [&] { return absl::StrCat(" (", ops.size(), " ops, tag ", tag, ")"); });
  }

  absl::StatusOr<RequestPtr> Barrier() override {
    return Run(
        "barrier", 0, nullptr, 0, DataType::kF64,
        [&](CallbackRequest& req, void** pending) {
          if (cb().barrier != nullptr) return cb().barrier(cb().user, pending);
          double* x = req.scratch();
          *x = 0.0;
          return cb().all_reduce(cb().user, x, x, 1, DataType::kF64, pending);
        },
        [] { return std::string(); });
  }

  void Abort(absl::string_view reason) override {
    shared_->Kill(absl::AbortedError(reason), true);
  }

  CommStats stats() const override { return shared_->stats(); }

 private:
  const CallbackTransport& cb() const { return shared_->cb; }

  std::shared_ptr<CallbackRequest> Acquire() {
    absl::MutexLock l(&pool_mu_);
    for (const auto& r : pool_) {
      if (r.use_count() == 1 && !r->pending()) return r;
    }
    pool_.push_back(std::make_shared<CallbackRequest>(shared_));
    return pool_.back();
  }

  // Starts one operation through `call`; `detail` describes it, only when it fails. A mean
  // (mean_data != nullptr) is divided in place once the sum is complete.
  template <typename Call, typename Detail>
  absl::StatusOr<RequestPtr> Run(const char* what, int64_t bytes, void* mean_data,
                                 int64_t mean_count, DataType dtype, Call&& call,
                                 Detail&& detail) {
    if (absl::Status s = shared_->Begin(bytes); !s.ok()) return s;
    std::shared_ptr<CallbackRequest> req = Acquire();
    req->Reset(what);
    if (mean_data != nullptr) req->DivideAfter(mean_data, mean_count, dtype);
    void* pending = nullptr;
    const absl::Time t0 = absl::Now();
    const int s = call(*req, &pending);
    const double seconds = absl::ToDoubleSeconds(absl::Now() - t0);
    if (s != kOk) {
      absl::Status failed = absl::UnavailableError(
          absl::StrCat(shared_->where, ": ", what, detail(), " failed: ", shared_->ErrorText(s)));
      shared_->End(seconds);
      shared_->Kill(failed, false);
      return failed;
    }
    if (pending != nullptr && cb().wait == nullptr) {
      absl::Status failed = absl::UnavailableError(
          absl::StrCat(shared_->where, ": ", what, detail(),
                       ": the callback left the operation pending but there is no wait callback"));
      shared_->End(seconds);
      shared_->Kill(failed, false);
      return failed;
    }
    if (pending == nullptr) {
      req->Completed();
      shared_->End(seconds);  // the caller was blocked in the callback: exposed
    } else {
      req->Pend(pending);
      shared_->AddWait(seconds);  // time to start it; its busy interval runs on
    }
    return RequestPtr(req);
  }

  const std::shared_ptr<Shared> shared_;
  const CommShape shape_;
  absl::Mutex pool_mu_;
  std::vector<std::shared_ptr<CallbackRequest>> pool_ ABSL_GUARDED_BY(pool_mu_);
};

}  // namespace

absl::StatusOr<std::unique_ptr<Communicator>> MakeCallbackCommunicator(
    const CallbackTransport& cb) {
  const char* where = "callback transport";
  if (cb.size < 1) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": size = ", cb.size, " (must be >= 1)"));
  }
  if (cb.rank < 0 || cb.rank >= cb.size) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": rank = ", cb.rank, " is not in [0, size = ", cb.size, ")"));
  }
  const struct {
    const char* name;
    bool present;
  } required[] = {{"all_reduce", cb.all_reduce != nullptr},
                  {"reduce_scatter", cb.reduce_scatter != nullptr},
                  {"all_gather", cb.all_gather != nullptr},
                  {"broadcast", cb.broadcast != nullptr},
                  {"send_recv", cb.send_recv != nullptr}};
  for (const auto& r : required) {
    if (!r.present) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": ", r.name, " is NULL (required)"));
    }
  }
  return std::unique_ptr<Communicator>(new CallbackCommunicator(cb));
}

}  // namespace mdopt
