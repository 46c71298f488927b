// comm_pad at 2, 3 and 4 ranks (MPI backend): buckets whose ranks' segments differ (owner-
// layout matrices, 1-D params, row blocks of odd row counts) padded to equal segments.
//   - comm_pad=on and comm_pad=off give bitwise the same weights, mdopt_get_state fields and
//     checkpoint files (every state array, moments included) after three steps, for every
//     layout, one or many buckets, both grads= modes, bf16 weights and gradients reduced in
//     bf16;
//   - over a communicator that takes equal counts only (NCCL's contract, here a wrapper of
//     MPI that refuses unequal counts with NCCL's check), comm_pad=auto pads: every
//     reduce-scatter and all-gather of finalize, the steps, get_state and a checkpoint
//     save is equal-count, and the results are those of comm_pad=off over MPI; comm_pad=off
//     there is refused at finalize;
//   - the padding's bytes: over all ranks, comm_pad=on sends exactly the plan's padding bytes
//     more than comm_pad=off per step, and the plan's description states them.
#include <mpi.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <dirent.h>
#include <fstream>
#include <iterator>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "comm/arg_checks.h"
#include "comm/communicator.h"
#include "dist_harness.h"
#include "dist_opt/optimizer.h"
#include "dist_opt/shard_plan.h"
#include "gtest/gtest.h"

namespace mdopt::dist_test {
namespace {

// Forwards to `inner` (MPI), but says equal_counts_only() as NCCL does and holds every
// reduce-scatter and all-gather to it (NCCL's check: InvalidArgument for counts that differ),
// counting the calls it let through and those it refused.
class EqualCountsOnly final : public Communicator {
 public:
  explicit EqualCountsOnly(Communicator* inner) : inner_(inner) {}
  int checked() const { return checked_; }
  int refused() const { return refused_; }

  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  std::string backend() const override { return "equal-counts " + inner_->backend(); }
  std::string progress_mode() const override { return inner_->progress_mode(); }
  void SetTimeout(absl::Duration t) override { inner_->SetTimeout(t); }
  bool equal_counts_only() const override { return true; }
  absl::StatusOr<RequestPtr> ReduceScatter(const void* send, void* recv,
                                           absl::Span<const int64_t> counts, DataType dtype,
                                           ReduceOp op, MemorySpace space,
                                           StreamSlot stream) override {
    if (absl::Status s = Check("reduce-scatter", counts); !s.ok()) return s;
    return inner_->ReduceScatter(send, recv, counts, dtype, op, space, stream);
  }
  absl::StatusOr<RequestPtr> AllGather(const void* send, void* recv,
                                       absl::Span<const int64_t> counts, DataType dtype,
                                       MemorySpace space, StreamSlot stream) override {
    if (absl::Status s = Check("all-gather", counts); !s.ok()) return s;
    return inner_->AllGather(send, recv, counts, dtype, space, stream);
  }
  absl::StatusOr<RequestPtr> AllReduce(const void* send, void* recv, int64_t count,
                                       DataType dtype, ReduceOp op, MemorySpace space,
                                       StreamSlot stream) override {
    return inner_->AllReduce(send, recv, count, dtype, op, space, stream);
  }
  absl::StatusOr<RequestPtr> Broadcast(void* data, int64_t count, DataType dtype, int root,
                                       MemorySpace space, StreamSlot stream) override {
    return inner_->Broadcast(data, count, dtype, root, space, stream);
  }
  absl::StatusOr<RequestPtr> SendRecv(absl::Span<const P2P> ops, int tag, MemorySpace space,
                                      StreamSlot stream) override {
    return inner_->SendRecv(ops, tag, space, stream);
  }
  absl::StatusOr<RequestPtr> Barrier() override { return inner_->Barrier(); }
  void Abort(absl::string_view reason) override { inner_->Abort(reason); }
  CommStats stats() const override { return inner_->stats(); }

 private:
  absl::Status Check(absl::string_view op, absl::Span<const int64_t> counts) {
    const absl::Status s = CheckEqualCounts(CommShape{rank(), size(), "nccl", true}, op, counts);
    ++(s.ok() ? checked_ : refused_);
    return s;
  }
  Communicator* inner_;
  int checked_ = 0, refused_ = 0;
};

// A directory every rank names the same: made by rank 0, its name broadcast.
std::string SharedTempDir() {
  char name[256] = {};
  if (World()->rank() == 0) {
    const char* root = std::getenv("TMPDIR");
    std::snprintf(name, sizeof name, "%s/mdopt_comm_pad_XXXXXX", root != nullptr ? root : "/tmp");
    EXPECT_NE(mkdtemp(name), nullptr);
  }
  EXPECT_TRUE(
      BroadcastBytes(*World(), absl::MakeSpan(reinterpret_cast<uint8_t*>(name), sizeof name), 0).ok());
  return name;
}

// This rank's checkpoint file in `dir` (named rank-NNNNN.<crc>.state), whole; "" if none.
std::string RankFile(const std::string& dir, int rank) {
  char prefix[32];
  std::snprintf(prefix, sizeof prefix, "rank-%05d.", rank);
  std::string found;
  if (DIR* d = opendir(dir.c_str())) {
    while (dirent* e = readdir(d)) {
      if (std::strncmp(e->d_name, prefix, std::strlen(prefix)) == 0) found = e->d_name;
    }
    closedir(d);
  }
  if (found.empty()) return "";
  std::ifstream in(dir + "/" + found, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

bool Bitwise(const std::vector<double>& a, const std::vector<double>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(double)) == 0;
}

int64_t SumOverRanks(int64_t v) {
  int64_t sum = 0;
  MPI_Allreduce(&v, &sum, 1, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
  return sum;
}

int64_t StepBytes(const Optimizer& o) {
  const StepTraffic* t = o.last_traffic();
  return t == nullptr ? -1 : t->grads + t->check + t->cross + t->ns + t->weights;
}

// One model stepped three times on this rank's own gradients; per step the bytes it sent.
struct Trained {
  std::map<std::string, std::vector<double>> everything;
  std::string checkpoint;  // this rank's file
  std::vector<int64_t> bytes;
  std::string plan;        // the plan's description
  int64_t padding_bytes = 0;  // the plan's padding bytes per step (over all ranks)
};

Trained Train(Communicator* comm, const std::string& options, const std::string& spec, bool bf16,
          const std::string& dir) {
  Trained run;
  // Without the matrices of fewer rows than ranks: padded segments keep those in row blocks,
  // unpadded ones hold them whole (a different plan), and this test is about padding alone.
  const bool adam = ParseGroupSpec(spec)->rule.base == kernels::Base::kAdamW;
  std::vector<Tensor> tensors;
  for (const Tensor& t : Tensors(adam)) {
    if (t.shape.size() < 2 || t.shape[t.shape.size() - 2] >= comm->size()) tensors.push_back(t);
  }
  TestModel m(comm, options, spec, bf16, tensors);
  const absl::Status fin = m.opt().Finalize();
  EXPECT_TRUE(fin.ok()) << fin;
  if (!fin.ok()) return run;
  const int rank = comm->rank();
  for (int step = 1; step <= 3; ++step) {
    m.SetLocal(step, rank);
    absl::StatusOr<StepResult> r = m.opt().Step(1.0, nullptr);
    EXPECT_TRUE(r.ok()) << r.status();
    EXPECT_TRUE(m.opt().GatherParams(nullptr).ok());  // gather=deferred; else nothing to do
    run.bytes.push_back(StepBytes(m.opt()));
  }
  run.everything = m.Everything();
  EXPECT_TRUE(m.opt().Save(dir).ok());
  run.checkpoint = RankFile(dir, rank);
  EXPECT_FALSE(run.checkpoint.empty());
  const ShardPlan* plan = m.opt().plan();
  run.plan = plan->Describe(m.opt().registry().params());
  for (const BucketPlan& b : plan->buckets) run.padding_bytes += PaddingBytes(*plan, b);
  return run;
}

void ExpectSame(const Trained& a, const Trained& b) {
  ASSERT_EQ(a.everything.size(), b.everything.size());
  for (const auto& [name, v] : a.everything) {
    auto it = b.everything.find(name);
    ASSERT_NE(it, b.everything.end()) << name;
    EXPECT_TRUE(Bitwise(v, it->second)) << name << " differs";
  }
  EXPECT_TRUE(a.checkpoint == b.checkpoint) << "the checkpoint files differ";
}

struct Case {
  const char* spec;
  bool bf16;
};

// Every layout: md-muon's default (owner), md-muon in rows (NS gather/scatter), md-adamw's
// rows with its 1-D vector (always whole), whole Adam matrices with bf16 weights, a row
// sphere.
const Case kCases[] = {
    {"preset=md-muon", false},
    {"preset=md-muon layout=rows", true},
    {"preset=md-adamw", false},
    {"preset=md-adamw layout=owner", true},
    {"preset=router", false},
};

const char* const kOptions[] = {
    "threads=1",                                   // one bucket
    "threads=1 bucket_mb=0.0001",                  // a bucket per param
    "threads=1 grads=reduced gather=deferred",     // no gradient collective
    "threads=1 grad_comm_dtype=bf16 ns_comm_dtype=bf16",
};

TEST(CommPad, PaddedEqualsUnpaddedBitwiseAndCostsThePlansPaddingBytes) {
  Communicator* world = World();
  ASSERT_NE(world, nullptr);
  const int N = world->size();
  const std::string root = SharedTempDir();
  int k = 0;
  bool padded_somewhere = false;
  for (const Case& c : kCases) {
    for (const char* options : kOptions) {
      SCOPED_TRACE(std::string(c.spec) + " | " + options);
      const std::string o = options;
      const Trained off = Train(world, o + " comm_pad=off", c.spec, c.bf16, root + "/off" + std::to_string(k));
      const Trained on = Train(world, o + " comm_pad=on", c.spec, c.bf16, root + "/on" + std::to_string(k));
      ++k;
      ExpectSame(off, on);
      ASSERT_EQ(on.bytes.size(), off.bytes.size());
      for (size_t s = 0; s < on.bytes.size(); ++s) {
        EXPECT_EQ(SumOverRanks(on.bytes[s] - off.bytes[s]), on.padding_bytes) << "step " << s + 1;
      }
      EXPECT_EQ(off.padding_bytes, 0);
      padded_somewhere = padded_somewhere || on.padding_bytes > 0;
      EXPECT_NE(on.plan.find("segments padded to equal counts (comm_pad)"), std::string::npos)
          << on.plan;
      EXPECT_NE(on.plan.find("B per step on the wire over all ranks"), std::string::npos);
      EXPECT_NE(off.plan.find("segments not padded"), std::string::npos) << off.plan;
    }
  }
  EXPECT_TRUE(padded_somewhere) << "no case had uneven buckets at " << N << " ranks";
}

TEST(CommPad, AnEqualCountsOnlyCommunicatorGetsEqualCountsOnly) {
  Communicator* world = World();
  ASSERT_NE(world, nullptr);
  const std::string root = SharedTempDir();
  int k = 0;
  for (const Case& c : kCases) {
    for (const char* options : {"threads=1", "threads=1 bucket_mb=0.0001 gather=deferred"}) {
      SCOPED_TRACE(std::string(c.spec) + " | " + options);
      const std::string o = options;
      const Trained mpi = Train(world, o + " comm_pad=off", c.spec, c.bf16, root + "/mpi" + std::to_string(k));
      EqualCountsOnly equal(world);
      // auto pads for it; finalize, steps, get_state and the save all pass its check.
      const Trained padded = Train(&equal, o, c.spec, c.bf16, root + "/eq" + std::to_string(k));
      ++k;
      EXPECT_EQ(equal.refused(), 0);
      EXPECT_GT(equal.checked(), 0);
      ExpectSame(mpi, padded);
    }
  }
}

TEST(CommPad, OffIsRefusedAtFinalizeWhereEqualCountsAreRequired) {
  Communicator* world = World();
  ASSERT_NE(world, nullptr);
  EqualCountsOnly equal(world);
  TestModel m(&equal, "threads=1 comm_pad=off", "preset=md-muon", false);  // owner: uneven
  const absl::Status s = m.opt().Finalize();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("comm_pad=off: the ranks' segments of bucket 0 differ in length"),
            std::string::npos) << s;
  EXPECT_NE(s.message().find("communicator takes equal counts only (comm_pad=auto or on pads them)"),
            std::string::npos) << s;
  EXPECT_EQ(equal.checked() + equal.refused(), 0);  // refused before any collective
}

}  // namespace
}  // namespace mdopt::dist_test
