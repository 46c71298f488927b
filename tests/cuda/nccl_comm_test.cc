// The NCCL communicator on one GPU (one rank: the device machine has one), every collective
// on device buffers against the values it must produce, the argument checks shared with
// the other backends, Abort, and creation with a peer that never joins (it must time out
// with DeadlineExceeded, not hang). Multi-rank NCCL needs several GPUs; its collectives'
// code paths for unequal counts (groups of ncclReduce / ncclBroadcast) run here at one rank.
#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <memory>
#include <vector>

#include "absl/time/time.h"
#include "comm/communicator.h"
#include "cuda_test_util.h"
#include "kernels/common/bf16.h"

namespace mdopt {
namespace {

std::unique_ptr<Communicator> OneRank() {
  char id[kNcclIdBytes];
  if (!NcclUniqueId(id).ok()) return nullptr;
  absl::StatusOr<std::unique_ptr<Communicator>> c =
      MakeNcclCommunicator(id, 1, 0, 0, absl::Seconds(60));
  if (!c.ok()) {
    ADD_FAILURE() << c.status();
    return nullptr;
  }
  return *std::move(c);
}

absl::Status Finish(absl::StatusOr<RequestPtr> r) {
  if (!r.ok()) return r.status();
  return (*r)->Wait();
}

TEST(NcclComm, CollectivesAtOneRank) {
  MDOPT_SKIP_WITHOUT_GPU();
  std::unique_ptr<Communicator> c = OneRank();
  ASSERT_NE(c, nullptr);
  EXPECT_EQ(c->backend(), "nccl");
  EXPECT_EQ(c->size(), 1);
  const std::vector<float> v = {1.5f, -2.0f, 3.25f, 0.0f, 7.0f};
  testing::DeviceVec<float> a, b(v.size());
  a.Upload(v);
  const MemorySpace dev = MemorySpace::kDevice;
  ASSERT_TRUE(Finish(c->AllReduce(a.get(), b.get(), 5, DataType::kF32, ReduceOp::kSum, dev)).ok());
  EXPECT_EQ(b.Download(), v);
  ASSERT_TRUE(Finish(c->AllReduce(a.get(), a.get(), 5, DataType::kF32, ReduceOp::kMean, dev)).ok());
  EXPECT_EQ(a.Download(), v);
  const int64_t counts[] = {5};
  b.Upload(std::vector<float>(5, 0.0f));
  ASSERT_TRUE(Finish(c->ReduceScatter(a.get(), b.get(), counts, DataType::kF32, ReduceOp::kSum, dev)).ok());
  EXPECT_EQ(b.Download(), v);
  b.Upload(std::vector<float>(5, 0.0f));
  ASSERT_TRUE(Finish(c->AllGather(a.get(), b.get(), counts, DataType::kF32, dev)).ok());
  EXPECT_EQ(b.Download(), v);
  ASSERT_TRUE(Finish(c->AllGather(nullptr, a.get(), counts, DataType::kF32, dev)).ok());  // in place
  EXPECT_EQ(a.Download(), v);
  ASSERT_TRUE(Finish(c->Broadcast(a.get(), 5, DataType::kF32, 0, dev)).ok());
  EXPECT_EQ(a.Download(), v);
  // bf16 and f64 travel as themselves.
  std::vector<uint16_t> h;
  for (float x : v) h.push_back(kernels::FloatToBf16(x));
  testing::DeviceVec<uint16_t> hb;
  hb.Upload(h);
  ASSERT_TRUE(Finish(c->AllReduce(hb.get(), hb.get(), 5, DataType::kBf16, ReduceOp::kSum, dev)).ok());
  EXPECT_EQ(hb.Download(), h);
  testing::DeviceVec<double> d;
  d.Upload({1.0 / 3.0, 2.0});
  ASSERT_TRUE(Finish(c->AllReduce(d.get(), d.get(), 2, DataType::kF64, ReduceOp::kSum, dev)).ok());
  EXPECT_EQ(d.Download(), (std::vector<double>{1.0 / 3.0, 2.0}));
  // Send to oneself, on a caller's stream.
  cudaStream_t s = nullptr;
  MDOPT_ASSERT_CUDA(cudaStreamCreate(&s));
  b.Upload(std::vector<float>(5, 0.0f));
  const P2P ops[] = {{0, true, a.get(), 5, DataType::kF32}, {0, false, b.get(), 5, DataType::kF32}};
  ASSERT_TRUE(Finish(c->SendRecv(ops, 3, dev, StreamSlot{s})).ok());
  EXPECT_EQ(b.Download(), v);
  cudaStreamDestroy(s);
  ASSERT_TRUE(Finish(c->Barrier()).ok());
  EXPECT_EQ(c->stats().bytes_sent, 0);  // one rank moves nothing
  EXPECT_EQ(c->stats().ops, 10);
}

TEST(NcclComm, RefusesHostMemoryAndBadArguments) {
  MDOPT_SKIP_WITHOUT_GPU();
  std::unique_ptr<Communicator> c = OneRank();
  ASSERT_NE(c, nullptr);
  std::vector<float> host(4, 1.0f);
  absl::StatusOr<RequestPtr> r =
      c->AllReduce(host.data(), host.data(), 4, DataType::kF32, ReduceOp::kSum, MemorySpace::kHost);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
  testing::DeviceVec<float> a(4);
  r = c->AllReduce(a.get(), a.get(), -1, DataType::kF32, ReduceOp::kSum, MemorySpace::kDevice);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
  r = c->Broadcast(a.get(), 4, DataType::kF32, 1, MemorySpace::kDevice);  // root out of range
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
}

TEST(NcclComm, AbortFailsLaterOperations) {
  MDOPT_SKIP_WITHOUT_GPU();
  std::unique_ptr<Communicator> c = OneRank();
  ASSERT_NE(c, nullptr);
  c->Abort("test abort");
  testing::DeviceVec<float> a(4);
  absl::StatusOr<RequestPtr> r =
      c->AllReduce(a.get(), a.get(), 4, DataType::kF32, ReduceOp::kSum, MemorySpace::kDevice);
  EXPECT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kAborted) << r.status();
}

// Rank 0 of 2 with nobody as rank 1: creation must give up at the timeout and abort.
TEST(NcclComm, CreationTimesOutWhenAPeerNeverJoins) {
  MDOPT_SKIP_WITHOUT_GPU();
  char id[kNcclIdBytes];
  ASSERT_TRUE(NcclUniqueId(id).ok());
  const auto t0 = std::chrono::steady_clock::now();
  absl::StatusOr<std::unique_ptr<Communicator>> c =
      MakeNcclCommunicator(id, 2, 0, 0, absl::Seconds(3));
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kDeadlineExceeded) << c.status();
  EXPECT_LT(secs, 30.0);
}

TEST(NcclComm, RefusesBadRankAndDevice) {
  MDOPT_SKIP_WITHOUT_GPU();
  char id[kNcclIdBytes];
  ASSERT_TRUE(NcclUniqueId(id).ok());
  EXPECT_EQ(MakeNcclCommunicator(id, 2, 2, 0, absl::Seconds(3)).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(MakeNcclCommunicator(id, 1, 0, 999, absl::Seconds(3)).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(MakeNcclCommunicator(nullptr, 1, 0, 0, absl::Seconds(3)).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace mdopt
