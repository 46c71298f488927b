/* mdopt: communicators. The optimizer shards its state over the ranks of one. */
#ifndef MDOPT_COMM_H_
#define MDOPT_COMM_H_

#include "mdopt/export.h"
#include "mdopt/status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Opaque handle. A communicator outlives every optimizer created on it. */
typedef struct mdopt_comm mdopt_comm;

/* A single-process communicator: rank 0 of 1. */
MDOPT_API mdopt_status mdopt_comm_create_local(mdopt_comm** out);

/* A communicator over MPI ranks. mpi_comm_or_null points to an MPI_Comm (a void* so that
 * this header needs no mpi.h); NULL means MPI_COMM_WORLD. Collective: every rank of that
 * communicator calls it, and mdopt works on a duplicate (MPI_Comm_dup), so its messages never
 * mix with the caller's. If MPI is not initialised, this initialises it with
 * MPI_THREAD_MULTIPLE and finalises it at process exit; a caller that initialised MPI itself
 * finalises it itself, after destroying every mdopt communicator. With MPI_THREAD_MULTIPLE a
 * progress thread drives communication; at a lower thread level progress happens inside
 * mdopt's calls, which must then come from a thread that level allows to call MPI.
 * MDOPT_UNSUPPORTED in a build without MPI; MDOPT_COMM_ERROR when MPI fails. */
MDOPT_API mdopt_status mdopt_comm_create_mpi(void* mpi_comm_or_null, mdopt_comm** out);

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

MDOPT_API mdopt_status mdopt_comm_rank(const mdopt_comm* comm, int* rank);
MDOPT_API mdopt_status mdopt_comm_size(const mdopt_comm* comm, int* size);

/* Frees the handle. NULL is accepted and ignored. */
MDOPT_API mdopt_status mdopt_comm_destroy(mdopt_comm* comm);

#ifdef __cplusplus
}
#endif

#endif /* MDOPT_COMM_H_ */
