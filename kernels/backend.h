// The backend interface: what the step schedule (dist_opt/schedule.h) asks of a device. A
// backend owns this rank's optimizer state in its own memory and runs the math of one bucket
// at a time, stage by stage; the schedule puts the collectives between the stages. The
// interface knows nothing of ranks or communicators: the schedule describes this rank's part
// of the plan once (BackendConfig: matrices, rows, buffer offsets, copy lists) and from then
// on names buckets and slot ranges only. kernels/cpu implements it (CpuBackend); a device
// backend implements the same calls (docs/ARCHITECTURE.md, "The backend interface").
//
// Contract (every call below unless it says otherwise):
//   - Stream order. A call enqueues its work on the backend's stream() and returns without
//     waiting for it; work runs in the order the calls were made. A host backend has no
//     queue: its stream is the calling thread, so its calls run to completion. Collectives
//     on the backend's buffers are ordered against its stream by the communicator
//     (Request::OrderBefore), never by a host wait in the schedule.
//   - The skip flag. CheckFinite accumulates, ApplyCheck decides: a NaN or Inf in any
//     gradient of the step sets a flag in the backend's memory that every later stage of
//     the step reads and turns into a no-op (state, master weights and model tensors are
//     left bit for bit as they were). The host learns of it only through ReadOutcome. The
//     copy stages (PackGrads, PackWeights, UnpackWeights, the NS pack/unpack inside the
//     stages) do not read it: they move values that do not change.
//   - Params without a gradient. A NULL gradient pointer means the param has no gradient
//     this step (kernels/common/grad_presence.h). CheckFinite writes this rank's presence of
//     every param into the check record next to the sums of squares; ApplyCheck derives from
//     the summed record a per-param skip flag in the backend's memory, which every later
//     stage reads for each slot like the step's skip flag: a skipped param's weights, master
//     copy, moments, gains, radii and step count stay bit for bit as they were, its counters
//     say `skipped`, and a Newton-Schulz batch may run on its X but never applies the result.
//   - Step counts. Besides the count of steps applied (StepOutcome::steps_taken) the backend
//     keeps one per param in its memory: the steps that param took (applied and not skipped
//     for want of a gradient). The bias corrections of a param's Adam moments (direction and
//     gains) use its own count, as torch's per-param `step`; EndStep advances them. Every
//     rank holding a slot of a param derives the same skip flag from the same summed record,
//     so their counts agree.
//     PackGrads writes zeros for a NULL gradient; nothing dereferences one. With
//     `grads_agree` (gradients arrive reduced on several ranks) a param that some ranks have
//     a gradient for and others not sets the step's skip flag and the outcome names it.
//   - Failure. A call returns an error only for what the host can see at the call (a bad
//     argument, out of memory at Setup); device faults surface at the next call that
//     synchronises (ReadOutcome, the state calls) as DEVICE_ERROR.
//   - Memory. Setup allocates everything; no later call allocates.
#ifndef MDOPT_KERNELS_BACKEND_H_
#define MDOPT_KERNELS_BACKEND_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/cord.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "kernels/common/dtype.h"
#include "kernels/common/grad_presence.h"
#include "kernels/common/ns_coeffs.h"
#include "kernels/common/row_map.h"
#include "kernels/common/segment_map.h"
#include "kernels/common/update_rule.h"

namespace mdopt::kernels {

// A fault of the device or its runtime (a failed kernel, a CUDA error): MDOPT_DEVICE_ERROR at
// the C ABI. absl has no code of its own for it, so it is kInternal marked with a payload.
inline constexpr absl::string_view kDeviceErrorPayload = "mdopt.device_error";
inline absl::Status DeviceError(absl::string_view message) {
  absl::Status s = absl::InternalError(message);
  s.SetPayload(kDeviceErrorPayload, absl::Cord("1"));
  return s;
}
inline bool IsDeviceError(const absl::Status& s) {
  return s.GetPayload(kDeviceErrorPayload).has_value();
}

// One parameter tensor: `experts` matrices (slots) of n columns, its rule and its model
// pointers. The slots' rows (SlotDesc::m) may differ between the blocks of a fused weight;
// the backend's own buffers hold them in block order, and the model's weight and gradient
// tensors are read and written at row_map.TensorRow of a block-order row (the identity but
// for blocks=groups:G, G > 1).
struct ParamDesc {
  std::string name;               // for messages (a pointer refused at BindParams)
  int group = 0;                  // index into BeginStep's per-group scalars
  int64_t experts = 1, n = 1;
  RowMap row_map;
  Dtype param_dtype = Dtype::kF32, grad_dtype = Dtype::kF32;
  UpdateRule rule;                // the param's rule (1-D: no sphere, no gains)
  bool preserve_init = false;
};

// The model's buffers of one param for the step to come (settable every step).
struct ParamPointers {
  void* param = nullptr;
  const void* grad = nullptr;
};

// One matrix (a slot of the plan) as this rank holds it. Offsets count elements.
struct SlotDesc {
  int64_t param = 0;
  int bucket = 0;
  int64_t m = 1;                   // the matrix's rows (every rank's)
  int64_t tensor_offset = 0;       // elements of the param tensor before this matrix, in
                                   // block order (ParamDesc::row_map)
  int64_t row_begin = 0, rows = 0; // the rows this rank holds (rows may be 0)
  bool holds = false;              // holds the column/scalar gains and radii (every rank
                                   // of a rows-layout matrix; the owner of a whole one)
  bool cross = false;              // column/scalar/frobenius/column-norm sums are partial
                                   // here: they go through the bucket's cross record
  bool muon = false;
  bool ns_here = false;            // this rank runs Newton-Schulz on the whole matrix
  bool ns_gathered = false;        // ... on the bucket's full buffer, gathered from the
                                   // other ranks' blocks (else on its own X rows)
  bool accounts = false;           // this rank counts it in the group counters
  int64_t seg_offset = 0;          // its rows in this rank's segment (grads, X, weights)
  int64_t cross_offset = 0;        // in the bucket's cross record
  int64_t radial_offset = 0;       // in the bucket's radial record (tangent=1)
  int64_t full_offset = 0;         // ns_gathered: the whole X in the bucket's full buffer
  // A matrix of K row blocks (blocks=rows:K) is K slots, consecutive in their bucket, that
  // share column and scalar gains: each keeps a replica, and Finish steps every replica
  // with the same gradient, the K slots' (cross-rank summed) gradients added in block order,
  // so the replicas stay bitwise equal. gain_block: this slot's block; gain_blocks: K (1:
  // gains of its own, also when the rule has no column or scalar gains). A SlotRange given
  // to Finish holds all K slots of such a matrix or none.
  int gain_block = 0, gain_blocks = 1;
};

// A range of a float buffer that crosses the wire in bf16 (ns_comm_dtype=bf16).
struct ElementRange {
  int64_t offset = 0, count = 0;
};

// One window of a bucket's segments, moved by one reduce-scatter and one all-gather. A
// bucket has one window covering its whole segments unless it is a single parameter larger
// than bucket_mb: then its segments are cut into windows whose staging (every rank's part
// together) fits in bucket_mb, so the collectives' buffers do not grow with the largest
// parameter.
struct CommChunk {
  SegmentMap map;        // every rank's part of the window: lengths and starts in the staging
  int64_t seg_begin = 0; // where the window starts in every segment (so in grad_seg)
  int64_t total = 0;     // staging elements: every rank's part together
  // Model gradients -> staging: every rank's rows (strided spans) and whole matrices;
  // this rank's rows -> staging (at its own part); staging -> other ranks' rows.
  std::vector<CopySpan> grad_pack, weight_pack, weight_unpack;
};

struct BucketDesc {
  std::vector<int> slots;               // slot indices
  // The params with slots here, [first_param, end_param). An expert stack larger than
  // bucket_mb is split over several buckets by experts, so a param may be in several.
  int64_t first_param = 0, end_param = 0;
  Dtype param_dtype = Dtype::kF32;     // of the weights all-gather
  int64_t seg = 0;                      // elements of this rank's segment (tail padding included)
  std::vector<CommChunk> chunks;        // the windows, in segment order (one at least)
  int64_t x_local = 0;                  // elements of X rows this rank holds (Muon slots)
  int64_t full = 0;                     // elements of the whole-X buffer
  std::vector<ElementRange> full_remote;  // where the full buffer holds other ranks' blocks
  std::vector<ElementRange> local_remote; // where x_local goes to / comes from an NS owner
  int64_t cross_len = 0, radial_len = 0;  // doubles of the cross-row and radial records
};

struct BackendConfig {
  std::vector<ParamDesc> params;
  std::vector<SlotDesc> slots;
  std::vector<BucketDesc> buckets;
  int groups = 1;
  int pipeline = 1;          // buckets in flight at once (buffers of the rotating pool)
  bool sharded = false;      // several ranks: collectives run between the stages
  bool grads_segmented = false;  // gradients arrive reduced in the bucket's grad segment
  bool grad_comm_bf16 = false;   // that reduction moves bf16 (else float32)
  bool ns_comm_bf16 = false;     // the NS gather/scatter moves bf16
  bool ns_bf16 = false;          // Newton-Schulz products in bf16
  NsForm ns_form = NsForm::kAuto;
  bool update_norms = false;
  // Every rank passes the same (reduced) gradients: a param with a gradient on some ranks
  // and none on others is an error of the step (several ranks, grads=reduced).
  bool grads_agree = false;
  // The finite-check record: per param its sum of squares, then per param its presence
  // (grad_presence.h): 2 doubles per param.
  int64_t check_len = 1;
};

// What a backend's rotating pool of `pipeline` bucket workspaces is sized for: each buffer's
// largest need over the buckets (elements; weight_bytes in bytes). send and weight_bytes are
// the largest window's staging (CommChunk::total), 0 at one rank (no collectives).
struct PoolNeeds {
  int64_t x_local = 0, full = 0, cross = 0, radial = 0, seg = 0, send = 0, weight_bytes = 0;
};
inline PoolNeeds MaxBucketNeeds(const BackendConfig& c) {
  PoolNeeds n;
  auto up = [](int64_t* at, int64_t v) { *at = *at > v ? *at : v; };
  for (const BucketDesc& bd : c.buckets) {
    up(&n.x_local, bd.x_local);
    up(&n.full, bd.full);
    up(&n.cross, bd.cross_len);
    up(&n.radial, bd.radial_len);
    up(&n.seg, bd.seg);
    if (c.sharded) {
      for (const CommChunk& ch : bd.chunks) {
        up(&n.send, ch.total);
        up(&n.weight_bytes, ch.total * (bd.param_dtype == Dtype::kF32 ? 4 : 2));
      }
    }
  }
  return n;
}

// Bytes of the step's bucket buffers as the backends lay them out: `pipeline` pool entries
// (X rows, whole X, their bf16 copies for bf16 NS traffic, the cross and radial records, the
// weights staging, the update-norm copy), every bucket's reduced gradient rows, two gradient
// staging buffers and the finite-check record. Newton-Schulz and tile scratch come on top
// (a few matrices' worth, independent of the rank count). Computed, not allocated: the scale
// report sizes ranks of worlds that do not exist with it.
inline int64_t BucketBufferBytes(const BackendConfig& c) {
  const PoolNeeds n = MaxBucketNeeds(c);
  const int64_t x16 = c.ns_comm_bf16 && c.sharded ? 2 * (n.x_local + n.full) : 0;
  const int64_t entry = 4 * (n.x_local + n.full) + x16 + 8 * (n.cross + n.radial) +
                        n.weight_bytes + (c.update_norms ? 4 * n.seg : 0);
  int64_t b = static_cast<int64_t>(c.pipeline > 1 ? c.pipeline : 1) * entry;
  if (c.grads_segmented) {
    const int64_t gb = c.grad_comm_bf16 ? 2 : 4;
    for (const BucketDesc& bd : c.buckets) b += bd.seg * gb;
    b += static_cast<int64_t>(c.buckets.size() < 2 ? c.buckets.size() : 2) * n.send * gb;
  }
  return b + 8 * (c.check_len > 1 ? c.check_len : 1);
}

// Buffers of one bucket in the backend's memory (stable after Setup), for the collectives.
struct BucketBuffers {
  void* grad_send = nullptr;     // a window's staging, in the grad comm dtype
  void* grad_seg = nullptr;      // `seg` elements in the grad comm dtype (reduced rows)
  float* x_local = nullptr;      // X, then O, of the Muon rows this rank holds
  uint16_t* x_local16 = nullptr; // their bf16 copies (ns_comm_dtype=bf16)
  float* x_full = nullptr;       // the whole X, then O, of the matrices gathered here
  uint16_t* x_full16 = nullptr;
  double* cross = nullptr;       // cross record (cross_len doubles, summed in place)
  double* radial = nullptr;      // radial record (radial_len doubles)
  void* weights = nullptr;       // a window's staging, in the param dtype (all-gather)
};

// Per group for one step: lr and gain_lr with the schedule's scale applied.
struct GroupScalars {
  double lr = 0.0, gain_lr = 0.0;
};

// What the host learns of a step (ReadOutcome; waits for the step).
struct StepOutcome {
  bool skipped = false;
  double grad_norm = 0.0;
  int64_t bad_param = -1;   // the first param whose gradient held NaN/Inf
  // grads_agree: the first param that some ranks had a gradient for and others not (the
  // step was a no-op); -1 when none.
  int64_t disagree_param = -1;
  int64_t steps_taken = 0;  // steps applied so far (each param's own count: ReadParamSteps)
};

// What the last step did to one slot (mdopt_group_info).
struct SlotCounters {
  bool ns_ran = false, projected = false, gains_stepped = false;
  bool skipped = false;  // its param had no gradient on any rank (counted where `accounts`)
  double delta_sq = 0.0, w_sq = 0.0;
};

// One named array of a slot's state, as the host sees it: its contents are read and written
// through ReadState/WriteState, which stage them for a backend whose memory is a device's.
struct StateArray {
  std::string name;      // "master", "momentum", "exp_avg", "exp_avg_sq", "row_raw", ...
  int64_t count = 0;
  int elem_size = 4;     // 4: float32, 8: float64
  bool is_model = false; // the model's own tensor (f32 weights serve as the master copy)

  int64_t bytes() const { return count * elem_size; }
};

// A sphere slice that cannot be projected (Init): which slot and slice.
struct BadSlice {
  int slot = -1;
  int64_t slice = 0;
};

// Slots [q0, q1) of bucket b, in the bucket's order.
struct SlotRange {
  int bucket = 0;
  size_t q0 = 0, q1 = 0;
};

class StepBackend {
 public:
  virtual ~StepBackend() = default;

  virtual const char* name() const = 0;
  // Whether the collectives' buffers live in device memory, and the stream they and the
  // stages are ordered on (nullptr for a host backend).
  virtual bool device_memory() const = 0;
  virtual void* stream() const = 0;
  // A host backend runs each matrix's stages back to back when nothing is to overlap (one
  // rank), so its rows stay in cache; a device backend wants whole buckets per call.
  virtual bool prefers_matrix_order() const = 0;

  // Allocates every buffer and the state, reading the initial master weights from the
  // model tensors (nothing is written). ResourceExhausted when memory runs out.
  virtual absl::Status Setup(BackendConfig config, absl::Span<const ParamPointers> ptrs) = 0;
  virtual BucketBuffers Buffers(int bucket) = 0;

  // The caller's stream of an ABI call (mdopt_step, mdopt_grads_ready, mdopt_gather_params):
  // InvalidArgument for one this backend cannot use (a host backend takes only NULL). Join:
  // the backend's work queued after it runs after what the caller had queued on `stream`;
  // Release: the caller's work queued on `stream` later runs after the backend's so far.
  virtual absl::Status CheckStream(void* stream) const = 0;
  virtual void Join(void* stream) = 0;
  virtual void Release(void* stream) = 0;

  // Enter/Leave bracket every public call of the optimizer: a CPU backend sets its thread
  // count for the call and restores the caller's after it.
  virtual void Enter() = 0;
  virtual void Leave() = 0;

  // --- Init (after Setup): the spheres' norms, radii and the first projection.
  // Partial squared norms of every slice into the cross record (as AssembleCross).
  virtual void InitNorms(int bucket) = 0;
  // After ApplyCross: radii from the summed norms; false with the first bad slice.
  virtual bool InitRadii(int bucket, BadSlice* bad) = 0;
  // Projects the bucket's matrices (unless preserve_init) and writes the model rows.
  virtual void InitProject(int bucket) = 0;

  // --- One step. BindParams first (pointers may change between steps), then BeginStep.
  // ptrs are the pointers of params [first, first + ptrs.size()). InvalidArgument, naming
  // the param, for a pointer this backend cannot use (host memory for a device backend, or
  // another device's); nothing is bound then.
  virtual absl::Status BindParams(int64_t first, absl::Span<const ParamPointers> ptrs) = 0;
  virtual void BeginStep(absl::Span<const GroupScalars> groups) = 0;
  // Param `param`'s rule changed in its scalars (beta1, beta2, eps, momentum,
  // weight_decay; nothing else): used from the next BeginStep on.
  virtual void SetParamScalars(int param, const UpdateRule& rule) = 0;
  // Model gradients of window `chunk` -> the staging buffer (grad comm dtype; bf16 upcast
  // to f32). Row padding is written as zeros; the segments' tail padding (equal segments)
  // is left as the buffer held it: it is reduced and never read.
  virtual void PackGrads(int bucket, int chunk) = 0;
  // Sums of squares of this rank's gradient rows, per param, into the check record: the
  // param's slots in this bucket. Buckets are checked in order; the bucket holding a param's
  // first slot sets its entry, later ones (an expert stack split over buckets) add to it.
  // The bucket of a param's first slot also writes its presence entry.
  virtual void CheckFinite(int bucket) = 0;
  virtual double* check_record() = 0;
  // After the record is summed over ranks: the skip flag, the per-param skip flags and the
  // grad norm.
  virtual void ApplyCheck() = 0;
  // Resets the step's partial sums; tangent=1: radial dots into the radial record.
  virtual void Prepare(const SlotRange& r) = 0;
  virtual void ApplyRadial(int bucket) = 0;  // after the radial record is summed
  // Pass 1: D, gain gradients, G_D, base step; Muon: X into x_local, packed for its owner.
  virtual void Pass1(const SlotRange& r) = 0;
  // Newton-Schulz on the matrices this rank owns (batched by shape); O back to x_local and
  // packed for the other ranks.
  virtual void NewtonSchulz(const SlotRange& r) = 0;
  // Pass 2 (Muon): D' from O.
  virtual void Pass2(const SlotRange& r) = 0;
  // The cross-row partial sums into the cross record; after it is summed, back.
  virtual void AssembleCross(const SlotRange& r) = 0;
  virtual void ApplyCross(const SlotRange& r) = 0;
  // Gains Adam, projection, W = gains (x) D' and the model copy of this rank's rows.
  virtual void Finish(const SlotRange& r) = 0;
  // Window `chunk`: this rank's model rows -> the weights buffer; the buffer -> other
  // ranks' rows.
  virtual void PackWeights(int bucket, int chunk) = 0;
  virtual void UnpackWeights(int bucket, int chunk) = 0;
  // Counts the step (unless skipped): the optimizer's count and that of every param that
  // took it.
  virtual void EndStep() = 0;
  // Waits for the step; what the host may know of it.
  virtual absl::Status ReadOutcome(StepOutcome* out) = 0;

  // --- State (host-synchronous).
  virtual std::vector<StateArray> State(int slot) = 0;
  // Elements [first, first + count) of array `array` of State(slot) into host memory, after
  // the work queued so far; and an array's `count` elements from host memory.
  virtual absl::Status ReadState(int slot, size_t array, int64_t first, int64_t count,
                                 void* host) = 0;
  virtual absl::Status WriteState(int slot, size_t array, const void* host) = 0;
  virtual SlotCounters Counters(int slot) const = 0;
  virtual void SetStepsTaken(int64_t t) = 0;
  // Every param's step count (one int64 per param, in param order), after the work queued so
  // far; and all of them from host memory (a checkpoint load).
  virtual absl::Status ReadParamSteps(int64_t* host) = 0;
  virtual absl::Status WriteParamSteps(const int64_t* host) = 0;
  // Writes this rank's model rows from the master copies (after a checkpoint load).
  virtual void WriteModelRows() = 0;
  virtual int64_t WorkspaceBytes() const = 0;
};

}  // namespace mdopt::kernels

#endif  // MDOPT_KERNELS_BACKEND_H_
