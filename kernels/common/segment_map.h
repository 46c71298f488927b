// Where every rank's segment of a bucket lies in the bucket's rank-major collective buffers,
// in memory that does not grow with the rank count, and the copies between those buffers and
// the model tensors. At 4,096 ranks a table of every rank's offset of every matrix would be
// hundreds of megabytes; this is a few numbers per bucket plus one entry per rank that holds
// whole matrices in it.
//
// A segment is laid out the same way on every rank: first the rows part (the row blocks of
// the bucket's rows-layout matrices, each padded to its block size, so the same length and
// the same offsets on every rank), then the rank's owned part (the whole matrices it holds
// under the owner layout, present on that rank only). With equal segments (collectives
// that take equal counts only) every segment is padded at its tail to the longest.
//
// A window of the segments (a chunk moved by one collective when a bucket is split into
// several) is described the same way: see Window().
#ifndef MDOPT_KERNELS_COMMON_SEGMENT_MAP_H_
#define MDOPT_KERNELS_COMMON_SEGMENT_MAP_H_

#include <cstdint>
#include <vector>

#include "kernels/common/host_device.h"

namespace mdopt::kernels {

// The owned part of one rank's segment. `before` is the sum of `elems` of the entries of lower
// ranks (entries are sorted by rank), so a rank's start is found by one binary search.
struct OwnedPart {
  int32_t rank = 0;
  int64_t elems = 0;
  int64_t before = 0;
};

// A view of a segment map that device code can use (plain data: a pointer and counts).
struct SegmentView {
  int64_t rows = 0;              // elements of the rows part, on every rank
  int64_t equal = -1;            // >= 0: every segment is this long (tail padding after the real part)
  const OwnedPart* owned = nullptr;
  int32_t owned_count = 0;

  // The entry of rank r, or nullptr; *before gets the owned elements of lower ranks.
  MDOPT_HD const OwnedPart* Find(int r, int64_t* before) const {
    int32_t lo = 0, hi = owned_count;  // first entry with rank >= r
    while (lo < hi) {
      const int32_t mid = lo + (hi - lo) / 2;
      if (owned[mid].rank < r) lo = mid + 1; else hi = mid;
    }
    if (lo < owned_count) {
      *before = owned[lo].before;
      return owned[lo].rank == r ? &owned[lo] : nullptr;
    }
    *before = owned_count > 0 ? owned[owned_count - 1].before + owned[owned_count - 1].elems : 0;
    return nullptr;
  }
  // Elements of real data in rank r's segment (rows part plus its owned part).
  MDOPT_HD int64_t Real(int r) const {
    int64_t before = 0;
    const OwnedPart* p = Find(r, &before);
    return rows + (p != nullptr ? p->elems : 0);
  }
  // Elements rank r's segment occupies (tail padding included).
  MDOPT_HD int64_t Len(int r) const { return equal >= 0 ? equal : Real(r); }
  // Where rank r's segment starts in the rank-major buffer.
  MDOPT_HD int64_t Start(int r) const {
    if (equal >= 0) return static_cast<int64_t>(r) * equal;
    int64_t before = 0;
    Find(r, &before);
    return static_cast<int64_t>(r) * rows + before;
  }
};

// A copy between a param tensor and a bucket buffer (the collectives' pack and unpack).
//
// Plain (blocks == 0): `count` elements from tensor_offset to buffer_offset, then `pad` zeros
// (packing only).
//
// Strided (blocks > 0): one copy per rank r in [0, blocks), r != skip_rank — a rows-layout
// matrix's row blocks, one per rank's segment. Block r reads the tensor from
// tensor_offset + r * block_stride and writes the buffer at map.Start(r) + buffer_offset,
// `count` elements of which those before tensor element `tensor_end` (the matrix's end) are
// real and the rest padding (zeros when packing; skipped when unpacking).
struct CopySpan {
  int64_t param = 0;
  int64_t tensor_offset = 0;  // elements into the param tensor
  int64_t buffer_offset = 0;  // elements into the buffer (strided: into each segment)
  int64_t count = 0;          // elements copied (strided: per block, padding included)
  int64_t pad = 0;            // plain: zeros written after them (packing for a collective)
  int32_t blocks = 0;
  int32_t skip_rank = -1;
  int64_t block_stride = 0;
  int64_t tensor_end = 0;
};

// One block of a strided span: where it reads, where it writes, how many real elements.
struct SpanBlock {
  int64_t tensor = 0, buffer = 0, real = 0, pad = 0;
};
MDOPT_HD inline SpanBlock BlockOf(const CopySpan& c, const SegmentView& map, int r) {
  SpanBlock b;
  b.tensor = c.tensor_offset + static_cast<int64_t>(r) * c.block_stride;
  b.buffer = map.Start(r) + c.buffer_offset;
  int64_t real = c.tensor_end - b.tensor;
  real = real < 0 ? 0 : real > c.count ? c.count : real;
  b.real = real;
  b.pad = c.count - real;
  return b;
}

// The window [begin, begin + len) of every segment of `map`, as a map of its own (owned
// parts are written to `out_owned`, which must hold map.owned_count entries; the result
// points at it). A rank's window holds the part of its segment in that range.
MDOPT_HD inline SegmentView Window(const SegmentView& map, int64_t begin, int64_t len,
                                   OwnedPart* out_owned) {
  auto clamp = [](int64_t v, int64_t hi) { return v < 0 ? 0 : v > hi ? hi : v; };
  SegmentView w;
  w.rows = clamp(map.rows - begin, len);
  w.equal = map.equal >= 0 ? clamp(map.equal - begin, len) : -1;
  w.owned = out_owned;
  int64_t before = 0;
  for (int32_t i = 0; i < map.owned_count; ++i) {
    const OwnedPart& p = map.owned[i];
    const int64_t e = clamp(map.rows + p.elems - begin, len) - w.rows;
    if (e <= 0) continue;
    out_owned[w.owned_count++] = OwnedPart{p.rank, e, before};
    before += e;
  }
  return w;
}

// Elements of every segment of `map` together, over `world` ranks.
MDOPT_HD inline int64_t TotalOf(const SegmentView& map, int world) {
  if (map.equal >= 0) return static_cast<int64_t>(world) * map.equal;
  const int64_t owned = map.owned_count > 0
                            ? map.owned[map.owned_count - 1].before + map.owned[map.owned_count - 1].elems
                            : 0;
  return static_cast<int64_t>(world) * map.rows + owned;
}

// A segment map as the host keeps it: the rows part, equal padding, and the owned parts of
// the ranks that hold whole matrices in the bucket, sorted by rank.
struct SegmentMap {
  int64_t rows = 0;
  int64_t equal = -1;
  std::vector<OwnedPart> owned;
  SegmentView view() const {
    return SegmentView{rows, equal, owned.data(), static_cast<int32_t>(owned.size())};
  }
};

}  // namespace mdopt::kernels

#endif  // MDOPT_KERNELS_COMMON_SEGMENT_MAP_H_
