// The communicators on one GPU (one rank: the device machine has one).
//   NCCL: every collective on device buffers against the values it must produce; equal counts
//   only (its capabilities; the refusal of unequal counts needs two ranks, so its check,
//   CheckEqualCounts, is held to its message here and in comm_local_test); host buffers
//   through its device staging (every collective, a staging buffer that grows, a device
//   collective in flight on another stream meanwhile); the argument checks shared with the
//   other backends, Abort, and creation with a peer that never joins (it must time out with
//   DeadlineExceeded, not hang).
//   The host-staged adapter over the local communicator: device buffers staged through
//   pinned host memory, ordered after the stream's queued work, results on the device when
//   the request is finished, staging kept per size.
#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <memory>
#include <vector>

#include "absl/time/time.h"
#include "comm/arg_checks.h"
#include "comm/communicator.h"
#include "comm/host_staged_communicator.h"
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

TEST(NcclComm, EqualCountsOnly) {
  MDOPT_SKIP_WITHOUT_GPU();
  std::unique_ptr<Communicator> c = OneRank();
  ASSERT_NE(c, nullptr);
  EXPECT_TRUE(c->equal_counts_only());
  EXPECT_TRUE(c->device_memory_ok());
  // What its reduce-scatter and all-gather answer counts that differ with (they cannot differ
  // at one rank): InvalidArgument naming them and the way out.
  const int64_t uneven[] = {4, 4, 3, 0};
  const absl::Status s = CheckEqualCounts(CommShape{0, 4, "nccl", true}, "all-gather", uneven);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(),
            "all-gather: the 'nccl' backend takes equal counts only, not 4, 4, 3, 0 (pad every "
            "rank's segment to the largest: the optimizer's comm_pad option)");
  // Equal counts: one reduce-scatter and one all-gather of 6 elements.
  testing::DeviceVec<float> a, b(6);
  const std::vector<float> v = {1, 2, 3, 4, 5, 6};
  a.Upload(v);
  const int64_t six[] = {6};
  ASSERT_TRUE(Finish(c->ReduceScatter(a.get(), b.get(), six, DataType::kF32, ReduceOp::kMean,
                                      MemorySpace::kDevice)).ok());
  EXPECT_EQ(b.Download(), v);
  b.Upload(std::vector<float>(6, 0.0f));
  ASSERT_TRUE(Finish(c->AllGather(a.get(), b.get(), six, DataType::kF32, MemorySpace::kDevice)).ok());
  EXPECT_EQ(b.Download(), v);
}

TEST(NcclComm, HostMemoryThroughDeviceStaging) {
  MDOPT_SKIP_WITHOUT_GPU();
  std::unique_ptr<Communicator> c = OneRank();
  ASSERT_NE(c, nullptr);
  const MemorySpace host = MemorySpace::kHost;
  // A device collective in flight on a caller's stream while the host ones run.
  cudaStream_t s = nullptr;
  MDOPT_ASSERT_CUDA(cudaStreamCreate(&s));
  testing::DeviceVec<double> dev;
  dev.Upload(std::vector<double>(1000, 0.25));
  absl::StatusOr<RequestPtr> pending =
      c->AllReduce(dev.get(), dev.get(), 1000, DataType::kF64, ReduceOp::kSum,
                   MemorySpace::kDevice, StreamSlot{s});
  ASSERT_TRUE(pending.ok()) << pending.status();

  // The optimizer's queries: an all-gather of doubles, a broadcast; the checkpoint's: an
  // all-gather of 1 KiB records. The request comes back finished.
  std::vector<double> mine = {1.5, -2.0, 3.0}, all(3, 0.0);
  const int64_t three[] = {3};
  absl::StatusOr<RequestPtr> r = c->AllGather(mine.data(), all.data(), three, DataType::kF64, host);
  ASSERT_TRUE(r.ok()) << r.status();
  absl::StatusOr<bool> done = (*r)->Test();
  ASSERT_TRUE(done.ok());
  EXPECT_TRUE(*done);
  EXPECT_EQ(all, mine);
  std::vector<uint8_t> record(1024), records(1024, 0);
  for (size_t k = 0; k < record.size(); ++k) record[k] = static_cast<uint8_t>(k * 7);
  const int64_t kib[] = {1024};
  ASSERT_TRUE(Finish(c->AllGather(record.data(), records.data(), kib, DataType::kBytes, host)).ok());
  EXPECT_EQ(records, record);
  ASSERT_TRUE(Finish(c->AllGather(nullptr, records.data(), kib, DataType::kBytes, host)).ok());  // in place
  EXPECT_EQ(records, record);
  std::vector<double> b = {4.0, 5.0};
  ASSERT_TRUE(Finish(c->Broadcast(b.data(), 2, DataType::kF64, 0, host)).ok());
  EXPECT_EQ(b, (std::vector<double>{4.0, 5.0}));
  // Every other collective, and a staging buffer that grows (1 MiB after a few bytes).
  std::vector<float> x(1 << 18), y(1 << 18, 0.0f);
  for (size_t k = 0; k < x.size(); ++k) x[k] = static_cast<float>(k % 1000) * 0.5f;
  ASSERT_TRUE(Finish(c->AllReduce(x.data(), y.data(), 1 << 18, DataType::kF32, ReduceOp::kSum, host)).ok());
  EXPECT_EQ(y, x);
  std::vector<float> z = x;
  ASSERT_TRUE(Finish(c->AllReduce(z.data(), z.data(), 1 << 18, DataType::kF32, ReduceOp::kMean, host)).ok());
  EXPECT_EQ(z, x);
  const int64_t big[] = {1 << 18};
  std::fill(y.begin(), y.end(), 0.0f);
  ASSERT_TRUE(Finish(c->ReduceScatter(x.data(), y.data(), big, DataType::kF32, ReduceOp::kSum, host)).ok());
  EXPECT_EQ(y, x);
  std::vector<float> got(5, 0.0f);
  const P2P ops[] = {{0, true, x.data(), 5, DataType::kF32}, {0, false, got.data(), 5, DataType::kF32}};
  ASSERT_TRUE(Finish(c->SendRecv(ops, 1, host)).ok());
  EXPECT_EQ(got, std::vector<float>(x.begin(), x.begin() + 5));

  ASSERT_TRUE((*pending)->Wait().ok());
  EXPECT_EQ(dev.Download(), std::vector<double>(1000, 0.25));
  cudaStreamDestroy(s);
  EXPECT_EQ(c->stats().ops, 9);
}

TEST(NcclComm, RefusesBadArguments) {
  MDOPT_SKIP_WITHOUT_GPU();
  std::unique_ptr<Communicator> c = OneRank();
  ASSERT_NE(c, nullptr);
  testing::DeviceVec<float> a(4);
  absl::StatusOr<RequestPtr> r =
      c->AllReduce(a.get(), a.get(), -1, DataType::kF32, ReduceOp::kSum, MemorySpace::kDevice);
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

// The host-staged adapter on a real device, over the local communicator.
TEST(HostStagedOnGpu, DeviceBuffersThroughPinnedStaging) {
  MDOPT_SKIP_WITHOUT_GPU();
  EXPECT_EQ(MakeHostStagedCommunicator(nullptr).status().code(), absl::StatusCode::kInvalidArgument);
  std::unique_ptr<Communicator> local = MakeLocalCommunicator();
  absl::StatusOr<std::unique_ptr<Communicator>> made = MakeHostStagedCommunicator(local.get());
  ASSERT_TRUE(made.ok()) << made.status();
  Communicator& c = **made;
  EXPECT_TRUE(c.device_memory_ok());
  EXPECT_FALSE(c.equal_counts_only());
  const MemorySpace dev = MemorySpace::kDevice;
  cudaStream_t s = nullptr;
  MDOPT_ASSERT_CUDA(cudaStreamCreate(&s));
  // Work queued on the stream before the collective (a memset) is what the collective reads.
  const size_t n = 1 << 20;
  testing::DeviceVec<float> a(n), b(n);
  MDOPT_ASSERT_CUDA(cudaMemsetAsync(a.get(), 0, n * sizeof(float), s));
  absl::StatusOr<RequestPtr> r =
      c.AllReduce(a.get(), b.get(), static_cast<int64_t>(n), DataType::kF32, ReduceOp::kSum, dev,
                  StreamSlot{s});
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_TRUE((*r)->OrderBefore(StreamSlot{s}).ok());
  EXPECT_EQ(b.Download(), std::vector<float>(n, 0.0f));
  // Every collective at one rank: what it must give.
  const std::vector<float> v = {1.5f, -2.0f, 3.25f, 0.0f, 7.0f};
  a.Upload(v);
  b.Resize(v.size());
  const int64_t five[] = {5};
  ASSERT_TRUE(Finish(c.ReduceScatter(a.get(), b.get(), five, DataType::kF32, ReduceOp::kMean, dev, StreamSlot{s})).ok());
  EXPECT_EQ(b.Download(), v);
  b.Upload(std::vector<float>(5, 0.0f));
  ASSERT_TRUE(Finish(c.AllGather(a.get(), b.get(), five, DataType::kF32, dev, StreamSlot{s})).ok());
  EXPECT_EQ(b.Download(), v);
  ASSERT_TRUE(Finish(c.AllGather(nullptr, a.get(), five, DataType::kF32, dev, StreamSlot{})).ok());
  EXPECT_EQ(a.Download(), v);
  ASSERT_TRUE(Finish(c.Broadcast(a.get(), 5, DataType::kF32, 0, dev, StreamSlot{s})).ok());
  EXPECT_EQ(a.Download(), v);
  b.Upload(std::vector<float>(5, 0.0f));
  const P2P ops[] = {{0, true, a.get(), 5, DataType::kF32}, {0, false, b.get(), 5, DataType::kF32}};
  ASSERT_TRUE(Finish(c.SendRecv(ops, 3, dev, StreamSlot{s})).ok());
  EXPECT_EQ(b.Download(), v);
  // Host buffers go to the local communicator as they are.
  std::vector<double> h = {1.0, 2.0};
  ASSERT_TRUE(Finish(c.AllReduce(h.data(), h.data(), 2, DataType::kF64, ReduceOp::kSum, MemorySpace::kHost)).ok());
  EXPECT_EQ(h, (std::vector<double>{1.0, 2.0}));
  // A second round of the same calls: the same staging again (nothing to observe here but
  // that it works; the allocation count is the CPU test's, host_staged_comm_test).
  for (int k = 0; k < 3; ++k) {
    ASSERT_TRUE(Finish(c.AllReduce(a.get(), a.get(), 5, DataType::kF32, ReduceOp::kSum, dev, StreamSlot{s})).ok());
  }
  EXPECT_EQ(a.Download(), v);
  cudaStreamDestroy(s);
}

}  // namespace
}  // namespace mdopt
