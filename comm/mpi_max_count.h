// The most elements the MPI backend passes to one MPI call. MPI 3's counts and displacements
// are C ints (Open MPI 4.1 has no MPI 4 large-count `_c` calls), so an operation on more
// elements than this, or with displacements past it, is split into several non-blocking
// calls of at most this many elements each, all under the operation's one request.
//
// INT_MAX unless lowered for a test: by SetMpiMaxCountForTesting, or by the environment
// variable MDOPT_MPI_MAX_COUNT (read once, at the first MPI operation; a test hook, not a
// tuning knob: every rank of a communicator must use the same value, or their calls do not
// match). Read when an operation is submitted.
#ifndef MDOPT_COMM_MPI_MAX_COUNT_H_
#define MDOPT_COMM_MPI_MAX_COUNT_H_

#include <cstdint>

namespace mdopt::mpi {

int64_t MaxCount();
// n in [1, INT_MAX]; 0 restores the default (the environment's value, else INT_MAX).
void SetMaxCountForTesting(int64_t n);

}  // namespace mdopt::mpi

#endif  // MDOPT_COMM_MPI_MAX_COUNT_H_
