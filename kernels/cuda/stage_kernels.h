// The CUDA backend's stage kernels (stage_kernels.cu) as the host side of the backend
// (cuda_backend.cc) launches them: plain structs that live in device memory and launch
// functions that take a stream as void*. No CUDA, Abseil or STL headers here, so the
// backend's host code and the kernels compile apart (g++ and nvcc).
//
// How a stage runs. Every pass over matrix elements is one launch over a bucket's list of
// tiles (kTileRows rows x kTileCols columns of one slot; a block per tile, a thread per
// column): a multi-tensor launch whose size does not depend on how many matrices the bucket
// holds. A tile writes its partial sums to a scratch buffer, per row (summed over the
// tile's columns: warp shuffles, then the block's warps in order), per column (summed over
// the tile's rows in the thread's registers) and per tile (both); a second launch, one
// block per slot and per 256 of its rows or columns, combines the partials in tile order
// into the slot's sums. Every sum has
// a fixed order: no atomics, the same bits on every run.
#ifndef MDOPT_KERNELS_CUDA_STAGE_KERNELS_H_
#define MDOPT_KERNELS_CUDA_STAGE_KERNELS_H_

#include <cstdint>

#include "kernels/common/row_map.h"
#include "kernels/common/segment_map.h"

namespace mdopt::kernels::cuda {

inline constexpr int kTileRows = 32;
inline constexpr int kTileCols = 256;  // the block size of the tile kernels
// Partial-sum channels of the scratch: per row, per column, per tile.
inline constexpr int kRowChannels = 2, kColChannels = 2, kTileChannels = 2;

// One param's rule, as the kernels read it (kernels/common/update_rule.h, flattened).
struct DevParam {
  int32_t group = 0;
  uint8_t muon = 0, sphere = 0, gains = 0, gain_param = 0;  // the enums' values
  uint8_t nesterov = 0, tangent = 0, param_bf16 = 0, grad_bf16 = 0, preserve_init = 0;
  float momentum = 0.0f;
  double beta1 = 0.0, beta2 = 0.0, eps = 0.0, weight_decay = 0.0;
};

// The model's buffers of one param for the step in progress (uploaded when they change).
struct DevPointers {
  void* param = nullptr;
  const void* grad = nullptr;
};

// One slot (a matrix as this rank holds it) and its state in the arena.
struct DevSlot {
  int32_t param = 0;
  uint8_t holds = 0, muon = 0, direct = 0, aliases = 0;  // aliases: f32 model is the master
  // mapped: the param's blocks are interleaved in its tensor (blocks=groups:G, G > 1): the
  // model's weight and gradient rows are found through DevTables::row_maps, row i of this
  // slot at tensor row TensorRow(map_row0 + i); such a slot never aliases the model.
  uint8_t mapped = 0;
  int64_t m = 0, n = 0, rows = 0;
  double muon_scale = 1.0;  // MuonScaleFactor of the slot's shape (blocks may differ)
  int64_t model_off = 0;  // elements of the param tensor before this rank's first row
                          // (unmapped: the model's row i is at model_off + i * n)
  int64_t map_row0 = 0;   // mapped: block-order row (over the tensor) of this rank's first row
  float* master = nullptr;  // bf16 or mapped params; f32: the model tensor (through DevPointers)
  float* state0 = nullptr;  // muon momentum | adam exp_avg
  float* state1 = nullptr;  // adam exp_avg_sq
  float* row_raw = nullptr;
  float* row_m = nullptr;
  float* row_v = nullptr;
  float* col_raw = nullptr;
  float* col_m = nullptr;
  float* col_v = nullptr;
  float* scalar_raw = nullptr;
  float* scalar_m = nullptr;
  float* scalar_v = nullptr;
  float* radius = nullptr;
  // The step's sums (doubles, kept from stage to stage).
  double* row_grad = nullptr;     // rows
  double* col_grad = nullptr;     // n
  double* scalar_grad = nullptr;  // 1
  double* slice_sq = nullptr;     // row: rows, col: n, frobenius: 1
  double* radial_dot = nullptr;   // tangent: as slice_sq
  double* radial_dd = nullptr;
  double* check = nullptr;        // 1: sum of squares of this rank's gradient rows
  double* counters = nullptr;     // 3: applied (1 after a step), delta_sq, w_sq
  // Bucket buffers of this slot (its bucket's pool entry).
  const void* seg_grad = nullptr;  // reduced gradient rows (grads segmented), else null
  uint8_t seg_grad_bf16 = 0;
  float* x = nullptr;              // Muon: X, then O, of these rows
  float* wold = nullptr;           // update_norms: the rows before the step
  double* cross = nullptr;         // its place in the bucket's cross record (cross slots)
  double* radial = nullptr;        // ... in the radial record (tangent, cross slots)
  uint8_t cross_slot = 0;
  // blocks=rows:K: this slot is block gain_block of K = gain_blocks consecutive slots that
  // step replicas of one column/scalar gain with the sum of their gradients (SlotDesc).
  int32_t gain_block = 0, gain_blocks = 1;
  // Its tiles' places in the scratch.
  int32_t row_tiles = 0, col_tiles = 0;
  int64_t row_part = 0, col_part = 0, tile_part = 0;
};

struct DevTile {
  int32_t slot = 0, row_tile = 0, col_tile = 0, index = 0;  // index: row_tile * col_tiles + col_tile
};

// Step-wide values in device memory: written by kernels, read by the host only in
// ReadOutcome.
struct DevStatus {
  int64_t t = 0;          // steps applied so far (each param's own count: param_t)
  int32_t skip = 0;       // the finite check failed this step
  int32_t pad = 0;
  double grad_norm = 0.0;
  int64_t bad_param = -1;
  int64_t disagree_param = -1;  // grads_agree: the first param some ranks lacked a gradient for
};

struct DevGroup {
  double lr = 0.0, gain_lr = 0.0;
};

// The device tables every stage kernel reads.
struct DevTables {
  const DevParam* params = nullptr;
  const DevPointers* ptrs = nullptr;
  const DevGroup* groups = nullptr;
  DevSlot* slots = nullptr;
  DevStatus* status = nullptr;
  // Per param: where its blocks' rows sit in its tensor (row_map.h; read for mapped slots only).
  const RowMap* row_maps = nullptr;
  // Per param: 1 when no rank has its gradient this step (set by ApplyCheck, read by every
  // later stage: a no-op for its slots).
  uint8_t* param_skip = nullptr;
  // Per param: the steps it took (applied, and not skipped for want of a gradient), the t of
  // its bias corrections; EndStep advances it.
  int64_t* param_t = nullptr;
  double* row_part = nullptr;   // kRowChannels x row_part_stride
  double* col_part = nullptr;
  double* tile_part = nullptr;
  int64_t row_part_stride = 0, col_part_stride = 0, tile_part_stride = 0;
};

// Which elementwise pass a tile launch runs.
enum class TilePass : int32_t {
  kSliceSquares,  // ||W||^2 per slice (Init)
  kRadial,        // tangent: <G_D, D> and <D, D> per slice
  kCheck,         // sum of squares of the gradient rows
  kWold,          // update_norms: copy the rows before the step
  kPass1,
  kPass2,
  kRescale,       // projection, gains and the model copy (Finish; Init without gains)
};

// One contiguous copy between local buffers (the NS exchange's conversions, the owner's
// block of a gathered matrix, master weights <-> model rows). A side whose `param` is >= 0
// is that param's model tensor (`grad` picks its gradient), else the launch's buffer base;
// `zero` writes `count` zeros instead of copying.
struct CopyChunk {
  int32_t src_param = -1, dst_param = -1;
  uint8_t src_grad = 0, zero = 0;
  int64_t src = 0, dst = 0, count = 0;
};

// Elements one block of a copy launch moves (a CopyChunk's most; a span's piece).
inline constexpr int64_t kCopyPiece = 16384;

// One copy span of a collective's window (segment_map.h) as the span copy launch reads it:
// the plan's span unchanged (plain, or strided over the ranks' segments) and where its CUDA
// blocks start in the launch. A strided span is never expanded into one entry per rank:
// each block finds its span by a binary search over first_block and its rank's place in
// the staging from the window's segment map on the device, so the table is one entry per
// span whatever the rank count.
struct DevCopySpan {
  CopySpan span;
  int64_t first_block = 0;  // the launch's first block of this span (ascending)
  int64_t pieces = 1;       // blocks per rank block (per plain span): kCopyPiece elements each
  uint8_t tensor_bf16 = 0;  // the tensor side's dtype (the buffer's is the launch's)
  // Interleaved blocks: the span's tensor offsets count in block order; each element's place
  // in the tensor comes from the param's row map (rows of n elements).
  uint8_t mapped = 0;
  int64_t n = 1;
};

// Launches; each returns the cudaError_t of the launch as an int (0: queued).
int LaunchTiles(TilePass pass, const DevTables& t, const DevTile* tiles, int64_t count,
                bool init, void* stream);
// Combines the partials of `pass` for the slots listed (device array), each slot's rows and
// columns spread over `spread` blocks (at most 65,535; the largest of the slots'
// ceil(max(rows, n) / kTileCols) is enough).
int LaunchCombine(TilePass pass, const DevTables& t, const int32_t* slots, int32_t count,
                  int32_t spread, bool init, void* stream);
int LaunchCopy(const CopyChunk* chunks, int64_t count, const DevPointers* ptrs,
               const void* src_base, bool src_bf16, void* dst_base, bool dst_bf16, void* stream);
// The spans of one window and one direction, `blocks` CUDA blocks in all (the last span's
// first_block plus its blocks). `map` is the window's segment map with `owned` in device
// memory. to_buffer: tensor -> staging (padding written as zeros), else staging -> tensor
// (padding skipped). grads: the tensor side is the params' gradients, else the params.
// row_maps: per param, read for mapped spans (device memory).
int LaunchSpanCopy(const DevCopySpan* spans, int32_t count, int64_t blocks, const SegmentView& map,
                   const DevPointers* ptrs, const RowMap* row_maps, bool grads, void* buffer,
                   bool buffer_bf16, bool to_buffer, void* stream);
// Adam on the gains of the slots listed (holds only).
int LaunchGains(const DevTables& t, const int32_t* slots, int32_t count, void* stream);
// The cross record (or, radial=true, the radial record) from the slots' sums, or back.
int LaunchRecord(const DevTables& t, const int32_t* slots, int32_t count, bool radial,
                 bool to_record, void* stream);
// One param's slots in one bucket, for the finite check: positions [q0, q1) of the
// bucket's slot list. An expert stack split over buckets has one entry in each; the entry in
// the bucket of its first slot sets check[param], the others add to it (buckets are checked
// in order on one stream).
struct DevParamCheck {
  int64_t param = 0;
  int32_t q0 = 0, q1 = 0;
  int32_t sets = 0;
};

// For each entry: the sum of its slots' check values in order, set into or added to
// check[param]; an entry that sets also writes the param's presence into
// check[params + param] (kernels/common/grad_presence.h).
int LaunchParamCheck(const DevTables& t, const DevParamCheck* entries, int32_t count,
                     const int32_t* slot_list, double* check, int64_t params, void* stream);
// From the summed check record of `count` params (sums of squares, then presence): the skip
// flag, grad norm, first bad param, the per-param skip flags and (grads_agree) the first
// param the ranks disagree on, which sets the skip flag too.
int LaunchApplyCheck(const DevTables& t, const double* check, int64_t count, bool grads_agree,
                     void* stream);
int LaunchBeginStep(const DevTables& t, void* stream);
// Counts the step unless skipped: the optimizer's count and each of the `params` params'
// that took it.
int LaunchEndStep(const DevTables& t, int64_t params, void* stream);
// Fills n floats with `value`.
int LaunchFill(float* data, int64_t n, float value, void* stream);

}  // namespace mdopt::kernels::cuda

#endif  // MDOPT_KERNELS_CUDA_STAGE_KERNELS_H_
