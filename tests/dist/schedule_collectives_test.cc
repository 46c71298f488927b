// The step schedule's collectives at 2, 3 and 4 ranks (MPI backend):
//   - cross-row sums: the replicated column and scalar gains bitwise equal on every rank, and
//     the cross-row bytes per rank per step those of one all-reduce of the record, at most
//     twice the record whatever N (an all-gather of every rank's record grew with N);
//   - bytes_sent: what step info reports equals an independent count, made here by a
//     communicator wrapper from the arguments of every call, for every layout;
//   - bf16 gradients with per-rank noise 100x their mean: the float32 reduction within one
//     bf16 ulp of the float64 mean, the bf16 reduction (grad_comm_dtype=bf16) far outside;
//   - NaN on one rank: state and weights bitwise unchanged on every rank, and the next step
//     bitwise what a run that never saw the bad step computes.
#include <mpi.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "dist_harness.h"
#include "dist_opt/optimizer.h"
#include "dist_opt/options.h"
#include "gtest/gtest.h"
#include "kernels/common/bf16.h"

namespace mdopt::dist_test {
namespace {

// Forwards every call to `inner` and counts, from the call's own arguments, the bytes this
// rank hands to the wire: a reduce-scatter sends every other rank's segment once, an
// all-gather this rank's segment to each other rank, an all-reduce 2(N-1)/N of its buffer
// (reduce-scatter plus all-gather of N equal parts), a broadcast root's buffer to each other
// rank, a send/recv group its sends to other ranks.
class CountingCommunicator final : public Communicator {
 public:
  explicit CountingCommunicator(Communicator* inner) : inner_(inner) {}
  int64_t counted() const { return counted_; }

  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  std::string backend() const override { return inner_->backend(); }
  std::string progress_mode() const override { return inner_->progress_mode(); }
  void SetTimeout(absl::Duration t) override { inner_->SetTimeout(t); }
  absl::StatusOr<RequestPtr> ReduceScatter(const void* send, void* recv,
                                           absl::Span<const int64_t> counts, DataType dtype,
                                           ReduceOp op, MemorySpace space,
                                           StreamSlot stream) override {
    int64_t others = 0;
    for (int r = 0; r < size(); ++r) others += r == rank() ? 0 : counts[r];
    Count(others * static_cast<int64_t>(ElementSize(dtype)));
    return inner_->ReduceScatter(send, recv, counts, dtype, op, space, stream);
  }
  absl::StatusOr<RequestPtr> AllGather(const void* send, void* recv,
                                       absl::Span<const int64_t> counts, DataType dtype,
                                       MemorySpace space, StreamSlot stream) override {
    Count(counts[rank()] * (size() - 1) * static_cast<int64_t>(ElementSize(dtype)));
    return inner_->AllGather(send, recv, counts, dtype, space, stream);
  }
  absl::StatusOr<RequestPtr> AllReduce(const void* send, void* recv, int64_t count,
                                       DataType dtype, ReduceOp op, MemorySpace space,
                                       StreamSlot stream) override {
    const int64_t bytes = count * static_cast<int64_t>(ElementSize(dtype));
    // 2(N-1) * bytes / N, rounded down, without overflow for the sizes of this test.
    Count(2 * (size() - 1) * bytes / size());
    return inner_->AllReduce(send, recv, count, dtype, op, space, stream);
  }
  absl::StatusOr<RequestPtr> Broadcast(void* data, int64_t count, DataType dtype, int root,
                                       MemorySpace space, StreamSlot stream) override {
    if (rank() == root) Count(count * (size() - 1) * static_cast<int64_t>(ElementSize(dtype)));
    return inner_->Broadcast(data, count, dtype, root, space, stream);
  }
  absl::StatusOr<RequestPtr> SendRecv(absl::Span<const P2P> ops, int tag, MemorySpace space,
                                      StreamSlot stream) override {
    for (const P2P& p : ops)
      if (p.is_send && p.peer != rank()) Count(p.count * static_cast<int64_t>(ElementSize(p.dtype)));
    return inner_->SendRecv(ops, tag, space, stream);
  }
  absl::StatusOr<RequestPtr> Barrier() override { return inner_->Barrier(); }
  void Abort(absl::string_view reason) override { inner_->Abort(reason); }
  CommStats stats() const override { return inner_->stats(); }

 private:
  void Count(int64_t bytes) { counted_ += size() > 1 ? bytes : 0; }
  Communicator* inner_;
  int64_t counted_ = 0;
};

// Every rank's copy of `v`, as rank-major doubles.
std::vector<double> AllRanks(const std::vector<double>& v) {
  int N = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &N);
  std::vector<double> all(v.size() * N);
  MPI_Allgather(v.data(), static_cast<int>(v.size()), MPI_DOUBLE, all.data(),
                static_cast<int>(v.size()), MPI_DOUBLE, MPI_COMM_WORLD);
  return all;
}

bool BitwiseEqual(const std::vector<double>& a, const std::vector<double>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(double)) == 0;
}

struct LayoutCase {
  const char* spec;
  bool bf16;
};

const LayoutCase kLayouts[] = {
    {"preset=md-muon layout=rows", false}, {"preset=md-muon layout=owner", false},
    {"preset=md-adamw", false},            {"preset=md-adamw layout=owner", true},
    {"preset=md-muon layout=rows tangent=1", true}, {"preset=router", false},
};

TEST(ScheduleCollectives, BytesSentEqualsAnIndependentCount) {
  Communicator* world = World();
  ASSERT_NE(world, nullptr);
  const int rank = world->rank();
  for (const LayoutCase& c : kLayouts) {
    for (const char* options : {"threads=1 bucket_mb=0.0001", "threads=1 ns_comm_dtype=bf16 gather=deferred",
                                "threads=1 grads=reduced grad_comm_dtype=bf16"}) {
      SCOPED_TRACE(std::string(c.spec) + " | " + options);
      CountingCommunicator counting(world);
      TestModel a(&counting, options, c.spec, c.bf16);
      ASSERT_TRUE(a.opt().Finalize().ok());
      for (int step = 1; step <= 2; ++step) {
        a.SetLocal(step, rank);
        const int64_t before = counting.counted();
        absl::StatusOr<StepResult> r = a.opt().Step(1.0, nullptr);
        ASSERT_TRUE(r.ok()) << r.status();
        int64_t counted = counting.counted() - before;
        // gather=deferred: the weights leave in mdopt_gather_params, after the step.
        ASSERT_TRUE(a.opt().GatherParams(nullptr).ok());
        const int64_t deferred = counting.counted() - before - counted;
        EXPECT_EQ(r->bytes_sent, counted);
        const StepTraffic* t = a.opt().last_traffic();
        ASSERT_NE(t, nullptr);
        EXPECT_EQ(t->grads + t->check + t->cross + t->ns + t->weights, counted + deferred);
        if (std::strstr(options, "grads=reduced") != nullptr) {
          EXPECT_EQ(t->grads, 0);
        }
      }
    }
  }
}

// Elements of the cross-row record of `t` under md-adamw (rowcol gains, frobenius sphere):
// n column-gain gradients and one squared norm per matrix held in rows.
// Unpadded segments (MPI): a matrix with fewer rows than ranks is held whole, no cross sums.
int64_t CrossRecordOf(const Tensor& t, int world) {
  if (t.shape.size() < 2) return 0;  // 1-D: whole on one rank, no cross-row sums
  if (t.shape[t.shape.size() - 2] < world) return 0;
  const int64_t experts = t.shape.size() == 3 ? t.shape[0] : 1;
  return experts * (t.shape.back() + 1);
}

TEST(ScheduleCollectives, CrossRowSumsAreBitwiseEqualAndFlatInN) {
  Communicator* world = World();
  ASSERT_NE(world, nullptr);
  const int N = world->size(), rank = world->rank();
  for (const char* spec : {"preset=md-adamw", "preset=md-adamw gains=scalar", "preset=md-muon layout=rows"}) {
    SCOPED_TRACE(spec);
    TestModel a(world, "threads=1", spec, false);
    ASSERT_TRUE(a.opt().Finalize().ok());
    for (int step = 1; step <= 3; ++step) {
      a.SetLocal(step, rank);
      absl::StatusOr<StepResult> r = a.opt().Step(1.0, nullptr);
      ASSERT_TRUE(r.ok()) << r.status();
    }
    for (size_t i = 0; i < a.size(); ++i) {
      for (const char* field : {"gain_col", "gain_scalar"}) {
        absl::StatusOr<std::vector<double>> v = a.opt().GetState(static_cast<int64_t>(i), field);
        if (!v.ok()) continue;
        const std::vector<double> all = AllRanks(*v);
        for (int q = 1; q < N; ++q) {
          const std::vector<double> mine(all.begin(), all.begin() + v->size());
          const std::vector<double> theirs(all.begin() + q * v->size(), all.begin() + (q + 1) * v->size());
          EXPECT_TRUE(BitwiseEqual(mine, theirs)) << "param " << i << " " << field << " rank " << q;
        }
      }
    }
  }
  // md-adamw, every matrix in rows: the record is sum(n + 1) over matrices; one all-reduce
  // of it puts 2 (N - 1) / N of its bytes on the wire, below twice the record at any N.
  TestModel a(world, "threads=1", "preset=md-adamw", false);
  ASSERT_TRUE(a.opt().Finalize().ok());
  a.SetLocal(1, rank);
  ASSERT_TRUE(a.opt().Step(1.0, nullptr).ok());
  int64_t record = 0;
  for (const Tensor& t : Tensors(true)) record += CrossRecordOf(t, N);
  const StepTraffic* t = a.opt().last_traffic();
  ASSERT_NE(t, nullptr);
  const int64_t bytes = record * 8;
  EXPECT_EQ(t->cross, 2 * (N - 1) * bytes / N);
  EXPECT_LE(t->cross, 2 * bytes);
  const int64_t params = static_cast<int64_t>(Tensors(true).size());
  // The finite check: a sum of squares and a gradient-presence entry per param.
  EXPECT_EQ(t->check, 2 * (N - 1) * 2 * params * 8 / N);
  if (rank == 0) {
    std::printf("cross-row record %lld doubles: %lld bytes per rank per step at N = %d (finite check %lld)\n",
                static_cast<long long>(record), static_cast<long long>(t->cross), N,
                static_cast<long long>(t->check));
  }
}

// One 48 x 64 bf16 matrix under Adam with lr = eps = 1e6 and no weight decay: the first step
// moves each float32 master weight by g c / (|g| + c) with c = 1e6, which gives back the
// reduced gradient g exactly enough (|g| < 10) to see its rounding.
std::vector<double> ReducedGradient(Communicator* comm, const std::string& options,
                                    const std::vector<uint16_t>& grad, std::vector<uint16_t> w) {
  absl::StatusOr<OptimizerOptions> o = ParseOptimizerOptions(options);
  EXPECT_TRUE(o.ok()) << o.status();
  Optimizer opt(comm, *o);
  const absl::Status group = opt.AddGroup("g", "preset=adamw weight_decay=0 lr=1e6 eps=1e6");
  EXPECT_TRUE(group.ok()) << group;
  ParamDescription d;
  d.name = "w";
  d.group = "g";
  d.ndim = 2;
  d.shape[0] = 48;
  d.shape[1] = 64;
  d.param_dtype = 1;
  d.param = w.data();
  d.grad_dtype = 1;
  d.grad = grad.data();
  const absl::StatusOr<int64_t> added = opt.AddParam(d);
  EXPECT_TRUE(added.ok()) << added.status();
  const absl::Status finalized = opt.Finalize();
  EXPECT_TRUE(finalized.ok()) << finalized;
  const absl::StatusOr<std::vector<double>> w0 = opt.GetState(0, "master");
  absl::StatusOr<StepResult> r = opt.Step(1.0, nullptr);
  EXPECT_TRUE(r.ok()) << r.status();
  const absl::StatusOr<std::vector<double>> w1 = opt.GetState(0, "master");
  EXPECT_TRUE(w0.ok() && w1.ok());
  const double c = 1e6;
  std::vector<double> g(w0->size());
  for (size_t k = 0; k < g.size(); ++k) {
    const double delta = (*w0)[k] - (*w1)[k];
    g[k] = delta * c / (c - std::fabs(delta));
  }
  return g;
}

// The spacing of bf16 numbers at |x|.
double Bf16Ulp(double x) { return std::ldexp(1.0, std::ilogb(x) - 7); }

TEST(ScheduleCollectives, Bf16GradientsAreReducedInFloat32) {
  Communicator* world = World();
  ASSERT_NE(world, nullptr);
  const int N = world->size(), rank = world->rank();
  const size_t numel = 48 * 64;
  // mean_k = +-0.01 (1 + frac|u|); rank r's gradient bf16(mean + noise_r) with noise of
  // standard deviation 1 (100x the mean) that sums to zero over the ranks, so that the mean
  // stays near 0.01 while every partial sum is of order 1.
  const std::vector<double> u = Normal(numel, 5, 1.0);
  std::vector<std::vector<double>> z;
  for (int r = 0; r < N; ++r) z.push_back(Normal(numel, 100 + r, 1.0));
  std::vector<double> target(numel, 0.0);
  std::vector<uint16_t> mine(numel);
  for (size_t k = 0; k < numel; ++k) {
    double zbar = 0.0;
    for (int r = 0; r < N; ++r) zbar += z[r][k] / N;
    const double mean = (u[k] < 0 ? -0.01 : 0.01) * (1.0 + std::fmod(std::fabs(u[k]), 1.0));
    for (int r = 0; r < N; ++r) {
      const uint16_t g = kernels::FloatToBf16(static_cast<float>(mean + z[r][k] - zbar));
      target[k] += static_cast<double>(kernels::Bf16ToFloat(g)) / N;
      if (r == rank) mine[k] = g;
    }
  }
  const std::vector<double> w64 = Normal(numel, 9, 0.125);
  std::vector<uint16_t> w0;
  for (double x : w64) w0.push_back(kernels::FloatToBf16(static_cast<float>(x)));
  double worst_f32 = 0.0, worst_bf16 = 0.0, worst_ulps = 0.0;
  const std::vector<double> f32 = ReducedGradient(world, "threads=1", mine, w0);
  const std::vector<double> bf16 = ReducedGradient(world, "threads=1 grad_comm_dtype=bf16", mine, w0);
  for (size_t k = 0; k < numel; ++k) {
    const double ulp = Bf16Ulp(target[k]);
    worst_ulps = std::max(worst_ulps, std::fabs(f32[k] - target[k]) / ulp);
    worst_f32 = std::max(worst_f32, std::fabs(f32[k] - target[k]));
    worst_bf16 = std::max(worst_bf16, std::fabs(bf16[k] - target[k]));
  }
  EXPECT_LE(worst_ulps, 1.0) << "float32 reduction off by " << worst_ulps << " bf16 ulps";
  // bf16 rounds every partial sum: at two ranks only the final one (~0.02, half an ulp), from
  // three on partial sums of order 1 as well (2^-9 each: tens of the mean's ulps).
  EXPECT_GT(worst_bf16, 10 * worst_f32);
  if (N >= 3) {
    EXPECT_GT(worst_bf16, 1e-3);
  }
  if (rank == 0) {
    std::printf("N = %d, mean 0.01-0.02, noise 1: max |error| float32 reduction %.3g (%.3g bf16 ulps of "
                "the mean), bf16 reduction %.3g\n", N, worst_f32, worst_ulps, worst_bf16);
  }
}

TEST(ScheduleCollectives, NanOnOneRankLeavesEverythingAndTheNextStepNormal) {
  Communicator* world = World();
  ASSERT_NE(world, nullptr);
  const int N = world->size(), rank = world->rank();
  for (const LayoutCase& c : kLayouts) {
    SCOPED_TRACE(c.spec);
    TestModel a(world, "threads=1 bucket_mb=0.0001", c.spec, c.bf16);
    TestModel b(world, "threads=1 bucket_mb=0.0001", c.spec, c.bf16);
    ASSERT_TRUE(a.opt().Finalize().ok());
    ASSERT_TRUE(b.opt().Finalize().ok());
    a.SetLocal(1, rank);
    b.SetLocal(1, rank);
    ASSERT_TRUE(a.opt().Step(1.0, nullptr).ok());
    ASSERT_TRUE(b.opt().Step(1.0, nullptr).ok());
    const std::map<std::string, std::vector<double>> before = a.Everything();
    a.SetLocal(2, rank);
    if (rank == N - 1) a.Poison(a.size() - 1);
    absl::StatusOr<StepResult> r = a.opt().Step(1.0, nullptr);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_TRUE(r->skipped);
    EXPECT_EQ(r->step, 1);
    EXPECT_FALSE(std::isfinite(r->grad_norm));
    for (const auto& [name, v] : a.Everything()) {
      EXPECT_TRUE(BitwiseEqual(v, before.at(name))) << name << " changed in a skipped step";
    }
    absl::StatusOr<GroupInfo> gi = a.opt().LastStepOfGroup("g");
    ASSERT_TRUE(gi.ok());
    EXPECT_EQ(gi->skipped, gi->matrices);
    // The next step: what b, which never saw the bad step, does with the same gradients.
    for (int step = 3; step <= 4; ++step) {
      a.SetLocal(step, rank);
      b.SetLocal(step, rank);
      absl::StatusOr<StepResult> ra = a.opt().Step(1.0, nullptr);
      absl::StatusOr<StepResult> rb = b.opt().Step(1.0, nullptr);
      ASSERT_TRUE(ra.ok() && rb.ok());
      EXPECT_FALSE(ra->skipped);
      EXPECT_EQ(ra->step, rb->step);
      EXPECT_EQ(ra->grad_norm, rb->grad_norm);
    }
    const std::map<std::string, std::vector<double>> eb = b.Everything();
    for (const auto& [name, v] : a.Everything()) {
      EXPECT_TRUE(BitwiseEqual(v, eb.at(name))) << name << " differs from the run without the bad step";
    }
  }
}

// An expert stack in the owner layout: each rank orthogonalises its experts in one batched
// Newton-Schulz call (the experts of other ranks in between passed over), bitwise what one
// rank computes matrix by matrix when every rank is fed the same gradient.
TEST(ScheduleCollectives, OwnedExpertsBatchedEqualOneRankBitwise) {
  Communicator* world = World();
  ASSERT_NE(world, nullptr);
  const std::vector<Tensor> stack = {{"experts", {8, 16, 12}}, {"dense", {24, 12}}};
  for (const char* spec : {"preset=md-muon layout=owner", "preset=muon layout=owner"}) {
    SCOPED_TRACE(spec);
    TestModel a(world, "threads=1 grads=reduced", spec, false, stack);
    std::unique_ptr<Communicator> local = MakeLocalCommunicator();
    TestModel b(local.get(), "threads=1", spec, false, stack);
    ASSERT_TRUE(a.opt().Finalize().ok());
    ASSERT_TRUE(b.opt().Finalize().ok());
    for (int step = 1; step <= 3; ++step) {
      a.SetShared(step);
      b.SetShared(step);
      ASSERT_TRUE(a.opt().Step(1.0, nullptr).ok());
      ASSERT_TRUE(b.opt().Step(1.0, nullptr).ok());
    }
    const std::map<std::string, std::vector<double>> eb = b.Everything();
    for (const auto& [name, v] : a.Everything()) {
      EXPECT_TRUE(BitwiseEqual(v, eb.at(name))) << name;
    }
    absl::StatusOr<GroupInfo> gi = a.opt().LastStepOfGroup("g");
    ASSERT_TRUE(gi.ok());
    EXPECT_EQ(gi->orthogonalized, 9);
  }
}

}  // namespace
}  // namespace mdopt::dist_test
