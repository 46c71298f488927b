// The tables the CUDA backend uploads for the collectives' copies and for the finite check,
// built on the host from the plan (kernels/backend.h). Their size follows the plan's lists,
// never slots x ranks: a strided span (a rows-layout matrix's row block in every rank's
// segment) stays one entry, expanded per rank by the kernel (stage_kernels.h, DevCopySpan).
#ifndef MDOPT_KERNELS_CUDA_SPAN_TABLES_H_
#define MDOPT_KERNELS_CUDA_SPAN_TABLES_H_

#include <cstdint>
#include <vector>

#include "kernels/backend.h"
#include "kernels/cuda/stage_kernels.h"

namespace mdopt::kernels::cuda {

// One window's spans in one direction, and the CUDA blocks of its launch.
struct SpanTable {
  std::vector<DevCopySpan> host;
  int64_t blocks = 0;
  DevCopySpan* dev = nullptr;  // in the arena
};

// The launch table of `spans`: spans with nothing to move are left out, each of the others
// gets its first block. to_buffer: packing (a plain span's padding is written too), else
// unpacking. grads: the tensor side is the gradient (its dtype), else the param.
SpanTable BuildSpanTable(const std::vector<CopySpan>& spans, const std::vector<ParamDesc>& params,
                         bool to_buffer, bool grads);

// The finite check of a bucket: one entry per param with slots in it, over `slots`, the
// bucket's slots grouped by param (in their order otherwise), so that one thread sums a
// param's slots even if the bucket's list interleaves params. `first_slot[param]` is the
// param's first slot overall: the entry holding it sets the param's check value, the others
// (later buckets of a split expert stack) add to it.
struct ParamChecks {
  std::vector<DevParamCheck> entries;
  std::vector<int32_t> slots;
};
ParamChecks BuildParamChecks(const BucketDesc& bd, const std::vector<SlotDesc>& slots,
                             const std::vector<int64_t>& first_slot);

}  // namespace mdopt::kernels::cuda

#endif  // MDOPT_KERNELS_CUDA_SPAN_TABLES_H_
