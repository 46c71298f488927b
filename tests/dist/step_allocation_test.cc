// A sharded step allocates nothing after the first, at N ranks on the MPI backend: this
// program replaces every form of the global operator new and delete (plain, array, nothrow,
// aligned, sized) and counts the calls and bytes, on every thread of the process (the
// caller's and the communicator's progress thread), while steps 2..kSteps run. Covered:
// md-muon and md-adamw, layout=rows and layout=owner, grads=local and grads=reduced,
// gather=eager and gather=deferred (+ mdopt_gather_params, counted), one or many buckets,
// bf16 weights and bf16 Newton-Schulz traffic, mdopt_grads_ready in backward order before
// the step (counted), a step skipped because one rank's gradient holds a NaN, and params
// without a gradient (NULL: on every rank, and with grads=local on one rank). After the
// run every rank's weights must equal the same optimizer's on one rank fed the mean gradient
// (as in sharded_step_test), so that recycled records cannot have mixed up buffers unseen.
//
// What is not counted: malloc, which is what MPI (Open MPI, MPICH: C libraries) and the
// OpenMP runtime allocate with internally, and Abseil's low-level allocator (mmap) behind
// absl::Mutex's per-thread state. A failure prints every rank's count per step, and with
// MDOPT_ALLOC_TRACE=1 the stack of the first counted allocation of each failing step.
//
// --host-init=funneled: the program initialises MPI with MPI_THREAD_FUNNELED itself, so the
// communicator runs caller-driven (no progress thread).
#include <execinfo.h>
#include <gtest/gtest.h>
#include <mpi.h>

#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <new>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "dist_opt/optimizer.h"
#include "kernels/common/bf16.h"
#include "tests/dist/dist_harness.h"

namespace {

std::atomic<bool> g_counting{false};
std::atomic<int64_t> g_calls{0}, g_bytes{0};
// MDOPT_ALLOC_TRACE=1: the stack of the first counted allocation.
bool g_trace = false;
std::atomic<bool> g_traced{false};
void* g_frames[32];
int g_depth = 0;

void Count(std::size_t size) {
  if (!g_counting.load(std::memory_order_relaxed)) return;
  g_calls.fetch_add(1, std::memory_order_relaxed);
  g_bytes.fetch_add(static_cast<int64_t>(size), std::memory_order_relaxed);
  if (g_trace && !g_traced.exchange(true)) g_depth = backtrace(g_frames, 32);
}

void* Allocate(std::size_t size) {
  Count(size);
  if (void* p = std::malloc(size == 0 ? 1 : size)) return p;
  throw std::bad_alloc();
}

void* AllocateAligned(std::size_t size, std::align_val_t align) {
  Count(size);
  const std::size_t a = static_cast<std::size_t>(align);
  // aligned_alloc takes a multiple of the alignment.
  const std::size_t rounded = size == 0 ? a : (size + a - 1) / a * a;
  if (void* p = std::aligned_alloc(a, rounded)) return p;
  throw std::bad_alloc();
}

}  // namespace

// Every replaceable form, so that each allocation and its release go through one pair.
void* operator new(std::size_t size) { return Allocate(size); }
void* operator new[](std::size_t size) { return Allocate(size); }
void* operator new(std::size_t size, const std::nothrow_t&) noexcept {
  try {
    return Allocate(size);
  } catch (...) {
    return nullptr;
  }
}
void* operator new[](std::size_t size, const std::nothrow_t&) noexcept {
  try {
    return Allocate(size);
  } catch (...) {
    return nullptr;
  }
}
void* operator new(std::size_t size, std::align_val_t a) { return AllocateAligned(size, a); }
void* operator new[](std::size_t size, std::align_val_t a) { return AllocateAligned(size, a); }
void* operator new(std::size_t size, std::align_val_t a, const std::nothrow_t&) noexcept {
  try {
    return AllocateAligned(size, a);
  } catch (...) {
    return nullptr;
  }
}
void* operator new[](std::size_t size, std::align_val_t a, const std::nothrow_t&) noexcept {
  try {
    return AllocateAligned(size, a);
  } catch (...) {
    return nullptr;
  }
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }

namespace mdopt {
namespace {

constexpr int kSteps = 6;       // step 1 may allocate (first use); 2..kSteps must not
constexpr int kNanStep = 4;     // grads=local cases: rank N-1's gradient holds a NaN
constexpr int kNullStep = 3;    // null_grad cases: params without a gradient (NULL)
constexpr double kTolerance = 5e-6;

bool g_host_init = false;
std::unique_ptr<Communicator> g_world;

Communicator* World() {
  if (g_world == nullptr) {
    absl::StatusOr<std::unique_ptr<Communicator>> c = MakeMpiCommunicator(nullptr);
    if (!c.ok()) {
      ADD_FAILURE() << c.status();
      return nullptr;
    }
    g_world = *std::move(c);
  }
  return g_world.get();
}

// Counts the allocations made while it lives (every thread).
class AllocationWatch {
 public:
  AllocationWatch() {
    g_calls = 0;
    g_bytes = 0;
    g_traced = false;
    g_depth = 0;
    g_counting = true;
  }
  ~AllocationWatch() { g_counting = false; }
  void Stop(int64_t* calls, int64_t* bytes) {
    g_counting = false;
    *calls = g_calls.load();
    *bytes = g_bytes.load();
  }
};

// The model, its gradients and the comparison are the other multi-rank tests' own.
using dist_test::RelMaxError;
using dist_test::TestModel;

struct Case {
  std::string spec;     // preset=md-muon | preset=md-adamw
  std::string layout;   // rows | owner
  bool reduced;         // grads=reduced
  bool deferred;        // gather=deferred (+ GatherParams after each step, counted)
  bool many_buckets;    // bucket_mb=0.0001: one bucket per parameter, many ops in flight
  bool grads_ready = false;  // mdopt_grads_ready per param, backward order (counted)
  bool bf16 = false;         // bf16 weights
  bool ns_comm_bf16 = false;
  bool comm_pad = false;     // comm_pad=on: buckets padded to equal segments
  // At kNullStep "small" has no gradient on any rank (skipped) and, with grads=local,
  // "odd" none on rank 0 (zeros in the mean).
  bool null_grad = false;
  double tolerance = kTolerance;
  std::vector<dist_test::Tensor> tensors = {};  // empty: the harness's default model
  std::string Name() const {
    return spec + " layout=" + layout + (reduced ? " grads=reduced" : " grads=local") +
           (deferred ? " gather=deferred" : " gather=eager") +
           (many_buckets ? " bucket_mb=0.0001" : "") + (grads_ready ? " grads_ready" : "") +
           (bf16 ? " bf16" : "") + (ns_comm_bf16 ? " ns_comm_dtype=bf16" : "") +
           (comm_pad ? " comm_pad=on" : "") + (null_grad ? " null_grad" : "");
  }
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.Name(); }

std::vector<Case> Cases() {
  std::vector<Case> c;
  for (const char* spec : {"preset=md-muon", "preset=md-adamw"})
    for (const char* layout : {"rows", "owner"})
      for (bool reduced : {false, true})
        for (bool deferred : {false, true}) c.push_back({spec, layout, reduced, deferred, !deferred});
  for (const char* spec : {"preset=md-muon", "preset=md-adamw"})
    for (const char* layout : {"rows", "owner"}) {
      Case g{spec, layout, false, false, true};
      g.grads_ready = true;
      c.push_back(g);
    }
  Case b{"preset=md-muon", "rows", false, false, true};
  b.bf16 = true;
  // The bf16 model copy is compared, not the float32 master: where the ranks' cross-row
  // sums (added in another order than one rank adds them) move a master weight by an ulp
  // across a bf16 rounding boundary, that element differs by one bf16 ulp, up to 2^-8 of
  // the largest weight (seen at 3 ranks with OpenBLAS's AVX-512 kernels: 8.9e-5).
  b.tolerance = 1.0 / 256;
  c.push_back(b);
  Case n{"preset=md-muon", "rows", false, true, false};
  n.ns_comm_bf16 = true;
  n.tolerance = 2e-2;  // X and O rounded to bf16 on the wire
  c.push_back(n);
  // Padded buckets (what NCCL gets): the owner layout's uneven segments, both grads= modes.
  for (const char* spec : {"preset=md-muon", "preset=md-adamw"})
    for (bool reduced : {false, true}) {
      Case p{spec, "owner", reduced, false, true};
      p.comm_pad = true;
      c.push_back(p);
    }
  // Params without a gradient: the skip flags ride on the check record, nothing to allocate.
  Case z{"preset=md-muon", "rows", false, false, true};
  z.grads_ready = true;
  z.null_grad = true;
  c.push_back(z);
  Case y{"preset=md-adamw", "owner", true, false, true};
  y.null_grad = true;
  c.push_back(y);
  // Interleaved blocks (a GQA linear_qkv of 4 query groups): the gradient pack and the weight
  // unpack cut their spans through the row map, with nothing allocated. Tensor 5 is "big",
  // the one the NaN step poisons.
  const std::vector<dist_test::Tensor> qkv = {{"qkv", {28, 19}}, {"q2", {28, 7}},
                                              {"stack", {3, 28, 8}}, {"wide", {28, 30}},
                                              {"x", {28, 5}}, {"big", {28, 90}}};
  for (const char* layout : {"rows", "owner"}) {
    Case q{"preset=md-muon blocks=groups:4:3,2,2", layout, false, false, true};
    q.tensors = qkv;
    c.push_back(q);
  }
  return c;
}

void RunCase(const Case& c) {
  SCOPED_TRACE(c.Name());
  Communicator* world = World();
  ASSERT_NE(world, nullptr);
  const int N = world->size(), rank = world->rank();
  std::string options = std::string("threads=1 grads=") + (c.reduced ? "reduced" : "local");
  if (c.deferred) options += " gather=deferred";
  if (c.many_buckets) options += " bucket_mb=0.0001";
  if (c.ns_comm_bf16) options += " ns_comm_dtype=bf16";
  if (c.comm_pad) options += " comm_pad=on";
  const std::string spec = c.spec + " layout=" + c.layout;
  std::unique_ptr<Communicator> local = MakeLocalCommunicator();
  TestModel sharded(world, options, spec, c.bf16, c.tensors);
  TestModel single(local.get(), "threads=1", spec, c.bf16, c.tensors);
  ASSERT_TRUE(sharded.opt().Finalize().ok());
  ASSERT_TRUE(single.opt().Finalize().ok());
  const bool nan_step = !c.reduced;  // one rank's local gradient; the contract of reduced
                                     // gradients is the same mean everywhere
  // Per rank x step: calls, bytes (filled by this rank, summed over ranks afterwards).
  std::vector<double> calls(static_cast<size_t>(N * kSteps), 0.0), bytes(calls.size(), 0.0);
  std::vector<std::string> traces(kSteps);
  const int64_t P = static_cast<int64_t>(sharded.size());
  for (int step = 1; step <= kSteps; ++step) {
    const bool poisoned = nan_step && step == kNanStep;
    if (c.reduced) {
      sharded.SetMean(step, N);
    } else {
      sharded.SetLocal(step, rank);
    }
    if (poisoned && rank == N - 1) sharded.Poison(5);
    const bool nulls = c.null_grad && step == kNullStep;
    if (c.null_grad) {
      ASSERT_TRUE(sharded.HasGrad(1, !nulls).ok());
      ASSERT_TRUE(single.HasGrad(1, !nulls).ok());
      if (!c.reduced) {
        ASSERT_TRUE(sharded.HasGrad(0, !nulls || rank != 0).ok());
      }
    }
    absl::Status ready = absl::OkStatus(), gathered = absl::OkStatus();
    absl::StatusOr<StepResult> r;
    int64_t n = 0, b = 0;
    {
      AllocationWatch watch;
      if (c.grads_ready) {
        for (int64_t i = P - 1; i >= 0 && ready.ok(); --i) ready = sharded.opt().GradsReady(i, 1, nullptr);
      }
      r = sharded.opt().Step(1.0, nullptr);
      if (c.deferred && r.ok()) gathered = sharded.opt().GatherParams(nullptr);
      watch.Stop(&n, &b);
    }
    ASSERT_TRUE(ready.ok()) << ready;
    ASSERT_TRUE(r.ok()) << r.status();
    ASSERT_TRUE(gathered.ok()) << gathered;
    ASSERT_EQ(r->skipped, poisoned) << "step " << step;
    if (poisoned) {
      EXPECT_NE(r->skip_reason.find("param 'big'"), absl::string_view::npos) << r->skip_reason;
    } else {
      single.SetMean(step, N);
      if (nulls && !c.reduced) {  // "odd": the mean of the ranks but rank 0, over N
        std::vector<double> mean(static_cast<size_t>(single.tensors()[0].numel()), 0.0);
        for (int q = 1; q < N; ++q) {
          const std::vector<double> g = TestModel::Grad(single.tensors()[0], 0, step, q);
          for (size_t k = 0; k < g.size(); ++k) mean[k] += g[k] / N;
        }
        std::copy(mean.begin(), mean.end(), single.grad(0).begin());
      }
      ASSERT_TRUE(single.opt().Step(1.0, nullptr).ok());
    }
    calls[static_cast<size_t>(rank * kSteps + step - 1)] = static_cast<double>(n);
    bytes[static_cast<size_t>(rank * kSteps + step - 1)] = static_cast<double>(b);
    if (n > 0 && step > 1 && g_depth > 0) {
      char** names = backtrace_symbols(g_frames, g_depth);
      std::string t;
      for (int k = 0; names != nullptr && k < g_depth; ++k) t += std::string("    ") + names[k] + "\n";
      std::free(names);
      traces[step - 1] = t;
    }
  }
  ASSERT_TRUE(AllReduceSum(*world, absl::MakeSpan(calls)).ok());
  ASSERT_TRUE(AllReduceSum(*world, absl::MakeSpan(bytes)).ok());
  std::string table;
  bool any = false;
  for (int q = 0; q < N; ++q) {
    table += "  rank " + std::to_string(q) + ": allocations (bytes) per step 1.." + std::to_string(kSteps) + ":";
    for (int s = 0; s < kSteps; ++s) {
      const size_t at = static_cast<size_t>(q * kSteps + s);
      table += " " + std::to_string(static_cast<int64_t>(calls[at])) + " (" +
               std::to_string(static_cast<int64_t>(bytes[at])) + ")";
      any = any || (s > 0 && calls[at] != 0);
    }
    table += "\n";
  }
  if (rank == 0) std::printf("%s:\n%s", c.Name().c_str(), table.c_str());
  std::string stacks;
  for (int s = 1; s < kSteps; ++s)
    if (!traces[s].empty()) stacks += "  rank " + std::to_string(rank) + " step " + std::to_string(s + 1) + ", first allocation:\n" + traces[s];
  EXPECT_FALSE(any) << "steps 2.." << kSteps << " must allocate nothing on every rank:\n"
                    << table << (stacks.empty() ? "  (MDOPT_ALLOC_TRACE=1 prints where)\n" : stacks);
  // The steps still did the right thing.
  for (size_t i = 0; i < sharded.size(); ++i)
    EXPECT_LE(RelMaxError(sharded.Model(i), single.Model(i)), c.tolerance) << "tensor " << i;
}

class StepAllocations : public ::testing::TestWithParam<Case> {};

TEST_P(StepAllocations, NoneAfterTheFirstStep) { RunCase(GetParam()); }

INSTANTIATE_TEST_SUITE_P(Sharded, StepAllocations, ::testing::ValuesIn(Cases()),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           std::string n;
                           for (char ch : info.param.Name()) n += std::isalnum(static_cast<unsigned char>(ch)) ? ch : '_';
                           return n + "_" + std::to_string(info.index);
                         });

}  // namespace
}  // namespace mdopt

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--host-init=funneled") mdopt::g_host_init = true;
  }
  const char* trace = std::getenv("MDOPT_ALLOC_TRACE");
  g_trace = trace != nullptr && std::string(trace) == "1";
  if (g_trace) {
    void* prime[1];
    backtrace(prime, 1);  // loads the unwinder now, not inside a counted allocation
  }
  if (mdopt::g_host_init) {
    int provided = 0;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  }
  const int rc = RUN_ALL_TESTS();
  if (mdopt::g_world != nullptr) {
    std::printf("progress mode: %s\n", mdopt::g_world->progress_mode().c_str());
  }
  mdopt::g_world.reset();
  // mdopt finalises only what it initialised; a host that initialised finalises itself.
  if (mdopt::g_host_init) MPI_Finalize();
  return rc;
}
