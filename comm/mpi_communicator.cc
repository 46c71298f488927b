// The MPI backend: each operation is one non-blocking MPI call (or a group of them) on a
// duplicate of the host's communicator, driven by mpi::Engine. Element counts and
// displacements are C ints in MPI: a call that needs more than INT_MAX of either is refused
// with InvalidArgument (not chunked); split it, or use a wider dtype.
#include <climits>
#include <cstring>
#include <vector>

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

MPI_Datatype ToMpi(DataType dtype) {
  switch (dtype) {
    case DataType::kF32: return MPI_FLOAT;
    case DataType::kBf16: return MPI_UINT16_T;
    case DataType::kF64: return MPI_DOUBLE;
    case DataType::kBytes: return MPI_BYTE;
  }
  return MPI_DATATYPE_NULL;
}

absl::Status CheckIntRange(absl::string_view op, int64_t n) {
  if (n <= INT_MAX) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(
      op, ": ", n, " elements exceed the MPI backend's limit of INT_MAX (", INT_MAX,
      ") per call (counts and displacements are C ints); split the operation"));
}

std::string Detail(int64_t count, DataType dtype) {
  return absl::StrCat(" (", count, " x ", DataTypeName(dtype), ")");
}
std::string Detail(int64_t count, DataType dtype, ReduceOp op) {
  return absl::StrCat(" (", count, " x ", DataTypeName(dtype), ", ", ReduceOpName(op), ")");
}

bool AllEqual(absl::Span<const int64_t> counts) {
  for (int64_t c : counts) {
    if (c != counts[0]) return false;
  }
  return true;
}

// Counts and rank-major displacements as MPI's ints (range-checked by the caller).
void IntLayout(absl::Span<const int64_t> counts, std::vector<int>* c, std::vector<int>* d) {
  int64_t off = 0;
  for (int64_t n : counts) {
    c->push_back(static_cast<int>(n));
    d->push_back(static_cast<int>(off));
    off += n;
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
    const MPI_Datatype t = ToMpi(dtype);
    const MPI_Op mop = Sum(dtype);
    std::function<int(MPI_Comm, std::vector<MPI_Request>*)> start;
    if (AllEqual(counts)) {
      const int n = static_cast<int>(counts[0]);
      start = [=](MPI_Comm c, std::vector<MPI_Request>* reqs) {
        MPI_Request r;
        const int rc = MPI_Ireduce_scatter_block(send, recv, n, t, mop, c, &r);
        if (rc == MPI_SUCCESS) reqs->push_back(r);
        return rc;
      };
    } else {
      std::vector<int> cs, ds;
      IntLayout(counts, &cs, &ds);
      start = [=, cs = std::move(cs)](MPI_Comm c, std::vector<MPI_Request>* reqs) {
        MPI_Request r;
        const int rc = MPI_Ireduce_scatter(send, recv, cs.data(), t, mop, c, &r);
        if (rc == MPI_SUCCESS) reqs->push_back(r);
        return rc;
      };
    }
    return Submit("reduce-scatter", Detail(total, dtype, op),
                  ScatterGatherTraffic(counts, rank_, dtype), std::move(start),
                  MeanFinish(op, recv, counts[rank_], dtype));
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
    const MPI_Datatype t = ToMpi(dtype);
    int64_t offset = 0;
    for (int r = 0; r < rank_; ++r) offset += counts[r];
    // A send buffer that is this rank's own segment of recv is the in-place form too (MPI
    // forbids the aliasing otherwise).
    const bool in_place =
        send == nullptr ||
        send == static_cast<const char*>(recv) + offset * static_cast<int64_t>(ElementSize(dtype));
    const void* sendbuf = in_place ? MPI_IN_PLACE : send;
    const int mine = static_cast<int>(counts[rank_]);
    std::function<int(MPI_Comm, std::vector<MPI_Request>*)> start;
    if (AllEqual(counts)) {
      start = [=](MPI_Comm c, std::vector<MPI_Request>* reqs) {
        MPI_Request r;
        const int rc = MPI_Iallgather(sendbuf, mine, t, recv, mine, t, c, &r);
        if (rc == MPI_SUCCESS) reqs->push_back(r);
        return rc;
      };
    } else {
      std::vector<int> cs, ds;
      IntLayout(counts, &cs, &ds);
      start = [=, cs = std::move(cs), ds = std::move(ds)](MPI_Comm c,
                                                          std::vector<MPI_Request>* reqs) {
        MPI_Request r;
        const int rc = MPI_Iallgatherv(sendbuf, mine, t, recv, cs.data(), ds.data(), t, c, &r);
        if (rc == MPI_SUCCESS) reqs->push_back(r);
        return rc;
      };
    }
    return Submit("all-gather", Detail(total, dtype), ScatterGatherTraffic(counts, rank_, dtype),
                  std::move(start), nullptr);
  }

  absl::StatusOr<RequestPtr> AllReduce(const void* send, void* recv, int64_t count,
                                       DataType dtype, ReduceOp op, MemorySpace space,
                                       StreamSlot) override {
    if (absl::Status s = CheckAllReduce(Shape(), send, recv, count, dtype, op, space); !s.ok()) {
      return s;
    }
    if (absl::Status s = CheckIntRange("all-reduce", count); !s.ok()) return s;
    const MPI_Datatype t = ToMpi(dtype);
    const MPI_Op mop = Sum(dtype);
    const void* sendbuf = send == recv ? MPI_IN_PLACE : send;
    const int n = static_cast<int>(count);
    auto start = [=](MPI_Comm c, std::vector<MPI_Request>* reqs) {
      MPI_Request r;
      const int rc = MPI_Iallreduce(sendbuf, recv, n, t, mop, c, &r);
      if (rc == MPI_SUCCESS) reqs->push_back(r);
      return rc;
    };
    return Submit("all-reduce", Detail(count, dtype, op), AllReduceTraffic(count, size_, dtype),
                  std::move(start), MeanFinish(op, recv, count, dtype));
  }

  absl::StatusOr<RequestPtr> Broadcast(void* data, int64_t count, DataType dtype, int root,
                                       MemorySpace space, StreamSlot) override {
    if (absl::Status s = CheckBroadcast(Shape(), data, count, dtype, root, space); !s.ok()) {
      return s;
    }
    if (absl::Status s = CheckIntRange("broadcast", count); !s.ok()) return s;
    const MPI_Datatype t = ToMpi(dtype);
    const int n = static_cast<int>(count);
    auto start = [=](MPI_Comm c, std::vector<MPI_Request>* reqs) {
      MPI_Request r;
      const int rc = MPI_Ibcast(data, n, t, root, c, &r);
      if (rc == MPI_SUCCESS) reqs->push_back(r);
      return rc;
    };
    return Submit("broadcast", absl::StrCat(Detail(count, dtype), " from root ", root),
                  BroadcastTraffic(count, dtype, root, rank_), std::move(start), nullptr);
  }

  absl::StatusOr<RequestPtr> SendRecv(absl::Span<const P2P> ops, int tag, MemorySpace space,
                                      StreamSlot) override {
    if (absl::Status s = CheckSendRecv(Shape(), ops, tag, space); !s.ok()) return s;
    for (const P2P& p : ops) {
      if (absl::Status s = CheckIntRange("send/recv", p.count); !s.ok()) return s;
    }
    std::vector<P2P> group(ops.begin(), ops.end());
    int receives = 0;
    for (const P2P& p : ops) receives += p.is_send ? 0 : 1;
    auto start = [group = std::move(group), tag](MPI_Comm c, std::vector<MPI_Request>* reqs) {
      // Receives first, so that sends find them posted; MPI keeps the order among the sends
      // (and among the receives) of one peer and tag, which is the matching rule.
      for (int pass = 0; pass < 2; ++pass) {
        for (const P2P& p : group) {
          if (p.is_send != (pass == 1)) continue;
          MPI_Request r;
          const int n = static_cast<int>(p.count);
          const int rc = p.is_send ? MPI_Isend(p.data, n, ToMpi(p.dtype), p.peer, tag, c, &r)
                                   : MPI_Irecv(p.data, n, ToMpi(p.dtype), p.peer, tag, c, &r);
          if (rc != MPI_SUCCESS) return rc;
          reqs->push_back(r);
        }
      }
      return MPI_SUCCESS;
    };
    return Submit("send/recv", absl::StrCat(" (", ops.size(), " ops, tag ", tag, ")"),
                  SendRecvTraffic(ops, rank_), std::move(start), nullptr, receives);
  }

  absl::StatusOr<RequestPtr> Barrier() override {
    auto start = [](MPI_Comm c, std::vector<MPI_Request>* reqs) {
      MPI_Request r;
      const int rc = MPI_Ibarrier(c, &r);
      if (rc == MPI_SUCCESS) reqs->push_back(r);
      return rc;
    };
    return Submit("barrier", "", 0, std::move(start), nullptr);
  }

  void Abort(absl::string_view reason) override { engine_->tracker().Abort(reason); }
  CommStats stats() const override { return engine_->tracker().stats(); }

 private:
  CommShape Shape() const { return CommShape{rank_, size_, "mpi", false}; }
  MPI_Op Sum(DataType dtype) const {
    return dtype == DataType::kBf16 ? engine_->bf16_sum() : MPI_SUM;
  }
  std::function<void()> MeanFinish(ReduceOp op, void* data, int64_t count, DataType dtype) const {
    if (op != ReduceOp::kMean || size_ == 1) return nullptr;
    const int n = size_;
    return [=] { DivideInPlace(data, count, dtype, n); };
  }

  absl::StatusOr<RequestPtr> Submit(absl::string_view what, absl::string_view detail,
                                    int64_t bytes,
                                    std::function<int(MPI_Comm, std::vector<MPI_Request>*)> start,
                                    std::function<void()> finish, int receives = 0) {
    absl::StatusOr<std::shared_ptr<OpState>> state = engine_->tracker().Begin(what, detail, bytes);
    if (!state.ok()) return state.status();
    auto op = std::make_shared<mpi::Op>();
    op->state = *std::move(state);
    op->start = std::move(start);
    op->finish = std::move(finish);
    op->receives = receives;
    return engine_->Submit(std::move(op));
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
  return std::unique_ptr<Communicator>(std::make_unique<MpiCommunicator>(std::move(engine), rank, size));
}

}  // namespace mdopt
