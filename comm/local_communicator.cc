// Rank 0 of 1: every operation completes at submission. Still validates every argument and
// keeps the stats, health and Abort semantics of the other backends, so that code tested on
// one rank fails the same way on many.
#include <cstring>

#include "absl/strings/str_cat.h"
#include "comm/arg_checks.h"
#include "comm/communicator.h"
#include "comm/op_tracker.h"

namespace mdopt {
namespace {

class DoneRequest final : public Request {
 public:
  DoneRequest(std::shared_ptr<OpTracker> tracker, OpState* op)
      : tracker_(std::move(tracker)), op_(op) {}
  ~DoneRequest() override { tracker_->Release(*op_, kUserHolder); }
  absl::Status Wait() override { return tracker_->Wait(*op_); }
  absl::StatusOr<bool> Test() override {
    if (absl::Status s = tracker_->status(*op_); !s.ok()) return s;
    return true;
  }

 private:
  std::shared_ptr<OpTracker> tracker_;
  OpState* op_;
};

OpLabel Label(const char* what) {
  OpLabel l;
  l.what = what;
  return l;
}

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
    // across calls, so both halves must be in this group. (Walked in place: no lists.)
    size_t sends = 0, recvs = 0;
    for (const P2P& p : ops) ++(p.is_send ? sends : recvs);
    if (sends != recvs) {
      return absl::InvalidArgumentError(absl::StrCat(
          "send/recv: ", sends, " sends and ", recvs,
          " receives to oneself; on a local communicator each send needs its receive in the "
          "same group"));
    }
    auto pairs = [&](auto&& fn) {
      size_t s = 0, r = 0;
      for (size_t k = 0; k < sends; ++k, ++s, ++r) {
        while (!ops[s].is_send) ++s;
        while (ops[r].is_send) ++r;
        if (absl::Status st = fn(k, ops[s], ops[r]); !st.ok()) return st;
      }
      return absl::OkStatus();
    };
    if (absl::Status st = pairs([](size_t k, const P2P& snd, const P2P& rcv) {
          const int64_t sb = snd.count * static_cast<int64_t>(ElementSize(snd.dtype));
          const int64_t rb = rcv.count * static_cast<int64_t>(ElementSize(rcv.dtype));
          if (sb == rb) return absl::OkStatus();
          return absl::InvalidArgumentError(
              absl::StrCat("send/recv: send ", k, " has ", sb, " bytes, its receive ", rb));
        });
        !st.ok()) {
      return st;
    }
    return Done("send/recv", [&] {
      pairs([](size_t, const P2P& snd, const P2P& rcv) {
        Copy(rcv.data, snd.data, snd.count, snd.dtype);
        return absl::OkStatus();
      }).IgnoreError();
    });
  }

  absl::StatusOr<RequestPtr> Barrier() override { return Done("barrier", [] {}); }

  void Abort(absl::string_view reason) override { tracker_->Abort(reason); }
  CommStats stats() const override { return tracker_->stats(); }

 private:
  static constexpr CommShape kShape{0, 1, "local", false};

  template <typename Fn>
  absl::StatusOr<RequestPtr> Done(const char* what, Fn&& work) {
    absl::StatusOr<OpState*> op = tracker_->Begin(Label(what), 0);
    if (!op.ok()) return op.status();
    work();
    tracker_->Complete(**op, absl::OkStatus());
    return tracker_->MakeRequest<DoneRequest>(tracker_, *op);
  }

  std::shared_ptr<OpTracker> tracker_ = std::make_shared<OpTracker>("local rank 0 of 1");
};

}  // namespace

std::unique_ptr<Communicator> MakeLocalCommunicator() {
  return std::make_unique<LocalCommunicator>();
}

}  // namespace mdopt
