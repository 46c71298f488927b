// The host-staged adapter's logic (host_staged_communicator.h), device-neutral: the device is
// a StagingDevice (CUDA's in cuda_staging_device.cc, a host fake in the tests).
#include "comm/host_staged_communicator.h"

#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/inlined_vector.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "comm/arg_checks.h"

namespace mdopt {
namespace {

// Pinned buffers by exact size, kept for reuse; shared by the adapter and its requests
// (which may outlive it). A step repeats the previous one's sizes, so after the first it
// finds every buffer it needs free.
class StagingPool {
 public:
  explicit StagingPool(std::shared_ptr<StagingDevice> device) : device_(std::move(device)) {}
  ~StagingPool() {
    for (auto& [bytes, list] : free_)
      for (void* p : list) device_->FreeHost(p);
  }
  StagingPool(const StagingPool&) = delete;
  StagingPool& operator=(const StagingPool&) = delete;

  StagingDevice& device() { return *device_; }

  // nullptr for 0 bytes or when no pinned memory is left.
  void* Take(size_t bytes) {
    if (bytes == 0) return nullptr;
    {
      absl::MutexLock lock(&mu_);
      std::vector<void*>& list = free_[bytes];
      if (!list.empty()) {
        void* p = list.back();
        list.pop_back();
        return p;
      }
    }
    return device_->AllocHost(bytes);
  }
  void Give(void* p, size_t bytes) {
    if (p == nullptr) return;
    absl::MutexLock lock(&mu_);
    free_[bytes].push_back(p);
  }

 private:
  std::shared_ptr<StagingDevice> device_;
  absl::Mutex mu_;
  std::map<size_t, std::vector<void*>> free_ ABSL_GUARDED_BY(mu_);
};

// A device buffer of an operation: `in` is copied to its staging before the operation
// starts, the staging is copied to `out` when it ends (either may be null).
struct Region {
  const void* in;
  void* out;
  size_t bytes;
};

// Where the copies back go: device `out` <- staging at `at`.
struct CopyBack {
  void* out;
  size_t at, bytes;
};

class StagedRequest final : public Request {
 public:
  StagedRequest(std::shared_ptr<StagingPool> pool, RequestPtr inner, char* buf, size_t bytes,
                absl::InlinedVector<CopyBack, 2> back, void* stream)
      : pool_(std::move(pool)), inner_(std::move(inner)), buf_(buf), bytes_(bytes),
        back_(std::move(back)), stream_(stream) {}
  ~StagedRequest() override {
    if (!finished_) (void)Wait();  // the operation may still write the staging: finish it
  }

  absl::Status Wait() override {
    if (!finished_) Finish(inner_->Wait());
    return status_;
  }
  absl::StatusOr<bool> Test() override {
    if (!finished_) {
      absl::StatusOr<bool> t = inner_->Test();
      if (t.ok() && !*t) return false;
      Finish(t.status());
    }
    if (!status_.ok()) return status_;
    return true;
  }
  // The host-synchronising fallback: the results are on the device when Wait returns, so
  // any stream's later work sees them.
  absl::Status OrderBefore(StreamSlot stream) override {
    (void)stream;
    return Wait();
  }

 private:
  void Finish(absl::Status s) {
    finished_ = true;
    if (!s.ok()) {
      // The transport may still write the staging (a broken communicator): it stays its.
      status_ = std::move(s);
      return;
    }
    StagingDevice& dev = pool_->device();
    for (const CopyBack& c : back_) {
      if (s.ok()) s = dev.Copy(c.out, buf_ + c.at, c.bytes, /*to_device=*/true, stream_);
    }
    if (s.ok() && !back_.empty()) s = dev.Synchronize(stream_);
    if (s.ok()) pool_->Give(buf_, bytes_);
    status_ = std::move(s);
  }

  std::shared_ptr<StagingPool> pool_;
  RequestPtr inner_;
  char* buf_;
  size_t bytes_;
  absl::InlinedVector<CopyBack, 2> back_;
  void* stream_;
  bool finished_ = false;
  absl::Status status_;
};

class HostStagedCommunicator final : public Communicator {
 public:
  HostStagedCommunicator(Communicator* inner, std::shared_ptr<StagingDevice> device)
      : inner_(inner), pool_(std::make_shared<StagingPool>(std::move(device))),
        backend_(absl::StrCat("host-staged ", inner->backend())),
        shape_{inner->rank(), inner->size(), backend_, true} {}

  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  std::string backend() const override { return backend_; }
  std::string progress_mode() const override { return inner_->progress_mode(); }
  void SetTimeout(absl::Duration timeout) override { inner_->SetTimeout(timeout); }
  bool equal_counts_only() const override { return inner_->equal_counts_only(); }
  bool device_memory_ok() const override { return true; }

  absl::StatusOr<RequestPtr> ReduceScatter(const void* send, void* recv,
                                           absl::Span<const int64_t> counts, DataType dtype,
                                           ReduceOp op, MemorySpace space,
                                           StreamSlot stream) override {
    if (space == MemorySpace::kHost)
      return inner_->ReduceScatter(send, recv, counts, dtype, op, space, stream);
    int64_t total = 0;
    if (absl::Status s = CheckReduceScatter(shape_, send, recv, counts, dtype, op, space, &total);
        !s.ok())
      return s;
    const size_t es = ElementSize(dtype);
    const Region regions[] = {{send, nullptr, static_cast<size_t>(total) * es},
                              {nullptr, recv, static_cast<size_t>(counts[rank()]) * es}};
    return Staged(regions, stream, [&](char* const* h) {
      return inner_->ReduceScatter(h[0], h[1], counts, dtype, op, MemorySpace::kHost, {});
    });
  }

  absl::StatusOr<RequestPtr> AllGather(const void* send, void* recv,
                                       absl::Span<const int64_t> counts, DataType dtype,
                                       MemorySpace space, StreamSlot stream) override {
    if (space == MemorySpace::kHost) return inner_->AllGather(send, recv, counts, dtype, space, stream);
    int64_t total = 0;
    if (absl::Status s = CheckAllGather(shape_, send, recv, counts, dtype, space, &total); !s.ok())
      return s;
    const size_t es = ElementSize(dtype);
    int64_t mine = 0;
    for (int r = 0; r < rank(); ++r) mine += counts[r];
    // In place: this rank's segment sits at its offset in recv (and is copied back unchanged).
    const void* src = send != nullptr ? send : static_cast<const char*>(recv) + mine * es;
    const Region regions[] = {{src, nullptr, static_cast<size_t>(counts[rank()]) * es},
                              {nullptr, recv, static_cast<size_t>(total) * es}};
    return Staged(regions, stream, [&](char* const* h) {
      return inner_->AllGather(h[0], h[1], counts, dtype, MemorySpace::kHost, {});
    });
  }

  absl::StatusOr<RequestPtr> AllReduce(const void* send, void* recv, int64_t count,
                                       DataType dtype, ReduceOp op, MemorySpace space,
                                       StreamSlot stream) override {
    if (space == MemorySpace::kHost)
      return inner_->AllReduce(send, recv, count, dtype, op, space, stream);
    if (absl::Status s = CheckAllReduce(shape_, send, recv, count, dtype, op, space); !s.ok())
      return s;
    const Region regions[] = {{send, recv, static_cast<size_t>(count) * ElementSize(dtype)}};
    return Staged(regions, stream, [&](char* const* h) {
      return inner_->AllReduce(h[0], h[0], count, dtype, op, MemorySpace::kHost, {});
    });
  }

  absl::StatusOr<RequestPtr> Broadcast(void* data, int64_t count, DataType dtype, int root,
                                       MemorySpace space, StreamSlot stream) override {
    if (space == MemorySpace::kHost) return inner_->Broadcast(data, count, dtype, root, space, stream);
    if (absl::Status s = CheckBroadcast(shape_, data, count, dtype, root, space); !s.ok()) return s;
    const bool here = root == rank();
    const Region regions[] = {{here ? data : nullptr, here ? nullptr : data,
                               static_cast<size_t>(count) * ElementSize(dtype)}};
    return Staged(regions, stream, [&](char* const* h) {
      return inner_->Broadcast(h[0], count, dtype, root, MemorySpace::kHost, {});
    });
  }

  absl::StatusOr<RequestPtr> SendRecv(absl::Span<const P2P> ops, int tag, MemorySpace space,
                                      StreamSlot stream) override {
    if (space == MemorySpace::kHost) return inner_->SendRecv(ops, tag, space, stream);
    if (absl::Status s = CheckSendRecv(shape_, ops, tag, space); !s.ok()) return s;
    // The group's lists are rebuilt per call (the wrapped communicator copies what it keeps).
    absl::MutexLock lock(&p2p_mu_);
    p2p_regions_.clear();
    for (const P2P& p : ops) {
      const size_t b = static_cast<size_t>(p.count) * ElementSize(p.dtype);
      p2p_regions_.push_back(p.is_send ? Region{p.data, nullptr, b} : Region{nullptr, p.data, b});
    }
    return Staged(p2p_regions_, stream, [&](char* const* h) {
      p2p_ops_.assign(ops.begin(), ops.end());
      for (size_t k = 0; k < ops.size(); ++k) p2p_ops_[k].data = h[k];
      return inner_->SendRecv(p2p_ops_, tag, MemorySpace::kHost, {});
    });
  }

  absl::StatusOr<RequestPtr> Barrier() override { return inner_->Barrier(); }
  void Abort(absl::string_view reason) override { inner_->Abort(reason); }
  CommStats stats() const override { return inner_->stats(); }

 private:
  // Lays the regions out in one staging buffer, copies the inputs there after the stream's
  // work so far, starts the wrapped operation on it through `start` (given each region's
  // host address) and returns the request that copies the outputs back.
  template <typename Start>
  absl::StatusOr<RequestPtr> Staged(absl::Span<const Region> regions, StreamSlot stream,
                                    Start&& start) {
    constexpr size_t kAlign = 64;
    absl::InlinedVector<size_t, 4> at(regions.size());
    size_t need = 0;
    for (size_t k = 0; k < regions.size(); ++k) {
      at[k] = need;
      need += (regions[k].bytes + kAlign - 1) / kAlign * kAlign;
    }
    char* buf = static_cast<char*>(pool_->Take(need));
    if (need > 0 && buf == nullptr) {
      return absl::ResourceExhaustedError(
          absl::StrCat(backend_, ": no pinned host memory for a ", need, "-byte staging buffer"));
    }
    StagingDevice& dev = pool_->device();
    absl::InlinedVector<char*, 4> host(regions.size());
    absl::InlinedVector<CopyBack, 2> back;
    bool copied_in = false;
    absl::Status s;
    for (size_t k = 0; k < regions.size(); ++k) {
      host[k] = buf == nullptr ? nullptr : buf + at[k];
      if (regions[k].bytes == 0) continue;
      if (regions[k].out != nullptr) back.push_back({regions[k].out, at[k], regions[k].bytes});
      if (regions[k].in == nullptr || !s.ok()) continue;
      s = dev.Copy(host[k], regions[k].in, regions[k].bytes, /*to_device=*/false, stream.stream);
      copied_in = true;
    }
    if (s.ok() && copied_in) s = dev.Synchronize(stream.stream);
    if (!s.ok()) {
      pool_->Give(buf, need);
      return absl::Status(s.code(), absl::StrCat(backend_, ": staging copy: ", s.message()));
    }
    absl::StatusOr<RequestPtr> req = start(host.data());
    if (!req.ok()) {
      pool_->Give(buf, need);  // refused before it started: nothing uses the staging
      return req.status();
    }
    return RequestPtr(std::make_shared<StagedRequest>(pool_, *std::move(req), buf, need,
                                                      std::move(back), stream.stream));
  }

  Communicator* inner_;
  std::shared_ptr<StagingPool> pool_;
  const std::string backend_;
  const CommShape shape_;
  absl::Mutex p2p_mu_;
  std::vector<Region> p2p_regions_ ABSL_GUARDED_BY(p2p_mu_);
  std::vector<P2P> p2p_ops_ ABSL_GUARDED_BY(p2p_mu_);
};

}  // namespace

std::unique_ptr<Communicator> MakeHostStagedCommunicator(Communicator* host,
                                                         std::shared_ptr<StagingDevice> device) {
  return std::make_unique<HostStagedCommunicator>(host, std::move(device));
}

}  // namespace mdopt
