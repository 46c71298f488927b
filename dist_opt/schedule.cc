// The scheduled engine (schedule.h): this rank's part of the ShardPlan described to a
// backend once, then every step driven through the backend's stages with the collectives of
// the schedule between them. Every collective is started in the same order on every rank (a
// fixed wave order over (bucket, stage)); the backend's work is ordered after a collective
// by Request::OrderBefore as late as the data is needed, so bucket b's communication
// overlaps the compute of the buckets around it. With one rank no collective is issued and,
// for a backend that prefers it, each matrix runs all its stages before the next starts.
#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "dist_opt/backend_config.h"
#include "dist_opt/engine.h"
#include "dist_opt/schedule.h"
#include "dist_opt/shard_plan.h"

namespace mdopt {
namespace {

using kernels::BucketBuffers;
using kernels::SlotRange;
using kernels::Sphere;

constexpr int kGatherTag = 11, kScatterTag = 12;

DataType CommType(Dtype d) { return d == Dtype::kF32 ? DataType::kF32 : DataType::kBf16; }

// The collectives of one bucket in flight (a pool of kScheduleStages, reused round-robin).
struct InFlight {
  RequestPtr gather, scatter, sums, ag;
};

class ScheduledEngine final : public Engine {
 public:
  ScheduledEngine(const std::vector<ParamEntry>* params, const std::vector<Group>* groups,
                  Communicator* comm, const EngineOptions& o,
                  std::unique_ptr<kernels::StepBackend> backend)
      : params_(*params), groups_(*groups), comm_(comm), opt_(o), rank_(comm->rank()),
        world_(comm->size()), backend_(std::move(backend)) {}

  absl::Status Init() override;
  absl::Status GradsReady(int64_t first, int64_t count, void* stream) override;
  absl::Status CheckStream(void* stream) const override { return backend_->CheckStream(stream); }
  absl::Status Step(double lr_scale, void* stream) override;
  absl::Status Outcome(StepOutcome* out) override { return backend_->ReadOutcome(out); }
  void SetStepsTaken(int64_t t) override { backend_->SetStepsTaken(t); }
  absl::Status ReadParamSteps(int64_t* host) override { return backend_->ReadParamSteps(host); }
  absl::Status WriteParamSteps(const int64_t* host) override {
    return backend_->WriteParamSteps(host);
  }
  void RulesChanged() override {
    for (size_t i = 0; i < params_.size(); ++i)
      backend_->SetParamScalars(static_cast<int>(i), params_[i].rule);
  }
  absl::Status GatherParams(void* stream) override;
  std::vector<StateArray> State(int64_t index, int64_t expert) override {
    return backend_->State(Slot(index, expert));
  }
  absl::Status ReadState(int64_t index, int64_t expert, size_t array, int64_t first, int64_t count,
                         void* host) override {
    return backend_->ReadState(Slot(index, expert), array, first, count, host);
  }
  absl::Status WriteState(int64_t index, int64_t expert, size_t array, const void* host) override {
    return backend_->WriteState(Slot(index, expert), array, host);
  }
  absl::Status WriteModels() override;
  void LastStep(int group, int64_t counts[4], std::vector<double>* norms) const override;
  int64_t WorkspaceBytes() const override { return backend_->WorkspaceBytes(); }
  const char* name() const override { return "fast"; }
  const ShardPlan* plan() const override { return &plan_; }
  void Enter() override { backend_->Enter(); }
  void Leave() override { backend_->Leave(); }
  bool HostSynchronous() const override { return !backend_->device_memory(); }
  const StepTraffic* Traffic() const override { return &traffic_; }

 private:
  bool Sharded() const { return world_ > 1; }
  int Slot(int64_t index, int64_t expert) const {
    return static_cast<int>(plan_.first_slot[index] + expert);
  }
  bool Segmented() const { return Sharded() && !opt_.grads_reduced; }
  MemorySpace Space() const {
    return backend_->device_memory() ? MemorySpace::kDevice : MemorySpace::kHost;
  }
  StreamSlot Stream() const { return StreamSlot{backend_->stream()}; }
  InFlight& Pool(int b) { return pool_[static_cast<size_t>(b) % pool_.size()]; }
  SlotRange Whole(int b) const { return SlotRange{b, 0, plan_.buckets[b].slots.size()}; }

  void BuildExchanges(int b, const BucketBuffers& buf);
  // Hands the registry's pointers of params [first, first + count) (count < 0: to the end)
  // to the backend.
  absl::Status BindPointers(int64_t first = 0, int64_t count = -1);
  // Starts a collective through `start` into *out and charges its bytes to *ledger.
  template <typename F>
  absl::Status Issue(int64_t* ledger, RequestPtr* out, F&& start);
  absl::Status Order(RequestPtr* req);
  // Starts the all-reduce (float64 sum, in place) of a record of partial sums; SumRecord
  // also orders the backend after it.
  absl::Status StartSum(double* record, int64_t len, int64_t* ledger, RequestPtr* out);
  absl::Status SumRecord(double* record, int64_t len, int64_t* ledger);
  absl::Status StartReduceScatter(int b);
  absl::Status Stage(int b, int stage, const SlotRange& r);
  absl::Status StartWeightGather(int b);
  absl::Status GatherParamsNow();

  const std::vector<ParamEntry>& params_;
  const std::vector<Group>& groups_;
  Communicator* comm_;
  const EngineOptions opt_;
  const int rank_, world_;
  std::unique_ptr<kernels::StepBackend> backend_;
  ShardPlan plan_;
  std::vector<kernels::ParamPointers> ptrs_;
  std::vector<kernels::GroupScalars> scalars_;
  std::vector<InFlight> pool_;
  std::vector<RequestPtr> rs_;  // per bucket: the gradient reduce-scatter in flight
  std::vector<int64_t> counts_;  // a window's per-rank counts (the communicator copies them)
  std::vector<std::vector<P2P>> gather_ops_, scatter_ops_;  // per bucket, built at Init
  std::vector<int64_t> cross_len_, radial_len_;              // per bucket
  std::vector<uint8_t> param_ready_;
  size_t next_rs_ = 0;
  bool weights_pending_ = false;  // gather=deferred: the all-gather of the last step is owed
  StepTraffic traffic_;
};

// The NS gather and scatter of bucket b as point-to-point lists into its pool buffers: every
// rank's block of X to the owner, O's blocks back. Built once; the step only starts them.
void ScheduledEngine::BuildExchanges(int b, const BucketBuffers& buf) {
  const BucketPlan& bp = plan_.buckets[b];
  const bool bf16 = opt_.ns_comm_bf16;
  const DataType dt = bf16 ? DataType::kBf16 : DataType::kF32;
  auto local = [&](int64_t off) -> void* {
    return bf16 ? static_cast<void*>(buf.x_local16 + off) : buf.x_local + off;
  };
  auto full = [&](int64_t off) -> void* {
    return bf16 ? static_cast<void*>(buf.x_full16 + off) : buf.x_full + off;
  };
  std::vector<P2P>& gather = gather_ops_[b];
  std::vector<P2P>& scatter = scatter_ops_[b];
  std::vector<P2P> receives;  // the scatter's receives follow all of its sends
  int64_t full_at = 0;
  for (size_t q = 0; q < bp.slots.size(); ++q) {
    const SlotPlan& sp = plan_.slots[bp.slots[q]];
    if (!sp.muon || sp.layout != Layout::kRows) continue;
    const int64_t off = sp.seg_pos;
    if (rank_ != sp.owner) {
      if (sp.Rows(rank_) == 0) continue;
      gather.push_back({sp.owner, true, local(off), sp.Rows(rank_) * sp.n, dt});
      receives.push_back({sp.owner, false, local(off), sp.Rows(rank_) * sp.n, dt});
      continue;
    }
    for (int r = 0; r < world_; ++r) {
      if (r == rank_ || sp.Rows(r) == 0) continue;
      void* at = full(full_at + sp.RowBegin(r) * sp.n);
      gather.push_back({r, false, at, sp.Rows(r) * sp.n, dt});
      scatter.push_back({r, true, at, sp.Rows(r) * sp.n, dt});
    }
    full_at += sp.m * sp.n;
  }
  scatter.insert(scatter.end(), receives.begin(), receives.end());
}

absl::Status ScheduledEngine::BindPointers(int64_t first, int64_t count) {
  if (count < 0) count = static_cast<int64_t>(params_.size()) - first;
  for (int64_t i = first; i < first + count; ++i) ptrs_[i] = {params_[i].param, params_[i].grad};
  return backend_->BindParams(first, absl::MakeConstSpan(ptrs_).subspan(static_cast<size_t>(first),
                                                                          static_cast<size_t>(count)));
}

template <typename F>
absl::Status ScheduledEngine::Issue(int64_t* ledger, RequestPtr* out, F&& start) {
  const int64_t before = comm_->stats().bytes_sent;
  absl::StatusOr<RequestPtr> req = start();
  if (!req.ok()) return req.status();
  *ledger += comm_->stats().bytes_sent - before;
  *out = *std::move(req);
  return absl::OkStatus();
}

absl::Status ScheduledEngine::Order(RequestPtr* req) {
  if (*req == nullptr) return absl::OkStatus();
  absl::Status s = (*req)->OrderBefore(Stream());
  *req = nullptr;
  return s;
}

// A record of partial sums, summed over ranks in place by one all-reduce: O(len) bytes per
// rank whatever the rank count, and every rank receives the same reduction, so the column
// gains and norms built from it stay bitwise identical everywhere.
absl::Status ScheduledEngine::StartSum(double* record, int64_t len, int64_t* ledger,
                                       RequestPtr* out) {
  return Issue(ledger, out, [&] {
    return comm_->AllReduce(record, record, len, DataType::kF64, ReduceOp::kSum, Space(), Stream());
  });
}

absl::Status ScheduledEngine::SumRecord(double* record, int64_t len, int64_t* ledger) {
  RequestPtr req;
  if (absl::Status s = StartSum(record, len, ledger, &req); !s.ok()) return s;
  return Order(&req);
}

absl::Status ScheduledEngine::Init() {
  using CommPad = OptimizerOptions::CommPad;
  PlanOptions po;
  po.world = world_;
  po.bucket_bytes = opt_.bucket_bytes;
  po.equal_segments = Sharded() && (opt_.comm_pad == CommPad::kOn ||
                                    (opt_.comm_pad == CommPad::kAuto && comm_->equal_counts_only()));
  po.grad_comm_bytes = !Segmented() ? 0 : opt_.grad_comm_bf16 ? 2 : 4;
  plan_ = BuildShardPlan(params_, groups_, po);
  if (Sharded() && !po.equal_segments && comm_->equal_counts_only()) {
    for (size_t b = 0; b < plan_.buckets.size(); ++b) {
      // Segments are equal when no rank holds a whole matrix here, or every rank as much.
      const std::vector<kernels::OwnedPart>& owned = plan_.buckets[b].map.owned;
      if (owned.empty() ||
          (static_cast<int>(owned.size()) == world_ &&
           std::all_of(owned.begin(), owned.end(),
                       [&](const kernels::OwnedPart& p) { return p.elems == owned[0].elems; }))) {
        continue;
      }
      const int64_t lo = plan_.buckets[b].map.rows +
                         (static_cast<int>(owned.size()) < world_ ? 0 : owned[0].elems);
      return absl::InvalidArgumentError(absl::StrCat(
          "comm_pad=off: the ranks' segments of bucket ", b, " differ in length (", lo, " to ",
          plan_.buckets[b].longest, " elements) and the '", comm_->backend(),
          "' communicator takes equal counts only (comm_pad=auto or on pads them)"));
    }
  }
  const size_t B = plan_.buckets.size();
  ptrs_.resize(params_.size());
  for (size_t i = 0; i < params_.size(); ++i) ptrs_[i] = {params_[i].param, params_[i].grad};
  scalars_.assign(groups_.size(), kernels::GroupScalars{});
  kernels::BackendConfig config = DescribeRank(plan_, params_, groups_, opt_, rank_);
  cross_len_.assign(B, 0);
  radial_len_.assign(B, 0);
  for (size_t b = 0; b < B; ++b) {
    cross_len_[b] = config.buckets[b].cross_len;
    radial_len_[b] = config.buckets[b].radial_len;
  }
  // Allocates every buffer a step uses and reads the initial weights; nothing is written, so
  // a failure (or running out of memory) leaves the model as it was.
  if (absl::Status s = backend_->Setup(std::move(config), ptrs_); !s.ok()) return s;
  pool_.assign(std::min<size_t>(std::max<size_t>(B, 1), kScheduleStages), InFlight{});
  rs_.assign(B, nullptr);
  counts_.assign(static_cast<size_t>(world_), 0);
  gather_ops_.assign(B, {});
  scatter_ops_.assign(B, {});
  if (Sharded()) {
    for (size_t b = 0; b < B; ++b) BuildExchanges(static_cast<int>(b), backend_->Buffers(static_cast<int>(b)));
  }
  param_ready_.assign(params_.size(), 0);

  // The norms of every sphere slice (summed over ranks for rows-layout frobenius and column
  // spheres), the radii, and the check that every slice can be projected. A zero slice on
  // one rank returns before anything is written; its peers fail at their next collective.
  int64_t init_bytes = 0;
  for (size_t b = 0; b < B; ++b) {
    const int bi = static_cast<int>(b);
    backend_->InitNorms(bi);
    if (Sharded() && cross_len_[b] > 0) {
      backend_->AssembleCross(Whole(bi));
      if (absl::Status s = SumRecord(backend_->Buffers(bi).cross, cross_len_[b], &init_bytes); !s.ok())
        return s;
      backend_->ApplyCross(Whole(bi));
    }
    kernels::BadSlice bad;
    if (!backend_->InitRadii(bi, &bad)) {
      const SlotPlan& sp = plan_.slots[bad.slot];
      return absl::InvalidArgumentError(ZeroSliceMessage(params_[sp.param], sp.expert, bad.slice));
    }
  }
  // Project onto the spheres and write the model tensors (and share them).
  for (size_t b = 0; b < B; ++b) backend_->InitProject(static_cast<int>(b));
  if (Sharded()) return GatherParamsNow();
  return absl::OkStatus();
}

absl::Status ScheduledEngine::StartReduceScatter(int b) {
  const BucketPlan& bp = plan_.buckets[b];
  // A param without a gradient here (NULL) is packed as zeros: this rank's part of the mean,
  // as a data-parallel trainer's unused parameter.
  // The staging buffer alternates between buckets: the one two back must be done with it.
  if (b >= 2) {
    if (absl::Status s = Order(&rs_[b - 2]); !s.ok()) return s;
  }
  const BucketBuffers buf = backend_->Buffers(b);
  const DataType dt = opt_.grad_comm_bf16 ? DataType::kBf16 : DataType::kF32;
  const int64_t bytes = opt_.grad_comm_bf16 ? 2 : 4;
  for (int w = 0; w < bp.Windows(); ++w) {
    // Windows share the staging buffer: the one before must have left it.
    if (w > 0) {
      if (absl::Status s = Order(&rs_[b]); !s.ok()) return s;
    }
    backend_->PackGrads(b, w);
    void* out = static_cast<char*>(buf.grad_seg) + w * bp.window * bytes;
    bp.WindowCounts(w, world_, counts_.data());
    const absl::Span<const int64_t> counts = counts_;
    if (absl::Status s = Issue(&traffic_.grads, &rs_[b], [&] {
          return comm_->ReduceScatter(buf.grad_send, out, counts, dt, ReduceOp::kMean, Space(),
                                      Stream());
        });
        !s.ok()) {
      return s;
    }
  }
  return absl::OkStatus();
}

absl::Status ScheduledEngine::GradsReady(int64_t first, int64_t count, void* stream) {
  if (first < 0 || count < 0 || first + count > static_cast<int64_t>(params_.size())) {
    return absl::InvalidArgumentError(absl::StrCat("mdopt_grads_ready: params [", first, ", ",
                                                   first + count, ") are not in [0, ",
                                                   params_.size(), ")"));
  }
  if (!Segmented()) return absl::OkStatus();
  if (next_rs_ == 0) traffic_ = StepTraffic{};
  // The trainer may give gradient buffers between calls (torch allocates them in backward):
  // the params reported now are bound now (a call per param costs O(1), not O(params)).
  if (absl::Status s = BindPointers(first, count); !s.ok()) return s;
  // The gradients were written on the caller's stream.
  backend_->Join(stream);
  for (int64_t i = first; i < first + count; ++i) param_ready_[i] = 1;
  // Buckets start in bucket order on every rank, whatever order the trainer reports in.
  while (next_rs_ < plan_.buckets.size()) {
    const BucketPlan& bp = plan_.buckets[next_rs_];
    bool ready = true;
    for (int64_t i = bp.first_param; i < bp.end_param; ++i) ready = ready && param_ready_[i];
    if (!ready) break;
    if (absl::Status s = StartReduceScatter(static_cast<int>(next_rs_)); !s.ok()) return s;
    ++next_rs_;
  }
  // The caller may reuse the gradient buffers once its stream has passed this point: the
  // packs queued above read them first.
  backend_->Release(stream);
  return absl::OkStatus();
}

absl::Status ScheduledEngine::Step(double lr_scale, void* stream) {
  if (absl::Status s = BindPointers(); !s.ok()) return s;
  if (next_rs_ == 0) traffic_ = StepTraffic{};
  backend_->Join(stream);
  for (size_t g = 0; g < groups_.size(); ++g) {
    const kernels::UpdateRule& r = groups_[g].spec.rule;
    scalars_[g] = {r.lr * lr_scale, r.gain_lr * lr_scale};
  }
  backend_->BeginStep(scalars_);
  const int B = static_cast<int>(plan_.buckets.size());

  // The finite check rides on the reduced gradients: this rank's rows of each param, summed
  // over ranks, so every rank reaches the same verdict and the same grad norm. The same
  // record says which params have a gradient on some rank (kernels/common/grad_presence.h):
  // every rank skips the same params, with no collective of its own.
  if (Segmented()) {
    for (; next_rs_ < plan_.buckets.size(); ++next_rs_) {
      if (absl::Status s = StartReduceScatter(static_cast<int>(next_rs_)); !s.ok()) return s;
    }
  }
  for (int b = 0; b < B; ++b) {
    if (absl::Status s = Order(&rs_[b]); !s.ok()) return s;
    backend_->CheckFinite(b);
  }
  next_rs_ = 0;
  std::fill(param_ready_.begin(), param_ready_.end(), 0);
  if (Sharded()) {
    if (absl::Status s = SumRecord(backend_->check_record(), 2 * static_cast<int64_t>(params_.size()),
                                   &traffic_.check);
        !s.ok()) {
      return s;
    }
  }
  backend_->ApplyCheck();

  if (!Sharded() && backend_->prefers_matrix_order()) {
    // Nothing to overlap: each matrix goes through all its stages before the next starts,
    // so that the finishing pass finds the rows the first pass wrote still in cache (a
    // bucket's worth of matrices in between would have evicted them). Matrices are
    // independent, so the order changes no result. The K row blocks of one matrix
    // (blocks=rows:K) go together: Finish sums their column/scalar-gain gradients.
    for (int b = 0; b < B; ++b) {
      const std::vector<int>& slots = plan_.buckets[b].slots;
      for (size_t q = 0; q < slots.size();) {
        const SlotPlan& sp = plan_.slots[slots[q]];
        const size_t end = std::min(
            slots.size(), q + static_cast<size_t>(std::max<int64_t>(1, params_[sp.param].blocks)));
        for (int stage = 0; stage < kScheduleStages; ++stage) {
          if (absl::Status s = Stage(b, stage, SlotRange{b, q, end}); !s.ok()) return s;
        }
        q = end;
      }
    }
  } else {
    for (int wave = 0; wave < B + kScheduleStages - 1; ++wave) {
      for (int stage = 0; stage < kScheduleStages; ++stage) {
        const int b = wave - stage;
        if (b < 0 || b >= B) continue;
        if (absl::Status s = Stage(b, stage, Whole(b)); !s.ok()) return s;
      }
    }
  }
  backend_->EndStep();
  backend_->Release(stream);
  return absl::OkStatus();
}

absl::Status ScheduledEngine::Stage(int b, int stage, const SlotRange& r) {
  InFlight& fl = Pool(b);
  switch (stage) {
    case 0: {
      backend_->Prepare(r);
      if (Sharded() && radial_len_[b] > 0) {  // tangent=1 only: no overlap for these sums
        if (absl::Status s = SumRecord(backend_->Buffers(b).radial, radial_len_[b], &traffic_.cross);
            !s.ok()) {
          return s;
        }
        backend_->ApplyRadial(b);
      }
      backend_->Pass1(r);
      if (gather_ops_[b].empty()) return absl::OkStatus();
      return Issue(&traffic_.ns, &fl.gather, [&] {
        return comm_->SendRecv(gather_ops_[b], kGatherTag, Space(), Stream());
      });
    }
    case 1: {
      if (absl::Status s = Order(&fl.gather); !s.ok()) return s;
      backend_->NewtonSchulz(r);
      if (scatter_ops_[b].empty()) return absl::OkStatus();
      return Issue(&traffic_.ns, &fl.scatter, [&] {
        return comm_->SendRecv(scatter_ops_[b], kScatterTag, Space(), Stream());
      });
    }
    case 2: {
      if (absl::Status s = Order(&fl.scatter); !s.ok()) return s;
      backend_->Pass2(r);
      if (!Sharded() || cross_len_[b] == 0) return absl::OkStatus();
      backend_->AssembleCross(r);
      return StartSum(backend_->Buffers(b).cross, cross_len_[b], &traffic_.cross, &fl.sums);
    }
    case 3: {
      if (fl.sums != nullptr) {
        if (absl::Status s = Order(&fl.sums); !s.ok()) return s;
        backend_->ApplyCross(r);
      }
      backend_->Finish(r);
      if (!Sharded()) return absl::OkStatus();
      if (opt_.gather_deferred) {
        weights_pending_ = true;
        return absl::OkStatus();
      }
      return StartWeightGather(b);
    }
    case 4: {
      if (Pool(b).ag == nullptr) return absl::OkStatus();
      if (absl::Status s = Order(&fl.ag); !s.ok()) return s;
      backend_->UnpackWeights(b, plan_.buckets[b].Windows() - 1);
      return absl::OkStatus();
    }
  }
  return absl::OkStatus();
}

// Packs and starts the all-gather of bucket b's weights. A bucket cut into windows sends all
// but its last window here, one after the other through the same buffer; the last one is left
// in flight for stage 4 (or GatherParamsNow) to unpack.
absl::Status ScheduledEngine::StartWeightGather(int b) {
  const BucketPlan& bp = plan_.buckets[b];
  void* weights = backend_->Buffers(b).weights;
  const int last = bp.Windows() - 1;
  for (int w = 0; w <= last; ++w) {
    backend_->PackWeights(b, w);
    bp.WindowCounts(w, world_, counts_.data());
    const absl::Span<const int64_t> counts = counts_;
    if (absl::Status s = Issue(&traffic_.weights, &Pool(b).ag, [&] {
          return comm_->AllGather(nullptr, weights, counts, CommType(bp.param_dtype), Space(),
                                  Stream());
        });
        !s.ok()) {
      return s;
    }
    if (w == last) break;
    if (absl::Status s = Order(&Pool(b).ag); !s.ok()) return s;
    backend_->UnpackWeights(b, w);
  }
  return absl::OkStatus();
}

absl::Status ScheduledEngine::GatherParamsNow() {
  if (absl::Status s = BindPointers(); !s.ok()) return s;
  for (size_t b = 0; b < plan_.buckets.size(); ++b) {
    const int bi = static_cast<int>(b);
    if (absl::Status s = StartWeightGather(bi); !s.ok()) return s;
    if (absl::Status s = Order(&Pool(bi).ag); !s.ok()) return s;
    backend_->UnpackWeights(bi, plan_.buckets[b].Windows() - 1);
  }
  weights_pending_ = false;
  return absl::OkStatus();
}

absl::Status ScheduledEngine::GatherParams(void* stream) {
  if (!Sharded() || !weights_pending_) return absl::OkStatus();
  backend_->Join(stream);
  absl::Status s = GatherParamsNow();
  backend_->Release(stream);
  return s;
}

absl::Status ScheduledEngine::WriteModels() {
  if (absl::Status s = BindPointers(); !s.ok()) return s;
  backend_->WriteModelRows();
  if (Sharded()) return GatherParamsNow();
  return absl::OkStatus();
}

void ScheduledEngine::LastStep(int group, int64_t counts[4], std::vector<double>* norms) const {
  counts[0] = counts[1] = counts[2] = counts[3] = 0;
  norms->clear();
  for (size_t k = 0; k < plan_.slots.size(); ++k) {
    if (params_[plan_.slots[k].param].group != group) continue;
    const kernels::SlotCounters c = backend_->Counters(static_cast<int>(k));
    counts[0] += c.ns_ran;
    counts[1] += c.projected;
    counts[2] += c.gains_stepped;
    counts[3] += c.skipped;
    norms->push_back(c.delta_sq);
    norms->push_back(c.w_sq);
    norms->push_back(c.skipped ? 1.0 : 0.0);
  }
}

}  // namespace

std::string ZeroSliceMessage(const ParamEntry& p, int64_t expert, int64_t slice) {
  const char* kind = p.rule.sphere == Sphere::kRow   ? "row"
                     : p.rule.sphere == Sphere::kCol ? "column"
                                                     : "matrix";
  std::string where = p.SlotWhere(expert);
  if (p.rule.sphere == Sphere::kFrobenius) {
    return absl::StrCat("param '", p.name, "': the ", kind, where,
                        " has zero or non-finite norm and cannot be put on its sphere");
  }
  return absl::StrCat("param '", p.name, "': ", kind, " ", slice, where,
                      " has zero or non-finite norm and cannot be put on its sphere");
}

std::unique_ptr<Engine> MakeScheduledEngine(const std::vector<ParamEntry>* params,
                                            const std::vector<Group>* groups, Communicator* comm,
                                            const EngineOptions& options,
                                            std::unique_ptr<kernels::StepBackend> backend) {
  return std::make_unique<ScheduledEngine>(params, groups, comm, options, std::move(backend));
}

}  // namespace mdopt
