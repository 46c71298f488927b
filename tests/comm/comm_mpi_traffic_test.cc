// CommStats.bytes_sent of the MPI backend under mpirun (any number of ranks) against a count
// this test makes itself from each call's buffers, never from comm/traffic.h: what this rank
// puts on the wire when every byte another rank needs from it is sent to that rank once
// (direct delivery).
//   all-gather:     this rank's send buffer, once to each of the N - 1 others
//   reduce-scatter: the send buffer minus this rank's own segment (the size of recv)
//   all-reduce:     2 (N-1)/N of the buffer (a reduce-scatter then an all-gather of N parts)
//   broadcast:      the root's buffer, once to each of the N - 1 others; 0 elsewhere
//   send/recv:      the send buffers addressed to other ranks
// Every operation is also checked over all ranks: the bytes they sent add up to the bytes
// they received, each rank counting what landed in its receive buffers from other ranks (a
// model that counted an all-gather by what a rank receives, or a broadcast's root once,
// fails this at uneven counts or at more than two ranks). Even and uneven counts, one rank
// holding all of an all-gather (an owner gathering its whole matrix to everyone), zero
// counts, broadcasts from every root with a count that depends on the root, and send/recv
// groups: a ring, a fan-out from one rank with sends to itself, and a fan-in.
#include <mpi.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <deque>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "gtest/gtest.h"

namespace mdopt {
namespace {

#define ASSERT_OK(expr)                          \
  do {                                           \
    const absl::Status _s = (expr);              \
    ASSERT_TRUE(_s.ok()) << #expr << ": " << _s; \
  } while (0)

std::unique_ptr<Communicator> Make() {
  absl::StatusOr<std::unique_ptr<Communicator>> c = MakeMpiCommunicator(nullptr);
  EXPECT_TRUE(c.ok()) << c.status();
  if (!c.ok()) return nullptr;
  (*c)->SetTimeout(absl::Seconds(60));  // a failing rank must not hang its peers for long
  return *std::move(c);
}

absl::Status Finish(absl::StatusOr<RequestPtr> r) {
  if (!r.ok()) return r.status();
  return (*r)->Wait();
}

// Bytes of `n` elements of `dt`, spelled out here rather than taken from ElementSize.
int64_t Bytes(DataType dt, int64_t n) {
  switch (dt) {
    case DataType::kF32: return 4 * n;
    case DataType::kBf16: return 2 * n;
    case DataType::kF64: return 8 * n;
    case DataType::kBytes: return n;
  }
  return -1;
}

std::vector<uint8_t> Buffer(DataType dt, int64_t n) {
  return std::vector<uint8_t>(static_cast<size_t>(Bytes(dt, n)), 0);
}

int64_t Size(const std::vector<uint8_t>& b) { return static_cast<int64_t>(b.size()); }

// The delta of bytes_sent since `before` must be `want`; and over all ranks, the bytes sent
// must add up to the bytes received (`received`: what this rank got from other ranks).
void ExpectTraffic(Communicator& c, const CommStats& before, int64_t want, int64_t received,
                   const std::string& what) {
  const int64_t got = c.stats().bytes_sent - before.bytes_sent;
  EXPECT_EQ(got, want) << what << " on rank " << c.rank();
  std::vector<double> sums = {static_cast<double>(got), static_cast<double>(received)};
  ASSERT_OK(AllReduceSum(c, absl::MakeSpan(sums)));
  EXPECT_EQ(sums[0], sums[1]) << what << ": the ranks sent " << sums[0]
                              << " bytes in all and received " << sums[1];
}

// Rank-major layouts for N ranks: equal, uneven (rank r holds 2r + 1, odd ranks nothing),
// everything on the last rank, and all zero.
std::vector<std::vector<int64_t>> Layouts(int n) {
  std::vector<int64_t> equal(n, 6), uneven(n), owner(n, 0), zeros(n, 0);
  for (int r = 0; r < n; ++r) uneven[r] = r % 2 == 1 ? 0 : 2 * r + 1;
  owner[n - 1] = 40;
  return {equal, uneven, owner, zeros};
}

std::string Describe(const char* op, DataType dt, const std::vector<int64_t>& counts) {
  std::string s = std::string(op) + " " + std::string(DataTypeName(dt)) + " counts {";
  for (size_t r = 0; r < counts.size(); ++r) s += (r ? "," : "") + std::to_string(counts[r]);
  return s + "}";
}

TEST(MpiTraffic, AllGatherSendsThisRanksSegmentToEveryOtherRank) {
  auto c = Make();
  ASSERT_NE(c, nullptr);
  const int n = c->size(), me = c->rank();
  for (DataType dt : {DataType::kF32, DataType::kBf16, DataType::kF64, DataType::kBytes}) {
    for (const std::vector<int64_t>& counts : Layouts(n)) {
      for (bool in_place : {false, true}) {
        const std::string what = Describe("all-gather", dt, counts) + (in_place ? " in place" : "");
        int64_t total = 0, offset = 0;
        for (int r = 0; r < n; ++r) {
          total += counts[r];
          if (r < me) offset += counts[r];
        }
        std::vector<uint8_t> mine = Buffer(dt, counts[me]), all = Buffer(dt, total);
        for (size_t i = 0; i < mine.size(); ++i) mine[i] = static_cast<uint8_t>(31 * me + i + 1);
        // A rank with an empty segment copies nothing (memcpy from an empty vector's null
        // data() is undefined even for zero bytes).
        std::copy(mine.begin(), mine.end(), all.begin() + Bytes(dt, offset));
        const CommStats before = c->stats();
        ASSERT_OK(Finish(c->AllGather(in_place ? nullptr : mine.data(), all.data(), counts, dt)));
        // Every segment arrived (so the operation did move what is counted).
        int64_t at = 0;
        for (int r = 0; r < n; ++r) {
          for (int64_t i = 0; i < Bytes(dt, counts[r]); ++i, ++at) {
            ASSERT_EQ(all[at], static_cast<uint8_t>(31 * r + i + 1)) << what << " rank " << r;
          }
        }
        ExpectTraffic(*c, before, Size(mine) * (n - 1), Size(all) - Size(mine), what);
      }
    }
  }
}

TEST(MpiTraffic, ReduceScatterSendsEveryOtherRanksSegmentOnce) {
  auto c = Make();
  ASSERT_NE(c, nullptr);
  const int n = c->size(), me = c->rank();
  for (DataType dt : {DataType::kF32, DataType::kBf16, DataType::kF64}) {
    for (const std::vector<int64_t>& counts : Layouts(n)) {
      for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kMean}) {
        const std::string what = Describe("reduce-scatter", dt, counts);
        int64_t total = 0;
        for (int64_t k : counts) total += k;
        std::vector<uint8_t> in = Buffer(dt, total), out = Buffer(dt, counts[me]);
        const CommStats before = c->stats();
        ASSERT_OK(Finish(c->ReduceScatter(in.data(), out.data(), counts, dt, op)));
        // Sent: the whole input but this rank's own segment. Received: every other rank's
        // contribution to this rank's segment.
        ExpectTraffic(*c, before, Size(in) - Size(out), Size(out) * (n - 1), what);
      }
    }
  }
}

TEST(MpiTraffic, AllReduceSendsTwiceTheOtherRanksShare) {
  auto c = Make();
  ASSERT_NE(c, nullptr);
  const int n = c->size();
  for (DataType dt : {DataType::kF32, DataType::kBf16, DataType::kF64}) {
    for (int64_t count : {int64_t{1031}, int64_t{5}, int64_t{1}, int64_t{0}}) {
      const std::string what =
          "all-reduce " + std::string(DataTypeName(dt)) + " x " + std::to_string(count);
      std::vector<uint8_t> x = Buffer(dt, count);
      const CommStats before = c->stats();
      ASSERT_OK(Finish(c->AllReduce(x.data(), x.data(), count, dt, ReduceOp::kSum)));
      // N - 1 of N parts out in the reduce-scatter half and again in the all-gather half
      // (rounded down); every rank receives as much as it sends.
      const int64_t want = 2 * (n - 1) * Size(x) / n;
      ExpectTraffic(*c, before, want, want, what);
    }
  }
}

TEST(MpiTraffic, BroadcastSendsTheRootsBufferToEveryOtherRank) {
  auto c = Make();
  ASSERT_NE(c, nullptr);
  const int n = c->size(), me = c->rank();
  for (DataType dt : {DataType::kF32, DataType::kBf16, DataType::kF64, DataType::kBytes}) {
    for (int root = 0; root < n; ++root) {
      const int64_t count = 10 + 3 * root;
      const std::string what = "broadcast " + std::string(DataTypeName(dt)) + " x " +
                               std::to_string(count) + " from rank " + std::to_string(root);
      std::vector<uint8_t> b = Buffer(dt, count);
      for (size_t i = 0; i < b.size(); ++i) b[i] = me == root ? static_cast<uint8_t>(root + i) : 0;
      const CommStats before = c->stats();
      ASSERT_OK(Finish(c->Broadcast(b.data(), count, dt, root)));
      for (size_t i = 0; i < b.size(); ++i) ASSERT_EQ(b[i], static_cast<uint8_t>(root + i)) << what;
      ExpectTraffic(*c, before, me == root ? Size(b) * (n - 1) : 0, me == root ? 0 : Size(b),
                    what);
    }
  }
}

// A group of halves with its buffers; sends and receives are counted from the buffers.
struct Group {
  std::deque<std::vector<uint8_t>> bufs;  // a deque: adding one moves none
  std::vector<P2P> ops;
  int64_t to_others = 0, from_others = 0;
  void Add(int me, int peer, bool is_send, DataType dt, int64_t count) {
    bufs.push_back(Buffer(dt, count));
    ops.push_back({peer, is_send, bufs.back().data(), count, dt});
    if (peer != me) (is_send ? to_others : from_others) += Size(bufs.back());
  }
};

TEST(MpiTraffic, SendRecvSendsTheBuffersAddressedToOtherRanks) {
  auto c = Make();
  ASSERT_NE(c, nullptr);
  const int n = c->size(), me = c->rank();
  const int next = (me + 1) % n, prev = (me + n - 1) % n;
  {  // A ring, two dtypes on one (peer, tag).
    Group g;
    g.Add(me, next, true, DataType::kF32, 100);
    g.Add(me, next, true, DataType::kBf16, 9);
    g.Add(me, prev, false, DataType::kF32, 100);
    g.Add(me, prev, false, DataType::kBf16, 9);
    const CommStats before = c->stats();
    ASSERT_OK(Finish(c->SendRecv(g.ops, 3)));
    ExpectTraffic(*c, before, g.to_others, g.from_others, "ring");
  }
  {  // A fan-out from rank 0: 5 r doubles to rank r, and 7 bytes to itself.
    Group g;
    if (me == 0) {
      for (int r = 1; r < n; ++r) g.Add(me, r, true, DataType::kF64, 5 * r);
      g.Add(me, 0, true, DataType::kBytes, 7);
      g.Add(me, 0, false, DataType::kBytes, 7);
    } else {
      g.Add(me, 0, false, DataType::kF64, 5 * me);
    }
    const CommStats before = c->stats();
    ASSERT_OK(Finish(c->SendRecv(g.ops, 4)));
    ExpectTraffic(*c, before, g.to_others, g.from_others, "fan-out from rank 0");
  }
  {  // A fan-in to the last rank: 3 + r floats from rank r.
    Group g;
    if (me == n - 1) {
      for (int r = 0; r < n - 1; ++r) g.Add(me, r, false, DataType::kF32, 3 + r);
    } else {
      g.Add(me, n - 1, true, DataType::kF32, 3 + me);
    }
    const CommStats before = c->stats();
    if (!g.ops.empty()) ASSERT_OK(Finish(c->SendRecv(g.ops, 5)));
    ExpectTraffic(*c, before, g.to_others, g.from_others, "fan-in to the last rank");
  }
}

TEST(MpiTraffic, BarrierSendsNothing) {
  auto c = Make();
  ASSERT_NE(c, nullptr);
  const CommStats before = c->stats();
  ASSERT_OK(BarrierBlocking(*c));
  ExpectTraffic(*c, before, 0, 0, "barrier");
}

}  // namespace
}  // namespace mdopt
