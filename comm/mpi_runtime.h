// Process-wide MPI state mdopt owns: whether it initialised MPI (and so must finalise it),
// and which of its communicators still hold MPI resources. Internal: includes mpi.h.
#ifndef MDOPT_COMM_MPI_RUNTIME_H_
#define MDOPT_COMM_MPI_RUNTIME_H_

#include <mpi.h>

#include <functional>
#include <string>

#include "absl/status/status.h"

namespace mdopt::mpi {

// Initialises MPI with MPI_THREAD_MULTIPLE unless the host already did; *provided is the
// thread level in force. FailedPrecondition when MPI was finalised.
absl::Status EnsureInitialised(int* provided);

// A communicator holds MPI resources from Acquire until Release (clean: its requests
// completed and its objects were freed) or Leak (it gave up on requests that never ended).
// MPI is finalised at exit only when every communicator released cleanly: finalising with
// requests in flight, or while a detached progress thread still calls MPI, is erroneous.
void Acquire();
void Release();
void Leak();

// A communicator still alive at process exit (never destroyed: a program that returns from
// main without mdopt_comm_destroy, or an optimizer that was never destroyed and holds it) is
// shut down there, before MPI_Finalize: `shutdown` (its drain, which ends in Release or
// Leak) runs once at exit unless Unregister(key) came first. Without this MPI would never
// be finalised in such a program and mpirun would report that its processes exited
// improperly. Only when mdopt initialised MPI (a host that did finalises it itself).
void RegisterForExit(const void* key, std::function<void()> shutdown);
void Unregister(const void* key);

// MPI's text for an error code.
std::string ErrorString(int code);

}  // namespace mdopt::mpi

#endif  // MDOPT_COMM_MPI_RUNTIME_H_
