// Memory discipline of the fast engine, through the C++ optimizer API:
//  (a) a step allocates nothing, the first one included: every buffer is sized at finalize
//      (counted by replacing the global operator new of this program);
//  (b) an allocation that fails anywhere in finalize, save or load is reported as
//      ResourceExhausted (MDOPT_OUT_OF_MEMORY at the ABI) and leaves the optimizer as it was:
//      the n-th allocation of at least 1 KiB is made to throw std::bad_alloc for n = 0, 1,
//      2, ... until the call gets through (state, workspace and file buffers: what runs out in
//      practice; small strings inside Abseil's formatting, whose frames do not pass
//      exceptions on, are left alone), and after every failure the optimizer and the model's tensors are
//      bitwise unchanged and the call succeeds when retried. A bad_alloc inside an OpenMP
//      region would end the program (std::terminate), so this also shows there is none.
#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "dist_opt/optimizer.h"
#include "numeric_util.h"
#include "test_util.h"

namespace {

std::atomic<bool> g_counting{false};
std::atomic<int64_t> g_allocations{0}, g_large{0};
// The allocation of at least kFailMinBytes (counted from when counting started) that throws;
// -1: none.
std::atomic<int64_t> g_fail_at{-1};
constexpr std::size_t kFailMinBytes = 1024;

void* Allocate(std::size_t size) {
  if (g_counting.load(std::memory_order_relaxed)) {
    g_allocations.fetch_add(1, std::memory_order_relaxed);
    if (size >= kFailMinBytes) {
      const int64_t k = g_large.fetch_add(1, std::memory_order_relaxed);
      if (k == g_fail_at.load(std::memory_order_relaxed)) throw std::bad_alloc();
    }
  }
  if (void* p = std::malloc(size == 0 ? 1 : size)) return p;
  throw std::bad_alloc();
}

}  // namespace

// Every form the library and the standard library use (std::stable_sort's buffer takes the
// nothrow one), so that each allocation and its release go through the same pair.
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
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }

namespace mdopt {
namespace {

// Counts (and optionally fails) the allocations made while it lives.
class AllocationWatch {
 public:
  explicit AllocationWatch(int64_t fail_at = -1) {
    g_allocations = 0;
    g_large = 0;
    g_fail_at = fail_at;
    g_counting = true;
  }
  ~AllocationWatch() {
    g_counting = false;
    g_fail_at = -1;
  }
  int64_t count() const { return g_allocations.load(); }
};

struct Tensor {
  Tensor(std::string n, std::vector<int64_t> s, bool b) : name(std::move(n)), shape(std::move(s)), bf16(b) {}
  std::string name;
  std::vector<int64_t> shape;
  bool bf16 = false;
  std::vector<float> w, g;
  std::vector<uint16_t> wb;
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    return n;
  }
};

// One optimizer with one group over a few tensors large enough that the passes and the
// Newton-Schulz products run on several threads. A spec with blocks=rows:K gets matrices
// whose rows are a multiple of 6 (K = 2 or 3) and its vector in a group of its own (a
// blocks group takes matrices only), so that both groups step side by side.
class Harness {
 public:
  Harness(const std::string& options, const std::string& spec, bool bf16) : comm_(MakeLocalCommunicator()) {
    OptimizerOptions o = *ParseOptimizerOptions(options);
    opt_ = std::make_unique<Optimizer>(comm_.get(), o);
    EXPECT_TRUE(opt_->AddGroup("g", spec).ok());
    const bool adam = ParseGroupSpec(spec)->rule.base == kernels::Base::kAdamW;
    const bool blocks = spec.find("blocks=") != std::string::npos;
    if (spec.find("blocks=groups:") != std::string::npos) {
      // Interleaved blocks (groups:6:6,3,3: 72 rows): the model rows go through the row map.
      EXPECT_TRUE(opt_->AddGroup("v", "preset=vector").ok());
      tensors_ = {{"wide", {72, 530}, bf16}, {"tall", {72, 41}, bf16}, {"experts", {2, 72, 90}, bf16},
                  {"vec", {40000}, bf16}};
    } else if (blocks) {
      EXPECT_TRUE(opt_->AddGroup("v", "preset=vector").ok());
      tensors_ = {{"wide", {66, 530}, bf16}, {"tall", {600, 41}, bf16}, {"experts", {2, 42, 90}, bf16},
                  {"vec", {40000}, bf16}};
    } else {
      tensors_ = {{"wide", {67, 530}, bf16}, {"tall", {600, 41}, bf16}, {"experts", {2, 40, 90}, bf16}};
      if (adam) tensors_.push_back({"vec", {40000}, bf16});
    }
    for (size_t i = 0; i < tensors_.size(); ++i) {
      Tensor& t = tensors_[i];
      const std::vector<double> w0 = testing::RandomNormal(t.numel(), 100 + i, 0.05);
      t.w.assign(w0.begin(), w0.end());
      t.g.assign(static_cast<size_t>(t.numel()), 0.0f);
      if (bf16) {
        for (float f : t.w) t.wb.push_back(kernels::FloatToBf16(f));
      }
      ParamDescription d;
      d.name = t.name;
      d.group = blocks && t.shape.size() == 1 ? "v" : "g";
      d.ndim = static_cast<int>(t.shape.size());
      for (size_t k = 0; k < t.shape.size(); ++k) d.shape[k] = t.shape[k];
      d.param_dtype = bf16 ? MDOPT_DTYPE_BF16 : MDOPT_DTYPE_F32;
      d.param = bf16 ? static_cast<void*>(t.wb.data()) : t.w.data();
      d.grad_dtype = MDOPT_DTYPE_F32;
      d.grad = t.g.data();
      EXPECT_TRUE(opt_->AddParam(d).ok());
    }
  }

  Optimizer& opt() { return *opt_; }

  void SetGradients(int step) {
    for (size_t i = 0; i < tensors_.size(); ++i) {
      const std::vector<double> g = testing::RandomNormal(tensors_[i].numel(), 7 * step + i, 0.1);
      std::copy(g.begin(), g.end(), tensors_[i].g.begin());
    }
  }

  // The model's tensors, byte for byte.
  std::vector<std::string> Models() const {
    std::vector<std::string> out;
    for (const Tensor& t : tensors_) {
      const char* p = t.bf16 ? reinterpret_cast<const char*>(t.wb.data())
                             : reinterpret_cast<const char*>(t.w.data());
      out.emplace_back(p, static_cast<size_t>(t.numel()) * (t.bf16 ? 2 : 4));
    }
    return out;
  }

  // Every state field of every tensor (only valid after finalize).
  std::vector<std::vector<double>> States() const {
    std::vector<std::vector<double>> out;
    for (size_t i = 0; i < tensors_.size(); ++i)
      for (const char* f : {"master", "direction", "gain_row", "gain_col", "gain_scalar", "radius"}) {
        absl::StatusOr<std::vector<double>> v = opt_->GetState(static_cast<int64_t>(i), f);
        if (v.ok()) out.push_back(*v);
      }
    return out;
  }

 private:
  std::unique_ptr<Communicator> comm_;
  std::unique_ptr<Optimizer> opt_;
  std::vector<Tensor> tensors_;
};

struct Case {
  const char* name;
  const char* spec;
  bool bf16;
};
void PrintTo(const Case& c, std::ostream* os) { *os << c.spec << (c.bf16 ? " bf16" : ""); }

const Case kCases[] = {
    {"md_muon", "preset=md-muon", false},
    {"md_muon_bf16", "preset=md-muon", true},
    {"md_adamw", "preset=md-adamw", false},
    {"md_adamw_bf16", "preset=md-adamw", true},
    {"muon", "preset=muon", false},
    {"adamw", "preset=adamw", false},
    {"router", "preset=router", false},
    {"embedding", "preset=embedding", false},
    {"col_tangent_scalar", "preset=md-muon sphere=col tangent=1 gains=scalar", false},
    {"frobenius_tangent_adam", "preset=md-adamw tangent=1", true},
    // Row blocks (a GLU fc1's gate and up, a 3-D stack of them): the blocks' shared column
    // and scalar gains are summed and copied into every replica inside the step, from
    // buffers sized at finalize.
    {"md_muon_blocks2", "preset=md-muon blocks=rows:2", false},
    {"md_muon_blocks2_bf16", "preset=md-muon blocks=rows:2", true},
    {"md_adamw_blocks2", "preset=md-adamw blocks=rows:2", false},
    {"md_adamw_blocks2_bf16", "preset=md-adamw blocks=rows:2", true},
    {"md_muon_blocks3_scalar_tangent", "preset=md-muon blocks=rows:3 gains=scalar tangent=1", false},
    // Interleaved blocks (a GQA linear_qkv): rows read and written through the row map.
    {"md_muon_groups", "preset=md-muon blocks=groups:6:6,3,3", false},
    {"md_adamw_groups_bf16", "preset=md-adamw blocks=groups:6:6,3,3", true},
};

class Allocations : public ::testing::TestWithParam<Case> {};

TEST_P(Allocations, StepsAllocateNothing) {
  const Case& c = GetParam();
  Harness h("threads=2", c.spec, c.bf16);
  ASSERT_TRUE(h.opt().Finalize().ok());
  for (int step = 1; step <= 3; ++step) {
    h.SetGradients(step);
    absl::StatusOr<StepResult> r;
    int64_t allocations = 0;
    {
      AllocationWatch watch;
      r = h.opt().Step(1.0, nullptr);
      allocations = watch.count();
    }
    ASSERT_TRUE(r.ok()) << r.status();
    ASSERT_FALSE(r->skipped);
    EXPECT_EQ(allocations, 0) << "step " << step << " allocated";
  }
}

// Makes the n-th allocation of `call` fail for every n until it succeeds; after each failure
// the optimizer must be exactly as before (`snapshot`).
template <typename Call, typename Snapshot>
void FailEveryAllocation(const char* what, Call call, Snapshot snapshot) {
  const auto before = snapshot();
  int64_t n = 0;
  for (;; ++n) {
    absl::Status s;
    {
      AllocationWatch watch(n);
      s = call();
    }
    if (s.ok()) break;
    ASSERT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << what << " allocation " << n << ": " << s;
    ASSERT_NE(s.message().find("out of memory"), absl::string_view::npos) << s;
    ASSERT_TRUE(snapshot() == before) << what << ": state changed by a failed call (allocation " << n << ")";
    ASSERT_LT(n, 100000) << what << " never succeeded";
  }
  EXPECT_GT(n, 0) << what << " made no allocation to fail";
}

TEST_P(Allocations, FailedAllocationsLeaveTheOptimizerAsItWas) {
  const Case& c = GetParam();
  Harness h("threads=2", c.spec, c.bf16);
  Harness twin("threads=2", c.spec, c.bf16);
  // Finalize: not finalized and the tensors untouched after each failure.
  FailEveryAllocation("finalize", [&] { return h.opt().Finalize(); }, [&] { return h.Models(); });
  ASSERT_TRUE(twin.opt().Finalize().ok());
  ASSERT_TRUE(h.Models() == twin.Models());
  ASSERT_TRUE(h.States() == twin.States());

  // Save into a fresh directory, then load: state and tensors unchanged by each failure.
  testing::TempDir dir;
  const std::string path = dir.path() + "/ckpt";
  auto snapshot = [&] { return std::make_pair(h.Models(), h.States()); };
  for (int step = 1; step <= 2; ++step) {
    h.SetGradients(step);
    twin.SetGradients(step);
    ASSERT_TRUE(h.opt().Step(1.0, nullptr).ok());
    ASSERT_TRUE(twin.opt().Step(1.0, nullptr).ok());
  }
  FailEveryAllocation("save", [&] { return h.opt().Save(path); }, snapshot);
  h.SetGradients(3);
  ASSERT_TRUE(h.opt().Step(1.0, nullptr).ok());  // move away from the checkpoint
  FailEveryAllocation("load", [&] { return h.opt().Load(path); }, snapshot);
  // Loaded back to step 2: continuing matches the twin bit for bit.
  h.SetGradients(3);
  twin.SetGradients(3);
  ASSERT_TRUE(h.opt().Step(1.0, nullptr).ok());
  ASSERT_TRUE(twin.opt().Step(1.0, nullptr).ok());
  EXPECT_TRUE(h.Models() == twin.Models());
  EXPECT_TRUE(h.States() == twin.States());
}

INSTANTIATE_TEST_SUITE_P(Presets, Allocations, ::testing::ValuesIn(kCases),
                         [](const ::testing::TestParamInfo<Case>& info) { return info.param.name; });

}  // namespace
}  // namespace mdopt
