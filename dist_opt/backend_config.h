// This rank's part of a shard plan described for a backend (kernels::BackendConfig): every
// matrix's rows and offsets, every bucket's windows and copy lists. A pure function of the
// plan, the params, the options and the rank, so that the scale report (mdopt-bench
// --plan-only) can size any rank of any world without allocating or communicating.
#ifndef MDOPT_DIST_OPT_BACKEND_CONFIG_H_
#define MDOPT_DIST_OPT_BACKEND_CONFIG_H_

#include <vector>

#include "dist_opt/engine.h"
#include "dist_opt/group_spec.h"
#include "dist_opt/param_registry.h"
#include "dist_opt/shard_plan.h"
#include "kernels/backend_factory.h"

namespace mdopt {

kernels::BackendConfig DescribeRank(const ShardPlan& plan, const std::vector<ParamEntry>& params,
                                    const std::vector<Group>& groups, const EngineOptions& options,
                                    int rank);

}  // namespace mdopt

#endif  // MDOPT_DIST_OPT_BACKEND_CONFIG_H_
