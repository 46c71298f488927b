// The step schedule: for every bucket of the ShardPlan, the ordered stages of a backend
// (kernels/backend.h) and the collectives between them, pipelined across buckets. Written
// once for every device: the CPU backend and a GPU backend run under the same schedule.
//
//   grads=local, N > 1: PackGrads -> reduce-scatter (float32 mean) per bucket, from
//                       mdopt_grads_ready on or at the step
//   every bucket:       CheckFinite -> [all-reduce of the per-param sums] -> ApplyCheck
//   per bucket b, stage s in wave b + s:
//     S0  Prepare [-> all-reduce radial record -> ApplyRadial] -> Pass1  => NS gather
//     S1  NewtonSchulz                                                  => NS scatter
//     S2  Pass2 -> AssembleCross                                        => all-reduce record
//     S3  ApplyCross -> Finish -> PackWeights                           => all-gather weights
//     S4  UnpackWeights
//   EndStep
// Between stages the schedule only orders (Request::OrderBefore on the backend's stream);
// it never waits on the host. The skip flag is the backend's: a NaN/Inf anywhere makes
// every later stage of the step a no-op on every rank (all ranks read the same summed
// record), with no host decision in the middle of the step.
#ifndef MDOPT_DIST_OPT_SCHEDULE_H_
#define MDOPT_DIST_OPT_SCHEDULE_H_

#include <cstdint>

namespace mdopt {

// Bytes this rank put on the wire in the last step, by the purpose of each collective
// (CommStats.bytes_sent differences around each call).
struct StepTraffic {
  int64_t grads = 0;    // gradient reduce-scatter
  int64_t check = 0;    // finite check and grad norm (all-reduce of one double per param)
  int64_t cross = 0;    // cross-row records (column/scalar gain gradients, norms; radial)
  int64_t ns = 0;       // Newton-Schulz gather and scatter
  int64_t weights = 0;  // weight all-gather
};

// Stage s of bucket b runs in wave b + s: kStages buckets are in flight at once.
inline constexpr int kScheduleStages = 5;

}  // namespace mdopt

#endif  // MDOPT_DIST_OPT_SCHEDULE_H_
