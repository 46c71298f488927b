/* mdopt: communicators. The optimizer shards its state over the ranks of one. */
#ifndef MDOPT_COMM_H_
#define MDOPT_COMM_H_

#include <stddef.h>
#include <stdint.h>

#include "mdopt/export.h"
#include "mdopt/status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Opaque handle. Reference counted: every optimizer created on a communicator holds a
 * reference to it, so mdopt_comm_destroy may come before mdopt_destroy of those optimizers
 * (the communicator then goes with the last of them; the handle itself is freed at once). */
typedef struct mdopt_comm mdopt_comm;

/* A single-process communicator: rank 0 of 1. */
MDOPT_API mdopt_status mdopt_comm_create_local(mdopt_comm** out);

/* A communicator over MPI ranks. mpi_comm_or_null points to an MPI_Comm (a void* so that
 * this header needs no mpi.h); NULL means MPI_COMM_WORLD. Collective: every rank of that
 * communicator calls it, and mdopt works on a duplicate (MPI_Comm_dup), so its messages never
 * mix with the caller's. If MPI is not initialised, this initialises it with
 * MPI_THREAD_MULTIPLE and finalises it at process exit, after shutting down every mdopt
 * communicator still alive then (a program may return from main without destroying them);
 * a caller that initialised MPI itself finalises it itself, after destroying every mdopt
 * communicator and every optimizer on one. With MPI_THREAD_MULTIPLE a
 * progress thread drives communication; at a lower thread level progress happens inside
 * mdopt's calls, which must then come from a thread that level allows to call MPI.
 * MDOPT_UNSUPPORTED in a build without MPI; MDOPT_COMM_ERROR when MPI fails. */
MDOPT_API mdopt_status mdopt_comm_create_mpi(void* mpi_comm_or_null, mdopt_comm** out);

/* ---- A communicator over the caller's own collectives ----------------------------------
 * For hosts that already have a transport (a torch.distributed process group under
 * torchrun, a custom fabric): the caller supplies the collectives as C callbacks and mdopt
 * drives them. Every rank of the job creates one with the same size and its own rank.
 *
 * Element types of the buffers handed to the callbacks. F32 and BF16 have the values of
 * mdopt_dtype; BF16 is uint16_t holding the top half of an IEEE float32; BYTES are opaque
 * (never reduced). */
typedef enum {
  MDOPT_COMM_DTYPE_F32 = 0,
  MDOPT_COMM_DTYPE_BF16 = 1,
  MDOPT_COMM_DTYPE_F64 = 2,
  MDOPT_COMM_DTYPE_BYTES = 3
} mdopt_comm_dtype;

/* One half of a point-to-point exchange. Frozen layout (not versioned: a later field would
 * come with a new callback). */
typedef struct {
  int32_t peer;    /* the other rank, 0 <= peer < size */
  int32_t is_send; /* 1: send `count` elements of `data` to peer; 0: receive them into it */
  void* data;
  int64_t count;
  int32_t dtype; /* an mdopt_comm_dtype */
} mdopt_comm_p2p;

/* The collectives, as function pointers. Every operation callback returns MDOPT_SUCCESS or
 * a failure (any other mdopt_status); a failure breaks the communicator (every pending and
 * later operation fails, MDOPT_COMM_ERROR), with error_message's text in mdopt_last_error().
 *
 * Completion: a callback either completes the operation before it returns (leaving
 * *pending as it found it, NULL), or starts it and stores a non-NULL handle of its own in
 * *pending; mdopt then calls wait(user, handle, timeout_s) exactly once for that handle
 * (from the mdopt call that waits for the operation; handles may be waited in any order),
 * and may call test(user, handle, &done) before. The data buffers stay valid until then;
 * the counts and ops arrays only during the call (copy what a pending operation needs).
 *
 * Semantics (every rank calls the same collectives in the same order; reductions are sums,
 * mdopt divides a mean itself afterwards):
 *   all_reduce:     recv = sum over ranks of send (count elements); send == recv: in place
 *   reduce_scatter: send holds sum(counts) elements rank-major (segment r: counts[r]
 *                   elements); recv gets the sum over ranks of segment `rank` (counts[rank])
 *   all_gather:     recv (sum(counts) elements, rank-major) gets every rank's counts[r]
 *                   elements; send holds this rank's and may be recv's own segment
 *   broadcast:      every rank ends with root's count elements in data
 *   send_recv:      n_ops point-to-point halves started together, done when all are; ops
 *                   to the same peer with the same tag match in order; ranks without a part
 *                   in the exchange do not call it. 0 <= tag <= 32767
 *   barrier:        optional (NULL: mdopt runs an all_reduce of one double instead)
 * counts has `size` entries. bf16 sums are the transport's (e.g. float32 then rounded).
 *
 * Timeouts: set_timeout (optional) is told comm_timeout_s when the optimizer is created; a
 * pending operation's wait gets it too and should fail once it passes (mdopt then reports a
 * timeout). A callback that completes at once is bounded by the transport's own timeout.
 * abort (optional) is called once by the first failure or abort; it must not block.
 * error_message (optional) copies a description of the last failure into buf (at most
 * size bytes, NUL included); destroy (optional) is called by mdopt_comm_destroy, last.
 *
 * Versioned like the other ABI structs (docs/ABI.md, "Versioning"): struct_size first,
 * fields only appended; accepted sizes MDOPT_COMM_CALLBACKS_SIZE_V1 .. MDOPT_STRUCT_SIZE_MAX.
 * Start from MDOPT_COMM_CALLBACKS_INIT. */
typedef struct {
  size_t struct_size;
  int32_t rank; /* this process, 0 <= rank < size */
  int32_t size; /* ranks in the job, >= 1 */
  void* user;   /* passed back to every callback */
  mdopt_status (*all_reduce)(void* user, const void* send, void* recv, int64_t count,
                             int32_t dtype, void** pending);
  mdopt_status (*reduce_scatter)(void* user, const void* send, void* recv,
                                 const int64_t* counts, int32_t dtype, void** pending);
  mdopt_status (*all_gather)(void* user, const void* send, void* recv, const int64_t* counts,
                             int32_t dtype, void** pending);
  mdopt_status (*broadcast)(void* user, void* data, int64_t count, int32_t dtype, int32_t root,
                            void** pending);
  mdopt_status (*send_recv)(void* user, const mdopt_comm_p2p* ops, int64_t n_ops, int32_t tag,
                            void** pending);
  mdopt_status (*barrier)(void* user, void** pending);
  mdopt_status (*wait)(void* user, void* pending, double timeout_s);
  mdopt_status (*test)(void* user, void* pending, int32_t* done);
  void (*set_timeout)(void* user, double timeout_s);
  void (*abort)(void* user, const char* reason);
  void (*error_message)(void* user, char* buf, size_t size);
  void (*destroy)(void* user);
  /* New fields go here, at the end, and nowhere else. */
} mdopt_comm_callbacks;

/* The size of the first version (through `destroy`). */
#define MDOPT_COMM_CALLBACKS_SIZE_V1                         \
  ((size_t)(offsetof(mdopt_comm_callbacks, destroy) +        \
            sizeof(((mdopt_comm_callbacks*)0)->destroy)))

#define MDOPT_COMM_CALLBACKS_INIT                                                            \
  { sizeof(mdopt_comm_callbacks), 0, 0, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, \
    NULL, NULL, NULL, NULL }

static inline mdopt_comm_callbacks mdopt_comm_callbacks_init(void) {
  mdopt_comm_callbacks c = MDOPT_COMM_CALLBACKS_INIT;
  return c;
}

/* A communicator that runs its collectives through `cb` (copied; `user` must outlive the
 * communicator). Required: all_reduce, reduce_scatter, all_gather, broadcast, send_recv;
 * wait too when any callback may leave an operation pending. 0 <= rank < size. Not
 * collective: it calls nothing. MDOPT_INVALID_ARGUMENT names a missing callback or a bad
 * rank, size or struct_size. */
MDOPT_API mdopt_status mdopt_comm_create_callbacks(const mdopt_comm_callbacks* cb,
                                                   mdopt_comm** out);

/* NCCL: rank 0 calls mdopt_comm_nccl_unique_id and hands the 128 bytes to every rank (out of
 * band: MPI, a file, the launcher's store); each rank then calls mdopt_comm_create_nccl with
 * its rank and CUDA device. Creation is non-blocking inside: if the ranks have not all
 * joined within 600 s (the default comm_timeout_s) the NCCL communicator is aborted and the
 * call returns MDOPT_COMM_ERROR. Its collectives take device memory only. Both return
 * MDOPT_UNSUPPORTED in a build without CUDA and NCCL. */
#define MDOPT_NCCL_UNIQUE_ID_BYTES 128
MDOPT_API mdopt_status mdopt_comm_nccl_unique_id(char id[MDOPT_NCCL_UNIQUE_ID_BYTES]);
MDOPT_API mdopt_status mdopt_comm_create_nccl(const char* id, int size, int rank, int device,
                                              mdopt_comm** out);

/* Since ABI 1 (minor 3); an older libmdopt.so.1 lacks these symbols.
 * The NCCL id as a type of its own (an ncclUniqueId's 128 bytes; frozen layout), and
 * creation with its timeout as an argument. mdopt_comm_create_nccl2 is
 * mdopt_comm_create_nccl with `timeout_s` (finite, in (0, 1e7] seconds) in place of the
 * fixed 600 s: if the ranks have not all joined within it the NCCL communicator is aborted
 * and the call returns MDOPT_COMM_ERROR. MDOPT_INVALID_ARGUMENT, in every build: a NULL
 * `id` or `out`, size < 1, rank outside [0, size), device < 0, a bad timeout_s. Then
 * MDOPT_UNSUPPORTED in a build without CUDA and NCCL. */
typedef struct {
  char bytes[MDOPT_NCCL_UNIQUE_ID_BYTES];
} mdopt_nccl_id;
MDOPT_API mdopt_status mdopt_comm_nccl_id(mdopt_nccl_id* id);
MDOPT_API mdopt_status mdopt_comm_create_nccl2(const mdopt_nccl_id* id, int size, int rank,
                                               int device, double timeout_s, mdopt_comm** out);

MDOPT_API mdopt_status mdopt_comm_rank(const mdopt_comm* comm, int* rank);
MDOPT_API mdopt_status mdopt_comm_size(const mdopt_comm* comm, int* size);

/* Since ABI 1 (minor 3). Aborts the communicator: callable from any thread (e.g. a
 * trainer's watchdog) while other threads are inside mdopt calls on it; never blocks.
 * Every operation pending on it fails, so every thread waiting in a step or collective on
 * it returns MDOPT_COMM_ERROR (the transport's abort: MPI stops waiting for the peers,
 * the callback communicator calls its `abort` callback, NCCL ncclCommAbort). From then on
 * mdopt_create on it, and on every optimizer created on it mdopt_finalize, mdopt_step,
 * mdopt_grads_ready, mdopt_gather_params, mdopt_group_info, mdopt_save, mdopt_load and
 * mdopt_get_state, refuse with MDOPT_COMM_ERROR and a message naming `reason` (NULL or ""
 * reads "no reason given"). Cannot be undone; only the first call's reason is kept, later
 * calls succeed and change nothing. Buffers of operations that were in flight may still be
 * written by the transport: end the job (after destroying what can be destroyed).
 * MDOPT_INVALID_ARGUMENT for a NULL comm. */
MDOPT_API mdopt_status mdopt_comm_abort(mdopt_comm* comm, const char* reason);

/* Frees the handle and drops its reference to the communicator. NULL is accepted and
 * ignored. The communicator itself is destroyed when the last optimizer created on it is
 * (mdopt_destroy), or here if none is left; the handle must not be used after this call. */
MDOPT_API mdopt_status mdopt_comm_destroy(mdopt_comm* comm);

#ifdef __cplusplus
}
#endif

#endif /* MDOPT_COMM_H_ */
