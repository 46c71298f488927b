#include "dist_opt/shard_plan.h"

#include <algorithm>
#include <functional>
#include <map>
#include <numeric>
#include <queue>
#include <utility>

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
// onto the least loaded rank (ties: the lowest rank), through a min-heap of rank loads:
// O(items log items + items log N). Deterministic, so every rank agrees.
void Pack(std::vector<int> items, const std::vector<double>& weight, int world,
          std::vector<int>* owner) {
  std::stable_sort(items.begin(), items.end(),
                   [&](int a, int b) { return weight[a] > weight[b]; });
  using Load = std::pair<double, int>;  // (load, rank): the heap's top is the least loaded
  std::priority_queue<Load, std::vector<Load>, std::greater<Load>> heap;
  // Only as many ranks as items can receive one: the rest stay at zero load.
  const int ranks = static_cast<int>(std::min<size_t>(static_cast<size_t>(world), items.size()));
  for (int r = 0; r < ranks; ++r) heap.push({0.0, r});
  for (int item : items) {
    Load top = heap.top();
    heap.pop();
    (*owner)[item] = top.second;
    top.first += weight[item];
    heap.push(top);
  }
}

// Buckets as runs of slots: whole parameters from the last registered to the first, about
// bucket_bytes of f32 state each; a parameter larger than that gets buckets of its own (an
// expert stack split by experts).
struct SlotRun {
  int64_t first_param = 0, end_param = 0;
  std::vector<int> slots;
};
std::vector<SlotRun> FormBuckets(const std::vector<ParamEntry>& params, const ShardPlan& plan,
                                 int64_t bucket_bytes) {
  std::vector<SlotRun> runs;
  int64_t bytes = 0;
  bool open = false;  // the last run takes more whole parameters
  for (int64_t i = static_cast<int64_t>(params.size()) - 1; i >= 0; --i) {
    const ParamEntry& p = params[i];
    const int64_t pb = p.numel() * 4;
    if (pb > bucket_bytes) {
      // Its own buckets: experts in runs that fit (at least one expert each). A matrix of K
      // row blocks (blocks=rows:K) is K slots that sum their column/scalar-gain gradients
      // in Finish, so a run never splits one: runs are whole matrices, multiples of K slots.
      const int64_t K = std::max<int64_t>(1, p.blocks);
      const int64_t eb = p.matrix_m * p.n * 4;
      const int64_t per = K * std::max<int64_t>(1, bucket_bytes / std::max<int64_t>(eb, 1));
      for (int64_t e0 = 0; e0 < p.experts; e0 += per) {
        SlotRun r{i, i + 1, {}};
        for (int64_t e = e0; e < std::min(p.experts, e0 + per); ++e)
          r.slots.push_back(static_cast<int>(plan.first_slot[i] + e));
        runs.push_back(std::move(r));
      }
      open = false;
      continue;
    }
    bool fresh = !open;
    if (!fresh) {
      const ParamEntry& last = params[runs.back().first_param];
      fresh = bytes + pb > bucket_bytes || last.param_dtype != p.param_dtype ||
              last.grad_dtype != p.grad_dtype;
    }
    if (fresh) {
      runs.push_back(SlotRun{i, i + 1, {}});
      bytes = 0;
      open = true;
    }
    runs.back().first_param = i;
    bytes += pb;
  }
  // Pack in registration order within a run of whole parameters.
  for (SlotRun& r : runs) {
    if (!r.slots.empty()) continue;
    for (int64_t i = r.first_param; i < r.end_param; ++i)
      for (int64_t e = 0; e < params[i].experts; ++e)
        r.slots.push_back(static_cast<int>(plan.first_slot[i] + e));
  }
  return runs;
}

}  // namespace

void BucketPlan::WindowCounts(int w, int world, int64_t* counts) const {
  const kernels::SegmentView v = map.view();
  const int64_t begin = static_cast<int64_t>(w) * window;
  for (int r = 0; r < world; ++r) counts[r] = std::clamp<int64_t>(v.Len(r) - begin, 0, window);
}

std::vector<int64_t> BucketPlan::WindowCounts(int w, int world) const {
  std::vector<int64_t> counts(static_cast<size_t>(world));
  WindowCounts(w, world, counts.data());
  return counts;
}

ShardPlan BuildShardPlan(const std::vector<ParamEntry>& params, const std::vector<Group>& groups,
                         const PlanOptions& o) {
  ShardPlan plan;
  const int N = std::max(1, o.world);
  plan.world = N;
  plan.equal_segments = o.equal_segments;
  plan.grad_comm_bytes = o.grad_comm_bytes;
  plan.bucket_bytes = o.bucket_bytes;
  for (size_t i = 0; i < params.size(); ++i) {
    const ParamEntry& p = params[i];
    plan.first_slot.push_back(static_cast<int64_t>(plan.slots.size()));
    Layout layout = p.ndim == 1 ? Layout::kOwner : ResolvedLayout(groups[p.group].spec);
    // See the header: held whole when segments may differ; with equal segments an owner's
    // matrix would pad every other rank's segment to its size, N times its volume.
    // (Blocks of one param may differ in height; the smallest decides, so that a matrix's
    // blocks share a layout and its K slots stay one bin-packing item in the owner layout.)
    int64_t min_m = p.block_m[0];
    for (int64_t h : p.block_m) min_m = std::min(min_m, h);
    if (layout == Layout::kRows && min_m < N && !o.equal_segments) layout = Layout::kOwner;
    for (int64_t e = 0; e < p.experts; ++e) {
      SlotPlan s;
      s.param = static_cast<int64_t>(i);
      s.expert = e;
      s.m = p.SlotM(e);
      s.row0 = p.SlotRow0(e);
      s.n = p.n;
      s.layout = layout;
      s.muon = p.rule.base == kernels::Base::kMuon;
      s.block_rows = layout == Layout::kRows ? (s.m + N - 1) / N : s.m;
      if (layout == Layout::kRows && N > 1) {
        s.cross = CrossRecordLength(p.rule, p.n);
        s.radial = RadialRecordLength(p.rule, p.n);
      }
      plan.slots.push_back(s);
    }
  }

  // Owners: every Muon matrix (its Newton-Schulz) and every whole matrix (its state). A
  // rank's load is its share of all NS cost plus its share of all whole-matrix state, so
  // both are balanced together.
  const size_t S = plan.slots.size();
  double ns_total = 0.0, bytes_total = 0.0;
  for (const SlotPlan& s : plan.slots) {
    if (s.muon) ns_total += NsCost(s.m, s.n);
    if (s.layout == Layout::kOwner) bytes_total += static_cast<double>(s.m * s.n);
  }
  // The K row blocks of one owner-layout matrix (blocks=rows:K) are one item: they share
  // column and scalar gains, whose gradient is summed over the K slots where they are held.
  // `lead[k]` is the slot whose owner slot k takes (itself, or its matrix's block 0).
  std::vector<double> weight(S, 0.0);
  std::vector<int> items, owner(S, 0), lead(S, 0);
  for (size_t k = 0; k < S; ++k) {
    const SlotPlan& s = plan.slots[k];
    const int64_t K = std::max<int64_t>(1, params[s.param].blocks);
    const bool grouped = s.layout == Layout::kOwner && K > 1;
    lead[k] = grouped ? static_cast<int>(k - s.expert % K) : static_cast<int>(k);
    if (!s.muon && s.layout != Layout::kOwner) continue;
    double w = 0.0;
    if (s.muon) w += NsCost(s.m, s.n) / ns_total;
    if (s.layout == Layout::kOwner) w += static_cast<double>(s.m * s.n) / bytes_total;
    weight[lead[k]] += w;
    if (lead[k] == static_cast<int>(k)) items.push_back(static_cast<int>(k));
  }
  Pack(std::move(items), weight, N, &owner);
  for (size_t k = 0; k < S; ++k) plan.slots[k].owner = owner[lead[k]];

  plan.bucket_of_param.assign(params.size(), 0);
  for (SlotRun& run : FormBuckets(params, plan, o.bucket_bytes)) {
    BucketPlan b;
    const int index = static_cast<int>(plan.buckets.size());
    b.first_param = run.first_param;
    b.end_param = run.end_param;
    b.param_dtype = params[run.first_param].param_dtype;
    b.grad_dtype = params[run.first_param].grad_dtype;
    b.slots = std::move(run.slots);
    // The rows part first, then each owner's matrices in slot order.
    std::map<int, int64_t> owned;
    for (size_t q = 0; q < b.slots.size(); ++q) {
      SlotPlan& s = plan.slots[b.slots[q]];
      s.bucket = index;
      s.bucket_pos = static_cast<int64_t>(q);
      if (s.layout == Layout::kRows) {
        s.seg_pos = b.map.rows;
        b.map.rows += s.block_rows * s.n;
        b.row_pad += (N * s.block_rows - s.m) * s.n;
      }
    }
    for (int q : b.slots) {
      SlotPlan& s = plan.slots[q];
      if (s.layout != Layout::kOwner) continue;
      int64_t& at = owned[s.owner];
      s.seg_pos = b.map.rows + at;
      at += s.m * s.n;
    }
    int64_t before = 0, most = 0;
    for (const auto& [rank, elems] : owned) {
      b.map.owned.push_back(kernels::OwnedPart{rank, elems, before});
      before += elems;
      most = std::max(most, elems);
    }
    b.longest = b.map.rows + most;
    const int64_t real = N * b.map.rows + before;
    if (o.equal_segments && N > 1) {
      b.map.equal = b.longest;
      b.total = N * b.longest;
      b.tail_pad = b.total - real;
    } else {
      b.total = real;
    }
    // A bucket over bucket_bytes is one parameter (FormBuckets): window its collectives so
    // that one window of every rank's segment together stays within bucket_bytes: the widest
    // window W whose staging, sum over ranks of min(segment, W), fits (binary search; the
    // sum needs only the rows part and the owned parts).
    const int64_t elems = std::max<int64_t>(1, o.bucket_bytes / 4);
    b.window = std::max<int64_t>(b.longest, 1);
    if (N > 1 && b.total > elems) {
      const kernels::SegmentView v = b.map.view();
      auto staging = [&](int64_t w) {
        if (v.equal >= 0) return N * std::min(v.equal, w);
        int64_t sum = (N - v.owned_count) * std::min(v.rows, w);
        for (int32_t i = 0; i < v.owned_count; ++i) sum += std::min(v.rows + v.owned[i].elems, w);
        return sum;
      };
      int64_t lo = 1, hi = b.longest;  // staging(lo) <= elems unless N > elems
      while (lo < hi) {
        const int64_t mid = lo + (hi - lo + 1) / 2;
        if (staging(mid) <= elems) lo = mid; else hi = mid - 1;
      }
      b.window = lo;
    }
    for (int64_t i = b.first_param; i < b.end_param; ++i) {
      if (plan.slots[plan.first_slot[i]].bucket == index) plan.bucket_of_param[i] = index;
    }
    plan.buckets.push_back(std::move(b));
  }
  return plan;
}

void ShardPlan::Loads(std::vector<double>* state, std::vector<double>* ns) const {
  // Rows-layout slots add a full block to ranks [0, full) and the rest to rank `full`: a
  // difference array keeps that O(1) per slot.
  std::vector<double> diff(static_cast<size_t>(world) + 1, 0.0);
  state->assign(static_cast<size_t>(world), 0.0);
  ns->assign(static_cast<size_t>(world), 0.0);
  for (const SlotPlan& s : slots) {
    if (s.muon) (*ns)[s.owner] += NsCost(s.m, s.n);
    if (s.layout == Layout::kOwner) {
      (*state)[s.owner] += static_cast<double>(s.m * s.n);
      continue;
    }
    const int64_t full = std::min<int64_t>(world, s.m / s.block_rows);
    diff[0] += static_cast<double>(s.block_rows * s.n);
    diff[full] -= static_cast<double>(s.block_rows * s.n);
    if (full < world) (*state)[full] += static_cast<double>((s.m - full * s.block_rows) * s.n);
  }
  double run = 0.0;
  for (int r = 0; r < world; ++r) {
    run += diff[r];
    (*state)[r] += run;
  }
}

int64_t ShardPlan::Bytes() const {
  int64_t b = static_cast<int64_t>(sizeof(ShardPlan) + slots.capacity() * sizeof(SlotPlan) +
                                   first_slot.capacity() * sizeof(int64_t) +
                                   bucket_of_param.capacity() * sizeof(int) +
                                   buckets.capacity() * sizeof(BucketPlan));
  for (const BucketPlan& bp : buckets) {
    b += static_cast<int64_t>(bp.slots.capacity() * sizeof(int) +
                              bp.map.owned.capacity() * sizeof(kernels::OwnedPart));
  }
  return b;
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
  std::vector<double> state, ns;
  Loads(&state, &ns);
  int64_t pad = 0, pad_bytes = 0;
  for (size_t b = 0; b < buckets.size(); ++b) {
    const BucketPlan& bp = buckets[b];
    absl::StrAppendFormat(&out, "bucket %d: params [%d, %d), %d matrices, %d elements per rank segment (max), %d in all, %d of row padding",
                          b, bp.first_param, bp.end_param, bp.slots.size(), bp.longest, bp.total,
                          bp.row_pad);
    if (bp.Windows() > 1) {
      absl::StrAppendFormat(&out, ", %d windows of %d elements per segment", bp.Windows(),
                            bp.window);
    }
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
  if (world <= 16) {
    for (int r = 0; r < world; ++r) {
      absl::StrAppendFormat(&out, "rank %d: %.0f state elements, NS cost %.3g\n", r, state[r], ns[r]);
    }
  } else {
    auto [slo, shi] = std::minmax_element(state.begin(), state.end());
    auto [nlo, nhi] = std::minmax_element(ns.begin(), ns.end());
    absl::StrAppendFormat(&out, "per rank: %.0f to %.0f state elements, NS cost %.3g to %.3g\n",
                          *slo, *shi, *nlo, *nhi);
  }
  absl::StrAppendFormat(&out, "imbalance (max/mean): state %.3f, NS %.3f\n", imbalance(state),
                        imbalance(ns));
  return out;
}

}  // namespace mdopt
