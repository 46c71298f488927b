// Time of one collective on N GPUs, G to a node, from a hardware file: the alpha-beta model
// of NCCL's algorithms (docs/mdopt-sim.md, "Collectives"). Hierarchical: within a node the
// ring runs over NVLink, across nodes its node-crossing steps run at the network's bus
// bandwidth; a tree all-reduce pays log2(nodes) latencies across nodes instead of a ring's
// nodes - 1. Bus bandwidth is NCCL's: a ring reduce-scatter of S bytes per rank takes
// (N - 1) S / busbw.
#ifndef MDOPT_INTEGRATION_TOOLS_SIM_COLLECTIVE_COST_H_
#define MDOPT_INTEGRATION_TOOLS_SIM_COLLECTIVE_COST_H_

#include "hardware.h"

namespace mdopt_sim {

struct Topology {
  int ranks = 1;
  int per_node = 8;
  int Nodes() const { return (ranks + per_node - 1) / per_node; }
  bool OneNode() const { return ranks <= per_node; }
};

// Seconds. 0 at one rank (nothing is communicated). `segment_bytes`: each rank's share (its
// output of a reduce-scatter, its input of an all-gather); `bytes`: the all-reduce's buffer.
double RingLatency(const Hardware& hw, const Topology& t);   // (N-1) ring steps' latency
double BusBandwidth(const Hardware& hw, const Topology& t);  // bytes / s
double ReduceScatterTime(const Hardware& hw, const Topology& t, double segment_bytes);
double AllGatherTime(const Hardware& hw, const Topology& t, double segment_bytes);
double AllReduceTime(const Hardware& hw, const Topology& t, double bytes);
// Point-to-point into (or out of) one GPU: `intra_bytes` from its node's GPUs, `inter_bytes`
// from other nodes', all at once (a grouped send/recv): the slower of its two links.
double PointToPointTime(const Hardware& hw, const Topology& t, double intra_bytes,
                        double inter_bytes);

}  // namespace mdopt_sim

#endif  // MDOPT_INTEGRATION_TOOLS_SIM_COLLECTIVE_COST_H_
