// The CUDA backend (cuda_backend.h). Setup lays out one arena (state, the step's sums, the
// bucket pool, staging, scratch, the Newton-Schulz workspace and the kernels' tables) and
// allocates it with one cudaMalloc; every stage call after it launches kernels on the
// backend's stream and returns. The host keeps mirrors of what it uploads (slot and param
// tables, the model's pointers, the step's learning rates) and uploads the pointers again
// only when the trainer changed them.
#include "kernels/cuda/cuda_backend.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/common/gain_param.h"
#include "kernels/common/update_rule.h"
#include "kernels/cuda/device_status.h"
#include "kernels/cuda/newton_schulz.h"
#include "kernels/cuda/span_tables.h"
#include "kernels/cuda/stage_kernels.h"

namespace mdopt::kernels {
namespace {

using cuda::CopyChunk;
using cuda::DevCopySpan;
using cuda::DevGroup;
using cuda::DevParam;
using cuda::DevParamCheck;
using cuda::DevPointers;
using cuda::DevSlot;
using cuda::DevStatus;
using cuda::DevTables;
using cuda::DevTile;
using cuda::SpanTable;
using cuda::TilePass;

constexpr int64_t kCopyChunk = cuda::kCopyPiece;  // elements per block of a copy launch
constexpr int kUploadRing = 4;         // pinned upload slots in flight
constexpr size_t kStagingBytes = size_t{8} << 20;  // pinned staging of the state calls

std::string CudaMessage(cudaError_t e, absl::string_view what) {
  return absl::StrCat(what, ": ", cudaGetErrorName(e), " (", cudaGetErrorString(e), ")");
}


// Offsets into the arena, given out before it exists: Take records where a pointer must
// point once the arena is allocated (Commit).
class ArenaLayout {
 public:
  // Returns the offset given (0 for an empty array, which stays null).
  template <typename T>
  size_t Take(T** where, int64_t count, bool workspace) {
    if (count <= 0) {
      *where = nullptr;
      return 0;
    }
    const size_t off = (bytes_ + 255) & ~size_t{255};
    const size_t size = static_cast<size_t>(count) * sizeof(T);
    bytes_ = off + size;
    (workspace ? workspace_ : state_) += size;
    fixups_.push_back({reinterpret_cast<void**>(where), off});
    return off;
  }
  void Commit(char* base) {
    for (const Fixup& f : fixups_) *f.where = base + f.offset;
    fixups_.clear();
  }
  size_t bytes() const { return bytes_; }
  size_t state_bytes() const { return state_; }
  size_t workspace_bytes() const { return workspace_; }

 private:
  struct Fixup {
    void** where;
    size_t offset;
  };
  size_t bytes_ = 0, state_ = 0, workspace_ = 0;
  std::vector<Fixup> fixups_;
};

// A list of copy chunks in device memory, with the first chunk of each slot position (so a
// slot range copies only its own spans).
struct ChunkList {
  std::vector<CopyChunk> host;
  std::vector<int64_t> start;  // per slot position q, plus one
  CopyChunk* dev = nullptr;
};

// One batched Newton-Schulz call: the matrices at positions [q, q_end) of a bucket.
struct NsRun {
  size_t q = 0, q_end = 0;
  int64_t batch = 1, m = 1, n = 1;
  NsCoeffSet set = NsCoeffSet::kQuintic;
  int steps = 5;
  bool full = false;     // on the whole-X buffer (gathered) or on x_local
  int64_t offset = 0;    // elements into that buffer
};

struct PoolEntry {
  float* x_local = nullptr;
  uint16_t* x_local16 = nullptr;
  float* x_full = nullptr;
  uint16_t* x_full16 = nullptr;
  double* cross = nullptr;
  double* radial = nullptr;
  void* weights = nullptr;  // char*, sized in bytes
  float* wold = nullptr;
};

// One window of a bucket's collectives (CommChunk): its owned parts in device memory (the
// kernel's SegmentView points there) and its three span tables.
struct WindowDev {
  OwnedPart* owned = nullptr;
  SpanTable grad_pack, weight_pack, weight_unpack;
};

struct BucketDev {
  DevTile* tiles = nullptr;
  std::vector<DevTile> tiles_host;
  std::vector<int64_t> tile_start;  // per slot position, plus one
  int32_t* slot_list = nullptr;
  std::vector<int32_t> slot_list_host;
  void* grad_seg = nullptr;
  std::vector<WindowDev> windows;
  cuda::ParamChecks checks;  // the finite check's entries and their slot list
  DevParamCheck* check_entries = nullptr;
  int32_t* check_slots = nullptr;
  ChunkList own_to_full, full_to_own;
  ChunkList local_remote, full_remote;  // f32 <-> bf16 of the NS exchange
  std::vector<NsRun> ns;
  bool any_tangent = false;
  int32_t combine_spread = 1;  // blocks per slot of a combine launch
};

// Splits a copy of `count` elements (then `pad` zeros) into chunks of at most kCopyChunk.
void AddChunks(ChunkList* list, int32_t src_param, bool src_grad, int64_t src, int32_t dst_param,
               int64_t dst, int64_t count, int64_t pad) {
  for (int64_t e = 0; e < count; e += kCopyChunk) {
    CopyChunk c;
    c.src_param = src_param;
    c.dst_param = dst_param;
    c.src_grad = src_grad;
    c.src = src + e;
    c.dst = dst + e;
    c.count = std::min(kCopyChunk, count - e);
    list->host.push_back(c);
  }
  for (int64_t e = 0; e < pad; e += kCopyChunk) {
    CopyChunk c;
    c.zero = 1;
    c.dst_param = dst_param;
    c.dst = dst + count + e;
    c.count = std::min(kCopyChunk, pad - e);
    list->host.push_back(c);
  }
}

class CudaBackend final : public StepBackend {
 public:
  explicit CudaBackend(int device) : device_(device) {}
  ~CudaBackend() override;

  const char* name() const override { return "cuda"; }
  bool device_memory() const override { return true; }
  void* stream() const override { return stream_; }
  bool prefers_matrix_order() const override { return false; }

  absl::Status Setup(BackendConfig config, absl::Span<const ParamPointers> ptrs) override;
  BucketBuffers Buffers(int bucket) override;

  absl::Status CheckStream(void* stream) const override;
  void Join(void* stream) override;
  void Release(void* stream) override;
  void Enter() override;
  void Leave() override;

  void InitNorms(int bucket) override;
  bool InitRadii(int bucket, BadSlice* bad) override;
  void InitProject(int bucket) override;

  absl::Status BindParams(int64_t first, absl::Span<const ParamPointers> ptrs) override;
  void BeginStep(absl::Span<const GroupScalars> groups) override;
  void SetParamScalars(int param, const UpdateRule& rule) override {
    DevParam& d = params_[static_cast<size_t>(param)];
    d.momentum = static_cast<float>(rule.momentum);
    d.beta1 = rule.beta1;
    d.beta2 = rule.beta2;
    d.eps = rule.eps;
    d.weight_decay = rule.weight_decay;
    params_dirty_ = true;  // uploaded, ordered on the stream, by the next BeginStep
  }
  void PackGrads(int bucket, int chunk) override;
  void CheckFinite(int bucket) override;
  double* check_record() override { return check_; }
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
  void EndStep() override {
    Check(cuda::LaunchEndStep(tables_, static_cast<int64_t>(cfg_.params.size()), stream_), "EndStep");
  }
  absl::Status ReadOutcome(StepOutcome* out) override;

  std::vector<StateArray> State(int slot) override;
  absl::Status ReadState(int slot, size_t array, int64_t first, int64_t count, void* host) override;
  absl::Status WriteState(int slot, size_t array, const void* host) override;
  SlotCounters Counters(int slot) const override;
  void SetStepsTaken(int64_t t) override;
  absl::Status ReadParamSteps(int64_t* host) override;
  absl::Status WriteParamSteps(const int64_t* host) override;
  void WriteModelRows() override;
  int64_t WorkspaceBytes() const override { return static_cast<int64_t>(workspace_bytes_); }

 private:
  // Remembers the first launch error; it is reported at the next synchronising call.
  void Check(int err, const char* what) {
    if (err != 0 && pending_.empty())
      pending_ = CudaMessage(static_cast<cudaError_t>(err), absl::StrCat("launch of ", what));
  }
  absl::Status Sync(const char* what);
  absl::Status ValidatePointer(int64_t param, const void* p, const char* which) const;
  void UploadPointers();
  // Writes `bytes` from host memory to device memory through the pinned upload ring,
  // ordered on the stream (the host need not keep `src`).
  void Upload(void* dst, const void* src, size_t bytes);
  void Tiles(TilePass pass, const SlotRange& r, bool init = false);
  void Combine(TilePass pass, const SlotRange& r, bool init = false);
  void Copy(const ChunkList& list, size_t q0, size_t q1, const void* src_base, bool src_bf16,
            void* dst_base, bool dst_bf16, const char* what);
  void CopyAll(const ChunkList& list, const void* src_base, bool src_bf16, void* dst_base,
               bool dst_bf16, const char* what) {
    Copy(list, 0, list.start.size() - 1, src_base, src_bf16, dst_base, dst_bf16, what);
  }
  // One window's spans in one direction: one launch.
  void CopySpans(int b, int chunk, const SpanTable WindowDev::*table, bool grads, void* buffer,
                 bool buffer_bf16, bool to_buffer, const char* what);
  PoolEntry& Pool(int b) { return pool_[static_cast<size_t>(b) % pool_.size()]; }
  SlotRange Whole(int b) const { return SlotRange{b, 0, cfg_.buckets[b].slots.size()}; }
  // The arrays of State(k): name, device data, count, is_model.
  struct Array {
    const char* name;
    float* data;
    int64_t count;
    bool is_model;
  };
  std::vector<Array> Arrays(int k) const;
  absl::Status LayOut(ArenaLayout* arena);
  void BuildBucket(int b);

  const int device_;
  int depth_ = 0, caller_device_ = 0;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t join_ = nullptr, release_ = nullptr;
  cudaEvent_t ring_events_[kUploadRing] = {};
  char* ring_ = nullptr;  // pinned: kUploadRing slots of ring_slot_ bytes
  size_t ring_slot_ = 0;
  int ring_next_ = 0;
  char* staging_ = nullptr;  // pinned, kStagingBytes
  DevStatus* status_host_ = nullptr;  // pinned
  BackendConfig cfg_;
  std::vector<ParamPointers> ptrs_;
  bool ptrs_dirty_ = true;
  bool params_dirty_ = false;  // params_ changed on the host since it was uploaded
  std::vector<DevParam> params_;
  std::vector<DevSlot> slots_;
  std::vector<BucketDev> buckets_;
  std::vector<PoolEntry> pool_;
  std::vector<void*> grad_send_;
  char* arena_ = nullptr;
  size_t arena_bytes_ = 0, workspace_bytes_ = 0;
  DevTables tables_;
  DevParam* params_dev_ = nullptr;
  DevSlot* slots_dev_ = nullptr;
  DevPointers* ptrs_dev_ = nullptr;
  DevGroup* groups_dev_ = nullptr;
  DevStatus* status_dev_ = nullptr;
  double* check_ = nullptr;
  void* ns_workspace_ = nullptr;
  int64_t ns_workspace_bytes_ = 0;
  std::unique_ptr<cuda::NewtonSchulzRunner> ns_;
  std::vector<int64_t> first_slot_;
  ChunkList to_master_, to_model_;  // bf16 params: model rows -> master, and back
  ChunkList to_master32_, to_model32_;  // mapped f32 params (blocks=groups:G): the same
  RowMap* row_maps_dev_ = nullptr;      // per param (DevTables::row_maps)
  double* counters_ = nullptr;      // 3 per slot: applied, delta_sq, w_sq
  int64_t steps_begun_ = 0;
  mutable int64_t counters_step_ = -1;       // the step counters_host_ was read after
  mutable std::vector<double> counters_host_;
  std::vector<size_t> master_off_;   // per slot: its master's offset in the arena
  std::string pending_;
};

CudaBackend::~CudaBackend() {
  int previous = 0;
  const bool restore = cudaGetDevice(&previous) == cudaSuccess;
  cudaSetDevice(device_);
  if (stream_ != nullptr) cudaStreamSynchronize(stream_);
  ns_.reset();
  if (arena_ != nullptr) cudaFree(arena_);
  for (void* p : {static_cast<void*>(ring_), static_cast<void*>(staging_),
                  static_cast<void*>(status_host_)})
    if (p != nullptr) cudaFreeHost(p);
  for (cudaEvent_t e : ring_events_)
    if (e != nullptr) cudaEventDestroy(e);
  if (join_ != nullptr) cudaEventDestroy(join_);
  if (release_ != nullptr) cudaEventDestroy(release_);
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
  if (restore) cudaSetDevice(previous);
}

void CudaBackend::Enter() {
  if (depth_++ > 0) return;
  if (cudaGetDevice(&caller_device_) != cudaSuccess) caller_device_ = device_;
  cudaSetDevice(device_);
}

void CudaBackend::Leave() {
  if (--depth_ == 0 && caller_device_ != device_) cudaSetDevice(caller_device_);
}

absl::Status CudaBackend::CheckStream(void* stream) const {
  if (stream == nullptr) return absl::OkStatus();  // the legacy default stream of cuda:K
  int dev = -1;
  const cudaError_t e = cudaStreamGetDevice(static_cast<cudaStream_t>(stream), &dev);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return absl::InvalidArgumentError(
        absl::StrCat("stream is not a CUDA stream of this process (", cudaGetErrorName(e), ")"));
  }
  if (dev != device_) {
    return absl::InvalidArgumentError(
        absl::StrCat("stream belongs to cuda:", dev, ", the optimizer runs on cuda:", device_));
  }
  return absl::OkStatus();
}

void CudaBackend::Join(void* stream) {
  Check(cudaEventRecord(join_, static_cast<cudaStream_t>(stream)), "join (event record)");
  Check(cudaStreamWaitEvent(stream_, join_, 0), "join (stream wait)");
}

void CudaBackend::Release(void* stream) {
  Check(cudaEventRecord(release_, stream_), "release (event record)");
  Check(cudaStreamWaitEvent(static_cast<cudaStream_t>(stream), release_, 0), "release (stream wait)");
}

absl::Status CudaBackend::Sync(const char* what) {
  const cudaError_t e = cudaStreamSynchronize(stream_);
  if (!pending_.empty()) return DeviceError(absl::StrCat(what, ": ", pending_));
  if (e != cudaSuccess) return DeviceError(CudaMessage(e, what));
  return absl::OkStatus();
}

absl::Status CudaBackend::ValidatePointer(int64_t param, const void* p, const char* which) const {
  if (p == nullptr) return absl::OkStatus();
  cudaPointerAttributes attr{};
  const cudaError_t e = cudaPointerGetAttributes(&attr, p);
  if (e != cudaSuccess) cudaGetLastError();
  const std::string& name = cfg_.params[param].name;
  if (e != cudaSuccess || (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "param '", name, "': its ", which, " pointer is host memory; with device=cuda:", device_,
        " every parameter and gradient must be device memory on cuda:", device_));
  }
  if (attr.type == cudaMemoryTypeDevice && attr.device != device_) {
    return absl::InvalidArgumentError(absl::StrCat("param '", name, "': its ", which,
                                                   " is on cuda:", attr.device,
                                                   ", the optimizer runs on cuda:", device_));
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::BindParams(int64_t first, absl::Span<const ParamPointers> ptrs) {
  // Only what changed is checked (a pointer query per param per step would cost host time).
  for (size_t k = 0; k < ptrs.size(); ++k) {
    const int64_t i = first + static_cast<int64_t>(k);
    const ParamPointers& now = ptrs[k];
    const ParamPointers& was = ptrs_[i];
    if (now.param != was.param) {
      if (now.param == nullptr)
        return absl::InvalidArgumentError(
            absl::StrCat("param '", cfg_.params[i].name, "' has no parameter pointer"));
      if (absl::Status s = ValidatePointer(i, now.param, "parameter"); !s.ok()) return s;
    }
    if (now.grad != was.grad) {
      if (absl::Status s = ValidatePointer(i, now.grad, "gradient"); !s.ok()) return s;
    }
  }
  for (size_t k = 0; k < ptrs.size(); ++k) {
    ParamPointers& was = ptrs_[first + static_cast<int64_t>(k)];
    if (was.param != ptrs[k].param || was.grad != ptrs[k].grad) ptrs_dirty_ = true;
    was = ptrs[k];
  }
  return absl::OkStatus();
}

void CudaBackend::Upload(void* dst, const void* src, size_t bytes) {
  const int k = ring_next_;
  ring_next_ = (ring_next_ + 1) % kUploadRing;
  // The slot's previous copy was queued kUploadRing uploads ago: normally long done.
  Check(cudaEventSynchronize(ring_events_[k]), "upload ring wait");
  char* slot = ring_ + static_cast<size_t>(k) * ring_slot_;
  std::memcpy(slot, src, bytes);
  Check(cudaMemcpyAsync(dst, slot, bytes, cudaMemcpyHostToDevice, stream_), "upload");
  Check(cudaEventRecord(ring_events_[k], stream_), "upload event");
}

void CudaBackend::UploadPointers() {
  if (!ptrs_dirty_) return;
  std::vector<DevPointers> p(ptrs_.size());
  for (size_t i = 0; i < ptrs_.size(); ++i) p[i] = {ptrs_[i].param, ptrs_[i].grad};
  Upload(ptrs_dev_, p.data(), p.size() * sizeof(DevPointers));
  ptrs_dirty_ = false;
}

absl::Status CudaBackend::LayOut(ArenaLayout* arena) {
  const size_t S = cfg_.slots.size(), P = cfg_.params.size();
  master_off_.assign(S, 0);
  // State and the step's sums, per slot.
  for (size_t k = 0; k < S; ++k) {
    const SlotDesc& sd = cfg_.slots[k];
    const ParamDesc& p = cfg_.params[sd.param];
    const UpdateRule& r = p.rule;
    DevSlot& s = slots_[k];
    const int64_t numel = sd.rows * p.n;
    if (!s.aliases) master_off_[k] = arena->Take(&s.master, numel, false);
    arena->Take(&s.state0, numel, false);
    if (r.base != Base::kMuon) arena->Take(&s.state1, numel, false);
    if (sd.holds) {
      if (HasRowGains(r.gains)) {
        arena->Take(&s.row_raw, sd.rows, false);
        arena->Take(&s.row_m, sd.rows, false);
        arena->Take(&s.row_v, sd.rows, false);
      }
      if (HasColGains(r.gains)) {
        arena->Take(&s.col_raw, p.n, false);
        arena->Take(&s.col_m, p.n, false);
        arena->Take(&s.col_v, p.n, false);
      }
      if (HasScalarGain(r.gains)) {
        arena->Take(&s.scalar_raw, 1, false);
        arena->Take(&s.scalar_m, 1, false);
        arena->Take(&s.scalar_v, 1, false);
      }
    }
    const int64_t slices =
        !sd.holds ? 0 : r.sphere == Sphere::kRow ? sd.rows : SphereSlices(r.sphere, sd.m, p.n);
    arena->Take(&s.radius, slices, false);
    arena->Take(&s.row_grad, HasRowGains(r.gains) ? sd.rows : 0, true);
    arena->Take(&s.col_grad, HasColGains(r.gains) ? p.n : 0, true);
    arena->Take(&s.scalar_grad, 1, true);
    arena->Take(&s.slice_sq, std::max<int64_t>(slices, 1), true);
    const bool tangent = r.tangent && r.sphere != Sphere::kNone;
    arena->Take(&s.radial_dot, tangent ? slices : 0, true);
    arena->Take(&s.radial_dd, tangent ? slices : 0, true);
    arena->Take(&s.check, 1, true);
  }
  // Every slot's counters in one array: a query reads them all with one copy.
  arena->Take(&counters_, 3 * static_cast<int64_t>(S), true);
  // The bucket pool, the gradient buffers, the records.
  const PoolNeeds need = MaxBucketNeeds(cfg_);
  const int64_t grad_bytes = cfg_.grad_comm_bf16 ? 2 : 4;
  pool_.assign(static_cast<size_t>(std::max(cfg_.pipeline, 1)), PoolEntry{});
  for (PoolEntry& pe : pool_) {
    arena->Take(&pe.x_local, need.x_local, true);
    arena->Take(&pe.x_full, need.full, true);
    if (cfg_.ns_comm_bf16 && cfg_.sharded) {
      arena->Take(&pe.x_local16, need.x_local, true);
      arena->Take(&pe.x_full16, need.full, true);
    }
    arena->Take(&pe.cross, need.cross, true);
    arena->Take(&pe.radial, need.radial, true);
    arena->Take(reinterpret_cast<char**>(&pe.weights), need.weight_bytes, true);
    if (cfg_.update_norms) arena->Take(&pe.wold, need.seg, true);
  }
  if (cfg_.grads_segmented) {
    for (size_t b = 0; b < cfg_.buckets.size(); ++b)
      arena->Take(reinterpret_cast<char**>(&buckets_[b].grad_seg), cfg_.buckets[b].seg * grad_bytes, true);
    grad_send_.assign(std::min<size_t>(cfg_.buckets.size(), 2), nullptr);
    for (void*& g : grad_send_) arena->Take(reinterpret_cast<char**>(&g), need.send * grad_bytes, true);
  }
  arena->Take(&check_, std::max<int64_t>(cfg_.check_len, 1), true);
  // Scratch of the tile partials: the largest bucket's need (launches are stream-ordered,
  // so every bucket reuses it).
  int64_t row_part = 1, col_part = 1, tile_part = 1;
  for (const BucketDev& bd : buckets_) {
    int64_t rp = 0, cp = 0, tp = 0;
    for (int32_t k : bd.slot_list_host) {
      const DevSlot& s = slots_[k];
      rp += s.rows * s.col_tiles;
      cp += static_cast<int64_t>(s.row_tiles) * s.n;
      tp += static_cast<int64_t>(s.row_tiles) * s.col_tiles;
    }
    row_part = std::max(row_part, rp);
    col_part = std::max(col_part, cp);
    tile_part = std::max(tile_part, tp);
  }
  tables_.row_part_stride = row_part;
  tables_.col_part_stride = col_part;
  tables_.tile_part_stride = tile_part;
  arena->Take(&tables_.row_part, row_part * cuda::kRowChannels, true);
  arena->Take(&tables_.col_part, col_part * cuda::kColChannels, true);
  arena->Take(&tables_.tile_part, tile_part * cuda::kTileChannels, true);
  // Newton-Schulz: one workspace for the largest batch of any shape (runs are stream-ordered).
  for (const BucketDev& bd : buckets_)
    for (const NsRun& run : bd.ns)
      ns_workspace_bytes_ = std::max(ns_workspace_bytes_, cuda::NewtonSchulzRunner::WorkspaceBytes(
                                                              run.batch, run.m, run.n, cfg_.ns_form, cfg_.ns_bf16));
  arena->Take(reinterpret_cast<char**>(&ns_workspace_), ns_workspace_bytes_, true);
  // The kernels' tables.
  arena->Take(&params_dev_, static_cast<int64_t>(P), true);
  arena->Take(&slots_dev_, static_cast<int64_t>(S), true);
  arena->Take(&ptrs_dev_, static_cast<int64_t>(P), true);
  arena->Take(&groups_dev_, std::max(cfg_.groups, 1), true);
  arena->Take(&status_dev_, 1, true);
  arena->Take(&tables_.param_skip, static_cast<int64_t>(P), true);
  arena->Take(&tables_.param_t, static_cast<int64_t>(P), false);  // state: zeroed with it
  for (size_t b = 0; b < buckets_.size(); ++b) {
    BucketDev& bd = buckets_[b];
    arena->Take(&bd.tiles, static_cast<int64_t>(bd.tiles_host.size()), true);
    arena->Take(&bd.slot_list, static_cast<int64_t>(bd.slot_list_host.size()), true);
    arena->Take(&bd.check_entries, static_cast<int64_t>(bd.checks.entries.size()), true);
    arena->Take(&bd.check_slots, static_cast<int64_t>(bd.checks.slots.size()), true);
    for (ChunkList* l : {&bd.own_to_full, &bd.full_to_own, &bd.local_remote, &bd.full_remote})
      arena->Take(&l->dev, static_cast<int64_t>(l->host.size()), true);
    // The windows' copy tables: one entry per span and one per owned part, whatever the
    // rank count (a strided span covers every rank's row block).
    for (size_t c = 0; c < bd.windows.size(); ++c) {
      WindowDev& w = bd.windows[c];
      arena->Take(&w.owned, static_cast<int64_t>(cfg_.buckets[b].chunks[c].map.owned.size()), true);
      for (SpanTable* t : {&w.grad_pack, &w.weight_pack, &w.weight_unpack})
        arena->Take(&t->dev, static_cast<int64_t>(t->host.size()), true);
    }
  }
  return absl::OkStatus();
}

// Tiles, slot lists, copy lists and Newton-Schulz runs of bucket b (host side).
void CudaBackend::BuildBucket(int b) {
  const BucketDesc& bd = cfg_.buckets[b];
  BucketDev& dev = buckets_[b];
  const size_t Q = bd.slots.size();
  int64_t rp = 0, cp = 0, tp = 0;
  for (ChunkList* l : {&dev.own_to_full, &dev.full_to_own}) l->start.assign(1, 0);
  dev.tile_start.assign(1, 0);
  for (size_t q = 0; q < Q; ++q) {
    const int k = bd.slots[q];
    const SlotDesc& sd = cfg_.slots[k];
    const ParamDesc& p = cfg_.params[sd.param];
    DevSlot& s = slots_[k];
    dev.slot_list_host.push_back(k);
    const int64_t longest = std::max(sd.rows, p.n);
    dev.combine_spread = static_cast<int32_t>(std::min<int64_t>(
        std::max<int64_t>(dev.combine_spread, (longest + cuda::kTileCols - 1) / cuda::kTileCols), 65535));
    dev.any_tangent = dev.any_tangent || (p.rule.tangent && p.rule.sphere != Sphere::kNone);
    s.row_tiles = static_cast<int32_t>((sd.rows + cuda::kTileRows - 1) / cuda::kTileRows);
    s.col_tiles = sd.rows > 0 ? static_cast<int32_t>((p.n + cuda::kTileCols - 1) / cuda::kTileCols) : 0;
    s.row_part = rp;
    s.col_part = cp;
    s.tile_part = tp;
    for (int32_t rt = 0; rt < s.row_tiles; ++rt)
      for (int32_t ct = 0; ct < s.col_tiles; ++ct)
        dev.tiles_host.push_back({k, rt, ct, rt * s.col_tiles + ct});
    rp += sd.rows * s.col_tiles;
    cp += static_cast<int64_t>(s.row_tiles) * p.n;
    tp += static_cast<int64_t>(s.row_tiles) * s.col_tiles;
    dev.tile_start.push_back(static_cast<int64_t>(dev.tiles_host.size()));
    // The NS owner's own block of a gathered matrix: X into the whole buffer, O back.
    if (sd.ns_gathered && sd.rows > 0) {
      const int64_t full_at = sd.full_offset + sd.row_begin * p.n;
      AddChunks(&dev.own_to_full, -1, false, sd.seg_offset, -1, full_at, sd.rows * p.n, 0);
      AddChunks(&dev.full_to_own, -1, false, full_at, -1, sd.seg_offset, sd.rows * p.n, 0);
    }
    dev.own_to_full.start.push_back(static_cast<int64_t>(dev.own_to_full.host.size()));
    dev.full_to_own.start.push_back(static_cast<int64_t>(dev.full_to_own.host.size()));
  }
  auto whole = [](ChunkList* l) { l->start = {0, static_cast<int64_t>(l->host.size())}; };
  for (const CommChunk& ch : bd.chunks) {
    WindowDev w;
    w.grad_pack = cuda::BuildSpanTable(ch.grad_pack, cfg_.params, /*to_buffer=*/true, /*grads=*/true);
    w.weight_pack = cuda::BuildSpanTable(ch.weight_pack, cfg_.params, true, false);
    w.weight_unpack = cuda::BuildSpanTable(ch.weight_unpack, cfg_.params, false, false);
    dev.windows.push_back(std::move(w));
  }
  dev.checks = cuda::BuildParamChecks(bd, cfg_.slots, first_slot_);
  if (cfg_.ns_comm_bf16 && cfg_.sharded) {
    for (const ElementRange& e : bd.local_remote)
      AddChunks(&dev.local_remote, -1, false, e.offset, -1, e.offset, e.count, 0);
    for (const ElementRange& e : bd.full_remote)
      AddChunks(&dev.full_remote, -1, false, e.offset, -1, e.offset, e.count, 0);
  }
  for (ChunkList* l : {&dev.local_remote, &dev.full_remote}) whole(l);
  // Newton-Schulz runs: the matrices this rank orthogonalises, same-shape neighbours held
  // whole one after another in x_local batched into one call (an expert stack).
  for (size_t q = 0; q < Q;) {
    const SlotDesc& sd = cfg_.slots[bd.slots[q]];
    if (!sd.muon || !sd.ns_here) {
      ++q;
      continue;
    }
    const ParamDesc& p = cfg_.params[sd.param];
    NsRun run;
    run.q = q;
    run.m = sd.m;
    run.n = p.n;
    run.set = p.rule.ns_coeffs;
    run.steps = p.rule.ns_steps;
    run.full = sd.ns_gathered;
    run.offset = sd.ns_gathered ? sd.full_offset : sd.seg_offset;
    size_t j = q + 1;
    if (!sd.ns_gathered) {
      for (; j < Q; ++j) {
        const SlotDesc& sj = cfg_.slots[bd.slots[j]];
        if (!sj.ns_here && sj.rows == 0) continue;  // held elsewhere: nothing of it here
        const ParamDesc& pj = cfg_.params[sj.param];
        const bool same = sj.muon && sj.ns_here && !sj.ns_gathered && sj.m == sd.m && pj.n == p.n &&
                          pj.rule.ns_coeffs == p.rule.ns_coeffs &&
                          pj.rule.ns_steps == p.rule.ns_steps &&
                          sj.seg_offset == sd.seg_offset + run.batch * sd.m * p.n;
        if (!same) break;
        ++run.batch;
      }
    }
    run.q_end = j;
    dev.ns.push_back(run);
    q = j;
  }
}

absl::Status CudaBackend::Setup(BackendConfig config, absl::Span<const ParamPointers> ptrs) {
  cfg_ = std::move(config);
  if (cudaSetDevice(device_) != cudaSuccess) {
    cudaGetLastError();
    return absl::FailedPreconditionError(absl::StrCat("device=cuda:", device_, ": no such device"));
  }
  const size_t S = cfg_.slots.size(), P = cfg_.params.size(), B = cfg_.buckets.size();
  ptrs_.assign(P, ParamPointers{});
  // Every model pointer is checked before anything is allocated.
  for (size_t i = 0; i < P; ++i) {
    if (ptrs[i].param == nullptr)
      return absl::InvalidArgumentError(absl::StrCat("param '", cfg_.params[i].name, "' has no parameter pointer"));
    if (absl::Status s = ValidatePointer(static_cast<int64_t>(i), ptrs[i].param, "parameter"); !s.ok()) return s;
    if (absl::Status s = ValidatePointer(static_cast<int64_t>(i), ptrs[i].grad, "gradient"); !s.ok()) return s;
  }
  if (absl::Status s = [&]() -> absl::Status {
        if (cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking) != cudaSuccess ||
            cudaEventCreateWithFlags(&join_, cudaEventDisableTiming) != cudaSuccess ||
            cudaEventCreateWithFlags(&release_, cudaEventDisableTiming) != cudaSuccess)
          return DeviceError(CudaMessage(cudaGetLastError(), "creating the backend's stream"));
        for (cudaEvent_t& e : ring_events_)
          if (cudaEventCreateWithFlags(&e, cudaEventDisableTiming) != cudaSuccess)
            return DeviceError(CudaMessage(cudaGetLastError(), "creating upload events"));
        return absl::OkStatus();
      }();
      !s.ok())
    return s;
  if (cuda::DeviceStatus st = cuda::NewtonSchulzRunner::Create(&ns_); !st.ok())
    return DeviceError(st.message());

  // Host tables.
  params_.assign(P, DevParam{});
  first_slot_.assign(P, 0);
  for (size_t i = 0; i < P; ++i) {
    const ParamDesc& p = cfg_.params[i];
    const UpdateRule& r = p.rule;
    DevParam& d = params_[i];
    d.group = p.group;
    d.muon = r.base == Base::kMuon;
    d.sphere = static_cast<uint8_t>(r.sphere);
    d.gains = static_cast<uint8_t>(r.gains);
    d.gain_param = static_cast<uint8_t>(r.gain_param);
    d.nesterov = r.nesterov;
    d.tangent = r.tangent;
    d.param_bf16 = p.param_dtype == Dtype::kBf16;
    d.grad_bf16 = p.grad_dtype == Dtype::kBf16;
    d.preserve_init = p.preserve_init;
    d.momentum = static_cast<float>(r.momentum);
    d.beta1 = r.beta1;
    d.beta2 = r.beta2;
    d.eps = r.eps;
    d.weight_decay = r.weight_decay;
  }
  for (size_t k = S; k-- > 0;) first_slot_[cfg_.slots[k].param] = static_cast<int64_t>(k);
  slots_.assign(S, DevSlot{});
  for (size_t k = 0; k < S; ++k) {
    const SlotDesc& sd = cfg_.slots[k];
    const ParamDesc& p = cfg_.params[sd.param];
    DevSlot& s = slots_[k];
    s.param = static_cast<int32_t>(sd.param);
    s.holds = sd.holds;
    s.muon = sd.muon;
    s.direct = p.rule.sphere == Sphere::kNone && p.rule.gains == Gains::kNone;
    // f32 weights serve as their own master copy, unless blocks=groups:G interleaves the
    // blocks' rows in the tensor: the master is then kept in block order, as bf16 ones are,
    // and every access of the model's tensors goes through the row map.
    s.mapped = !p.row_map.identity();
    s.aliases = p.param_dtype == Dtype::kF32 && !s.mapped;
    s.m = sd.m;
    s.muon_scale = MuonScaleFactor(p.rule.muon_scale, sd.m, p.n);
    s.n = p.n;
    s.rows = sd.rows;
    s.model_off = sd.tensor_offset + sd.row_begin * p.n;
    s.map_row0 = sd.tensor_offset / p.n + sd.row_begin;
    s.cross_slot = sd.cross;
    s.gain_block = sd.gain_block;
    s.gain_blocks = sd.gain_blocks;
  }
  buckets_.assign(B, BucketDev{});
  for (size_t b = 0; b < B; ++b) BuildBucket(static_cast<int>(b));

  ArenaLayout arena;
  if (absl::Status s = LayOut(&arena); !s.ok()) return s;
  // Master copies <-> the model rows, as copies between the arena (offsets in floats from its
  // base) and the model tensors: bf16 params', and those of mapped f32 params (their own
  // lists: a copy launch has one dtype per side). A mapped param's rows go as one chunk per
  // run of rows consecutive in its tensor (row_map.h).
  for (size_t k = 0; k < S; ++k) {
    const DevSlot& s = slots_[k];
    if (s.aliases || s.rows == 0) continue;
    const int64_t at = static_cast<int64_t>(master_off_[k] / 4);
    const bool f32 = cfg_.params[s.param].param_dtype == Dtype::kF32;
    ChunkList* to_master = f32 ? &to_master32_ : &to_master_;
    ChunkList* to_model = f32 ? &to_model32_ : &to_model_;
    ForEachTensorRun(cfg_.params[s.param].row_map, s.n, s.model_off, s.rows * s.n,
                     [&](int64_t tensor, int64_t rel, int64_t len) {
                       AddChunks(to_master, s.param, false, tensor, -1, at + rel, len, 0);
                       AddChunks(to_model, -1, false, at + rel, s.param, tensor, len, 0);
                     });
  }
  arena.Take(&row_maps_dev_, static_cast<int64_t>(P), true);
  for (ChunkList* l : {&to_master_, &to_model_, &to_master32_, &to_model32_}) {
    l->start = {0, static_cast<int64_t>(l->host.size())};
    arena.Take(&l->dev, static_cast<int64_t>(l->host.size()), true);
  }
  arena_bytes_ = arena.bytes();
  workspace_bytes_ = arena.workspace_bytes();
  if (cudaMalloc(reinterpret_cast<void**>(&arena_), std::max<size_t>(arena_bytes_, 256)) != cudaSuccess) {
    const cudaError_t e = cudaGetLastError();
    arena_ = nullptr;
    size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    return absl::ResourceExhaustedError(absl::StrCat(
        "out of memory on cuda:", device_, ": the optimizer's arena needs ", arena_bytes_,
        " bytes (state ", arena.state_bytes(), ", workspace ", arena.workspace_bytes(), "); ",
        free_b, " of ", total_b, " bytes are free (", cudaGetErrorName(e), ")"));
  }
  arena.Commit(arena_);
  // Pinned host memory: the upload ring (the larger of the pointer and group tables), the
  // state staging, the outcome.
  ring_slot_ = (std::max(P * sizeof(DevPointers), static_cast<size_t>(std::max(cfg_.groups, 1)) * sizeof(DevGroup)) + 255) & ~size_t{255};
  if (cudaMallocHost(reinterpret_cast<void**>(&ring_), ring_slot_ * kUploadRing) != cudaSuccess ||
      cudaMallocHost(reinterpret_cast<void**>(&staging_), kStagingBytes) != cudaSuccess ||
      cudaMallocHost(reinterpret_cast<void**>(&status_host_), sizeof(DevStatus)) != cudaSuccess) {
    cudaGetLastError();
    return absl::ResourceExhaustedError("out of memory: no pinned host memory for the CUDA backend's staging");
  }

  // Pointers of the bucket buffers in the slots, now that the arena exists.
  for (size_t k = 0; k < S; ++k) {
    const SlotDesc& sd = cfg_.slots[k];
    DevSlot& s = slots_[k];
    s.counters = counters_ + 3 * k;
    PoolEntry& pe = Pool(sd.bucket);
    if (sd.muon && pe.x_local != nullptr) s.x = pe.x_local + sd.seg_offset;
    if (pe.wold != nullptr) s.wold = pe.wold + sd.seg_offset;
    if (sd.cross) {
      s.cross = pe.cross + sd.cross_offset;
      if (pe.radial != nullptr) s.radial = pe.radial + sd.radial_offset;
    }
    if (cfg_.grads_segmented) {
      s.seg_grad = static_cast<char*>(buckets_[sd.bucket].grad_seg) +
                   sd.seg_offset * static_cast<int64_t>(cfg_.grad_comm_bf16 ? 2 : 4);
      s.seg_grad_bf16 = cfg_.grad_comm_bf16;
    }
  }
  tables_.params = params_dev_;
  tables_.ptrs = ptrs_dev_;
  tables_.groups = groups_dev_;
  tables_.slots = slots_dev_;
  tables_.status = status_dev_;
  tables_.row_maps = row_maps_dev_;

  // Everything zero (moments, sums, status), then the tables, then the state's initial values.
  auto fail = [&](cudaError_t e, const char* what) { return DeviceError(CudaMessage(e, what)); };
  if (cudaError_t e = cudaMemsetAsync(arena_, 0, arena_bytes_, stream_); e != cudaSuccess)
    return fail(e, "clearing the arena");
  auto put = [&](void* dst, const void* src, size_t bytes) {
    return bytes == 0 ? cudaSuccess : cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_);
  };
  cudaError_t e = put(params_dev_, params_.data(), P * sizeof(DevParam));
  if (e == cudaSuccess) e = put(slots_dev_, slots_.data(), S * sizeof(DevSlot));
  for (size_t b = 0; b < B; ++b) {
    BucketDev& bd = buckets_[b];
    if (e == cudaSuccess) e = put(bd.tiles, bd.tiles_host.data(), bd.tiles_host.size() * sizeof(DevTile));
    if (e == cudaSuccess)
      e = put(bd.slot_list, bd.slot_list_host.data(), bd.slot_list_host.size() * sizeof(int32_t));
    if (e == cudaSuccess)
      e = put(bd.check_entries, bd.checks.entries.data(), bd.checks.entries.size() * sizeof(DevParamCheck));
    if (e == cudaSuccess)
      e = put(bd.check_slots, bd.checks.slots.data(), bd.checks.slots.size() * sizeof(int32_t));
    for (ChunkList* l : {&bd.own_to_full, &bd.full_to_own, &bd.local_remote, &bd.full_remote})
      if (e == cudaSuccess) e = put(l->dev, l->host.data(), l->host.size() * sizeof(CopyChunk));
    for (size_t c = 0; c < bd.windows.size(); ++c) {
      WindowDev& w = bd.windows[c];
      const std::vector<OwnedPart>& owned = cfg_.buckets[b].chunks[c].map.owned;
      if (e == cudaSuccess) e = put(w.owned, owned.data(), owned.size() * sizeof(OwnedPart));
      for (SpanTable* t : {&w.grad_pack, &w.weight_pack, &w.weight_unpack})
        if (e == cudaSuccess) e = put(t->dev, t->host.data(), t->host.size() * sizeof(DevCopySpan));
    }
  }
  for (ChunkList* l : {&to_master_, &to_model_, &to_master32_, &to_model32_})
    if (e == cudaSuccess) e = put(l->dev, l->host.data(), l->host.size() * sizeof(CopyChunk));
  {
    std::vector<RowMap> maps(P);
    for (size_t i = 0; i < P; ++i) maps[i] = cfg_.params[i].row_map;
    if (e == cudaSuccess) e = put(row_maps_dev_, maps.data(), P * sizeof(RowMap));
  }
  if (e != cudaSuccess) return fail(e, "uploading the kernels' tables");
  if (cuda::DeviceStatus st = [&]() -> cuda::DeviceStatus {
        for (const BucketDev& bd : buckets_)
          for (const NsRun& run : bd.ns)
            if (cuda::DeviceStatus x = ns_->Prepare(run.batch, run.m, run.n, cfg_.ns_form, cfg_.ns_bf16); !x.ok())
              return x;
        return {};
      }();
      !st.ok())
    return DeviceError(st.message());
  for (size_t i = 0; i < P; ++i) ptrs_[i] = ptrs[i];
  ptrs_dirty_ = true;
  UploadPointers();
  // Master weights of bf16 params from the model; every raw gain at the value whose gain is 1.
  for (size_t k = 0; k < S; ++k) {
    const DevSlot& s = slots_[k];
    const float one = static_cast<float>(GainRawForOne(cfg_.params[s.param].rule.gain_param));
    if (s.row_raw) Check(cuda::LaunchFill(s.row_raw, s.rows, one, stream_), "gain init");
    if (s.col_raw) Check(cuda::LaunchFill(s.col_raw, s.n, one, stream_), "gain init");
    if (s.scalar_raw) Check(cuda::LaunchFill(s.scalar_raw, 1, one, stream_), "gain init");
  }
  CopyAll(to_master_, nullptr, true, arena_, false, "master weights");
  CopyAll(to_master32_, nullptr, false, arena_, false, "master weights (block order)");
  return Sync("initialising the CUDA backend's state");
}

BucketBuffers CudaBackend::Buffers(int b) {
  PoolEntry& pe = Pool(b);
  BucketBuffers out;
  if (cfg_.grads_segmented) {
    out.grad_send = grad_send_[static_cast<size_t>(b) % grad_send_.size()];
    out.grad_seg = buckets_[b].grad_seg;
  }
  out.x_local = pe.x_local;
  out.x_local16 = pe.x_local16;
  out.x_full = pe.x_full;
  out.x_full16 = pe.x_full16;
  out.cross = pe.cross;
  out.radial = pe.radial;
  out.weights = pe.weights;
  return out;
}

void CudaBackend::Tiles(TilePass pass, const SlotRange& r, bool init) {
  const BucketDev& bd = buckets_[r.bucket];
  const int64_t t0 = bd.tile_start[r.q0], t1 = bd.tile_start[r.q1];
  UploadPointers();
  Check(cuda::LaunchTiles(pass, tables_, bd.tiles + t0, t1 - t0, init, stream_), "tile pass");
}

void CudaBackend::Combine(TilePass pass, const SlotRange& r, bool init) {
  const BucketDev& bd = buckets_[r.bucket];
  Check(cuda::LaunchCombine(pass, tables_, bd.slot_list + r.q0, static_cast<int32_t>(r.q1 - r.q0),
                            bd.combine_spread, init, stream_),
        "combine");
}

void CudaBackend::Copy(const ChunkList& list, size_t q0, size_t q1, const void* src_base,
                       bool src_bf16, void* dst_base, bool dst_bf16, const char* what) {
  if (list.host.empty()) return;
  const int64_t c0 = list.start[q0], c1 = list.start[q1];
  UploadPointers();
  Check(cuda::LaunchCopy(list.dev + c0, c1 - c0, ptrs_dev_, src_base, src_bf16, dst_base, dst_bf16,
                         stream_),
        what);
}

void CudaBackend::InitNorms(int b) {
  Tiles(TilePass::kSliceSquares, Whole(b), true);
  Combine(TilePass::kSliceSquares, Whole(b), true);
}

bool CudaBackend::InitRadii(int b, BadSlice* bad) {
  if (!Sync("InitRadii").ok()) {
    bad->slot = cfg_.buckets[b].slots.empty() ? -1 : cfg_.buckets[b].slots[0];
    return false;
  }
  for (int k : cfg_.buckets[b].slots) {
    const SlotDesc& sd = cfg_.slots[k];
    const ParamDesc& p = cfg_.params[sd.param];
    const UpdateRule& r = p.rule;
    if (r.sphere == Sphere::kNone || !sd.holds) continue;
    const int64_t slices = r.sphere == Sphere::kRow ? sd.rows : SphereSlices(r.sphere, sd.m, p.n);
    if (slices == 0) continue;
    std::vector<double> sq(static_cast<size_t>(slices));
    std::vector<float> radius(static_cast<size_t>(slices));
    cudaMemcpy(sq.data(), slots_[k].slice_sq, sq.size() * sizeof(double), cudaMemcpyDeviceToHost);
    for (int64_t q = 0; q < slices; ++q) {
      if (!(sq[q] > 0.0) || !std::isfinite(sq[q])) {
        bad->slot = k;
        bad->slice = r.sphere == Sphere::kRow ? sd.row_begin + q : q;
        return false;
      }
      radius[q] = static_cast<float>(SliceRadius(r, sd.m, p.n, std::sqrt(sq[q])));
    }
    cudaMemcpy(slots_[k].radius, radius.data(), radius.size() * sizeof(float), cudaMemcpyHostToDevice);
    // preserve_init: each slice's ||W_q|| / R_q into the gains PreserveInitTarget names (every
    // entry for a frobenius sphere, entry q for a row or column sphere); W is not touched.
    const AbsorbInto into = p.preserve_init ? PreserveInitTarget(r.sphere, r.gains) : AbsorbInto::kNone;
    if (into != AbsorbInto::kNone) {
      const int64_t count = into == AbsorbInto::kRow ? sd.rows : into == AbsorbInto::kCol ? p.n : 1;
      float* dst = into == AbsorbInto::kRow   ? slots_[k].row_raw
                   : into == AbsorbInto::kCol ? slots_[k].col_raw
                                              : slots_[k].scalar_raw;
      std::vector<float> raw(static_cast<size_t>(count));
      for (int64_t e = 0; e < count; ++e) {
        const int64_t q = r.sphere == Sphere::kFrobenius ? 0 : e;
        raw[e] = static_cast<float>(GainRawFor(r.gain_param, std::sqrt(sq[q]) / radius[q]));
      }
      cudaMemcpy(dst, raw.data(), raw.size() * sizeof(float), cudaMemcpyHostToDevice);
    }
  }
  return true;
}

void CudaBackend::InitProject(int b) { Tiles(TilePass::kRescale, Whole(b), true); }

void CudaBackend::BeginStep(absl::Span<const GroupScalars> groups) {
  ++steps_begun_;
  std::vector<DevGroup> g(static_cast<size_t>(std::max(cfg_.groups, 1)));
  for (size_t k = 0; k < groups.size() && k < g.size(); ++k) g[k] = {groups[k].lr, groups[k].gain_lr};
  Upload(groups_dev_, g.data(), g.size() * sizeof(DevGroup));
  if (params_dirty_) {
    // From pageable memory: the host copy is taken before the call returns, and the
    // device copy is ordered on the stream before this step's kernels.
    Check(cudaMemcpyAsync(params_dev_, params_.data(), params_.size() * sizeof(DevParam),
                          cudaMemcpyHostToDevice, stream_), "uploading changed hyperparameters");
    params_dirty_ = false;
  }
  Check(cuda::LaunchBeginStep(tables_, stream_), "BeginStep");
}

void CudaBackend::CopySpans(int b, int chunk, const SpanTable WindowDev::*table, bool grads,
                            void* buffer, bool buffer_bf16, bool to_buffer, const char* what) {
  const WindowDev& w = buckets_[b].windows[static_cast<size_t>(chunk)];
  const SpanTable& t = w.*table;
  if (t.host.empty()) return;
  const SegmentMap& map = cfg_.buckets[b].chunks[static_cast<size_t>(chunk)].map;
  const SegmentView view{map.rows, map.equal, w.owned, static_cast<int32_t>(map.owned.size())};
  UploadPointers();
  Check(cuda::LaunchSpanCopy(t.dev, static_cast<int32_t>(t.host.size()), t.blocks, view, ptrs_dev_,
                             row_maps_dev_, grads, buffer, buffer_bf16, to_buffer, stream_),
        what);
}

void CudaBackend::PackGrads(int b, int chunk) {
  CopySpans(b, chunk, &WindowDev::grad_pack, /*grads=*/true, Buffers(b).grad_send,
            cfg_.grad_comm_bf16, /*to_buffer=*/true, "PackGrads");
}

void CudaBackend::CheckFinite(int b) {
  const BucketDev& bd = buckets_[b];
  Tiles(TilePass::kCheck, Whole(b));
  Combine(TilePass::kCheck, Whole(b));
  Check(cuda::LaunchParamCheck(tables_, bd.check_entries, static_cast<int32_t>(bd.checks.entries.size()),
                               bd.check_slots, check_, static_cast<int64_t>(cfg_.params.size()), stream_),
        "CheckFinite");
}

void CudaBackend::ApplyCheck() {
  Check(cuda::LaunchApplyCheck(tables_, check_, static_cast<int64_t>(cfg_.params.size()),
                               cfg_.grads_agree, stream_),
        "ApplyCheck");
}

void CudaBackend::Prepare(const SlotRange& r) {
  if (cfg_.update_norms) Tiles(TilePass::kWold, r);
  if (!buckets_[r.bucket].any_tangent) return;
  Tiles(TilePass::kRadial, r);
  Combine(TilePass::kRadial, r);
  const BucketDev& bd = buckets_[r.bucket];
  Check(cuda::LaunchRecord(tables_, bd.slot_list + r.q0, static_cast<int32_t>(r.q1 - r.q0), true, true,
                           stream_),
        "radial record");
}

void CudaBackend::ApplyRadial(int b) {
  const BucketDev& bd = buckets_[b];
  Check(cuda::LaunchRecord(tables_, bd.slot_list, static_cast<int32_t>(bd.slot_list_host.size()), true,
                           false, stream_),
        "radial record");
}

void CudaBackend::Pass1(const SlotRange& r) {
  Tiles(TilePass::kPass1, r);
  Combine(TilePass::kPass1, r);
  const BucketDev& bd = buckets_[r.bucket];
  PoolEntry& pe = Pool(r.bucket);
  Copy(bd.own_to_full, r.q0, r.q1, pe.x_local, false, pe.x_full, false, "X to the NS owner's buffer");
  CopyAll(bd.local_remote, pe.x_local, false, pe.x_local16, true, "X to bf16");
}

void CudaBackend::NewtonSchulz(const SlotRange& r) {
  const BucketDev& bd = buckets_[r.bucket];
  PoolEntry& pe = Pool(r.bucket);
  CopyAll(bd.full_remote, pe.x_full16, true, pe.x_full, false, "X from bf16");
  for (const NsRun& run : bd.ns) {
    if (run.q < r.q0 || run.q >= r.q1) continue;
    float* x = (run.full ? pe.x_full : pe.x_local) + run.offset;
    const cuda::DeviceStatus st =
        ns_->Run(run.set, run.steps, run.batch, run.m, run.n, x, run.m * run.n, cfg_.ns_form, cfg_.ns_bf16,
                 ns_workspace_, ns_workspace_bytes_, stream_);
    if (!st.ok() && pending_.empty()) pending_ = st.message();
  }
  Copy(bd.full_to_own, r.q0, r.q1, pe.x_full, false, pe.x_local, false, "O back from the owner's buffer");
  CopyAll(bd.full_remote, pe.x_full, false, pe.x_full16, true, "O to bf16");
}

void CudaBackend::Pass2(const SlotRange& r) {
  const BucketDev& bd = buckets_[r.bucket];
  PoolEntry& pe = Pool(r.bucket);
  CopyAll(bd.local_remote, pe.x_local16, true, pe.x_local, false, "O from bf16");
  Tiles(TilePass::kPass2, r);
  Combine(TilePass::kPass2, r);
}

void CudaBackend::AssembleCross(const SlotRange& r) {
  const BucketDev& bd = buckets_[r.bucket];
  Check(cuda::LaunchRecord(tables_, bd.slot_list + r.q0, static_cast<int32_t>(r.q1 - r.q0), false, true,
                           stream_),
        "cross record");
}

void CudaBackend::ApplyCross(const SlotRange& r) {
  const BucketDev& bd = buckets_[r.bucket];
  Check(cuda::LaunchRecord(tables_, bd.slot_list + r.q0, static_cast<int32_t>(r.q1 - r.q0), false, false,
                           stream_),
        "cross record");
}

void CudaBackend::Finish(const SlotRange& r) {
  const BucketDev& bd = buckets_[r.bucket];
  Check(cuda::LaunchGains(tables_, bd.slot_list + r.q0, static_cast<int32_t>(r.q1 - r.q0), stream_),
        "gains");
  Tiles(TilePass::kRescale, r);
  Combine(TilePass::kRescale, r);
}

void CudaBackend::PackWeights(int b, int chunk) {
  CopySpans(b, chunk, &WindowDev::weight_pack, /*grads=*/false, Pool(b).weights,
            cfg_.buckets[b].param_dtype == Dtype::kBf16, /*to_buffer=*/true, "PackWeights");
}

void CudaBackend::UnpackWeights(int b, int chunk) {
  CopySpans(b, chunk, &WindowDev::weight_unpack, /*grads=*/false, Pool(b).weights,
            cfg_.buckets[b].param_dtype == Dtype::kBf16, /*to_buffer=*/false, "UnpackWeights");
}

absl::Status CudaBackend::ReadOutcome(StepOutcome* out) {
  Check(cudaMemcpyAsync(status_host_, status_dev_, sizeof(DevStatus), cudaMemcpyDeviceToHost, stream_),
        "reading the step's outcome");
  if (absl::Status s = Sync("the step on the GPU"); !s.ok()) return s;
  out->skipped = status_host_->skip != 0;
  out->grad_norm = status_host_->grad_norm;
  out->bad_param = status_host_->bad_param;
  out->disagree_param = status_host_->disagree_param;
  out->steps_taken = status_host_->t;
  return absl::OkStatus();
}

std::vector<CudaBackend::Array> CudaBackend::Arrays(int k) const {
  const SlotDesc& sd = cfg_.slots[k];
  const ParamDesc& p = cfg_.params[sd.param];
  const DevSlot& s = slots_[k];
  std::vector<Array> out;
  auto add = [&](const char* name, float* data, int64_t count) {
    if (data != nullptr && count > 0) out.push_back({name, data, count, false});
  };
  const int64_t numel = sd.rows * p.n;
  if (s.aliases) {
    if (sd.rows > 0) out.push_back({"master", static_cast<float*>(ptrs_[sd.param].param) + s.model_off, numel, true});
  } else {
    add("master", s.master, numel);
  }
  const bool muon = p.rule.base == Base::kMuon;
  add(muon ? "momentum" : "exp_avg", s.state0, numel);
  add("exp_avg_sq", s.state1, numel);
  add("row_raw", s.row_raw, sd.rows);
  add("row_exp_avg", s.row_m, sd.rows);
  add("row_exp_avg_sq", s.row_v, sd.rows);
  add("col_raw", s.col_raw, p.n);
  add("col_exp_avg", s.col_m, p.n);
  add("col_exp_avg_sq", s.col_v, p.n);
  add("scalar_raw", s.scalar_raw, 1);
  add("scalar_exp_avg", s.scalar_m, 1);
  add("scalar_exp_avg_sq", s.scalar_v, 1);
  const int64_t slices = !sd.holds ? 0 : p.rule.sphere == Sphere::kRow ? sd.rows : SphereSlices(p.rule.sphere, sd.m, p.n);
  add("radius", s.radius, slices);
  return out;
}

std::vector<StateArray> CudaBackend::State(int k) {
  std::vector<StateArray> out;
  for (const Array& a : Arrays(k)) out.push_back({a.name, a.count, 4, a.is_model});
  return out;
}

absl::Status CudaBackend::ReadState(int k, size_t array, int64_t first, int64_t count, void* host) {
  const std::vector<Array> arrays = Arrays(k);
  if (array >= arrays.size() || first < 0 || count < 0 || first + count > arrays[array].count) {
    return absl::InvalidArgumentError(absl::StrCat("state array ", array, " of slot ", k, ": elements [",
                                                   first, ", ", first + count, ") are out of range"));
  }
  if (absl::Status s = Sync("reading optimizer state"); !s.ok()) return s;
  // Through pinned staging, a piece at a time: the caller's memory need not be pinned.
  const float* src = arrays[array].data + first;
  char* dst = static_cast<char*>(host);
  for (int64_t done = 0; done < count;) {
    const int64_t n = std::min<int64_t>(count - done, kStagingBytes / sizeof(float));
    const cudaError_t e = cudaMemcpy(staging_, src + done, n * sizeof(float), cudaMemcpyDeviceToHost);
    if (e != cudaSuccess) return DeviceError(CudaMessage(e, "reading optimizer state"));
    std::memcpy(dst + done * sizeof(float), staging_, n * sizeof(float));
    done += n;
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::WriteState(int k, size_t array, const void* host) {
  const std::vector<Array> arrays = Arrays(k);
  if (array >= arrays.size())
    return absl::InvalidArgumentError(absl::StrCat("slot ", k, " has no state array ", array));
  if (absl::Status s = Sync("writing optimizer state"); !s.ok()) return s;
  float* dst = arrays[array].data;
  const char* src = static_cast<const char*>(host);
  const int64_t count = arrays[array].count;
  for (int64_t done = 0; done < count;) {
    const int64_t n = std::min<int64_t>(count - done, kStagingBytes / sizeof(float));
    std::memcpy(staging_, src + done * sizeof(float), n * sizeof(float));
    const cudaError_t e = cudaMemcpy(dst + done, staging_, n * sizeof(float), cudaMemcpyHostToDevice);
    if (e != cudaSuccess) return DeviceError(CudaMessage(e, "writing optimizer state"));
    done += n;
  }
  return absl::OkStatus();
}

SlotCounters CudaBackend::Counters(int k) const {
  SlotCounters c;
  // One copy of every slot's counters per step: mdopt_group_info asks for each matrix.
  if (counters_step_ != steps_begun_) {
    counters_host_.assign(3 * cfg_.slots.size(), 0.0);
    if (cudaStreamSynchronize(stream_) != cudaSuccess ||
        cudaMemcpy(counters_host_.data(), counters_, counters_host_.size() * sizeof(double),
                   cudaMemcpyDeviceToHost) != cudaSuccess) {
      cudaGetLastError();
      return c;
    }
    counters_step_ = steps_begun_;
  }
  const double* v = counters_host_.data() + 3 * static_cast<size_t>(k);
  const SlotDesc& sd = cfg_.slots[k];
  const UpdateRule& r = cfg_.params[sd.param].rule;
  // v[0]: 1 after a step that applied the slot, 2 when its param had no gradient.
  const bool applied = v[0] == 1.0;
  c.skipped = v[0] == 2.0 && sd.accounts;
  c.ns_ran = applied && sd.ns_here;
  c.projected = applied && sd.accounts && r.sphere != Sphere::kNone;
  c.gains_stepped = applied && sd.accounts && r.gains != Gains::kNone;
  c.delta_sq = v[1];
  c.w_sq = v[2];
  return c;
}

void CudaBackend::SetStepsTaken(int64_t t) {
  Check(cudaStreamSynchronize(stream_), "SetStepsTaken");
  Check(cudaMemcpy(&status_dev_->t, &t, sizeof t, cudaMemcpyHostToDevice), "SetStepsTaken");
}

// The per-param counts through the pinned staging, a piece at a time (as the state arrays).
absl::Status CudaBackend::ReadParamSteps(int64_t* host) {
  if (absl::Status s = Sync("reading the step counts"); !s.ok()) return s;
  const int64_t count = static_cast<int64_t>(cfg_.params.size());
  for (int64_t done = 0; done < count;) {
    const int64_t n = std::min<int64_t>(count - done, kStagingBytes / sizeof(int64_t));
    const cudaError_t e = cudaMemcpy(staging_, tables_.param_t + done, n * sizeof(int64_t),
                                     cudaMemcpyDeviceToHost);
    if (e != cudaSuccess) return DeviceError(CudaMessage(e, "reading the step counts"));
    std::memcpy(host + done, staging_, n * sizeof(int64_t));
    done += n;
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::WriteParamSteps(const int64_t* host) {
  if (absl::Status s = Sync("writing the step counts"); !s.ok()) return s;
  const int64_t count = static_cast<int64_t>(cfg_.params.size());
  for (int64_t done = 0; done < count;) {
    const int64_t n = std::min<int64_t>(count - done, kStagingBytes / sizeof(int64_t));
    std::memcpy(staging_, host + done, n * sizeof(int64_t));
    const cudaError_t e = cudaMemcpy(tables_.param_t + done, staging_, n * sizeof(int64_t),
                                     cudaMemcpyHostToDevice);
    if (e != cudaSuccess) return DeviceError(CudaMessage(e, "writing the step counts"));
    done += n;
  }
  return absl::OkStatus();
}

void CudaBackend::WriteModelRows() {
  CopyAll(to_model_, arena_, false, nullptr, true, "WriteModelRows");
  CopyAll(to_model32_, arena_, false, nullptr, false, "WriteModelRows (block order)");
}

}  // namespace

namespace cuda {

bool DevicePresent(std::string* why_not) {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    if (why_not) *why_not = std::string("cudaGetDeviceCount: ") + cudaGetErrorName(e) + " (" +
                            cudaGetErrorString(e) + ")";
    cudaGetLastError();  // clear it: the failure is the answer, not an error to carry
    return false;
  }
  if (count == 0) {
    if (why_not) *why_not = "no CUDA device";
    return false;
  }
  return true;
}

}  // namespace cuda

absl::StatusOr<std::unique_ptr<StepBackend>> MakeCudaBackend(int device) {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return absl::UnimplementedError(
        absl::StrCat("device=cuda:", device, ": no usable CUDA device (", cudaGetErrorName(e), ": ",
                     cudaGetErrorString(e), ")"));
  }
  if (device < 0 || device >= count) {
    return absl::UnimplementedError(
        absl::StrCat("device=cuda:", device, ": this machine has ", count, " CUDA device(s)"));
  }
  return std::unique_ptr<StepBackend>(new CudaBackend(device));
}

std::string CudaRuntimeInfo() {
  int runtime = 0, driver = 0, count = 0;
  cudaRuntimeGetVersion(&runtime);
  cudaDriverGetVersion(&driver);
  const cudaError_t e = cudaGetDeviceCount(&count);
  auto version = [](int v) { return absl::StrCat(v / 1000, ".", (v % 1000) / 10); };
  if (e != cudaSuccess) {
    cudaGetLastError();
    return absl::StrCat("cuda=", version(runtime), " devices=0 (", cudaGetErrorName(e), ")");
  }
  std::string out = absl::StrCat("cuda=", version(runtime), " driver=", version(driver), " devices=", count);
  for (int d = 0; d < count; ++d) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, d) == cudaSuccess)
      absl::StrAppend(&out, d == 0 ? " (" : ", ", prop.name, " sm_", prop.major, prop.minor,
                      d + 1 == count ? ")" : "");
  }
  return out;
}

}  // namespace mdopt::kernels
