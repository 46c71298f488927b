// The collectives the optimizer needs, independent of any optimizer: asynchronous,
// dtype-aware, with a local (one rank) and an MPI backend; a device backend (NCCL) takes
// the same calls with MemorySpace::kDevice and a stream.
//
// Ordering rule: every rank must issue the same operations in the same order (the order of
// the calls that start them, not of the waits). Several operations may be in flight at once
// and their requests may be waited or tested in any order. A program that starts operations
// from several threads must itself make that order the same on every rank.
//
// Failure model: a Wait that runs past the timeout, or any error reported by the transport,
// marks the communicator broken: every pending request then fails and every later call
// fails fast with Unavailable("communicator is broken: <first error>"). Abort() does the same
// with Aborted. A broken or aborted communicator cannot be repaired; buffers of operations
// that were in flight may still be written by the transport until it completes them, so the
// only safe recovery is to stop using those buffers (in practice: end the job).
//
// Status codes: InvalidArgument (bad arguments, checked before anything starts),
// DeadlineExceeded (a Wait timed out), Unavailable (transport failure; broken),
// Aborted (Abort was called), Unimplemented (a backend not built).
//
// CommStats.bytes_sent is what this rank puts on the wire, counted by construction (not
// measured) by direct delivery: every byte another rank needs from this rank is sent to it
// once, so for equal counts it is what the ring algorithms send. N = size(), elem = the
// element size:
//   reduce-scatter: (sum(counts) - counts[rank]) * elem (every other rank's segment of this
//     rank's input leaves once)
//   all-gather: counts[rank] * (N - 1) * elem (this rank's segment goes to each other rank;
//     a rank that contributes nothing sends nothing, whatever it receives)
//   all-reduce: 2 * (N - 1) * count * elem / N, rounded down (a reduce-scatter then an
//     all-gather of N equal parts)
//   broadcast: count * elem * (N - 1) on the root, 0 elsewhere
//   send/recv: the bytes of the sends to other ranks (a send to oneself moves nothing)
//   barrier: 0; every operation of a one-rank communicator: 0
#ifndef MDOPT_COMM_COMMUNICATOR_H_
#define MDOPT_COMM_COMMUNICATOR_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "absl/types/span.h"

namespace mdopt {

// kBf16: uint16_t holding the top half of an IEEE float32. kBytes: opaque bytes (no
// reductions).
enum class DataType : uint8_t { kF32, kBf16, kF64, kBytes };
size_t ElementSize(DataType dtype);  // 0 for a value outside the enum
absl::string_view DataTypeName(DataType dtype);

// kMean = kSum then divided by size(); bf16 adds in float32 and rounds to nearest even at
// every partial sum, as the transport combines them.
enum class ReduceOp : uint8_t { kSum, kMean };

// Host backends refuse kDevice with InvalidArgument (Communicator::device_memory_ok). The
// NCCL backend takes both: kHost buffers are staged through a device buffer it owns (for
// the optimizer's queries and checkpoints, outside a step: such a call allocates on first
// use of a size, copies and synchronises with the host).
enum class MemorySpace : uint8_t { kHost, kDevice };

// A cudaStream_t for device backends: the operation is ordered after the work queued on it
// so far. Host backends ignore it.
struct StreamSlot {
  void* stream = nullptr;
};

// One asynchronous operation. Requests may outlive their communicator (they then report how
// the operation ended).
class Request {
 public:
  virtual ~Request() = default;
  // Blocks until the operation is done, at most the communicator's timeout counted from this
  // call; past it returns DeadlineExceeded naming the operation and comm_timeout_s, and the
  // communicator is broken. Returns the operation's status; calling it again returns it again.
  virtual absl::Status Wait() = 0;
  // Non-blocking: true when done and OK, false while in flight, the error when it failed.
  virtual absl::StatusOr<bool> Test() = 0;
  // Orders the work queued on `stream` after this call behind the operation: a device
  // transport makes the stream wait for it (an event; the host does not wait), a host
  // transport, whose "stream" is the calling thread, waits (Wait). The step schedule uses
  // only this between its stages, so that a device step never waits on the host.
  virtual absl::Status OrderBefore(StreamSlot stream) {
    (void)stream;
    return Wait();
  }
};
using RequestPtr = std::shared_ptr<Request>;

// One half of a point-to-point exchange; `data` holds `count` elements.
struct P2P {
  int peer;
  bool is_send;
  void* data;
  int64_t count;
  DataType dtype;
};

struct CommStats {
  int64_t bytes_sent = 0;     // what this rank put on the wire, by the formulas above
  double busy_seconds = 0;    // wall time with at least one operation in flight (union)
  double wait_seconds = 0;    // time callers spent blocked in Wait: exposed communication
  int64_t ops = 0;            // operations started
};

class Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string backend() const = 0;  // "local", "mpi", "nccl"
  // How operations make progress: "immediate" (local), "thread" (a progress thread owns
  // the transport) or "caller" (progress happens inside Wait and Test).
  virtual std::string progress_mode() const = 0;

  // The bound of every later Wait (default 600 s, the optimizer's comm_timeout_s).
  virtual void SetTimeout(absl::Duration timeout) = 0;

  // Capabilities, for the optimizer to adapt to the transport:
  // equal_counts_only: ReduceScatter and AllGather take equal counts only (NCCL: counts that
  // differ per rank are refused with InvalidArgument); the shard plan then pads every
  // rank's segment of a bucket to the largest (option comm_pad=auto).
  virtual bool equal_counts_only() const { return false; }
  // device_memory_ok: MemorySpace::kDevice buffers are taken (NCCL, the host-staged adapter
  // of comm/host_staged_communicator.h); a device backend over a communicator without it is
  // given that adapter.
  virtual bool device_memory_ok() const { return false; }

  // Reduce-scatter(v): `send` holds sum(counts) elements laid out rank-major (segment r is
  // counts[r] elements, for rank r); `recv` receives counts[rank()] elements: the element-wise
  // sum (or mean) over ranks of segment rank(). counts.size() == size(). Equal counts use
  // the plain (block) collective; a backend with equal_counts_only() refuses others.
  virtual absl::StatusOr<RequestPtr> ReduceScatter(const void* send, void* recv,
                                                   absl::Span<const int64_t> counts,
                                                   DataType dtype, ReduceOp op,
                                                   MemorySpace space = MemorySpace::kHost,
                                                   StreamSlot stream = {}) = 0;
  // All-gather(v): every rank contributes counts[rank()] elements; `recv` (sum(counts)
  // elements, rank-major) gets every rank's segment. send == nullptr: in place, this rank's
  // segment already sits at its offset in `recv`.
  virtual absl::StatusOr<RequestPtr> AllGather(const void* send, void* recv,
                                               absl::Span<const int64_t> counts, DataType dtype,
                                               MemorySpace space = MemorySpace::kHost,
                                               StreamSlot stream = {}) = 0;
  // send == recv: in place. Every rank receives the same bits: each element is reduced
  // once, along one path, and that result is handed to every rank (MPI's binomial
  // reduce + broadcast, ring and reduce-scatter + all-gather algorithms, NCCL's ring and
  // tree do so). The step schedule relies on it for the replicated column gains.
  virtual absl::StatusOr<RequestPtr> AllReduce(const void* send, void* recv, int64_t count,
                                               DataType dtype, ReduceOp op,
                                               MemorySpace space = MemorySpace::kHost,
                                               StreamSlot stream = {}) = 0;
  // Every rank ends with root's `count` elements in `data`.
  virtual absl::StatusOr<RequestPtr> Broadcast(void* data, int64_t count, DataType dtype,
                                               int root, MemorySpace space = MemorySpace::kHost,
                                               StreamSlot stream = {}) = 0;
  // Grouped point-to-point: every op starts together and the request completes when all are
  // done. Matching uses (peer, tag); ops with the same peer and tag match in order. A send
  // and its receive must have the same size in bytes. 0 <= tag <= 32767.
  virtual absl::StatusOr<RequestPtr> SendRecv(absl::Span<const P2P> ops, int tag,
                                              MemorySpace space = MemorySpace::kHost,
                                              StreamSlot stream = {}) = 0;
  virtual absl::StatusOr<RequestPtr> Barrier() = 0;

  // Fails every pending and later operation with Aborted (like ncclCommAbort); never blocks.
  virtual void Abort(absl::string_view reason) = 0;

  virtual CommStats stats() const = 0;  // cumulative since creation
};

// Rank 0 of 1: every operation completes at once (a copy where send and recv differ).
std::unique_ptr<Communicator> MakeLocalCommunicator();

// Whether this build has the MPI backend.
bool MpiBackendBuilt();

// mpi_comm_or_null: an MPI_Comm* as void* (NULL: MPI_COMM_WORLD), so that no public header
// needs mpi.h. The communicator is duplicated (MPI_Comm_dup) so that mdopt's traffic never
// mixes with the host's. When MPI is not initialised this initialises it with
// MPI_Init_thread(MPI_THREAD_MULTIPLE) and finalises it at process exit (only what it
// initialised, and only if nobody finalised it first). Progress mode "thread" when MPI
// provides MPI_THREAD_MULTIPLE, else "caller" (see comm/mpi_engine.h). Unimplemented when
// the build has no MPI.
absl::StatusOr<std::unique_ptr<Communicator>> MakeMpiCommunicator(void* mpi_comm_or_null);

// Whether this build has the NCCL backend (CUDA and NCCL found at configure time).
bool NcclBackendBuilt();

// The bytes of an ncclUniqueId: rank 0 makes one and every rank passes it to
// MakeNcclCommunicator (out of band: MPI, a file, the launcher's store).
inline constexpr int kNcclIdBytes = 128;
absl::Status NcclUniqueId(char id[kNcclIdBytes]);

// One rank of an NCCL communicator on CUDA device `device`, created non-blocking: past
// `timeout` (a peer that never joins) it is aborted and this returns DeadlineExceeded.
// Progress mode "caller" (Wait and Test poll its CUDA event and the communicator's
// asynchronous error). Equal counts only (equal_counts_only(): one NCCL collective per
// call, never one call per rank). Device memory on the caller's stream; host memory
// (kHost) through a device staging buffer the communicator owns, grown on demand: such a
// call copies in on its own stream, and its Wait copies out and synchronises (meant for
// calls outside a step: queries, checkpoints). Unimplemented when the build has no NCCL.
absl::StatusOr<std::unique_ptr<Communicator>> MakeNcclCommunicator(const char* id, int size,
                                                                   int rank, int device,
                                                                   absl::Duration timeout);

// Blocking conveniences: start, then Wait.
absl::Status AllReduceSum(Communicator& c, absl::Span<double> data);       // in place
absl::Status BroadcastBytes(Communicator& c, absl::Span<uint8_t> data, int root);
absl::Status BarrierBlocking(Communicator& c);

}  // namespace mdopt

#endif  // MDOPT_COMM_COMMUNICATOR_H_
