// The MPI backend's split of large operations (comm/mpi_max_count.h) under mpirun at 2 and 3
// ranks: with the per-call limit lowered to 1000 elements (and to 7), so that every
// operation below is several MPI calls with uneven pieces, chunks that straddle the ranks'
// segments and displacements inside each chunk, the results are bitwise those of one MPI
// call per operation: reduce-scatter (equal and uneven counts, a rank with none; sum and
// mean), all-gather (equal and uneven, in place and not), all-reduce (in place and not),
// broadcast from every root and a send/recv ring, for f32, bf16, f64 and bytes (bytes are
// not reduced). At 2 ranks, one real in-place all-gather of 2^31 + 4000 bytes (rank 1's
// segment starts past INT_MAX), then a broadcast of all of it from rank 1.
#include <mpi.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "comm/mpi_max_count.h"
#include "gtest/gtest.h"
#include "kernels/common/bf16.h"

namespace mdopt {
namespace {

Communicator* World() {
  static std::unique_ptr<Communicator> c = [] {
    absl::StatusOr<std::unique_ptr<Communicator>> m = MakeMpiCommunicator(nullptr);
    EXPECT_TRUE(m.ok()) << m.status();
    if (!m.ok()) return std::unique_ptr<Communicator>();
    (*m)->SetTimeout(absl::Seconds(120));
    return *std::move(m);
  }();
  return c.get();
}

absl::Status Finish(absl::StatusOr<RequestPtr> r) {
  if (!r.ok()) return r.status();
  return (*r)->Wait();
}

#define ASSERT_OK(expr)                          \
  do {                                           \
    const absl::Status _s = (expr);              \
    ASSERT_TRUE(_s.ok()) << #expr << ": " << _s; \
  } while (0)

const DataType kTypes[] = {DataType::kF32, DataType::kBf16, DataType::kF64, DataType::kBytes};
const char* Name(DataType d) {
  switch (d) {
    case DataType::kF32: return "f32";
    case DataType::kBf16: return "bf16";
    case DataType::kF64: return "f64";
    case DataType::kBytes: return "bytes";
  }
  return "?";
}

// n elements of rank `rank`'s data for `salt`: values whose sums round differently in
// different orders (so that a changed reduction order would show), as raw bytes.
std::vector<uint8_t> Data(DataType dt, int64_t n, int rank, int salt) {
  std::vector<uint8_t> out(static_cast<size_t>(n) * ElementSize(dt));
  for (int64_t i = 0; i < n; ++i) {
    const double v = std::sin(0.37 * static_cast<double>(i) + 1.3 * rank + 0.11 * salt) *
                     (1.0 + 1e3 * ((i + rank) % 3 == 0));
    switch (dt) {
      case DataType::kF32: { const float f = static_cast<float>(v); std::memcpy(&out[i * 4], &f, 4); break; }
      case DataType::kF64: std::memcpy(&out[i * 8], &v, 8); break;
      case DataType::kBf16: {
        const uint16_t h = kernels::FloatToBf16(static_cast<float>(v));
        std::memcpy(&out[i * 2], &h, 2);
        break;
      }
      case DataType::kBytes: out[i] = static_cast<uint8_t>(i * 7 + rank * 31 + salt); break;
    }
  }
  return out;
}

// Every operation of the test at the current limit; each result appended to `out`.
void RunAll(Communicator& c, DataType dt, std::vector<std::vector<uint8_t>>* out) {
  const int n = c.size(), me = c.rank();
  const size_t es = ElementSize(dt);
  const bool numeric = dt != DataType::kBytes;
  // Equal counts; uneven ones with a rank that has none and segments larger than a chunk.
  std::vector<std::vector<int64_t>> layouts = {std::vector<int64_t>(n, 1500)};
  std::vector<int64_t> uneven(n);
  for (int r = 0; r < n; ++r) uneven[r] = r == 1 ? 0 : 2500 + 733 * r;
  layouts.push_back(uneven);
  int salt = 0;
  for (const std::vector<int64_t>& counts : layouts) {
    int64_t total = 0, mine_at = 0;
    for (int r = 0; r < n; ++r) {
      if (r < me) mine_at += counts[r];
      total += counts[r];
    }
    if (numeric) {
      for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kMean}) {
        const std::vector<uint8_t> send = Data(dt, total, me, ++salt);
        std::vector<uint8_t> recv(static_cast<size_t>(counts[me]) * es + 1);
        ASSERT_OK(Finish(c.ReduceScatter(send.data(), recv.data(), counts, dt, op)));
        out->push_back(recv);
      }
    }
    for (bool in_place : {false, true}) {
      const std::vector<uint8_t> mine = Data(dt, counts[me], me, ++salt);
      std::vector<uint8_t> recv(static_cast<size_t>(total) * es, 0xEE);
      if (in_place && !mine.empty()) std::memcpy(&recv[mine_at * es], mine.data(), mine.size());
      ASSERT_OK(Finish(c.AllGather(in_place ? nullptr : mine.data(), recv.data(), counts, dt)));
      out->push_back(recv);
    }
  }
  if (numeric) {
    for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kMean}) {
      for (bool in_place : {false, true}) {
        std::vector<uint8_t> send = Data(dt, 3777, me, ++salt);
        std::vector<uint8_t> recv(send.size());
        ASSERT_OK(Finish(c.AllReduce(send.data(), in_place ? send.data() : recv.data(), 3777, dt, op)));
        out->push_back(in_place ? send : recv);
      }
    }
  }
  for (int root = 0; root < n; ++root) {
    std::vector<uint8_t> data = Data(dt, 2999, me, ++salt);
    ASSERT_OK(Finish(c.Broadcast(data.data(), 2999, dt, root)));
    out->push_back(data);
  }
  // A ring: 2345 elements to the next rank, from the previous one, and an empty message.
  std::vector<uint8_t> to_next = Data(dt, 2345, me, ++salt), from_prev(to_next.size());
  const P2P ring[] = {{(me + 1) % n, true, to_next.data(), 2345, dt},
                      {(me + n - 1) % n, false, from_prev.data(), 2345, dt},
                      {(me + 1) % n, true, to_next.data(), 0, dt},
                      {(me + n - 1) % n, false, from_prev.data(), 0, dt}};
  ASSERT_OK(Finish(c.SendRecv(ring, 5)));
  out->push_back(from_prev);
}

TEST(MpiChunks, SplitCallsAreBitwiseOneCall) {
  Communicator* c = World();
  ASSERT_NE(c, nullptr);
  for (DataType dt : kTypes) {
    SCOPED_TRACE(Name(dt));
    std::vector<std::vector<uint8_t>> whole, split1000, split7;
    mpi::SetMaxCountForTesting(0);
    ASSERT_EQ(mpi::MaxCount(), INT_MAX);
    ASSERT_NO_FATAL_FAILURE(RunAll(*c, dt, &whole));
    mpi::SetMaxCountForTesting(1000);
    ASSERT_NO_FATAL_FAILURE(RunAll(*c, dt, &split1000));
    mpi::SetMaxCountForTesting(7);
    ASSERT_NO_FATAL_FAILURE(RunAll(*c, dt, &split7));
    mpi::SetMaxCountForTesting(0);
    ASSERT_EQ(whole.size(), split1000.size());
    ASSERT_EQ(whole.size(), split7.size());
    for (size_t k = 0; k < whole.size(); ++k) {
      EXPECT_TRUE(whole[k] == split1000[k]) << "result " << k << " differs at a limit of 1000";
      EXPECT_TRUE(whole[k] == split7[k]) << "result " << k << " differs at a limit of 7";
    }
  }
}

// Sampled checks of a large buffer: every 4093rd byte and the last 4096 of each segment.
bool SegmentIs(const uint8_t* p, int64_t n, int rank) {
  auto want = [rank](int64_t i) { return static_cast<uint8_t>(i * 7 + rank * 31 + 1); };
  for (int64_t i = 0; i < n; i += 4093) {
    if (p[i] != want(i)) return false;
  }
  for (int64_t i = n > 4096 ? n - 4096 : 0; i < n; ++i) {
    if (p[i] != want(i)) return false;
  }
  return true;
}

TEST(MpiChunks, BeyondIntMaxBytesAtTwoRanks) {
  Communicator* c = World();
  ASSERT_NE(c, nullptr);
  if (c->size() != 2) GTEST_SKIP() << "the 2^31-byte all-gather runs at 2 ranks only (memory)";
  mpi::SetMaxCountForTesting(0);
  const std::vector<int64_t> counts = {(int64_t{1} << 31) + 1000, 3000};
  const int64_t total = counts[0] + counts[1];
  const int me = c->rank();
  const int64_t at = me == 0 ? 0 : counts[0];  // rank 1's segment starts past INT_MAX
  std::vector<uint8_t> buf(static_cast<size_t>(total));
  for (int64_t i = 0; i < counts[me]; ++i) buf[at + i] = static_cast<uint8_t>(i * 7 + me * 31 + 1);
  ASSERT_OK(Finish(c->AllGather(nullptr, buf.data(), counts, DataType::kBytes)));
  EXPECT_TRUE(SegmentIs(buf.data(), counts[0], 0));
  EXPECT_TRUE(SegmentIs(buf.data() + counts[0], counts[1], 1));
  // The whole buffer from rank 1; rank 0 clears its copy first.
  if (me == 0) std::memset(buf.data(), 0, buf.size());
  ASSERT_OK(Finish(c->Broadcast(buf.data(), total, DataType::kBytes, 1)));
  EXPECT_TRUE(SegmentIs(buf.data(), counts[0], 0));
  EXPECT_TRUE(SegmentIs(buf.data() + counts[0], counts[1], 1));
}

}  // namespace
}  // namespace mdopt
