/* mdopt_comm_abort under mpirun, from C: every rank but the last enters a step that cannot
 * complete (the last rank never steps), and a watchdog thread of each of those ranks aborts
 * the communicator while the step waits. The step must return MDOPT_COMM_ERROR within a
 * bounded time (the abort, not comm_timeout_s = 600), and afterwards every call that needs
 * the communicator, on both optimizers created on it, refuses with MDOPT_COMM_ERROR naming
 * the watchdog's reason. The last rank aborts its own communicator without a waiter. The
 * program initialises and finalises MPI itself (the trainer's case: the job then ends in
 * order). Prints "c_abi_abort: ok" at rank 0 on success. */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <mpi.h>

#include "mdopt/mdopt.h"
#include "../c_abi/c_check.h"

enum { ROWS = 48, COLS = 16 };

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

typedef struct {
  mdopt_comm* comm;
  char reason[96];
  mdopt_status status;
} watchdog_args;

static void* watchdog(void* p) {
  watchdog_args* a = (watchdog_args*)p;
  struct timespec d = {0, 500 * 1000 * 1000}; /* the step is waiting by then */
  nanosleep(&d, NULL);
  a->status = mdopt_comm_abort(a->comm, a->reason);
  return NULL;
}

typedef struct {
  float w[ROWS * COLS], g[ROWS * COLS];
  mdopt_optimizer* opt;
} model;

static int make(mdopt_comm* comm, model* m) {
  CHECK_OK(mdopt_create(comm, "threads=1 grads=local comm_timeout_s=600", &m->opt));
  CHECK_OK(mdopt_add_group(m->opt, "matrices", "preset=md-muon"));
  for (int k = 0; k < ROWS * COLS; ++k) {
    m->w[k] = 0.01f * (float)((k * 37) % 29 - 14);
    m->g[k] = 0.001f * (float)((k * 13) % 17 - 8);
  }
  mdopt_param_desc d = MDOPT_PARAM_DESC_INIT;
  d.name = "w";
  d.group = "matrices";
  d.ndim = 2;
  d.shape[0] = ROWS;
  d.shape[1] = COLS;
  d.param_dtype = d.grad_dtype = MDOPT_DTYPE_F32;
  d.param = m->w;
  d.grad = m->g;
  CHECK_OK(mdopt_add_param(m->opt, &d, NULL));
  CHECK_OK(mdopt_finalize(m->opt));
  return 0;
}

/* A refused call: COMM_ERROR, and the message names the reason. */
#define CHECK_REFUSED(call, reason)                                                     \
  do {                                                                                  \
    const mdopt_status s_ = (call);                                                     \
    if (s_ != MDOPT_COMM_ERROR || strstr(mdopt_last_error(), (reason)) == NULL) {      \
      fprintf(stderr, "%s:%d: %s -> %s '%s' (expected MDOPT_COMM_ERROR naming '%s')\n", \
              __FILE__, __LINE__, #call, mdopt_status_string(s_), mdopt_last_error(),    \
              (reason));                                                                \
      ++g_failures;                                                                     \
    }                                                                                   \
  } while (0)

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
  mdopt_comm* comm = NULL;
  CHECK_OK(mdopt_comm_create_mpi(NULL, &comm));
  int rank = 0, size = 0;
  CHECK_OK(mdopt_comm_rank(comm, &rank));
  CHECK_OK(mdopt_comm_size(comm, &size));
  static model a, b;
  if (make(comm, &a) != 0 || make(comm, &b) != 0) return 1;
  CHECK_OK(mdopt_step(a.opt, 1.0, NULL, NULL)); /* a healthy step first, every rank */

  watchdog_args wa;
  wa.comm = comm;
  wa.status = MDOPT_INTERNAL;
  snprintf(wa.reason, sizeof wa.reason, "watchdog: rank %d saw no heartbeat", rank);
  const int stepping = rank < size - 1;
  if (stepping) {
    pthread_t t;
    CHECK(pthread_create(&t, NULL, watchdog, &wa) == 0);
    const double t0 = now();
    const mdopt_status s = mdopt_step(a.opt, 1.0, NULL, NULL);
    const double waited = now() - t0;
    CHECK(pthread_join(t, NULL) == 0);
    CHECK(wa.status == MDOPT_SUCCESS);
    if (s != MDOPT_COMM_ERROR) {
      fprintf(stderr, "rank %d: the waiting step returned %s '%s'\n", rank, mdopt_status_string(s),
              mdopt_last_error());
      ++g_failures;
    }
    /* Woken by the abort at 0.5 s, far from comm_timeout_s (600 s). */
    if (!(waited >= 0.4 && waited < 20.0)) {
      fprintf(stderr, "rank %d: the step returned after %.2f s\n", rank, waited);
      ++g_failures;
    }
  } else {
    CHECK(mdopt_comm_abort(comm, wa.reason) == MDOPT_SUCCESS);
  }
  /* The job goes on over the program's own MPI communicator: every rank has aborted. */
  MPI_Barrier(MPI_COMM_WORLD);

  CHECK_REFUSED(mdopt_step(a.opt, 1.0, NULL, NULL), wa.reason);
  CHECK_REFUSED(mdopt_step(b.opt, 1.0, NULL, NULL), wa.reason);
  CHECK_REFUSED(mdopt_grads_ready(b.opt, 0, 1, NULL), wa.reason);
  CHECK_REFUSED(mdopt_gather_params(a.opt, NULL), wa.reason);
  mdopt_group_stats st = MDOPT_GROUP_STATS_INIT;
  CHECK_REFUSED(mdopt_group_info(b.opt, "matrices", &st), wa.reason);
  CHECK_REFUSED(mdopt_save(a.opt, "c_abi_abort_never_written"), wa.reason);
  mdopt_optimizer* c = NULL;
  CHECK_REFUSED(mdopt_create(comm, "", &c), wa.reason);
  CHECK(c == NULL);
  CHECK(mdopt_comm_abort(comm, "again") == MDOPT_SUCCESS);
  CHECK_REFUSED(mdopt_step(a.opt, 1.0, NULL, NULL), wa.reason);

  /* Destroying an aborted communicator gives up on its pending operations within 1 s. */
  const double t0 = now();
  CHECK_OK(mdopt_comm_destroy(comm)); /* the optimizers still hold it */
  CHECK_OK(mdopt_destroy(a.opt));
  CHECK_OK(mdopt_destroy(b.opt)); /* the communicator goes here */
  CHECK(now() - t0 < 10.0);

  int failures = g_failures, total = 0;
  MPI_Allreduce(&failures, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  if (rank == 0 && total == 0) printf("c_abi_abort: ok (%d ranks)\n", size);
  MPI_Finalize();
  return g_failures != 0;
}
