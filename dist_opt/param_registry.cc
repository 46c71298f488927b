#include "dist_opt/param_registry.h"

#include <cmath>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace mdopt {
namespace {

// Largest tensor accepted: keeps every index and byte count far from int64 overflow and
// every matrix side within a BLAS int.
constexpr int64_t kMaxNumel = int64_t{1} << 40;
constexpr int64_t kMaxSide = (int64_t{1} << 31) - 1;

absl::StatusOr<Dtype> ToDtype(const std::string& param, const char* which, int v) {
  if (v == 0) return Dtype::kF32;
  if (v == 1) return Dtype::kBf16;
  return absl::InvalidArgumentError(absl::StrCat("param '", param, "': ", which, " ", v,
                                                 " is not an mdopt_dtype (0 = f32, 1 = bf16)"));
}

}  // namespace

absl::Status ValidateName(const char* what, const std::string& name) {
  if (name.empty() || name.size() > 256) {
    return absl::InvalidArgumentError(absl::StrCat(what, " name must have 1 to 256 characters"));
  }
  for (unsigned char c : name) {
    if (c <= 0x20 || c == 0x7f) {
      return absl::InvalidArgumentError(absl::StrCat(
          what, " name '", name, "' contains whitespace or a control character"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<int64_t> ParamRegistry::Add(const ParamDescription& d,
                                           const std::vector<Group>& groups) {
  if (absl::Status s = ValidateName("param", d.name); !s.ok()) return s;
  if (by_name_.contains(d.name)) {
    return absl::InvalidArgumentError(absl::StrCat("param '", d.name, "' is already registered"));
  }
  int group = -1;
  for (size_t g = 0; g < groups.size(); ++g)
    if (groups[g].name == d.group) group = static_cast<int>(g);
  if (group < 0) {
    std::vector<std::string> names;
    for (const Group& g : groups) names.push_back(g.name);
    return absl::InvalidArgumentError(absl::StrCat("param '", d.name, "': group '", d.group,
                                                   "' was not added (groups: ",
                                                   absl::StrJoin(names, ", "), ")"));
  }
  if (d.ndim < 1 || d.ndim > 3) {
    return absl::InvalidArgumentError(
        absl::StrCat("param '", d.name, "': ndim ", d.ndim, " is not 1, 2 or 3"));
  }
  int64_t numel = 1;
  for (int k = 0; k < d.ndim; ++k) {
    if (d.shape[k] < 1 || d.shape[k] > kMaxSide) {
      return absl::InvalidArgumentError(absl::StrCat("param '", d.name, "': shape[", k, "] = ",
                                                     d.shape[k], " is not in [1, 2^31)"));
    }
    numel *= d.shape[k];
    if (numel > kMaxNumel) {
      return absl::InvalidArgumentError(
          absl::StrCat("param '", d.name, "' has more than 2^40 elements"));
    }
  }
  absl::StatusOr<Dtype> pd = ToDtype(d.name, "param_dtype", d.param_dtype);
  if (!pd.ok()) return pd.status();
  absl::StatusOr<Dtype> gd = ToDtype(d.name, "grad_dtype", d.grad_dtype);
  if (!gd.ok()) return gd.status();
  // Autograd gives a tensor's gradient its own dtype, and trainers keep bf16 weights with
  // f32 main grads; a gradient less precise than its weights is a wiring mistake.
  if (*pd == Dtype::kF32 && *gd == Dtype::kBf16) {
    return absl::InvalidArgumentError(absl::StrCat(
        "param '", d.name, "': grad_dtype bf16 with param_dtype f32 is not accepted "
        "(use f32 gradients for f32 weights)"));
  }
  if (d.param == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("param '", d.name, "': param pointer is NULL"));
  }

  const GroupSpec& spec = groups[group].spec;
  ParamEntry e;
  e.name = d.name;
  e.group = group;
  e.ndim = d.ndim;
  for (int k = 0; k < 3; ++k) e.shape[k] = k < d.ndim ? d.shape[k] : 0;
  e.param_dtype = *pd;
  e.grad_dtype = *gd;
  e.param = d.param;
  e.grad = d.grad;
  e.rule = spec.rule;
  e.preserve_init = spec.preserve_init;
  if (d.radius_scale != 0.0) {
    if (!std::isfinite(d.radius_scale) || !(d.radius_scale > 0.0)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "param '", d.name, "': radius_scale = ", d.radius_scale,
          " is not a finite number > 0 (0 means 1)"));
    }
    if (spec.rule.sphere == kernels::Sphere::kNone || d.ndim == 1) {
      return absl::InvalidArgumentError(absl::StrCat(
          "param '", d.name, "': radius_scale = ", d.radius_scale, " but ",
          d.ndim == 1 ? "the parameter is 1-D" : "its group has sphere=none",
          ": there is no sphere to scale"));
    }
    e.rule.radius_scale = d.radius_scale;
  }
  if (d.ndim == 1) {
    if (spec.rule.base == kernels::Base::kMuon) {
      return absl::InvalidArgumentError(absl::StrCat(
          "param '", d.name, "' is 1-D but group '", d.group,
          "' has base=muon, which needs matrices; put vectors in an adamw group "
          "(preset=vector)"));
    }
    // DESIGN.md section 1: 1-D tensors are never put on a sphere and carry no gains.
    e.rule.sphere = kernels::Sphere::kNone;
    e.rule.gains = kernels::Gains::kNone;
    e.rule.tangent = false;
    e.matrix_m = 1;
    e.n = d.shape[0];
  } else if (d.ndim == 2) {
    e.matrix_m = d.shape[0];
    e.n = d.shape[1];
  } else {
    e.experts = d.shape[0];
    e.matrix_m = d.shape[1];
    e.n = d.shape[2];
  }
  e.block_m = {e.matrix_m};
  e.block_row0 = {0};
  if (spec.row_blocks > 1 || spec.block_groups > 0) {
    // Logical row blocks: K matrices per matrix, stored (in block order) one after another
    // like the experts of a stack, so that every engine, plan and checkpoint treats each as a
    // slot.
    const int64_t K = spec.row_blocks, m = e.matrix_m;
    int64_t sum = 0;
    for (int64_t h : spec.block_heights) sum += h;
    const bool fits = spec.block_groups > 0 ? spec.block_groups * sum == m : m % K == 0;
    if (d.ndim == 1 || !fits) {
      return absl::InvalidArgumentError(absl::StrCat(
          "param '", d.name, "': spec key 'blocks': group '", d.group, "' has blocks=",
          BlocksText(spec), ", which needs a matrix whose rows (", d.ndim == 1 ? 0 : m,
          spec.block_groups > 0
              ? absl::StrCat(") are ", spec.block_groups, " x ", sum, " = ", spec.block_groups * sum)
              : absl::StrCat(") are a multiple of ", K)));
    }
    e.blocks = K;
    e.experts *= K;
    e.block_m.assign(static_cast<size_t>(K), m / K);
    e.block_row0.assign(static_cast<size_t>(K), 0);
    if (spec.block_groups > 0) {
      kernels::RowMap& map = e.row_map;
      map.groups = spec.block_groups;
      map.pieces = static_cast<int32_t>(K);
      map.group_rows = sum;
      for (int64_t j = 0, at = 0; j < K; ++j) {
        map.height[j] = spec.block_heights[static_cast<size_t>(j)];
        map.start[j] = at;
        at += map.height[j];
        e.block_m[static_cast<size_t>(j)] = spec.block_groups * map.height[j];
      }
    }
    for (int64_t j = 1; j < K; ++j)
      e.block_row0[static_cast<size_t>(j)] =
          e.block_row0[static_cast<size_t>(j - 1)] + e.block_m[static_cast<size_t>(j - 1)];
  }
  const int64_t index = static_cast<int64_t>(params_.size());
  by_name_[e.name] = index;
  params_.push_back(std::move(e));
  return index;
}

std::string ParamEntry::SlotWhere(int64_t slot) const {
  const int64_t stack = experts / blocks;
  if (blocks == 1) return stack > 1 ? absl::StrCat(" of expert ", slot) : "";
  if (stack == 1) return absl::StrCat(" of block ", slot);
  return absl::StrCat(" of expert ", slot / blocks, " block ", slot % blocks);
}

absl::Status ParamRegistry::SetPointers(int64_t index, void* param, const void* grad) {
  if (index < 0 || index >= size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("param index ", index, " is out of range [0, ", size(), ")"));
  }
  if (param == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("param '", params_[index].name, "': param pointer is NULL"));
  }
  params_[index].param = param;
  params_[index].grad = grad;
  return absl::OkStatus();
}

absl::StatusOr<int64_t> ParamRegistry::Find(const std::string& name) const {
  auto it = by_name_.find(name);
  if (it == by_name_.end()) return absl::NotFoundError(absl::StrCat("no param named '", name, "'"));
  return it->second;
}

void ParamRegistry::SetGroupScalars(int group, const kernels::UpdateRule& rule) {
  for (ParamEntry& p : params_) {
    if (p.group != group) continue;
    p.rule.beta1 = rule.beta1;
    p.rule.beta2 = rule.beta2;
    p.rule.eps = rule.eps;
    p.rule.momentum = rule.momentum;
    p.rule.weight_decay = rule.weight_decay;
  }
}

void ParamRegistry::SetGroupLr(int group, double lr, double gain_lr) {
  for (ParamEntry& p : params_) {
    if (p.group != group) continue;
    p.rule.lr = lr;
    p.rule.gain_lr = gain_lr;
  }
}

}  // namespace mdopt
