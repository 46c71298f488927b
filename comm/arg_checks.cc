#include "comm/arg_checks.h"

#include <string>

#include "absl/strings/str_cat.h"

namespace mdopt {
namespace {

absl::Status Bad(absl::string_view op, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(op, ": ", what));
}

absl::Status CheckSpace(const CommShape& c, absl::string_view op, MemorySpace space) {
  if (space == MemorySpace::kHost) return absl::OkStatus();
  if (space == MemorySpace::kDevice && c.device_memory) return absl::OkStatus();
  if (space == MemorySpace::kDevice) {
    return Bad(op, absl::StrCat("the '", c.backend,
                                "' backend takes host memory only; device buffers need a "
                                "device backend"));
  }
  return Bad(op, "invalid memory space");
}

absl::Status CheckDtype(absl::string_view op, DataType dtype) {
  if (ElementSize(dtype) == 0) return Bad(op, "invalid dtype");
  return absl::OkStatus();
}

absl::Status CheckReduction(absl::string_view op, DataType dtype, ReduceOp r) {
  if (absl::Status s = CheckDtype(op, dtype); !s.ok()) return s;
  if (r != ReduceOp::kSum && r != ReduceOp::kMean) return Bad(op, "invalid reduce op");
  if (dtype == DataType::kBytes) return Bad(op, "bytes cannot be reduced; use a numeric dtype");
  return absl::OkStatus();
}

absl::Status CheckBuffer(absl::string_view op, absl::string_view name, const void* p,
                         int64_t count) {
  if (count < 0) return Bad(op, absl::StrCat("negative count ", count));
  if (p == nullptr && count > 0) {
    return Bad(op, absl::StrCat(name, " is null but ", count, " elements are to move"));
  }
  return absl::OkStatus();
}

absl::Status CheckCounts(const CommShape& c, absl::string_view op,
                         absl::Span<const int64_t> counts, int64_t* total) {
  if (static_cast<int64_t>(counts.size()) != c.size) {
    return Bad(op, absl::StrCat("counts has ", counts.size(), " entries, the communicator ",
                                c.size, " ranks"));
  }
  int64_t sum = 0;
  for (size_t r = 0; r < counts.size(); ++r) {
    if (counts[r] < 0) return Bad(op, absl::StrCat("counts[", r, "] = ", counts[r], " < 0"));
    sum += counts[r];
  }
  *total = sum;
  return absl::OkStatus();
}

absl::Status CheckRank(const CommShape& c, absl::string_view op, absl::string_view what,
                       int r) {
  if (r < 0 || r >= c.size) {
    return Bad(op, absl::StrCat(what, " ", r, " is not a rank of a ", c.size, "-rank communicator"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status CheckEqualCounts(const CommShape& c, absl::string_view op,
                              absl::Span<const int64_t> counts) {
  bool equal = true;
  for (int64_t v : counts) equal = equal && v == counts[0];
  if (equal) return absl::OkStatus();
  constexpr size_t kShown = 8;
  std::string list;
  for (size_t r = 0; r < counts.size() && r < kShown; ++r)
    absl::StrAppend(&list, r == 0 ? "" : ", ", counts[r]);
  if (counts.size() > kShown) absl::StrAppend(&list, ", ... (", counts.size(), " ranks)");
  return Bad(op, absl::StrCat("the '", c.backend, "' backend takes equal counts only, not ",
                              list, " (pad every rank's segment to the largest: the "
                              "optimizer's comm_pad option)"));
}

absl::string_view ReduceOpName(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return "sum";
    case ReduceOp::kMean: return "mean";
  }
  return "invalid op";
}

absl::Status CheckReduceScatter(const CommShape& c, const void* send, const void* recv,
                                absl::Span<const int64_t> counts, DataType dtype, ReduceOp op,
                                MemorySpace space, int64_t* total) {
  constexpr absl::string_view kOp = "reduce-scatter";
  if (absl::Status s = CheckSpace(c, kOp, space); !s.ok()) return s;
  if (absl::Status s = CheckReduction(kOp, dtype, op); !s.ok()) return s;
  if (absl::Status s = CheckCounts(c, kOp, counts, total); !s.ok()) return s;
  if (absl::Status s = CheckBuffer(kOp, "send", send, *total); !s.ok()) return s;
  if (absl::Status s = CheckBuffer(kOp, "recv", recv, counts[c.rank]); !s.ok()) return s;
  // The transports forbid aliased buffers here (MPI's in-place variant has another layout).
  if (send != nullptr && send == recv) return Bad(kOp, "send and recv must differ");
  return absl::OkStatus();
}

absl::Status CheckAllGather(const CommShape& c, const void* send, const void* recv,
                            absl::Span<const int64_t> counts, DataType dtype, MemorySpace space,
                            int64_t* total) {
  constexpr absl::string_view kOp = "all-gather";
  if (absl::Status s = CheckSpace(c, kOp, space); !s.ok()) return s;
  if (absl::Status s = CheckDtype(kOp, dtype); !s.ok()) return s;
  if (absl::Status s = CheckCounts(c, kOp, counts, total); !s.ok()) return s;
  // send == nullptr is the in-place form, so only recv must be there.
  return CheckBuffer(kOp, "recv", recv, *total);
}

absl::Status CheckAllReduce(const CommShape& c, const void* send, const void* recv,
                            int64_t count, DataType dtype, ReduceOp op, MemorySpace space) {
  constexpr absl::string_view kOp = "all-reduce";
  if (absl::Status s = CheckSpace(c, kOp, space); !s.ok()) return s;
  if (absl::Status s = CheckReduction(kOp, dtype, op); !s.ok()) return s;
  if (absl::Status s = CheckBuffer(kOp, "send", send, count); !s.ok()) return s;
  return CheckBuffer(kOp, "recv", recv, count);
}

absl::Status CheckBroadcast(const CommShape& c, const void* data, int64_t count, DataType dtype,
                            int root, MemorySpace space) {
  constexpr absl::string_view kOp = "broadcast";
  if (absl::Status s = CheckSpace(c, kOp, space); !s.ok()) return s;
  if (absl::Status s = CheckDtype(kOp, dtype); !s.ok()) return s;
  if (absl::Status s = CheckRank(c, kOp, "root", root); !s.ok()) return s;
  return CheckBuffer(kOp, "data", data, count);
}

absl::Status CheckSendRecv(const CommShape& c, absl::Span<const P2P> ops, int tag,
                           MemorySpace space) {
  constexpr absl::string_view kOp = "send/recv";
  if (absl::Status s = CheckSpace(c, kOp, space); !s.ok()) return s;
  if (tag < 0 || tag > 32767) {
    return Bad(kOp, absl::StrCat("tag ", tag, " outside [0, 32767] (the least MPI_TAG_UB)"));
  }
  for (const P2P& p : ops) {
    if (absl::Status s = CheckRank(c, kOp, "peer", p.peer); !s.ok()) return s;
    if (absl::Status s = CheckDtype(kOp, p.dtype); !s.ok()) return s;
    if (absl::Status s = CheckBuffer(kOp, "data", p.data, p.count); !s.ok()) return s;
  }
  return absl::OkStatus();
}

}  // namespace mdopt
