// The CUDA backend's copy and check tables (span_tables.h).
#include "kernels/cuda/span_tables.h"

#include <map>

namespace mdopt::kernels::cuda {

SpanTable BuildSpanTable(const std::vector<CopySpan>& spans, const std::vector<ParamDesc>& params,
                         bool to_buffer, bool grads) {
  SpanTable t;
  for (const CopySpan& c : spans) {
    // Elements per rank block (per plain span): unpacking skips the padding, which a plain
    // span holds after `count` and a strided one inside `count` (BlockOf's pad).
    const int64_t len = c.count + (to_buffer && c.blocks == 0 ? c.pad : 0);
    int64_t ranks = 1;
    if (c.blocks > 0) ranks = c.blocks - (c.skip_rank >= 0 && c.skip_rank < c.blocks ? 1 : 0);
    if (len <= 0 || ranks <= 0) continue;
    DevCopySpan d;
    d.span = c;
    d.first_block = t.blocks;
    d.pieces = (len + kCopyPiece - 1) / kCopyPiece;
    const ParamDesc& p = params[static_cast<size_t>(c.param)];
    d.tensor_bf16 = (grads ? p.grad_dtype : p.param_dtype) == Dtype::kBf16;
    d.mapped = !p.row_map.identity();
    d.n = p.n;
    t.host.push_back(d);
    t.blocks += ranks * d.pieces;
  }
  return t;
}

ParamChecks BuildParamChecks(const BucketDesc& bd, const std::vector<SlotDesc>& slots,
                             const std::vector<int64_t>& first_slot) {
  // Groups in the order of each param's first appearance, slots in bucket order within.
  std::vector<int64_t> order;                // params, by first appearance
  std::map<int64_t, std::vector<int32_t>> by_param;
  for (const int k : bd.slots) {
    const int64_t param = slots[static_cast<size_t>(k)].param;
    std::vector<int32_t>& list = by_param[param];
    if (list.empty()) order.push_back(param);
    list.push_back(k);
  }
  ParamChecks out;
  for (const int64_t param : order) {
    DevParamCheck c;
    c.param = param;
    c.q0 = static_cast<int32_t>(out.slots.size());
    for (const int32_t k : by_param[param]) {
      out.slots.push_back(k);
      if (k == first_slot[static_cast<size_t>(param)]) c.sets = 1;
    }
    c.q1 = static_cast<int32_t>(out.slots.size());
    out.entries.push_back(c);
  }
  return out;
}

}  // namespace mdopt::kernels::cuda
