// The host-staged adapter (comm/host_staged_communicator.h) without a GPU: its device is a
// fake whose copies run only when the stream is synchronised (as a stream's queued copies
// would), and whose "device" buffers are plain host memory. A spy between the adapter and
// the host communicator sees what the transport is given. Checked:
//   - every collective on kDevice buffers gives what the host communicator gives: uneven
//     reduce-scatter, all-gather in place and not, all-reduce in place and mean, broadcast
//     from every root, a send/recv ring, barrier; at 1 rank (local) and, run with --mpi
//     under mpirun, at 2 and 3 ranks (MPI);
//   - the transport sees only pinned staging, never the device buffers; the inputs are
//     copied after the stream's work so far and before the transport starts; the results
//     reach the device only when the request is waited, tested done or ordered before a
//     stream, on the operation's stream, synchronised;
//   - staging is allocated at first use per size and kept: a repeated sequence of
//     operations (several in flight at once, each with its own buffer) allocates nothing;
//   - kHost buffers go to the host communicator as they are;
//   - refusals (bad arguments before any copy; the transport's, with the buffer kept for
//     reuse), a failed operation (its buffer left to the transport), a request dropped
//     unfinished (finished by its destructor), no pinned memory (ResourceExhausted);
//   - capabilities and everything else forwarded.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <numeric>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "comm/communicator.h"
#include "comm/host_staged_communicator.h"

namespace mdopt {
namespace {

bool g_mpi = false;  // --mpi: the world is MPI_COMM_WORLD (under mpirun)

Communicator* World() {
  static std::unique_ptr<Communicator> world = [] {
    if (!g_mpi) return MakeLocalCommunicator();
    absl::StatusOr<std::unique_ptr<Communicator>> c = MakeMpiCommunicator(nullptr);
    if (!c.ok()) {
      ADD_FAILURE() << c.status();
      return std::unique_ptr<Communicator>();
    }
    return *std::move(c);
  }();
  return world.get();
}

// What happened, in order: "in <stream>" / "back <stream>" (a copy enqueued), "sync
// <stream>", "start <op>" (the transport was called).
using Log = std::vector<std::string>;

std::string Name(void* stream) { return std::to_string(reinterpret_cast<uintptr_t>(stream)); }

// Copies are queued per stream and run at Synchronize; pinned blocks are remembered so that
// a pointer can be told to be staging.
class FakeDevice final : public StagingDevice {
 public:
  explicit FakeDevice(Log* log) : log_(log) {}
  ~FakeDevice() override {
    for (auto& [p, bytes] : live_) delete[] static_cast<char*>(p);
  }
  int allocs = 0, frees = 0;
  bool out_of_memory = false;

  void* AllocHost(size_t bytes) override {
    if (out_of_memory) return nullptr;
    ++allocs;
    void* p = new char[bytes];
    live_[p] = bytes;
    return p;
  }
  void FreeHost(void* p) override {
    ++frees;
    live_.erase(p);
    delete[] static_cast<char*>(p);
  }
  absl::Status Copy(void* dst, const void* src, size_t bytes, bool to_device,
                    void* stream) override {
    log_->push_back(std::string(to_device ? "back " : "in ") + Name(stream));
    queued_[stream].push_back({dst, src, bytes});
    return absl::OkStatus();
  }
  absl::Status Synchronize(void* stream) override {
    log_->push_back("sync " + Name(stream));
    for (const Pending& c : queued_[stream]) std::memcpy(c.dst, c.src, c.bytes);
    queued_[stream].clear();
    return absl::OkStatus();
  }
  // Whether [p, p + bytes) lies in a pinned block.
  bool Pinned(const void* p, size_t bytes) const {
    for (const auto& [block, size] : live_) {
      const char* b = static_cast<const char*>(block);
      if (p >= b && static_cast<const char*>(p) + bytes <= b + size) return true;
    }
    return false;
  }

 private:
  struct Pending {
    void* dst;
    const void* src;
    size_t bytes;
  };
  Log* log_;
  std::map<void*, size_t> live_;
  std::map<void*, std::vector<Pending>> queued_;
};

class FailedRequest final : public Request {
 public:
  absl::Status Wait() override { return absl::UnavailableError("the transport failed"); }
  absl::StatusOr<bool> Test() override { return Wait(); }
};

// Between the adapter and the host communicator: logs each start, checks that the buffers
// it is given are staging (unless host memory is expected), and can refuse or fail.
class Spy final : public Communicator {
 public:
  Spy(Communicator* inner, Log* log, FakeDevice* dev) : inner_(inner), log_(log), dev_(dev) {}
  bool expect_staging = true;
  bool refuse_next = false, fail_next = false, equal_only = false;
  std::vector<const void*> seen;  // every buffer the transport was given

  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  std::string backend() const override { return inner_->backend(); }
  std::string progress_mode() const override { return inner_->progress_mode(); }
  void SetTimeout(absl::Duration t) override {
    timeout = t;
    inner_->SetTimeout(t);
  }
  bool equal_counts_only() const override { return equal_only; }
  absl::Duration timeout;

  absl::StatusOr<RequestPtr> ReduceScatter(const void* send, void* recv,
                                           absl::Span<const int64_t> counts, DataType dtype,
                                           ReduceOp op, MemorySpace space,
                                           StreamSlot stream) override {
    int64_t total = std::accumulate(counts.begin(), counts.end(), int64_t{0});
    const size_t es = ElementSize(dtype);
    See(send, total * es);
    See(recv, counts[rank()] * es);
    return Start("reduce-scatter", space, [&] {
      return inner_->ReduceScatter(send, recv, counts, dtype, op, space, stream);
    });
  }
  absl::StatusOr<RequestPtr> AllGather(const void* send, void* recv,
                                       absl::Span<const int64_t> counts, DataType dtype,
                                       MemorySpace space, StreamSlot stream) override {
    int64_t total = std::accumulate(counts.begin(), counts.end(), int64_t{0});
    const size_t es = ElementSize(dtype);
    if (send != nullptr) See(send, counts[rank()] * es);
    See(recv, total * es);
    return Start("all-gather", space,
                 [&] { return inner_->AllGather(send, recv, counts, dtype, space, stream); });
  }
  absl::StatusOr<RequestPtr> AllReduce(const void* send, void* recv, int64_t count,
                                       DataType dtype, ReduceOp op, MemorySpace space,
                                       StreamSlot stream) override {
    See(send, count * ElementSize(dtype));
    if (recv != send) See(recv, count * ElementSize(dtype));
    return Start("all-reduce", space, [&] {
      return inner_->AllReduce(send, recv, count, dtype, op, space, stream);
    });
  }
  absl::StatusOr<RequestPtr> Broadcast(void* data, int64_t count, DataType dtype, int root,
                                       MemorySpace space, StreamSlot stream) override {
    See(data, count * ElementSize(dtype));
    return Start("broadcast", space,
                 [&] { return inner_->Broadcast(data, count, dtype, root, space, stream); });
  }
  absl::StatusOr<RequestPtr> SendRecv(absl::Span<const P2P> ops, int tag, MemorySpace space,
                                      StreamSlot stream) override {
    for (const P2P& p : ops) See(p.data, p.count * ElementSize(p.dtype));
    return Start("send/recv", space, [&] { return inner_->SendRecv(ops, tag, space, stream); });
  }
  absl::StatusOr<RequestPtr> Barrier() override {
    log_->push_back("start barrier");
    return inner_->Barrier();
  }
  void Abort(absl::string_view reason) override { inner_->Abort(reason); }
  CommStats stats() const override { return inner_->stats(); }

 private:
  void See(const void* p, size_t bytes) {
    seen.push_back(p);
    if (expect_staging && bytes > 0) EXPECT_TRUE(dev_->Pinned(p, bytes)) << "not staging: " << p;
  }
  template <typename F>
  absl::StatusOr<RequestPtr> Start(const char* what, MemorySpace space, F&& start) {
    EXPECT_EQ(space, MemorySpace::kHost);  // the transport is a host one
    log_->push_back(std::string("start ") + what);
    if (refuse_next) {
      refuse_next = false;
      return absl::InvalidArgumentError("refused by the transport");
    }
    absl::StatusOr<RequestPtr> r = start();
    if (fail_next && r.ok()) {
      fail_next = false;
      (void)(*r)->Wait();
      return RequestPtr(std::make_shared<FailedRequest>());
    }
    return r;
  }
  Communicator* inner_;
  Log* log_;
  FakeDevice* dev_;
};

// The adapter over a spy over `inner`, with their log and fake device.
struct Rig {
  Log log;
  std::shared_ptr<FakeDevice> dev = std::make_shared<FakeDevice>(&log);
  Spy spy;
  std::unique_ptr<Communicator> c;
  explicit Rig(Communicator* inner) : spy(inner, &log, dev.get()) {
    c = MakeHostStagedCommunicator(&spy, dev);
  }
  int Count(const std::string& prefix) const {
    int n = 0;
    for (const std::string& e : log) n += e.rfind(prefix, 0) == 0;
    return n;
  }
};

void* const kStream = reinterpret_cast<void*>(0x51);
void* const kOther = reinterpret_cast<void*>(0x52);
const MemorySpace kDev = MemorySpace::kDevice;

absl::Status Finish(absl::StatusOr<RequestPtr> r) {
  if (!r.ok()) return r.status();
  return (*r)->Wait();
}

TEST(HostStaged, CollectivesOnDeviceBuffersGiveTheHostCommunicatorsResults) {
  Communicator* world = World();
  ASSERT_NE(world, nullptr);
  Rig rig(world);
  Communicator& c = *rig.c;
  const int N = c.size(), me = c.rank();

  // Reduce-scatter, uneven: rank r's segment has r + 1 elements; element k of every rank's
  // input is rank + k, so segment r sums to N (offset + k) + N (N - 1) / 2.
  std::vector<int64_t> counts(N);
  for (int r = 0; r < N; ++r) counts[r] = r + 1;
  const int64_t total = N * (N + 1) / 2;
  std::vector<float> send(total), recv(counts[me], -1.0f);
  for (int64_t k = 0; k < total; ++k) send[k] = static_cast<float>(me + k);
  ASSERT_TRUE(Finish(c.ReduceScatter(send.data(), recv.data(), counts, DataType::kF32, ReduceOp::kSum,
                                     kDev, {kStream})).ok());
  const int64_t off = me * (me + 1) / 2;
  for (int64_t k = 0; k < counts[me]; ++k)
    EXPECT_EQ(recv[k], static_cast<float>(N * (off + k) + N * (N - 1) / 2)) << k;

  // All-gather of those segments, out of place and in place.
  std::vector<double> mine(counts[me], 100.0 * me), all(total, -1.0), expect;
  for (int r = 0; r < N; ++r) expect.insert(expect.end(), counts[r], 100.0 * r);
  ASSERT_TRUE(Finish(c.AllGather(mine.data(), all.data(), counts, DataType::kF64, kDev, {kStream})).ok());
  EXPECT_EQ(all, expect);
  std::vector<double> inplace(total, -1.0);
  std::fill(inplace.begin() + off, inplace.begin() + off + counts[me], 100.0 * me);
  ASSERT_TRUE(Finish(c.AllGather(nullptr, inplace.data(), counts, DataType::kF64, kDev, {kStream})).ok());
  EXPECT_EQ(inplace, expect);

  // All-reduce: mean in place, sum out of place, bf16 bits.
  std::vector<float> v = {1.0f * me, 2.0f, -3.0f};
  ASSERT_TRUE(Finish(c.AllReduce(v.data(), v.data(), 3, DataType::kF32, ReduceOp::kMean, kDev, {})).ok());
  EXPECT_EQ(v, (std::vector<float>{(N - 1) / 2.0f, 2.0f, -3.0f}));
  std::vector<double> a = {1.0, 0.5}, s(2, 0.0);
  ASSERT_TRUE(Finish(c.AllReduce(a.data(), s.data(), 2, DataType::kF64, ReduceOp::kSum, kDev, {kStream})).ok());
  EXPECT_EQ(s, (std::vector<double>{1.0 * N, 0.5 * N}));
  EXPECT_EQ(a, (std::vector<double>{1.0, 0.5}));  // the input is not written

  // Broadcast from every root.
  for (int root = 0; root < N; ++root) {
    std::vector<uint8_t> bytes(5, static_cast<uint8_t>(me == root ? 40 + root : 0));
    ASSERT_TRUE(Finish(c.Broadcast(bytes.data(), 5, DataType::kBytes, root, kDev, {kStream})).ok());
    EXPECT_EQ(bytes, std::vector<uint8_t>(5, static_cast<uint8_t>(40 + root)));
  }

  // A ring: send to the next rank, receive from the previous one.
  std::vector<float> out(4, static_cast<float>(me)), in(4, -1.0f);
  const P2P ops[] = {{(me + 1) % N, true, out.data(), 4, DataType::kF32},
                     {(me + N - 1) % N, false, in.data(), 4, DataType::kF32}};
  ASSERT_TRUE(Finish(c.SendRecv(ops, 7, kDev, {kStream})).ok());
  EXPECT_EQ(in, std::vector<float>(4, static_cast<float>((me + N - 1) % N)));

  ASSERT_TRUE(Finish(c.Barrier()).ok());
  EXPECT_GT(rig.Count("start "), 0);
}

TEST(HostStaged, InputsAfterTheStreamResultsOnlyWhenFinishedOnItsStream) {
  Communicator* world = World();
  ASSERT_NE(world, nullptr);
  Rig rig(world);
  Communicator& c = *rig.c;
  const int N = c.size();
  std::vector<float> x(6, 1.0f), y(6, -1.0f);
  absl::StatusOr<RequestPtr> r =
      c.AllReduce(x.data(), y.data(), 6, DataType::kF32, ReduceOp::kSum, kDev, {kStream});
  ASSERT_TRUE(r.ok()) << r.status();
  // In: enqueued on the operation's stream, synchronised, then the transport.
  ASSERT_GE(rig.log.size(), 3u);
  EXPECT_EQ(rig.log[0], "in " + Name(kStream));
  EXPECT_EQ(rig.log[1], "sync " + Name(kStream));
  EXPECT_EQ(rig.log[2], "start all-reduce");
  // Nothing reaches the device before the request is finished.
  EXPECT_EQ(y, std::vector<float>(6, -1.0f));
  EXPECT_EQ(rig.Count("back "), 0);
  // OrderBefore another stream: the results are copied on the operation's stream and waited
  // for (the host-synchronising fallback), so the other stream finds them.
  ASSERT_TRUE((*r)->OrderBefore({kOther}).ok());
  EXPECT_EQ(y, std::vector<float>(6, static_cast<float>(N)));
  ASSERT_GE(rig.log.size(), 5u);
  EXPECT_EQ(rig.log[rig.log.size() - 2], "back " + Name(kStream));
  EXPECT_EQ(rig.log.back(), "sync " + Name(kStream));
  // Done once: Wait and Test say so again and copy nothing more.
  const size_t events = rig.log.size();
  EXPECT_TRUE((*r)->Wait().ok());
  absl::StatusOr<bool> t = (*r)->Test();
  ASSERT_TRUE(t.ok());
  EXPECT_TRUE(*t);
  EXPECT_EQ(rig.log.size(), events);

  // Test that finds it done finishes it too. (The request is declared after the buffer it
  // writes: one dropped unfinished completes, copy included, in its destructor.)
  std::vector<double> d(3, 2.0);
  absl::StatusOr<RequestPtr> r2 =
      c.AllReduce(d.data(), d.data(), 3, DataType::kF64, ReduceOp::kSum, kDev, {kStream});
  ASSERT_TRUE(r2.ok());
  bool done = false;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (!done && std::chrono::steady_clock::now() < deadline) {
    absl::StatusOr<bool> u = (*r2)->Test();
    ASSERT_TRUE(u.ok()) << u.status();
    done = *u;
    if (!done) std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
  ASSERT_TRUE(done);
  EXPECT_EQ(d, std::vector<double>(3, 2.0 * N));
}

TEST(HostStaged, StagingIsKeptPerSizeAndEachOperationInFlightHasItsOwn) {
  Communicator* world = World();
  ASSERT_NE(world, nullptr);
  Rig rig(world);
  Communicator& c = *rig.c;
  const int N = c.size(), me = c.rank();
  std::vector<int64_t> counts(N, 3);
  std::vector<float> grads(3 * N, 1.0f), seg(3), weights(3 * N, 0.0f), record(5, 1.0f);
  std::vector<float> out(2, 1.0f), in(2);
  const P2P ops[] = {{(me + 1) % N, true, out.data(), 2, DataType::kF32},
                     {(me + N - 1) % N, false, in.data(), 2, DataType::kF32}};
  // A "step": four operations in flight at once, then finished in another order.
  auto step = [&] {
    rig.spy.seen.clear();
    std::vector<RequestPtr> reqs;
    for (absl::StatusOr<RequestPtr> r :
         {c.ReduceScatter(grads.data(), seg.data(), counts, DataType::kF32, ReduceOp::kMean, kDev, {kStream}),
          c.AllReduce(record.data(), record.data(), 5, DataType::kF32, ReduceOp::kSum, kDev, {kStream}),
          c.SendRecv(ops, 3, kDev, {kStream}),
          c.AllGather(nullptr, weights.data(), counts, DataType::kF32, kDev, {kStream})}) {
      ASSERT_TRUE(r.ok()) << r.status();
      reqs.push_back(*r);
    }
    // Buffers of operations in flight together never overlap: each has its own staging
    // (every pointer the transport saw is a distinct one here, the regions of one operation
    // included).
    std::vector<const void*> seen = rig.spy.seen;
    std::sort(seen.begin(), seen.end());
    EXPECT_EQ(std::adjacent_find(seen.begin(), seen.end()), seen.end());
    for (auto it = reqs.rbegin(); it != reqs.rend(); ++it) ASSERT_TRUE((*it)->Wait().ok());
    std::fill(record.begin(), record.end(), 1.0f);
  };
  step();
  const int first = rig.dev->allocs;
  EXPECT_EQ(first, 4);  // one buffer per operation
  for (int k = 0; k < 3; ++k) step();
  EXPECT_EQ(rig.dev->allocs, first);  // the same sizes again: nothing new
  EXPECT_EQ(seg, std::vector<float>(3, 1.0f));
  // A new size is a new buffer; the old ones stay.
  std::vector<float> big(64, 1.0f);
  ASSERT_TRUE(Finish(c.AllReduce(big.data(), big.data(), 64, DataType::kF32, ReduceOp::kSum, kDev, {})).ok());
  EXPECT_EQ(rig.dev->allocs, first + 1);
  EXPECT_EQ(rig.dev->frees, 0);
  rig.c.reset();  // the adapter frees what it kept
  EXPECT_EQ(rig.dev->frees, first + 1);
}

TEST(HostStaged, HostMemoryGoesThroughAsItIs) {
  Communicator* world = World();
  ASSERT_NE(world, nullptr);
  Rig rig(world);
  rig.spy.expect_staging = false;
  std::vector<double> v(4, 1.0);
  ASSERT_TRUE(Finish(rig.c->AllReduce(v.data(), v.data(), 4, DataType::kF64, ReduceOp::kSum,
                                      MemorySpace::kHost)).ok());
  EXPECT_EQ(v, std::vector<double>(4, 1.0 * rig.c->size()));
  ASSERT_EQ(rig.spy.seen.size(), 1u);  // in place: one buffer
  EXPECT_EQ(rig.spy.seen[0], v.data());
  EXPECT_EQ(rig.dev->allocs, 0);
  EXPECT_EQ(rig.Count("in "), 0);
}

// The rest at one rank, on a local communicator of their own (the failures are local).
TEST(HostStaged, RefusalsFailuresAndDroppedRequests) {
  std::unique_ptr<Communicator> local = MakeLocalCommunicator();
  Rig rig(local.get());
  Communicator& c = *rig.c;
  const int64_t one[] = {4};
  std::vector<float> x(4, 2.0f), y(4, 0.0f);

  // Bad arguments: refused before any copy or allocation, as every backend refuses them.
  absl::StatusOr<RequestPtr> r =
      c.ReduceScatter(nullptr, y.data(), one, DataType::kF32, ReduceOp::kSum, kDev, {});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
  r = c.AllReduce(x.data(), x.data(), 4, DataType::kBytes, ReduceOp::kSum, kDev, {});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
  const int64_t two[] = {2, 2};
  r = c.AllGather(x.data(), y.data(), two, DataType::kF32, kDev, {});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
  EXPECT_TRUE(rig.log.empty());
  EXPECT_EQ(rig.dev->allocs, 0);

  // The transport refuses: its error, and the buffer is kept for the next call.
  rig.spy.refuse_next = true;
  r = c.AllReduce(x.data(), y.data(), 4, DataType::kF32, ReduceOp::kSum, kDev, {});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("refused by the transport"), std::string::npos);
  EXPECT_EQ(rig.dev->allocs, 1);
  ASSERT_TRUE(Finish(c.AllReduce(x.data(), y.data(), 4, DataType::kF32, ReduceOp::kSum, kDev, {})).ok());
  EXPECT_EQ(y, x);
  EXPECT_EQ(rig.dev->allocs, 1);

  // The operation fails: its status, nothing copied back, and its buffer is not reused (the
  // transport may still write it).
  rig.spy.fail_next = true;
  std::fill(y.begin(), y.end(), -5.0f);
  r = c.AllReduce(x.data(), y.data(), 4, DataType::kF32, ReduceOp::kSum, kDev, {});
  ASSERT_TRUE(r.ok());
  EXPECT_EQ((*r)->Wait().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ((*r)->Test().status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ((*r)->OrderBefore({kStream}).code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(y, std::vector<float>(4, -5.0f));
  ASSERT_TRUE(Finish(c.AllReduce(x.data(), y.data(), 4, DataType::kF32, ReduceOp::kSum, kDev, {})).ok());
  EXPECT_EQ(rig.dev->allocs, 2);

  // Dropped unfinished: the destructor finishes it, results included.
  std::fill(y.begin(), y.end(), 0.0f);
  r = c.AllReduce(x.data(), y.data(), 4, DataType::kF32, ReduceOp::kSum, kDev, {kStream});
  ASSERT_TRUE(r.ok());
  r = absl::StatusOr<RequestPtr>(absl::CancelledError("dropped"));
  EXPECT_EQ(y, x);

  // Zero elements: no staging at all.
  ASSERT_TRUE(Finish(c.AllReduce(nullptr, nullptr, 0, DataType::kF32, ReduceOp::kSum, kDev, {})).ok());
  EXPECT_EQ(rig.dev->allocs, 2);

  // No pinned memory left.
  rig.dev->out_of_memory = true;
  std::vector<float> z(100, 1.0f);
  r = c.AllReduce(z.data(), z.data(), 100, DataType::kF32, ReduceOp::kSum, kDev, {});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted) << r.status();
}

TEST(HostStaged, CapabilitiesAndForwarding) {
  std::unique_ptr<Communicator> local = MakeLocalCommunicator();
  Rig rig(local.get());
  Communicator& c = *rig.c;
  EXPECT_TRUE(c.device_memory_ok());
  EXPECT_FALSE(local->device_memory_ok());
  EXPECT_FALSE(c.equal_counts_only());
  rig.spy.equal_only = true;  // as the wrapped communicator says
  EXPECT_TRUE(c.equal_counts_only());
  EXPECT_EQ(c.backend(), "host-staged local");
  EXPECT_EQ(c.rank(), 0);
  EXPECT_EQ(c.size(), 1);
  EXPECT_EQ(c.progress_mode(), local->progress_mode());
  c.SetTimeout(absl::Seconds(7));
  EXPECT_EQ(rig.spy.timeout, absl::Seconds(7));
  std::vector<float> x(3, 1.0f);
  ASSERT_TRUE(Finish(c.AllReduce(x.data(), x.data(), 3, DataType::kF32, ReduceOp::kSum, kDev, {})).ok());
  EXPECT_EQ(c.stats().ops, local->stats().ops);
  EXPECT_EQ(c.stats().ops, 1);
  c.Abort("test");
  absl::StatusOr<RequestPtr> r =
      c.AllReduce(x.data(), x.data(), 3, DataType::kF32, ReduceOp::kSum, kDev, {});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kAborted) << r.status();
  // Refused before it started: its buffer went back (the same size, no new allocation).
  EXPECT_EQ(rig.dev->allocs, 1);
}

}  // namespace
}  // namespace mdopt

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--mpi") mdopt::g_mpi = true;
  }
  return RUN_ALL_TESTS();
}
