// CommStats.bytes_sent by construction (the formulas of comm/communicator.h), so that every
// backend reports the same numbers for the same calls. The model is direct delivery: what
// this rank must put on the wire for every other rank to get what it needs from this rank,
// each byte sent once (for equal counts, what the ring algorithms send).
#ifndef MDOPT_COMM_TRAFFIC_H_
#define MDOPT_COMM_TRAFFIC_H_

#include <cstdint>

#include "absl/types/span.h"
#include "comm/communicator.h"

namespace mdopt {

// Reduce-scatter: every other rank's segment of this rank's input leaves once,
// (sum(counts) - counts[rank]) * element size.
int64_t ReduceScatterTraffic(absl::Span<const int64_t> counts, int rank, DataType dtype);
// All-gather: this rank's segment goes to each other rank, counts[rank] * (N - 1) * element
// size with N = counts.size().
int64_t AllGatherTraffic(absl::Span<const int64_t> counts, int rank, DataType dtype);
// 2 * (N - 1) * count * element size / N, rounded down (exact in 64 bits): a reduce-scatter
// and an all-gather of N equal parts.
int64_t AllReduceTraffic(int64_t count, int size, DataType dtype);
// count * element size * (size - 1) on the root (one copy to each other rank), 0 elsewhere.
int64_t BroadcastTraffic(int64_t count, DataType dtype, int root, int rank, int size);
// The bytes of the sends to other ranks.
int64_t SendRecvTraffic(absl::Span<const P2P> ops, int rank);

}  // namespace mdopt

#endif  // MDOPT_COMM_TRAFFIC_H_
