// mdopt's step schedule (dist_opt/schedule.cc) priced on a hardware file: the real shard plan
// (BuildShardPlan, the library's planner), each bucket's collectives, elementwise passes and
// Newton-Schulz timed by the cost model, then played through the five-stage wave schedule on
// two in-order queues (compute, communication) after a trainer backward that releases the
// buckets' gradients one by one. docs/mdopt-sim.md derives every term.
#ifndef MDOPT_INTEGRATION_TOOLS_SIM_STEP_SIM_H_
#define MDOPT_INTEGRATION_TOOLS_SIM_STEP_SIM_H_

#include <cstdint>
#include <utility>
#include <vector>

#include "collective_cost.h"
#include "dist_opt/group_spec.h"
#include "dist_opt/param_registry.h"
#include "dist_opt/shard_plan.h"
#include "hardware.h"
#include "kernels/common/ns_coeffs.h"

namespace mdopt_sim {

struct SimOptions {
  Topology topo;
  int64_t bucket_bytes = int64_t{32} << 20;
  bool equal_segments = true;  // NCCL pads segments (comm_pad=auto); MPI leaves them unequal
  bool grad_comm_bf16 = false;
  bool ns_comm_bf16 = false;
  bool grads_reduced = false;
  bool gather_deferred = false;
  mdopt::kernels::NsForm ns_form = mdopt::kernels::NsForm::kAuto;
  bool ns_batched = false;  // one launch per (owner, shape) group instead of per matrix
  // The trainer: tokens per GPU per step, model FLOPs utilisation of forward + backward, and
  // the experts each token visits (3-D expert stacks count top_k / experts of their FLOPs).
  double tokens_per_gpu = 16384;
  double mfu = 0.40;
  int moe_top_k = 2;
  bool with_backward = true;  // false: the step alone (gradients reduced before it starts)
};

// One bucket's costs, seconds, on the slowest rank of each stage (collectives synchronise).
struct BucketCost {
  double backward = 0;       // the trainer's backward of this bucket's params
  double reduce_scatter = 0; // all windows
  double check = 0;          // CheckFinite: read the reduced gradient
  double pass1 = 0, newton_schulz = 0, pass2 = 0, finish = 0, unpack = 0;
  double gather = 0, scatter = 0;  // NS send/recv to the owners
  double cross = 0;                // the float64 record's all-reduce
  double all_gather = 0;           // all windows
  double ns_flops = 0;             // on the busiest owner
  // Newton-Schulz seconds per owning rank: every rank has its own compute queue, so the
  // owners of consecutive buckets run theirs side by side.
  std::vector<std::pair<int, double>> ns_owners;
};

struct StepEstimate {
  std::vector<BucketCost> buckets;
  double forward_backward = 0;  // the trainer's, seconds
  double step = 0;              // from the end of backward to the last weight in place
  double compute = 0;           // the step's compute queue busy time
  double exposed_comm = 0;      // step - compute: the compute queue waiting on collectives
  double comm_total = 0;        // every collective of the step, backward's included
  double iteration = 0;         // forward_backward + step
  double bytes_mean = 0;        // bytes a rank sends per step, mean over ranks
  double bytes_max = 0;         // the most of the sampled ranks (rank 0, most loaded, last)
  double state_max = 0;         // optimizer state bytes of the fullest sampled rank
  double ns_flops_max = 0;      // Newton-Schulz FLOPs of the busiest owner, whole step
};

// Bytes rank r puts on the wire in one step, by comm/traffic.h's formulas applied to the
// calls the schedule makes (its windows' counts, its send/recv lists, its records).
int64_t RankBytesSent(const mdopt::ShardPlan& plan, const std::vector<mdopt::ParamEntry>& params,
                      const SimOptions& o, int rank);

// Newton-Schulz FLOPs of an m x n matrix, K iterations, in the form the engine picks.
double NsFlops(int64_t m, int64_t n, int steps, mdopt::kernels::NsForm form);
// The GEMM rate class of a product whose smaller side is s: TFLOP/s.
double GemmRate(const Hardware& hw, int64_t s);

// Plays the step. `plan` is BuildShardPlan's for o.topo.ranks.
StepEstimate SimulateStep(const mdopt::ShardPlan& plan, const std::vector<mdopt::ParamEntry>& params,
                          const Hardware& hw, const SimOptions& o);

// The wave schedule on given bucket costs (exposed for tests), `ranks` compute queues (one
// per rank: only Newton-Schulz differs between them) and one communication queue (every
// collective is started by all ranks, so it starts when the last of them gets there and the
// queue is free). Returns the step time from `start`; *compute gets the busiest rank's
// compute time, *comm the communication queue's busy time. rs_ready[b]: when bucket b's
// gradients are complete (its reduce-scatter may start); check_all_reduce: that one's time.
double PlayWaves(const std::vector<BucketCost>& b, const std::vector<double>& rs_ready, double start,
                 double check_all_reduce, bool deferred, int ranks, double* compute, double* comm);

}  // namespace mdopt_sim

#endif  // MDOPT_INTEGRATION_TOOLS_SIM_STEP_SIM_H_
