// The communicator's life cycle through the C ABI, in one process: mdopt_comm_abort (from
// another thread, while a step waits on the transport; then every call that needs the
// communicator refuses, naming the reason) and reference counting (mdopt_comm_destroy
// before mdopt_destroy of the optimizers on it). The MPI side is tests/dist/c_abi_abort.c
// and tests/dist/c_abi_exit.c.
#include <gtest/gtest.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "mdopt/mdopt.h"

namespace mdopt {
namespace {

constexpr int kRows = 16, kCols = 8;

// One md-muon matrix and one vector on `comm`, finalized.
struct Model {
  std::vector<float> w = std::vector<float>(kRows * kCols), g = std::vector<float>(kRows * kCols);
  std::vector<float> v = std::vector<float>(kCols, 1.0f), gv = std::vector<float>(kCols, 0.01f);
  mdopt_optimizer* opt = nullptr;

  mdopt_status Make(mdopt_comm* comm, const char* options = "threads=1") {
    for (int k = 0; k < kRows * kCols; ++k) {
      w[k] = 0.1f * static_cast<float>((k * 37) % 17 - 8);
      g[k] = 0.01f * static_cast<float>((k * 11) % 13 - 6);
    }
    if (mdopt_status s = mdopt_create(comm, options, &opt); s != MDOPT_SUCCESS) return s;
    if (mdopt_status s = mdopt_add_group(opt, "m", "preset=md-muon"); s != MDOPT_SUCCESS) return s;
    if (mdopt_status s = mdopt_add_group(opt, "v", "preset=vector"); s != MDOPT_SUCCESS) return s;
    mdopt_param_desc d = MDOPT_PARAM_DESC_INIT;
    d.name = "w";
    d.group = "m";
    d.ndim = 2;
    d.shape[0] = kRows;
    d.shape[1] = kCols;
    d.param_dtype = d.grad_dtype = MDOPT_DTYPE_F32;
    d.param = w.data();
    d.grad = g.data();
    if (mdopt_status s = mdopt_add_param(opt, &d, nullptr); s != MDOPT_SUCCESS) return s;
    mdopt_param_desc e = MDOPT_PARAM_DESC_INIT;
    e.name = "v";
    e.group = "v";
    e.ndim = 1;
    e.shape[0] = kCols;
    e.param_dtype = e.grad_dtype = MDOPT_DTYPE_F32;
    e.param = v.data();
    e.grad = gv.data();
    if (mdopt_status s = mdopt_add_param(opt, &e, nullptr); s != MDOPT_SUCCESS) return s;
    return mdopt_finalize(opt);
  }
  ~Model() { EXPECT_EQ(mdopt_destroy(opt), MDOPT_SUCCESS); }
};

// The status and that the message names every needle.
void ExpectRefused(const char* call, mdopt_status got, const std::vector<std::string>& needles) {
  const std::string message = mdopt_last_error();
  EXPECT_EQ(got, MDOPT_COMM_ERROR) << call << ": " << mdopt_status_string(got) << " '" << message << "'";
  for (const std::string& n : needles) {
    EXPECT_NE(message.find(n), std::string::npos) << call << ": '" << message << "' lacks '" << n << "'";
  }
}

TEST(comm_lifecycle, AbortOfALocalCommunicatorRefusesEveryOptimizerOnIt) {
  mdopt_comm* comm = nullptr;
  ASSERT_EQ(mdopt_comm_create_local(&comm), MDOPT_SUCCESS);
  {
    Model a, b;
    ASSERT_EQ(a.Make(comm), MDOPT_SUCCESS) << mdopt_last_error();
    ASSERT_EQ(b.Make(comm), MDOPT_SUCCESS) << mdopt_last_error();
    ASSERT_EQ(mdopt_step(a.opt, 1.0, nullptr, nullptr), MDOPT_SUCCESS) << mdopt_last_error();
    const std::vector<float> stepped = a.w;

    // From another thread, as a watchdog would.
    std::thread watchdog([&] { EXPECT_EQ(mdopt_comm_abort(comm, "watchdog: rank 7 stalled"), MDOPT_SUCCESS); });
    watchdog.join();
    const std::vector<std::string> why = {"aborted", "watchdog: rank 7 stalled"};
    for (Model* m : {&a, &b}) {
      ExpectRefused("mdopt_step", mdopt_step(m->opt, 1.0, nullptr, nullptr), why);
      ExpectRefused("mdopt_gather_params", mdopt_gather_params(m->opt, nullptr), why);
      ExpectRefused("mdopt_grads_ready", mdopt_grads_ready(m->opt, 0, 1, nullptr), why);
      mdopt_group_stats st = MDOPT_GROUP_STATS_INIT;
      ExpectRefused("mdopt_group_info", mdopt_group_info(m->opt, "m", &st), why);
      ExpectRefused("mdopt_save", mdopt_save(m->opt, "/nonexistent/never-written"), why);
      ExpectRefused("mdopt_load", mdopt_load(m->opt, "/nonexistent/never-read"), why);
      double x = 0;
      int64_t n = 0;
      ExpectRefused("mdopt_get_state", mdopt_get_state(m->opt, 0, "gains_row", &x, 1, &n), why);
      // What needs no communicator still works.
      int64_t bytes = 0;
      EXPECT_EQ(mdopt_state_bytes(m->opt, &bytes), MDOPT_SUCCESS) << mdopt_last_error();
      EXPECT_EQ(mdopt_set_group_lr(m->opt, "m", 0.01), MDOPT_SUCCESS) << mdopt_last_error();
    }
    EXPECT_EQ(a.w, stepped);  // the refused step changed nothing
    mdopt_optimizer* c = nullptr;
    ExpectRefused("mdopt_create", mdopt_create(comm, "", &c), why);
    EXPECT_EQ(c, nullptr);
    // Later aborts succeed and keep the first reason.
    EXPECT_EQ(mdopt_comm_abort(comm, "second"), MDOPT_SUCCESS);
    ExpectRefused("mdopt_step", mdopt_step(a.opt, 1.0, nullptr, nullptr), why);
    EXPECT_EQ(std::string(mdopt_last_error()).find("second"), std::string::npos);
    int rank = -1;
    EXPECT_EQ(mdopt_comm_rank(comm, &rank), MDOPT_SUCCESS);
    EXPECT_EQ(rank, 0);
  }
  EXPECT_EQ(mdopt_comm_destroy(comm), MDOPT_SUCCESS);
}

TEST(comm_lifecycle, AbortArguments) {
  EXPECT_EQ(mdopt_comm_abort(nullptr, "x"), MDOPT_INVALID_ARGUMENT);
  EXPECT_NE(std::string(mdopt_last_error()).find("comm"), std::string::npos);
  mdopt_comm* comm = nullptr;
  ASSERT_EQ(mdopt_comm_create_local(&comm), MDOPT_SUCCESS);
  EXPECT_EQ(mdopt_comm_abort(comm, nullptr), MDOPT_SUCCESS);
  mdopt_optimizer* opt = nullptr;
  ExpectRefused("mdopt_create", mdopt_create(comm, "", &opt), {"no reason given"});
  EXPECT_EQ(mdopt_comm_destroy(comm), MDOPT_SUCCESS);
}

// A communicator the optimizers still use: destroying its handle first is allowed (the
// optimizers hold references), and the optimizers keep working on it.
TEST(comm_lifecycle, DestroyBeforeTheOptimizersKeepsTheCommunicatorAlive) {
  mdopt_comm* comm = nullptr;
  ASSERT_EQ(mdopt_comm_create_local(&comm), MDOPT_SUCCESS);
  auto a = std::make_unique<Model>();
  auto b = std::make_unique<Model>();
  ASSERT_EQ(a->Make(comm), MDOPT_SUCCESS) << mdopt_last_error();
  ASSERT_EQ(b->Make(comm), MDOPT_SUCCESS) << mdopt_last_error();
  ASSERT_EQ(mdopt_comm_destroy(comm), MDOPT_SUCCESS);
  for (int k = 0; k < 3; ++k) {
    mdopt_step_info info = MDOPT_STEP_INFO_INIT;
    ASSERT_EQ(mdopt_step(a->opt, 1.0, nullptr, &info), MDOPT_SUCCESS) << mdopt_last_error();
    EXPECT_EQ(info.step, k + 1);
    mdopt_group_stats st = MDOPT_GROUP_STATS_INIT;
    ASSERT_EQ(mdopt_group_info(a->opt, "m", &st), MDOPT_SUCCESS) << mdopt_last_error();
  }
  a.reset();  // b still holds the communicator
  ASSERT_EQ(mdopt_step(b->opt, 1.0, nullptr, nullptr), MDOPT_SUCCESS) << mdopt_last_error();
  b.reset();  // the communicator goes here (ASan: no use after free, no double free)
}

// A two-rank callback transport of which only rank 0 exists: collectives complete at once
// (as if the peer sent zeros) until `hang` is set; then they stay pending and `wait` blocks
// until the transport's abort callback fires, or 60 s pass.
struct HangingTransport {
  std::mutex mu;
  std::condition_variable cv;
  bool hang = false, aborted = false, waiting = false;
  std::string abort_reason;
  int pending_token = 0;

  static HangingTransport& T(void* u) { return *static_cast<HangingTransport*>(u); }
  static size_t Size(int32_t dtype) {
    return dtype == MDOPT_COMM_DTYPE_F64 ? 8 : dtype == MDOPT_COMM_DTYPE_BF16 ? 2 : dtype == MDOPT_COMM_DTYPE_F32 ? 4 : 1;
  }
  static mdopt_status Start(void* u, void** pending) {
    HangingTransport& t = T(u);
    std::lock_guard<std::mutex> l(t.mu);
    if (t.hang) *pending = &t.pending_token;
    return MDOPT_SUCCESS;
  }
  static mdopt_status AllReduce(void* u, const void* s, void* r, int64_t n, int32_t d, void** p) {
    if (s != r) std::memmove(r, s, static_cast<size_t>(n) * Size(d));
    return Start(u, p);
  }
  static mdopt_status ReduceScatter(void* u, const void* s, void* r, const int64_t* counts, int32_t d, void** p) {
    std::memmove(r, s, static_cast<size_t>(counts[0]) * Size(d));
    return Start(u, p);
  }
  static mdopt_status AllGather(void* u, const void* s, void* r, const int64_t* counts, int32_t d, void** p) {
    if (s != nullptr && s != r) std::memmove(r, s, static_cast<size_t>(counts[0]) * Size(d));
    return Start(u, p);
  }
  static mdopt_status Broadcast(void* u, void*, int64_t, int32_t, int32_t, void** p) { return Start(u, p); }
  static mdopt_status SendRecv(void* u, const mdopt_comm_p2p*, int64_t, int32_t, void** p) { return Start(u, p); }
  static mdopt_status Wait(void* u, void*, double timeout_s) {
    HangingTransport& t = T(u);
    std::unique_lock<std::mutex> l(t.mu);
    t.waiting = true;
    t.cv.notify_all();
    const double limit = timeout_s < 60 ? timeout_s : 60;
    t.cv.wait_for(l, std::chrono::duration<double>(limit), [&] { return t.aborted; });
    return MDOPT_COMM_ERROR;  // never completes: the peer is gone
  }
  static void Abort(void* u, const char* reason) {
    HangingTransport& t = T(u);
    std::lock_guard<std::mutex> l(t.mu);
    t.aborted = true;
    t.abort_reason = reason;
    t.cv.notify_all();
  }
};

TEST(comm_lifecycle, AbortFromAnotherThreadWakesAStepWaitingOnTheTransport) {
  HangingTransport t;
  mdopt_comm_callbacks cb = MDOPT_COMM_CALLBACKS_INIT;
  cb.rank = 0;
  cb.size = 2;
  cb.user = &t;
  cb.all_reduce = HangingTransport::AllReduce;
  cb.reduce_scatter = HangingTransport::ReduceScatter;
  cb.all_gather = HangingTransport::AllGather;
  cb.broadcast = HangingTransport::Broadcast;
  cb.send_recv = HangingTransport::SendRecv;
  cb.wait = HangingTransport::Wait;
  cb.abort = HangingTransport::Abort;
  mdopt_comm* comm = nullptr;
  ASSERT_EQ(mdopt_comm_create_callbacks(&cb, &comm), MDOPT_SUCCESS) << mdopt_last_error();
  {
    Model m;
    ASSERT_EQ(m.Make(comm, "threads=1 comm_timeout_s=600"), MDOPT_SUCCESS) << mdopt_last_error();
    {
      std::lock_guard<std::mutex> l(t.mu);
      t.hang = true;
    }
    std::thread watchdog([&] {
      {  // once the step waits on the transport
        std::unique_lock<std::mutex> l(t.mu);
        t.cv.wait_for(l, std::chrono::seconds(60), [&] { return t.waiting; });
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      EXPECT_EQ(mdopt_comm_abort(comm, "watchdog: no heartbeat from rank 1"), MDOPT_SUCCESS);
    });
    const auto t0 = std::chrono::steady_clock::now();
    const mdopt_status s = mdopt_step(m.opt, 1.0, nullptr, nullptr);
    const std::string message = mdopt_last_error();
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    watchdog.join();
    EXPECT_EQ(s, MDOPT_COMM_ERROR) << message;
    EXPECT_LT(seconds, 30.0);  // woken by the abort, not by the 60 s of the fake or comm_timeout_s
    {
      std::lock_guard<std::mutex> l(t.mu);
      EXPECT_TRUE(t.waiting);
      EXPECT_TRUE(t.aborted);
      EXPECT_NE(t.abort_reason.find("no heartbeat from rank 1"), std::string::npos) << t.abort_reason;
    }
    ExpectRefused("mdopt_step", mdopt_step(m.opt, 1.0, nullptr, nullptr),
                  {"aborted", "watchdog: no heartbeat from rank 1"});
    mdopt_group_stats st = MDOPT_GROUP_STATS_INIT;
    ExpectRefused("mdopt_group_info", mdopt_group_info(m.opt, "m", &st),
                  {"aborted", "watchdog: no heartbeat from rank 1"});
  }
  EXPECT_EQ(mdopt_comm_destroy(comm), MDOPT_SUCCESS);
}

}  // namespace
}  // namespace mdopt
