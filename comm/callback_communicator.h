// A Communicator whose transport is the caller's: the collectives arrive as the C callbacks
// of mdopt_comm_callbacks (include/mdopt/comm.h), e.g. a torch.distributed process group
// wrapped by the Python package. The backend validates arguments, turns means into sums
// plus a division of its own, keeps CommStats and the health/timeout/Abort semantics of
// comm/communicator.h, and hands everything else to the callbacks.
#ifndef MDOPT_COMM_CALLBACK_COMMUNICATOR_H_
#define MDOPT_COMM_CALLBACK_COMMUNICATOR_H_

#include <memory>

#include "absl/status/statusor.h"
#include "comm/communicator.h"
#include "mdopt/comm.h"

namespace mdopt {

// `cb` is copied (the caller has already read it at its struct_size). InvalidArgument when
// a required callback is missing or rank/size are out of range.
absl::StatusOr<std::unique_ptr<Communicator>> MakeCallbackCommunicator(
    const mdopt_comm_callbacks& cb);

}  // namespace mdopt

#endif  // MDOPT_COMM_CALLBACK_COMMUNICATOR_H_
