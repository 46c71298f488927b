// This rank's part of a shard plan as a backend is told it (backend_config.h).
#include "dist_opt/backend_config.h"

#include <algorithm>

#include "dist_opt/schedule.h"
#include "kernels/common/grad_presence.h"

namespace mdopt {
namespace {

// Window w of bucket bp's segments: its part of every rank's segment in the staging buffer
// and the copies that fill and empty it. A rows-layout matrix is one strided span over every
// rank's block (O(1), not O(N)); a whole matrix one plain span at its owner's part.
kernels::CommChunk WindowOf(const ShardPlan& plan, const BucketPlan& bp, int w, int rank,
                           bool sharded, bool segmented) {
  const int world = plan.world;
  kernels::CommChunk ch;
  const int64_t begin = static_cast<int64_t>(w) * bp.window, end = begin + bp.window;
  std::vector<kernels::OwnedPart> owned(bp.map.owned.size());
  const kernels::SegmentView v = kernels::Window(bp.map.view(), begin, bp.window, owned.data());
  owned.resize(static_cast<size_t>(v.owned_count));
  ch.map = kernels::SegmentMap{v.rows, v.equal, std::move(owned)};
  const kernels::SegmentView wv = ch.map.view();
  ch.seg_begin = begin;
  ch.total = kernels::TotalOf(wv, world);
  for (int k : bp.slots) {
    const SlotPlan& sp = plan.slots[k];
    const bool rows = sp.layout == Layout::kRows;
    const int64_t len = rows ? sp.block_rows * sp.n : sp.m * sp.n;
    const int64_t a = std::max(begin, sp.seg_pos), b = std::min(end, sp.seg_pos + len);
    if (a >= b) continue;
    const int64_t tensor = sp.TensorOffset() + (a - sp.seg_pos);
    if (rows) {
      kernels::CopySpan span;
      span.param = sp.param;
      span.tensor_offset = tensor;
      span.buffer_offset = a - begin;
      span.count = b - a;
      span.blocks = world;
      span.block_stride = sp.block_rows * sp.n;
      span.tensor_end = sp.TensorOffset() + sp.m * sp.n;
      if (segmented) ch.grad_pack.push_back(span);
      if (!sharded) continue;
      const kernels::SpanBlock own = kernels::BlockOf(span, wv, rank);
      if (own.real > 0) ch.weight_pack.push_back({sp.param, own.tensor, own.buffer, own.real, 0});
      span.skip_rank = rank;
      ch.weight_unpack.push_back(span);
      continue;
    }
    const kernels::CopySpan span{sp.param, tensor, wv.Start(sp.owner) + (a - begin), b - a, 0};
    if (segmented) ch.grad_pack.push_back(span);
    if (sharded) (sp.owner == rank ? ch.weight_pack : ch.weight_unpack).push_back(span);
  }
  return ch;
}

}  // namespace

kernels::BackendConfig DescribeRank(const ShardPlan& plan, const std::vector<ParamEntry>& params,
                                    const std::vector<Group>& groups, const EngineOptions& opt,
                                    int rank) {
  const int world = plan.world;
  const bool sharded = world > 1, segmented = sharded && !opt.grads_reduced;
  kernels::BackendConfig c;
  c.groups = static_cast<int>(groups.size());
  c.pipeline = static_cast<int>(std::min<size_t>(std::max<size_t>(plan.buckets.size(), 1),
                                                 kScheduleStages));
  c.sharded = sharded;
  c.grads_segmented = segmented;
  c.grad_comm_bf16 = opt.grad_comm_bf16;
  c.ns_comm_bf16 = opt.ns_comm_bf16;
  c.ns_bf16 = opt.ns_bf16;
  c.ns_form = opt.ns_form;
  c.update_norms = opt.update_norms;
  c.grads_agree = sharded && !segmented;
  c.check_len = kernels::CheckRecordLength(static_cast<int64_t>(params.size()));
  for (const ParamEntry& p : params) {
    kernels::ParamDesc d;
    d.name = p.name;
    d.group = p.group;
    d.experts = p.experts;
    d.n = p.n;
    d.row_map = p.row_map;
    d.param_dtype = p.param_dtype;
    d.grad_dtype = p.grad_dtype;
    d.rule = p.rule;
    d.preserve_init = p.preserve_init;
    c.params.push_back(d);
  }
  c.slots.resize(plan.slots.size());
  for (size_t k = 0; k < plan.slots.size(); ++k) {
    const SlotPlan& sp = plan.slots[k];
    kernels::SlotDesc& s = c.slots[k];
    s.param = sp.param;
    s.bucket = sp.bucket;
    s.m = sp.m;
    s.tensor_offset = sp.TensorOffset();
    s.row_begin = sp.RowBegin(rank);
    s.rows = sp.Rows(rank);
    s.holds = s.rows > 0 || sp.layout == Layout::kRows;
    s.cross = sp.layout == Layout::kRows && sharded;
    s.muon = sp.muon;
    s.ns_here = sp.muon && sp.owner == rank;
    s.ns_gathered = s.ns_here && sp.layout == Layout::kRows && sharded;
    // Each matrix is counted by one rank: its owner, or rank 0 (which always holds rows).
    s.accounts = sp.layout == Layout::kOwner ? sp.owner == rank : rank == 0;
    s.seg_offset = sp.seg_pos;
    // blocks=rows:K: the K slots of a matrix share its column and scalar gains.
    const ParamEntry& pe = params[sp.param];
    const kernels::Gains gains = pe.rule.gains;
    if (pe.blocks > 1 && (kernels::HasColGains(gains) || kernels::HasScalarGain(gains))) {
      s.gain_blocks = static_cast<int>(pe.blocks);
      s.gain_block = static_cast<int>(sp.expert % pe.blocks);
    }
  }
  for (size_t b = 0; b < plan.buckets.size(); ++b) {
    const BucketPlan& bp = plan.buckets[b];
    kernels::BucketDesc d;
    d.slots = bp.slots;
    d.first_param = bp.first_param;
    d.end_param = bp.end_param;
    d.param_dtype = bp.param_dtype;
    d.seg = bp.Seg(rank);
    for (int w = 0; w < bp.Windows(); ++w) d.chunks.push_back(WindowOf(plan, bp, w, rank, sharded, segmented));
    for (size_t q = 0; q < bp.slots.size(); ++q) {
      const int k = bp.slots[q];
      const SlotPlan& sp = plan.slots[k];
      kernels::SlotDesc& s = c.slots[k];
      if (sp.muon) {
        d.x_local = std::max(d.x_local, s.seg_offset + sp.PackedRows(rank) * sp.n);
      }
      if (s.cross) {
        s.cross_offset = d.cross_len;
        d.cross_len += sp.cross;
        s.radial_offset = d.radial_len;
        d.radial_len += sp.radial;
      }
      if (s.ns_gathered) {
        s.full_offset = d.full;
        for (int r = 0; r < world; ++r) {
          if (r != rank && sp.Rows(r) > 0)
            d.full_remote.push_back({d.full + sp.RowBegin(r) * sp.n, sp.Rows(r) * sp.n});
        }
        d.full += sp.m * sp.n;
      } else if (sp.muon && sp.layout == Layout::kRows && sharded && s.rows > 0) {
        d.local_remote.push_back({s.seg_offset, s.rows * sp.n});
      }
    }
    c.buckets.push_back(std::move(d));
  }
  return c;
}

}  // namespace mdopt
