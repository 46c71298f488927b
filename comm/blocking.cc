// The blocking forms the optimizer used before the interface became asynchronous.
#include "comm/communicator.h"

namespace mdopt {
namespace {

absl::Status StartAndWait(absl::StatusOr<RequestPtr> r) {
  if (!r.ok()) return r.status();
  return (*r)->Wait();
}

}  // namespace

absl::Status AllReduceSum(Communicator& c, absl::Span<double> data) {
  return StartAndWait(c.AllReduce(data.data(), data.data(), static_cast<int64_t>(data.size()),
                                  DataType::kF64, ReduceOp::kSum));
}

absl::Status BroadcastBytes(Communicator& c, absl::Span<uint8_t> data, int root) {
  return StartAndWait(
      c.Broadcast(data.data(), static_cast<int64_t>(data.size()), DataType::kBytes, root));
}

absl::Status BarrierBlocking(Communicator& c) { return StartAndWait(c.Barrier()); }

}  // namespace mdopt
