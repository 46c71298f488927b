// The MPI backend under mpirun (any number of ranks): every collective for every dtype,
// equal and uneven counts (zero for some ranks), sum and mean, in-place forms, several
// operations in flight, a ring exchange, broadcasts from every root, byte accounting.
//
// --host-init=funneled: the program initialises MPI with MPI_THREAD_FUNNELED before creating
// communicators, so the backend runs caller-driven; otherwise mdopt initialises MPI itself
// (MPI_THREAD_MULTIPLE, progress thread) and finalises it at exit.
#include <mpi.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "gtest/gtest.h"
#include "kernels/common/bf16.h"

namespace mdopt {
namespace {

using kernels::Bf16ToFloat;
using kernels::FloatToBf16;

bool g_host_init = false;

std::unique_ptr<Communicator> Make() {
  absl::StatusOr<std::unique_ptr<Communicator>> c = MakeMpiCommunicator(nullptr);
  EXPECT_TRUE(c.ok()) << c.status();
  if (!c.ok()) return nullptr;
  // Generous, but a failing rank must not leave its peers waiting ten minutes.
  (*c)->SetTimeout(absl::Seconds(60));
  return *std::move(c);
}

#define ASSERT_OK(expr)                          \
  do {                                           \
    const absl::Status _s = (expr);              \
    ASSERT_TRUE(_s.ok()) << #expr << ": " << _s; \
  } while (0)

absl::Status Finish(absl::StatusOr<RequestPtr> r) {
  if (!r.ok()) return r.status();
  return (*r)->Wait();
}

// Host buffers of any dtype, read and written as double.
struct Buf {
  DataType dt;
  std::vector<uint8_t> bytes;
  Buf(DataType d, int64_t n) : dt(d), bytes(static_cast<size_t>(n) * ElementSize(d)) {}
  void* data() { return bytes.data(); }
  int64_t size() const { return static_cast<int64_t>(bytes.size() / ElementSize(dt)); }
  void Set(int64_t i, double v) {
    switch (dt) {
      case DataType::kF32: { float f = static_cast<float>(v); std::memcpy(&bytes[i * 4], &f, 4); break; }
      case DataType::kF64: std::memcpy(&bytes[i * 8], &v, 8); break;
      case DataType::kBf16: {
        uint16_t h = FloatToBf16(static_cast<float>(v));
        std::memcpy(&bytes[i * 2], &h, 2);
        break;
      }
      case DataType::kBytes: bytes[i] = static_cast<uint8_t>(v); break;
    }
  }
  double Get(int64_t i) const {
    switch (dt) {
      case DataType::kF32: { float f; std::memcpy(&f, &bytes[i * 4], 4); return f; }
      case DataType::kF64: { double d; std::memcpy(&d, &bytes[i * 8], 8); return d; }
      case DataType::kBf16: { uint16_t h; std::memcpy(&h, &bytes[i * 2], 2); return Bf16ToFloat(h); }
      case DataType::kBytes: return bytes[i];
    }
    return 0;
  }
  uint16_t Bits(int64_t i) const {
    uint16_t h;
    std::memcpy(&h, &bytes[i * 2], 2);
    return h;
  }
};

// Element i of rank r's contribution. f32/f64: small multiples of 1/4, so that every sum is
// exact and the expected value is exact too. bf16: values with a full bf16 mantissa, so
// sums round. bytes: any byte.
double Val(DataType dt, int r, int64_t i) {
  switch (dt) {
    case DataType::kF32:
    case DataType::kF64: return 0.25 * (r + 1) + static_cast<double>(i % 13) - 6.0;
    case DataType::kBf16: return Bf16ToFloat(FloatToBf16(static_cast<float>(3.0 * std::sin(1.7 * r + 0.37 * i + 0.1))));
    case DataType::kBytes: return static_cast<double>((r * 37 + i * 11 + 5) & 0xff);
  }
  return 0;
}

// Checks one reduced element against the float64 sum of the contributions: exact for
// f32/f64; for bf16 exact (one rounding) at two ranks, else within the error of N - 1
// roundings of partial sums.
void ExpectReduced(const Buf& got, int64_t k, int64_t elem, int n, ReduceOp op) {
  double sum = 0, abs_sum = 0;
  for (int r = 0; r < n; ++r) {
    sum += Val(got.dt, r, elem);
    abs_sum += std::fabs(Val(got.dt, r, elem));
  }
  const double mean_div = op == ReduceOp::kMean ? n : 1;
  if (got.dt == DataType::kF32) {
    EXPECT_EQ(got.Get(k), static_cast<float>(static_cast<float>(sum) / static_cast<float>(mean_div)))
        << "elem " << elem;
  } else if (got.dt == DataType::kF64) {
    EXPECT_EQ(got.Get(k), sum / mean_div) << "elem " << elem;
  } else if (n == 2) {
    uint16_t want = FloatToBf16(static_cast<float>(sum));  // exact in float, one rounding
    if (op == ReduceOp::kMean) want = FloatToBf16(Bf16ToFloat(want) / 2.0f);
    EXPECT_EQ(got.Bits(k), want) << "elem " << elem << " sum " << sum;
  } else {
    const double tol = ((n - 1) * abs_sum + std::fabs(sum)) * std::ldexp(1.0, -9) / mean_div;
    EXPECT_NEAR(got.Get(k), sum / mean_div, tol) << "elem " << elem;
  }
}

// Rank-major layouts: equal, uneven with zeros, and all zero.
std::vector<std::vector<int64_t>> Layouts(int n) {
  std::vector<int64_t> equal(n, 7), uneven(n), zeros(n, 0);
  for (int r = 0; r < n; ++r) uneven[r] = (r % 2 == 1) ? 0 : 3 + 2 * r;
  return {equal, uneven, zeros};
}

int64_t Sum(const std::vector<int64_t>& c) {
  int64_t s = 0;
  for (int64_t x : c) s += x;
  return s;
}

TEST(MpiComm, ProgressModeFollowsTheThreadLevel) {
  auto c = Make();
  ASSERT_NE(c, nullptr);
  EXPECT_EQ(c->backend(), "mpi");
  EXPECT_EQ(c->progress_mode(), g_host_init ? "caller" : "thread");
  int world = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  EXPECT_EQ(c->size(), world);
}

TEST(MpiComm, WorksOnADuplicateOfTheGivenCommunicator) {
  auto world = Make();  // MPI is initialised from here on, whoever did it
  ASSERT_NE(world, nullptr);
  int world_rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
  MPI_Comm half = MPI_COMM_NULL;
  ASSERT_EQ(MPI_Comm_split(MPI_COMM_WORLD, world_rank % 2, world_rank, &half), MPI_SUCCESS);
  int half_size = 0;
  MPI_Comm_size(half, &half_size);
  {
    absl::StatusOr<std::unique_ptr<Communicator>> c = MakeMpiCommunicator(&half);
    ASSERT_TRUE(c.ok()) << c.status();
    EXPECT_EQ((*c)->size(), half_size);
    std::vector<double> one = {1.0};
    ASSERT_OK(AllReduceSum(**c, absl::MakeSpan(one)));
    EXPECT_EQ(one[0], half_size);
    // The host keeps using `half` alongside mdopt's duplicate.
    int world_size = 0, token = world_rank, sum = 0, want = 0;
    MPI_Comm_size(MPI_COMM_WORLD, &world_size);
    for (int r = world_rank % 2; r < world_size; r += 2) want += r;
    MPI_Allreduce(&token, &sum, 1, MPI_INT, MPI_SUM, half);
    EXPECT_EQ(sum, want);
  }
  MPI_Comm_free(&half);
  MPI_Comm null_comm = MPI_COMM_NULL;
  EXPECT_EQ(MakeMpiCommunicator(&null_comm).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(MpiComm, ReduceScatterEveryDtypeLayoutAndOp) {
  auto c = Make();
  ASSERT_NE(c, nullptr);
  const int n = c->size(), me = c->rank();
  for (DataType dt : {DataType::kF32, DataType::kBf16, DataType::kF64}) {
    for (const auto& counts : Layouts(n)) {
      for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kMean}) {
        SCOPED_TRACE(std::string(DataTypeName(dt)) + (op == ReduceOp::kMean ? " mean" : " sum") +
                     " counts[0]=" + std::to_string(counts[0]));
        Buf send(dt, Sum(counts)), recv(dt, counts[me]);
        for (int64_t i = 0; i < send.size(); ++i) send.Set(i, Val(dt, me, i));
        const CommStats before = c->stats();
        ASSERT_OK(Finish(c->ReduceScatter(send.data(), recv.data(), counts, dt, op)));
        EXPECT_EQ(c->stats().bytes_sent - before.bytes_sent,
                  (Sum(counts) - counts[me]) * static_cast<int64_t>(ElementSize(dt)));
        int64_t offset = 0;
        for (int r = 0; r < me; ++r) offset += counts[r];
        for (int64_t k = 0; k < counts[me]; ++k) ExpectReduced(recv, k, offset + k, n, op);
      }
    }
  }
}

TEST(MpiComm, AllGatherEveryDtypeLayoutInPlaceAndNot) {
  auto c = Make();
  ASSERT_NE(c, nullptr);
  const int n = c->size(), me = c->rank();
  for (DataType dt : {DataType::kF32, DataType::kBf16, DataType::kF64, DataType::kBytes}) {
    for (const auto& counts : Layouts(n)) {
      for (int form = 0; form < 3; ++form) {  // separate send, nullptr, send inside recv
        SCOPED_TRACE(std::string(DataTypeName(dt)) + " form " + std::to_string(form) +
                     " counts[0]=" + std::to_string(counts[0]));
        const int64_t total = Sum(counts);
        int64_t offset = 0;
        for (int r = 0; r < me; ++r) offset += counts[r];
        Buf send(dt, counts[me]), recv(dt, total);
        for (int64_t i = 0; i < recv.size(); ++i) recv.Set(i, 99);
        for (int64_t i = 0; i < counts[me]; ++i) {
          send.Set(i, Val(dt, me, offset + i));
          recv.Set(offset + i, Val(dt, me, offset + i));
        }
        const void* src = form == 0   ? send.data()
                          : form == 1 ? nullptr
                                      : recv.bytes.data() + offset * ElementSize(dt);
        const CommStats before = c->stats();
        ASSERT_OK(Finish(c->AllGather(src, recv.data(), counts, dt)));
        // This rank's segment, to each other rank.
        EXPECT_EQ(c->stats().bytes_sent - before.bytes_sent,
                  counts[me] * (n - 1) * static_cast<int64_t>(ElementSize(dt)));
        int64_t at = 0;
        for (int r = 0; r < n; ++r) {
          for (int64_t k = 0; k < counts[r]; ++k, ++at) {
            EXPECT_EQ(recv.Get(at), Val(dt, r, at)) << "rank " << r << " elem " << at;
          }
        }
      }
    }
  }
}

TEST(MpiComm, AllReduceEveryDtypeOpInPlaceAndNotSameOnEveryRank) {
  auto c = Make();
  ASSERT_NE(c, nullptr);
  const int n = c->size(), me = c->rank();
  const int64_t count = 1031;  // odd: no algorithm gets an even split
  for (DataType dt : {DataType::kF32, DataType::kBf16, DataType::kF64}) {
    for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kMean}) {
      for (bool in_place : {false, true}) {
        SCOPED_TRACE(std::string(DataTypeName(dt)) + (op == ReduceOp::kMean ? " mean" : " sum") +
                     (in_place ? " in place" : ""));
        Buf send(dt, count), recv(dt, count);
        for (int64_t i = 0; i < count; ++i) send.Set(i, Val(dt, me, i));
        if (in_place) recv = send;
        const CommStats before = c->stats();
        ASSERT_OK(Finish(c->AllReduce(in_place ? recv.data() : send.data(), recv.data(), count,
                                      dt, op)));
        EXPECT_EQ(c->stats().bytes_sent - before.bytes_sent,
                  2 * (n - 1) * count * static_cast<int64_t>(ElementSize(dt)) / n);
        for (int64_t k = 0; k < count; ++k) ExpectReduced(recv, k, k, n, op);
        // Every rank holds the same bits (the optimizer's verdicts depend on it).
        Buf all(dt, count * n);
        std::vector<int64_t> counts(n, count);
        ASSERT_OK(Finish(c->AllGather(recv.data(), all.data(), counts, dt)));
        for (int r = 0; r < n; ++r) {
          EXPECT_EQ(0, std::memcmp(all.bytes.data() + r * recv.bytes.size(), recv.bytes.data(),
                                   recv.bytes.size()))
              << "rank " << r << " differs";
        }
      }
    }
  }
}

TEST(MpiComm, BroadcastFromEveryRoot) {
  auto c = Make();
  ASSERT_NE(c, nullptr);
  const int n = c->size(), me = c->rank();
  for (DataType dt : {DataType::kF32, DataType::kBf16, DataType::kF64, DataType::kBytes}) {
    for (int root = 0; root < n; ++root) {
      Buf b(dt, 77);
      for (int64_t i = 0; i < b.size(); ++i) b.Set(i, me == root ? Val(dt, root, i) : 0);
      const CommStats before = c->stats();
      ASSERT_OK(Finish(c->Broadcast(b.data(), b.size(), dt, root)));
      EXPECT_EQ(c->stats().bytes_sent - before.bytes_sent,
                me == root ? 77 * static_cast<int64_t>(ElementSize(dt)) * (n - 1) : 0);
      for (int64_t i = 0; i < b.size(); ++i) ASSERT_EQ(b.Get(i), Val(dt, root, i)) << root;
    }
  }
}

TEST(MpiComm, GroupedRingExchangeMatchesInOrder) {
  auto c = Make();
  ASSERT_NE(c, nullptr);
  const int n = c->size(), me = c->rank();
  const int next = (me + 1) % n, prev = (me + n - 1) % n;
  // Two messages on one (peer, tag): they must arrive in order; a third of another dtype.
  std::vector<float> a(100, static_cast<float>(me)), b(50, static_cast<float>(me + 100));
  std::vector<float> ra(100, -1), rb(50, -1);
  Buf h(DataType::kBf16, 9), rh(DataType::kBf16, 9);
  for (int64_t i = 0; i < 9; ++i) h.Set(i, Val(DataType::kBf16, me, i));
  const P2P ops[] = {{next, true, a.data(), 100, DataType::kF32},
                     {next, true, b.data(), 50, DataType::kF32},
                     {next, true, h.data(), 9, DataType::kBf16},
                     {prev, false, ra.data(), 100, DataType::kF32},
                     {prev, false, rb.data(), 50, DataType::kF32},
                     {prev, false, rh.data(), 9, DataType::kBf16}};
  const CommStats before = c->stats();
  ASSERT_OK(Finish(c->SendRecv(ops, 7)));
  EXPECT_EQ(c->stats().bytes_sent - before.bytes_sent, n == 1 ? 0 : 600 + 18);
  EXPECT_EQ(ra[99], static_cast<float>(prev));
  EXPECT_EQ(rb[0], static_cast<float>(prev + 100));
  for (int64_t i = 0; i < 9; ++i) EXPECT_EQ(rh.Get(i), Val(DataType::kBf16, prev, i));
}

TEST(MpiComm, SeveralInFlightWaitedInReverseOrder) {
  auto c = Make();
  ASSERT_NE(c, nullptr);
  const int n = c->size(), me = c->rank();
  const int64_t big = 1 << 18;
  std::vector<float> ar(big, 1.0f), gather(big * n, 0.0f), mine(big, static_cast<float>(me));
  std::vector<double> rs_send(3 * n, 1.0), rs_recv(3, 0.0);
  std::vector<int64_t> gcounts(n, big), rcounts(n, 3);
  std::vector<uint8_t> bc(1000, me == n - 1 ? 42 : 0);
  const CommStats before = c->stats();
  std::vector<RequestPtr> reqs;
  for (absl::StatusOr<RequestPtr> r :
       {c->AllReduce(ar.data(), ar.data(), big, DataType::kF32, ReduceOp::kSum),
        c->AllGather(mine.data(), gather.data(), gcounts, DataType::kF32),
        c->ReduceScatter(rs_send.data(), rs_recv.data(), rcounts, DataType::kF64,
                         ReduceOp::kMean),
        c->Broadcast(bc.data(), 1000, DataType::kBytes, n - 1), c->Barrier()}) {
    ASSERT_TRUE(r.ok()) << r.status();
    reqs.push_back(*r);
  }
  for (auto it = reqs.rbegin(); it != reqs.rend(); ++it) ASSERT_OK((*it)->Wait());
  for (const RequestPtr& r : reqs) {
    absl::StatusOr<bool> t = r->Test();
    ASSERT_TRUE(t.ok() && *t);
    ASSERT_OK(r->Wait());  // again: same answer
  }
  EXPECT_EQ(ar[big - 1], static_cast<float>(n));
  for (int r = 0; r < n; ++r) EXPECT_EQ(gather[r * big + 5], static_cast<float>(r));
  EXPECT_EQ(rs_recv[2], 1.0);
  EXPECT_EQ(bc[999], 42);
  const CommStats s = c->stats();
  EXPECT_EQ(s.ops - before.ops, 5);
  const int64_t want = 2 * (n - 1) * big * 4 / n + (n - 1) * big * 4 + (n - 1) * 3 * 8 +
                       (me == n - 1 ? 1000 * (n - 1) : 0);
  EXPECT_EQ(s.bytes_sent - before.bytes_sent, want);
  EXPECT_GT(s.busy_seconds, 0.0);
  EXPECT_GE(s.wait_seconds, 0.0);
  EXPECT_LE(s.wait_seconds, s.busy_seconds + 1.0);
}

TEST(MpiComm, BarrierAndBlockingHelpers) {
  auto c = Make();
  ASSERT_NE(c, nullptr);
  const int n = c->size(), me = c->rank();
  ASSERT_OK(BarrierBlocking(*c));
  std::vector<double> v = {1.0, static_cast<double>(me)};
  ASSERT_OK(AllReduceSum(*c, absl::MakeSpan(v)));
  EXPECT_EQ(v[0], n);
  EXPECT_EQ(v[1], n * (n - 1) / 2.0);
  std::vector<uint8_t> b(5, static_cast<uint8_t>(me));
  ASSERT_OK(BroadcastBytes(*c, absl::MakeSpan(b), n - 1));
  EXPECT_EQ(b[4], n - 1);
}

TEST(MpiComm, BadArgumentsAreRefusedBeforeAnythingStarts) {
  auto c = Make();
  ASSERT_NE(c, nullptr);
  const int n = c->size();
  std::vector<float> x(8), y(8);
  std::vector<int64_t> wrong(n + 1, 1);
  auto invalid = [](absl::StatusOr<RequestPtr> r) {
    return !r.ok() && r.status().code() == absl::StatusCode::kInvalidArgument;
  };
  EXPECT_TRUE(invalid(c->ReduceScatter(x.data(), y.data(), wrong, DataType::kF32, ReduceOp::kSum)));
  EXPECT_TRUE(invalid(c->AllGather(x.data(), y.data(), wrong, DataType::kF32)));
  EXPECT_TRUE(invalid(c->AllReduce(x.data(), y.data(), 8, DataType::kF32, ReduceOp::kSum,
                                   MemorySpace::kDevice)));
  EXPECT_TRUE(invalid(c->Broadcast(x.data(), 8, DataType::kF32, n)));
  const P2P bad_peer[] = {{n, true, x.data(), 8, DataType::kF32}};
  EXPECT_TRUE(invalid(c->SendRecv(bad_peer, 0)));
  // Bytes cannot be reduced, at any count (counts beyond INT_MAX are split into several MPI
  // calls: comm_mpi_chunks_test.cc).
  EXPECT_TRUE(invalid(c->AllReduce(x.data(), y.data(), int64_t{1} << 31, DataType::kBytes,
                                   ReduceOp::kSum)));
  EXPECT_EQ(c->stats().ops, 0);
  ASSERT_OK(BarrierBlocking(*c));  // still healthy
}

TEST(MpiComm, AbortWithNothingInFlightFailsLaterOperations) {
  auto c = Make();
  ASSERT_NE(c, nullptr);
  ASSERT_OK(BarrierBlocking(*c));
  c->Abort("test abort");
  absl::StatusOr<RequestPtr> r = c->Barrier();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kAborted);
}

}  // namespace
}  // namespace mdopt

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--host-init=funneled") mdopt::g_host_init = true;
  }
  if (mdopt::g_host_init) {
    int provided = 0;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
    if (provided == MPI_THREAD_MULTIPLE) {
      std::fprintf(stderr, "MPI gave MPI_THREAD_MULTIPLE for FUNNELED; caller mode untested\n");
    }
  }
  const int rc = RUN_ALL_TESTS();
  // mdopt finalises only what it initialised; a host that initialised finalises itself.
  if (mdopt::g_host_init) MPI_Finalize();
  return rc;
}
