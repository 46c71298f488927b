// A Communicator whose transport is the caller's: the collectives arrive as the function
// pointers of a CallbackTransport, e.g. a torch.distributed process group wrapped by the
// Python package (through the C ABI's mdopt_comm_callbacks, which dist_opt/c_api.cc turns
// into a CallbackTransport). The backend validates arguments, turns means into sums plus a
// division of its own, keeps CommStats and the health/timeout/Abort semantics of
// comm/communicator.h, and hands everything else to the transport.
#ifndef MDOPT_COMM_CALLBACK_COMMUNICATOR_H_
#define MDOPT_COMM_CALLBACK_COMMUNICATOR_H_

#include <cstddef>
#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "comm/communicator.h"

namespace mdopt {

// The caller's collectives. Every rank of the job makes one with the same size and its own
// rank, and the backend calls them in the same order on every rank (the ordering rule of
// comm/communicator.h), from the threads that call the Communicator.
//
// Results: every operation callback returns kOk or a failure (any other value); a failure
// breaks the communicator (every pending and later operation fails, Unavailable), with
// error_message's text in the error (else the returned value).
//
// Completion: a callback either completes the operation before it returns (leaving *pending
// as it found it, nullptr), or starts it and stores a non-null handle of its own in *pending;
// the backend then calls wait(user, handle, timeout_s) exactly once for that handle (from the
// Request::Wait or Test that needs it; handles may be waited in any order), and may call
// test(user, handle, &done) before. The data buffers stay valid until then; `counts` and
// `ops` only during the call.
//
// Semantics (reductions are sums: the backend divides a mean itself once the sum is in):
//   all_reduce:     recv = sum over ranks of send (count elements); send == recv: in place
//   reduce_scatter: send holds sum(counts) elements rank-major (segment r: counts[r]
//                   elements); recv gets the sum over ranks of segment `rank` (counts[rank])
//   all_gather:     recv (sum(counts) elements, rank-major) gets every rank's counts[r]
//                   elements; send holds this rank's and may be recv's own segment
//   broadcast:      every rank ends with root's count elements in data
//   send_recv:      n_ops point-to-point halves started together, done when all are; halves
//                   to the same peer with the same tag match in order; never a half to
//                   oneself (the backend copies those), and a rank with no part in an
//                   exchange is not called. 0 <= tag <= 32767
//   barrier:        optional (nullptr: the backend all-reduces one kF64 instead)
// counts has `size` entries; kBytes is never reduced; bf16 sums are the transport's.
//
// Optional: barrier, test (without it Test waits), set_timeout (told the timeout of
// SetTimeout; wait gets it with every handle too and should fail once it has waited that
// long: the backend then reports DeadlineExceeded), abort (called once by the first failure
// or Abort, must not block), error_message (copies a description of the last failure into
// buf, at most `size` bytes with the NUL), destroy (called last by the communicator's
// destructor). wait is required as soon as any callback may leave an operation pending.
struct CallbackTransport {
  static constexpr int kOk = 0;

  int rank = 0;          // this process, 0 <= rank < size
  int size = 0;          // ranks in the job, >= 1
  void* user = nullptr;  // passed back to every callback

  int (*all_reduce)(void* user, const void* send, void* recv, int64_t count, DataType dtype,
                    void** pending) = nullptr;
  int (*reduce_scatter)(void* user, const void* send, void* recv, const int64_t* counts,
                        DataType dtype, void** pending) = nullptr;
  int (*all_gather)(void* user, const void* send, void* recv, const int64_t* counts,
                    DataType dtype, void** pending) = nullptr;
  int (*broadcast)(void* user, void* data, int64_t count, DataType dtype, int root,
                   void** pending) = nullptr;
  int (*send_recv)(void* user, const P2P* ops, int64_t n_ops, int tag, void** pending) = nullptr;
  int (*barrier)(void* user, void** pending) = nullptr;
  int (*wait)(void* user, void* pending, double timeout_s) = nullptr;
  int (*test)(void* user, void* pending, bool* done) = nullptr;
  void (*set_timeout)(void* user, double timeout_s) = nullptr;
  void (*abort)(void* user, const char* reason) = nullptr;
  void (*error_message)(void* user, char* buf, size_t size) = nullptr;
  void (*destroy)(void* user) = nullptr;
};

// `transport` is copied; `user` and the function pointers must stay valid until the
// communicator is destroyed (destroy, if any, is its last call). InvalidArgument, naming the
// field, when a required callback (all_reduce, reduce_scatter, all_gather, broadcast,
// send_recv) is missing or rank/size are out of range; destroy is not called then.
absl::StatusOr<std::unique_ptr<Communicator>> MakeCallbackCommunicator(
    const CallbackTransport& transport);

}  // namespace mdopt

#endif  // MDOPT_COMM_CALLBACK_COMMUNICATOR_H_
