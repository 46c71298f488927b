#include "comm/traffic.h"

namespace mdopt {

int64_t ReduceScatterTraffic(absl::Span<const int64_t> counts, int rank, DataType dtype) {
  int64_t others = 0;
  for (size_t r = 0; r < counts.size(); ++r) {
    if (static_cast<int>(r) != rank) others += counts[r];
  }
  return others * static_cast<int64_t>(ElementSize(dtype));
}

int64_t AllGatherTraffic(absl::Span<const int64_t> counts, int rank, DataType dtype) {
  if (counts.size() <= 1 || rank < 0 || static_cast<size_t>(rank) >= counts.size()) return 0;
  const int64_t peers = static_cast<int64_t>(counts.size()) - 1;
  return counts[static_cast<size_t>(rank)] * static_cast<int64_t>(ElementSize(dtype)) * peers;
}

int64_t AllReduceTraffic(int64_t count, int size, DataType dtype) {
  if (size <= 1) return 0;
  const int64_t bytes = count * static_cast<int64_t>(ElementSize(dtype));
  // floor(2(N-1) * bytes / N) without forming 2(N-1) * bytes, which can overflow.
  const int64_t q = bytes / size, r = bytes % size, k = 2 * (size - 1);
  return k * q + k * r / size;
}

int64_t BroadcastTraffic(int64_t count, DataType dtype, int root, int rank, int size) {
  if (rank != root || size <= 1) return 0;
  return count * static_cast<int64_t>(ElementSize(dtype)) * (size - 1);
}

int64_t SendRecvTraffic(absl::Span<const P2P> ops, int rank) {
  int64_t bytes = 0;
  for (const P2P& p : ops) {
    if (p.is_send && p.peer != rank) bytes += p.count * static_cast<int64_t>(ElementSize(p.dtype));
  }
  return bytes;
}

}  // namespace mdopt
