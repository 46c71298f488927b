// The float32 engine: this rank's rows of every matrix (the ShardPlan's), stepped bucket by
// bucket through the fused passes of kernels/cpu/fast_matrix.h with the collectives of the
// step schedule between them (docs/ARCHITECTURE.md, "The step schedule"):
//
//   reduce-scatter of gradients (grads=local, N > 1; may start during backward)
//   -> [finite check in the optimizer]
//   per bucket, pipelined over buckets:
//     S0  tangent dots (+ all-gather), pass 1 -> start the NS gather (rows-layout Muon)
//     S1  wait gather; Newton-Schulz on the matrices this rank owns -> start the scatter
//     S2  wait scatter; pass 2 (Muon) -> start the all-gather of cross-row sums
//     S3  wait sums; gain Adam; finish (project, rescale, write) -> start the weight all-gather
//     S4  wait weights; unpack other ranks' rows into the model tensors
// Every collective is started in the same order on every rank (a fixed wave order over
// (bucket, stage)); waits come as late as the data is needed, so bucket b's communication
// overlaps the compute of the buckets around it. Cross-row sums are all-gathered and added
// in rank order, so the replicated column gains are bitwise the same on every rank.
// With one rank no collective is issued, the passes read and write the model's tensors, and
// each matrix runs stages S0-S3 before the next one starts (its rows stay in cache).
#include <algorithm>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "dist_opt/engine.h"
#include "dist_opt/shard_plan.h"
#include "kernels/common/bf16.h"
#include "kernels/common/gain_param.h"
#include "kernels/cpu/fast_matrix.h"
#include "kernels/cpu/newton_schulz.h"
#include "kernels/cpu/newton_schulz_bf16.h"

namespace mdopt {
namespace {

namespace fast = kernels::fast;
using kernels::Base;
using kernels::RadiusMode;
using kernels::Sphere;

// This rank's part of one slot.
struct SlotState {
  int64_t row0 = 0, rows = 0;  // local rows [row0, row0 + rows)
  std::vector<float> master;   // bf16 params only (f32 params: the model's tensor is the master)
  std::vector<float> state0, state1;
  std::vector<float> row_raw, row_m, row_v;
  std::vector<float> col_raw, col_m, col_v;
  std::vector<float> scalar_raw, scalar_m, scalar_v;
  std::vector<float> radius;
  int64_t slices = 0;
  fast::Partials partials;
  int64_t xfull_offset = -1;  // rows-layout Muon slots this rank owns: where X sits in xfull
  // What the last step did here (mdopt_group_info): ran Newton-Schulz, projected (counted
  // on the slot's accounting rank), stepped gains (same), and partial update norms.
  bool ns_ran = false, projected = false, gains_stepped = false;
  double delta_sq = 0.0, w_sq = 0.0;
};

// Buffers of one bucket while it is in flight; a pool of kPipelineDepth is reused.
struct Workspace {
  std::vector<float> xloc;        // this rank's X (then O) rows of the bucket's Muon slots
  std::vector<float> xfull;       // whole X (then O) of the rows-layout Muon slots it owns
  std::vector<uint16_t> xloc16, xfull16;  // ns_comm_dtype=bf16 staging
  std::vector<double> cross;      // world x record: cross-row partials of every rank
  std::vector<uint8_t> weights;   // the bucket's all-gather buffer (param dtype)
  std::vector<float> wold;        // update_norms: this rank's rows before the step
  RequestPtr gather, scatter, sums, ag;
};

// Stage s of bucket b runs in wave b + s, so kStages buckets are in flight at once.
constexpr int kStages = 5;
constexpr int kGatherTag = 11, kScatterTag = 12;

size_t DtypeBytes(Dtype d) { return d == Dtype::kF32 ? 4 : 2; }
DataType CommType(Dtype d) { return d == Dtype::kF32 ? DataType::kF32 : DataType::kBf16; }

// Cross-row partials of a rows-layout slot (summed over ranks): column-gain and scalar-gain
// gradients, and the squared norms of frobenius/column slices.
int64_t CrossRecord(const kernels::UpdateRule& r, int64_t n) {
  int64_t c = (kernels::HasColGains(r.gains) ? n : 0) + (kernels::HasScalarGain(r.gains) ? 1 : 0);
  if (r.sphere == Sphere::kFrobenius) c += 1;
  if (r.sphere == Sphere::kCol) c += n;
  return c;
}

// Tangent dots of a rows-layout slot with a frobenius or column sphere.
int64_t RadialRecord(const kernels::UpdateRule& r, int64_t n) {
  if (!r.tangent) return 0;
  if (r.sphere == Sphere::kFrobenius) return 2;
  if (r.sphere == Sphere::kCol) return 2 * n;
  return 0;
}

class FastEngine final : public Engine {
 public:
  FastEngine(const std::vector<ParamEntry>* params, const std::vector<Group>* groups,
             Communicator* comm, const EngineOptions& o)
      : params_(*params), groups_(*groups), comm_(comm), opt_(o), rank_(comm->rank()),
        world_(comm->size()) {}

  absl::Status Init() override;
  absl::Status GradsReady(int64_t first, int64_t count) override;
  absl::Status ReduceGradients() override;
  double GradSumSq(int64_t index) override;
  absl::Status Step(double lr_scale, int64_t t) override;
  absl::Status GatherParams() override;
  std::vector<StateArray> State(int64_t index, int64_t expert) override;
  absl::Status WriteModels() override;
  int64_t WorkspaceBytes() const override;
  void LastStep(int group, int64_t counts[3], std::vector<double>* norms) const override;
  const char* name() const override { return "fast"; }
  const ShardPlan* plan() const override { return &plan_; }

 private:
  bool Local() const { return world_ == 1; }
  bool Sharded() const { return world_ > 1; }
  const ParamEntry& ParamOf(int k) const { return params_[plan_.slots[k].param]; }
  fast::MatrixView View(int k) const;
  const void* GradRows(int k) const;

  absl::Status StartReduceScatter(int b);
  // Cross-row sums of bucket b over ranks, in rank order (all-gather of `record` doubles).
  absl::Status StartSums(int b, Workspace& ws, bool radial);
  void AddSums(int b, const Workspace& ws, bool radial);

  // Stage `stage` of bucket b for its slots [q0, q1_or_end) (q1_or_end < 0: to the end).
  absl::Status Stage(int b, int stage, const fast::StepScalars* scalars_of_group, size_t q0 = 0,
                     int64_t q1_or_end = -1);
  absl::Status StartWeightGather(int b, Workspace& ws);
  void UnpackWeights(int b, const Workspace& ws);
  // The weight all-gather of every bucket, one after another (finalize, load, deferred).
  absl::Status GatherParamsNow();
  Workspace& Pool(int b) { return pool_[static_cast<size_t>(b) % pool_.size()]; }

  const std::vector<ParamEntry>& params_;
  const std::vector<Group>& groups_;
  Communicator* comm_;
  const EngineOptions opt_;
  const int rank_, world_;
  ShardPlan plan_;
  std::vector<SlotState> st_;
  std::vector<int64_t> cross_offset_, radial_offset_;  // per slot within its bucket's record
  std::vector<int64_t> cross_len_, radial_len_;        // per bucket
  // Gradient reduce-scatter (grads=local, N > 1): this rank's rows of each bucket, reduced.
  std::vector<std::vector<uint8_t>> grad_seg_;
  std::vector<RequestPtr> rs_;
  std::vector<uint8_t> rs_started_;
  std::vector<std::vector<uint8_t>> rs_staging_;  // two send buffers, alternating
  std::vector<Workspace> pool_;
  std::vector<fast::StepScalars> scalars_;  // per group, for the step in progress
  std::vector<double> slot_sumsq_;
  std::vector<int64_t> sum_counts_;
  std::vector<P2P> p2p_;
  std::vector<uint8_t> param_ready_;
  size_t next_rs_ = 0;
  fast::NsWorkspace ns_;
  fast::Bf16NewtonSchulz ns_bf16_ws_;
  fast::Scratch scratch_;
  bool weights_pending_ = false;  // gather=deferred: the all-gather of the last step is owed
};

bool AliasesModel(const ParamEntry& p) { return p.param_dtype == Dtype::kF32; }

fast::MatrixView FastEngine::View(int k) const {
  const SlotPlan& sp = plan_.slots[k];
  const ParamEntry& p = params_[sp.param];
  const SlotState& s = st_[k];
  fast::MatrixView v;
  v.m = p.m;
  v.n = p.n;
  v.row_begin = s.row0;
  v.rows = s.rows;
  const int64_t model_off = sp.TensorOffset() + s.row0 * p.n;
  auto f = [](const std::vector<float>& vec) {
    return vec.empty() ? nullptr : const_cast<float*>(vec.data());
  };
  if (AliasesModel(p)) {
    v.w = static_cast<float*>(p.param) + model_off;
  } else {
    v.w = f(s.master);
    v.model = static_cast<uint16_t*>(p.param) + model_off;
    v.model_dtype = Dtype::kBf16;
  }
  v.state0 = f(s.state0);
  v.state1 = f(s.state1);
  v.row = {f(s.row_raw), f(s.row_m), f(s.row_v)};
  v.col = {f(s.col_raw), f(s.col_m), f(s.col_v)};
  v.scalar = {f(s.scalar_raw), f(s.scalar_m), f(s.scalar_v)};
  v.radius = f(s.radius);
  v.grad = GradRows(k);
  v.grad_dtype = p.grad_dtype;
  return v;
}

const void* FastEngine::GradRows(int k) const {
  const SlotPlan& sp = plan_.slots[k];
  const ParamEntry& p = params_[sp.param];
  const size_t eb = p.grad_elem_bytes();
  if (Sharded() && !opt_.grads_reduced) {
    const BucketPlan& b = plan_.buckets[sp.bucket];
    return grad_seg_[sp.bucket].data() +
           b.Offset(static_cast<size_t>(sp.bucket_pos), rank_, world_) * eb;
  }
  if (p.grad == nullptr) return nullptr;
  return static_cast<const char*>(p.grad) + (sp.TensorOffset() + st_[k].row0 * p.n) * eb;
}

absl::Status FastEngine::Init() {
  PlanOptions po;
  po.world = world_;
  po.bucket_bytes = opt_.bucket_bytes;
  plan_ = BuildShardPlan(params_, groups_, po);
  const size_t S = plan_.slots.size();
  st_.assign(S, SlotState{});
  cross_offset_.assign(S, 0);
  radial_offset_.assign(S, 0);
  slot_sumsq_.assign(S, 0.0);
  scalars_.assign(groups_.size(), fast::StepScalars{});

  // Phase A: allocate every buffer a step uses and read the initial weights; nothing is
  // written, so a failure (or running out of memory) leaves the model as it was.
  int64_t max_rows = 1, max_n = 1;
  for (size_t k = 0; k < S; ++k) {
    const SlotPlan& sp = plan_.slots[k];
    const ParamEntry& p = params_[sp.param];
    const kernels::UpdateRule& r = p.rule;
    SlotState& s = st_[k];
    s.row0 = sp.RowBegin(rank_);
    s.rows = sp.Rows(rank_);
    const bool holds = s.rows > 0 || sp.layout == Layout::kRows;
    const size_t numel = static_cast<size_t>(s.rows * p.n);
    max_rows = std::max(max_rows, s.rows);
    max_n = std::max(max_n, p.n);
    if (!AliasesModel(p)) {
      s.master.resize(numel);
      const uint16_t* src = static_cast<const uint16_t*>(p.param) + sp.TensorOffset() + s.row0 * p.n;
      for (size_t q = 0; q < numel; ++q) s.master[q] = kernels::Bf16ToFloat(src[q]);
    }
    s.state0.assign(numel, 0.0f);  // muon momentum | adam exp_avg
    if (r.base != Base::kMuon) s.state1.assign(numel, 0.0f);
    const float one = static_cast<float>(kernels::GainRawForOne(r.gain_param));
    auto gains = [&](bool has, int64_t count, std::vector<float>* raw, std::vector<float>* m1,
                     std::vector<float>* m2) {
      if (!has || !holds) return;
      raw->assign(static_cast<size_t>(count), one);
      m1->assign(static_cast<size_t>(count), 0.0f);
      m2->assign(static_cast<size_t>(count), 0.0f);
    };
    gains(kernels::HasRowGains(r.gains), s.rows, &s.row_raw, &s.row_m, &s.row_v);
    gains(kernels::HasColGains(r.gains), p.n, &s.col_raw, &s.col_m, &s.col_v);
    gains(kernels::HasScalarGain(r.gains), 1, &s.scalar_raw, &s.scalar_m, &s.scalar_v);
    s.slices = !holds ? 0 : r.sphere == Sphere::kRow ? s.rows : kernels::SphereSlices(r.sphere, p.m, p.n);
    s.radius.assign(static_cast<size_t>(s.slices), 0.0f);
    fast::ReservePartials(std::max<int64_t>(s.rows, 1), p.n, &s.partials);
  }
  scratch_.Reserve(max_rows, max_n);

  // Per bucket: cross-row records, NS placement, workspace sizes.
  const size_t B = plan_.buckets.size();
  cross_len_.assign(B, 0);
  radial_len_.assign(B, 0);
  size_t xloc = 0, xfull = 0, cross = 0, weights = 0, rs_send = 0, max_seg = 0;
  for (size_t b = 0; b < B; ++b) {
    const BucketPlan& bp = plan_.buckets[b];
    int64_t full = 0;
    for (size_t q = 0; q < bp.slots.size(); ++q) {
      const int k = bp.slots[q];
      const SlotPlan& sp = plan_.slots[k];
      const kernels::UpdateRule& r = ParamOf(k).rule;
      if (sp.layout == Layout::kRows) {
        cross_offset_[k] = cross_len_[b];
        cross_len_[b] += CrossRecord(r, sp.n);
        radial_offset_[k] = radial_len_[b];
        radial_len_[b] += RadialRecord(r, sp.n);
        if (sp.muon && Sharded() && sp.owner == rank_) {
          st_[k].xfull_offset = full;
          full += sp.m * sp.n;
        }
      }
    }
    size_t muon_rows = 0;
    for (size_t q = 0; q < bp.slots.size(); ++q) {
      const SlotPlan& sp = plan_.slots[bp.slots[q]];
      if (sp.muon) muon_rows = static_cast<size_t>(bp.Offset(q, rank_, world_) + sp.PackedRows(rank_) * sp.n);
    }
    xloc = std::max(xloc, muon_rows);
    max_seg = std::max(max_seg, static_cast<size_t>(bp.seg[rank_]));
    xfull = std::max(xfull, static_cast<size_t>(full));
    cross = std::max(cross, static_cast<size_t>(world_ * std::max(cross_len_[b], radial_len_[b])));
    if (Sharded()) {
      weights = std::max(weights, static_cast<size_t>(bp.total) * DtypeBytes(bp.param_dtype));
      rs_send = std::max(rs_send, static_cast<size_t>(bp.total) * DtypeBytes(bp.grad_dtype));
    }
  }
  pool_.assign(std::min<size_t>(std::max<size_t>(B, 1), kStages), Workspace{});
  for (Workspace& ws : pool_) {
    ws.xloc.assign(xloc, 0.0f);
    ws.xfull.assign(xfull, 0.0f);
    if (opt_.ns_comm_bf16 && Sharded()) {
      ws.xloc16.assign(xloc, 0);
      ws.xfull16.assign(xfull, 0);
    }
    ws.cross.assign(cross, 0.0);
    ws.weights.assign(weights, 0);
    if (opt_.update_norms) ws.wold.assign(max_seg, 0.0f);
  }
  if (Sharded() && !opt_.grads_reduced) {
    grad_seg_.resize(B);
    for (size_t b = 0; b < B; ++b) {
      const BucketPlan& bp = plan_.buckets[b];
      grad_seg_[b].assign(static_cast<size_t>(bp.seg[rank_]) * DtypeBytes(bp.grad_dtype), 0);
    }
    rs_staging_.assign(std::min<size_t>(B, 2), std::vector<uint8_t>(rs_send, 0));
  }
  rs_.assign(B, nullptr);
  rs_started_.assign(B, 0);
  // Newton-Schulz buffers for every shape this rank orthogonalises (the largest matrix need
  // not have the largest Gram side), and the bf16 path's GEMM plans.
  for (const SlotPlan& sp : plan_.slots) {
    if (!sp.muon || sp.owner != rank_) continue;
    if (opt_.ns_bf16) {
      ns_bf16_ws_.Reserve(sp.m, sp.n, opt_.ns_form);
    } else {
      ns_.Reserve(sp.m, sp.n, opt_.ns_form);
    }
  }

  // Phase B: the norms of every sphere slice (summed over ranks for rows-layout frobenius and
  // column spheres), the radii, and the check that every slice can be projected.
  for (size_t b = 0; b < B; ++b) {
    const BucketPlan& bp = plan_.buckets[b];
    Workspace& ws = pool_[0];
    for (int k : bp.slots) {
      const kernels::UpdateRule& r = ParamOf(k).rule;
      fast::ResetPartials(r, View(k), &st_[k].partials);
      if (r.sphere != Sphere::kNone && st_[k].slices > 0) {
        fast::SliceSquares(r, View(k), &st_[k].partials, &scratch_);
      }
    }
    if (Sharded() && cross_len_[b] > 0) {
      if (absl::Status s = StartSums(static_cast<int>(b), ws, false); !s.ok()) return s;
      if (absl::Status s = ws.sums->Wait(); !s.ok()) return s;
      AddSums(static_cast<int>(b), ws, false);
    }
    for (int k : bp.slots) {
      const SlotPlan& sp = plan_.slots[k];
      const ParamEntry& p = params_[sp.param];
      const kernels::UpdateRule& r = p.rule;
      SlotState& s = st_[k];
      if (r.sphere == Sphere::kNone) continue;
      for (int64_t q = 0; q < s.slices; ++q) {
        const double sq = s.partials.slice_sq[q];
        if (!(sq > 0.0) || !std::isfinite(sq)) {
          const int64_t slice = r.sphere == Sphere::kRow ? s.row0 + q : q;
          return absl::InvalidArgumentError(ZeroSliceMessage(p, sp.expert, slice));
        }
        double radius = r.radius_value;
        if (r.radius_mode == RadiusMode::kAuto) radius = kernels::AutoRadius(r.sphere, p.m, p.n);
        if (r.radius_mode == RadiusMode::kInit) radius = std::sqrt(sq);
        s.radius[q] = static_cast<float>(radius);
      }
    }
  }
  // A zero slice on one rank must stop every rank: agree on the verdict.
  // (Reached only when this rank saw none; a rank that returned above fails its peers' next
  // collective, which is why the check runs before anything is written.)

  // Phase C: project onto the spheres and write the model tensors (and share them).
  for (size_t b = 0; b < B; ++b) {
    for (int k : plan_.buckets[b].slots) {
      const ParamEntry& p = ParamOf(k);
      if (p.rule.sphere == Sphere::kNone || p.preserve_init || st_[k].rows == 0) continue;
      fast::Finish(p.rule, View(k), st_[k].partials, &scratch_);
    }
  }
  if (Sharded()) return GatherParamsNow();
  return absl::OkStatus();
}

absl::Status FastEngine::StartSums(int b, Workspace& ws, bool radial) {
  const int64_t len = radial ? radial_len_[b] : cross_len_[b];
  double* mine = ws.cross.data() + rank_ * len;
  std::fill(mine, mine + len, 0.0);
  for (int k : plan_.buckets[b].slots) {
    const SlotPlan& sp = plan_.slots[k];
    if (sp.layout != Layout::kRows) continue;
    const kernels::UpdateRule& r = ParamOf(k).rule;
    const fast::Partials& p = st_[k].partials;
    double* out = mine + (radial ? radial_offset_[k] : cross_offset_[k]);
    if (radial) {
      if (RadialRecord(r, sp.n) == 0) continue;
      out = std::copy(p.radial_dot.begin(), p.radial_dot.end(), out);
      std::copy(p.radial_dd.begin(), p.radial_dd.end(), out);
    } else {
      out = std::copy(p.col_grad.begin(), p.col_grad.end(), out);
      out = std::copy(p.scalar_grad.begin(), p.scalar_grad.end(), out);
      if (r.sphere == Sphere::kFrobenius || r.sphere == Sphere::kCol)
        std::copy(p.slice_sq.begin(), p.slice_sq.end(), out);
    }
  }
  sum_counts_.assign(static_cast<size_t>(world_), len);
  absl::StatusOr<RequestPtr> req =
      comm_->AllGather(nullptr, ws.cross.data(), sum_counts_, DataType::kF64);
  if (!req.ok()) return req.status();
  ws.sums = *std::move(req);
  return absl::OkStatus();
}

void FastEngine::AddSums(int b, const Workspace& ws, bool radial) {
  const int64_t len = radial ? radial_len_[b] : cross_len_[b];
  for (int k : plan_.buckets[b].slots) {
    const SlotPlan& sp = plan_.slots[k];
    if (sp.layout != Layout::kRows) continue;
    const kernels::UpdateRule& r = ParamOf(k).rule;
    fast::Partials& p = st_[k].partials;
    const int64_t at = radial ? radial_offset_[k] : cross_offset_[k];
    // Rank order, the same on every rank: the sums are bitwise identical everywhere.
    auto sum = [&](std::vector<double>& dst, int64_t pos) {
      for (size_t j = 0; j < dst.size(); ++j) {
        double acc = 0.0;
        for (int q = 0; q < world_; ++q) acc += ws.cross[q * len + at + pos + static_cast<int64_t>(j)];
        dst[j] = acc;
      }
      return pos + static_cast<int64_t>(dst.size());
    };
    if (radial) {
      if (RadialRecord(r, sp.n) == 0) continue;
      sum(p.radial_dd, sum(p.radial_dot, 0));
    } else {
      int64_t pos = sum(p.col_grad, 0);
      pos = sum(p.scalar_grad, pos);
      if (r.sphere == Sphere::kFrobenius || r.sphere == Sphere::kCol) sum(p.slice_sq, pos);
    }
  }
}

absl::Status FastEngine::StartReduceScatter(int b) {
  const BucketPlan& bp = plan_.buckets[b];
  const size_t eb = DtypeBytes(bp.grad_dtype);
  // The staging buffer alternates between buckets: the one two back must be done with it.
  if (b >= 2 && rs_[b - 2] != nullptr) {
    if (absl::Status s = rs_[b - 2]->Wait(); !s.ok()) return s;
  }
  uint8_t* send = rs_staging_[static_cast<size_t>(b) % rs_staging_.size()].data();
  int64_t seg_start = 0;
  for (int r = 0; r < world_; ++r) {
    for (size_t q = 0; q < bp.slots.size(); ++q) {
      const SlotPlan& sp = plan_.slots[bp.slots[q]];
      const ParamEntry& p = params_[sp.param];
      if (p.grad == nullptr) {
        return absl::FailedPreconditionError(absl::StrCat(
            "param '", p.name, "' has no gradient buffer (give one to mdopt_set_pointers)"));
      }
      uint8_t* dst = send + (seg_start + bp.Offset(q, r, world_)) * eb;
      const size_t real = static_cast<size_t>(sp.Rows(r) * sp.n) * eb;
      const size_t packed = static_cast<size_t>(sp.PackedRows(r) * sp.n) * eb;
      std::memcpy(dst, static_cast<const uint8_t*>(p.grad) + (sp.TensorOffset() + sp.RowBegin(r) * sp.n) * eb, real);
      std::memset(dst + real, 0, packed - real);
    }
    seg_start += bp.seg[r];
  }
  absl::StatusOr<RequestPtr> req = comm_->ReduceScatter(send, grad_seg_[b].data(), bp.seg,
                                                        CommType(bp.grad_dtype), ReduceOp::kMean);
  if (!req.ok()) return req.status();
  rs_[b] = *std::move(req);
  rs_started_[b] = 1;
  return absl::OkStatus();
}

absl::Status FastEngine::GradsReady(int64_t first, int64_t count) {
  if (first < 0 || count < 0 || first + count > static_cast<int64_t>(params_.size())) {
    return absl::InvalidArgumentError(absl::StrCat("mdopt_grads_ready: params [", first, ", ",
                                                   first + count, ") are not in [0, ",
                                                   params_.size(), ")"));
  }
  if (!Sharded() || opt_.grads_reduced) return absl::OkStatus();
  param_ready_.resize(params_.size(), 0);
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
  return absl::OkStatus();
}

absl::Status FastEngine::ReduceGradients() {
  if (!Sharded() || opt_.grads_reduced) return absl::OkStatus();
  for (; next_rs_ < plan_.buckets.size(); ++next_rs_) {
    if (absl::Status s = StartReduceScatter(static_cast<int>(next_rs_)); !s.ok()) return s;
  }
  for (size_t b = 0; b < plan_.buckets.size(); ++b) {
    if (absl::Status s = rs_[b]->Wait(); !s.ok()) return s;
    rs_[b] = nullptr;
  }
  next_rs_ = 0;
  std::fill(param_ready_.begin(), param_ready_.end(), 0);
  return absl::OkStatus();
}

double FastEngine::GradSumSq(int64_t index) {
  const int64_t first = plan_.first_slot[index];
  double total = 0.0;
  for (int64_t e = 0; e < params_[index].experts; ++e) {
    const int k = static_cast<int>(first + e);
    if (st_[k].rows > 0) total += fast::GradSumSq(View(k), &scratch_);
  }
  return total;
}

absl::Status FastEngine::Stage(int b, int stage, const fast::StepScalars* scalars, size_t q0,
                                int64_t q1_or_end) {
  const BucketPlan& bp = plan_.buckets[b];
  const size_t q1 = q1_or_end < 0 ? bp.slots.size() : static_cast<size_t>(q1_or_end);
  Workspace& ws = Pool(b);
  auto x_of = [&](size_t q) { return ws.xloc.data() + bp.Offset(q, rank_, world_); };
  const bool comm_bf16 = opt_.ns_comm_bf16;
  switch (stage) {
    case 0: {
      bool radial = false;
      for (size_t q = q0; q < q1; ++q) {
        const int k = bp.slots[q];
        const kernels::UpdateRule& r = ParamOf(k).rule;
        const fast::MatrixView v = View(k);
        SlotState& s = st_[k];
        s.ns_ran = s.projected = s.gains_stepped = false;
        s.delta_sq = s.w_sq = 0.0;
        if (opt_.update_norms && s.rows > 0) {
          std::copy(v.w, v.w + s.rows * v.n, ws.wold.data() + bp.Offset(q, rank_, world_));
        }
        fast::ResetPartials(r, v, &st_[k].partials);
        if (r.tangent && r.sphere != Sphere::kNone && st_[k].rows > 0) {
          fast::RadialDots(r, v, &st_[k].partials, &scratch_);
        }
        radial = radial || RadialRecord(r, plan_.slots[k].n) > 0;
      }
      if (radial && Sharded()) {  // rare (tangent=1): no overlap for these sums
        if (absl::Status s = StartSums(b, ws, true); !s.ok()) return s;
        if (absl::Status s = ws.sums->Wait(); !s.ok()) return s;
        AddSums(b, ws, true);
      }
      p2p_.clear();
      for (size_t q = q0; q < q1; ++q) {
        const int k = bp.slots[q];
        const SlotPlan& sp = plan_.slots[k];
        const ParamEntry& p = params_[sp.param];
        if (st_[k].rows > 0) {
          fast::Pass1(p.rule, View(k), scalars[p.group], sp.muon ? x_of(q) : nullptr,
                      &st_[k].partials, &scratch_);
        }
        if (!sp.muon || sp.layout != Layout::kRows || !Sharded()) continue;
        // The NS gather: every rank's block of X to the owner.
        const int64_t off = bp.Offset(q, rank_, world_);
        if (rank_ != sp.owner) {
          if (st_[k].rows == 0) continue;
          void* data = x_of(q);
          if (comm_bf16) {
            for (int64_t e = 0; e < st_[k].rows * sp.n; ++e) ws.xloc16[off + e] = kernels::FloatToBf16(ws.xloc[off + e]);
            data = ws.xloc16.data() + off;
          }
          p2p_.push_back({sp.owner, true, data, st_[k].rows * sp.n, comm_bf16 ? DataType::kBf16 : DataType::kF32});
        } else {
          const int64_t full = st_[k].xfull_offset;
          std::copy(x_of(q), x_of(q) + st_[k].rows * sp.n, ws.xfull.data() + full + st_[k].row0 * sp.n);
          for (int r = 0; r < world_; ++r) {
            if (r == rank_ || sp.Rows(r) == 0) continue;
            const int64_t at = full + sp.RowBegin(r) * sp.n;
            void* data = comm_bf16 ? static_cast<void*>(ws.xfull16.data() + at) : ws.xfull.data() + at;
            p2p_.push_back({r, false, data, sp.Rows(r) * sp.n, comm_bf16 ? DataType::kBf16 : DataType::kF32});
          }
        }
      }
      if (!p2p_.empty()) {
        absl::StatusOr<RequestPtr> req = comm_->SendRecv(p2p_, kGatherTag);
        if (!req.ok()) return req.status();
        ws.gather = *std::move(req);
      }
      return absl::OkStatus();
    }
    case 1: {
      if (ws.gather != nullptr) {
        if (absl::Status s = ws.gather->Wait(); !s.ok()) return s;
        ws.gather = nullptr;
      }
      p2p_.clear();
      for (size_t q = q0; q < q1; ++q) {
        const int k = bp.slots[q];
        const SlotPlan& sp = plan_.slots[k];
        if (!sp.muon || sp.owner != rank_) continue;
        const kernels::UpdateRule& r = ParamOf(k).rule;
        const bool gathered = sp.layout == Layout::kRows && Sharded();
        float* x = gathered ? ws.xfull.data() + st_[k].xfull_offset : x_of(q);
        const int64_t numel = sp.m * sp.n;
        if (gathered && comm_bf16) {
          // The other ranks' blocks arrived as bf16; this rank's block is still f32.
          for (int rr = 0; rr < world_; ++rr) {
            if (rr == rank_) continue;
            const int64_t at = sp.RowBegin(rr) * sp.n;
            for (int64_t e = 0; e < sp.Rows(rr) * sp.n; ++e)
              x[at + e] = kernels::Bf16ToFloat(ws.xfull16[st_[k].xfull_offset + at + e]);
          }
        }
        const float* o = opt_.ns_bf16 ? ns_bf16_ws_.Run(r.ns_coeffs, r.ns_steps, sp.m, sp.n, x,
                                                        opt_.ns_form)
                                      : fast::NewtonSchulz(r.ns_coeffs, r.ns_steps, sp.m, sp.n, x, &ns_,
                                                           opt_.ns_form);
        if (o != x) std::copy(o, o + numel, x);
        st_[k].ns_ran = true;
        if (!gathered) continue;
        // The scatter: every other rank's block of O back to it; this rank's block stays.
        std::copy(x + st_[k].row0 * sp.n, x + (st_[k].row0 + st_[k].rows) * sp.n, x_of(q));
        for (int rr = 0; rr < world_; ++rr) {
          if (rr == rank_ || sp.Rows(rr) == 0) continue;
          const int64_t at = sp.RowBegin(rr) * sp.n;
          void* data = x + at;
          if (comm_bf16) {
            uint16_t* h = ws.xfull16.data() + st_[k].xfull_offset + at;
            for (int64_t e = 0; e < sp.Rows(rr) * sp.n; ++e) h[e] = kernels::FloatToBf16(x[at + e]);
            data = h;
          }
          p2p_.push_back({rr, true, data, sp.Rows(rr) * sp.n, comm_bf16 ? DataType::kBf16 : DataType::kF32});
        }
      }
      if (Sharded()) {
        for (size_t q = q0; q < q1; ++q) {
          const int k = bp.slots[q];
          const SlotPlan& sp = plan_.slots[k];
          if (!sp.muon || sp.layout != Layout::kRows || sp.owner == rank_ || st_[k].rows == 0) continue;
          const int64_t off = bp.Offset(q, rank_, world_);
          void* data = comm_bf16 ? static_cast<void*>(ws.xloc16.data() + off) : x_of(q);
          p2p_.push_back({sp.owner, false, data, st_[k].rows * sp.n, comm_bf16 ? DataType::kBf16 : DataType::kF32});
        }
      }
      if (!p2p_.empty()) {
        absl::StatusOr<RequestPtr> req = comm_->SendRecv(p2p_, kScatterTag);
        if (!req.ok()) return req.status();
        ws.scatter = *std::move(req);
      }
      return absl::OkStatus();
    }
    case 2: {
      if (ws.scatter != nullptr) {
        if (absl::Status s = ws.scatter->Wait(); !s.ok()) return s;
        ws.scatter = nullptr;
      }
      for (size_t q = q0; q < q1; ++q) {
        const int k = bp.slots[q];
        const SlotPlan& sp = plan_.slots[k];
        const ParamEntry& p = params_[sp.param];
        if (!sp.muon || st_[k].rows == 0) continue;
        float* o = x_of(q);
        if (comm_bf16 && Sharded() && sp.layout == Layout::kRows && sp.owner != rank_) {
          const int64_t off = bp.Offset(q, rank_, world_);
          for (int64_t e = 0; e < st_[k].rows * sp.n; ++e) o[e] = kernels::Bf16ToFloat(ws.xloc16[off + e]);
        }
        fast::Pass2(p.rule, View(k), scalars[p.group], o, &st_[k].partials, &scratch_);
      }
      if (Sharded() && cross_len_[b] > 0) return StartSums(b, ws, false);
      return absl::OkStatus();
    }
    case 3: {
      if (Sharded() && cross_len_[b] > 0) {
        if (absl::Status s = ws.sums->Wait(); !s.ok()) return s;
        ws.sums = nullptr;
        AddSums(b, ws, false);
      }
      for (size_t q = q0; q < q1; ++q) {
        const int k = bp.slots[q];
        const SlotPlan& sp = plan_.slots[k];
        const ParamEntry& p = params_[sp.param];
        SlotState& s = st_[k];
        if (s.rows == 0 && sp.layout == Layout::kOwner) continue;
        const fast::MatrixView v = View(k);
        fast::StepGains(p.rule, v, scalars[p.group], s.partials);
        if (s.rows > 0) fast::Finish(p.rule, v, s.partials, &scratch_);
        // Each matrix is counted by one rank: its owner, or rank 0 (which always holds rows).
        const bool accounts = sp.layout == Layout::kOwner ? sp.owner == rank_ : rank_ == 0;
        s.projected = accounts && p.rule.sphere != Sphere::kNone;
        s.gains_stepped = accounts && p.rule.gains != kernels::Gains::kNone;
        if (opt_.update_norms && s.rows > 0) {
          fast::UpdateNorms(v, ws.wold.data() + bp.Offset(q, rank_, world_), &s.delta_sq, &s.w_sq,
                            &scratch_);
        }
      }
      if (Sharded()) {
        if (opt_.gather_deferred) {
          weights_pending_ = true;
          return absl::OkStatus();
        }
        return StartWeightGather(b, ws);
      }
      return absl::OkStatus();
    }
    case 4: {
      if (ws.ag == nullptr) return absl::OkStatus();
      if (absl::Status s = ws.ag->Wait(); !s.ok()) return s;
      ws.ag = nullptr;
      UnpackWeights(b, ws);
      return absl::OkStatus();
    }
  }
  return absl::OkStatus();
}

absl::Status FastEngine::Step(double lr_scale, int64_t t) {
  for (size_t g = 0; g < groups_.size(); ++g) {
    const kernels::UpdateRule& r = groups_[g].spec.rule;
    scalars_[g].lr = r.lr * lr_scale;
    scalars_[g].gain_lr = r.gain_lr * lr_scale;
    scalars_[g].t = t;
  }
  const int B = static_cast<int>(plan_.buckets.size());
  if (Local()) {
    // Nothing to overlap: each matrix goes through all its passes before the next starts,
    // so that the finishing pass finds the rows the first pass wrote still in cache (a
    // bucket's worth of matrices in between would have evicted them). Matrices are
    // independent, so the order changes no result.
    for (int b = 0; b < B; ++b) {
      for (size_t q = 0; q < plan_.buckets[b].slots.size(); ++q) {
        for (int stage = 0; stage < kStages; ++stage) {
          if (absl::Status s = Stage(b, stage, scalars_.data(), q, static_cast<int64_t>(q) + 1);
              !s.ok()) {
            return s;
          }
        }
      }
    }
    return absl::OkStatus();
  }
  for (int wave = 0; wave < B + kStages - 1; ++wave) {
    for (int stage = 0; stage < kStages; ++stage) {
      const int b = wave - stage;
      if (b < 0 || b >= B) continue;
      if (absl::Status s = Stage(b, stage, scalars_.data()); !s.ok()) return s;
    }
  }
  return absl::OkStatus();
}

absl::Status FastEngine::StartWeightGather(int b, Workspace& ws) {
  const BucketPlan& bp = plan_.buckets[b];
  const size_t eb = DtypeBytes(bp.param_dtype);
  int64_t mine = 0;
  for (int r = 0; r < rank_; ++r) mine += bp.seg[r];
  for (size_t q = 0; q < bp.slots.size(); ++q) {
    const SlotPlan& sp = plan_.slots[bp.slots[q]];
    const ParamEntry& p = params_[sp.param];
    const size_t bytes = static_cast<size_t>(st_[bp.slots[q]].rows * sp.n) * eb;
    std::memcpy(ws.weights.data() + (mine + bp.Offset(q, rank_, world_)) * eb,
                static_cast<const uint8_t*>(p.param) + (sp.TensorOffset() + st_[bp.slots[q]].row0 * sp.n) * eb,
                bytes);
  }
  absl::StatusOr<RequestPtr> req =
      comm_->AllGather(nullptr, ws.weights.data(), bp.seg, CommType(bp.param_dtype));
  if (!req.ok()) return req.status();
  ws.ag = *std::move(req);
  return absl::OkStatus();
}

void FastEngine::UnpackWeights(int b, const Workspace& ws) {
  const BucketPlan& bp = plan_.buckets[b];
  const size_t eb = DtypeBytes(bp.param_dtype);
  int64_t start = 0;
  for (int r = 0; r < world_; ++r) {
    if (r != rank_) {
      for (size_t q = 0; q < bp.slots.size(); ++q) {
        const SlotPlan& sp = plan_.slots[bp.slots[q]];
        const ParamEntry& p = params_[sp.param];
        std::memcpy(static_cast<uint8_t*>(p.param) + (sp.TensorOffset() + sp.RowBegin(r) * sp.n) * eb,
                    ws.weights.data() + (start + bp.Offset(q, r, world_)) * eb,
                    static_cast<size_t>(sp.Rows(r) * sp.n) * eb);
      }
    }
    start += bp.seg[r];
  }
}

absl::Status FastEngine::GatherParamsNow() {
  for (size_t b = 0; b < plan_.buckets.size(); ++b) {
    Workspace& ws = Pool(static_cast<int>(b));
    if (absl::Status s = StartWeightGather(static_cast<int>(b), ws); !s.ok()) return s;
    if (absl::Status s = ws.ag->Wait(); !s.ok()) return s;
    ws.ag = nullptr;
    UnpackWeights(static_cast<int>(b), ws);
  }
  weights_pending_ = false;
  return absl::OkStatus();
}

absl::Status FastEngine::GatherParams() {
  if (!Sharded() || !weights_pending_) return absl::OkStatus();
  return GatherParamsNow();
}

std::vector<StateArray> FastEngine::State(int64_t index, int64_t e) {
  const int k = static_cast<int>(plan_.first_slot[index] + e);
  const ParamEntry& p = params_[index];
  SlotState& s = st_[k];
  std::vector<StateArray> out;
  auto add = [&](const char* name, std::vector<float>& vec) {
    if (vec.empty()) return;
    out.push_back({name, vec.data(), static_cast<int64_t>(vec.size()), 4, false});
  };
  if (AliasesModel(p)) {
    if (s.rows > 0) {
      out.push_back({"master", static_cast<float*>(p.param) + plan_.slots[k].TensorOffset() + s.row0 * p.n,
                     s.rows * p.n, 4, true});
    }
  } else {
    add("master", s.master);
  }
  const bool muon = p.rule.base == Base::kMuon;
  add(muon ? "momentum" : "exp_avg", s.state0);
  add("exp_avg_sq", s.state1);
  add("row_raw", s.row_raw);
  add("row_exp_avg", s.row_m);
  add("row_exp_avg_sq", s.row_v);
  add("col_raw", s.col_raw);
  add("col_exp_avg", s.col_m);
  add("col_exp_avg_sq", s.col_v);
  add("scalar_raw", s.scalar_raw);
  add("scalar_exp_avg", s.scalar_m);
  add("scalar_exp_avg_sq", s.scalar_v);
  add("radius", s.radius);
  return out;
}

absl::Status FastEngine::WriteModels() {
  for (size_t k = 0; k < st_.size(); ++k)
    if (st_[k].rows > 0) fast::WriteModel(View(static_cast<int>(k)));
  if (Sharded()) return GatherParamsNow();
  return absl::OkStatus();
}

void FastEngine::LastStep(int group, int64_t counts[3], std::vector<double>* norms) const {
  counts[0] = counts[1] = counts[2] = 0;
  norms->clear();
  for (size_t k = 0; k < st_.size(); ++k) {
    if (params_[plan_.slots[k].param].group != group) continue;
    const SlotState& s = st_[k];
    counts[0] += s.ns_ran;
    counts[1] += s.projected;
    counts[2] += s.gains_stepped;
    norms->push_back(s.delta_sq);
    norms->push_back(s.w_sq);
  }
}

int64_t FastEngine::WorkspaceBytes() const {
  size_t b = 0;
  for (const Workspace& ws : pool_) {
    b += sizeof(float) * (ws.xloc.capacity() + ws.xfull.capacity()) +
         sizeof(uint16_t) * (ws.xloc16.capacity() + ws.xfull16.capacity()) +
         sizeof(double) * ws.cross.capacity() + ws.weights.capacity() +
         sizeof(float) * ws.wold.capacity();
  }
  for (const std::vector<uint8_t>& g : grad_seg_) b += g.capacity();
  for (const std::vector<uint8_t>& g : rs_staging_) b += g.capacity();
  return static_cast<int64_t>(b) + ns_.bytes() + ns_bf16_ws_.bytes() + scratch_.bytes();
}

}  // namespace

std::string ZeroSliceMessage(const ParamEntry& p, int64_t expert, int64_t slice) {
  const char* kind = p.rule.sphere == Sphere::kRow   ? "row"
                     : p.rule.sphere == Sphere::kCol ? "column"
                                                     : "matrix";
  std::string where = p.experts > 1 ? absl::StrCat(" of expert ", expert) : "";
  if (p.rule.sphere == Sphere::kFrobenius) {
    return absl::StrCat("param '", p.name, "': the ", kind, where,
                        " has zero or non-finite norm and cannot be put on its sphere");
  }
  return absl::StrCat("param '", p.name, "': ", kind, " ", slice, where,
                      " has zero or non-finite norm and cannot be put on its sphere");
}

std::unique_ptr<Engine> MakeFastEngine(const std::vector<ParamEntry>* params,
                                       const std::vector<Group>* groups, Communicator* comm,
                                       const EngineOptions& options) {
  return std::make_unique<FastEngine>(params, groups, comm, options);
}

}  // namespace mdopt
