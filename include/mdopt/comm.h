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

MDOPT_API mdopt_status mdopt_comm_rank(const mdopt_comm* comm, int* rank);
MDOPT_API mdopt_status mdopt_comm_size(const mdopt_comm* comm, int* size);

/* Frees the handle. NULL is accepted and ignored. */
MDOPT_API mdopt_status mdopt_comm_destroy(mdopt_comm* comm);

#ifdef __cplusplus
}
#endif

#endif /* MDOPT_COMM_H_ */
