#include "collective_cost.h"

#include <algorithm>
#include <cmath>

namespace mdopt_sim {

double RingLatency(const Hardware& hw, const Topology& t) {
  if (t.ranks <= 1) return 0.0;
  if (t.OneNode()) return (t.ranks - 1) * hw.intra_latency_us * 1e-6;
  // A hierarchical ring: G - 1 NVLink steps inside each node, nodes - 1 network steps.
  return ((t.per_node - 1) * hw.intra_latency_us + (t.Nodes() - 1) * hw.inter_latency_us) * 1e-6;
}

double BusBandwidth(const Hardware& hw, const Topology& t) {
  return (t.OneNode() ? hw.intra_busbw_gbps : hw.inter_busbw_gbps) * 1e9;
}

double ReduceScatterTime(const Hardware& hw, const Topology& t, double segment_bytes) {
  if (t.ranks <= 1) return 0.0;
  return hw.kernel_us * 1e-6 + RingLatency(hw, t) +
         (t.ranks - 1) * segment_bytes / BusBandwidth(hw, t);
}

double AllGatherTime(const Hardware& hw, const Topology& t, double segment_bytes) {
  return ReduceScatterTime(hw, t, segment_bytes);  // the same ring, the other way
}

double AllReduceTime(const Hardware& hw, const Topology& t, double bytes) {
  if (t.ranks <= 1) return 0.0;
  const double bandwidth = 2.0 * (t.ranks - 1) / t.ranks * bytes / BusBandwidth(hw, t);
  double latency = 2.0 * RingLatency(hw, t);
  if (hw.all_reduce == Algo::kTree) {
    // Chains inside the nodes, a double binary tree over the nodes: up and down.
    const int intra = std::min(t.ranks, t.per_node) - 1;
    const double levels = t.OneNode() ? 0.0 : std::ceil(std::log2(static_cast<double>(t.Nodes())));
    latency = 2.0 * (intra * hw.intra_latency_us + levels * hw.inter_latency_us) * 1e-6;
  }
  return hw.kernel_us * 1e-6 + latency + bandwidth;
}

double PointToPointTime(const Hardware& hw, const Topology& t, double intra_bytes,
                        double inter_bytes) {
  if (t.ranks <= 1 || intra_bytes + inter_bytes <= 0) return 0.0;
  const double latency = (inter_bytes > 0 ? hw.inter_latency_us : hw.intra_latency_us) * 1e-6;
  return hw.kernel_us * 1e-6 + latency +
         std::max(intra_bytes / (hw.intra_p2p_gbps * 1e9), inter_bytes / (hw.inter_p2p_gbps * 1e9));
}

}  // namespace mdopt_sim
