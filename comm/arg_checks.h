// Argument checks every backend applies before it starts anything, so that a bad call
// fails the same way (InvalidArgument) whatever the backend. They are local: a rank that
// passes bad arguments skips an operation its peers start, and they time out.
#ifndef MDOPT_COMM_ARG_CHECKS_H_
#define MDOPT_COMM_ARG_CHECKS_H_

#include <cstdint>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "comm/communicator.h"

namespace mdopt {

struct CommShape {
  int rank;
  int size;
  absl::string_view backend;
  bool device_memory;  // whether the backend takes MemorySpace::kDevice
};

// On success *total = sum(counts).
absl::Status CheckReduceScatter(const CommShape& c, const void* send, const void* recv,
                                absl::Span<const int64_t> counts, DataType dtype, ReduceOp op,
                                MemorySpace space, int64_t* total);
absl::Status CheckAllGather(const CommShape& c, const void* send, const void* recv,
                            absl::Span<const int64_t> counts, DataType dtype, MemorySpace space,
                            int64_t* total);
absl::Status CheckAllReduce(const CommShape& c, const void* send, const void* recv,
                            int64_t count, DataType dtype, ReduceOp op, MemorySpace space);
absl::Status CheckBroadcast(const CommShape& c, const void* data, int64_t count, DataType dtype,
                            int root, MemorySpace space);
absl::Status CheckSendRecv(const CommShape& c, absl::Span<const P2P> ops, int tag,
                           MemorySpace space);

// For a backend with equal_counts_only(): InvalidArgument naming the counts (the first 8
// and how many there are) unless they are all equal. `op`: "reduce-scatter", "all-gather".
absl::Status CheckEqualCounts(const CommShape& c, absl::string_view op,
                              absl::Span<const int64_t> counts);

absl::string_view ReduceOpName(ReduceOp op);

}  // namespace mdopt

#endif  // MDOPT_COMM_ARG_CHECKS_H_
