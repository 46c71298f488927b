// The step schedule against a recording backend and a recording communicator: every stage
// call and every collective of a step is logged, with the memory space and stream each
// collective was given, and the test reads the log:
//   - each bucket's stages come in the order of the schedule;
//   - a bucket starts at most three collectives (gradient reduce-scatter, cross-row
//     all-reduce, weight all-gather) plus its Newton-Schulz send/recv, and the step one
//     all-reduce for the finite check;
//   - every collective is ordered on the backend's stream before the stage that reads it,
//     and the schedule never waits on the host (Request::Wait) inside a step, which it
//     joins to the caller's stream at its start and releases to it at its end;
//   - buckets are pipelined: bucket b + 1's pass 1 runs before bucket b finishes;
//   - a bucket mixes groups: the backend gets each param's own rule.
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "dist_opt/engine.h"
#include "dist_opt/group_spec.h"
#include "dist_opt/param_registry.h"
#include "kernels/backend.h"

namespace mdopt {
namespace {

void* const kStream = reinterpret_cast<void*>(0x5e5e);

struct Event {
  std::string what;  // a stage name, "RS", "AG", "AR", "P2P", "ORDER", "WAIT"
  int bucket = -1;   // stages: the bucket; collectives and orders: -1
  int op = -1;       // collectives and orders: the operation's id
  size_t q0 = 0, q1 = 0;
};

struct Log {
  std::vector<Event> events;
  std::vector<std::string> errors;  // wrong memory space or stream
  int Find(const std::string& what, int bucket, int from = 0) const {
    for (size_t i = static_cast<size_t>(from); i < events.size(); ++i)
      if (events[i].what == what && events[i].bucket == bucket) return static_cast<int>(i);
    return -1;
  }
  int FindOrder(int op) const {
    for (size_t i = 0; i < events.size(); ++i)
      if (events[i].what == "ORDER" && events[i].op == op) return static_cast<int>(i);
    return -1;
  }
};

class RecordingRequest final : public Request {
 public:
  RecordingRequest(Log* log, int op) : log_(log), op_(op) {}
  absl::Status Wait() override {
    log_->events.push_back({"WAIT", -1, op_});
    return absl::OkStatus();
  }
  absl::StatusOr<bool> Test() override { return true; }
  absl::Status OrderBefore(StreamSlot stream) override {
    if (stream.stream != kStream) log_->errors.push_back("ordered on another stream");
    log_->events.push_back({"ORDER", -1, op_});
    return absl::OkStatus();
  }

 private:
  Log* log_;
  int op_;
};

// Rank `rank` of `size`: every operation completes at once and moves nothing.
class RecordingCommunicator final : public Communicator {
 public:
  RecordingCommunicator(Log* log, int rank, int size) : log_(log), rank_(rank), size_(size) {}
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend() const override { return "recording"; }
  std::string progress_mode() const override { return "immediate"; }
  void SetTimeout(absl::Duration) override {}
  absl::StatusOr<RequestPtr> ReduceScatter(const void*, void*, absl::Span<const int64_t>,
                                           DataType dtype, ReduceOp, MemorySpace space,
                                           StreamSlot stream) override {
    if (dtype != DataType::kF32) log_->errors.push_back("gradients reduced in another dtype");
    return Start("RS", space, stream);
  }
  absl::StatusOr<RequestPtr> AllGather(const void*, void*, absl::Span<const int64_t>, DataType,
                                       MemorySpace space, StreamSlot stream) override {
    return Start("AG", space, stream);
  }
  absl::StatusOr<RequestPtr> AllReduce(const void*, void*, int64_t, DataType, ReduceOp,
                                       MemorySpace space, StreamSlot stream) override {
    return Start("AR", space, stream);
  }
  absl::StatusOr<RequestPtr> Broadcast(void*, int64_t, DataType, int, MemorySpace space,
                                       StreamSlot stream) override {
    return Start("BCAST", space, stream);
  }
  absl::StatusOr<RequestPtr> SendRecv(absl::Span<const P2P>, int, MemorySpace space,
                                      StreamSlot stream) override {
    return Start("P2P", space, stream);
  }
  absl::StatusOr<RequestPtr> Barrier() override { return Start("BARRIER", MemorySpace::kDevice, {kStream}); }
  void Abort(absl::string_view) override {}
  CommStats stats() const override { return {}; }

 private:
  absl::StatusOr<RequestPtr> Start(const char* what, MemorySpace space, StreamSlot stream) {
    if (space != MemorySpace::kDevice) log_->errors.push_back(std::string(what) + " in host memory");
    if (stream.stream != kStream) log_->errors.push_back(std::string(what) + " on another stream");
    const int op = next_op_++;
    log_->events.push_back({what, -1, op});
    return RequestPtr(std::make_shared<RecordingRequest>(log_, op));
  }
  Log* log_;
  const int rank_, size_;
  int next_op_ = 0;
};

// A device-like backend that does no math: it logs each call and hands out buffers.
class RecordingBackend final : public kernels::StepBackend {
 public:
  RecordingBackend(Log* log, bool matrix_order) : log_(log), matrix_order_(matrix_order) {}
  const kernels::BackendConfig& config() const { return config_; }

  const char* name() const override { return "recording"; }
  bool device_memory() const override { return true; }
  void* stream() const override { return kStream; }
  bool prefers_matrix_order() const override { return matrix_order_; }
  absl::Status Setup(kernels::BackendConfig config, absl::Span<const kernels::ParamPointers>) override {
    config_ = std::move(config);
    for (const kernels::BucketDesc& b : config_.buckets) {
      int64_t total = 0;  // the largest window's staging
      for (const kernels::CommChunk& c : b.chunks) total = std::max(total, c.total);
      totals_.push_back(std::max(total, b.seg));
      floats_.emplace_back(static_cast<size_t>(4 * totals_.back() + b.x_local + b.full + 1));
      halves_.emplace_back(static_cast<size_t>(b.x_local + b.full + 1));
      doubles_.emplace_back(static_cast<size_t>(b.cross_len + b.radial_len + 1));
    }
    check_.assign(static_cast<size_t>(config_.check_len), 0.0);
    return absl::OkStatus();
  }
  kernels::BucketBuffers Buffers(int b) override {
    const kernels::BucketDesc& d = config_.buckets[b];
    float* f = floats_[b].data();
    const int64_t total = totals_[b];
    kernels::BucketBuffers out;
    out.grad_send = f;
    out.grad_seg = f + total;
    out.weights = f + 2 * total;
    out.x_local = f + 4 * total;
    out.x_full = out.x_local + d.x_local;
    out.x_local16 = halves_[b].data();
    out.x_full16 = out.x_local16 + d.x_local;
    out.cross = doubles_[b].data();
    out.radial = out.cross + d.cross_len;
    return out;
  }
  absl::Status CheckStream(void*) const override { return absl::OkStatus(); }
  void Join(void* stream) override {
    if (stream != kStream) log_->errors.push_back("joined another stream");
    Add("Join", -1);
  }
  void Release(void* stream) override {
    if (stream != kStream) log_->errors.push_back("released another stream");
    Add("Release", -1);
  }
  void Enter() override {}
  void Leave() override {}
  void InitNorms(int b) override { Add("InitNorms", b); }
  bool InitRadii(int b, kernels::BadSlice*) override {
    Add("InitRadii", b);
    return true;
  }
  void InitProject(int b) override { Add("InitProject", b); }
  absl::Status BindParams(int64_t, absl::Span<const kernels::ParamPointers>) override {
    return absl::OkStatus();
  }
  void BeginStep(absl::Span<const kernels::GroupScalars>) override { Add("BeginStep", -1); }
  void SetParamScalars(int, const kernels::UpdateRule&) override {}
  void PackGrads(int b, int) override { Add("PackGrads", b); }
  void CheckFinite(int b) override { Add("CheckFinite", b); }
  double* check_record() override { return check_.data(); }
  void ApplyCheck() override { Add("ApplyCheck", -1); }
  void Prepare(const kernels::SlotRange& r) override { Add("Prepare", r); }
  void ApplyRadial(int b) override { Add("ApplyRadial", b); }
  void Pass1(const kernels::SlotRange& r) override { Add("Pass1", r); }
  void NewtonSchulz(const kernels::SlotRange& r) override { Add("NewtonSchulz", r); }
  void Pass2(const kernels::SlotRange& r) override { Add("Pass2", r); }
  void AssembleCross(const kernels::SlotRange& r) override { Add("AssembleCross", r); }
  void ApplyCross(const kernels::SlotRange& r) override { Add("ApplyCross", r); }
  void Finish(const kernels::SlotRange& r) override { Add("Finish", r); }
  void PackWeights(int b, int) override { Add("PackWeights", b); }
  void UnpackWeights(int b, int) override { Add("UnpackWeights", b); }
  void EndStep() override { Add("EndStep", -1); }
  absl::Status ReadOutcome(kernels::StepOutcome* out) override {
    Add("ReadOutcome", -1);
    *out = kernels::StepOutcome{};
    return absl::OkStatus();
  }
  std::vector<kernels::StateArray> State(int) override { return {}; }
  absl::Status ReadState(int, size_t, int64_t, int64_t, void*) override { return absl::OkStatus(); }
  absl::Status WriteState(int, size_t, const void*) override { return absl::OkStatus(); }
  kernels::SlotCounters Counters(int) const override { return {}; }
  void SetStepsTaken(int64_t) override {}
  absl::Status ReadParamSteps(int64_t*) override { return absl::OkStatus(); }
  absl::Status WriteParamSteps(const int64_t*) override { return absl::OkStatus(); }
  void WriteModelRows() override { Add("WriteModelRows", -1); }
  int64_t WorkspaceBytes() const override { return 0; }

 private:
  void Add(const char* what, int b) { log_->events.push_back({what, b, -1}); }
  void Add(const char* what, const kernels::SlotRange& r) {
    log_->events.push_back({what, r.bucket, -1, r.q0, r.q1});
  }
  Log* log_;
  const bool matrix_order_;
  kernels::BackendConfig config_;
  std::vector<std::vector<float>> floats_;
  std::vector<int64_t> totals_;
  std::vector<std::vector<uint16_t>> halves_;
  std::vector<std::vector<double>> doubles_;
  std::vector<double> check_;
};

// Six 16 x 12 matrices, md-muon (rows layout: Newton-Schulz gathered to an owner) and
// md-adamw in turn, two to a bucket: three buckets that each mix both groups.
struct Model {
  std::vector<Group> groups;
  ParamRegistry registry;
  std::vector<std::vector<float>> w, g;

  Model() {
    groups.push_back(Group{"muon", *ParseGroupSpec("preset=md-muon layout=rows")});
    groups.push_back(Group{"adamw", *ParseGroupSpec("preset=md-adamw")});
    for (int i = 0; i < 6; ++i) {
      w.emplace_back(16 * 12, 0.5f);
      g.emplace_back(16 * 12, 0.1f);
      ParamDescription d;
      d.name = "p" + std::to_string(i);
      d.group = groups[i % 2].name;
      d.ndim = 2;
      d.shape[0] = 16;
      d.shape[1] = 12;
      d.param = w.back().data();
      d.grad = g.back().data();
      EXPECT_TRUE(registry.Add(d, groups).ok());
    }
  }
};

struct StepRun {
  Log log;
  Model model;
  RecordingBackend* backend = nullptr;
  std::unique_ptr<RecordingCommunicator> comm;
  std::unique_ptr<Engine> engine;
  size_t step_begin = 0;  // first event of the step

  StepRun(int rank, int world, bool matrix_order) {
    comm = std::make_unique<RecordingCommunicator>(&log, rank, world);
    auto b = std::make_unique<RecordingBackend>(&log, matrix_order);
    backend = b.get();
    EngineOptions o;
    o.bucket_bytes = 2 * 16 * 12 * 4;
    engine = MakeScheduledEngine(&model.registry.params(), &model.groups, comm.get(), o, std::move(b));
    EXPECT_TRUE(engine->Init().ok());
    step_begin = log.events.size();
    EXPECT_TRUE(engine->Step(1.0, kStream).ok());
  }
  int Buckets() const { return static_cast<int>(backend->config().buckets.size()); }
};

bool IsCollective(const std::string& w) {
  return w == "RS" || w == "AG" || w == "AR" || w == "P2P" || w == "BCAST" || w == "BARRIER";
}

class Schedule : public ::testing::TestWithParam<int> {};  // the rank, of 4

TEST_P(Schedule, StagesCollectivesAndOrderPerBucket) {
  StepRun run(GetParam(), 4, /*matrix_order=*/false);
  const Log& log = run.log;
  EXPECT_TRUE(log.errors.empty()) << log.errors.front();
  const int B = run.Buckets();
  ASSERT_EQ(B, 3);

  // A bucket mixes groups, and the backend has each param's own rule.
  const kernels::BackendConfig& c = run.backend->config();
  for (const kernels::BucketDesc& b : c.buckets) {
    ASSERT_EQ(b.slots.size(), 2u);
    const kernels::UpdateRule& r0 = c.params[c.slots[b.slots[0]].param].rule;
    const kernels::UpdateRule& r1 = c.params[c.slots[b.slots[1]].param].rule;
    EXPECT_NE(r0.base, r1.base);
  }

  // The step starts after the caller's work on its stream and ends before the caller's next.
  EXPECT_EQ(log.events[run.step_begin].what, "Join");
  EXPECT_EQ(log.events.back().what, "Release");

  // No host wait anywhere in the step, and nothing read back to the host.
  for (size_t i = run.step_begin; i < log.events.size(); ++i) {
    EXPECT_NE(log.events[i].what, "WAIT") << "the schedule waited on the host inside the step";
    EXPECT_NE(log.events[i].what, "ReadOutcome");
  }

  // Each bucket's stages in order.
  const std::vector<std::string> order = {"PackGrads",  "CheckFinite", "Prepare",      "Pass1",
                                          "NewtonSchulz", "Pass2",     "AssembleCross", "ApplyCross",
                                          "Finish",     "PackWeights", "UnpackWeights"};
  for (int b = 0; b < B; ++b) {
    std::vector<std::string> seen;
    for (size_t i = run.step_begin; i < log.events.size(); ++i)
      if (log.events[i].bucket == b && !IsCollective(log.events[i].what)) seen.push_back(log.events[i].what);
    EXPECT_EQ(seen, order) << "bucket " << b;
  }

  // Collectives by bucket: each belongs to the bucket of the stage just before it; the one
  // after the last CheckFinite is the step's finite check.
  std::map<int, std::map<std::string, int>> per_bucket;
  int check = 0, last_bucket = -1;
  std::string last_stage;
  std::map<int, int> op_bucket;
  std::map<int, std::string> op_after;
  for (size_t i = run.step_begin; i < log.events.size(); ++i) {
    const Event& e = log.events[i];
    if (IsCollective(e.what)) {
      if (last_stage == "CheckFinite") {
        ++check;
        op_after[e.op] = "CheckFinite";
      } else {
        per_bucket[last_bucket][e.what]++;
        op_bucket[e.op] = last_bucket;
        op_after[e.op] = last_stage;
      }
    } else if (e.what != "ORDER") {
      last_bucket = e.bucket;
      last_stage = e.what;
    }
  }
  EXPECT_EQ(check, 1);
  for (int b = 0; b < B; ++b) {
    const std::map<std::string, int>& n = per_bucket[b];
    const int collectives = (n.count("RS") ? n.at("RS") : 0) + (n.count("AR") ? n.at("AR") : 0) +
                            (n.count("AG") ? n.at("AG") : 0) + (n.count("BCAST") ? n.at("BCAST") : 0);
    EXPECT_EQ(collectives, 3) << "bucket " << b;
    EXPECT_EQ(n.count("RS") ? n.at("RS") : 0, 1);
    EXPECT_EQ(n.count("AR") ? n.at("AR") : 0, 1);
    EXPECT_EQ(n.count("AG") ? n.at("AG") : 0, 1);
    EXPECT_LE(n.count("P2P") ? n.at("P2P") : 0, 2);  // the NS gather and scatter
  }

  // Every collective is ordered on the stream before the stage that reads what it moved.
  const std::map<std::string, std::string> reader = {{"PackGrads", "CheckFinite"},
                                                     {"Pass1", "NewtonSchulz"},
                                                     {"NewtonSchulz", "Pass2"},
                                                     {"AssembleCross", "ApplyCross"},
                                                     {"PackWeights", "UnpackWeights"},
                                                     {"CheckFinite", "ApplyCheck"}};
  for (const auto& [op, after] : op_after) {
    const int ordered = log.FindOrder(op);
    ASSERT_GE(ordered, 0) << "operation " << op << " (after " << after << ") never ordered";
    const int b = after == "CheckFinite" ? -1 : op_bucket[op];
    const int reads = log.Find(reader.at(after), b, static_cast<int>(run.step_begin));
    ASSERT_GE(reads, 0);
    EXPECT_LT(ordered, reads) << "operation after " << after << " of bucket " << b;
  }

  // Pipelined: bucket b + 1 starts its first pass before bucket b finishes, and bucket b's
  // weights are in flight while bucket b + 1 still computes.
  for (int b = 0; b + 1 < B; ++b) {
    const int s = static_cast<int>(run.step_begin);
    EXPECT_LT(log.Find("Pass1", b + 1, s), log.Find("Finish", b, s));
    EXPECT_LT(log.Find("PackWeights", b, s), log.Find("Finish", b + 1, s));
  }
}

INSTANTIATE_TEST_SUITE_P(Ranks, Schedule, ::testing::Values(0, 1, 2, 3));

// One rank: no collective at all; a backend that prefers matrix order gets each matrix's
// stages back to back, one that does not gets whole buckets.
TEST(ScheduleOneRank, NoCollectivesAndTheBackendsOrder) {
  for (bool matrix_order : {true, false}) {
    SCOPED_TRACE(matrix_order ? "matrix order" : "bucket order");
    StepRun run(0, 1, matrix_order);
    const Log& log = run.log;
    std::vector<const Event*> stages;
    for (size_t i = run.step_begin; i < log.events.size(); ++i) {
      EXPECT_FALSE(IsCollective(log.events[i].what)) << log.events[i].what;
      if (log.events[i].what == "Prepare" || log.events[i].what == "Finish") stages.push_back(&log.events[i]);
    }
    const size_t per_bucket = 2;
    ASSERT_EQ(stages.size(), 2 * (matrix_order ? run.Buckets() * per_bucket : run.Buckets()));
    for (size_t k = 0; k < stages.size(); ++k) {
      EXPECT_EQ(stages[k]->q1 - stages[k]->q0, matrix_order ? 1u : per_bucket);
      // Matrix order: Prepare and Finish of one matrix before the next matrix starts.
      if (matrix_order) {
        EXPECT_EQ(stages[k]->what, k % 2 == 0 ? "Prepare" : "Finish");
      }
    }
  }
}

}  // namespace
}  // namespace mdopt
