// A build without CUDA or NCCL: the factories say so instead of failing to link.
#include "comm/communicator.h"

namespace mdopt {
namespace {

absl::Status NotBuilt() {
  return absl::UnimplementedError(
      "this build of mdopt has no NCCL backend (configure with -DMDOPT_CUDA=ON where nvcc, "
      "the CUDA toolkit and NCCL are installed)");
}

}  // namespace

bool NcclBackendBuilt() { return false; }

absl::Status NcclUniqueId(char*) { return NotBuilt(); }

absl::StatusOr<std::unique_ptr<Communicator>> MakeNcclCommunicator(const char*, int, int, int,
                                                                   absl::Duration) {
  return NotBuilt();
}

}  // namespace mdopt
