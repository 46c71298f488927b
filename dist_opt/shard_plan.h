// The ShardPlan: who holds which rows of every matrix, who runs each Newton-Schulz, and how
// the matrices are packed into buckets for the collectives. Built once at finalize from the
// registry, the groups and the rank count alone, so that it is identical on every rank
// (docs/ARCHITECTURE.md, "Sharding and the step schedule").
//
// A slot is one matrix: a 2-D parameter, one expert of a 3-D stack, or a 1-D parameter as a
// 1 x n matrix. Layouts:
//   rows:  N row blocks of ceil(m / N) rows each (the last ones short or empty, padded to
//          the full block in the collectives); rank r holds block r. A Muon slot also has an
//          NS owner, which gathers X, orthogonalises it and scatters O back.
//   owner: the whole matrix on one rank (1-D parameters always). Under the rows layout a
//          matrix with fewer rows than ranks is held whole too when segments may differ in
//          length: row blocks would pad it to N rows on the wire (a 64-row router at 1,024
//          ranks would move 16 times its size). With equal segments (NCCL) it stays in rows:
//          a whole matrix would pad every other rank's segment to its size (N times its
//          volume), row blocks pad it to N rows (N / m times, under N x n elements).
// Owners are chosen by longest-first bin packing with a heap of rank loads (O(items log N)),
// the load of a rank being its share of the whole-matrix state bytes plus its share of the
// Newton-Schulz cost, so that neither memory nor NS time piles up on one rank.
//
// The K row blocks of one matrix (blocks=rows:K: K slots, one per block) share its column
// and scalar gains, whose gradient is summed over the K slots where the gains are held. So
// they stay together: under the owner layout they are one packing item (one owner), and a
// parameter split over buckets is split at whole matrices (multiples of K slots).
//
// A bucket is a run of parameters (in reverse registration order, the order backward
// produces gradients) of one (param dtype, grad dtype) pair, about bucket_bytes of f32
// state. A parameter larger than that gets buckets of its own: an expert stack is split by
// experts; a single matrix larger than a bucket has its collectives cut into windows of its
// segments (BucketPlan::window: the widest whose staging, every rank's part together, fits
// in bucket_bytes), so no collective buffer grows past bucket_bytes. At N ranks with equal
// segments a window is bucket_bytes / N of each segment: at thousands of ranks, a bucket_mb
// of hundreds keeps the windows (and collectives) of the largest matrices few.
//
// Its collectives' buffers are rank-major: rank r's segment holds first the rows part (the
// row blocks of the bucket's rows-layout slots, padded, at the same offsets on every rank),
// then the whole matrices rank r holds in the bucket. So the plan needs a few numbers per
// bucket and one entry per slot and per (bucket, owning rank), never a table over all ranks
// (kernels/common/segment_map.h). Segments differ in length (owned parts) unless the plan
// pads them (PlanOptions::equal_segments): then every rank's segment of a bucket is as long
// as its longest, zeros at the tail, and the collectives are equal-count ones (NCCL).
#ifndef MDOPT_DIST_OPT_SHARD_PLAN_H_
#define MDOPT_DIST_OPT_SHARD_PLAN_H_

#include <cstdint>
#include <string>
#include <vector>

#include "dist_opt/group_spec.h"
#include "dist_opt/param_registry.h"
#include "kernels/common/segment_map.h"

namespace mdopt {

struct SlotPlan {
  int64_t param = 0, expert = 0;
  int64_t m = 1, n = 1;
  int64_t row0 = 0;        // its first row in the param's tensor, in block order (row_map.h)
  Layout layout = Layout::kRows;
  bool muon = false;
  int owner = 0;           // owner layout: the rank holding it; rows + muon: the NS owner
  int64_t block_rows = 0;  // rows: ceil(m / N); owner: m
  int bucket = 0;
  int64_t bucket_pos = 0;  // index of this slot in its bucket's `slots` (pack order)
  // Elements before its rows in a segment of its bucket: rows layout, in every rank's
  // segment; owner layout, in its owner's (after the rows part).
  int64_t seg_pos = 0;
  // Doubles of its cross-row and radial (tangent=1) records: what of its sums is partial
  // over row blocks (rows layout at several ranks; 0 otherwise).
  int64_t cross = 0, radial = 0;

  // Rows rank r holds: [RowBegin(r), RowEnd(r)).
  int64_t RowBegin(int r) const;
  int64_t RowEnd(int r) const;
  int64_t Rows(int r) const { return RowEnd(r) - RowBegin(r); }
  // Rows of rank r's segment in a bucket's collectives (real rows plus padding).
  int64_t PackedRows(int r) const;
  // Elements of the model tensor before this slot's first row.
  // (In block order: blocks=groups:G interleaves a matrix's blocks in the tensor itself.)
  int64_t TensorOffset() const { return row0 * n; }
};

struct BucketPlan {
  std::vector<int> slots;        // slot indices, in pack order
  // The parameters with slots here [first_param, end_param) (registration order); an expert
  // stack split over buckets is in each of its buckets.
  int64_t first_param = 0;
  int64_t end_param = 0;
  Dtype param_dtype = Dtype::kF32, grad_dtype = Dtype::kF32;
  kernels::SegmentMap map;       // every rank's segment: the rows part and the owned parts
  int64_t longest = 0;           // the longest segment (tail padding included)
  int64_t total = 0;             // every segment together
  int64_t tail_pad = 0;          // the tail padding of all segments (0 unless equal_segments)
  int64_t row_pad = 0;           // padding rows' elements of all segments (rows layout)
  // Elements of each segment one collective moves: the longest segment, unless the bucket is
  // a single matrix larger than bucket_bytes, whose collectives go window by window.
  int64_t window = 0;

  int64_t Seg(int r) const { return map.view().Len(r); }
  int Windows() const { return longest == 0 ? 1 : static_cast<int>((longest + window - 1) / window); }
  // Counts of window w's collective, every rank's, into counts[0, world) (O(N), into a
  // buffer the caller keeps, so that a step allocates nothing).
  void WindowCounts(int w, int world, int64_t* counts) const;
  std::vector<int64_t> WindowCounts(int w, int world) const;
};

struct PlanOptions {
  int world = 1;
  int64_t bucket_bytes = int64_t{32} << 20;
  // Pad every rank's segment of a bucket to the bucket's longest, so that seg is the same for
  // every rank (total = world * seg) and the reduce-scatter and all-gather are equal-count.
  bool equal_segments = false;
  // Bytes per element of the gradient reduce-scatter (4: float32, 2: bf16, 0: no gradient
  // collective, grads=reduced): only for Describe's count of the padding's bytes.
  int grad_comm_bytes = 4;
};

struct ShardPlan {
  int world = 1;
  bool equal_segments = false;  // PlanOptions::equal_segments
  int grad_comm_bytes = 4;      // PlanOptions::grad_comm_bytes
  int64_t bucket_bytes = 0;     // PlanOptions::bucket_bytes
  std::vector<SlotPlan> slots;             // param order, experts in order
  std::vector<int64_t> first_slot;         // per param: its first slot (experts follow)
  std::vector<BucketPlan> buckets;
  std::vector<int> bucket_of_param;        // the bucket of its first slot

  const SlotPlan& slot(int64_t param, int64_t expert) const {
    return slots[first_slot[param] + expert];
  }
  // A compact serialised form (JSON), stored in checkpoint manifests.
  std::string ToJson() const;
  // A table for people (mdopt-bench --plan): every slot, every bucket (with the padding of
  // equal segments and the bytes it adds on the wire), and per rank the state elements and
  // Newton-Schulz cost it holds, with the imbalance (max / mean) of each.
  std::string Describe(const std::vector<ParamEntry>& params) const;
  // Elements of state each rank holds and the NS cost it runs, in O(slots + N).
  void Loads(std::vector<double>* state, std::vector<double>* ns) const;
  // Bytes the plan itself occupies (its vectors), for the scale report.
  int64_t Bytes() const;
};

// Cross-row record of an m x n matrix under `rule` whose sums are partial over row blocks:
// column-gain gradients (n), the scalar-gain gradient (1), the squared norm of a frobenius
// sphere (1) or of each column of a column sphere (n). Radial: tangent=1's dots <G_D, D> and
// <D, D> per frobenius (2) or column (2n) slice.
int64_t CrossRecordLength(const kernels::UpdateRule& rule, int64_t n);
int64_t RadialRecordLength(const kernels::UpdateRule& rule, int64_t n);

// Bytes the tail padding of bucket `b` adds on the wire per step, over all ranks: a
// reduce-scatter sends each rank's padding from every other rank, an all-gather each rank's
// padding to every other rank, so (world - 1) * tail_pad elements each, of the gradient comm
// dtype and of the param dtype.
int64_t PaddingBytes(const ShardPlan& plan, const BucketPlan& b);

// Newton-Schulz cost of an m x n matrix, max(m, n) * min(m, n)^2 (the bin-packing weight).
double NsCost(int64_t m, int64_t n);

ShardPlan BuildShardPlan(const std::vector<ParamEntry>& params, const std::vector<Group>& groups,
                         const PlanOptions& options);

}  // namespace mdopt

#endif  // MDOPT_DIST_OPT_SHARD_PLAN_H_
