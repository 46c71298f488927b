/* A C program that steps through the ABI at every rank (mdopt initialises MPI) and returns
 * from main without destroying what it made: with argv[1] = "none" neither the optimizer nor
 * the communicator, with "comm" only the communicator's handle (the optimizer still holds
 * the communicator). mdopt must still finalise MPI at exit, so that mpirun exits 0 (run by
 * exit_test.cmake, which checks mpirun's exit status and output). Prints
 * "c_abi_exit: ok rank R" at every rank before it returns. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mdopt/mdopt.h"
#include "../c_abi/c_check.h"

enum { ROWS = 48, COLS = 16, STEPS = 3 };

int main(int argc, char** argv) {
  const char* mode = argc > 1 ? argv[1] : "none";
  if (strcmp(mode, "none") != 0 && strcmp(mode, "comm") != 0) {
    fprintf(stderr, "usage: c_abi_exit none|comm\n");
    return 2;
  }
  mdopt_comm* comm = NULL;
  CHECK_OK(mdopt_comm_create_mpi(NULL, &comm));
  int rank = 0, size = 0;
  CHECK_OK(mdopt_comm_rank(comm, &rank));
  CHECK_OK(mdopt_comm_size(comm, &size));
  mdopt_optimizer* opt = NULL;
  CHECK_OK(mdopt_create(comm, "threads=1 grads=local", &opt));
  CHECK_OK(mdopt_add_group(opt, "matrices", "preset=md-muon"));
  static float w[2][ROWS * COLS], g[2][ROWS * COLS];
  for (int p = 0; p < 2; ++p) {
    for (int k = 0; k < ROWS * COLS; ++k) w[p][k] = 0.01f * (float)((k * 37 + p) % 29 - 14);
    mdopt_param_desc d = MDOPT_PARAM_DESC_INIT;
    d.name = p == 0 ? "a" : "b";
    d.group = "matrices";
    d.ndim = 2;
    d.shape[0] = ROWS;
    d.shape[1] = COLS;
    d.param_dtype = d.grad_dtype = MDOPT_DTYPE_F32;
    d.param = w[p];
    d.grad = g[p];
    CHECK_OK(mdopt_add_param(opt, &d, NULL));
  }
  CHECK_OK(mdopt_finalize(opt));
  for (int s = 1; s <= STEPS; ++s) {
    for (int p = 0; p < 2; ++p) {
      for (int k = 0; k < ROWS * COLS; ++k) g[p][k] = 0.001f * (float)((k * 13 + s + rank) % 17 - 8);
    }
    mdopt_step_info info = MDOPT_STEP_INFO_INIT;
    CHECK_OK(mdopt_step(opt, 1.0, NULL, &info));
    CHECK(info.step == s && info.skipped == 0);
  }
  if (strcmp(mode, "comm") == 0) CHECK_OK(mdopt_comm_destroy(comm)); /* opt keeps it */
  printf("c_abi_exit: ok rank %d of %d (%s)\n", rank, size, mode);
  fflush(stdout);
  return g_failures != 0; /* opt (and in mode "none" comm) are never destroyed */
}
