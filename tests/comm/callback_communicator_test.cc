// The callback backend against a scripted transport in one process: it plays rank `rank` of
// 2 and answers as if the other rank had passed the same data (a sum is twice this rank's
// contribution), so every result is known exactly. Covers: means divided only after the
// transport delivered (pending operations), uneven reduce-scatter counts, the in-place
// all-gather's send pointer, sends to oneself kept from the transport, the barrier's
// fallback, Test with and without a test callback, failures (message, abort once, fail
// fast), the timeout, Abort, stats (bytes_sent of every operation at rank 1 of 4 against a
// count made from the call's buffers), and destroy's order.
#include "comm/callback_communicator.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

namespace mdopt {
namespace {

constexpr int kFailed = 5;  // any value but kOk is a failure

struct Fake {
  int rank = 0;
  bool pend = false;          // leave operations pending (delivered in wait)
  bool fail = false;          // the next operation fails
  bool wait_times_out = false;
  int test_done = 1;          // what test reports
  int calls = 0, waits = 0, aborts = 0, destroys = 0;
  std::string abort_reason;
  double timeout_seen = 0;
  const void* last_send = nullptr;
  std::vector<P2P> last_p2p;
  std::vector<std::function<void()>> parked;  // index + 1 is the handle
  std::vector<std::string>* log = nullptr;

  int Deliver(void** pending, std::function<void()> f) {
    ++calls;
    if (fail) return kFailed;
    if (!pend) {
      f();
      return CallbackTransport::kOk;
    }
    parked.push_back(std::move(f));
    *pending = reinterpret_cast<void*>(parked.size());
    return CallbackTransport::kOk;
  }
};

Fake* F(void* u) { return static_cast<Fake*>(u); }

void Twice(const void* in, void* out, int64_t n, DataType dtype) {
  if (dtype == DataType::kF32) {
    for (int64_t i = 0; i < n; ++i) static_cast<float*>(out)[i] = 2 * static_cast<const float*>(in)[i];
  } else {
    for (int64_t i = 0; i < n; ++i) static_cast<double*>(out)[i] = 2 * static_cast<const double*>(in)[i];
  }
}

CallbackTransport Callbacks(Fake* f, int size = 2) {
  CallbackTransport cb;
  cb.rank = f->rank;
  cb.size = size;
  cb.user = f;
  cb.all_reduce = [](void* u, const void* send, void* recv, int64_t n, DataType dt, void** p) {
    std::vector<char> copy(static_cast<const char*>(send), static_cast<const char*>(send) + n * (dt == DataType::kF32 ? 4 : 8));
    return F(u)->Deliver(p, [=] { Twice(copy.data(), recv, n, dt); });
  };
  cb.reduce_scatter = [](void* u, const void* send, void* recv, const int64_t* counts, DataType dt, void** p) {
    const int r = F(u)->rank;
    const int64_t off = r == 0 ? 0 : counts[0];
    const float* s = static_cast<const float*>(send) + off;
    std::vector<float> copy(s, s + counts[r]);
    return F(u)->Deliver(p, [=] { Twice(copy.data(), recv, static_cast<int64_t>(copy.size()), dt); });
  };
  cb.all_gather = [](void* u, const void* send, void* recv, const int64_t* counts, DataType, void** p) {
    F(u)->last_send = send;
    const int r = F(u)->rank;
    return F(u)->Deliver(p, [=] {
      float* out = static_cast<float*>(recv);
      const int64_t mine = r == 0 ? 0 : counts[0], other = r == 0 ? counts[0] : 0;
      std::memmove(out + mine, send, static_cast<size_t>(counts[r]) * 4);
      for (int64_t i = 0; i < counts[1 - r]; ++i) out[other + i] = 7.0f;
    });
  };
  cb.broadcast = [](void* u, void* data, int64_t n, DataType, int root, void** p) {
    const int r = F(u)->rank;
    return F(u)->Deliver(p, [=] {
      if (root != r) for (int64_t i = 0; i < n; ++i) static_cast<float*>(data)[i] = 5.0f;
    });
  };
  cb.send_recv = [](void* u, const P2P* ops, int64_t n, int, void** p) {
    F(u)->last_p2p.assign(ops, ops + n);
    std::vector<P2P> v(ops, ops + n);
    return F(u)->Deliver(p, [=] {
      for (const auto& o : v) if (!o.is_send) for (int64_t i = 0; i < o.count; ++i) static_cast<float*>(o.data)[i] = 3.0f;
    });
  };
  cb.wait = [](void* u, void* h, double timeout_s) {
    Fake* f = F(u);
    ++f->waits;
    f->timeout_seen = timeout_s;
    if (f->wait_times_out) {
      std::this_thread::sleep_for(std::chrono::duration<double>(timeout_s));
      return kFailed;
    }
    f->parked[reinterpret_cast<size_t>(h) - 1]();
    return CallbackTransport::kOk;
  };
  cb.test = [](void* u, void*, bool* done) {
    *done = F(u)->test_done != 0;
    return CallbackTransport::kOk;
  };
  cb.abort = [](void* u, const char* reason) {
    ++F(u)->aborts;
    F(u)->abort_reason = reason;
  };
  cb.error_message = [](void*, char* buf, size_t size) { std::snprintf(buf, size, "the fake link is down"); };
  cb.destroy = [](void* u) {
    ++F(u)->destroys;
    if (F(u)->log != nullptr) F(u)->log->push_back("destroy");
  };
  return cb;
}

std::unique_ptr<Communicator> Make(const CallbackTransport& cb) {
  absl::StatusOr<std::unique_ptr<Communicator>> c = MakeCallbackCommunicator(cb);
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? *std::move(c) : nullptr;
}

TEST(CallbackCommunicator, MeanIsDividedOnlyOnceDelivered) {
  Fake f;
  f.pend = true;
  f.test_done = 0;
  auto c = Make(Callbacks(&f));
  EXPECT_EQ(c->backend(), "callbacks");
  std::vector<float> send = {1, -2, 3.5f}, recv(3, 0.0f);
  auto r = c->AllReduce(send.data(), recv.data(), 3, DataType::kF32, ReduceOp::kMean);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(recv, std::vector<float>(3, 0.0f));  // nothing before the transport delivers
  absl::StatusOr<bool> t = (*r)->Test();
  ASSERT_TRUE(t.ok());
  EXPECT_FALSE(*t);
  f.test_done = 1;
  t = (*r)->Test();
  ASSERT_TRUE(t.ok());
  EXPECT_TRUE(*t);
  EXPECT_EQ(recv, send);  // (x + x) / 2
  EXPECT_TRUE((*r)->Wait().ok());  // again: the same outcome, no second wait
  EXPECT_EQ(f.waits, 1);
  EXPECT_EQ(recv, send);
}

TEST(CallbackCommunicator, SumsAndUnevenReduceScatter) {
  Fake f;
  f.rank = 1;
  auto c = Make(Callbacks(&f));
  std::vector<double> x = {1.5, 2.5};
  ASSERT_TRUE((*c->AllReduce(x.data(), x.data(), 2, DataType::kF64, ReduceOp::kSum))->Wait().ok());
  EXPECT_EQ(x, (std::vector<double>{3.0, 5.0}));
  std::vector<float> send = {9, 9, 9, 1, 2, 3, 4, 5}, recv(5, 0.0f);
  const int64_t counts[] = {3, 5};
  ASSERT_TRUE((*c->ReduceScatter(send.data(), recv.data(), counts, DataType::kF32, ReduceOp::kMean))->Wait().ok());
  EXPECT_EQ(recv, (std::vector<float>{1, 2, 3, 4, 5}));
}

TEST(CallbackCommunicator, InPlaceAllGatherPassesTheOwnSegment) {
  Fake f;
  f.rank = 1;
  auto c = Make(Callbacks(&f));
  std::vector<float> buf = {0, 0, 4, 6, 8};
  const int64_t counts[] = {2, 3};
  ASSERT_TRUE((*c->AllGather(nullptr, buf.data(), counts, DataType::kF32))->Wait().ok());
  EXPECT_EQ(f.last_send, buf.data() + 2);
  EXPECT_EQ(buf, (std::vector<float>{7, 7, 4, 6, 8}));
  std::vector<float> b = {1, 1};
  ASSERT_TRUE((*c->Broadcast(b.data(), 2, DataType::kF32, 0))->Wait().ok());
  EXPECT_EQ(b, (std::vector<float>{5, 5}));
}

TEST(CallbackCommunicator, SendsToOneselfNeverReachTheTransport) {
  Fake f;
  auto c = Make(Callbacks(&f));
  std::vector<float> a = {1, 2}, b(2, 0.0f), in(2, 0.0f), out = {8, 9};
  const P2P ops[] = {{0, true, a.data(), 2, DataType::kF32},
                     {1, false, in.data(), 2, DataType::kF32},
                     {0, false, b.data(), 2, DataType::kF32},
                     {1, true, out.data(), 2, DataType::kF32}};
  ASSERT_TRUE((*c->SendRecv(ops, 5))->Wait().ok());
  EXPECT_EQ(b, a);
  EXPECT_EQ(in, (std::vector<float>{3, 3}));
  ASSERT_EQ(f.last_p2p.size(), 2u);
  EXPECT_EQ(f.last_p2p[0].peer, 1);
  EXPECT_FALSE(f.last_p2p[0].is_send);
  EXPECT_TRUE(f.last_p2p[1].is_send);
  EXPECT_EQ(f.last_p2p[1].data, out.data());
  // Only halves to oneself: the transport is not called at all.
  const int calls = f.calls;
  const P2P self[] = {{0, true, a.data(), 2, DataType::kF32}, {0, false, b.data(), 2, DataType::kF32}};
  ASSERT_TRUE((*c->SendRecv(self, 5))->Wait().ok());
  EXPECT_EQ(f.calls, calls);
  // A send to oneself without its receive is refused before anything starts.
  const P2P lone[] = {{0, true, a.data(), 2, DataType::kF32}};
  EXPECT_EQ(c->SendRecv(lone, 5).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(f.calls, calls);
}

TEST(CallbackCommunicator, BarrierFallsBackToAnAllReduce) {
  Fake f;
  CallbackTransport cb = Callbacks(&f);
  ASSERT_EQ(cb.barrier, nullptr);
  auto c = Make(cb);
  ASSERT_TRUE((*c->Barrier())->Wait().ok());
  EXPECT_EQ(f.calls, 1);
}

TEST(CallbackCommunicator, FailureBreaksWithTheTransportsMessage) {
  Fake f;
  auto c = Make(Callbacks(&f));
  f.fail = true;
  std::vector<float> x(4, 1.0f);
  auto r = c->AllReduce(x.data(), x.data(), 4, DataType::kF32, ReduceOp::kSum);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(r.status().message().find("callback communicator rank 0 of 2: all-reduce (4 x f32, sum) failed: the fake link is down"),
            std::string::npos) << r.status();
  EXPECT_EQ(f.aborts, 1);
  f.fail = false;
  const int calls = f.calls;
  auto again = c->AllReduce(x.data(), x.data(), 4, DataType::kF32, ReduceOp::kSum);
  ASSERT_FALSE(again.ok());
  EXPECT_NE(again.status().message().find("communicator is broken"), std::string::npos);
  EXPECT_EQ(f.calls, calls);
  EXPECT_EQ(f.aborts, 1);
}

TEST(CallbackCommunicator, WaitPastTheTimeoutIsDeadlineExceeded) {
  Fake f;
  f.pend = true;
  f.wait_times_out = true;
  auto c = Make(Callbacks(&f));
  c->SetTimeout(absl::Milliseconds(50));
  std::vector<float> x(2, 1.0f);
  auto r = c->AllReduce(x.data(), x.data(), 2, DataType::kF32, ReduceOp::kSum);
  ASSERT_TRUE(r.ok());
  absl::Status s = (*r)->Wait();
  EXPECT_EQ(s.code(), absl::StatusCode::kDeadlineExceeded) << s;
  EXPECT_NE(s.message().find("comm_timeout_s = 0.05"), std::string::npos) << s;
  EXPECT_DOUBLE_EQ(f.timeout_seen, 0.05);
  EXPECT_EQ(f.aborts, 1);
  EXPECT_EQ(c->Barrier().status().code(), absl::StatusCode::kUnavailable);
}

TEST(CallbackCommunicator, AbortFailsPendingWithoutWaiting) {
  Fake f;
  f.pend = true;
  auto c = Make(Callbacks(&f));
  std::vector<float> x(2, 1.0f);
  auto r = c->AllReduce(x.data(), x.data(), 2, DataType::kF32, ReduceOp::kSum);
  ASSERT_TRUE(r.ok());
  c->Abort("the trainer stops");
  EXPECT_EQ((*r)->Wait().code(), absl::StatusCode::kAborted);
  EXPECT_EQ(f.waits, 0);
  EXPECT_EQ(f.aborts, 1);
  EXPECT_EQ(f.abort_reason, "the trainer stops");
  EXPECT_EQ(c->Barrier().status().code(), absl::StatusCode::kAborted);
}

TEST(CallbackCommunicator, StatsByTheCommonFormulas) {
  Fake f;
  auto c = Make(Callbacks(&f));
  std::vector<float> x(10, 1.0f), y(10, 0.0f);
  ASSERT_TRUE((*c->AllReduce(x.data(), y.data(), 10, DataType::kF32, ReduceOp::kSum))->Wait().ok());
  const int64_t counts[] = {4, 6};
  ASSERT_TRUE((*c->ReduceScatter(x.data(), y.data(), counts, DataType::kF32, ReduceOp::kSum))->Wait().ok());
  const CommStats s = c->stats();
  EXPECT_EQ(s.ops, 2);
  EXPECT_EQ(s.bytes_sent, 40 + 24);  // 2 (N-1)/N x 40 bytes; (10 - 4) x 4 bytes
  EXPECT_GE(s.busy_seconds, 0.0);
  EXPECT_GE(s.wait_seconds, 0.0);
}

// What each call puts on the wire, counted here from the call's own buffers (direct
// delivery: every byte another rank needs from this one leaves it once), against the stats.
// The transport moves nothing: only the accounting is under test. Rank 1 of 4.
TEST(CallbackCommunicator, BytesSentIsWhatThisRankPutsOnTheWire) {
  CallbackTransport t;
  t.rank = 1;
  t.size = 4;
  t.all_reduce = [](void*, const void*, void*, int64_t, DataType, void**) { return CallbackTransport::kOk; };
  t.reduce_scatter = [](void*, const void*, void*, const int64_t*, DataType, void**) { return CallbackTransport::kOk; };
  t.all_gather = [](void*, const void*, void*, const int64_t*, DataType, void**) { return CallbackTransport::kOk; };
  t.broadcast = [](void*, void*, int64_t, DataType, int, void**) { return CallbackTransport::kOk; };
  t.send_recv = [](void*, const P2P*, int64_t, int, void**) { return CallbackTransport::kOk; };
  auto c = Make(t);
  const int64_t others = 3;
  int64_t seen = 0;
  auto sent = [&] {  // bytes_sent since the last call
    const int64_t now = c->stats().bytes_sent;
    const int64_t d = now - seen;
    seen = now;
    return d;
  };
  // Uneven all-gather: this rank's 3 floats go to each of the 3 others (not the 12 it receives).
  {
    std::vector<float> mine(3, 1.0f), all(5 + 3 + 0 + 7);
    const int64_t counts[] = {5, static_cast<int64_t>(mine.size()), 0, 7};
    ASSERT_TRUE((*c->AllGather(mine.data(), all.data(), counts, DataType::kF32))->Wait().ok());
    EXPECT_EQ(sent(), static_cast<int64_t>(mine.size() * sizeof(float)) * others);
  }
  // A rank that contributes nothing to an all-gather sends nothing, whatever it receives.
  {
    std::vector<double> all(4 + 0 + 2 + 6);
    const int64_t counts[] = {4, 0, 2, 6};
    ASSERT_TRUE((*c->AllGather(nullptr, all.data(), counts, DataType::kF64))->Wait().ok());
    EXPECT_EQ(sent(), 0);
  }
  // Equal all-gather: 6 bf16 to each other rank.
  {
    std::vector<uint16_t> mine(6), all(4 * mine.size());
    const std::vector<int64_t> counts(4, static_cast<int64_t>(mine.size()));
    ASSERT_TRUE((*c->AllGather(mine.data(), all.data(), counts, DataType::kBf16))->Wait().ok());
    EXPECT_EQ(sent(), static_cast<int64_t>(mine.size() * sizeof(uint16_t)) * others);
  }
  // Uneven reduce-scatter: every segment of the input but this rank's own leaves once.
  {
    std::vector<uint16_t> in(2 + 4 + 1 + 3), out(4);
    const int64_t counts[] = {2, static_cast<int64_t>(out.size()), 1, 3};
    ASSERT_TRUE((*c->ReduceScatter(in.data(), out.data(), counts, DataType::kBf16, ReduceOp::kMean))->Wait().ok());
    EXPECT_EQ(sent(), static_cast<int64_t>((in.size() - out.size()) * sizeof(uint16_t)));
  }
  // All-reduce: a reduce-scatter and an all-gather of 4 equal parts, 2 x 3/4 of the buffer.
  {
    std::vector<double> x(7, 1.0);
    ASSERT_TRUE((*c->AllReduce(x.data(), x.data(), 7, DataType::kF64, ReduceOp::kSum))->Wait().ok());
    EXPECT_EQ(sent(), static_cast<int64_t>(2 * 3 * x.size() * sizeof(double) / 4));  // 84
  }
  // Broadcast: the root sends its buffer to each other rank; the others send nothing.
  {
    std::vector<uint8_t> b(9);
    ASSERT_TRUE((*c->Broadcast(b.data(), 9, DataType::kBytes, /*root=*/1))->Wait().ok());
    EXPECT_EQ(sent(), static_cast<int64_t>(b.size()) * others);
    ASSERT_TRUE((*c->Broadcast(b.data(), 9, DataType::kBytes, /*root=*/2))->Wait().ok());
    EXPECT_EQ(sent(), 0);
  }
  // Send/recv: the sends to other ranks; a send to oneself moves nothing.
  {
    std::vector<float> to0(5), self(2), from_self(2), from3(4);
    const P2P ops[] = {{0, true, to0.data(), 5, DataType::kF32},
                       {1, true, self.data(), 2, DataType::kF32},
                       {1, false, from_self.data(), 2, DataType::kF32},
                       {3, false, from3.data(), 4, DataType::kF32}};
    ASSERT_TRUE((*c->SendRecv(ops, 3))->Wait().ok());
    EXPECT_EQ(sent(), static_cast<int64_t>(to0.size() * sizeof(float)));
  }
  ASSERT_TRUE((*c->Barrier())->Wait().ok());
  EXPECT_EQ(sent(), 0);
  EXPECT_EQ(c->stats().ops, 9);
}

TEST(CallbackCommunicator, DestroyWaitsPendingThenCallsDestroy) {
  Fake f;
  f.pend = true;
  std::vector<std::string> log;
  f.log = &log;
  std::vector<float> x(2, 1.0f);
  {
    auto c = Make(Callbacks(&f));
    ASSERT_TRUE(c->AllReduce(x.data(), x.data(), 2, DataType::kF32, ReduceOp::kSum).ok());  // dropped
  }
  EXPECT_EQ(f.waits, 1);
  EXPECT_EQ(x, (std::vector<float>{2, 2}));
  EXPECT_EQ(log, std::vector<std::string>{"destroy"});
}

TEST(CallbackCommunicator, Refusals) {
  Fake f;
  CallbackTransport cb = Callbacks(&f);
  cb.all_gather = nullptr;
  absl::StatusOr<std::unique_ptr<Communicator>> c = MakeCallbackCommunicator(cb);
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("all_gather is NULL"), std::string::npos);
  cb = Callbacks(&f, 0);
  EXPECT_FALSE(MakeCallbackCommunicator(cb).ok());
  cb = Callbacks(&f);
  cb.rank = -1;
  EXPECT_FALSE(MakeCallbackCommunicator(cb).ok());
  // A pending operation without a wait callback is a failure, not a hang.
  f.pend = true;
  cb = Callbacks(&f);
  cb.wait = nullptr;
  auto comm = Make(cb);
  std::vector<float> x(2, 1.0f);
  auto r = comm->AllReduce(x.data(), x.data(), 2, DataType::kF32, ReduceOp::kSum);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("no wait callback"), std::string::npos);
  // Device memory is refused like on every host backend.
  EXPECT_EQ(Make(Callbacks(&f))->AllReduce(x.data(), x.data(), 2, DataType::kF32, ReduceOp::kSum,
                                           MemorySpace::kDevice).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace mdopt
