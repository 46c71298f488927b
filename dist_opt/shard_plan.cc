#include "dist_opt/shard_plan.h"

#include <algorithm>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "nlohmann/json.hpp"

namespace mdopt {

int64_t SlotPlan::RowBegin(int r) const {
  if (layout == Layout::kOwner) return r == owner ? 0 : m;
  return std::min(m, block_rows * r);
}

int64_t SlotPlan::RowEnd(int r) const {
  if (layout == Layout::kOwner) return r == owner ? m : m;
  return std::min(m, block_rows * (r + 1));
}

int64_t SlotPlan::PackedRows(int r) const {
  if (layout == Layout::kOwner) return r == owner ? m : 0;
  return block_rows;
}

double NsCost(int64_t m, int64_t n) {
  const double lo = static_cast<double>(std::min(m, n)), hi = static_cast<double>(std::max(m, n));
  return hi * lo * lo;
}

namespace {

// Longest-processing-time bin packing: items by weight (heaviest first, ties by index), each
// onto the least loaded rank (ties: the lowest rank). Deterministic, so every rank agrees.
void Pack(const std::vector<int>& items, const std::vector<double>& weight, std::vector<double>* load,
          std::vector<int>* owner) {
  std::vector<int> order = items;
  std::stable_sort(order.begin(), order.end(),
                   [&](int a, int b) { return weight[a] > weight[b]; });
  for (int item : order) {
    const int r = static_cast<int>(std::min_element(load->begin(), load->end()) - load->begin());
    (*owner)[item] = r;
    (*load)[r] += weight[item];
  }
}

}  // namespace

ShardPlan BuildShardPlan(const std::vector<ParamEntry>& params, const std::vector<Group>& groups,
                         const PlanOptions& o) {
  ShardPlan plan;
  const int N = std::max(1, o.world);
  plan.world = N;
  plan.equal_segments = o.equal_segments;
  plan.grad_comm_bytes = o.grad_comm_bytes;
  for (size_t i = 0; i < params.size(); ++i) {
    const ParamEntry& p = params[i];
    plan.first_slot.push_back(static_cast<int64_t>(plan.slots.size()));
    const Layout layout = p.ndim == 1 ? Layout::kOwner : ResolvedLayout(groups[p.group].spec);
    for (int64_t e = 0; e < p.experts; ++e) {
      SlotPlan s;
      s.param = static_cast<int64_t>(i);
      s.expert = e;
      s.m = p.m;
      s.n = p.n;
      s.layout = layout;
      s.muon = p.rule.base == kernels::Base::kMuon;
      s.block_rows = layout == Layout::kRows ? (p.m + N - 1) / N : p.m;
      if (layout == Layout::kRows && N > 1) {
        s.cross = CrossRecordLength(p.rule, p.n);
        s.radial = RadialRecordLength(p.rule, p.n);
      }
      plan.slots.push_back(s);
    }
  }

  // Owners. Newton-Schulz work (owner layout or not) is balanced over ranks by its cost;
  // whole Adam matrices and vectors by their elements (state memory and elementwise work).
  const size_t S = plan.slots.size();
  std::vector<double> ns_weight(S, 0.0), mem_weight(S, 0.0);
  std::vector<int> ns_items, mem_items, owner(S, 0);
  for (size_t k = 0; k < S; ++k) {
    const SlotPlan& s = plan.slots[k];
    if (s.muon) {
      ns_weight[k] = NsCost(s.m, s.n);
      ns_items.push_back(static_cast<int>(k));
    } else if (s.layout == Layout::kOwner) {
      mem_weight[k] = static_cast<double>(s.m * s.n);
      mem_items.push_back(static_cast<int>(k));
    }
  }
  std::vector<double> ns_load(N, 0.0), mem_load(N, 0.0);
  Pack(ns_items, ns_weight, &ns_load, &owner);
  Pack(mem_items, mem_weight, &mem_load, &owner);
  for (size_t k = 0; k < S; ++k) plan.slots[k].owner = owner[k];

  // Buckets: whole parameters, from the last registered to the first.
  plan.bucket_of_param.assign(params.size(), 0);
  std::vector<std::vector<int64_t>> bucket_params;
  int64_t bytes = 0;
  for (int64_t i = static_cast<int64_t>(params.size()) - 1; i >= 0; --i) {
    const ParamEntry& p = params[i];
    const int64_t pb = p.numel() * 4;
    bool fresh = bucket_params.empty();
    if (!fresh) {
      const ParamEntry& last = params[bucket_params.back().back()];
      fresh = bytes + pb > o.bucket_bytes || last.param_dtype != p.param_dtype ||
              last.grad_dtype != p.grad_dtype;
    }
    if (fresh) {
      bucket_params.emplace_back();
      bytes = 0;
    }
    bucket_params.back().push_back(i);
    bytes += pb;
  }
  for (const std::vector<int64_t>& members : bucket_params) {
    BucketPlan b;
    const int index = static_cast<int>(plan.buckets.size());
    // Pack in registration order within the bucket (members were collected in reverse).
    std::vector<int64_t> ordered(members.rbegin(), members.rend());
    b.first_param = ordered.front();
    b.end_param = ordered.back() + 1;
    b.param_dtype = params[ordered.front()].param_dtype;
    b.grad_dtype = params[ordered.front()].grad_dtype;
    for (int64_t i : ordered) {
      plan.bucket_of_param[i] = index;
      for (int64_t e = 0; e < params[i].experts; ++e) {
        const int k = static_cast<int>(plan.first_slot[i] + e);
        plan.slots[k].bucket = index;
        plan.slots[k].bucket_pos = static_cast<int64_t>(b.slots.size());
        b.slots.push_back(k);
      }
    }
    b.seg.assign(N, 0);
    b.offset.assign(b.slots.size() * N, 0);
    for (size_t k = 0; k < b.slots.size(); ++k) {
      const SlotPlan& s = plan.slots[b.slots[k]];
      for (int r = 0; r < N; ++r) {
        b.offset[k * N + r] = b.seg[r];
        b.seg[r] += s.PackedRows(r) * s.n;
      }
    }
    b.rows = b.seg;
    if (o.equal_segments) {
      const int64_t longest = *std::max_element(b.seg.begin(), b.seg.end());
      for (int r = 0; r < N; ++r) b.tail_pad += longest - b.seg[r];
      b.seg.assign(N, longest);
    }
    b.total = std::accumulate(b.seg.begin(), b.seg.end(), int64_t{0});
    plan.buckets.push_back(std::move(b));
  }
  return plan;
}

int64_t PaddingBytes(const ShardPlan& plan, const BucketPlan& b) {
  const int64_t w = b.param_dtype == Dtype::kF32 ? 4 : 2;
  return (plan.world - 1) * b.tail_pad * (plan.grad_comm_bytes + w);
}

int64_t CrossRecordLength(const kernels::UpdateRule& r, int64_t n) {
  int64_t c = (kernels::HasColGains(r.gains) ? n : 0) + (kernels::HasScalarGain(r.gains) ? 1 : 0);
  if (r.sphere == kernels::Sphere::kFrobenius) c += 1;
  if (r.sphere == kernels::Sphere::kCol) c += n;
  return c;
}

int64_t RadialRecordLength(const kernels::UpdateRule& r, int64_t n) {
  if (!r.tangent) return 0;
  if (r.sphere == kernels::Sphere::kFrobenius) return 2;
  if (r.sphere == kernels::Sphere::kCol) return 2 * n;
  return 0;
}

std::string ShardPlan::ToJson() const {
  nlohmann::json j;
  j["world"] = world;
  nlohmann::json slots_json = nlohmann::json::array();
  for (const SlotPlan& s : slots) {
    slots_json.push_back({{"param", s.param},
                          {"expert", s.expert},
                          {"m", s.m},
                          {"n", s.n},
                          {"layout", ToString(s.layout)},
                          {"muon", s.muon},
                          {"owner", s.owner},
                          {"block_rows", s.block_rows},
                          {"bucket", s.bucket},
                          {"cross", s.cross},
                          {"radial", s.radial}});
  }
  j["slots"] = std::move(slots_json);
  return j.dump();
}

std::string ShardPlan::Describe(const std::vector<ParamEntry>& params) const {
  std::string out = absl::StrFormat("shard plan: %d rank(s), %d matrices, %d bucket(s)\n", world,
                                    slots.size(), buckets.size());
  absl::StrAppendFormat(&out, "%-32s %6s %6s %6s %-6s %5s %6s %6s\n", "matrix", "m", "n",
                        "block", "layout", "muon", "owner", "bucket");
  for (const SlotPlan& s : slots) {
    const ParamEntry& p = params[s.param];
    std::string name = p.experts > 1 ? absl::StrCat(p.name, "[", s.expert, "]") : p.name;
    absl::StrAppendFormat(&out, "%-32s %6d %6d %6d %-6s %5s %6d %6d\n", name, s.m, s.n,
                          s.block_rows, ToString(s.layout), s.muon ? "yes" : "no", s.owner,
                          s.bucket);
  }
  std::vector<double> state(world, 0.0), ns(world, 0.0);
  for (const SlotPlan& s : slots) {
    for (int r = 0; r < world; ++r) state[r] += static_cast<double>(s.Rows(r) * s.n);
    if (s.muon) ns[s.owner] += NsCost(s.m, s.n);
  }
  int64_t pad = 0, pad_bytes = 0;
  for (size_t b = 0; b < buckets.size(); ++b) {
    const BucketPlan& bp = buckets[b];
    absl::StrAppendFormat(&out, "bucket %d: params [%d, %d), %d matrices, %d elements per rank segment (max), %d in all",
                          b, bp.first_param, bp.end_param, bp.slots.size(),
                          *std::max_element(bp.seg.begin(), bp.seg.end()), bp.total);
    if (equal_segments) {
      absl::StrAppendFormat(&out, ", tail padding %d elements (+%d B per step on the wire)",
                            bp.tail_pad, PaddingBytes(*this, bp));
    }
    out += "\n";
    pad += bp.tail_pad;
    pad_bytes += PaddingBytes(*this, bp);
  }
  if (equal_segments) {
    absl::StrAppendFormat(&out,
                          "segments padded to equal counts (comm_pad): %d elements of tail "
                          "padding, +%d B per step on the wire over all ranks\n",
                          pad, pad_bytes);
  } else if (world > 1) {
    out += "segments not padded (comm_pad): a bucket's segments may differ in length\n";
  }
  auto imbalance = [](const std::vector<double>& v) {
    const double mean = std::accumulate(v.begin(), v.end(), 0.0) / static_cast<double>(v.size());
    return mean > 0 ? *std::max_element(v.begin(), v.end()) / mean : 1.0;
  };
  for (int r = 0; r < world; ++r) {
    absl::StrAppendFormat(&out, "rank %d: %.0f state elements, NS cost %.3g\n", r, state[r], ns[r]);
  }
  absl::StrAppendFormat(&out, "imbalance (max/mean): state %.3f, NS %.3f\n", imbalance(state),
                        imbalance(ns));
  return out;
}

}  // namespace mdopt
