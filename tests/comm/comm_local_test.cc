// The local backend (rank 0 of 1), the shared argument checks, the byte formulas and the
// host arithmetic of bf16 reductions.
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "comm/arg_checks.h"
#include "comm/communicator.h"
#include "comm/host_reduce.h"
#include "comm/traffic.h"
#include "gtest/gtest.h"
#include "kernels/common/bf16.h"

namespace mdopt {
namespace {

constexpr DataType kAllTypes[] = {DataType::kF32, DataType::kBf16, DataType::kF64,
                                  DataType::kBytes};
constexpr DataType kNumeric[] = {DataType::kF32, DataType::kBf16, DataType::kF64};

std::vector<uint8_t> Pattern(int64_t count, DataType dtype, int seed) {
  std::vector<uint8_t> v(static_cast<size_t>(count) * ElementSize(dtype));
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<uint8_t>(i * 7 + seed * 31 + 1);
  return v;
}

absl::Status RunNow(absl::StatusOr<RequestPtr> r) {
  if (!r.ok()) return r.status();
  absl::StatusOr<bool> t = (*r)->Test();
  if (!t.ok()) return t.status();
  if (!*t) return absl::InternalError("a local request was not done at once");
  return (*r)->Wait();
}

TEST(LocalComm, Identity) {
  auto c = MakeLocalCommunicator();
  EXPECT_EQ(c->rank(), 0);
  EXPECT_EQ(c->size(), 1);
  EXPECT_EQ(c->backend(), "local");
  EXPECT_EQ(c->progress_mode(), "immediate");
}

TEST(LocalComm, EveryCollectiveEveryDtypeCopiesOrKeeps) {
  auto c = MakeLocalCommunicator();
  const int64_t n = 13;
  const int64_t counts[] = {n};
  for (DataType dt : kAllTypes) {
    SCOPED_TRACE(std::string(DataTypeName(dt)));
    const std::vector<uint8_t> src = Pattern(n, dt, 1);
    std::vector<uint8_t> dst(src.size());
    if (dt != DataType::kBytes) {
      for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kMean}) {
        std::fill(dst.begin(), dst.end(), 0);
        ASSERT_TRUE(RunNow(c->ReduceScatter(src.data(), dst.data(), counts, dt, op)).ok());
        EXPECT_EQ(dst, src);
        std::fill(dst.begin(), dst.end(), 0);
        ASSERT_TRUE(RunNow(c->AllReduce(src.data(), dst.data(), n, dt, op)).ok());
        EXPECT_EQ(dst, src);
        std::vector<uint8_t> inplace = src;
        ASSERT_TRUE(RunNow(c->AllReduce(inplace.data(), inplace.data(), n, dt, op)).ok());
        EXPECT_EQ(inplace, src);
      }
    }
    std::fill(dst.begin(), dst.end(), 0);
    ASSERT_TRUE(RunNow(c->AllGather(src.data(), dst.data(), counts, dt)).ok());
    EXPECT_EQ(dst, src);
    std::vector<uint8_t> inplace = src;
    ASSERT_TRUE(RunNow(c->AllGather(nullptr, inplace.data(), counts, dt)).ok());
    EXPECT_EQ(inplace, src);
    ASSERT_TRUE(RunNow(c->Broadcast(inplace.data(), n, dt, 0)).ok());
    EXPECT_EQ(inplace, src);
    std::fill(dst.begin(), dst.end(), 0);
    const P2P ops[] = {{0, false, dst.data(), n, dt}, {0, true, inplace.data(), n, dt}};
    ASSERT_TRUE(RunNow(c->SendRecv(ops, 3)).ok());
    EXPECT_EQ(dst, src);
  }
  EXPECT_TRUE(RunNow(c->Barrier()).ok());
}

TEST(LocalComm, ZeroCountsAcceptNullBuffers) {
  auto c = MakeLocalCommunicator();
  const int64_t zero[] = {0};
  for (DataType dt : kNumeric) {
    EXPECT_TRUE(RunNow(c->ReduceScatter(nullptr, nullptr, zero, dt, ReduceOp::kSum)).ok());
    EXPECT_TRUE(RunNow(c->AllGather(nullptr, nullptr, zero, dt)).ok());
    EXPECT_TRUE(RunNow(c->AllReduce(nullptr, nullptr, 0, dt, ReduceOp::kMean)).ok());
    EXPECT_TRUE(RunNow(c->Broadcast(nullptr, 0, dt, 0)).ok());
  }
  EXPECT_TRUE(RunNow(c->SendRecv({}, 0)).ok());
}

TEST(LocalComm, SendRecvMatchesInOrder) {
  auto c = MakeLocalCommunicator();
  float a[2] = {1, 2}, b[3] = {3, 4, 5}, ra[2] = {}, rb[3] = {};
  const P2P ops[] = {{0, true, a, 2, DataType::kF32},
                     {0, true, b, 3, DataType::kF32},
                     {0, false, ra, 2, DataType::kF32},
                     {0, false, rb, 3, DataType::kF32}};
  ASSERT_TRUE(RunNow(c->SendRecv(ops, 0)).ok());
  EXPECT_EQ(ra[1], 2);
  EXPECT_EQ(rb[2], 5);
}

TEST(LocalComm, BadArgumentsAreInvalidArgument) {
  auto c = MakeLocalCommunicator();
  float x[4] = {}, y[4] = {};
  const int64_t one[] = {4};
  const int64_t two[] = {2, 2};
  const int64_t neg[] = {-1};
  auto invalid = [](absl::StatusOr<RequestPtr> r) {
    return !r.ok() && r.status().code() == absl::StatusCode::kInvalidArgument;
  };
  EXPECT_TRUE(invalid(c->ReduceScatter(x, y, two, DataType::kF32, ReduceOp::kSum)));
  EXPECT_TRUE(invalid(c->ReduceScatter(x, y, neg, DataType::kF32, ReduceOp::kSum)));
  EXPECT_TRUE(invalid(c->ReduceScatter(nullptr, y, one, DataType::kF32, ReduceOp::kSum)));
  EXPECT_TRUE(invalid(c->ReduceScatter(x, nullptr, one, DataType::kF32, ReduceOp::kSum)));
  EXPECT_TRUE(invalid(c->ReduceScatter(x, x, one, DataType::kF32, ReduceOp::kSum)));
  EXPECT_TRUE(invalid(c->ReduceScatter(x, y, one, DataType::kBytes, ReduceOp::kSum)));
  EXPECT_TRUE(invalid(c->ReduceScatter(x, y, one, DataType::kF32, static_cast<ReduceOp>(7))));
  EXPECT_TRUE(invalid(c->ReduceScatter(x, y, one, DataType::kF32, ReduceOp::kSum,
                                       MemorySpace::kDevice)));
  EXPECT_TRUE(invalid(c->AllGather(x, y, two, DataType::kF32)));
  EXPECT_TRUE(invalid(c->AllGather(x, nullptr, one, DataType::kF32)));
  EXPECT_TRUE(invalid(c->AllGather(x, y, one, static_cast<DataType>(9))));
  EXPECT_TRUE(invalid(c->AllGather(x, y, one, DataType::kF32, MemorySpace::kDevice)));
  EXPECT_TRUE(invalid(c->AllReduce(x, y, -1, DataType::kF32, ReduceOp::kSum)));
  EXPECT_TRUE(invalid(c->AllReduce(nullptr, y, 4, DataType::kF32, ReduceOp::kSum)));
  EXPECT_TRUE(invalid(c->AllReduce(x, y, 4, DataType::kBytes, ReduceOp::kSum)));
  EXPECT_TRUE(invalid(c->AllReduce(x, y, 4, DataType::kF32, ReduceOp::kSum,
                                   MemorySpace::kDevice)));
  EXPECT_TRUE(invalid(c->Broadcast(x, 4, DataType::kF32, 1)));
  EXPECT_TRUE(invalid(c->Broadcast(x, 4, DataType::kF32, -1)));
  EXPECT_TRUE(invalid(c->Broadcast(nullptr, 4, DataType::kF32, 0)));
  EXPECT_TRUE(invalid(c->Broadcast(x, 4, DataType::kF32, 0, MemorySpace::kDevice)));
  const P2P to_one[] = {{1, true, x, 4, DataType::kF32}};
  EXPECT_TRUE(invalid(c->SendRecv(to_one, 0)));
  const P2P unmatched[] = {{0, true, x, 4, DataType::kF32}};
  EXPECT_TRUE(invalid(c->SendRecv(unmatched, 0)));
  const P2P sizes[] = {{0, true, x, 4, DataType::kF32}, {0, false, y, 3, DataType::kF32}};
  EXPECT_TRUE(invalid(c->SendRecv(sizes, 0)));
  const P2P fine[] = {{0, true, x, 4, DataType::kF32}, {0, false, y, 4, DataType::kF32}};
  EXPECT_TRUE(invalid(c->SendRecv(fine, -1)));
  EXPECT_TRUE(invalid(c->SendRecv(fine, 40000)));
  EXPECT_TRUE(invalid(c->SendRecv(fine, 0, MemorySpace::kDevice)));
  // Refused calls start nothing.
  EXPECT_EQ(c->stats().ops, 0);
}

TEST(LocalComm, AbortFailsEveryLaterOperation) {
  auto c = MakeLocalCommunicator();
  double d[2] = {1, 2};
  absl::StatusOr<RequestPtr> before = c->AllReduce(d, d, 2, DataType::kF64, ReduceOp::kSum);
  ASSERT_TRUE(before.ok());
  c->Abort("the trainer gave up");
  c->Abort("twice is harmless");
  // Done before the abort: its result stands.
  EXPECT_TRUE((*before)->Wait().ok());
  const int64_t counts[] = {2};
  const P2P ops[] = {{0, true, d, 1, DataType::kF64}, {0, false, d + 1, 1, DataType::kF64}};
  std::vector<absl::StatusOr<RequestPtr>> later = {
      c->ReduceScatter(d, d + 1, counts, DataType::kF64, ReduceOp::kSum),
      c->AllGather(nullptr, d, counts, DataType::kF64),
      c->AllReduce(d, d, 2, DataType::kF64, ReduceOp::kSum),
      c->Broadcast(d, 2, DataType::kF64, 0),
      c->SendRecv(ops, 0),
      c->Barrier()};
  for (auto& r : later) {
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), absl::StatusCode::kAborted);
    EXPECT_NE(r.status().message().find("the trainer gave up"), absl::string_view::npos)
        << r.status();
  }
  std::vector<double> v(3, 1.0);
  EXPECT_EQ(AllReduceSum(*c, absl::MakeSpan(v)).code(), absl::StatusCode::kAborted);
}

TEST(LocalComm, StatsCountOpsAndNoBytes) {
  auto c = MakeLocalCommunicator();
  c->SetTimeout(absl::Seconds(1));
  std::vector<double> v(5, 2.0);
  ASSERT_TRUE(AllReduceSum(*c, absl::MakeSpan(v)).ok());
  EXPECT_EQ(v[4], 2.0);
  std::vector<uint8_t> b(9, 3);
  ASSERT_TRUE(BroadcastBytes(*c, absl::MakeSpan(b), 0).ok());
  EXPECT_EQ(BroadcastBytes(*c, absl::MakeSpan(b), 1).code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(BarrierBlocking(*c).ok());
  const CommStats s = c->stats();
  EXPECT_EQ(s.ops, 3);
  EXPECT_EQ(s.bytes_sent, 0);
  EXPECT_GE(s.busy_seconds, 0.0);
  EXPECT_GE(s.wait_seconds, 0.0);
}

TEST(LocalComm, CapabilitiesOfAHostBackend) {
  const std::unique_ptr<Communicator> c = MakeLocalCommunicator();
  EXPECT_FALSE(c->equal_counts_only());
  EXPECT_FALSE(c->device_memory_ok());
}

// The check an equal-counts-only backend (NCCL) applies to reduce-scatter and all-gather.
TEST(CommArgChecks, EqualCountsOnlyNamesTheCounts) {
  const CommShape nccl{1, 4, "nccl", true};
  const int64_t equal[] = {5, 5, 5, 5}, zeros[] = {0, 0, 0, 0}, uneven[] = {5, 5, 5, 4};
  EXPECT_TRUE(CheckEqualCounts(nccl, "reduce-scatter", equal).ok());
  EXPECT_TRUE(CheckEqualCounts(nccl, "reduce-scatter", zeros).ok());
  const absl::Status s = CheckEqualCounts(nccl, "reduce-scatter", uneven);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(),
            "reduce-scatter: the 'nccl' backend takes equal counts only, not 5, 5, 5, 4 (pad "
            "every rank's segment to the largest: the optimizer's comm_pad option)");
  // Many ranks: the first 8 counts and how many there are.
  std::vector<int64_t> many(1024, 3);
  many[1000] = 4;
  const CommShape big{0, 1024, "nccl", true};
  EXPECT_EQ(CheckEqualCounts(big, "all-gather", many).message(),
            "all-gather: the 'nccl' backend takes equal counts only, not 3, 3, 3, 3, 3, 3, 3, 3, "
            "... (1024 ranks) (pad every rank's segment to the largest: the optimizer's comm_pad "
            "option)");
}

TEST(CommTraffic, Formulas) {
  const int64_t counts[] = {3, 0, 5, 2};
  // Reduce-scatter: the other ranks' segments of this rank's input.
  EXPECT_EQ(ReduceScatterTraffic(counts, 0, DataType::kF32), (0 + 5 + 2) * 4);
  EXPECT_EQ(ReduceScatterTraffic(counts, 1, DataType::kBf16), 10 * 2);
  // All-gather: this rank's segment to each of the 3 others (not what it receives).
  EXPECT_EQ(AllGatherTraffic(counts, 0, DataType::kF32), 3 * 4 * 3);
  EXPECT_EQ(AllGatherTraffic(counts, 1, DataType::kBf16), 0);
  EXPECT_EQ(AllGatherTraffic(counts, 2, DataType::kF64), 5 * 8 * 3);
  const int64_t one[] = {9};
  EXPECT_EQ(AllGatherTraffic(one, 0, DataType::kF32), 0);
  EXPECT_EQ(ReduceScatterTraffic(one, 0, DataType::kF32), 0);
  EXPECT_EQ(AllReduceTraffic(10, 4, DataType::kF32), 2 * 3 * 40 / 4);
  EXPECT_EQ(AllReduceTraffic(7, 3, DataType::kBytes), 2 * 2 * 7 / 3);
  EXPECT_EQ(AllReduceTraffic(10, 1, DataType::kF64), 0);
  // No overflow near the top of int64.
  const int64_t big = std::numeric_limits<int64_t>::max() / 8;
  EXPECT_EQ(AllReduceTraffic(big, 2, DataType::kF64), big * 8);
  // Broadcast: the root's buffer to each other rank; nothing from the others.
  EXPECT_EQ(BroadcastTraffic(6, DataType::kF64, 2, 2, 4), 48 * 3);
  EXPECT_EQ(BroadcastTraffic(6, DataType::kF64, 2, 0, 4), 0);
  EXPECT_EQ(BroadcastTraffic(6, DataType::kF64, 0, 0, 1), 0);
  float x[3];
  const P2P ops[] = {{1, true, x, 3, DataType::kF32}, {1, false, x, 3, DataType::kF32},
                     {0, true, x, 2, DataType::kF32}};
  EXPECT_EQ(SendRecvTraffic(ops, 0), 12);
}

TEST(CommHostReduce, Bf16SumRoundsToNearestEven) {
  using kernels::Bf16ToFloat;
  using kernels::FloatToBf16;
  // 1 + 2^-8 is halfway between 1 and 1 + 2^-7 (bf16 has 7 fraction bits): ties to even, 1.
  const uint16_t one = FloatToBf16(1.0f), tiny = FloatToBf16(0.00390625f);
  uint16_t io = one;
  Bf16SumInto(&tiny, &io, 1);
  EXPECT_EQ(Bf16ToFloat(io), 1.0f);
  // (1 + 2^-7) + 2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6: rounds up to even.
  io = FloatToBf16(1.0078125f);
  Bf16SumInto(&tiny, &io, 1);
  EXPECT_EQ(Bf16ToFloat(io), 1.015625f);
  uint16_t m[2] = {FloatToBf16(3.0f), FloatToBf16(-1.0f)};
  DivideInPlace(m, 2, DataType::kBf16, 3);
  EXPECT_EQ(m[0], FloatToBf16(1.0f));
  EXPECT_EQ(m[1], FloatToBf16(-1.0f / 3.0f));
  double d[1] = {1.0};
  DivideInPlace(d, 1, DataType::kF64, 3);
  EXPECT_EQ(d[0], 1.0 / 3.0);
}

TEST(CommMpiFactory, ConsistentWithTheBuild) {
  if (MpiBackendBuilt()) GTEST_SKIP() << "exercised under mpirun by comm_mpi_test";
  absl::StatusOr<std::unique_ptr<Communicator>> c = MakeMpiCommunicator(nullptr);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kUnimplemented);
}

}  // namespace
}  // namespace mdopt
