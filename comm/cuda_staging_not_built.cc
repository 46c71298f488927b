// A build without CUDA: the host-staged adapter's CUDA device is not there (its logic is,
// host_staged_communicator.cc, over any StagingDevice).
#include "comm/host_staged_communicator.h"

namespace mdopt {

absl::StatusOr<std::unique_ptr<Communicator>> MakeHostStagedCommunicator(Communicator*) {
  return absl::UnimplementedError(
      "this build of mdopt has no CUDA: no host-staged communicator for device memory "
      "(configure with -DMDOPT_CUDA=ON where nvcc and the CUDA toolkit are installed)");
}

}  // namespace mdopt
