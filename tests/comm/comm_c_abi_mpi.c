/* mdopt_comm_create_mpi through the C ABI. Under mpirun (MPI built): a communicator of the
 * whole job whose rank and size match the launcher's, MPI initialised and finalised by
 * libmdopt. Run alone in a build without MPI: MDOPT_UNSUPPORTED. Either way a NULL `out` is
 * MDOPT_INVALID_ARGUMENT. Prints and exits 0 on success. */
#include <stdio.h>
#include <stdlib.h>

#include "mdopt/mdopt.h"

int main(int argc, char** argv) {
  const int expect_size = argc > 1 ? atoi(argv[1]) : 0; /* 0: a build without MPI */
  if (mdopt_comm_create_mpi(NULL, NULL) != MDOPT_INVALID_ARGUMENT) {
    fprintf(stderr, "NULL out was not refused\n");
    return 1;
  }
  mdopt_comm* comm = NULL;
  const mdopt_status s = mdopt_comm_create_mpi(NULL, &comm);
  if (expect_size == 0) {
    if (s != MDOPT_UNSUPPORTED) {
      fprintf(stderr, "expected MDOPT_UNSUPPORTED, got %d: %s\n", (int)s, mdopt_last_error());
      return 1;
    }
    printf("mdopt_comm_create_mpi: unsupported in this build (%s)\n", mdopt_last_error());
    return 0;
  }
  if (s != MDOPT_SUCCESS) {
    fprintf(stderr, "mdopt_comm_create_mpi: %d: %s\n", (int)s, mdopt_last_error());
    return 1;
  }
  int rank = -1, size = -1;
  if (mdopt_comm_rank(comm, &rank) != MDOPT_SUCCESS || mdopt_comm_size(comm, &size) != MDOPT_SUCCESS ||
      size != expect_size || rank < 0 || rank >= size) {
    fprintf(stderr, "rank %d size %d, expected size %d\n", rank, size, expect_size);
    return 1;
  }
  mdopt_comm_destroy(comm);
  printf("rank %d of %d: mdopt_comm_create_mpi ok\n", rank, size);
  return 0;
}
