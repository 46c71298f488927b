// The CPU backend (cpu_backend.h): this rank's float32 state in host vectors, the fused
// passes of fast_matrix.h over each slot's rows, Newton-Schulz on OpenBLAS or oneDNN. Calls
// run to completion on the calling thread (the "stream" of a host backend), so the skip flag
// is a plain bool that each stage reads when it starts, and the per-param skip flags a plain
// vector each stage reads per slot.
#include "kernels/cpu/cpu_backend.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <new>

#include "absl/strings/str_cat.h"
#include "kernels/common/bf16.h"
#include "kernels/common/gain_param.h"
#include "kernels/cpu/fast_matrix.h"
#include "kernels/cpu/newton_schulz.h"
#include "kernels/cpu/newton_schulz_bf16.h"

extern "C" char* openblas_get_config(void);
extern "C" char* openblas_get_corename(void);

namespace mdopt::kernels {
namespace {

namespace fast = kernels::fast;

// This rank's part of one slot.
struct SlotState {
  std::vector<float> master;  // bf16 params only (f32 params: the model's tensor is the master)
  std::vector<float> state0, state1;
  std::vector<float> row_raw, row_m, row_v;
  std::vector<float> col_raw, col_m, col_v;
  std::vector<float> scalar_raw, scalar_m, scalar_v;
  std::vector<float> radius;
  int64_t slices = 0;
  fast::Partials partials;
  SlotCounters counters;
};

// Buffers of one bucket in flight; a pool of `pipeline` is reused round-robin.
struct Workspace {
  std::vector<float> x_local, x_full;
  std::vector<uint16_t> x_local16, x_full16;
  std::vector<double> cross, radial;
  std::vector<uint8_t> weights;
  std::vector<float> wold;  // update_norms: this rank's rows before the step
};

size_t Bytes(Dtype d) { return d == Dtype::kF32 ? 4 : 2; }

// preserve_init: slice q's factor c = ||W_q|| / R_q into the gains PreserveInitTarget names
// (every entry for a frobenius sphere, entry q for a row or column sphere).
void AbsorbInitNorm(const UpdateRule& r, int64_t q, double c, SlotState* s) {
  const float raw = static_cast<float>(GainRawFor(r.gain_param, c));
  auto put = [&](std::vector<float>* v) {
    if (r.sphere == Sphere::kFrobenius) {
      std::fill(v->begin(), v->end(), raw);
    } else {
      (*v)[static_cast<size_t>(q)] = raw;
    }
  };
  switch (PreserveInitTarget(r.sphere, r.gains)) {
    case AbsorbInto::kRow: put(&s->row_raw); break;
    case AbsorbInto::kCol: put(&s->col_raw); break;
    case AbsorbInto::kScalar: s->scalar_raw[0] = raw; break;
    case AbsorbInto::kNone: break;
  }
}

class CpuBackend final : public StepBackend {
 public:
  explicit CpuBackend(int threads) : threads_(threads) {}

  const char* name() const override { return "cpu"; }
  bool device_memory() const override { return false; }
  void* stream() const override { return nullptr; }
  bool prefers_matrix_order() const override { return true; }

  absl::Status Setup(BackendConfig config, absl::Span<const ParamPointers> ptrs) override;
  BucketBuffers Buffers(int bucket) override;

  // The calling thread is the stream: nothing to join or release.
  absl::Status CheckStream(void* stream) const override {
    if (stream != nullptr) return absl::InvalidArgumentError("stream must be NULL with device=cpu");
    return absl::OkStatus();
  }
  void Join(void*) override {}
  void Release(void*) override {}

  void Enter() override {
    if (threads_ > 0 && depth_++ == 0) {
      previous_threads_ = omp_get_max_threads();
      omp_set_num_threads(threads_);
    }
  }
  void Leave() override {
    if (threads_ > 0 && --depth_ == 0) omp_set_num_threads(previous_threads_);
  }

  void InitNorms(int bucket) override;
  bool InitRadii(int bucket, BadSlice* bad) override;
  void InitProject(int bucket) override;

  absl::Status BindParams(int64_t first, absl::Span<const ParamPointers> ptrs) override {
    std::copy(ptrs.begin(), ptrs.end(), ptrs_.begin() + first);
    return absl::OkStatus();
  }
  void BeginStep(absl::Span<const GroupScalars> groups) override;
  void SetParamScalars(int param, const UpdateRule& rule) override {
    UpdateRule& r = cfg_.params[static_cast<size_t>(param)].rule;
    r.beta1 = rule.beta1;
    r.beta2 = rule.beta2;
    r.eps = rule.eps;
    r.momentum = rule.momentum;
    r.weight_decay = rule.weight_decay;
  }
  void PackGrads(int bucket, int chunk) override;
  void CheckFinite(int bucket) override;
  double* check_record() override { return check_.data(); }
  void ApplyCheck() override;
  void Prepare(const SlotRange& r) override;
  void ApplyRadial(int bucket) override;
  void Pass1(const SlotRange& r) override;
  void NewtonSchulz(const SlotRange& r) override;
  void Pass2(const SlotRange& r) override;
  void AssembleCross(const SlotRange& r) override;
  void ApplyCross(const SlotRange& r) override;
  void Finish(const SlotRange& r) override;
  void PackWeights(int bucket, int chunk) override;
  void UnpackWeights(int bucket, int chunk) override;
  // The step counts, the optimizer's and each param's that took the step (not skipped for
  // want of a gradient): a param's count is the t of its bias corrections.
  void EndStep() override {
    if (skip_) return;
    ++t_;
    for (size_t i = 0; i < param_t_.size(); ++i) param_t_[i] += param_skip_[i] == 0 ? 1 : 0;
  }
  absl::Status ReadOutcome(StepOutcome* out) override {
    *out = outcome_;
    out->steps_taken = t_;
    return absl::OkStatus();
  }

  std::vector<StateArray> State(int slot) override;
  absl::Status ReadState(int slot, size_t array, int64_t first, int64_t count, void* host) override;
  absl::Status WriteState(int slot, size_t array, const void* host) override;
  SlotCounters Counters(int slot) const override { return st_[slot].counters; }
  void SetStepsTaken(int64_t t) override { t_ = t; }
  absl::Status ReadParamSteps(int64_t* host) override {
    std::copy(param_t_.begin(), param_t_.end(), host);
    return absl::OkStatus();
  }
  absl::Status WriteParamSteps(const int64_t* host) override {
    std::copy(host, host + param_t_.size(), param_t_.begin());
    return absl::OkStatus();
  }
  void WriteModelRows() override;
  int64_t WorkspaceBytes() const override;

 private:
  const ParamDesc& ParamOf(int k) const { return cfg_.params[cfg_.slots[k].param]; }
  // Slot k's param has no gradient on any rank this step: every stage leaves it alone.
  bool Skips(int k) const { return param_skip_[static_cast<size_t>(cfg_.slots[k].param)] != 0; }
  // The step's scalars of slot k: its group's lr and gain_lr, and its param's own count for
  // the bias corrections (a copy of three numbers: the passes take them by value).
  fast::StepScalars ScalarsOf(int k) const {
    const ParamDesc& p = ParamOf(k);
    fast::StepScalars s = scalars_[static_cast<size_t>(p.group)];
    s.t = param_t_[static_cast<size_t>(cfg_.slots[k].param)] + 1;
    return s;
  }
  // f32 weights serve as their own master copy, unless blocks=groups:G interleaves the
  // blocks' rows in the tensor: the master is then kept in block order, as bf16 ones are.
  bool AliasesModel(const ParamDesc& p) const {
    return p.param_dtype == Dtype::kF32 && p.row_map.identity();
  }
  fast::MatrixView View(int k) const;
  Workspace& Pool(int b) { return pool_[static_cast<size_t>(b) % pool_.size()]; }
  template <typename F>
  void ForEachArray(int k, F&& f);
  // Array `array` of State(k): its float32 data and element count (nullptr: no such array).
  float* ArrayData(int k, size_t array, int64_t* count);
  float* XOf(int b, int k) { return Pool(b).x_local.data() + cfg_.slots[k].seg_offset; }
  // How many of the slots from q on (before q1) go through one batched Newton-Schulz call:
  // same shape and coefficients, their X one after another in x_local (slots held by other
  // ranks in between are passed over); *end: the slot after the last of them.
  size_t BatchRun(const BucketDesc& bd, size_t q, size_t q1, size_t* end) const;
  void ConvertToBf16(const float* src, uint16_t* dst, const std::vector<ElementRange>& ranges);
  void ConvertToF32(const uint16_t* src, float* dst, const std::vector<ElementRange>& ranges);
  // blocks=rows:K: every block's column/scalar-gain gradient becomes the K blocks' sum.
  void ShareBlockGains(const SlotRange& r);

  const int threads_;
  int depth_ = 0, previous_threads_ = 0;
  BackendConfig cfg_;
  std::vector<ParamPointers> ptrs_;
  std::vector<int64_t> first_slot_;  // per param
  std::vector<SlotState> st_;
  std::vector<Workspace> pool_;
  std::vector<std::vector<uint8_t>> grad_seg_;  // per bucket: this rank's reduced rows
  std::vector<std::vector<uint8_t>> grad_send_;  // two staging buffers, alternating
  std::vector<double> check_;
  std::vector<uint8_t> param_skip_;  // per param, set by ApplyCheck
  std::vector<fast::StepScalars> scalars_;  // per group, for the step in progress
  std::vector<int64_t> param_t_;  // per param: the steps it took (its bias-correction count)
  fast::NsWorkspace ns_;
  fast::Bf16NewtonSchulz ns_bf16_;
  fast::Scratch scratch_;
  bool skip_ = false;
  StepOutcome outcome_;
  int64_t t_ = 0;
};

fast::MatrixView CpuBackend::View(int k) const {
  const SlotDesc& sd = cfg_.slots[k];
  const ParamDesc& p = cfg_.params[sd.param];
  const SlotState& s = st_[k];
  const ParamPointers& ptr = ptrs_[sd.param];
  fast::MatrixView v;
  v.m = sd.m;
  v.n = p.n;
  v.row_begin = sd.row_begin;
  v.rows = sd.rows;
  // Interleaved blocks: the model pointers stay at the tensor's start and the passes find
  // each row through the row map (fast_matrix.h).
  const bool mapped = !p.row_map.identity();
  const int64_t model_off = mapped ? 0 : sd.tensor_offset + sd.row_begin * p.n;
  if (mapped) {
    v.model_map = &p.row_map;
    v.map_row0 = sd.tensor_offset / p.n + sd.row_begin;
  }
  auto f = [](const std::vector<float>& vec) {
    return vec.empty() ? nullptr : const_cast<float*>(vec.data());
  };
  if (AliasesModel(p)) {
    v.w = static_cast<float*>(ptr.param) + model_off;
  } else {
    v.w = f(s.master);
    if (p.param_dtype == Dtype::kF32) {
      v.model = static_cast<float*>(ptr.param) + model_off;
      v.model_dtype = Dtype::kF32;
    } else {
      v.model = static_cast<uint16_t*>(ptr.param) + model_off;
      v.model_dtype = Dtype::kBf16;
    }
  }
  v.state0 = f(s.state0);
  v.state1 = f(s.state1);
  v.row = {f(s.row_raw), f(s.row_m), f(s.row_v)};
  v.col = {f(s.col_raw), f(s.col_m), f(s.col_v)};
  v.scalar = {f(s.scalar_raw), f(s.scalar_m), f(s.scalar_v)};
  v.radius = f(s.radius);
  if (cfg_.grads_segmented) {
    const uint8_t* seg = grad_seg_[sd.bucket].data();
    v.grad_dtype = cfg_.grad_comm_bf16 ? Dtype::kBf16 : Dtype::kF32;
    v.grad = seg + sd.seg_offset * Bytes(v.grad_dtype);
  } else {
    v.grad_dtype = p.grad_dtype;
    v.grad = ptr.grad == nullptr ? nullptr
                                 : static_cast<const char*>(ptr.grad) + model_off * Bytes(p.grad_dtype);
    v.grad_in_model = true;
  }
  return v;
}

absl::Status CpuBackend::Setup(BackendConfig config, absl::Span<const ParamPointers> ptrs) {
  cfg_ = std::move(config);
  ptrs_.assign(ptrs.begin(), ptrs.end());
  const size_t S = cfg_.slots.size();
  st_.assign(S, SlotState{});
  first_slot_.assign(cfg_.params.size(), 0);
  for (size_t k = S; k-- > 0;) first_slot_[cfg_.slots[k].param] = static_cast<int64_t>(k);
  scalars_.assign(static_cast<size_t>(std::max(cfg_.groups, 1)), fast::StepScalars{});
  check_.assign(static_cast<size_t>(std::max<int64_t>(cfg_.check_len, 1)), 0.0);
  param_skip_.assign(cfg_.params.size(), 0);
  param_t_.assign(cfg_.params.size(), 0);

  // State, with the initial master weights read from the model; nothing is written.
  int64_t max_rows = 1, max_n = 1;
  for (size_t k = 0; k < S; ++k) {
    const SlotDesc& sd = cfg_.slots[k];
    const ParamDesc& p = cfg_.params[sd.param];
    const UpdateRule& r = p.rule;
    SlotState& s = st_[k];
    const size_t numel = static_cast<size_t>(sd.rows * p.n);
    max_rows = std::max(max_rows, sd.rows);
    max_n = std::max(max_n, p.n);
    if (!AliasesModel(p)) {
      s.master.resize(numel);
      const void* base = ptrs_[sd.param].param;
      ForEachTensorRun(p.row_map, p.n, sd.tensor_offset + sd.row_begin * p.n,
                       static_cast<int64_t>(numel), [&](int64_t at, int64_t rel, int64_t len) {
                         float* dst = s.master.data() + rel;
                         if (p.param_dtype == Dtype::kF32) {
                           std::memcpy(dst, static_cast<const float*>(base) + at, len * sizeof(float));
                         } else {
                           const uint16_t* src = static_cast<const uint16_t*>(base) + at;
                           for (int64_t q = 0; q < len; ++q) dst[q] = Bf16ToFloat(src[q]);
                         }
                       });
    }
    s.state0.assign(numel, 0.0f);  // muon momentum | adam exp_avg
    if (r.base != Base::kMuon) s.state1.assign(numel, 0.0f);
    const float one = static_cast<float>(GainRawForOne(r.gain_param));
    auto gains = [&](bool has, int64_t count, std::vector<float>* raw, std::vector<float>* m1,
                     std::vector<float>* m2) {
      if (!has || !sd.holds) return;
      raw->assign(static_cast<size_t>(count), one);
      m1->assign(static_cast<size_t>(count), 0.0f);
      m2->assign(static_cast<size_t>(count), 0.0f);
    };
    gains(HasRowGains(r.gains), sd.rows, &s.row_raw, &s.row_m, &s.row_v);
    gains(HasColGains(r.gains), p.n, &s.col_raw, &s.col_m, &s.col_v);
    gains(HasScalarGain(r.gains), 1, &s.scalar_raw, &s.scalar_m, &s.scalar_v);
    s.slices = !sd.holds ? 0 : r.sphere == Sphere::kRow ? sd.rows : SphereSlices(r.sphere, sd.m, p.n);
    s.radius.assign(static_cast<size_t>(s.slices), 0.0f);
    fast::ReservePartials(std::max<int64_t>(sd.rows, 1), p.n, &s.partials);
  }
  scratch_.Reserve(max_rows, max_n);

  // Bucket buffers: the pool's largest need over buckets.
  const PoolNeeds need = MaxBucketNeeds(cfg_);
  const size_t x_local = need.x_local, full = need.full, cross = need.cross, radial = need.radial,
               weights = need.weight_bytes, send = need.send, seg = need.seg;
  const size_t grad_bytes = cfg_.grad_comm_bf16 ? 2 : 4;
  pool_.assign(static_cast<size_t>(std::max(cfg_.pipeline, 1)), Workspace{});
  for (Workspace& ws : pool_) {
    ws.x_local.assign(x_local, 0.0f);
    ws.x_full.assign(full, 0.0f);
    if (cfg_.ns_comm_bf16 && cfg_.sharded) {
      ws.x_local16.assign(x_local, 0);
      ws.x_full16.assign(full, 0);
    }
    ws.cross.assign(cross, 0.0);
    ws.radial.assign(radial, 0.0);
    ws.weights.assign(weights, 0);
    if (cfg_.update_norms) ws.wold.assign(seg, 0.0f);
  }
  if (cfg_.grads_segmented) {
    grad_seg_.resize(cfg_.buckets.size());
    for (size_t b = 0; b < cfg_.buckets.size(); ++b)
      grad_seg_[b].assign(static_cast<size_t>(cfg_.buckets[b].seg) * grad_bytes, 0);
    grad_send_.assign(std::min<size_t>(cfg_.buckets.size(), 2), std::vector<uint8_t>(send * grad_bytes, 0));
  }
  // Newton-Schulz buffers for every shape this rank orthogonalises (the largest matrix need
  // not have the largest Gram side), and the bf16 path's GEMM plans.
  for (const BucketDesc& bd : cfg_.buckets) {
    for (size_t q = 0; q < bd.slots.size(); ++q) {
      const SlotDesc& sd = cfg_.slots[bd.slots[q]];
      if (!sd.muon || !sd.ns_here) continue;
      const ParamDesc& p = cfg_.params[sd.param];
      if (cfg_.ns_bf16) {
        ns_bf16_.Reserve(sd.m, p.n, cfg_.ns_form);
      } else {
        size_t end = q + 1;
        const size_t run = sd.ns_gathered ? 1 : BatchRun(bd, q, bd.slots.size(), &end);
        ns_.Reserve(sd.m, p.n, cfg_.ns_form, static_cast<int64_t>(run));
      }
    }
  }
  return absl::OkStatus();
}

BucketBuffers CpuBackend::Buffers(int b) {
  Workspace& ws = Pool(b);
  BucketBuffers out;
  if (cfg_.grads_segmented) {
    out.grad_send = grad_send_[static_cast<size_t>(b) % grad_send_.size()].data();
    out.grad_seg = grad_seg_[b].data();
  }
  auto f = [](auto& vec) { return vec.empty() ? nullptr : vec.data(); };
  out.x_local = f(ws.x_local);
  out.x_local16 = f(ws.x_local16);
  out.x_full = f(ws.x_full);
  out.x_full16 = f(ws.x_full16);
  out.cross = f(ws.cross);
  out.radial = f(ws.radial);
  out.weights = f(ws.weights);
  return out;
}

void CpuBackend::InitNorms(int b) {
  for (int k : cfg_.buckets[b].slots) {
    const UpdateRule& r = ParamOf(k).rule;
    fast::ResetPartials(r, View(k), &st_[k].partials);
    if (r.sphere != Sphere::kNone && st_[k].slices > 0) {
      fast::SliceSquares(r, View(k), &st_[k].partials, &scratch_);
    }
  }
}

bool CpuBackend::InitRadii(int b, BadSlice* bad) {
  for (int k : cfg_.buckets[b].slots) {
    const SlotDesc& sd = cfg_.slots[k];
    const ParamDesc& p = cfg_.params[sd.param];
    const UpdateRule& r = p.rule;
    SlotState& s = st_[k];
    if (r.sphere == Sphere::kNone) continue;
    for (int64_t q = 0; q < s.slices; ++q) {
      const double sq = s.partials.slice_sq[q];
      if (!(sq > 0.0) || !std::isfinite(sq)) {
        bad->slot = k;
        bad->slice = r.sphere == Sphere::kRow ? sd.row_begin + q : q;
        return false;
      }
      s.radius[q] = static_cast<float>(SliceRadius(r, sd.m, p.n, std::sqrt(sq)));
      if (p.preserve_init) AbsorbInitNorm(r, q, std::sqrt(sq) / s.radius[q], &s);
    }
  }
  return true;
}

void CpuBackend::InitProject(int b) {
  for (int k : cfg_.buckets[b].slots) {
    const ParamDesc& p = ParamOf(k);
    if (p.rule.sphere == Sphere::kNone || p.preserve_init || cfg_.slots[k].rows == 0) continue;
    fast::Finish(p.rule, View(k), st_[k].partials, &scratch_);
  }
}

void CpuBackend::BeginStep(absl::Span<const GroupScalars> groups) {
  for (size_t g = 0; g < groups.size() && g < scalars_.size(); ++g) {
    scalars_[g].lr = groups[g].lr;
    scalars_[g].gain_lr = groups[g].gain_lr;
  }
  skip_ = false;
  outcome_ = StepOutcome{};
}

// Every rank's rows of the bucket's gradients, rank-major and padded, in the comm dtype:
// bf16 gradients are widened to float32 here unless the reduction itself is to move bf16.
void CpuBackend::PackGrads(int b, int w) {
  const CommChunk& ch = cfg_.buckets[b].chunks[w];
  const SegmentView map = ch.map.view();
  uint8_t* send = static_cast<uint8_t*>(Buffers(b).grad_send);
  const bool to_bf16 = cfg_.grad_comm_bf16;
  const size_t out_bytes = to_bf16 ? 2 : 4;
  auto copy = [&](const CopySpan& c, int64_t tensor, int64_t buffer, int64_t count, int64_t pad) {
    const ParamDesc& p = cfg_.params[c.param];
    const void* src_base = ptrs_[c.param].grad;
    uint8_t* dst = send + buffer * out_bytes;
    if (src_base == nullptr) {  // no gradient here: this rank adds zeros to the mean
      std::memset(dst, 0, static_cast<size_t>(count + pad) * out_bytes);
      return;
    }
    // Interleaved blocks (row_map.h): the span is in block order, the tensor is not.
    ForEachTensorRun(p.row_map, p.n, tensor, count, [&](int64_t at, int64_t rel, int64_t len) {
      uint8_t* to = dst + rel * out_bytes;
      if (p.grad_dtype == Dtype::kF32 && !to_bf16) {
        std::memcpy(to, static_cast<const float*>(src_base) + at, len * 4);
      } else if (p.grad_dtype == Dtype::kBf16 && to_bf16) {
        std::memcpy(to, static_cast<const uint16_t*>(src_base) + at, len * 2);
      } else if (p.grad_dtype == Dtype::kBf16) {  // bf16 -> f32: exact
        const uint16_t* src = static_cast<const uint16_t*>(src_base) + at;
        float* out = reinterpret_cast<float*>(to);
        for (int64_t e = 0; e < len; ++e) out[e] = Bf16ToFloat(src[e]);
      } else {  // f32 -> bf16 (grad_comm_dtype=bf16 with f32 gradients)
        const float* src = static_cast<const float*>(src_base) + at;
        uint16_t* out = reinterpret_cast<uint16_t*>(to);
        for (int64_t e = 0; e < len; ++e) out[e] = FloatToBf16(src[e]);
      }
    });
    std::memset(dst + count * out_bytes, 0, static_cast<size_t>(pad) * out_bytes);
  };
  for (const CopySpan& c : ch.grad_pack) {
    if (c.blocks == 0) {
      copy(c, c.tensor_offset, c.buffer_offset, c.count, c.pad);
      continue;
    }
    for (int r = 0; r < c.blocks; ++r) {
      if (r == c.skip_rank) continue;
      const SpanBlock k = BlockOf(c, map, r);
      copy(c, k.tensor, k.buffer, k.real, k.pad);
    }
  }
}

void CpuBackend::CheckFinite(int b) {
  const BucketDesc& bd = cfg_.buckets[b];
  // Slots of one param are consecutive in a bucket; the bucket of its first slot sets the
  // entry, a later one (an expert stack split over buckets) adds to it.
  for (size_t q = 0; q < bd.slots.size();) {
    const int64_t i = cfg_.slots[bd.slots[q]].param;
    double total = 0.0;
    // Reduced rows exist even without a local gradient (zeros from this rank); a gradient
    // read from the model pointer does not.
    const bool readable = cfg_.grads_segmented || ptrs_[i].grad != nullptr;
    for (; q < bd.slots.size() && cfg_.slots[bd.slots[q]].param == i; ++q) {
      const int k = bd.slots[q];
      if (readable && cfg_.slots[k].rows > 0) total += fast::GradSumSq(View(k), &scratch_);
    }
    const bool first = cfg_.slots[first_slot_[i]].bucket == b;
    check_[i] = first ? total : check_[i] + total;
    if (first) check_[cfg_.params.size() + i] = GradPresence(ptrs_[i].grad);
  }
}

void CpuBackend::ApplyCheck() {
  double total = 0.0;
  outcome_ = StepOutcome{};
  const size_t P = cfg_.params.size();
  for (size_t i = 0; i < P; ++i) {
    const double sq = check_[i];
    total += sq;
    if (!std::isfinite(sq) && !outcome_.skipped) {
      outcome_.skipped = true;
      outcome_.bad_param = static_cast<int64_t>(i);
    }
    const double presence = check_[P + i];
    param_skip_[i] = !SomeRankHasGrad(presence);
    if (cfg_.grads_agree && !param_skip_[i] && SomeRankLacksGrad(presence) &&
        outcome_.disagree_param < 0) {
      outcome_.disagree_param = static_cast<int64_t>(i);
    }
  }
  outcome_.grad_norm = std::sqrt(total);
  skip_ = outcome_.skipped || outcome_.disagree_param >= 0;
}

void CpuBackend::Prepare(const SlotRange& r) {
  if (skip_) return;
  const BucketDesc& bd = cfg_.buckets[r.bucket];
  Workspace& ws = Pool(r.bucket);
  for (size_t q = r.q0; q < r.q1; ++q) {
    const int k = bd.slots[q];
    const SlotDesc& sd = cfg_.slots[k];
    const UpdateRule& rule = ParamOf(k).rule;
    SlotState& s = st_[k];
    s.counters = SlotCounters{};
    if (Skips(k)) {
      s.counters.skipped = sd.accounts;
      continue;
    }
    const fast::MatrixView v = View(k);
    if (cfg_.update_norms && sd.rows > 0) {
      std::copy(v.w, v.w + sd.rows * v.n, ws.wold.data() + sd.seg_offset);
    }
    fast::ResetPartials(rule, v, &s.partials);
    if (rule.tangent && rule.sphere != Sphere::kNone && sd.rows > 0) {
      fast::RadialDots(rule, v, &s.partials, &scratch_);
    }
    if (!sd.cross || bd.radial_len == 0 || !rule.tangent) continue;
    // The radial dots of a frobenius or column sphere are partial over rows: to the record.
    if (rule.sphere != Sphere::kFrobenius && rule.sphere != Sphere::kCol) continue;
    double* out = ws.radial.data() + sd.radial_offset;
    out = std::copy(s.partials.radial_dot.begin(), s.partials.radial_dot.end(), out);
    std::copy(s.partials.radial_dd.begin(), s.partials.radial_dd.end(), out);
  }
}

void CpuBackend::ApplyRadial(int b) {
  if (skip_) return;
  const Workspace& ws = Pool(b);
  for (int k : cfg_.buckets[b].slots) {
    const SlotDesc& sd = cfg_.slots[k];
    const UpdateRule& rule = ParamOf(k).rule;
    if (!sd.cross || !rule.tangent || Skips(k)) continue;
    if (rule.sphere != Sphere::kFrobenius && rule.sphere != Sphere::kCol) continue;
    fast::Partials& p = st_[k].partials;
    const double* in = ws.radial.data() + sd.radial_offset;
    std::copy(in, in + p.radial_dot.size(), p.radial_dot.begin());
    in += p.radial_dot.size();
    std::copy(in, in + p.radial_dd.size(), p.radial_dd.begin());
  }
}

void CpuBackend::ConvertToBf16(const float* src, uint16_t* dst,
                               const std::vector<ElementRange>& ranges) {
  for (const ElementRange& e : ranges)
    for (int64_t q = e.offset; q < e.offset + e.count; ++q) dst[q] = FloatToBf16(src[q]);
}

void CpuBackend::ConvertToF32(const uint16_t* src, float* dst,
                              const std::vector<ElementRange>& ranges) {
  for (const ElementRange& e : ranges)
    for (int64_t q = e.offset; q < e.offset + e.count; ++q) dst[q] = Bf16ToFloat(src[q]);
}

void CpuBackend::Pass1(const SlotRange& r) {
  if (skip_) return;
  const BucketDesc& bd = cfg_.buckets[r.bucket];
  Workspace& ws = Pool(r.bucket);
  for (size_t q = r.q0; q < r.q1; ++q) {
    const int k = bd.slots[q];
    const SlotDesc& sd = cfg_.slots[k];
    const ParamDesc& p = cfg_.params[sd.param];
    if (Skips(k)) {
      // Its X may go through a Newton-Schulz batch (and to its owner): zeros, whose result
      // no later stage applies.
      if (sd.muon && sd.rows > 0) {
        float* x = XOf(r.bucket, k);
        std::fill(x, x + sd.rows * p.n, 0.0f);
        if (sd.ns_gathered) {
          float* f = ws.x_full.data() + sd.full_offset + sd.row_begin * p.n;
          std::fill(f, f + sd.rows * p.n, 0.0f);
        }
      }
      continue;
    }
    if (sd.rows > 0) {
      fast::Pass1(p.rule, View(k), ScalarsOf(k), sd.muon ? XOf(r.bucket, k) : nullptr,
                  &st_[k].partials, &scratch_);
    }
    // The NS owner's own block goes straight into the whole-X buffer.
    if (sd.ns_gathered && sd.rows > 0) {
      const float* x = XOf(r.bucket, k);
      std::copy(x, x + sd.rows * p.n, ws.x_full.data() + sd.full_offset + sd.row_begin * p.n);
    }
  }
  if (!ws.x_local16.empty()) ConvertToBf16(ws.x_local.data(), ws.x_local16.data(), bd.local_remote);
}

size_t CpuBackend::BatchRun(const BucketDesc& bd, size_t q, size_t q1, size_t* end) const {
  const SlotDesc& first = cfg_.slots[bd.slots[q]];
  const ParamDesc& p = cfg_.params[first.param];
  size_t run = 1;
  *end = q + 1;
  for (size_t j = q + 1; j < q1; ++j) {
    const SlotDesc& sd = cfg_.slots[bd.slots[j]];
    if (!sd.ns_here && sd.rows == 0) continue;  // a matrix held elsewhere: nothing of it here
    const ParamDesc& pj = cfg_.params[sd.param];
    const bool same = sd.muon && sd.ns_here && !sd.ns_gathered && sd.m == first.m && pj.n == p.n &&
                      pj.rule.ns_coeffs == p.rule.ns_coeffs && pj.rule.ns_steps == p.rule.ns_steps &&
                      sd.seg_offset == first.seg_offset + static_cast<int64_t>(run) * first.m * p.n;
    if (!same) break;
    ++run;
    *end = j + 1;
  }
  return run;
}

void CpuBackend::NewtonSchulz(const SlotRange& r) {
  if (skip_) return;
  const BucketDesc& bd = cfg_.buckets[r.bucket];
  Workspace& ws = Pool(r.bucket);
  // The other ranks' blocks arrived as bf16; this rank's block is still f32.
  if (!ws.x_full16.empty()) ConvertToF32(ws.x_full16.data(), ws.x_full.data(), bd.full_remote);
  for (size_t q = r.q0; q < r.q1;) {
    const int k = bd.slots[q];
    const SlotDesc& sd = cfg_.slots[k];
    if (!sd.muon || !sd.ns_here) {
      ++q;
      continue;
    }
    const ParamDesc& p = cfg_.params[sd.param];
    const UpdateRule& rule = p.rule;
    float* x = sd.ns_gathered ? ws.x_full.data() + sd.full_offset : XOf(r.bucket, k);
    // The matrices that follow with the same shape and coefficients, held whole here one
    // after another (an expert stack): one batched call shares its tiles out over all of
    // them, bitwise what one call per matrix gives.
    size_t end = q + 1;
    const size_t run = cfg_.ns_bf16 || sd.ns_gathered ? 1 : BatchRun(bd, q, r.q1, &end);
    bool any = false;  // a matrix of the run that steps (skipped ones hold zeros)
    for (size_t j = q; j < end; ++j) any = any || !Skips(bd.slots[j]);
    if (!any) {
      q = end;
      continue;
    }
    const int64_t mn = sd.m * p.n;
    const float* o = cfg_.ns_bf16
                         ? ns_bf16_.Run(rule.ns_coeffs, rule.ns_steps, sd.m, p.n, x, cfg_.ns_form)
                         : fast::NewtonSchulzBatch(rule.ns_coeffs, rule.ns_steps, static_cast<int64_t>(run),
                                                   sd.m, p.n, x, &ns_, cfg_.ns_form);
    if (o != x) std::copy(o, o + static_cast<int64_t>(run) * mn, x);
    for (size_t j = q; j < end; ++j) {
      if (!Skips(bd.slots[j])) st_[bd.slots[j]].counters.ns_ran |= cfg_.slots[bd.slots[j]].ns_here;
    }
    // This rank's block of O stays here; the others go back to their ranks.
    if (sd.ns_gathered) {
      std::copy(x + sd.row_begin * p.n, x + (sd.row_begin + sd.rows) * p.n, XOf(r.bucket, k));
    }
    q = end;
  }
  if (!ws.x_full16.empty()) ConvertToBf16(ws.x_full.data(), ws.x_full16.data(), bd.full_remote);
}

void CpuBackend::Pass2(const SlotRange& r) {
  if (skip_) return;
  const BucketDesc& bd = cfg_.buckets[r.bucket];
  Workspace& ws = Pool(r.bucket);
  if (!ws.x_local16.empty()) ConvertToF32(ws.x_local16.data(), ws.x_local.data(), bd.local_remote);
  for (size_t q = r.q0; q < r.q1; ++q) {
    const int k = bd.slots[q];
    const SlotDesc& sd = cfg_.slots[k];
    if (!sd.muon || sd.rows == 0 || Skips(k)) continue;
    const ParamDesc& p = cfg_.params[sd.param];
    fast::Pass2(p.rule, View(k), ScalarsOf(k), XOf(r.bucket, k), &st_[k].partials, &scratch_);
  }
}

// The record of a slot: column-gain gradients, the scalar-gain gradient, then the squared
// norms of frobenius/column slices (what is partial over rows).
void CpuBackend::AssembleCross(const SlotRange& r) {
  if (skip_) return;
  const BucketDesc& bd = cfg_.buckets[r.bucket];
  double* record = Pool(r.bucket).cross.data();
  for (size_t q = r.q0; q < r.q1; ++q) {
    const int k = bd.slots[q];
    const SlotDesc& sd = cfg_.slots[k];
    if (!sd.cross || Skips(k)) continue;
    const UpdateRule& rule = ParamOf(k).rule;
    const fast::Partials& p = st_[k].partials;
    double* out = record + sd.cross_offset;
    out = std::copy(p.col_grad.begin(), p.col_grad.end(), out);
    out = std::copy(p.scalar_grad.begin(), p.scalar_grad.end(), out);
    if (rule.sphere == Sphere::kFrobenius || rule.sphere == Sphere::kCol)
      std::copy(p.slice_sq.begin(), p.slice_sq.end(), out);
  }
}

void CpuBackend::ApplyCross(const SlotRange& r) {
  if (skip_) return;
  const BucketDesc& bd = cfg_.buckets[r.bucket];
  const double* record = Pool(r.bucket).cross.data();
  for (size_t q = r.q0; q < r.q1; ++q) {
    const int k = bd.slots[q];
    const SlotDesc& sd = cfg_.slots[k];
    if (!sd.cross || Skips(k)) continue;
    const UpdateRule& rule = ParamOf(k).rule;
    fast::Partials& p = st_[k].partials;
    const double* in = record + sd.cross_offset;
    auto take = [&](std::vector<double>& dst) {
      std::copy(in, in + dst.size(), dst.begin());
      in += dst.size();
    };
    take(p.col_grad);
    take(p.scalar_grad);
    if (rule.sphere == Sphere::kFrobenius || rule.sphere == Sphere::kCol) take(p.slice_sq);
  }
}

// The K slots of a matrix of row blocks hold replicas of its column and scalar gains: block
// 0's partials take the sum over blocks 0..K-1 (added in that order, after any cross-rank
// sum), and the other blocks a copy, so every replica steps with the same gradient.
void CpuBackend::ShareBlockGains(const SlotRange& r) {
  const BucketDesc& bd = cfg_.buckets[r.bucket];
  for (size_t q = r.q0; q < r.q1; ++q) {
    const SlotDesc& sd = cfg_.slots[bd.slots[q]];
    if (sd.gain_blocks < 2 || sd.gain_block != 0 || !sd.holds) continue;
    const size_t end = std::min(r.q1, q + static_cast<size_t>(sd.gain_blocks));
    fast::Partials& sum = st_[bd.slots[q]].partials;
    for (size_t j = q + 1; j < end; ++j) {
      const fast::Partials& p = st_[bd.slots[j]].partials;
      for (size_t c = 0; c < sum.col_grad.size(); ++c) sum.col_grad[c] += p.col_grad[c];
      for (size_t c = 0; c < sum.scalar_grad.size(); ++c) sum.scalar_grad[c] += p.scalar_grad[c];
    }
    for (size_t j = q + 1; j < end; ++j) {
      fast::Partials& p = st_[bd.slots[j]].partials;
      std::copy(sum.col_grad.begin(), sum.col_grad.end(), p.col_grad.begin());
      std::copy(sum.scalar_grad.begin(), sum.scalar_grad.end(), p.scalar_grad.begin());
    }
  }
}

void CpuBackend::Finish(const SlotRange& r) {
  if (skip_) return;
  ShareBlockGains(r);
  const BucketDesc& bd = cfg_.buckets[r.bucket];
  Workspace& ws = Pool(r.bucket);
  for (size_t q = r.q0; q < r.q1; ++q) {
    const int k = bd.slots[q];
    const SlotDesc& sd = cfg_.slots[k];
    const ParamDesc& p = cfg_.params[sd.param];
    SlotState& s = st_[k];
    if (!sd.holds || Skips(k)) continue;
    const fast::MatrixView v = View(k);
    fast::StepGains(p.rule, v, ScalarsOf(k), s.partials);
    if (sd.rows > 0) fast::Finish(p.rule, v, s.partials, &scratch_);
    s.counters.projected = sd.accounts && p.rule.sphere != Sphere::kNone;
    s.counters.gains_stepped = sd.accounts && p.rule.gains != Gains::kNone;
    if (cfg_.update_norms && sd.rows > 0) {
      fast::UpdateNorms(v, ws.wold.data() + sd.seg_offset, &s.counters.delta_sq,
                        &s.counters.w_sq, &scratch_);
    }
  }
}

void CpuBackend::PackWeights(int b, int w) {
  const BucketDesc& bd = cfg_.buckets[b];
  const size_t eb = Bytes(bd.param_dtype);
  uint8_t* buf = static_cast<uint8_t*>(Pool(b).weights.data());
  for (const CopySpan& c : bd.chunks[w].weight_pack) {
    const ParamDesc& p = cfg_.params[c.param];
    ForEachTensorRun(p.row_map, p.n, c.tensor_offset, c.count, [&](int64_t at, int64_t rel, int64_t len) {
      std::memcpy(buf + (c.buffer_offset + rel) * eb,
                  static_cast<const uint8_t*>(ptrs_[c.param].param) + at * eb,
                  static_cast<size_t>(len) * eb);
    });
  }
}

void CpuBackend::UnpackWeights(int b, int w) {
  const BucketDesc& bd = cfg_.buckets[b];
  const CommChunk& ch = bd.chunks[w];
  const SegmentView map = ch.map.view();
  const size_t eb = Bytes(bd.param_dtype);
  const uint8_t* buf = Pool(b).weights.data();
  auto copy = [&](const CopySpan& c, int64_t tensor, int64_t buffer, int64_t count) {
    const ParamDesc& p = cfg_.params[c.param];
    ForEachTensorRun(p.row_map, p.n, tensor, count, [&](int64_t at, int64_t rel, int64_t len) {
      std::memcpy(static_cast<uint8_t*>(ptrs_[c.param].param) + at * eb,
                  buf + (buffer + rel) * eb, static_cast<size_t>(len) * eb);
    });
  };
  for (const CopySpan& c : ch.weight_unpack) {
    if (c.blocks == 0) {
      copy(c, c.tensor_offset, c.buffer_offset, c.count);
      continue;
    }
    for (int r = 0; r < c.blocks; ++r) {
      if (r == c.skip_rank) continue;
      const SpanBlock k = BlockOf(c, map, r);
      if (k.real > 0) copy(c, k.tensor, k.buffer, k.real);
    }
  }
}

// The state arrays of slot k in their fixed order: f(name, data, count, is_model).
template <typename F>
void CpuBackend::ForEachArray(int k, F&& f) {
  const SlotDesc& sd = cfg_.slots[k];
  const ParamDesc& p = cfg_.params[sd.param];
  SlotState& s = st_[k];
  auto add = [&](const char* name, std::vector<float>& vec) {
    if (!vec.empty()) f(name, vec.data(), static_cast<int64_t>(vec.size()), false);
  };
  if (AliasesModel(p)) {
    if (sd.rows > 0) {
      f("master", static_cast<float*>(ptrs_[sd.param].param) + sd.tensor_offset + sd.row_begin * p.n,
        sd.rows * p.n, true);
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
}

std::vector<StateArray> CpuBackend::State(int k) {
  std::vector<StateArray> out;
  ForEachArray(k, [&](const char* name, float*, int64_t count, bool is_model) {
    out.push_back({name, count, 4, is_model});
  });
  return out;
}

float* CpuBackend::ArrayData(int k, size_t array, int64_t* count) {
  float* found = nullptr;
  size_t at = 0;
  ForEachArray(k, [&](const char*, float* data, int64_t n, bool) {
    if (at++ == array) {
      found = data;
      *count = n;
    }
  });
  return found;
}

absl::Status CpuBackend::ReadState(int k, size_t array, int64_t first, int64_t count, void* host) {
  int64_t n = 0;
  const float* data = ArrayData(k, array, &n);
  if (data == nullptr || first < 0 || count < 0 || first + count > n) {
    return absl::InvalidArgumentError(absl::StrCat("state array ", array, " of slot ", k,
                                                   ": elements [", first, ", ", first + count,
                                                   ") are not in [0, ", n, ")"));
  }
  std::memcpy(host, data + first, static_cast<size_t>(count) * sizeof(float));
  return absl::OkStatus();
}

absl::Status CpuBackend::WriteState(int k, size_t array, const void* host) {
  int64_t n = 0;
  float* data = ArrayData(k, array, &n);
  if (data == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("slot ", k, " has no state array ", array));
  }
  std::memcpy(data, host, static_cast<size_t>(n) * sizeof(float));
  return absl::OkStatus();
}

void CpuBackend::WriteModelRows() {
  for (size_t k = 0; k < st_.size(); ++k)
    if (cfg_.slots[k].rows > 0) fast::WriteModel(View(static_cast<int>(k)));
}

int64_t CpuBackend::WorkspaceBytes() const {
  size_t b = 0;
  for (const Workspace& ws : pool_) {
    b += sizeof(float) * (ws.x_local.capacity() + ws.x_full.capacity()) +
         sizeof(uint16_t) * (ws.x_local16.capacity() + ws.x_full16.capacity()) +
         sizeof(double) * (ws.cross.capacity() + ws.radial.capacity()) + ws.weights.capacity() +
         sizeof(float) * ws.wold.capacity();
  }
  for (const std::vector<uint8_t>& g : grad_seg_) b += g.capacity();
  for (const std::vector<uint8_t>& g : grad_send_) b += g.capacity();
  b += sizeof(double) * check_.capacity();
  return static_cast<int64_t>(b) + ns_.bytes() + ns_bf16_.bytes() + scratch_.bytes();
}

}  // namespace

std::unique_ptr<StepBackend> MakeCpuBackend(int threads) {
  return std::make_unique<CpuBackend>(threads);
}

std::string CpuBf16NsUnavailableReason() {
  if (fast::Bf16NewtonSchulz::Available()) return "";
#ifdef MDOPT_HAVE_DNNL
  return "this CPU has no bf16 matmul (needs AVX512_BF16 or AMX)";
#else
  return "this build has no oneDNN (install libdnnl-dev and rebuild)";
#endif
}

std::string CpuRuntimeInfo() {
  std::string blas = "OpenBLAS";
  const char* config = openblas_get_config();  // "OpenBLAS 0.3.21 DYNAMIC_ARCH ..."
  if (config != nullptr && std::strncmp(config, "OpenBLAS ", 9) == 0) {
    const char* v = config + 9;
    blas = absl::StrCat("OpenBLAS-", std::string(v, std::strcspn(v, " ")));
  }
  const char* core = openblas_get_corename();
  if (core != nullptr && *core != '\0') absl::StrAppend(&blas, "/", core);
  const char* isa = "baseline";
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) {
    isa = "avx512";
  } else if (__builtin_cpu_supports("avx2")) {
    isa = "avx2";
  }
#ifdef MDOPT_HAVE_DNNL
  const char* bf16 = fast::Bf16NewtonSchulz::Available() ? "yes" : "no-cpu";
#else
  const char* bf16 = "no-build";
#endif
  return absl::StrCat("blas=", blas, " threads=", omp_get_max_threads(), " isa=", isa,
                      " onednn_bf16=", bf16);
}

}  // namespace mdopt::kernels
