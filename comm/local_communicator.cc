// Rank 0 of 1: every operation completes at submission. Still validates every argument and
// keeps the stats, health and Abort semantics of the other backends, so that code tested on
// one rank fails the same way on many.
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "comm/arg_checks.h"
#include "comm/communicator.h"
#include "comm/op_tracker.h"

namespace mdopt {
namespace {

class DoneRequest final : public Request {
 public:
  DoneRequest(std::shared_ptr<OpTracker> tracker, std::shared_ptr<OpState> op)
      : tracker_(std::move(tracker)), op_(std::move(op)) {}
  absl::Status Wait() override { return tracker_->Wait(op_, nullptr); }
  absl::StatusOr<bool> Test() override {
    if (absl::Status s = op_->status(); !s.ok()) return s;
    return true;
  }

 private:
  std::shared_ptr<OpTracker> tracker_;
  std::shared_ptr<OpState> op_;
};

void Copy(void* dst, const void* src, int64_t count, DataType dtype) {
  if (dst == src || count == 0) return;
  std::memmove(dst, src, static_cast<size_t>(count) * ElementSize(dtype));
}

class LocalCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  std::string backend() const override { return "local"; }
  std::string progress_mode() const override { return "immediate"; }
  void SetTimeout(absl::Duration timeout) override { tracker_->SetTimeout(timeout); }

  absl::StatusOr<RequestPtr> ReduceScatter(const void* send, void* recv,
                                           absl::Span<const int64_t> counts, DataType dtype,
                                           ReduceOp op, MemorySpace space,
                                           StreamSlot) override {
    int64_t total = 0;
    if (absl::Status s = CheckReduceScatter(kShape, send, recv, counts, dtype, op, space, &total);
        !s.ok()) {
      return s;
    }
    // The sum or mean over one rank is the identity.
    return Done("reduce-scatter", [&] { Copy(recv, send, total, dtype); });
  }

  absl::StatusOr<RequestPtr> AllGather(const void* send, void* recv,
                                       absl::Span<const int64_t> counts, DataType dtype,
                                       MemorySpace space, StreamSlot) override {
    int64_t total = 0;
    if (absl::Status s = CheckAllGather(kShape, send, recv, counts, dtype, space, &total);
        !s.ok()) {
      return s;
    }
    return Done("all-gather", [&] {
      if (send != nullptr) Copy(recv, send, total, dtype);
    });
  }

  absl::StatusOr<RequestPtr> AllReduce(const void* send, void* recv, int64_t count,
                                       DataType dtype, ReduceOp op, MemorySpace space,
                                       StreamSlot) override {
    if (absl::Status s = CheckAllReduce(kShape, send, recv, count, dtype, op, space); !s.ok()) {
      return s;
    }
    return Done("all-reduce", [&] { Copy(recv, send, count, dtype); });
  }

  absl::StatusOr<RequestPtr> Broadcast(void* data, int64_t count, DataType dtype, int root,
                                       MemorySpace space, StreamSlot) override {
    if (absl::Status s = CheckBroadcast(kShape, data, count, dtype, root, space); !s.ok()) {
      return s;
    }
    return Done("broadcast", [] {});
  }

  absl::StatusOr<RequestPtr> SendRecv(absl::Span<const P2P> ops, int tag, MemorySpace space,
                                      StreamSlot) override {
    if (absl::Status s = CheckSendRecv(kShape, ops, tag, space); !s.ok()) return s;
    // Every op is to oneself: the k-th send feeds the k-th receive. Nothing is buffered
    // across calls, so both halves must be in this group.
    std::vector<const P2P*> sends, recvs;
    for (const P2P& p : ops) (p.is_send ? sends : recvs).push_back(&p);
    if (sends.size() != recvs.size()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "send/recv: ", sends.size(), " sends and ", recvs.size(),
          " receives to oneself; on a local communicator each send needs its receive in the "
          "same group"));
    }
    for (size_t k = 0; k < sends.size(); ++k) {
      const int64_t sb = sends[k]->count * static_cast<int64_t>(ElementSize(sends[k]->dtype));
      const int64_t rb = recvs[k]->count * static_cast<int64_t>(ElementSize(recvs[k]->dtype));
      if (sb != rb) {
        return absl::InvalidArgumentError(absl::StrCat("send/recv: send ", k, " has ", sb,
                                                       " bytes, its receive ", rb));
      }
    }
    return Done("send/recv", [&] {
      for (size_t k = 0; k < sends.size(); ++k) {
        Copy(recvs[k]->data, sends[k]->data, sends[k]->count, sends[k]->dtype);
      }
    });
  }

  absl::StatusOr<RequestPtr> Barrier() override { return Done("barrier", [] {}); }

  void Abort(absl::string_view reason) override { tracker_->Abort(reason); }
  CommStats stats() const override { return tracker_->stats(); }

 private:
  static constexpr CommShape kShape{0, 1, "local", false};

  template <typename Fn>
  absl::StatusOr<RequestPtr> Done(absl::string_view what, Fn&& work) {
    absl::StatusOr<std::shared_ptr<OpState>> op = tracker_->Begin(what, "", 0);
    if (!op.ok()) return op.status();
    work();
    tracker_->Complete(**op, absl::OkStatus());
    return RequestPtr(std::make_shared<DoneRequest>(tracker_, *std::move(op)));
  }

  std::shared_ptr<OpTracker> tracker_ = std::make_shared<OpTracker>("local rank 0 of 1");
};

}  // namespace

std::unique_ptr<Communicator> MakeLocalCommunicator() {
  return std::make_unique<LocalCommunicator>();
}

}  // namespace mdopt
