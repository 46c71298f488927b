// A model's tensors registered as mdopt would register them, for tools that plan without a
// communicator (mdopt-scale, mdopt-sim): the preset's three groups (matrix, table, vector)
// and a registry of bf16 weights whose pointers are never read.
#ifndef MDOPT_INTEGRATION_TOOLS_SCALE_PLAN_MODEL_H_
#define MDOPT_INTEGRATION_TOOLS_SCALE_PLAN_MODEL_H_

#include <string>
#include <vector>

#include "dist_opt/group_spec.h"
#include "dist_opt/param_registry.h"
#include "dist_opt/shard_plan.h"
#include "../bench/model_shapes.h"

namespace mdopt_tools {

struct PlanModel {
  std::vector<mdopt::Group> groups;
  mdopt::ParamRegistry registry;
};

// Groups of `preset` (mdopt-bench's table), `layout` (rows | owner | "" for the preset's)
// on the matrix and table groups, every shape registered. False with *error on an unknown
// preset, a bad layout or a shape the registry refuses.
bool BuildPlanModel(const std::vector<mdopt_bench::TensorShape>& shapes, const std::string& preset,
                    const std::string& layout, PlanModel* m, std::string* error,
                    bool bf16_weights = true);

// State bytes per element of a matrix's rows: the f32 master (bf16 weights), the momentum
// (Muon) or two moments (Adam). Per row: its gain (raw, two moments: 12 B) and a radius;
// replicated on every rank holding rows: the column gains (12 B each), scalar gain, radius.
double PerElement(const mdopt::ParamEntry& p);
double PerRowBytes(const mdopt::ParamEntry& p);
double Replicated(const mdopt::ParamEntry& p);

struct RankBytes {
  double state = 0.0, replicated = 0.0;
};
// The optimizer state rank r holds under `plan`.
RankBytes StateOf(const mdopt::ShardPlan& plan, const std::vector<mdopt::ParamEntry>& params, int r);

}  // namespace mdopt_tools

#endif  // MDOPT_INTEGRATION_TOOLS_SCALE_PLAN_MODEL_H_
