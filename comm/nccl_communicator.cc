// The NCCL backend: every operation is one NCCL call, or one NCCL group, queued on the
// communicator's own stream after the work queued so far on the caller's stream (StreamSlot:
// an event recorded there, waited on by the communicator's stream), followed by a CUDA
// event. So collectives run beside the caller's compute, not inside it: the step schedule's
// bucket k+1 gather and bucket k-1 all-reduce overlap bucket k's Newton-Schulz on the
// optimizer's stream, which waits for a collective only where it needs its result
// (Request::OrderBefore: a stream wait on the completion event). The request is done when
// its event has completed; Wait polls the event and the communicator's
// asynchronous error (ncclCommGetAsyncError) from the calling thread (progress mode
// "caller"). A timeout, an NCCL error or Abort() aborts the NCCL communicator
// (ncclCommAbort) so that no kernel of it keeps a GPU spinning on a dead peer.
//
// The communicator is created non-blocking (ncclConfig_t.blocking = 0): creation itself
// polls ncclCommGetAsyncError up to the timeout and aborts past it, so a peer that never
// joins does not hang the others.
//
// Equal counts only: a reduce-scatter or all-gather whose counts differ per rank is refused
// with InvalidArgument (one NCCL call per collective, never one per rank: the optimizer
// pads its buckets' segments to equal counts instead, comm_pad). Device memory, ordered after
// the caller's stream; host memory (the optimizer's queries and checkpoints) is staged through
// a device buffer this communicator owns, on a stream of its own, and such a call returns
// only once the collective is done and its results are copied back (Staged below).
// Point-to-point ops match in issue order per peer: NCCL has no tags, so two tags in flight
// to the same peer must be issued in the same order on both sides.
#include <cuda_runtime.h>
#include <nccl.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "comm/arg_checks.h"
#include "comm/communicator.h"
#include "comm/op_tracker.h"
#include "comm/traffic.h"

namespace mdopt {
namespace {

absl::Status NcclError(absl::string_view what, ncclResult_t r, ncclComm_t comm) {
  std::string last;
  if (comm != nullptr) {
    const char* l = ncclGetLastError(comm);
    if (l != nullptr && *l != '\0') last = absl::StrCat(": ", l);
  }
  return absl::UnavailableError(absl::StrCat(what, ": ", ncclGetErrorString(r), last));
}

absl::Status CudaError(absl::string_view what, cudaError_t e) {
  return absl::UnavailableError(
      absl::StrCat(what, ": ", cudaGetErrorName(e), " (", cudaGetErrorString(e), ")"));
}

ncclDataType_t ToNccl(DataType d) {
  switch (d) {
    case DataType::kF32: return ncclFloat32;
    case DataType::kBf16: return ncclBfloat16;
    case DataType::kF64: return ncclFloat64;
    case DataType::kBytes: return ncclUint8;
  }
  return ncclUint8;
}

ncclRedOp_t ToNccl(ReduceOp op) { return op == ReduceOp::kMean ? ncclAvg : ncclSum; }

// Shared by the communicator and its requests (which may outlive it).
struct NcclShared {
  ncclComm_t comm = nullptr;
  int device = 0;
  std::shared_ptr<OpTracker> tracker;
  std::atomic<bool> aborted{false};

  // Completion events, reused: a request gives its event back when it is destroyed (a stream
  // wait already queued on it is not affected by a later record), so after the first step
  // the collectives create none.
  absl::Mutex events_mu;
  std::vector<cudaEvent_t> free_events ABSL_GUARDED_BY(events_mu);
  cudaError_t TakeEvent(cudaEvent_t* ev) {
    {
      absl::MutexLock lock(&events_mu);
      if (!free_events.empty()) {
        *ev = free_events.back();
        free_events.pop_back();
        return cudaSuccess;
      }
    }
    return cudaEventCreateWithFlags(ev, cudaEventDisableTiming);
  }
  void GiveEvent(cudaEvent_t ev) {
    absl::MutexLock lock(&events_mu);
    free_events.push_back(ev);
  }

  // Aborts the NCCL communicator once; later calls do nothing.
  void AbortNccl() {
    bool expected = false;
    if (aborted.compare_exchange_strong(expected, true) && comm != nullptr) ncclCommAbort(comm);
  }

  // OK while the communicator has no asynchronous error (ncclInProgress counts as none).
  absl::Status AsyncError() {
    if (aborted.load()) return absl::AbortedError("NCCL communicator aborted");
    ncclResult_t async = ncclSuccess;
    const ncclResult_t r = ncclCommGetAsyncError(comm, &async);
    if (r != ncclSuccess) return NcclError("ncclCommGetAsyncError", r, comm);
    if (async != ncclSuccess && async != ncclInProgress)
      return NcclError("NCCL asynchronous error", async, comm);
    return absl::OkStatus();
  }

  ~NcclShared() {
    for (cudaEvent_t ev : free_events) cudaEventDestroy(ev);
    if (comm == nullptr) return;
    if (aborted.load()) return;  // ncclCommAbort freed it
    // Non-blocking: finalising may be in progress for a while; bounded by the timeout, past
    // which the communicator is aborted instead of destroyed.
    ncclResult_t r = ncclCommFinalize(comm);
    const absl::Time deadline = absl::Now() + tracker->timeout();
    while (r == ncclInProgress && absl::Now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
      if (ncclCommGetAsyncError(comm, &r) != ncclSuccess) break;
    }
    if (r == ncclSuccess) {
      ncclCommDestroy(comm);
    } else {
      ncclCommAbort(comm);
    }
  }
};

// Holds the record for its user (kUserHolder) and, until the completion event is seen, for
// the backend (kBackendHolder): OpTracker::Complete lets the backend's hold go; an op that
// failed or was broken first is let go here.
class NcclRequest final : public Request {
 public:
  NcclRequest(std::shared_ptr<NcclShared> shared, OpState* op, cudaEvent_t ev)
      : shared_(std::move(shared)), op_(op), event_(ev) {}
  ~NcclRequest() override {
    if (event_ != nullptr) shared_->GiveEvent(event_);
    if (backend_held_) shared_->tracker->Release(*op_, kBackendHolder);
    shared_->tracker->Release(*op_, kUserHolder);
  }

  absl::Status Wait() override {
    absl::Status s = shared_->tracker->Wait(
        *op_, [](void* self) { static_cast<NcclRequest*>(self)->Poll(); }, this);
    if (!s.ok()) shared_->AbortNccl();  // a timeout or error: stop NCCL's kernels
    return s;
  }

  // The stream waits on the collective's completion event: no host wait. An operation that
  // already failed (or a broken communicator) reports its error instead.
  absl::Status OrderBefore(StreamSlot stream) override {
    if (shared_->tracker->done(*op_)) return shared_->tracker->status(*op_);
    const cudaError_t e = cudaStreamWaitEvent(static_cast<cudaStream_t>(stream.stream), event_, 0);
    if (e != cudaSuccess) {
      const absl::Status s = CudaError("cudaStreamWaitEvent", e);
      shared_->tracker->Break(s);
      shared_->AbortNccl();
      return s;
    }
    return absl::OkStatus();
  }

  absl::StatusOr<bool> Test() override {
    if (!shared_->tracker->done(*op_)) Poll();
    if (!shared_->tracker->done(*op_)) return false;
    if (absl::Status s = shared_->tracker->status(*op_); !s.ok()) return s;
    return true;
  }

 private:
  // One look at the event and the communicator's error state.
  void Poll() {
    if (!backend_held_ || shared_->tracker->done(*op_)) return;
    const cudaError_t e = cudaEventQuery(event_);
    if (e == cudaSuccess) {
      shared_->tracker->Complete(*op_, absl::OkStatus());
      backend_held_ = false;
      return;
    }
    if (e != cudaErrorNotReady) {
      const absl::Status s = CudaError("cudaEventQuery", e);
      shared_->tracker->Break(s);
      shared_->AbortNccl();
      return;
    }
    if (absl::Status s = shared_->AsyncError(); !s.ok()) {
      shared_->tracker->Break(s);
      shared_->AbortNccl();
      return;
    }
    std::this_thread::yield();
  }

  std::shared_ptr<NcclShared> shared_;
  OpState* op_;
  cudaEvent_t event_;
  bool backend_held_ = true;
};

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(std::shared_ptr<NcclShared> shared, int rank, int size, cudaStream_t stream,
                   void* scratch)
      : shared_(std::move(shared)), rank_(rank), size_(size), stream_(stream), scratch_(scratch),
        shape_{rank, size, "nccl", true} {}
  ~NcclCommunicator() override {
    if (ready_ != nullptr) cudaEventDestroy(ready_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
    if (host_stream_ != nullptr) cudaStreamDestroy(host_stream_);
    if (scratch_ != nullptr) cudaFree(scratch_);
    if (stage_ != nullptr) cudaFree(stage_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend() const override { return "nccl"; }
  std::string progress_mode() const override { return "caller"; }
  void SetTimeout(absl::Duration timeout) override { shared_->tracker->SetTimeout(timeout); }
  bool equal_counts_only() const override { return true; }
  bool device_memory_ok() const override { return true; }

  absl::StatusOr<RequestPtr> ReduceScatter(const void* send, void* recv,
                                           absl::Span<const int64_t> counts, DataType dtype,
                                           ReduceOp op, MemorySpace space,
                                           StreamSlot stream) override {
    int64_t total = 0;
    if (absl::Status s = CheckReduceScatter(shape_, send, recv, counts, dtype, op, space, &total);
        !s.ok())
      return s;
    if (absl::Status s = CheckEqualCounts(shape_, "reduce-scatter", counts); !s.ok()) return s;
    const size_t n = static_cast<size_t>(counts[0]), es = ElementSize(dtype);
    auto call = [&](const void* from, void* to, cudaStream_t st) {
      return ncclReduceScatter(from, to, n, ToNccl(dtype), ToNccl(op), shared_->comm, st);
    };
    const int64_t bytes = ReduceScatterTraffic(counts, rank_, dtype);
    if (space == MemorySpace::kDevice) {
      return Issue("reduce-scatter", bytes, stream,
                   [&](cudaStream_t st) { return call(send, recv, st); });
    }
    const HostRegion regions[] = {{send, nullptr, static_cast<size_t>(total) * es},
                                  {nullptr, recv, n * es}};
    return Staged("reduce-scatter", bytes, regions,
                  [&](void* const* dev, cudaStream_t st) { return call(dev[0], dev[1], st); });
  }

  absl::StatusOr<RequestPtr> AllGather(const void* send, void* recv,
                                       absl::Span<const int64_t> counts, DataType dtype,
                                       MemorySpace space, StreamSlot stream) override {
    int64_t total = 0;
    if (absl::Status s = CheckAllGather(shape_, send, recv, counts, dtype, space, &total); !s.ok())
      return s;
    if (absl::Status s = CheckEqualCounts(shape_, "all-gather", counts); !s.ok()) return s;
    const size_t n = static_cast<size_t>(counts[0]), es = ElementSize(dtype);
    // In place: this rank's segment already sits at its offset in recv.
    const void* src = send != nullptr ? send : static_cast<const char*>(recv) + rank_ * n * es;
    auto call = [&](const void* from, void* to, cudaStream_t st) {
      return ncclAllGather(from, to, n, ToNccl(dtype), shared_->comm, st);
    };
    const int64_t bytes = AllGatherTraffic(counts, rank_, dtype);
    if (space == MemorySpace::kDevice) {
      return Issue("all-gather", bytes, stream, [&](cudaStream_t st) { return call(src, recv, st); });
    }
    const HostRegion regions[] = {{src, nullptr, n * es},
                                  {nullptr, recv, static_cast<size_t>(total) * es}};
    return Staged("all-gather", bytes, regions,
                  [&](void* const* dev, cudaStream_t st) { return call(dev[0], dev[1], st); });
  }

  absl::StatusOr<RequestPtr> AllReduce(const void* send, void* recv, int64_t count,
                                       DataType dtype, ReduceOp op, MemorySpace space,
                                       StreamSlot stream) override {
    if (absl::Status s = CheckAllReduce(shape_, send, recv, count, dtype, op, space); !s.ok())
      return s;
    auto call = [&](const void* from, void* to, cudaStream_t st) {
      return ncclAllReduce(from, to, static_cast<size_t>(count), ToNccl(dtype), ToNccl(op),
                           shared_->comm, st);
    };
    const int64_t bytes = AllReduceTraffic(count, size_, dtype);
    if (space == MemorySpace::kDevice) {
      return Issue("all-reduce", bytes, stream, [&](cudaStream_t st) { return call(send, recv, st); });
    }
    const HostRegion regions[] = {{send, recv, static_cast<size_t>(count) * ElementSize(dtype)}};
    return Staged("all-reduce", bytes, regions,
                  [&](void* const* dev, cudaStream_t st) { return call(dev[0], dev[0], st); });
  }

  absl::StatusOr<RequestPtr> Broadcast(void* data, int64_t count, DataType dtype, int root,
                                       MemorySpace space, StreamSlot stream) override {
    if (absl::Status s = CheckBroadcast(shape_, data, count, dtype, root, space); !s.ok()) return s;
    auto call = [&](void* buf, cudaStream_t st) {
      return ncclBroadcast(buf, buf, static_cast<size_t>(count), ToNccl(dtype), root,
                           shared_->comm, st);
    };
    const int64_t bytes = BroadcastTraffic(count, dtype, root, rank_, size_);
    if (space == MemorySpace::kDevice) {
      return Issue("broadcast", bytes, stream, [&](cudaStream_t st) { return call(data, st); });
    }
    const bool root_here = rank_ == root;
    const HostRegion regions[] = {{root_here ? data : nullptr, root_here ? nullptr : data,
                                   static_cast<size_t>(count) * ElementSize(dtype)}};
    return Staged("broadcast", bytes, regions,
                  [&](void* const* dev, cudaStream_t st) { return call(dev[0], st); });
  }

  absl::StatusOr<RequestPtr> SendRecv(absl::Span<const P2P> ops, int tag, MemorySpace space,
                                      StreamSlot stream) override {
    if (absl::Status s = CheckSendRecv(shape_, ops, tag, space); !s.ok()) return s;
    // One NCCL group; `data(k)` is op k's buffer (the caller's, or its staging region).
    auto call = [&](auto&& data, cudaStream_t st) -> ncclResult_t {
      ncclResult_t r = ncclGroupStart();
      for (size_t k = 0; k < ops.size() && r == ncclSuccess; ++k) {
        const P2P& p = ops[k];
        r = p.is_send ? ncclSend(data(k), static_cast<size_t>(p.count), ToNccl(p.dtype), p.peer,
                                 shared_->comm, st)
                      : ncclRecv(data(k), static_cast<size_t>(p.count), ToNccl(p.dtype), p.peer,
                                 shared_->comm, st);
      }
      const ncclResult_t e = ncclGroupEnd();
      return r != ncclSuccess ? r : e;
    };
    const int64_t bytes = SendRecvTraffic(ops, rank_);
    if (space == MemorySpace::kDevice) {
      return Issue("send/recv", bytes, stream, [&](cudaStream_t st) {
        return call([&](size_t k) { return ops[k].data; }, st);
      });
    }
    std::vector<HostRegion> regions;
    for (const P2P& p : ops) {
      const size_t b = static_cast<size_t>(p.count) * ElementSize(p.dtype);
      regions.push_back(p.is_send ? HostRegion{p.data, nullptr, b} : HostRegion{nullptr, p.data, b});
    }
    return Staged("send/recv", bytes, regions, [&](void* const* dev, cudaStream_t st) {
      return call([&](size_t k) { return dev[k]; }, st);
    });
  }

  // An all-reduce of one float in the communicator's own scratch word.
  absl::StatusOr<RequestPtr> Barrier() override {
    return Issue("barrier", 0, StreamSlot{}, [&](cudaStream_t st) {
      return ncclAllReduce(scratch_, scratch_, 1, ncclFloat32, ncclSum, shared_->comm, st);
    });
  }

  void Abort(absl::string_view reason) override {
    shared_->tracker->Abort(reason);
    shared_->AbortNccl();
  }
  CommStats stats() const override { return shared_->tracker->stats(); }

 private:
  // A host buffer of a staged call: `in` is copied into its device region before the
  // collective, the region is copied to `out` after it (either may be null).
  struct HostRegion {
    const void* in;
    void* out;
    size_t bytes;
  };

  // A collective on host buffers: each region gets a place in the device staging buffer
  // (grown when too small), the `in` regions are copied in on the communicator's host
  // stream, the collective runs after them, and the call waits for it (bounded by the timeout,
  // like any Wait) before it copies the `out` regions back and returns the finished
  // request. Only staged calls use that stream and buffer, and each is finished before
  // the next starts, so the buffer is never in use when it grows; every implicit
  // synchronisation of a pageable copy finds the stream idle.
  template <typename Call>
  absl::StatusOr<RequestPtr> Staged(const char* what, int64_t traffic,
                                    absl::Span<const HostRegion> regions, Call&& call) {
    // A broken communicator may leave a staged collective on the buffer: never touch it then.
    if (absl::Status s = shared_->tracker->health(); !s.ok()) return s;
    constexpr size_t kAlign = 256;
    std::vector<size_t> at(regions.size());
    size_t need = 0;
    for (size_t k = 0; k < regions.size(); ++k) {
      at[k] = need;
      need += (regions[k].bytes + kAlign - 1) / kAlign * kAlign;
    }
    cudaError_t ce = cudaSetDevice(shared_->device);
    if (ce == cudaSuccess && host_stream_ == nullptr)
      ce = cudaStreamCreateWithFlags(&host_stream_, cudaStreamNonBlocking);
    if (ce != cudaSuccess) return CudaError(absl::StrCat(what, " (host memory): setup"), ce);
    if (need > stage_bytes_) {
      if (stage_ != nullptr) cudaFree(stage_);
      stage_ = nullptr;
      stage_bytes_ = 0;
      if ((ce = cudaMalloc(&stage_, need)) != cudaSuccess) {
        stage_ = nullptr;
        return absl::ResourceExhaustedError(absl::StrCat(
            what, " (host memory): no device memory for a ", need, "-byte staging buffer: ",
            cudaGetErrorName(ce)));
      }
      stage_bytes_ = need;
    }
    std::vector<void*> dev(regions.size());
    for (size_t k = 0; k < regions.size(); ++k) {
      dev[k] = static_cast<char*>(stage_) + at[k];
      if (regions[k].in == nullptr || regions[k].bytes == 0) continue;
      ce = cudaMemcpyAsync(dev[k], regions[k].in, regions[k].bytes, cudaMemcpyHostToDevice,
                           host_stream_);
      if (ce != cudaSuccess) return CudaError(absl::StrCat(what, " (host memory): copy in"), ce);
    }
    absl::StatusOr<RequestPtr> req = Issue(what, traffic, StreamSlot{host_stream_},
                                           [&](cudaStream_t st) { return call(dev.data(), st); });
    if (!req.ok()) return req;
    if (absl::Status s = (*req)->Wait(); !s.ok()) return s;
    for (size_t k = 0; k < regions.size(); ++k) {
      if (regions[k].out == nullptr || regions[k].bytes == 0) continue;
      ce = cudaMemcpyAsync(regions[k].out, dev[k], regions[k].bytes, cudaMemcpyDeviceToHost,
                           host_stream_);
      if (ce != cudaSuccess) break;
    }
    if (ce == cudaSuccess) ce = cudaStreamSynchronize(host_stream_);
    if (ce != cudaSuccess) {
      const absl::Status s = CudaError(absl::StrCat(what, " (host memory): copy out"), ce);
      shared_->tracker->Break(s);
      return s;
    }
    return req;
  }

  // Begins the op, queues `call` on the stream, records the completion event.
  template <typename Call>
  absl::StatusOr<RequestPtr> Issue(const char* what, int64_t bytes, StreamSlot slot,
                                   Call&& call) {
    if (absl::Status s = shared_->AsyncError(); !s.ok()) {
      shared_->tracker->Break(s);
      shared_->AbortNccl();
    }
    OpLabel label;
    label.what = what;  // a string literal at every call site
    absl::StatusOr<OpState*> op = shared_->tracker->Begin(label, bytes);
    if (!op.ok()) return op.status();
    // A failure before a request exists ends the op and lets both holds go.
    auto give_up = [&](const absl::Status& s) {
      shared_->tracker->Fail(**op, s);
      shared_->tracker->Release(**op, kBackendHolder);
      shared_->tracker->Release(**op, kUserHolder);
    };
    cudaStream_t st = stream_;
    cudaEvent_t ev = nullptr;
    cudaError_t ce = cudaSetDevice(shared_->device);
    // The collective reads what the caller's stream wrote before this call.
    if (ce == cudaSuccess && slot.stream != nullptr && slot.stream != stream_) {
      if (ready_ == nullptr) ce = cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming);
      if (ce == cudaSuccess) ce = cudaEventRecord(ready_, static_cast<cudaStream_t>(slot.stream));
      if (ce == cudaSuccess) ce = cudaStreamWaitEvent(st, ready_, 0);
    }
    if (ce == cudaSuccess) ce = shared_->TakeEvent(&ev);
    if (ce != cudaSuccess) {
      const absl::Status s = CudaError(absl::StrCat(what, ": cudaEventCreate"), ce);
      give_up(s);
      return s;
    }
    ncclResult_t r = call(st);
    // Non-blocking communicator: the call may still be enqueueing (ncclInProgress); the
    // stream is only ordered once that ends.
    while (r == ncclInProgress) {
      ncclResult_t async = ncclSuccess;
      if (ncclCommGetAsyncError(shared_->comm, &async) != ncclSuccess) break;
      r = async;
      if (r == ncclInProgress) std::this_thread::yield();
    }
    if (r != ncclSuccess) {
      const absl::Status s = NcclError(what, r, shared_->comm);
      shared_->GiveEvent(ev);
      give_up(s);
      shared_->tracker->Break(s);
      shared_->AbortNccl();
      return s;
    }
    ce = cudaEventRecord(ev, st);
    if (ce != cudaSuccess) {
      const absl::Status s = CudaError(absl::StrCat(what, ": cudaEventRecord"), ce);
      shared_->GiveEvent(ev);
      give_up(s);
      shared_->tracker->Break(s);
      return s;
    }
    return shared_->tracker->MakeRequest<NcclRequest>(shared_, *op, ev);
  }

  std::shared_ptr<NcclShared> shared_;
  const int rank_, size_;
  cudaStream_t stream_;     // every collective runs here
  cudaEvent_t ready_ = nullptr;  // recorded on the caller's stream; reused (waits capture it)
  void* scratch_;
  const CommShape shape_;
  // Host-memory calls (Staged): their stream and device buffer, made on first use.
  cudaStream_t host_stream_ = nullptr;
  void* stage_ = nullptr;
  size_t stage_bytes_ = 0;
};

}  // namespace

bool NcclBackendBuilt() { return true; }

absl::Status NcclUniqueId(char id[kNcclIdBytes]) {
  ncclUniqueId uid;
  static_assert(sizeof(uid.internal) == kNcclIdBytes, "ncclUniqueId is 128 bytes");
  const ncclResult_t r = ncclGetUniqueId(&uid);
  if (r != ncclSuccess) return NcclError("ncclGetUniqueId", r, nullptr);
  std::memcpy(id, uid.internal, kNcclIdBytes);
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Communicator>> MakeNcclCommunicator(const char* id, int size,
                                                                   int rank, int device,
                                                                   absl::Duration timeout) {
  if (id == nullptr) return absl::InvalidArgumentError("nccl: the unique id is null");
  if (size < 1 || rank < 0 || rank >= size)
    return absl::InvalidArgumentError(
        absl::StrCat("nccl: rank ", rank, " of size ", size, " is out of range"));
  int devices = 0;
  cudaError_t ce = cudaGetDeviceCount(&devices);
  if (ce != cudaSuccess) return absl::UnavailableError(CudaError("cudaGetDeviceCount", ce).message());
  if (device < 0 || device >= devices)
    return absl::InvalidArgumentError(
        absl::StrCat("nccl: device ", device, " is out of range (", devices, " CUDA devices)"));
  if ((ce = cudaSetDevice(device)) != cudaSuccess) return CudaError("cudaSetDevice", ce);

  auto shared = std::make_shared<NcclShared>();
  shared->device = device;
  shared->tracker = std::make_shared<OpTracker>(absl::StrCat("nccl rank ", rank, " of ", size));
  shared->tracker->SetTimeout(timeout);
  ncclUniqueId uid;
  std::memcpy(uid.internal, id, kNcclIdBytes);
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  ncclResult_t r = ncclCommInitRankConfig(&shared->comm, size, uid, rank, &config);
  const absl::Time deadline = absl::Now() + timeout;
  // Creation completes asynchronously; a peer that never joins must not hang this rank.
  while (r == ncclInProgress || r == ncclSuccess) {
    ncclResult_t async = ncclSuccess;
    if (shared->comm == nullptr) break;
    r = ncclCommGetAsyncError(shared->comm, &async);
    if (r != ncclSuccess) break;
    if (async != ncclInProgress) {
      r = async;
      break;
    }
    if (absl::Now() > deadline) {
      shared->AbortNccl();
      return absl::DeadlineExceededError(absl::StrCat(
          "nccl: communicator creation (rank ", rank, " of ", size, ") did not complete within ",
          absl::FormatDuration(timeout), " (comm_timeout_s); aborted: a peer did not join"));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  if (r != ncclSuccess) {
    const absl::Status s = NcclError("ncclCommInitRankConfig", r, shared->comm);
    shared->AbortNccl();
    return s;
  }
  cudaStream_t stream = nullptr;
  void* scratch = nullptr;
  if ((ce = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking)) != cudaSuccess)
    return CudaError("cudaStreamCreate", ce);
  if ((ce = cudaMalloc(&scratch, sizeof(float))) != cudaSuccess) {
    cudaStreamDestroy(stream);
    return CudaError("cudaMalloc", ce);
  }
  return std::unique_ptr<Communicator>(
      std::make_unique<NcclCommunicator>(std::move(shared), rank, size, stream, scratch));
}

}  // namespace mdopt
