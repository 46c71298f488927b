// A build without MPI: the factory says so instead of failing to link.
#include "comm/communicator.h"

namespace mdopt {

bool MpiBackendBuilt() { return false; }

absl::StatusOr<std::unique_ptr<Communicator>> MakeMpiCommunicator(void*) {
  return absl::UnimplementedError(
      "this build of mdopt has no MPI backend (configure with -DMDOPT_MPI=ON and an MPI "
      "installation)");
}

}  // namespace mdopt
