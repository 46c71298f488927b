// The MPI backend: each operation is one non-blocking MPI call (or a group of them) on a
// duplicate of the host's communicator, driven by mpi::Engine. Element counts and
// displacements are C ints in MPI (Open MPI 4.1 has no MPI 4 large-count calls): an
// operation on more elements than that (mpi::MaxCount(), INT_MAX unless a test lowers it) is
// split into several non-blocking calls of at most that many, under its one request
// (mpi_engine.h, the chunked kinds), with the results of one call.
#include <algorithm>
#include <climits>
#include <cstring>
#include <new>

#include "absl/strings/str_cat.h"
#include "comm/arg_checks.h"
#include "comm/communicator.h"
#include "comm/host_reduce.h"
#include "comm/mpi_engine.h"
#include "comm/mpi_max_count.h"
#include "comm/mpi_runtime.h"
#include "comm/op_tracker.h"
#include "comm/traffic.h"

namespace mdopt {
namespace {

// The user-defined MPI_Op for bf16: MPI has no bf16 type; the data travel as MPI_UINT16_T.
void Bf16SumOp(void* in, void* inout, int* len, MPI_Datatype*) {
  Bf16SumInto(static_cast<const uint16_t*>(in), static_cast<uint16_t*>(inout), *len);
}

// How many calls of at most `limit` elements `n` elements take (one for none). Refused past
// INT_MAX calls, which only a limit lowered far below the data could ask for.
absl::StatusOr<int> ChunksOf(absl::string_view op, int64_t n, int64_t limit) {
  const int64_t chunks = n == 0 ? 1 : (n - 1) / limit + 1;
  if (chunks <= INT_MAX) return static_cast<int>(chunks);
  return absl::InvalidArgumentError(
      absl::StrCat(op, ": ", n, " elements at most ", limit, " per MPI call are too many calls"));
}

// The chunks of the rank-major concatenation of `counts` cut every `limit` elements
// (mpi::OpKind::kReduceScatterChunked): per chunk j, the ranks' counts and displacements
// within it at ints + 2pj, and `rank`'s offset into its own segment at offsets[j].
void ChunkLayout(absl::Span<const int64_t> counts, int rank, int64_t limit, int chunks,
                 int64_t* offsets, int* ints) {
  const size_t p = counts.size();
  for (int j = 0; j < chunks; ++j) {
    const int64_t lo = j * limit, hi = lo + limit;
    int* c = ints + 2 * p * static_cast<size_t>(j);
    int* d = c + p;
    offsets[j] = 0;
    int64_t seg = 0;
    for (size_t r = 0; r < p; ++r) {
      const int64_t a = std::max(lo, seg), b = std::min(hi, seg + counts[r]);
      c[r] = b > a ? static_cast<int>(b - a) : 0;
      d[r] = b > a ? static_cast<int>(a - lo) : 0;
      if (static_cast<int>(r) == rank && b > a) offsets[j] = a - seg;
      seg += counts[r];
    }
  }
}

// Scratch bytes of a chunked reduce-scatter or all-gather: offsets, then the ints.
size_t ChunkScratch(int chunks, size_t ranks) {
  return static_cast<size_t>(chunks) * (sizeof(int64_t) + 2 * ranks * sizeof(int));
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
    const int64_t limit = mpi::MaxCount();
    if (total > limit) {
      absl::StatusOr<int> chunks = ChunksOf("reduce-scatter", total, limit);
      if (!chunks.ok()) return chunks.status();
      return Submit(Elements("reduce-scatter", total, dtype, op),
                    ReduceScatterTraffic(counts, rank_, dtype), ChunkScratch(*chunks, counts.size()),
                    *chunks, [&](mpi::Op& o, void* extra) {
                      o.kind = mpi::OpKind::kReduceScatterChunked;
                      o.send = send;
                      o.recv = recv;
                      o.type = mpi::ToMpi(dtype);
                      o.reduce = Sum(dtype);
                      Chunked(limit, *chunks, counts, dtype, extra, &o);
                      MeanFinish(op, recv, counts[rank_], dtype, &o);
                    });
    }
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
    int64_t offset = 0;
    for (int r = 0; r < rank_; ++r) offset += counts[r];
    // A send buffer that is this rank's own segment of recv is the in-place form too (MPI
    // forbids the aliasing otherwise).
    const bool in_place =
        send == nullptr ||
        send == static_cast<const char*>(recv) + offset * static_cast<int64_t>(ElementSize(dtype));
    const int64_t limit = mpi::MaxCount();
    if (total > limit) {
      absl::StatusOr<int> chunks = ChunksOf("all-gather", total, limit);
      if (!chunks.ok()) return chunks.status();
      return Submit(Elements("all-gather", total, dtype), AllGatherTraffic(counts, rank_, dtype),
                    ChunkScratch(*chunks, counts.size()), *chunks, [&](mpi::Op& o, void* extra) {
                      o.kind = mpi::OpKind::kAllGatherChunked;
                      o.send = in_place ? MPI_IN_PLACE : send;
                      o.recv = recv;
                      o.type = mpi::ToMpi(dtype);
                      Chunked(limit, *chunks, counts, dtype, extra, &o);
                    });
    }
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
    const int64_t limit = mpi::MaxCount();
    absl::StatusOr<int> chunks = ChunksOf("all-reduce", count, limit);
    if (!chunks.ok()) return chunks.status();
    return Submit(Elements("all-reduce", count, dtype, op), AllReduceTraffic(count, size_, dtype),
                  0, *chunks, [&](mpi::Op& o, void*) {
                    o.kind = *chunks > 1 ? mpi::OpKind::kAllReduceChunked : mpi::OpKind::kAllReduce;
                    o.limit = limit;
                    o.total = count;
                    o.chunks = *chunks;
                    o.elem_bytes = ElementSize(dtype);
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
    const int64_t limit = mpi::MaxCount();
    absl::StatusOr<int> chunks = ChunksOf("broadcast", count, limit);
    if (!chunks.ok()) return chunks.status();
    OpLabel label = Elements("broadcast", count, dtype);
    label.root = root;
    return Submit(label, BroadcastTraffic(count, dtype, root, rank_, size_), 0, *chunks,
                  [&](mpi::Op& o, void*) {
                    o.kind = *chunks > 1 ? mpi::OpKind::kBroadcastChunked : mpi::OpKind::kBroadcast;
                    o.limit = limit;
                    o.total = count;
                    o.chunks = *chunks;
                    o.elem_bytes = ElementSize(dtype);
                    o.recv = data;
                    o.count = static_cast<int>(count);
                    o.type = mpi::ToMpi(dtype);
                    o.root = root;
                  });
  }

  absl::StatusOr<RequestPtr> SendRecv(absl::Span<const P2P> ops, int tag, MemorySpace space,
                                      StreamSlot) override {
    if (absl::Status s = CheckSendRecv(Shape(), ops, tag, space); !s.ok()) return s;
    // Each message in calls of at most `limit` elements (mpi::Engine posts them in order).
    const int64_t limit = mpi::MaxCount();
    int64_t requests = 0, receives = 0;
    for (const P2P& p : ops) {
      absl::StatusOr<int> chunks = ChunksOf("send/recv", p.count, limit);
      if (!chunks.ok()) return chunks.status();
      requests += *chunks;
      receives += p.is_send ? 0 : *chunks;
    }
    if (requests > INT_MAX) return absl::InvalidArgumentError("send/recv: too many MPI calls");
    OpLabel label;
    label.what = "send/recv";
    label.detail = OpLabel::Detail::kGroup;
    label.count = static_cast<int64_t>(ops.size());
    label.tag = tag;
    const int n = static_cast<int>(ops.size());
    return Submit(label, SendRecvTraffic(ops, rank_), ops.size() * sizeof(P2P),
                  static_cast<int>(requests), [&](mpi::Op& o, void* extra) {
                    // The group is copied: in thread mode it starts after this returns.
                    P2P* group = static_cast<P2P*>(extra);
                    std::copy(ops.begin(), ops.end(), group);
                    o.kind = mpi::OpKind::kSendRecv;
                    o.group = group;
                    o.group_size = n;
                    o.tag = tag;
                    o.receives = static_cast<int>(receives);
                    o.limit = limit;
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
  // A chunked reduce-scatter's or all-gather's layout, into the op's scratch block.
  void Chunked(int64_t limit, int chunks, absl::Span<const int64_t> counts, DataType dtype,
               void* extra, mpi::Op* o) const {
    auto* offsets = static_cast<int64_t*>(extra);
    int* ints = reinterpret_cast<int*>(offsets + chunks);
    ChunkLayout(counts, rank_, limit, chunks, offsets, ints);
    o->limit = limit;
    o->chunks = chunks;
    o->nranks = size_;
    o->rank = rank_;
    o->elem_bytes = ElementSize(dtype);
    o->chunk_offsets = offsets;
    o->chunk_ints = ints;
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
