#include "plan_model.h"

#include "../bench/preset_groups.h"

namespace mdopt_tools {
namespace {
float g_unread = 0.0f;  // the registry wants a pointer; the planner reads shapes only
}  // namespace

bool BuildPlanModel(const std::vector<mdopt_bench::TensorShape>& shapes, const std::string& preset,
                    const std::string& layout, PlanModel* m, std::string* error,
                    bool bf16_weights) {
  const mdopt_bench::PresetGrouping* g = mdopt_bench::FindPreset(preset);
  if (g == nullptr) {
    std::string known;
    for (const std::string& n : mdopt_bench::PresetNames()) known += (known.empty() ? "" : ", ") + n;
    *error = "unknown preset '" + preset + "' (known: " + known + ")";
    return false;
  }
  for (mdopt_bench::Role role : {mdopt_bench::Role::kMatrix, mdopt_bench::Role::kTable,
                                 mdopt_bench::Role::kVector}) {
    std::string spec = mdopt_bench::RoleSpec(*g, role);
    if (role != mdopt_bench::Role::kVector && !layout.empty()) spec += " layout=" + layout;
    absl::StatusOr<mdopt::GroupSpec> parsed = mdopt::ParseGroupSpec(spec);
    if (!parsed.ok()) {
      *error = std::string(parsed.status().message());
      return false;
    }
    m->groups.push_back(mdopt::Group{mdopt_bench::RoleGroupName(role), *parsed});
  }
  for (const mdopt_bench::TensorShape& t : shapes) {
    mdopt::ParamDescription d;
    d.name = t.name;
    d.group = mdopt_bench::RoleGroupName(mdopt_bench::RoleOf(t.kind));
    d.ndim = static_cast<int>(t.dims.size());
    for (size_t k = 0; k < t.dims.size(); ++k) d.shape[k] = t.dims[k];
    // bf16 weights (an f32 master in the state), as trained at scale; f32 for the CPU runs.
    d.param_dtype = bf16_weights ? 1 : 0;
    d.grad_dtype = d.param_dtype;
    d.param = &g_unread;
    absl::StatusOr<int64_t> added = m->registry.Add(d, m->groups);
    if (!added.ok()) {
      *error = t.name + ": " + std::string(added.status().message());
      return false;
    }
  }
  return true;
}

double PerElement(const mdopt::ParamEntry& p) {
  return 4.0 + (p.rule.base == mdopt::kernels::Base::kMuon ? 4.0 : 8.0);
}
double PerRowBytes(const mdopt::ParamEntry& p) { return p.ndim == 1 ? 0.0 : 12.0 + 4.0; }
double Replicated(const mdopt::ParamEntry& p) {
  return p.ndim == 1 ? 0.0 : 12.0 * static_cast<double>(p.n) + 12.0 + 4.0;
}

RankBytes StateOf(const mdopt::ShardPlan& plan, const std::vector<mdopt::ParamEntry>& params, int r) {
  RankBytes b;
  for (const mdopt::SlotPlan& s : plan.slots) {
    const mdopt::ParamEntry& p = params[s.param];
    const int64_t rows = s.Rows(r);
    b.state += static_cast<double>(rows) * (static_cast<double>(s.n) * PerElement(p) + PerRowBytes(p));
    if (s.layout == mdopt::Layout::kRows || rows > 0) b.replicated += Replicated(p);
  }
  return b;
}

}  // namespace mdopt_tools
