// CommStats.bytes_sent by construction (the formulas of comm/communicator.h), so that every
// backend reports the same numbers for the same calls.
#ifndef MDOPT_COMM_TRAFFIC_H_
#define MDOPT_COMM_TRAFFIC_H_

#include <cstdint>

#include "absl/types/span.h"
#include "comm/communicator.h"

namespace mdopt {

// Reduce-scatter and all-gather: (sum(counts) - counts[rank]) * element size.
int64_t ScatterGatherTraffic(absl::Span<const int64_t> counts, int rank, DataType dtype);
// 2 * (N - 1) * count * element size / N, rounded down (exact in 64 bits).
int64_t AllReduceTraffic(int64_t count, int size, DataType dtype);
// count * element size on the root, 0 elsewhere.
int64_t BroadcastTraffic(int64_t count, DataType dtype, int root, int rank);
// The bytes of the sends to other ranks.
int64_t SendRecvTraffic(absl::Span<const P2P> ops, int rank);

}  // namespace mdopt

#endif  // MDOPT_COMM_TRAFFIC_H_
