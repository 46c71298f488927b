// The MPI backend: each operation is one non-blocking MPI call (or a group of them) on a
// duplicate of the host's communicator, driven by mpi::Engine. Element counts and
// displacements are C ints in MPI: a call that needs more than INT_MAX of either is refused
// with InvalidArgument (not chunked); split it, or use a wider dtype.
#include <algorithm>
#include <climits>
#include <cstring>
#include <new>

#include "absl/strings/str_cat.h"
#include "comm/arg_checks.h"
#include "comm/communicator.h"
#include "comm/host_reduce.h"
#include "comm/mpi_engine.h"
#include "comm/mpi_runtime.h"
#include "comm/op_tracker.h"
#include "comm/traffic.h"

namespace mdopt {
namespace {

// The user-defined MPI_Op for bf16: MPI has no bf16 type; the data travel as MPI_UINT16_T.
void Bf16SumOp(void* in, void* inout, int* len, MPI_Datatype*) {
  Bf16SumInto(static_cast<const uint16_t*>(in), static_cast<uint16_t*>(inout), *len);
}

absl::Status CheckIntRange(absl::string_view op, int64_t n) {
  if (n <= INT_MAX) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(
      op, ": ", n, " elements exceed the MPI backend's limit of INT_MAX (", INT_MAX,
      ") per call (counts and displacements are C ints); split the operation"));
}

OpLabel Elements(const char* what, int64_t count, DataType dtype) {
  OpLabel l;
  l.what = what;
  l.detail = OpLabel::Detail::kElements;
  l.count = count;
  l.dtype = dtype;
  return l;
}
OpLabel Elements(const char* what, int64_t count, DataType dtype, ReduceOp op) {
  OpLabel l = Elements(what, count, dtype);
  l.reduces = true;
  l.reduce = op;
  return l;
}

bool AllEqual(absl::Span<const int64_t> counts) {
  for (int64_t c : counts) {
    if (c != counts[0]) return false;
  }
  return true;
}

// Counts and rank-major displacements as MPI's ints (range-checked by the caller), into the
// op's scratch block.
void IntLayout(absl::Span<const int64_t> counts, int* c, int* d) {
  int64_t off = 0;
  for (size_t r = 0; r < counts.size(); ++r) {
    c[r] = static_cast<int>(counts[r]);
    d[r] = static_cast<int>(off);
    off += counts[r];
  }
}

class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator(std::shared_ptr<mpi::Engine> engine, int rank, int size)
      : engine_(std::move(engine)), rank_(rank), size_(size) {}
  ~MpiCommunicator() override { engine_->Shutdown(); }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend() const override { return "mpi"; }
  std::string progress_mode() const override {
    return engine_->mode() == mpi::Engine::Mode::kThread ? "thread" : "caller";
  }
  void SetTimeout(absl::Duration timeout) override { engine_->tracker().SetTimeout(timeout); }

  absl::StatusOr<RequestPtr> ReduceScatter(const void* send, void* recv,
                                           absl::Span<const int64_t> counts, DataType dtype,
                                           ReduceOp op, MemorySpace space,
                                           StreamSlot) override {
    int64_t total = 0;
    if (absl::Status s = CheckReduceScatter(Shape(), send, recv, counts, dtype, op, space, &total);
        !s.ok()) {
      return s;
    }
    if (absl::Status s = CheckIntRange("reduce-scatter", total); !s.ok()) return s;
    const bool block = AllEqual(counts);
    const size_t ints = block ? 0 : 2 * counts.size();
    return Submit(Elements("reduce-scatter", total, dtype, op),
                  ReduceScatterTraffic(counts, rank_, dtype), ints * sizeof(int), 1,
                  [&](mpi::Op& o, void* extra) {
                    o.kind = block ? mpi::OpKind::kReduceScatterBlock : mpi::OpKind::kReduceScatterV;
                    o.send = send;
                    o.recv = recv;
                    o.count = static_cast<int>(counts[0]);
                    o.type = mpi::ToMpi(dtype);
                    o.reduce = Sum(dtype);
                    if (!block) {
                      int* c = static_cast<int*>(extra);
                      IntLayout(counts, c, c + counts.size());
                      o.counts = c;
                    }
                    MeanFinish(op, recv, counts[rank_], dtype, &o);
                  });
  }

  absl::StatusOr<RequestPtr> AllGather(const void* send, void* recv,
                                       absl::Span<const int64_t> counts, DataType dtype,
                                       MemorySpace space, StreamSlot) override {
    int64_t total = 0;
    if (absl::Status s = CheckAllGather(Shape(), send, recv, counts, dtype, space, &total);
        !s.ok()) {
      return s;
    }
    if (absl::Status s = CheckIntRange("all-gather", total); !s.ok()) return s;
    int64_t offset = 0;
    for (int r = 0; r < rank_; ++r) offset += counts[r];
    // A send buffer that is this rank's own segment of recv is the in-place form too (MPI
    // forbids the aliasing otherwise).
    const bool in_place =
        send == nullptr ||
        send == static_cast<const char*>(recv) + offset * static_cast<int64_t>(ElementSize(dtype));
    const bool block = AllEqual(counts);
    const size_t ints = block ? 0 : 2 * counts.size();
    return Submit(Elements("all-gather", total, dtype), AllGatherTraffic(counts, rank_, dtype),
                  ints * sizeof(int), 1, [&](mpi::Op& o, void* extra) {
                    o.kind = block ? mpi::OpKind::kAllGather : mpi::OpKind::kAllGatherV;
                    o.send = in_place ? MPI_IN_PLACE : send;
                    o.recv = recv;
                    o.count = static_cast<int>(counts[rank_]);
                    o.type = mpi::ToMpi(dtype);
                    if (!block) {
                      int* c = static_cast<int*>(extra);
                      IntLayout(counts, c, c + counts.size());
                      o.counts = c;
                      o.displs = c + counts.size();
                    }
                  });
  }

  absl::StatusOr<RequestPtr> AllReduce(const void* send, void* recv, int64_t count,
                                       DataType dtype, ReduceOp op, MemorySpace space,
                                       StreamSlot) override {
    if (absl::Status s = CheckAllReduce(Shape(), send, recv, count, dtype, op, space); !s.ok()) {
      return s;
    }
    if (absl::Status s = CheckIntRange("all-reduce", count); !s.ok()) return s;
    return Submit(Elements("all-reduce", count, dtype, op), AllReduceTraffic(count, size_, dtype),
                  0, 1, [&](mpi::Op& o, void*) {
                    o.kind = mpi::OpKind::kAllReduce;
                    o.send = send == recv ? MPI_IN_PLACE : send;
                    o.recv = recv;
                    o.count = static_cast<int>(count);
                    o.type = mpi::ToMpi(dtype);
                    o.reduce = Sum(dtype);
                    MeanFinish(op, recv, count, dtype, &o);
                  });
  }

  absl::StatusOr<RequestPtr> Broadcast(void* data, int64_t count, DataType dtype, int root,
                                       MemorySpace space, StreamSlot) override {
    if (absl::Status s = CheckBroadcast(Shape(), data, count, dtype, root, space); !s.ok()) {
      return s;
    }
    if (absl::Status s = CheckIntRange("broadcast", count); !s.ok()) return s;
    OpLabel label = Elements("broadcast", count, dtype);
    label.root = root;
    return Submit(label, BroadcastTraffic(count, dtype, root, rank_, size_), 0, 1,
                  [&](mpi::Op& o, void*) {
                    o.kind = mpi::OpKind::kBroadcast;
                    o.recv = data;
                    o.count = static_cast<int>(count);
                    o.type = mpi::ToMpi(dtype);
                    o.root = root;
                  });
  }

  absl::StatusOr<RequestPtr> SendRecv(absl::Span<const P2P> ops, int tag, MemorySpace space,
                                      StreamSlot) override {
    if (absl::Status s = CheckSendRecv(Shape(), ops, tag, space); !s.ok()) return s;
    for (const P2P& p : ops) {
      if (absl::Status s = CheckIntRange("send/recv", p.count); !s.ok()) return s;
    }
    int receives = 0;
    for (const P2P& p : ops) receives += p.is_send ? 0 : 1;
    OpLabel label;
    label.what = "send/recv";
    label.detail = OpLabel::Detail::kGroup;
    label.count = static_cast<int64_t>(ops.size());
    label.tag = tag;
    const int n = static_cast<int>(ops.size());
    return Submit(label, SendRecvTraffic(ops, rank_), ops.size() * sizeof(P2P), n,
                  [&](mpi::Op& o, void* extra) {
                    // The group is copied: in thread mode it starts after this returns.
                    P2P* group = static_cast<P2P*>(extra);
                    std::copy(ops.begin(), ops.end(), group);
                    o.kind = mpi::OpKind::kSendRecv;
                    o.group = group;
                    o.group_size = n;
                    o.tag = tag;
                    o.receives = receives;
                  });
  }

  absl::StatusOr<RequestPtr> Barrier() override {
    OpLabel label;
    label.what = "barrier";
    return Submit(label, 0, 0, 1, [](mpi::Op& o, void*) { o.kind = mpi::OpKind::kBarrier; });
  }

  void Abort(absl::string_view reason) override { engine_->tracker().Abort(reason); }
  CommStats stats() const override { return engine_->tracker().stats(); }

 private:
  CommShape Shape() const { return CommShape{rank_, size_, "mpi", false}; }
  MPI_Op Sum(DataType dtype) const {
    return dtype == DataType::kBf16 ? engine_->bf16_sum() : MPI_SUM;
  }
  void MeanFinish(ReduceOp op, void* data, int64_t count, DataType dtype, mpi::Op* o) const {
    if (op != ReduceOp::kMean || size_ == 1) return;
    o->divide_by = size_;
    o->divide_count = count;
    o->divide_dtype = dtype;
  }

  // Begins the record (with room for an mpi::Op and `extra` bytes after it, and `requests`
  // MPI requests counted against it), lets `fill` describe the op, and submits it.
  template <typename Fill>
  absl::StatusOr<RequestPtr> Submit(const OpLabel& label, int64_t bytes, size_t extra,
                                    int requests, Fill&& fill) {
    absl::StatusOr<OpState*> state =
        engine_->tracker().Begin(label, bytes, sizeof(mpi::Op) + extra, requests);
    if (!state.ok()) return state.status();
    auto* op = new ((*state)->scratch()) mpi::Op();
    op->state = *state;
    op->requests = requests;
    fill(*op, static_cast<void*>(op + 1));
    return engine_->Submit(*op);
  }

  std::shared_ptr<mpi::Engine> engine_;
  const int rank_;
  const int size_;
};

}  // namespace

bool MpiBackendBuilt() { return true; }

absl::StatusOr<std::unique_ptr<Communicator>> MakeMpiCommunicator(void* mpi_comm_or_null) {
  int provided = MPI_THREAD_SINGLE;
  if (absl::Status s = mpi::EnsureInitialised(&provided); !s.ok()) return s;
  const MPI_Comm parent =
      mpi_comm_or_null == nullptr ? MPI_COMM_WORLD : *static_cast<MPI_Comm*>(mpi_comm_or_null);
  if (parent == MPI_COMM_NULL) {
    return absl::InvalidArgumentError("MakeMpiCommunicator: the MPI_Comm is MPI_COMM_NULL");
  }
  // A private duplicate: mdopt's messages never match the host's, and errors on it are
  // returned to mdopt instead of aborting the job (the host's error handler is untouched).
  MPI_Comm comm = MPI_COMM_NULL;
  if (int rc = MPI_Comm_dup(parent, &comm); rc != MPI_SUCCESS) {
    return absl::UnavailableError(absl::StrCat("MPI_Comm_dup failed: ", mpi::ErrorString(rc)));
  }
  MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN);
  int rank = 0, size = 0;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &size);
  MPI_Op bf16_sum = MPI_OP_NULL;
  if (int rc = MPI_Op_create(&Bf16SumOp, /*commute=*/1, &bf16_sum); rc != MPI_SUCCESS) {
    MPI_Comm_free(&comm);
    return absl::UnavailableError(absl::StrCat("MPI_Op_create failed: ", mpi::ErrorString(rc)));
  }
  mpi::Acquire();
  const auto mode = provided == MPI_THREAD_MULTIPLE ? mpi::Engine::Mode::kThread
                                                    : mpi::Engine::Mode::kCaller;
  auto tracker = std::make_shared<OpTracker>(absl::StrCat("mpi rank ", rank, " of ", size));
  auto engine = std::make_shared<mpi::Engine>(comm, bf16_sum, mode, std::move(tracker));
  if (mode == mpi::Engine::Mode::kThread) engine->StartThread();
  // Shut down at exit if nobody destroys it (a weak reference: a destroyed one unregisters).
  mpi::RegisterForExit(engine.get(), [weak = std::weak_ptr<mpi::Engine>(engine)] {
    if (std::shared_ptr<mpi::Engine> e = weak.lock()) e->Shutdown();
  });
  return std::unique_ptr<Communicator>(std::make_unique<MpiCommunicator>(std::move(engine), rank, size));
}

}  // namespace mdopt
